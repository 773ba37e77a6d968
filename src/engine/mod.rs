//! Which implementation runs a model: the one place the choice is made, and the fused CPU
//! engines themselves ([`vae`]: the VAE family; [`unet`]: the U-Net). Models do not know
//! their engine. On the CPU, the fused engines (hand-derived backward passes in reused
//! buffers) run what they support; candle's tensors and autodiff run everything else, on any
//! device. `--engine` forces either; the choice is printed once at the start of a run.

use anyhow::{Context, Result, bail};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;

pub mod unet;
pub mod vae;

use self::unet::FusedUnet;
use crate::diffusion::nets::Net;
use crate::diffusion::objective::simple_loss_inputs;
use crate::diffusion::process::{Denoiser, GaussianDiffusion};
use crate::distributions::Noise;
use crate::vae::estimate::LikelihoodEstimate;
use crate::vae::model::Vae;

/// Which implementation computes a VAE training step. Both compute the same numbers from the
/// same noise; they differ in speed and reach.
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
pub enum Engine {
    /// `fused` where it applies, else `candle`: for the VAE the CPU and the Bernoulli
    /// likelihood; for diffusion the U-Net on the CPU.
    #[default]
    Auto,
    /// candle tensors and autodiff: any device, likelihood and objective.
    Candle,
    /// The hand-derived fused CPU step of [`vae`] or [`unet`].
    Fused,
}

/// The engine of a VAE training step: `(fused, description)`. The fused engine takes the
/// CPU and the Bernoulli likelihood (any depth, activation, stochastic layers, objective).
pub fn vae_training(engine: Engine, vae: &Vae) -> Result<(bool, String)> {
    let applies = self::vae::supports(vae);
    let fused = match engine {
        Engine::Auto => applies,
        Engine::Candle => false,
        Engine::Fused if applies => true,
        Engine::Fused => {
            bail!("--engine fused: needs the CPU and --likelihood bernoulli")
        }
    };
    Ok((fused, describe(fused, engine)))
}

/// The engine of a diffusion training step: the fused U-Net engine, or `None` for candle's
/// autodiff, and a description. The fused engine takes any U-Net on the CPU (either layout,
/// any channels, attention levels and dropout); the toys' MLP trains on candle.
pub fn unet_training(engine: Engine, net: &Net) -> Result<(Option<FusedUnet>, String)> {
    let on_cpu = |u: &crate::diffusion::nets::UNet| u.conv_in.parts().0.device().is_cpu();
    let fused = match (net, engine) {
        (_, Engine::Candle) => None,
        (Net::Unet(u), Engine::Auto) if on_cpu(u) => FusedUnet::new(u).ok(),
        (Net::Unet(u), Engine::Fused) if on_cpu(u) => {
            Some(FusedUnet::new(u).context("--engine fused")?)
        }
        (_, Engine::Auto) => None,
        (_, Engine::Fused) => bail!("--engine fused: needs the U-Net and the CPU"),
    };
    let name = describe(fused.is_some(), engine);
    Ok((fused, name))
}

fn describe(fused: bool, engine: Engine) -> String {
    let forced = if engine == Engine::Auto {
        ""
    } else {
        " (--engine)"
    };
    if fused {
        format!("fused CPU engine{forced}")
    } else {
        format!("candle (tensors and autodiff){forced}")
    }
}

/// A network of plain tensors for sampling and evaluation, with its engine chosen once, here:
/// the fused CPU engine for a U-Net on the CPU, else the network's candle path (any device,
/// the MLP).
pub struct FrozenNet {
    pub net: Net,
    fused: Option<FusedUnet>,
}

impl FrozenNet {
    pub fn new(net: Net) -> Self {
        // `Engine::Auto` never fails: it falls back to candle.
        let fused = unet_training(Engine::Auto, &net).ok().and_then(|(f, _)| f);
        Self { net, fused }
    }
}

impl Denoiser for FrozenNet {
    fn forward(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        match &self.fused {
            Some(engine) if xt.device().is_cpu() && xt.dtype() == DType::F32 => {
                engine.forward(xt, t)
            }
            _ => self.net.forward(xt, t),
        }
    }
}

/// The importance-sampled log p(x) of `vae::objective::estimate_log_likelihood_candle`
/// (K samples, chunks of at most `max_rows` decoded rows), on the fused CPU engine where it
/// applies (the CPU and the Bernoulli likelihood), else on candle. Both draw the same noise and
/// agree to float rounding. `x` `[B, D]`; run on a frozen model.
pub fn estimate_log_likelihood(
    vae: &Vae,
    x: &Tensor,
    k: usize,
    max_rows: usize,
    noise: &mut Noise,
) -> Result<LikelihoodEstimate> {
    if self::vae::supports(vae) {
        let adam = crate::optim::AdamConfig::with_lr(0.0);
        let mut fused = self::vae::FusedVae::from_vae(vae, None, adam)?;
        let x = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        return fused.estimate_log_likelihood(&x, k, max_rows, noise);
    }
    crate::vae::objective::estimate_log_likelihood_candle(vae, x, k, max_rows, noise)
}

/// `diffusion::model::simple_loss` and its gradients on the fused CPU engine, for images `x0` `[B, C, H, W]`
/// (the same draws of t and eps): the loss value and the gradients `loss.backward()` would
/// give. `engine` must hold the network's current parameters (`FusedUnet::refresh`).
pub fn fused_simple_loss(
    process: &GaussianDiffusion,
    engine: &FusedUnet,
    x0: &Tensor,
    rng: &mut StdRng,
    noise: &mut Noise,
) -> Result<(f32, GradStore)> {
    let (b, _, h, w) = x0.dims4()?;
    // Every rank draws the whole batch's t, eps and dropout seed (crate::collective) and runs its
    // rows; the gradients and squared errors are summed over the ranks.
    let (xt, t, target) = simple_loss_inputs(process, x0, rng, noise)?;
    let values = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1::<f32>()?) };
    let tf: Vec<f32> = t.iter().map(|&t| t as f32).collect();
    // As `Net::forward_train`: a seed for the dropout masks only where there is dropout.
    let seed = (engine.dropout() > 0.0).then(|| rand::Rng::random::<u64>(rng));
    let (xt, target) = (values(&xt)?, values(&target)?);
    let n = xt.len() / b.max(1);
    let rows = crate::collective::my_shard(b);
    let (from, to) = (rows.start * n, rows.end * n);
    let (sum, mut grads) = engine.loss_and_grads_rows(
        &xt[from..to],
        &tf[rows.clone()],
        &target[from..to],
        (h, w),
        seed,
        rows.start,
        xt.len(),
    )?;
    let mut sum = [sum];
    if crate::collective::world().world_size() > 1 {
        crate::collective::all_reduce_buckets(&mut grads)?;
        crate::collective::world().all_reduce_sum_f64(&mut sum)?;
    }
    let loss = sum[0] / xt.len() as f64;
    Ok((loss as f32, engine.grad_store(&grads)?))
}
