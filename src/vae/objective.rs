//! Objectives of the VAE family, written once for any number of stochastic layers: the ELBO
//! (reconstruction and the KL of each layer, K Monte Carlo samples), the importance-weighted
//! bound IWAE_K (Burda et al. 2015) and the importance-sampling estimate of log p(x).
//!
//! With z_0 = x, samples z_l = mu_l + sigma_l eps_l drawn bottom-up from q, and the noise
//! drawn layer by layer (`eps_1` `[K, B, L_1]`, then `eps_2`, ...):
//!
//! ```text
//! log w = log p(x|z_1) + sum_{l<L} [log p(z_l|z_{l+1}) - log q(z_l|z_{l-1})] + log p(z_L) - log q(z_L|z_{L-1})
//! ELBO  = E_q[log p(x|z_1)] - sum_l KL_l,   KL_l = E_q[log q(z_l|z_{l-1}) - log p(z_l|z_{l+1})]
//! ```
//!
//! The top layer's KL against N(0, I) is in closed form given z_{L-1} (or, with
//! [`KlEstimator::MonteCarlo`], the Monte Carlo mean of `log q - log p` as in Burda et al.'s
//! code and Pyro's `Trace_ELBO`); the lower layers' are Monte Carlo (their prior depends on a
//! sample). All values are per example in nats; shapes:
//! `x` `[B, D]`, results `[B]`.

pub use super::estimate::{LikelihoodEstimate, log_add_exp};
use anyhow::Result;
use candle_core::{D, DType, Device, Tensor};

use crate::distributions::{DiagGaussian, Noise, standard_normal_log_prob};

/// A latent variable model with L stochastic layers, bottom-up inference and top-down
/// generation (Burda et al. 2015, Section 2): what every objective here needs. The shipped
/// `Vae` (in `vae::model`) implements it; so can any model of candle modules
/// (`examples/custom_vae.rs`), and then the ELBO, IWAE_K, log p(x), posterior means and
/// active units come with it.
///
/// ```text
/// q(z_1|x) q(z_2|z_1) ... q(z_L|z_{L-1})       encode_layer(0..L)
/// p(z_L) = N(0, I)  p(z_{L-1}|z_L) ... p(x|z_1)  prior_layer(1..L), log_px_given_z
/// ```
pub trait LatentVariableModel {
    /// The sizes of z_1..z_L (bottom-up; at least one).
    fn latent_dims(&self) -> Vec<usize>;
    /// The device its parameters live on (noise is drawn there).
    fn device(&self) -> &Device;
    /// q(z_{l+1}|z_l) for 0-based `l` (z_0 = x): `input` `[..., in]` -> `[..., L_{l+1}]`.
    fn encode_layer(&self, l: usize, input: &Tensor) -> Result<DiagGaussian>;
    /// p(z_l|z_{l+1}) for 0-based `l` in 1..L: `z` `[..., L_{l+1}]` -> a Gaussian over z_l.
    /// Models with one stochastic layer never have it called.
    fn prior_layer(&self, l: usize, z: &Tensor) -> Result<DiagGaussian> {
        let _ = z;
        anyhow::bail!("this model has no generative layer above z_{l}")
    }
    /// `log p(x|z_1)` summed over the pixels: `x` `[B, D]`, `z1` `[..., B, L_1]` -> `[..., B]`.
    fn log_px_given_z(&self, x: &Tensor, z1: &Tensor) -> Result<Tensor>;
}

/// The training objective.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// `E_q[log p(x|z)] - beta KL(q || p)`, K-sample Monte Carlo (Kingma & Welling 2014).
    #[default]
    Elbo,
    /// `log (1/K) sum_k w_k`, the IWAE bound (Burda et al. 2015); beta is not used.
    Iwae,
}

/// How the ELBO's top-layer KL(q(z_L|z_{L-1}) || N(0, I)) is estimated. Both are unbiased
/// for the same KL; the gradients differ in variance, not in expectation.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `-1/2 sum (1 + lv - mu^2 - e^lv)` (Kingma & Welling 2014, Appendix B; Pyro's
    /// `TraceMeanField_ELBO`).
    #[default]
    Analytic,
    /// `(1/K) sum_k [log q(z_k|.) - log N(z_k; 0, I)]` at the reparameterized samples, the
    /// estimator of Burda et al.'s code (every term of the ELBO by Monte Carlo; Pyro's
    /// `Trace_ELBO`).
    #[value(name = "mc")]
    #[serde(rename = "mc")]
    MonteCarlo,
}

/// The parts of the ELBO, per example, `[B]` each: `reconstruction = E_q[log p(x|z_1)]` (a
/// K-sample Monte Carlo mean), `kl` the sum of the layers' KLs, `kl_layers[l]` layer l+1's.
pub struct ElboTerms {
    pub reconstruction: Tensor,
    pub kl: Tensor,
    pub kl_layers: Vec<Tensor>,
}

impl ElboTerms {
    /// `L_beta = reconstruction - beta * kl`, `[B]` (beta = 1 is the ELBO).
    pub fn elbo(&self, beta: f64) -> Result<Tensor> {
        Ok((&self.reconstruction - (&self.kl * beta)?)?)
    }

    /// The training loss: `-mean_b L_beta`, a scalar.
    pub fn loss(&self, beta: f64) -> Result<Tensor> {
        Ok(self.elbo(beta)?.mean_all()?.neg()?)
    }
}

/// One pass of K samples through the model: what every objective is made of.
pub struct Pass {
    /// `log p(x|z_1)` `[K, B]`.
    pub log_px_z: Tensor,
    /// Per layer l (bottom-up), `log p(z_l|.) - log q(z_l|.)` at the samples, `[K, B]`.
    pub log_ratio: Vec<Tensor>,
    /// The top layer's closed-form KL(q(z_L|z_{L-1}) || N(0, I)): `[B]` for one layer,
    /// `[K, B]` above one (it depends on the sampled z_{L-1}).
    pub top_kl: Tensor,
    /// q(z_1|x) (for the active-unit count and the closed-form KL of one layer).
    pub q1: DiagGaussian,
}

impl Pass {
    /// `log w` `[K, B]`.
    pub fn log_weights(&self) -> Result<Tensor> {
        let mut total = self.log_px_z.clone();
        for r in &self.log_ratio {
            total = (total + r)?;
        }
        Ok(total)
    }

    /// The KL of each layer, `[B]`: Monte Carlo below the top, closed form at the top.
    pub fn kl_layers(&self) -> Result<Vec<Tensor>> {
        self.kl_layers_with(KlEstimator::Analytic)
    }

    /// The KL of each layer, `[B]`: Monte Carlo below the top, `kl` at the top.
    pub fn kl_layers_with(&self, kl: KlEstimator) -> Result<Vec<Tensor>> {
        let top = self.log_ratio.len() - 1;
        let mut out = Vec::new();
        for r in &self.log_ratio[..top] {
            out.push(r.mean(0)?.neg()?);
        }
        out.push(match kl {
            KlEstimator::MonteCarlo => self.log_ratio[top].mean(0)?.neg()?,
            KlEstimator::Analytic if self.top_kl.rank() == 2 => self.top_kl.mean(0)?,
            KlEstimator::Analytic => self.top_kl.clone(),
        });
        Ok(out)
    }

    /// The ELBO's parts from this pass (the top layer's KL in closed form).
    pub fn elbo_terms(&self) -> Result<ElboTerms> {
        self.elbo_terms_with(KlEstimator::Analytic)
    }

    /// The ELBO's parts from this pass, the top layer's KL estimated as `kl` says.
    pub fn elbo_terms_with(&self, kl: KlEstimator) -> Result<ElboTerms> {
        let kl_layers = self.kl_layers_with(kl)?;
        let mut kl = kl_layers[0].clone();
        for k in &kl_layers[1..] {
            kl = (kl + k)?;
        }
        Ok(ElboTerms {
            reconstruction: self.log_px_z.mean(0)?,
            kl,
            kl_layers,
        })
    }
}

/// Draws the noise of K samples of every layer, layer by layer: `[K, B, L_l]` each.
pub fn draw_noise<M: LatentVariableModel + ?Sized>(
    vae: &M,
    k: usize,
    b: usize,
    noise: &mut Noise,
) -> Result<Vec<Tensor>> {
    vae.latent_dims()
        .iter()
        .map(|&l| Ok(noise.randn((k, b, l), vae.device())?))
        .collect()
}

/// The pass of [`Pass`] with the given noise (`eps[l]` `[K, B, L_l]`).
pub fn pass_with<M: LatentVariableModel + ?Sized>(
    vae: &M,
    x: &Tensor,
    eps: &[Tensor],
) -> Result<Pass> {
    let layers = vae.latent_dims().len();
    let q1 = vae.encode_layer(0, x)?;
    let mut q = q1.clone();
    let mut samples = Vec::new();
    let mut log_q = Vec::new();
    let mut top_kl = None;
    for l in 0..layers {
        if l > 0 {
            q = vae.encode_layer(l, &samples[l - 1])?;
        }
        let z = q.rsample_with(&eps[l])?; // [K, B, L_l]
        log_q.push(q.log_prob(&z)?);
        if l + 1 == layers {
            top_kl = Some(q.kl_standard_normal()?);
        }
        samples.push(z);
    }
    let log_px_z = vae.log_px_given_z(x, &samples[0])?;
    let mut log_ratio = Vec::new();
    for l in 0..layers {
        let log_p = if l + 1 == layers {
            standard_normal_log_prob(&samples[l])?
        } else {
            vae.prior_layer(l + 1, &samples[l + 1])?
                .log_prob(&samples[l])?
        };
        log_ratio.push((log_p - &log_q[l])?);
    }
    Ok(Pass {
        log_px_z,
        log_ratio,
        top_kl: top_kl.expect("at least one layer"),
        q1,
    })
}

/// ELBO terms with K reparameterized samples of every layer.
pub fn elbo_terms<M: LatentVariableModel + ?Sized>(
    vae: &M,
    x: &Tensor,
    k: usize,
    noise: &mut Noise,
) -> Result<ElboTerms> {
    elbo_terms_with(vae, x, k, KlEstimator::Analytic, noise)
}

/// [`elbo_terms`] with the top layer's KL estimated as `kl` says.
pub fn elbo_terms_with<M: LatentVariableModel + ?Sized>(
    vae: &M,
    x: &Tensor,
    k: usize,
    kl: KlEstimator,
    noise: &mut Noise,
) -> Result<ElboTerms> {
    let eps = draw_noise(vae, k, x.dim(0)?, noise)?;
    pass_with(vae, x, &eps)?.elbo_terms_with(kl)
}

/// The importance-weighted bound `IWAE_K = log (1/K) sum_k w_k` (one draw of it), `[B]`.
/// `E[IWAE_1] = ELBO <= E[IWAE_K] <= E[IWAE_K'] <= log p(x)` for K <= K' (Burda et al. 2015, Thm 1).
/// Differentiable, so it can also be trained on.
pub fn iwae_bound<M: LatentVariableModel + ?Sized>(
    vae: &M,
    x: &Tensor,
    k: usize,
    noise: &mut Noise,
) -> Result<Tensor> {
    Ok(iwae_terms(vae, x, k, noise)?.1)
}

/// The IWAE_K bound `[B]` (differentiable, for training) together with the ELBO parts
/// estimated from the same K samples.
///
/// Its gradient is the paper's (Burda et al. 2015, Eq. 14): `sum_k w~_k grad log w_k`, the
/// normalised weights `w~_k = w_k / sum_k' w_k'` acting as constants. That is exactly the
/// derivative of the log-mean-exp, which autodiff of this function computes; the fused engine
/// computes it by hand, and `tests/vae.rs` checks the two against each other.
pub fn iwae_terms<M: LatentVariableModel + ?Sized>(
    vae: &M,
    x: &Tensor,
    k: usize,
    noise: &mut Noise,
) -> Result<(ElboTerms, Tensor)> {
    let eps = draw_noise(vae, k, x.dim(0)?, noise)?;
    let pass = pass_with(vae, x, &eps)?;
    let bound = pass
        .log_weights()?
        .log_sum_exp(0)?
        .affine(1.0, -(k as f64).ln())?;
    Ok((pass.elbo_terms()?, bound))
}

/// Importance-sampled log p(x) with q as proposal and K samples, on candle tensors (any
/// device and likelihood), computed in chunks of at most `max_rows` decoded rows (chunk_K x B)
/// so memory stays bounded for K = 5000; the log-sum-exp is accumulated across chunks in f64:
///
/// ```text
/// log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k|x),   z_k ~ q(z|x)
/// ```
///
/// `engine::estimate_log_likelihood` runs it on the fused CPU engine where that applies (the
/// same noise, the same numbers to float rounding). Run on a frozen model (`Vae::frozen`).
pub fn estimate_log_likelihood_candle<M: LatentVariableModel + ?Sized>(
    vae: &M,
    x: &Tensor,
    k: usize,
    max_rows: usize,
    noise: &mut Noise,
) -> Result<LikelihoodEstimate> {
    let b = x.dim(0)?;
    let layers = vae.latent_dims().len();
    let chunk = (max_rows / b.max(1)).clamp(1, k.max(1));
    let mut lse = vec![f64::NEG_INFINITY; b];
    let mut rec_sum = vec![0.0f64; b];
    let mut kl_sums = vec![vec![0.0f64; b]; layers];
    let mut done = 0;
    let to_f64 = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?) };
    while done < k {
        let kc = chunk.min(k - done);
        let eps = draw_noise(vae, kc, b, noise)?;
        let pass = pass_with(vae, x, &eps)?;
        let chunk_lse = to_f64(&pass.log_weights()?.log_sum_exp(0)?)?;
        let chunk_rec = to_f64(&pass.log_px_z.sum(0)?)?;
        for (l, kl) in pass.kl_layers()?.iter().enumerate() {
            for (s, v) in kl_sums[l].iter_mut().zip(to_f64(kl)?) {
                *s += v * kc as f64;
            }
        }
        for i in 0..b {
            lse[i] = log_add_exp(lse[i], chunk_lse[i]);
            rec_sum[i] += chunk_rec[i];
        }
        done += kc;
    }
    Ok(LikelihoodEstimate::from_sums(lse, rec_sum, kl_sums, k))
}

/// Sums a `[B]` tensor to f64 (for metrics).
pub fn sum_f64(t: &Tensor) -> Result<f64> {
    Ok(t.sum(D::Minus1)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The posterior means `E_q[z_l | x]` of every layer, `[B, L_l]` each: `mu_1(x)` for the
/// first, and above it the Monte Carlo mean of `mu_l(z_{l-1})` over `samples` draws of the
/// layers below. Their variance across examples gives the active units (Burda et al. 2015,
/// Section 5.2): `A_u = Cov_x(E_q[u|x]) > 10^-2`.
pub fn posterior_means<M: LatentVariableModel + ?Sized>(
    vae: &M,
    x: &Tensor,
    samples: usize,
    noise: &mut Noise,
) -> Result<Vec<Tensor>> {
    let q1 = vae.encode_layer(0, x)?;
    let mut means = vec![q1.mean.clone()];
    let mut dims = vec![samples];
    dims.extend_from_slice(q1.mean.dims());
    let mut z = q1.rsample_with(&noise.randn(dims, x.device())?)?; // [S, B, L_1]
    for l in 1..vae.latent_dims().len() {
        let q = vae.encode_layer(l, &z)?; // [S, B, L_l]
        means.push(q.mean.mean(0)?);
        z = q.rsample_with(&noise.randn(q.mean.dims(), x.device())?)?;
    }
    Ok(means)
}
