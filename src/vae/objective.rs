//! Objectives of the VAE: the ELBO (two parts, K Monte Carlo samples), the importance-weighted
//! bound IWAE_K (Burda et al. 2015) and the importance-sampling estimate of log p(x).
//!
//! All values are per example in nats; shapes: `x` `[B, D]`, results `[B]`.

pub use super::estimate::{LikelihoodEstimate, log_add_exp};
use anyhow::Result;
use candle_core::{D, Tensor};

use super::model::Vae;
use crate::distributions::{DiagGaussian, Noise, standard_normal_log_prob};

/// The two parts of the ELBO, per example, `[B]` each:
/// `reconstruction = E_q[log p(x|z)]` (a K-sample Monte Carlo mean) and the closed-form
/// `kl = KL(q(z|x) || N(0, I))`.
pub struct ElboTerms {
    pub reconstruction: Tensor,
    pub kl: Tensor,
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

/// ELBO terms with K reparameterized samples z_k = mu + sigma * eps_k.
pub fn elbo_terms(vae: &Vae, x: &Tensor, k: usize, noise: &mut Noise) -> Result<ElboTerms> {
    let q = vae.encode(x)?;
    let z = q.rsample(k, noise)?; // [K, B, L]
    let log_px_z = vae.log_likelihood(x, &vae.decode(&z)?)?; // [K, B]
    Ok(ElboTerms {
        reconstruction: log_px_z.mean(0)?,
        kl: q.kl_standard_normal()?,
    })
}

/// Log importance weights `log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x)` for
/// z_k = mu + sigma * eps_k; `eps` `[K, B, L]`. Returns `(log w, log p(x|z))`, both `[K, B]`.
pub fn log_importance_weights(
    vae: &Vae,
    x: &Tensor,
    q: &DiagGaussian,
    eps: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let z = q.rsample_with(eps)?;
    let log_px_z = vae.log_likelihood(x, &vae.decode(&z)?)?;
    let log_w = ((&log_px_z + standard_normal_log_prob(&z)?)? - q.log_prob(&z)?)?;
    Ok((log_w, log_px_z))
}

/// The importance-weighted bound `IWAE_K = log (1/K) sum_k w_k` (one draw of it), `[B]`.
/// `E[IWAE_1] = ELBO <= E[IWAE_K] <= E[IWAE_K'] <= log p(x)` for K <= K' (Burda et al. 2015, Thm 1).
/// Differentiable, so it can also be trained on.
pub fn iwae_bound(vae: &Vae, x: &Tensor, k: usize, noise: &mut Noise) -> Result<Tensor> {
    Ok(iwae_terms(vae, x, k, noise)?.1)
}

/// The IWAE_K bound `[B]` (differentiable, for training) together with the ELBO parts
/// estimated from the same K samples (reconstruction: their mean log p(x|z); KL: closed form).
pub fn iwae_terms(
    vae: &Vae,
    x: &Tensor,
    k: usize,
    noise: &mut Noise,
) -> Result<(ElboTerms, Tensor)> {
    let q = vae.encode(x)?;
    let eps = noise.randn((k, x.dim(0)?, vae.config.latent_dim), x.device())?;
    let (log_w, log_px_z) = log_importance_weights(vae, x, &q, &eps)?;
    let bound = log_w.log_sum_exp(0)?.affine(1.0, -(k as f64).ln())?;
    let terms = ElboTerms {
        reconstruction: log_px_z.mean(0)?,
        kl: q.kl_standard_normal()?,
    };
    Ok((terms, bound))
}

/// Importance-sampled log p(x) with q(z|x) as proposal and K samples, on candle tensors (any
/// device and likelihood), computed in chunks of at most `max_rows` decoded rows (chunk_K x B)
/// so memory stays bounded for K = 5000; the log-sum-exp is accumulated across chunks in f64:
///
/// ```text
/// log p(x) ~= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x),   z_k ~ q(z|x)
/// ```
///
/// `engine::estimate_log_likelihood` runs it on the fused CPU engine where that applies (the
/// same noise, the same numbers to float rounding). Run on a [`Vae::frozen`] model.
pub fn estimate_log_likelihood_candle(
    vae: &Vae,
    x: &Tensor,
    k: usize,
    max_rows: usize,
    noise: &mut Noise,
) -> Result<LikelihoodEstimate> {
    let b = x.dim(0)?;
    let q = vae.encode(x)?;
    let chunk = (max_rows / b.max(1)).clamp(1, k.max(1));
    let mut lse = vec![f64::NEG_INFINITY; b];
    let mut rec_sum = vec![0.0f64; b];
    let mut done = 0;
    while done < k {
        let kc = chunk.min(k - done);
        let eps = noise.randn((kc, b, vae.config.latent_dim), x.device())?;
        let (log_w, log_px_z) = log_importance_weights(vae, x, &q, &eps)?;
        let chunk_lse = log_w
            .log_sum_exp(0)?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        let chunk_rec = log_px_z
            .sum(0)?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        for i in 0..b {
            lse[i] = log_add_exp(lse[i], chunk_lse[i]);
            rec_sum[i] += chunk_rec[i];
        }
        done += kc;
    }
    let log_k = (k as f64).ln();
    let kl = q
        .kl_standard_normal()?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    Ok(LikelihoodEstimate {
        log_px: lse.iter().map(|l| l - log_k).collect(),
        reconstruction: rec_sum.iter().map(|r| r / k as f64).collect(),
        kl,
    })
}

/// Sums a `[B]` tensor to f64 (for metrics).
pub fn sum_f64(t: &Tensor) -> Result<f64> {
    Ok(t.sum(D::Minus1)?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?)
}
