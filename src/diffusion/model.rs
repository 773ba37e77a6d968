//! A trained diffusion model: its config (stored in the checkpoint), loading it for sampling
//! and evaluation, and images as the model sees them (`[B, C, H, W]` in [-1, 1]).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand::rngs::StdRng;

pub use super::config::{DiffusionConfig, model_config};
use super::nets::Net;
use super::process::GaussianDiffusion;
use super::vdm::ContinuousModel;
use crate::checkpoint;
use crate::data::{Dataset, PixelMode};

/// A trained model loaded for sampling or evaluation (EMA weights, no autodiff): a plain
/// network, which the command hands to an engine (`engine::FrozenNet`).
pub struct LoadedDiffusion {
    pub config: DiffusionConfig,
    pub process: GaussianDiffusion,
    pub net: Net,
    /// A continuous-time model's schedule (its `process` is then its T-step grid).
    pub continuous: Option<ContinuousModel>,
}

impl LoadedDiffusion {
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::from_loaded(checkpoint::load(path, device)?, path, device)
    }

    /// A model from decoded checkpoint tensors; `path` names the file in errors.
    pub fn from_loaded(loaded: checkpoint::Loaded, path: &Path, device: &Device) -> Result<Self> {
        let config = model_config(&loaded, path)?;
        let continuous = config
            .continuous_model(&loaded.tensors)
            .with_context(|| format!("{}", path.display()))?;
        let vb = VarBuilder::from_tensors(loaded.tensors, DType::F32, device);
        let net = Net::build(&config.net, vb)
            .with_context(|| format!("{}: tensors do not fit the model", path.display()))?;
        let process = match &continuous {
            Some(c) => c.discretized(config.num_train_timesteps)?,
            None => config.process()?,
        };
        Ok(Self {
            process,
            config,
            net,
            continuous,
        })
    }
}

/// Images `[B, C, H, W]` scaled to [-1, 1] from u8 pixels.
pub fn image_batch(data: &Dataset, idx: &[usize], device: &Device) -> Result<Tensor> {
    let x = data.batch(idx, PixelMode::Grey, &mut StdRng::seed_from_u64(0), device)?;
    let s = data.shape;
    Ok(x.affine(2.0, -1.0)?
        .reshape((idx.len(), s.channels, s.height, s.width))?)
}
