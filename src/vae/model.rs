//! The text's `SimpleVAE`: an MLP encoder x -> (mu, log_var) and an MLP decoder z -> logits.
//!
//! ```text
//! h       = ReLU(W_e x + b_e)                    encoder.0   [hidden, input]
//! mu      = W_mu h + b_mu                        fc_mu       [latent, hidden]
//! log_var = W_lv h + b_lv                        fc_logvar   [latent, hidden]
//! logits  = W_2 ReLU(W_0 z + b_0) + b_2          decoder.0 [hidden, latent], decoder.2 [input, hidden]
//! ```
//!
//! Parameter names and shapes are those of PyTorch's `SimpleVAE.state_dict()`, so checkpoints
//! move between elbo and PyTorch with no conversion.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::Linear;

use crate::checkpoint;
use crate::data::ImageShape;
use crate::distributions::{DiagGaussian, Noise, bernoulli_log_prob_logits, gaussian_log_prob};

/// The observation model p(x|z).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Likelihood {
    /// Bernoulli(sigmoid(logits)): the text's sigmoid + BCE.
    Bernoulli,
    /// N(sigmoid(logits), sigma^2 I), sigma^2 fixed or learned (one scalar `obs_log_var`).
    Gaussian,
}

/// Model hyper-parameters; defaults are exactly the text's `SimpleVAE`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VaeConfig {
    pub input_dim: usize,
    pub hidden_dim: usize,
    pub latent_dim: usize,
    pub likelihood: Likelihood,
    /// Gaussian likelihood only: a fixed log sigma^2; `None` learns it.
    pub obs_log_var: Option<f64>,
    /// The images x flattens (C x H x W = input_dim), for sample and reconstruction grids;
    /// `None` in checkpoints from before it was stored (then 784 means 1 x 28 x 28).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_shape: Option<ImageShape>,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            input_dim: 784,
            hidden_dim: 256,
            latent_dim: 32,
            likelihood: Likelihood::Bernoulli,
            obs_log_var: None,
            image_shape: Some(ImageShape::MNIST),
        }
    }
}

impl VaeConfig {
    /// The image shape of x: stored, or 1 x 28 x 28 for a 784-dimensional model without one.
    pub fn image_shape(&self) -> Option<ImageShape> {
        self.image_shape
            .or((self.input_dim == ImageShape::MNIST.dim()).then_some(ImageShape::MNIST))
    }

    /// Every parameter's name and shape, in `state_dict` order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (i, h, l) = (self.input_dim, self.hidden_dim, self.latent_dim);
        let mut shapes = vec![
            ("encoder.0.weight", vec![h, i]),
            ("encoder.0.bias", vec![h]),
            ("fc_mu.weight", vec![l, h]),
            ("fc_mu.bias", vec![l]),
            ("fc_logvar.weight", vec![l, h]),
            ("fc_logvar.bias", vec![l]),
            ("decoder.0.weight", vec![h, l]),
            ("decoder.0.bias", vec![h]),
            ("decoder.2.weight", vec![i, h]),
            ("decoder.2.bias", vec![i]),
        ];
        if self.learns_obs_var() {
            shapes.push(("obs_log_var", vec![1]));
        }
        shapes
            .into_iter()
            .map(|(n, s)| (n.to_string(), s))
            .collect()
    }

    fn learns_obs_var(&self) -> bool {
        self.likelihood == Likelihood::Gaussian && self.obs_log_var.is_none()
    }

    pub fn validate(&self) -> Result<()> {
        for (flag, v) in [
            ("--input-dim", self.input_dim),
            ("--hidden-dim", self.hidden_dim),
            ("--latent-dim", self.latent_dim),
        ] {
            if v == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        if let Some(shape) = self.image_shape
            && shape.dim() != self.input_dim
        {
            bail!(
                "image_shape {shape} has {} values but input_dim is {}",
                shape.dim(),
                self.input_dim
            );
        }
        if let Some(lv) = self.obs_log_var
            && !lv.is_finite()
        {
            bail!("--obs-log-var must be a finite number, got {lv}");
        }
        // Weights, gradients and Adam's two moments: four f32 copies of every parameter.
        let count = self.parameter_shapes_checked();
        crate::limits::check_bytes(
            &format!(
                "--hidden-dim {} with --latent-dim {}",
                self.hidden_dim, self.latent_dim
            ),
            "the model's parameters with their gradients and Adam's moments",
            count.and_then(|c| c.checked_mul(16)),
        )
    }

    /// The number of parameters, computed without overflow (`None` when it overflows).
    pub fn parameter_shapes_checked(&self) -> Option<u64> {
        let (i, h, l) = (
            self.input_dim as u64,
            self.hidden_dim as u64,
            self.latent_dim as u64,
        );
        // encoder (h i + h), fc_mu and fc_logvar (2 (l h + l)), decoder (h l + h, i h + i), + 1
        let terms = [
            i.checked_mul(h)?,
            h,
            l.checked_mul(h)?.checked_mul(2)?,
            l.checked_mul(2)?,
            h.checked_mul(l)?,
            h,
            i.checked_mul(h)?,
            i,
            1,
        ];
        terms.iter().try_fold(0u64, |acc, &t| acc.checked_add(t))
    }
}

/// The VAE: parameters as candle `Var`s, layers as views of them.
pub struct Vae {
    pub config: VaeConfig,
    params: Vec<(String, Var)>,
    encoder: Linear,
    fc_mu: Linear,
    fc_logvar: Linear,
    decoder0: Linear,
    decoder2: Linear,
    obs_log_var: Option<Tensor>,
}

impl Vae {
    /// Fresh parameters with PyTorch's `nn.Linear` initialisation, weight and bias
    /// ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from the seeded `noise`.
    pub fn new(config: VaeConfig, noise: &mut Noise, device: &Device) -> Result<Self> {
        use rand::Rng;
        config.validate()?;
        let mut params = Vec::new();
        for (name, shape) in config.parameter_shapes() {
            let t = if name == "obs_log_var" {
                Tensor::zeros(shape, DType::F32, device)?
            } else {
                let fan_in = if name.ends_with("weight") {
                    shape[1]
                } else {
                    match name.as_str() {
                        "encoder.0.bias" => config.input_dim,
                        "decoder.0.bias" => config.latent_dim,
                        _ => config.hidden_dim,
                    }
                };
                let bound = 1.0 / (fan_in as f32).sqrt();
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|_| noise.rng.random_range(-bound..bound))
                    .collect();
                Tensor::from_vec(v, shape, device)?
            };
            params.push((name, Var::from_tensor(&t)?));
        }
        Self::from_params(config, params)
    }

    fn from_params(config: VaeConfig, params: Vec<(String, Var)>) -> Result<Self> {
        Self::build(config, params, false)
    }

    fn build(config: VaeConfig, params: Vec<(String, Var)>, detach: bool) -> Result<Self> {
        let get = |n: &str| -> Tensor {
            let var = params
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v)
                .expect("known name");
            if detach {
                var.as_tensor().detach()
            } else {
                var.as_tensor().clone()
            }
        };
        let lin =
            |p: &str| Linear::new(get(&format!("{p}.weight")), Some(get(&format!("{p}.bias"))));
        let obs_log_var = match (config.likelihood, config.obs_log_var) {
            (Likelihood::Bernoulli, _) => None,
            (Likelihood::Gaussian, None) => Some(get("obs_log_var")),
            (Likelihood::Gaussian, Some(lv)) => {
                Some(Tensor::new(&[lv as f32], params[0].1.device())?)
            }
        };
        Ok(Self {
            encoder: lin("encoder.0"),
            fc_mu: lin("fc_mu"),
            fc_logvar: lin("fc_logvar"),
            decoder0: lin("decoder.0"),
            decoder2: lin("decoder.2"),
            obs_log_var,
            config,
            params,
        })
    }

    /// The trainable parameters with their `state_dict` names.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    pub fn device(&self) -> &Device {
        self.params[0].1.device()
    }

    /// A view whose layers use detached parameters: evaluation builds no autodiff graph.
    pub fn frozen(&self) -> Result<Self> {
        Self::build(self.config.clone(), self.params.clone(), true)
    }

    /// q(z|x): `x` `[B, input_dim]` -> DiagGaussian with mean, log_var `[B, latent_dim]`.
    pub fn encode(&self, x: &Tensor) -> Result<DiagGaussian> {
        let h = self.encoder.forward(x)?.relu()?;
        Ok(DiagGaussian::new(
            self.fc_mu.forward(&h)?,
            self.fc_logvar.forward(&h)?,
        )?)
    }

    /// Decoder logits: `z` `[..., latent_dim]` -> `[..., input_dim]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let dims = z.dims().to_vec();
        let flat = z.reshape(((), self.config.latent_dim))?;
        let h = self.decoder0.forward(&flat)?.relu()?;
        let logits = self.decoder2.forward(&h)?;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(self.config.input_dim);
        Ok(logits.reshape(out_dims)?)
    }

    /// The mean of p(x|z) from decoder logits: sigmoid(logits), in [0, 1].
    pub fn mean_from_logits(&self, logits: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::sigmoid(logits)?)
    }

    /// log p(x|z) summed over pixels. `x` `[B, D]`, `logits` `[..., B, D]` -> `[..., B]`.
    pub fn log_likelihood(&self, x: &Tensor, logits: &Tensor) -> Result<Tensor> {
        Ok(match self.config.likelihood {
            Likelihood::Bernoulli => bernoulli_log_prob_logits(x, logits)?,
            Likelihood::Gaussian => {
                let lv = self
                    .obs_log_var
                    .as_ref()
                    .expect("gaussian has a log variance");
                gaussian_log_prob(x, &candle_nn::ops::sigmoid(logits)?, lv)?
            }
        })
    }

    /// The safetensors bytes of the parameters under their `state_dict` names, with the
    /// config as metadata.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let tensors: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let metadata = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("elbo.model".to_string(), "vae".to_string()),
            (
                "elbo.config".to_string(),
                serde_json::to_string(&self.config)?,
            ),
        ]);
        checkpoint::serialize(&tensors, metadata)
    }

    /// Saves [`Vae::to_safetensors`] to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        checkpoint::write_atomic(path, &self.to_safetensors()?)
    }

    /// Loads a checkpoint written by [`Vae::save`] or by PyTorch
    /// (`safetensors.torch.save_file(model.state_dict(), path)`): without elbo's metadata the
    /// sizes are read off the tensor shapes and the likelihood is Bernoulli, as in the text.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::from_loaded(checkpoint::load(path, device)?, path)
    }

    /// A VAE from decoded checkpoint tensors; `path` names the file in errors. The config is
    /// validated before anything of its sizes is built.
    pub fn from_loaded(loaded: checkpoint::Loaded, path: &Path) -> Result<Self> {
        let config = match loaded.metadata.get("elbo.config") {
            Some(json) => serde_json::from_str(json).with_context(|| {
                format!(
                    "{}: metadata elbo.config is not a VAE config",
                    path.display()
                )
            })?,
            None => infer_config(&loaded.tensors)
                .with_context(|| format!("{}: not a VAE checkpoint", path.display()))?,
        };
        config
            .validate()
            .with_context(|| format!("{}: metadata elbo.config", path.display()))?;
        let mut params = Vec::new();
        for (name, shape) in VaeConfig::parameter_shapes(&config) {
            let Some(t) = loaded.tensors.get(&name) else {
                bail!(
                    "{}: no tensor {name} (expected shape {shape:?})",
                    path.display()
                );
            };
            if t.dims() != shape.as_slice() {
                bail!(
                    "{}: tensor {name} has shape {:?}, expected {shape:?}",
                    path.display(),
                    t.dims()
                );
            }
            params.push((name, Var::from_tensor(&t.to_dtype(DType::F32)?)?));
        }
        Self::from_params(config, params)
    }
}

fn infer_config(tensors: &HashMap<String, Tensor>) -> Result<VaeConfig> {
    let dims = |n: &str| -> Result<Vec<usize>> {
        Ok(tensors
            .get(n)
            .with_context(|| format!("no tensor {n}"))?
            .dims()
            .to_vec())
    };
    let enc = dims("encoder.0.weight")?;
    let mu = dims("fc_mu.weight")?;
    if enc.len() != 2 || mu.len() != 2 {
        bail!("encoder.0.weight {enc:?} and fc_mu.weight {mu:?} must be matrices");
    }
    Ok(VaeConfig {
        input_dim: enc[1],
        hidden_dim: enc[0],
        latent_dim: mu[0],
        ..VaeConfig::default()
    })
}

/// Decoded means of `n` prior samples z ~ N(0, I): `[n, input_dim]`.
pub fn sample_prior(vae: &Vae, n: usize, noise: &mut Noise) -> Result<Tensor> {
    let z = noise.randn((n, vae.config.latent_dim), vae.device())?;
    vae.mean_from_logits(&vae.decode(&z)?)
}

/// Reconstructions decoded from the posterior means: `[B, input_dim]`.
pub fn reconstruct(vae: &Vae, x: &Tensor) -> Result<Tensor> {
    let q = vae.encode(x)?;
    vae.mean_from_logits(&vae.decode(&q.mean)?)
}
