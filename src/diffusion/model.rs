//! A trained diffusion model: its config (stored in the checkpoint), loading it for sampling
//! and evaluation, and images as the model sees them (`[B, C, H, W]` in [-1, 1]).

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::nets::{Net, NetConfig};
use super::process::{GaussianDiffusion, Prediction};
use super::schedule::{BetaSchedule, Schedule};
use crate::checkpoint;
use crate::data::{Dataset, ImageShape, PixelMode};

/// Everything that defines a trained diffusion model (stored in its checkpoint).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DiffusionConfig {
    pub net: NetConfig,
    pub beta_schedule: BetaSchedule,
    pub num_train_timesteps: usize,
    pub prediction: Prediction,
    /// The images' C x H x W (image models; `None` in checkpoints from before it was stored,
    /// which are 1 x 28 x 28).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_shape: Option<ImageShape>,
}

impl DiffusionConfig {
    /// Checks the network's sizes and the number of timesteps against the memory they imply,
    /// and that a U-Net takes the images: C in and out, H and W halved without remainder at each
    /// level below the first.
    pub fn validate(&self) -> Result<()> {
        self.net.validate()?;
        if let (
            NetConfig::Unet {
                channel_mult,
                in_channels,
                ..
            },
            Some(shape),
        ) = (&self.net, self.image_shape())
        {
            shape.validate("image_shape")?;
            if *in_channels != shape.channels {
                bail!("the U-Net takes {in_channels} channels but the images are {shape}");
            }
            let factor = 1usize << (channel_mult.len() - 1);
            if shape.height % factor != 0 || shape.width % factor != 0 {
                bail!(
                    "a U-Net of {} levels needs H and W divisible by {factor}, but the images are {shape}",
                    channel_mult.len()
                );
            }
        }
        Schedule::check_size(self.num_train_timesteps)
    }

    /// The images' shape: stored, or 1 x 28 x 28 for an image model from before it was stored;
    /// `None` for 2-D toy models.
    pub fn image_shape(&self) -> Option<ImageShape> {
        match self.net {
            NetConfig::Unet { .. } => Some(self.image_shape.unwrap_or(ImageShape::MNIST)),
            NetConfig::Mlp { .. } => None,
        }
    }

    pub fn process(&self) -> Result<GaussianDiffusion> {
        Ok(GaussianDiffusion::new(
            Schedule::new(self.beta_schedule, self.num_train_timesteps)?,
            self.prediction,
        ))
    }

    /// `true` for image models (`[B, C, H, W]`), `false` for 2-D points.
    pub fn is_image(&self) -> bool {
        matches!(self.net, NetConfig::Unet { .. })
    }
}

/// A trained model loaded for sampling or evaluation (EMA weights, no autodiff): a plain
/// network, which the command hands to an engine (`engine::FrozenNet`).
pub struct LoadedDiffusion {
    pub config: DiffusionConfig,
    pub process: GaussianDiffusion,
    pub net: Net,
}

impl LoadedDiffusion {
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::from_loaded(checkpoint::load(path, device)?, path, device)
    }

    /// A model from decoded checkpoint tensors; `path` names the file in errors.
    pub fn from_loaded(loaded: checkpoint::Loaded, path: &Path, device: &Device) -> Result<Self> {
        let config = model_config(&loaded, path)?;
        let vb = VarBuilder::from_tensors(loaded.tensors, DType::F32, device);
        let net = Net::build(&config.net, vb)
            .with_context(|| format!("{}: tensors do not fit the model", path.display()))?;
        Ok(Self {
            process: config.process()?,
            config,
            net,
        })
    }
}

/// The model config a diffusion checkpoint stores, validated (sizes checked against memory)
/// before anything of its sizes is built; errors name `path`.
pub fn model_config(loaded: &checkpoint::Loaded, path: &Path) -> Result<DiffusionConfig> {
    if loaded.metadata.get("elbo.model").map(String::as_str) != Some("diffusion") {
        bail!(
            "{}: not a diffusion checkpoint (no elbo.model = diffusion metadata)",
            path.display()
        );
    }
    let config: DiffusionConfig = serde_json::from_str(
        loaded
            .metadata
            .get("elbo.config")
            .with_context(|| format!("{}: no elbo.config metadata", path.display()))?,
    )
    // serde quotes what it could not parse: cut short, a 10 MB string stays out.
    .map_err(|e| {
        anyhow::anyhow!(
            "{}: metadata elbo.config is not a diffusion config: {}",
            path.display(),
            crate::files::excerpt(&e.to_string(), 160)
        )
    })?;
    config
        .validate()
        .with_context(|| format!("{}: metadata elbo.config", path.display()))?;
    Ok(config)
}

/// Images `[B, C, H, W]` scaled to [-1, 1] from u8 pixels.
pub fn image_batch(data: &Dataset, idx: &[usize], device: &Device) -> Result<Tensor> {
    let x = data.batch(idx, PixelMode::Grey, &mut StdRng::seed_from_u64(0), device)?;
    let s = data.shape;
    Ok(x.affine(2.0, -1.0)?
        .reshape((idx.len(), s.channels, s.height, s.width))?)
}
