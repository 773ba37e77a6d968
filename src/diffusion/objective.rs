//! The simplified loss of Ho et al. (2020, eq. 14), the objective diffusion models train on:
//!
//! ```text
//! L_simple = E_{t, x_0, eps} || target - f_theta(x_t, t) ||^2,   t ~ U{0..T-1}, eps ~ N(0, I)
//! ```
//!
//! the target being eps, x_0 or v ([`super::Prediction`]).

use anyhow::Result;
use candle_core::Tensor;
use rand::rngs::StdRng;

use super::process::{Denoiser, GaussianDiffusion, timestep_tensor};
use crate::distributions::Noise;

/// The simple loss's inputs for a batch `x0`: t ~ U{0..T-1}, eps ~ N(0, I),
/// `x_t = q_sample(x0, t, eps)` and the regression target; returns (x_t, t, target).
pub fn simple_loss_inputs(
    process: &GaussianDiffusion,
    x0: &Tensor,
    rng: &mut StdRng,
    noise: &mut Noise,
) -> Result<(Tensor, Vec<usize>, Tensor)> {
    use rand::Rng;
    let b = x0.dim(0)?;
    let t: Vec<usize> = (0..b)
        .map(|_| rng.random_range(0..process.num_timesteps()))
        .collect();
    let (xt, target) = loss_inputs_at(process, x0, &t, noise)?;
    Ok((xt, t, target))
}

/// (x_t, target) for the given timesteps, eps ~ N(0, I) from `noise`.
pub fn loss_inputs_at(
    process: &GaussianDiffusion,
    x0: &Tensor,
    t: &[usize],
    noise: &mut Noise,
) -> Result<(Tensor, Tensor)> {
    let eps = noise.randn(x0.shape(), x0.device())?;
    let xt = process.q_sample(x0, t, &eps)?;
    let target = process.target(x0, &eps, t)?;
    Ok((xt, target))
}

/// The simple loss `mean ||target - f(x_t, t)||^2` over a batch, t ~ U{0..T-1}.
pub fn simple_loss(
    process: &GaussianDiffusion,
    net: &dyn Denoiser,
    x0: &Tensor,
    rng: &mut StdRng,
    noise: &mut Noise,
) -> Result<Tensor> {
    let (xt, t, target) = simple_loss_inputs(process, x0, rng, noise)?;
    let out = net.forward_train(&xt, &timestep_tensor(&t, x0.device())?, rng)?;
    // With learned variances, the prediction's channels.
    let (out, _) = process.split_output(&out)?;
    Ok((out - target)?.sqr()?.mean_all()?)
}
