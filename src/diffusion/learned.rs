//! Training learned variances (Nichol & Dhariwal 2021, "Improved Denoising Diffusion
//! Probabilistic Models"). The network gives 2C channels: the prediction (eps, x_0 or v) and
//! v in [-1, 1], which interpolates the log-variance of p(x_{t-1} | x_t) between its bounds
//! (their eq. 15):
//!
//! ```text
//! log Sigma_t = frac log beta_t + (1 - frac) log beta~_t,   frac = (v + 1) / 2
//! ```
//!
//! and the losses that train it (their Section 3.1):
//!
//! ```text
//! L_hybrid = L_simple + lambda L_vlb,   lambda = 0.001, the mean's gradient stopped in L_vlb
//! L_vlb    = sum_t L_t,  L_0 = -log p(x_0 | x_1) (discretized),  L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
//! ```
//!
//! In improved-diffusion's units: each example draws one t, its L_t is taken in bits per
//! dimension (the mean over the example's values / ln 2), and lambda L_vlb = lambda T E_t[L_t]
//! weighs it by T / 1000 (their `RESCALED_MSE`); `vlb` trains on T w L_t alone (their
//! `RESCALED_KL`) with the importance weight w of the loss-aware sampler.
//!
//! [`LearnedHead::example`] computes one example's loss and its gradient with respect to the
//! network's output in closed form (f64 inside), for the fused engine and for candle alike.

use anyhow::{Result, bail};

use super::process::{GaussianDiffusion, Prediction, std_normal_cdf};

/// What `train diffusion --loss` trains on.
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
#[serde(rename_all = "kebab-case")]
pub enum TrainLoss {
    /// L_simple (Ho et al. 2020, eq. 14): fixed variances.
    #[default]
    Simple,
    /// L_simple + 0.001 L_vlb, the mean's gradient stopped in L_vlb (learned variances).
    Hybrid,
    /// L_vlb alone, t from the loss-aware sampler (learned variances).
    Vlb,
}

/// One example's share of a learned-variance loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExampleLoss {
    /// Its contribution to the batch's loss (already multiplied by the scale).
    pub loss: f64,
    /// L_t of the example in nats (the sum over its values): the variational bound's term.
    pub vb_nats: f64,
}

/// The constants of each timestep that the loss reads, from a process.
#[derive(Debug, Clone)]
pub struct LearnedHead {
    loss: TrainLoss,
    /// x_0_hat = a_t x_t + b_t out (the prediction type's inverse, linear in the output).
    x0_from_xt: Vec<f64>,
    x0_from_out: Vec<f64>,
    /// mu~ = c1_t x_0 + c2_t x_t.
    coef1: Vec<f64>,
    coef2: Vec<f64>,
    /// log beta_t and log beta~_t (clipped at t = 0): the bounds of eq. 15.
    max_log: Vec<f64>,
    min_log: Vec<f64>,
}

impl LearnedHead {
    pub fn new(process: &GaussianDiffusion, loss: TrainLoss) -> Result<Self> {
        if loss == TrainLoss::Simple {
            bail!("learned variances train on --loss hybrid or vlb, not simple");
        }
        let s = &process.schedule;
        let (x0_from_xt, x0_from_out) = match process.prediction {
            Prediction::Eps => (
                s.sqrt_recip_alphas_cumprod.clone(),
                s.sqrt_recipm1_alphas_cumprod.iter().map(|v| -v).collect(),
            ),
            Prediction::X0 => (vec![0.0; s.len()], vec![1.0; s.len()]),
            Prediction::V => (
                s.sqrt_alphas_cumprod.clone(),
                s.sqrt_one_minus_alphas_cumprod.iter().map(|v| -v).collect(),
            ),
        };
        Ok(Self {
            loss,
            x0_from_xt,
            x0_from_out,
            coef1: s.posterior_mean_coef1.clone(),
            coef2: s.posterior_mean_coef2.clone(),
            max_log: s.betas.iter().map(|b| b.ln()).collect(),
            min_log: s.posterior_log_variance_clipped.clone(),
        })
    }

    pub fn loss(&self) -> TrainLoss {
        self.loss
    }

    /// The weight of L_t (bits/dim) in the loss of an example drawn with importance weight
    /// `w` (1 for uniform t): T / 1000 for `hybrid`, T w for `vlb`.
    pub fn vb_weight(&self, w: f64) -> f64 {
        let t = self.coef1.len() as f64;
        match self.loss {
            TrainLoss::Vlb => t * w,
            _ => t / 1000.0,
        }
    }

    /// One example at timestep `t` (0-based): `x0`, `xt`, `target` `[n]` values (the data, its
    /// noisy version, the prediction's regression target), `out` `[2n]` (the prediction, then
    /// v). Writes `scale` dL/d(out) into `dy` `[2n]` and returns `scale` L with
    ///
    /// ```text
    /// L = mean (out_pred - target)^2 [hybrid] + weight L_t / (n ln 2)
    /// ```
    ///
    /// L_t with the mean from `out_pred` held constant in `hybrid`. Per value, with
    /// mu = c1 x_0_hat + c2 x_t, lv = frac max + (1 - frac) min:
    /// KL = 1/2 (-1 + lv - lv_q + e^{lv_q - lv} + (mu_q - mu)^2 e^{-lv}), so
    /// dKL/dlv = 1/2 (1 - e^{lv_q - lv} - (mu_q - mu)^2 e^{-lv}), dKL/dmu = (mu - mu_q) e^{-lv};
    /// at t = 0 the discretized decoder's ([`discretized_gaussian_nll_grad`]).
    #[allow(clippy::too_many_arguments)]
    pub fn example(
        &self,
        t: usize,
        x0: &[f32],
        xt: &[f32],
        target: &[f32],
        out: &[f32],
        weight: f64,
        scale: f64,
        dy: &mut [f32],
    ) -> ExampleLoss {
        let n = x0.len();
        debug_assert!(
            xt.len() == n && target.len() == n && out.len() == 2 * n && dy.len() == 2 * n
        );
        let (a, b) = (self.x0_from_xt[t], self.x0_from_out[t]);
        let (c1, c2) = (self.coef1[t], self.coef2[t]);
        let (hi, lo) = (self.max_log[t], self.min_log[t]);
        let hybrid = self.loss == TrainLoss::Hybrid;
        // d(weight L_t / (n ln 2)) per nat of one value's term.
        let per_nat = weight / (n as f64 * std::f64::consts::LN_2);
        let (mut sse, mut vb) = (0f64, 0f64);
        let (pred, raw) = out.split_at(n);
        let (d_pred, d_raw) = dy.split_at_mut(n);
        for i in 0..n {
            let (e, r) = (pred[i] as f64, raw[i] as f64);
            let (x, z) = (x0[i] as f64, xt[i] as f64);
            let mu = c1 * (a * z + b * e) + c2 * z;
            let frac = 0.5 * (r + 1.0);
            let lv = frac * hi + (1.0 - frac) * lo;
            let (term, d_mu, d_lv) = if t == 0 {
                discretized_gaussian_nll_grad(x, mu, lv)
            } else {
                let mu_q = c1 * x + c2 * z;
                let inv = (-lv).exp();
                let ratio = (lo - lv).exp();
                let d2 = (mu_q - mu) * (mu_q - mu);
                (
                    0.5 * (-1.0 + lv - lo + ratio + d2 * inv),
                    (mu - mu_q) * inv,
                    0.5 * (1.0 - ratio - d2 * inv),
                )
            };
            vb += term;
            let mut g_pred = if hybrid { 0.0 } else { per_nat * d_mu * c1 * b };
            if hybrid {
                let d = e - target[i] as f64;
                sse += d * d;
                g_pred += 2.0 * d / n as f64;
            }
            d_pred[i] = (scale * g_pred) as f32;
            d_raw[i] = (scale * per_nat * d_lv * 0.5 * (hi - lo)) as f32;
        }
        let mse = if hybrid { sse / n as f64 } else { 0.0 };
        ExampleLoss {
            loss: scale * (mse + per_nat * vb),
            vb_nats: vb,
        }
    }
}

/// -log p(x | mean, lv) of the discretized Gaussian decoder (Ho et al. 2020, eq. 13; the
/// edge bins reach -inf and +inf) and its derivatives with respect to the mean and the
/// log-variance. With s = e^{-lv/2}, hi = s (x - m + 1/255), lo = s (x - m - 1/255) and
/// P = Phi(hi) - Phi(lo): d(-log P)/dm = s (phi(hi) - phi(lo)) / P,
/// d(-log P)/dlv = (hi phi(hi) - lo phi(lo)) / (2 P); an infinite edge contributes nothing.
/// Where P underflows (below 1e-300, the floor the bound's decoder takes) the gradient is 0.
pub fn discretized_gaussian_nll_grad(x: f64, m: f64, lv: f64) -> (f64, f64, f64) {
    let half = 1.0 / 255.0;
    let level = ((x + 1.0) * 127.5).round().clamp(0.0, 255.0);
    let x = level / 127.5 - 1.0;
    let s = (-0.5 * lv).exp();
    let hi = (x <= 0.999).then_some(s * (x - m + half));
    let lo = (x >= -0.999).then_some(s * (x - m - half));
    let cdf = |z: Option<f64>, inf: f64| z.map_or(inf, std_normal_cdf);
    let p = match lo {
        // The upper-tail form where both are near 1 and would cancel.
        Some(l) if l > 0.0 => std_normal_cdf(-l) - hi.map_or(0.0, |h| std_normal_cdf(-h)),
        _ => cdf(hi, 1.0) - cdf(lo, 0.0),
    };
    if p <= 1e-300 {
        return (-(1e-300f64).ln(), 0.0, 0.0);
    }
    let phi = |z: Option<f64>| {
        z.map_or((0.0, 0.0), |z| {
            (
                (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt(),
                z,
            )
        })
    };
    let ((ph, zh), (pl, zl)) = (phi(hi), phi(lo));
    (-p.ln(), s * (ph - pl) / p, (zh * ph - zl * pl) / (2.0 * p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::process::discretized_gaussian_log_likelihood;

    /// The decoder's value is the bound's, and its derivatives are central differences'.
    #[test]
    fn decoder_gradient_matches_finite_differences() {
        for &(x, m, lv) in &[
            (0.0, 0.01, -9.0),
            (0.5, 0.47, -7.0),
            (-1.0, -0.98, -8.0),
            (1.0, 0.9, -5.0),
            (0.2, -0.3, -2.0),
        ] {
            let (v, dm, dlv) = discretized_gaussian_nll_grad(x, m, lv);
            let want =
                -discretized_gaussian_log_likelihood(&[x as f32], &[m as f32], &[lv as f32])[0];
            assert!(
                (v - want).abs() < 1e-4 * want.abs().max(1.0),
                "{v} vs {want}"
            );
            let h = 1e-6;
            let f = |m: f64, lv: f64| discretized_gaussian_nll_grad(x, m, lv).0;
            let fm = (f(m + h, lv) - f(m - h, lv)) / (2.0 * h);
            let flv = (f(m, lv + h) - f(m, lv - h)) / (2.0 * h);
            assert!(
                (dm - fm).abs() < 1e-4 * fm.abs().max(1.0),
                "dm {dm} vs {fm}"
            );
            assert!(
                (dlv - flv).abs() < 1e-4 * flv.abs().max(1.0),
                "dlv {dlv} vs {flv}"
            );
        }
    }
}
