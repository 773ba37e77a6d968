//! DDPM noise schedules and every array derived from them, precomputed once in f64 and named
//! after the symbols of Ho et al. (2020) and improved-diffusion. Index `t = 0..T-1` as diffusers
//! numbers timesteps: `t = 0` is one step of noise.
//!
//! ```text
//! alpha_t = 1 - beta_t,  abar_t = prod_{s<=t} alpha_s
//! q(x_t | x_0)            = N(sqrt(abar_t) x_0, (1 - abar_t) I)
//! q(x_{t-1} | x_t, x_0)   = N(coef1_t x_0 + coef2_t x_t, beta~_t I)
//!   beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
//!   coef1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t),  coef2_t = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)
//! SNR(t) = abar_t / (1 - abar_t)
//! ```

use anyhow::{Result, bail};

/// How the betas are laid out over T steps (diffusers' `beta_schedule`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum BetaSchedule {
    /// beta_t linear from 1e-4 to 0.02 (Ho et al. 2020; diffusers `linear`).
    Linear,
    /// sqrt(beta_t) linear from sqrt(1e-4) to sqrt(0.02) (diffusers `scaled_linear`).
    ScaledLinear,
    /// abar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), s = 0.008, beta capped at 0.999
    /// (Nichol & Dhariwal 2021; diffusers `squaredcos_cap_v2`).
    Cosine,
}

/// The default beta range of DDPM and of diffusers' `DDPMScheduler`.
pub const BETA_START: f64 = 1e-4;
pub const BETA_END: f64 = 0.02;
/// The most timesteps T a schedule may have: its arrays then take at most 128 MB.
pub const MAX_TIMESTEPS: usize = 1_000_000;
/// Cap on beta_t of the cosine schedule.
pub const COSINE_MAX_BETA: f64 = 0.999;

/// Every schedule array, length T, f64.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Schedule {
    pub beta_schedule: BetaSchedule,
    pub num_train_timesteps: usize,
    pub betas: Vec<f64>,
    pub alphas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    /// abar_{t-1}, with abar_{-1} = 1.
    pub alphas_cumprod_prev: Vec<f64>,
    pub sqrt_alphas_cumprod: Vec<f64>,
    pub sqrt_one_minus_alphas_cumprod: Vec<f64>,
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    /// beta~_t; 0 at t = 0, where x_{-1} = x_0 is known.
    pub posterior_variance: Vec<f64>,
    /// log beta~_t with t = 0 replaced by t = 1, "because the posterior variance is 0 at the
    /// beginning of the diffusion chain" (improved-diffusion).
    pub posterior_log_variance_clipped: Vec<f64>,
    pub posterior_mean_coef1: Vec<f64>,
    pub posterior_mean_coef2: Vec<f64>,
    pub snr: Vec<f64>,
}

impl Schedule {
    /// Checks T before anything of size T is allocated: at least 2, and the schedule arrays
    /// (14 f64 per step) plus the per-step terms of an evaluation within the memory budget.
    pub fn check_size(steps: usize) -> Result<()> {
        if steps < 2 {
            bail!("--num-train-timesteps must be at least 2, got {steps}");
        }
        if steps > MAX_TIMESTEPS {
            bail!("--num-train-timesteps {steps}: at most {MAX_TIMESTEPS} (DDPM uses 1000)");
        }
        crate::limits::check_bytes(
            &format!("--num-train-timesteps {steps}"),
            "the schedule arrays of T timesteps",
            crate::limits::product(&[steps as u64, 16 * 8]),
        )
    }

    pub fn new(beta_schedule: BetaSchedule, steps: usize) -> Result<Self> {
        Self::check_size(steps)?;
        let betas: Vec<f64> = match beta_schedule {
            BetaSchedule::Linear => linspace(BETA_START, BETA_END, steps),
            BetaSchedule::ScaledLinear => linspace(BETA_START.sqrt(), BETA_END.sqrt(), steps)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::Cosine => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..steps)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / steps as f64, (i + 1) as f64 / steps as f64);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(COSINE_MAX_BETA)
                    })
                    .collect()
            }
        };
        Ok(Self::from_betas(beta_schedule, betas))
    }

    /// A schedule from explicit betas (diffusers' `trained_betas`, improved-diffusion's linear
    /// schedule for T != 1000, a respaced process), each checked to lie in (0, 1);
    /// `beta_schedule` labels it.
    pub fn custom(beta_schedule: BetaSchedule, betas: Vec<f64>) -> Result<Self> {
        Self::check_size(betas.len())?;
        if let Some((t, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(**b > 0.0 && **b < 1.0))
        {
            bail!("beta_{t} = {b}: every beta must lie in (0, 1)");
        }
        Ok(Self::from_betas(beta_schedule, betas))
    }

    fn from_betas(beta_schedule: BetaSchedule, betas: Vec<f64>) -> Self {
        let t_max = betas.len();
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod: Vec<f64> = alphas
            .iter()
            .scan(1.0, |acc, a| {
                *acc *= a;
                Some(*acc)
            })
            .collect();
        let alphas_cumprod_prev: Vec<f64> = std::iter::once(1.0)
            .chain(alphas_cumprod[..t_max - 1].iter().copied())
            .collect();
        let map = |f: &dyn Fn(usize) -> f64| (0..t_max).map(f).collect::<Vec<f64>>();
        let posterior_variance =
            map(&|t| betas[t] * (1.0 - alphas_cumprod_prev[t]) / (1.0 - alphas_cumprod[t]));
        let posterior_log_variance_clipped =
            map(&|t| posterior_variance[if t == 0 { 1 } else { t }].ln());
        Self {
            beta_schedule,
            num_train_timesteps: t_max,
            sqrt_alphas_cumprod: map(&|t| alphas_cumprod[t].sqrt()),
            sqrt_one_minus_alphas_cumprod: map(&|t| (1.0 - alphas_cumprod[t]).sqrt()),
            sqrt_recip_alphas_cumprod: map(&|t| (1.0 / alphas_cumprod[t]).sqrt()),
            sqrt_recipm1_alphas_cumprod: map(&|t| (1.0 / alphas_cumprod[t] - 1.0).sqrt()),
            posterior_mean_coef1: map(&|t| {
                betas[t] * alphas_cumprod_prev[t].sqrt() / (1.0 - alphas_cumprod[t])
            }),
            posterior_mean_coef2: map(&|t| {
                (1.0 - alphas_cumprod_prev[t]) * alphas[t].sqrt() / (1.0 - alphas_cumprod[t])
            }),
            snr: map(&|t| alphas_cumprod[t] / (1.0 - alphas_cumprod[t])),
            posterior_variance,
            posterior_log_variance_clipped,
            alphas_cumprod_prev,
            alphas_cumprod,
            alphas,
            betas,
        }
    }

    pub fn len(&self) -> usize {
        self.num_train_timesteps
    }

    pub fn is_empty(&self) -> bool {
        self.num_train_timesteps == 0
    }
}

/// `n` evenly spaced values from `a` to `b` inclusive (as `torch.linspace`).
pub fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    let step = (b - a) / (n - 1) as f64;
    (0..n)
        .map(|i| if i == n - 1 { b } else { a + step * i as f64 })
        .collect()
}

/// The betas of a process that keeps the steps `kept` of one with `abar` (their
/// `SpacedDiffusion`): `beta'_i = 1 - abar_{kept_i} / abar_{kept_{i-1}}`, and the map from the
/// new steps to the original ones.
pub fn respaced_betas(abar: &[f64], kept: &[usize]) -> (Vec<f64>, Vec<usize>) {
    let mut last = 1.0;
    let mut betas = Vec::with_capacity(kept.len());
    for &s in kept {
        betas.push(1.0 - abar[s] / last);
        last = abar[s];
    }
    (betas, kept.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posterior_variance_matches_its_formula_and_is_below_beta() {
        for kind in [
            BetaSchedule::Linear,
            BetaSchedule::ScaledLinear,
            BetaSchedule::Cosine,
        ] {
            let s = Schedule::new(kind, 1000).unwrap();
            assert_eq!(s.posterior_variance[0], 0.0);
            for t in 1..1000 {
                let want =
                    s.betas[t] * (1.0 - s.alphas_cumprod[t - 1]) / (1.0 - s.alphas_cumprod[t]);
                assert!((s.posterior_variance[t] - want).abs() < 1e-15);
                assert!(s.posterior_variance[t] <= s.betas[t]);
                // The posterior mean coefficients reproduce x_0 when x_t is noiseless.
                let m = s.posterior_mean_coef1[t]
                    + s.posterior_mean_coef2[t] * s.sqrt_alphas_cumprod[t];
                assert!((m - s.sqrt_alphas_cumprod[t - 1]).abs() < 1e-12);
            }
        }
    }
}
