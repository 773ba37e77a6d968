//! Samplers: DDPM ancestral sampling (Ho et al. 2020) and DDIM (Song et al. 2021), separate
//! from the models so both run the same trained network, as diffusers' schedulers do.

use anyhow::Result;
use candle_core::Tensor;
use indicatif::ProgressBar;

use super::process::{Denoiser, GaussianDiffusion, LinearStep, Prediction, VarianceType};
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
/// `x_{t-1} = mu_theta(x_t, t) + sigma_t z`, z ~ N(0, I), no noise at the last step. With fixed
/// variances, an engine with a [`Denoiser::step_runner`] runs each step ([`ddpm_step`]) as one
/// program.
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
    if let Some(runner) = model.step_runner() {
        // The variance p_mean_log_variance takes: the network's own where it learns one.
        let variance = match diffusion.variance {
            Some(own) if own.is_learned() => Some(own),
            _ if variance.is_learned() => None,
            _ => Some(variance),
        };
        if let Some(variance) = variance {
            let steps = (0..diffusion.num_timesteps())
                .rev()
                .map(|ti| Ok((ti, ddpm_step(diffusion, ti, variance, clip)?)))
                .collect::<Result<Vec<_>>>()?;
            return run_linear(diffusion, runner, x_t, &steps, noise, bar);
        }
    }
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

/// DDPM's step at timestep `ti` as a [`LinearStep`]: x_0_hat from the prediction, the
/// posterior mean `c1 x_0_hat + c2 x_t`, sigma = e^{lv/2} of
/// [`GaussianDiffusion::p_mean_log_variance`]'s log-variance (fixed, or learned: its bounds),
/// no noise at the last step.
pub fn ddpm_step(
    diffusion: &GaussianDiffusion,
    ti: usize,
    variance: VarianceType,
    clip: bool,
) -> Result<LinearStep> {
    let s = &diffusion.schedule;
    let (x0_from_x, x0_from_y) = diffusion.x0_coefficients(ti);
    let (lv, log_variance) = match variance {
        VarianceType::FixedSmall => (s.posterior_log_variance_clipped[ti], None),
        VarianceType::FixedLarge if ti == 0 => (s.posterior_variance[1].ln(), None),
        VarianceType::FixedLarge => (s.betas[ti].ln(), None),
        VarianceType::Learned => (0.0, Some((-1.0, 2.0))),
        VarianceType::LearnedRange => {
            let lo = s.posterior_log_variance_clipped[ti];
            (0.0, Some((lo, s.betas[ti].ln() - lo)))
        }
    };
    Ok(LinearStep {
        x0_from_x,
        x0_from_y,
        clip,
        from_x0: s.posterior_mean_coef1[ti],
        from_x: s.posterior_mean_coef2[ti],
        from_y: 0.0,
        sigma: if ti > 0 { (0.5 * lv).exp() } else { 0.0 },
        log_variance: log_variance.filter(|_| ti > 0),
    })
}

/// DDIM's step from timestep `ti` to `ti - k` (`eta`, [`ddim_sample`]) as a [`LinearStep`]:
/// x' = sqrt(abar_prev) x_0_hat + dir eps + sigma z with eps = y (eps prediction) or
/// `(x_t / sqrt(abar) - x_0_raw) / sqrt(1/abar - 1)`, x_0_raw unclipped.
pub fn ddim_step(
    diffusion: &GaussianDiffusion,
    ti: usize,
    k: usize,
    eta: f64,
    clip: bool,
) -> LinearStep {
    let s = &diffusion.schedule;
    let (ax, ay) = diffusion.x0_coefficients(ti);
    let (ex, ey) = match diffusion.prediction {
        Prediction::Eps => (0.0, 1.0),
        _ => {
            let (r, rm) = (
                s.sqrt_recip_alphas_cumprod[ti],
                s.sqrt_recipm1_alphas_cumprod[ti],
            );
            ((r - ax) / rm, -ay / rm)
        }
    };
    let (from_x0, dir, sigma) = ddim_scalars(diffusion, ti, k, eta);
    LinearStep {
        x0_from_x: ax,
        x0_from_y: ay,
        clip,
        from_x0,
        from_x: dir * ex,
        from_y: dir * ey,
        sigma,
        log_variance: None,
    }
}

/// DDIM's scalars from timestep `ti` to `ti - k` (eq. 12): (sqrt(abar_prev), the direction's
/// sqrt(1 - abar_prev - sigma^2), sigma), abar_prev = 1 after the last step.
fn ddim_scalars(diffusion: &GaussianDiffusion, ti: usize, k: usize, eta: f64) -> (f64, f64, f64) {
    let s = &diffusion.schedule;
    let abar_t = s.alphas_cumprod[ti];
    let abar_prev = if ti >= k {
        s.alphas_cumprod[ti - k]
    } else {
        1.0
    };
    let sigma = eta * ((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)).sqrt();
    let dir = (1.0 - abar_prev - sigma * sigma).max(0.0).sqrt();
    (abar_prev.sqrt(), dir, sigma)
}

/// `steps` (at timesteps T-1 down, one per entry) on the engine's runner, the noise drawn on
/// the host in the order the host's loop draws it.
fn run_linear(
    diffusion: &GaussianDiffusion,
    mut runner: Box<dyn super::process::StepRunner + '_>,
    x_t: Tensor,
    steps: &[(usize, LinearStep)],
    noise: &mut Noise,
    bar: &ProgressBar,
) -> Result<Tensor> {
    let b = x_t.dim(0)?;
    runner.start(&x_t)?;
    for (ti, step) in steps {
        let t = diffusion.model_t(&vec![*ti; b], x_t.device())?;
        let z = if step.sigma > 0.0 || step.log_variance.is_some() {
            Some(noise.randn(x_t.shape(), x_t.device())?)
        } else {
            None
        };
        runner.step(&t, step, z.as_ref())?;
        bar.inc(1);
    }
    runner.finish(&x_t)
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
/// deterministic; eta = 1 with all T steps is DDPM with fixed-small variance. An engine with a
/// [`Denoiser::step_runner`] runs each step ([`ddim_step`]) as one program.
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
    if let Some(runner) = model.step_runner() {
        let steps: Vec<_> = timesteps
            .iter()
            .map(|&ti| (ti, ddim_step(diffusion, ti, k, eta, clip)))
            .collect();
        return run_linear(diffusion, runner, x_t, &steps, noise, bar);
    }
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
        let (keep, dir, sigma) = ddim_scalars(diffusion, ti, k, eta);
        let mut next = ((x0 * keep)? + (eps * dir)?)?;
        if sigma > 0.0 {
            next = (next + (noise.randn(x.shape(), x.device())? * sigma)?)?;
        }
        x = next;
        bar.inc(1);
    }
    Ok(x)
}
