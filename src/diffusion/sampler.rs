//! Samplers: DDPM ancestral sampling (Ho et al. 2020) and DDIM (Song et al. 2021), separate
//! from the models so both run the same trained network, as diffusers' schedulers do.

use anyhow::Result;
use candle_core::Tensor;
use indicatif::ProgressBar;

use super::process::{Denoiser, GaussianDiffusion, Prediction, VarianceType};
use crate::distributions::Noise;

/// Which sampler.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    Ddpm,
    Ddim,
}

/// DDPM ancestral sampling from `x_T` `[B, ...]` through all T steps:
/// `x_{t-1} = mu_theta(x_t, t) + sigma_t z`, z ~ N(0, I), no noise at the last step.
pub fn ddpm_sample(
    diffusion: &GaussianDiffusion,
    model: &dyn Denoiser,
    x_t: Tensor,
    variance: VarianceType,
    clip: bool,
    noise: &mut Noise,
    bar: &ProgressBar,
) -> Result<Tensor> {
    let b = x_t.dim(0)?;
    let mut x = x_t;
    for ti in (0..diffusion.num_timesteps()).rev() {
        let t = vec![ti; b];
        let out = model.forward(&x, &diffusion.model_t(&t, x.device())?)?;
        let (mean, lv, _) = diffusion.p_mean_log_variance(&out, &x, &t, variance, clip)?;
        x = if ti > 0 {
            let z = noise.randn(x.shape(), x.device())?;
            (mean + (lv * 0.5)?.exp()?.mul(&z)?)?
        } else {
            mean
        };
        bar.inc(1);
    }
    Ok(x)
}

/// The DDIM timesteps for `steps` of T, "leading" spacing as diffusers: `[(steps-1)k, ..., k, 0]`
/// with k = T / steps.
pub fn ddim_timesteps(num_train_timesteps: usize, steps: usize) -> Vec<usize> {
    let steps = steps.clamp(1, num_train_timesteps);
    let k = num_train_timesteps / steps;
    (0..steps).rev().map(|i| i * k).collect()
}

/// DDIM (Song et al. 2021, eq. 12) from `x_T` over [`ddim_timesteps`]:
///
/// ```text
/// x_{prev} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z
/// sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
/// ```
///
/// with abar_prev = 1 after the last step (diffusers' `set_alpha_to_one`). eta = 0 is
/// deterministic; eta = 1 with all T steps is DDPM with fixed-small variance.
#[allow(clippy::too_many_arguments)]
pub fn ddim_sample(
    diffusion: &GaussianDiffusion,
    model: &dyn Denoiser,
    x_t: Tensor,
    steps: usize,
    eta: f64,
    clip: bool,
    noise: &mut Noise,
    bar: &ProgressBar,
) -> Result<Tensor> {
    let s = &diffusion.schedule;
    let b = x_t.dim(0)?;
    let timesteps = ddim_timesteps(s.len(), steps);
    let k = s.len() / timesteps.len();
    let mut x = x_t;
    for &ti in &timesteps {
        let t = vec![ti; b];
        let out = model.forward(&x, &diffusion.model_t(&t, x.device())?)?;
        let (out, _) = diffusion.split_output(&out)?;
        let x0_raw = diffusion.predict_x0(&x, &t, &out)?;
        let eps = match diffusion.prediction {
            Prediction::Eps => out,
            _ => diffusion.predict_eps_from_x0(&x, &t, &x0_raw)?,
        };
        let x0 = if clip {
            x0_raw.clamp(-1f32, 1f32)?
        } else {
            x0_raw
        };
        let abar_t = s.alphas_cumprod[ti];
        let abar_prev = if ti >= k {
            s.alphas_cumprod[ti - k]
        } else {
            1.0
        };
        let sigma = eta * ((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)).sqrt();
        let dir = (1.0 - abar_prev - sigma * sigma).max(0.0).sqrt();
        let mut next = ((x0 * abar_prev.sqrt())? + (eps * dir)?)?;
        if sigma > 0.0 {
            next = (next + (noise.randn(x.shape(), x.device())? * sigma)?)?;
        }
        x = next;
        bar.inc(1);
    }
    Ok(x)
}
