//! A diffusion model's parameter table and process: [`DiffusionConfig`] (the network's
//! [`NetConfig`], whose `Net::trainable` names, shapes and initialises every parameter, the
//! schedule, T and the prediction target) with its validation, and the config a checkpoint
//! stores ([`model_config`]). Candle's network, the fused U-Net and checkpoints all read it.

use std::path::Path;

use anyhow::{Context, Result, bail};

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use super::nets::NetConfig;
use super::process::{GaussianDiffusion, Prediction, VarianceType};
use super::schedule::{BetaSchedule, Schedule};
use super::vdm::{ContinuousModel, ContinuousTime, GammaKind};
use crate::checkpoint;
use crate::data::ImageShape;

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
    /// Betas in place of `beta_schedule`'s (other projects' checkpoints: diffusers'
    /// `trained_betas`, improved-diffusion's linear schedule scaled by 1000 / T, a respaced
    /// process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub betas: Option<Vec<f64>>,
    /// The value the network is given for each timestep t (improved-diffusion's
    /// `rescale_timesteps`: t 1000 / T; respacing: the original step's); absent: t.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_times: Option<Vec<f64>>,
    /// The variance of p_theta(x_{t-1} | x_t) the model was made with (what sampling and the
    /// bound use unless told otherwise); learned ones are the network's second C output
    /// channels. Absent: fixed-small.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variance: Option<VarianceType>,
    /// Continuous time (VDM, [`super::vdm`]): the schedule gamma(t) in place of the betas;
    /// `num_train_timesteps` is then the T of the samplers' and the discrete bound's grid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuous: Option<ContinuousTime>,
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
        Schedule::check_size(self.num_train_timesteps)?;
        let t = self.num_train_timesteps;
        if let Some(b) = &self.betas
            && b.len() != t
        {
            bail!("{} betas for T = {t} timesteps", b.len());
        }
        if let Some(m) = &self.model_times
            && (m.len() != t || m.iter().any(|v| !v.is_finite()))
        {
            bail!("{} finite model timesteps expected for T = {t}", t);
        }
        let (in_c, out_c) = match &self.net {
            NetConfig::Unet {
                in_channels,
                options,
                ..
            } => (*in_channels, options.out_channels(*in_channels)),
            NetConfig::Mlp { .. } => (1, 1),
        };
        let learned = self.variance.is_some_and(VarianceType::is_learned);
        if let Some(c) = &self.continuous {
            c.validate()?;
            if !self.is_image() {
                bail!(
                    "continuous time models 8-bit images (its decoder has 256 levels); toy data trains in discrete time"
                );
            }
            if self.variance.is_some() {
                bail!(
                    "continuous time has no reverse-step variances to learn (its steps are q(z_s | z_t, x_hat))"
                );
            }
            if self.prediction == Prediction::X0 {
                bail!("continuous time predicts eps or v, not x_0");
            }
        }
        match (learned, out_c == 2 * in_c) {
            (true, false) => bail!(
                "learned variances need a network with 2C output channels, this one gives {out_c}"
            ),
            (false, true) => {
                bail!("a network with 2C output channels needs a learned variance type")
            }
            _ => Ok(()),
        }
    }

    /// The images' shape: stored, or 1 x 28 x 28 for an image model from before it was stored;
    /// `None` for 2-D toy models.
    pub fn image_shape(&self) -> Option<ImageShape> {
        match self.net {
            NetConfig::Unet { .. } => Some(self.image_shape.unwrap_or(ImageShape::MNIST)),
            NetConfig::Mlp { .. } => None,
        }
    }

    /// The continuous-time model of a checkpoint whose tensors are `tensors` (a learned
    /// schedule's parameters among them); `None` in discrete time.
    pub fn continuous_model(
        &self,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<Option<ContinuousModel>> {
        let Some(spec) = &self.continuous else {
            return Ok(None);
        };
        let mut params = Vec::new();
        for (name, shape) in spec.param_shapes() {
            let t = tensors
                .get(&name)
                .with_context(|| format!("no tensor {name} (the learned schedule)"))?;
            if t.dims() != shape.as_slice() {
                bail!("{name}: shape {:?}, expected {shape:?}", t.dims());
            }
            params.extend(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        Ok(Some(ContinuousModel {
            gamma: spec.schedule(&params)?,
            spec: spec.clone(),
            prediction: self.prediction,
        }))
    }

    /// The discrete process: the betas', or a continuous-time model's T-step grid
    /// ([`ContinuousModel::discretized`]; a learned schedule needs its tensors:
    /// [`DiffusionConfig::continuous_model`]).
    pub fn process(&self) -> Result<GaussianDiffusion> {
        if let Some(c) = &self.continuous {
            if c.gamma == GammaKind::Learned {
                bail!(
                    "a learned schedule's process needs its parameters (the checkpoint's tensors)"
                );
            }
            let model = self.continuous_model(&HashMap::new())?.expect("continuous");
            return model.discretized(self.num_train_timesteps);
        }
        let schedule = match &self.betas {
            Some(b) => Schedule::custom(self.beta_schedule, b.clone())?,
            None => Schedule::new(self.beta_schedule, self.num_train_timesteps)?,
        };
        let mut process = GaussianDiffusion::new(schedule, self.prediction);
        process.model_times = self.model_times.clone();
        process.variance = self.variance;
        Ok(process)
    }

    /// `true` for image models (`[B, C, H, W]`), `false` for 2-D points.
    pub fn is_image(&self) -> bool {
        matches!(self.net, NetConfig::Unet { .. })
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
