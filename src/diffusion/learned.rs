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
    /// L_vlb alone, t from the loss-aware sampler ([`LossAwareSampler`]; learned variances).
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

    /// The constants of one example's loss at timestep `t` (0-based), for an engine that
    /// evaluates [`LearnedHead::example`]'s formulas itself (the XLA engine's program): an
    /// example of `n` values drawn with importance weight `w`, its loss scaled by `scale`.
    pub fn row_constants(&self, t: usize, n: usize, w: f64, scale: f64) -> RowConstants {
        let (a, b) = (self.x0_from_xt[t], self.x0_from_out[t]);
        let (c1, c2) = (self.coef1[t], self.coef2[t]);
        let hybrid = self.loss == TrainLoss::Hybrid;
        RowConstants {
            from_xt: c1 * a + c2,
            from_out: c1 * b,
            c1,
            c2,
            lo: self.min_log[t],
            span: self.max_log[t] - self.min_log[t],
            sse_weight: if hybrid { scale / n as f64 } else { 0.0 },
            nats_weight: scale * self.vb_weight(w) / (n as f64 * std::f64::consts::LN_2),
            first: t == 0,
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

/// One example's loss as [`LearnedHead::example`] computes it, in constants of its timestep:
///
/// ```text
/// mu  = from_xt x_t + from_out out_pred      (mu = c1 x_0_hat + c2 x_t)
/// mu~ = c1 x_0 + c2 x_t,   lv = lo + span (v + 1) / 2
/// L   = sse_weight sum (out_pred - target)^2 + nats_weight L_t  (L_t in nats: the KL, or at
///       t = 0, `first`, the discretized decoder's -log p(x_0 | x_1))
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowConstants {
    pub from_xt: f64,
    pub from_out: f64,
    pub c1: f64,
    pub c2: f64,
    pub lo: f64,
    pub span: f64,
    pub sse_weight: f64,
    pub nats_weight: f64,
    pub first: bool,
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

/// The loss-aware timestep sampler of improved-diffusion (`LossSecondMomentResampler`, their
/// Section 3.3, eq. 17): p_t proportional to sqrt(E[L_t^2]) over the last 10 values of each
/// L_t, mixed with 0.001 of the uniform, and uniform until every t has its 10 values. A draw of
/// t carries the weight w = 1 / (T p_t), so E_t~p[w L_t] = (1/T) sum_t L_t: the estimate of
/// L_vlb stays unbiased while its variance falls.
#[derive(Debug, Clone, PartialEq)]
pub struct LossAwareSampler {
    /// The last values of each L_t, oldest first, at most [`LossAwareSampler::HISTORY`].
    history: Vec<Vec<f64>>,
}

impl LossAwareSampler {
    /// Values kept per timestep (improved-diffusion's `history_per_term`).
    pub const HISTORY: usize = 10;
    /// The share of the uniform distribution mixed in (their `uniform_prob`).
    pub const UNIFORM: f64 = 0.001;

    pub fn new(t_max: usize) -> Self {
        Self {
            history: vec![Vec::new(); t_max],
        }
    }

    /// Whether every timestep has its full history (before that, t is uniform).
    pub fn warmed_up(&self) -> bool {
        self.history.iter().all(|h| h.len() == Self::HISTORY)
    }

    /// p_t of each timestep.
    pub fn probabilities(&self) -> Vec<f64> {
        let t_max = self.history.len().max(1) as f64;
        if !self.warmed_up() {
            return vec![1.0 / t_max; self.history.len()];
        }
        let w: Vec<f64> = self
            .history
            .iter()
            .map(|h| (h.iter().map(|v| v * v).sum::<f64>() / h.len() as f64).sqrt())
            .collect();
        let total: f64 = w.iter().sum();
        if !(total.is_finite() && total > 0.0) {
            return vec![1.0 / t_max; self.history.len()];
        }
        w.iter()
            .map(|v| v / total * (1.0 - Self::UNIFORM) + Self::UNIFORM / t_max)
            .collect()
    }

    /// `n` timesteps drawn from `rng` and their weights 1 / (T p_t).
    pub fn draw(&self, n: usize, rng: &mut rand::rngs::StdRng) -> (Vec<usize>, Vec<f64>) {
        use rand::Rng;
        let p = self.probabilities();
        let mut cdf = Vec::with_capacity(p.len());
        let mut acc = 0.0;
        for v in &p {
            acc += v;
            cdf.push(acc);
        }
        let t_max = p.len() as f64;
        (0..n)
            .map(|_| {
                let u = rng.random::<f64>() * acc;
                let t = cdf.partition_point(|&c| c <= u).min(p.len() - 1);
                (t, 1.0 / (t_max * p[t]))
            })
            .unzip()
    }

    /// Adds the losses of a step's examples (their timesteps `t`), oldest values dropped.
    pub fn update(&mut self, t: &[usize], losses: &[f64]) {
        for (&t, &l) in t.iter().zip(losses) {
            if let Some(h) = self.history.get_mut(t) {
                if h.len() == Self::HISTORY {
                    h.remove(0);
                }
                // Kept at f32 precision, as the train state stores it: a resumed run
                // draws what an uninterrupted one draws.
                h.push(l as f32 as f64);
            }
        }
    }

    /// The history as `[T, HISTORY]` values and each t's count (for the train state).
    pub fn to_values(&self) -> (Vec<f64>, Vec<f64>) {
        let mut values = vec![0.0; self.history.len() * Self::HISTORY];
        for (t, h) in self.history.iter().enumerate() {
            values[t * Self::HISTORY..t * Self::HISTORY + h.len()].copy_from_slice(h);
        }
        (
            values,
            self.history.iter().map(|h| h.len() as f64).collect(),
        )
    }

    /// The inverse of [`LossAwareSampler::to_values`], checked.
    pub fn from_values(values: &[f64], counts: &[f64]) -> Result<Self> {
        let t_max = counts.len();
        if values.len() != t_max * Self::HISTORY {
            bail!(
                "the loss-aware sampler's history holds {} values for {t_max} timesteps",
                values.len()
            );
        }
        let mut history = Vec::with_capacity(t_max);
        for (t, &c) in counts.iter().enumerate() {
            if !(c >= 0.0 && c <= Self::HISTORY as f64 && c.fract() == 0.0) {
                bail!("the loss-aware sampler's history: count {c} at t = {t}");
            }
            let h = &values[t * Self::HISTORY..t * Self::HISTORY + c as usize];
            if h.iter().any(|v| !v.is_finite()) {
                bail!("the loss-aware sampler's history: a value that is not finite at t = {t}");
            }
            history.push(h.to_vec());
        }
        Ok(Self { history })
    }
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

    /// With a full, non-uniform history, the weighted draw estimates the mean of L_t without
    /// bias: the mean of w L_t over 200,000 draws is within 4 standard errors of
    /// (1/T) sum L_t, while the draws favour the large terms.
    #[test]
    fn loss_aware_draws_are_unbiased() {
        use rand::SeedableRng;
        let t_max = 40;
        let lt: Vec<f64> = (0..t_max)
            .map(|t| 0.1 + (t as f64 * 0.7).sin().powi(2) * 5.0)
            .collect();
        let mut s = LossAwareSampler::new(t_max);
        assert!(!s.warmed_up());
        for k in 0..LossAwareSampler::HISTORY {
            let t: Vec<usize> = (0..t_max).collect();
            let l: Vec<f64> = lt.iter().map(|v| v * (1.0 + 0.01 * k as f64)).collect();
            s.update(&t, &l);
        }
        assert!(s.warmed_up());
        let p = s.probabilities();
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let n = 200_000;
        let (t, w) = s.draw(n, &mut rng);
        let x: Vec<f64> = t.iter().zip(&w).map(|(&t, &w)| w * lt[t]).collect();
        let mean = x.iter().sum::<f64>() / n as f64;
        let sd = (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        let want = lt.iter().sum::<f64>() / t_max as f64;
        let z = (mean - want) / (sd / (n as f64).sqrt());
        assert!(z.abs() < 4.0, "mean {mean} vs {want}, z = {z}");
        // The weighted estimate's spread is below uniform sampling's.
        let uniform_sd = (lt.iter().map(|v| (v - want).powi(2)).sum::<f64>() / t_max as f64).sqrt();
        assert!(sd < uniform_sd, "{sd} vs uniform {uniform_sd}");
        // The state round-trips.
        let (v, c) = s.to_values();
        assert_eq!(LossAwareSampler::from_values(&v, &c).unwrap(), s);
        assert!(LossAwareSampler::from_values(&v, &[11.0; 40]).is_err());
    }
}
