//! The VAE family of MLPs: L stochastic layers z_1..z_L with bottom-up inference and top-down
//! generation (Burda et al. 2015, Section 5), each conditional a diagonal Gaussian whose mean
//! and log-variance come from an MLP of any depth, width and activation:
//!
//! ```text
//! inference   q(z_1|x) q(z_2|z_1) ... q(z_L|z_{L-1})      q(z_l|.) = N(mu, e^lv), [mu; lv] = MLP(.)
//! generation  p(z_L) p(z_{L-1}|z_L) ... p(x|z_1)           p(z_L) = N(0, I)
//! ```
//!
//! The text's `SimpleVAE` is the case L = 1, hidden = `[[256]]`, ReLU, latent 32: its parameter
//! names and shapes are exactly `SimpleVAE.state_dict()`'s. The sizes, names and shapes of
//! every parameter are the family's table in [`crate::vae::config`]; this file holds the
//! candle model, its initialisation and its checkpoints.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::Linear;

use crate::checkpoint;
use crate::data::ImageShape;
use crate::distributions::{
    DiagGaussian, Noise, bernoulli_log_prob_logits, discretized_logistic_log_prob,
    gaussian_log_prob,
};
use crate::nn::activation::Activation;

pub use super::config::{ConvNet, Init, Likelihood, NetSpec, VaeConfig};

/// An MLP of candle `Linear`s: the activation after every layer but the last.
struct CandleMlp {
    layers: Vec<Linear>,
    /// A Gaussian's two heads (`fc_mu`, `fc_logvar`) after the last hidden layer.
    heads: Option<(Linear, Linear)>,
    activation: Activation,
}

impl CandleMlp {
    /// `x` `[..., in]` -> `[..., out]` (`[mu; log_var]` for a Gaussian's heads).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let mut h = x.reshape(((), dims[dims.len() - 1]))?;
        let hidden = self.layers.len() - usize::from(self.heads.is_none());
        for (j, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if j < hidden {
                h = crate::nn::activation::candle_forward(self.activation, &h)?;
            }
        }
        if let Some((mu, log_var)) = &self.heads {
            h = Tensor::cat(&[mu.forward(&h)?, log_var.forward(&h)?], 1)?;
        }
        let mut out = dims[..dims.len() - 1].to_vec();
        out.push(h.dim(1)?);
        Ok(h.reshape(out)?)
    }
}

/// The VAE: parameters as candle `Var`s, layers as views of them.
pub struct Vae {
    pub config: VaeConfig,
    params: Vec<(String, Var)>,
    /// q(z_{l+1}|z_l) for l = 0..L (z_0 = x): output `[mu; log_var]`.
    inference: Vec<CandleMlp>,
    /// p(x|z_1) (logits), then p(z_l|z_{l+1}) for l = 1..L-1 (`[mu; log_var]`).
    generative: Vec<CandleMlp>,
    /// The convolutional encoder and decoder around the first layer's MLPs (`VaeConfig::conv`).
    conv: Option<ConvParts>,
    obs_log_var: Option<Tensor>,
}

/// A convolution's weight and bias.
struct ConvLayer {
    w: Tensor,
    b: Tensor,
}

impl ConvLayer {
    /// `x` `[N, C_in, H, W]`; stride-2 4x4 (`down`), 3x3 stride 1 (`same`) or transposed 4x4
    /// stride 2 (`up`), each padded by 1.
    fn apply(&self, x: &Tensor, kind: ConvKind) -> Result<Tensor> {
        let y = match kind {
            ConvKind::Down => x.conv2d(&self.w, 1, 2, 1, 1)?,
            ConvKind::Same => x.conv2d(&self.w, 1, 1, 1, 1)?,
            ConvKind::Up => x.conv_transpose2d(&self.w, 1, 0, 2, 1)?,
        };
        Ok(y.broadcast_add(&self.b.reshape((1, (), 1, 1))?)?)
    }
}

#[derive(Clone, Copy)]
enum ConvKind {
    Down,
    Same,
    Up,
}

struct ConvParts {
    shape: ImageShape,
    /// `(c, h, w)` at the bottleneck.
    features: (usize, usize, usize),
    down: Vec<ConvLayer>,
    down_res: Vec<(ConvLayer, ConvLayer)>,
    up: Vec<ConvLayer>,
    up_res: Vec<(ConvLayer, ConvLayer)>,
    activation: Activation,
}

impl ConvParts {
    fn act(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::nn::activation::candle_forward(self.activation, x)?)
    }

    /// `h + conv2(act(conv1(act(h))))`.
    fn residual(&self, h: &Tensor, (c1, c2): &(ConvLayer, ConvLayer)) -> Result<Tensor> {
        let r = c1.apply(&self.act(h)?, ConvKind::Same)?;
        Ok((h + c2.apply(&self.act(&r)?, ConvKind::Same)?)?)
    }

    /// `x` `[..., C H W]` -> features `[N, c h w]` (N the leading dims flattened).
    fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.shape;
        let mut h = x.reshape(((), s.channels, s.height, s.width))?;
        for (j, conv) in self.down.iter().enumerate() {
            h = self.act(&conv.apply(&h, ConvKind::Down)?)?;
            if let Some(block) = self.down_res.get(j) {
                h = self.residual(&h, block)?;
            }
        }
        Ok(h.flatten_from(1)?)
    }

    /// Features `[N, c h w]` -> outputs `[N, C_out H W]`, planar.
    fn decode(&self, f: &Tensor) -> Result<Tensor> {
        let (c, h, w) = self.features;
        let mut x = self.act(&f.reshape(((), c, h, w))?)?;
        for (j, deconv) in self.up.iter().enumerate() {
            if let Some(block) = self.up_res.get(j) {
                x = self.residual(&x, block)?;
            }
            x = deconv.apply(&x, ConvKind::Up)?;
            if j + 1 < self.up.len() {
                x = self.act(&x)?;
            }
        }
        Ok(x.flatten_from(1)?)
    }
}

impl Vae {
    /// Fresh parameters with PyTorch's `nn.Linear` initialisation, weight and bias
    /// ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from the seeded `noise`.
    pub fn new(config: VaeConfig, noise: &mut Noise, device: &Device) -> Result<Self> {
        Self::initialised(config, Init::Pytorch, None, noise, device)
    }

    /// Fresh parameters drawn from the seeded `noise` by `init`; with [`Init::Glorot`],
    /// `output_bias` (`[input_dim]`, the logits of the training mean) sets the last bias of
    /// p(x|z_1), as Burda et al.'s code does.
    pub fn initialised(
        config: VaeConfig,
        init: Init,
        output_bias: Option<&[f32]>,
        noise: &mut Noise,
        device: &Device,
    ) -> Result<Self> {
        use rand::Rng;
        config.validate()?;
        let mut params = Vec::new();
        let entries = config.flat_entries();
        // The fan-in of each bias is its weight's.
        let fan_in: HashMap<String, usize> = entries
            .iter()
            .filter(|(n, _, _)| n.ends_with(".weight"))
            .map(|(n, _, s)| (n.trim_end_matches(".weight").to_string(), s[1]))
            .collect();
        let decoder_out = config.flat_entries().into_iter().rfind(|(n, _, s)| {
            config.conv.is_none()
                && n.starts_with("decoder")
                && n.ends_with(".bias")
                && s[0] == config.output_dim()
        });
        for (name, _, shape) in entries {
            let n: usize = shape.iter().product();
            let is_weight = name.ends_with(".weight");
            let v: Vec<f32> = match init {
                Init::Pytorch => {
                    let stem = name.trim_end_matches(".weight").trim_end_matches(".bias");
                    let bound = 1.0 / (fan_in[stem] as f32).sqrt();
                    (0..n)
                        .map(|_| noise.rng.random_range(-bound..bound))
                        .collect()
                }
                Init::Glorot if is_weight => {
                    let bound = (6.0 / (shape[0] + shape[1]) as f32).sqrt();
                    (0..n)
                        .map(|_| noise.rng.random_range(-bound..bound))
                        .collect()
                }
                Init::Glorot => match (output_bias, &decoder_out) {
                    // The logits of the mean (Bernoulli); the logistic's means start at the
                    // mean pixel in [-1, 1] and its log-scales at 0.
                    (Some(b), Some((out, _, _))) if *out == name => match config.likelihood {
                        Likelihood::Logistic => {
                            // A mixture's outputs are [pi logits; means; log-scales], M D each.
                            let m = config.mixtures;
                            let means = b.iter().map(|l| 2.0 / (1.0 + (-l).exp()) - 1.0);
                            let lead = if m > 1 { m * b.len() } else { 0 };
                            std::iter::repeat_n(0.0, lead)
                                .chain(means.cycle().take(m * b.len()))
                                .chain(std::iter::repeat(0.0))
                                .take(n)
                                .collect()
                        }
                        _ => b
                            .iter()
                            .copied()
                            .chain(std::iter::repeat(0.0))
                            .take(n)
                            .collect(),
                    },
                    _ => vec![0.0; n],
                },
            };
            let t = Tensor::from_vec(v, shape, device)?;
            params.push((name, Var::from_tensor(&t)?));
        }
        for (name, shape) in config.conv_parameter_shapes() {
            // fan_in as PyTorch computes it: weight.size(1) * k * k (for a transposed
            // convolution that is its output channels); Glorot adds fan_out = size(0) * k * k.
            let n: usize = shape.iter().product();
            let v: Vec<f32> = if name.ends_with(".weight") {
                let k2 = shape[2] * shape[3];
                let bound = match init {
                    Init::Pytorch => 1.0 / ((shape[1] * k2) as f32).sqrt(),
                    Init::Glorot => (6.0 / ((shape[0] + shape[1]) * k2) as f32).sqrt(),
                };
                (0..n)
                    .map(|_| noise.rng.random_range(-bound..bound))
                    .collect()
            } else {
                let w = &params_shape(&config, &name.replace(".bias", ".weight"));
                match init {
                    Init::Pytorch => {
                        let bound = 1.0 / ((w[1] * w[2] * w[3]) as f32).sqrt();
                        (0..n)
                            .map(|_| noise.rng.random_range(-bound..bound))
                            .collect()
                    }
                    Init::Glorot => vec![0.0; n],
                }
            };
            params.push((
                name,
                Var::from_tensor(&Tensor::from_vec(v, shape, device)?)?,
            ));
        }
        if config.learns_obs_var() {
            let t = Tensor::zeros(1, DType::F32, device)?;
            params.push(("obs_log_var".to_string(), Var::from_tensor(&t)?));
        }
        Self::build(config, params, false)
    }

    fn build(config: VaeConfig, params: Vec<(String, Var)>, detach: bool) -> Result<Self> {
        let by_name: HashMap<&str, &Var> = params.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let get = |n: &str| -> Result<Tensor> {
            let var = by_name
                .get(n)
                .with_context(|| format!("no parameter {n}"))?;
            Ok(if detach {
                var.as_tensor().detach()
            } else {
                var.as_tensor().clone()
            })
        };
        let mut nets = Vec::new();
        for spec in config.networks() {
            let layers = spec.shape.layers();
            let mut linears = Vec::new();
            let mut heads = None;
            let linear =
                |w: &str, b: &str| -> Result<Linear> { Ok(Linear::new(get(w)?, Some(get(b)?))) };
            for j in 0..layers {
                match (&spec.heads, j + 1 == layers) {
                    // Two layers, not one of their concatenated weights: a concatenation made
                    // here would be a copy that Adam's in-place updates never reach.
                    (Some(h), true) => {
                        heads = Some((
                            linear(&format!("{h}fc_mu.weight"), &format!("{h}fc_mu.bias"))?,
                            linear(
                                &format!("{h}fc_logvar.weight"),
                                &format!("{h}fc_logvar.bias"),
                            )?,
                        ))
                    }
                    _ => linears.push(linear(
                        &format!("{}.{}.weight", spec.prefix, 2 * j),
                        &format!("{}.{}.bias", spec.prefix, 2 * j),
                    )?),
                }
            }
            nets.push(CandleMlp {
                layers: linears,
                heads,
                activation: spec.shape.activation,
            });
        }
        let generative = nets.split_off(config.layers());
        let conv = match (&config.conv, config.image_shape(), config.conv_features()) {
            (Some(spec), Some(shape), Some(features)) => {
                let layer = |n: &str| -> Result<ConvLayer> {
                    Ok(ConvLayer {
                        w: get(&format!("{n}.weight"))?,
                        b: get(&format!("{n}.bias"))?,
                    })
                };
                let pairs = |side: &str| -> Result<Vec<(ConvLayer, ConvLayer)>> {
                    if !spec.residual {
                        return Ok(Vec::new());
                    }
                    (0..spec.channels.len())
                        .map(|j| {
                            Ok((
                                layer(&format!("{side}.res.{j}.conv1"))?,
                                layer(&format!("{side}.res.{j}.conv2"))?,
                            ))
                        })
                        .collect()
                };
                let n = spec.channels.len();
                Some(ConvParts {
                    shape,
                    features,
                    down: (0..n)
                        .map(|j| layer(&format!("encoder.conv.{j}")))
                        .collect::<Result<_>>()?,
                    down_res: pairs("encoder")?,
                    up: (0..n)
                        .map(|j| layer(&format!("decoder.deconv.{j}")))
                        .collect::<Result<_>>()?,
                    up_res: pairs("decoder")?,
                    activation: config.activation,
                })
            }
            _ => None,
        };
        let obs_log_var = match (config.likelihood, config.obs_log_var) {
            (Likelihood::Bernoulli | Likelihood::Logistic, _) => None,
            (Likelihood::Gaussian, None) => Some(get("obs_log_var")?),
            (Likelihood::Gaussian, Some(lv)) => {
                Some(Tensor::new(&[lv as f32], params[0].1.device())?)
            }
        };
        Ok(Self {
            inference: nets,
            generative,
            conv,
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

    /// q(z_1|x): `x` `[B, input_dim]` -> DiagGaussian with mean, log_var `[B, latent_dims[0]]`.
    pub fn encode(&self, x: &Tensor) -> Result<DiagGaussian> {
        self.encode_layer(0, x)
    }

    /// q(z_{l+1}|z_l) (0-based `l`; z_0 = x): `input` `[..., in]` -> `[..., latent_dims[l]]`.
    pub fn encode_layer(&self, l: usize, input: &Tensor) -> Result<DiagGaussian> {
        match (&self.conv, l) {
            (Some(conv), 0) => {
                let dims = input.dims().to_vec();
                let out = self.inference[0].forward(&conv.encode(input)?)?;
                let mut shape = dims[..dims.len() - 1].to_vec();
                shape.push(out.dim(1)?);
                gaussian_heads(&out.reshape(shape)?)
            }
            _ => gaussian_heads(&self.inference[l].forward(input)?),
        }
    }

    /// p(z_l|z_{l+1}) for 0-based `l` in 1..L, i.e. the Gaussian over the layer below `z`:
    /// `z` `[..., latent_dims[l]]` -> `[..., latent_dims[l - 1]]`.
    pub fn prior_layer(&self, l: usize, z: &Tensor) -> Result<DiagGaussian> {
        gaussian_heads(&self.generative[l].forward(z)?)
    }

    /// The outputs of p(x|z_1)'s decoder: `z` `[..., latent_dims[0]]` -> `[..., output_dim]`
    /// (logits; for the discretized logistic, means then log-scales).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let Some(conv) = &self.conv else {
            return self.generative[0].forward(z);
        };
        let dims = z.dims().to_vec();
        let features = self.generative[0].forward(&z.reshape(((), dims[dims.len() - 1]))?)?;
        let out = conv.decode(&features)?;
        let mut shape = dims[..dims.len() - 1].to_vec();
        shape.push(out.dim(1)?);
        Ok(out.reshape(shape)?)
    }

    /// z_1 of ancestral samples from the prior: z_L ~ N(0, I), then the means of
    /// p(z_{l}|z_{l+1}) down to z_1 (the picture of a sample, as Burda et al. draw them, takes
    /// each layer's sample; `sample_prior` does that). `[n, latent_dims[0]]`.
    pub fn sample_z1(&self, n: usize, noise: &mut Noise) -> Result<Tensor> {
        let top = self.config.layers() - 1;
        let mut z = noise.randn((n, self.config.latent_dims[top]), self.device())?;
        for l in (1..=top).rev() {
            let p = self.prior_layer(l, &z)?;
            let eps = noise.randn(p.mean.dims(), self.device())?;
            z = p.rsample_with(&eps)?;
        }
        Ok(z)
    }

    /// A mixture's decoder outputs `[..., 3 M D]` as `(logits of pi, means, log-scales)`, each
    /// `[..., M, D]` (the layout: the M D logits, then the means, then the log-scales).
    fn mixture_parts(&self, out: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (m, d) = (self.config.mixtures, self.config.input_dim);
        let mut dims = out.dims()[..out.rank() - 1].to_vec();
        dims.extend([3, m, d]);
        let parts = out.reshape(dims)?;
        let at = parts.rank() - 3;
        let part =
            |i: usize| -> Result<Tensor> { Ok(parts.narrow(at, i, 1)?.squeeze(at)?.contiguous()?) };
        Ok((part(0)?, part(1)?, part(2)?))
    }

    /// The mean of p(x|z) in [0, 1] from the decoder's outputs: sigmoid(logits), or for the
    /// discretized logistic its location mapped from [-1, 1] (the first `input_dim` outputs;
    /// for a mixture, the weighted mean of the components' locations).
    pub fn mean_from_logits(&self, logits: &Tensor) -> Result<Tensor> {
        if self.config.likelihood == Likelihood::Logistic && self.config.mixtures > 1 {
            let (pi, mean, _) = self.mixture_parts(logits)?;
            let at = pi.rank() - 2;
            let pi = candle_nn::ops::softmax(&pi, at)?;
            let mean = (pi * mean.clamp(-1f32, 1f32)?)?.sum(at)?;
            return Ok(mean.affine(0.5, 0.5)?);
        }
        Ok(match self.config.likelihood {
            Likelihood::Logistic => {
                let last = logits.rank() - 1;
                let mean = logits.narrow(last, 0, self.config.input_dim)?;
                mean.clamp(-1f32, 1f32)?.affine(0.5, 0.5)?
            }
            _ => candle_nn::ops::sigmoid(logits)?,
        })
    }

    /// log p(x|z) summed over pixels. `x` `[B, D]`, the decoder's outputs `logits`
    /// `[..., B, output_dim]` -> `[..., B]`.
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
            Likelihood::Logistic if self.config.mixtures > 1 => {
                let (pi, mean, log_scale) = self.mixture_parts(logits)?;
                crate::distributions::discretized_logistic_mixture_log_prob(
                    x, &pi, &mean, &log_scale,
                )?
            }
            Likelihood::Logistic => {
                let (last, d) = (logits.rank() - 1, self.config.input_dim);
                let mean = logits.narrow(last, 0, d)?;
                let log_scale = logits.narrow(last, d, d)?;
                discretized_logistic_log_prob(x, &mean, &log_scale)?
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
        crate::files::write_atomic(path, &self.to_safetensors()?)
    }

    /// Loads a checkpoint written by [`Vae::save`] or by PyTorch
    /// (`safetensors.torch.save_file(model.state_dict(), path)`): without elbo's metadata the
    /// sizes are read off the tensor shapes of a `SimpleVAE` and the likelihood is Bernoulli,
    /// as in the text.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::from_loaded(checkpoint::load(path, device)?, path)
    }

    /// A VAE from decoded checkpoint tensors; `path` names the file in errors. The config is
    /// validated before anything of its sizes is built.
    pub fn from_loaded(loaded: checkpoint::Loaded, path: &Path) -> Result<Self> {
        let config: VaeConfig = match loaded.metadata.get("elbo.config") {
            // serde quotes what it could not parse: cut short, a 10 MB string stays out.
            Some(json) => serde_json::from_str(json).map_err(|e| {
                anyhow::anyhow!(
                    "{}: metadata elbo.config is not a VAE config: {}",
                    path.display(),
                    crate::files::excerpt(&e.to_string(), 160)
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
        Self::build(config, params, false)
    }
}

impl super::objective::LatentVariableModel for Vae {
    fn latent_dims(&self) -> Vec<usize> {
        self.config.latent_dims.clone()
    }

    fn device(&self) -> &Device {
        Vae::device(self)
    }

    fn encode_layer(&self, l: usize, input: &Tensor) -> Result<DiagGaussian> {
        Vae::encode_layer(self, l, input)
    }

    fn prior_layer(&self, l: usize, z: &Tensor) -> Result<DiagGaussian> {
        Vae::prior_layer(self, l, z)
    }

    fn log_px_given_z(&self, x: &Tensor, z1: &Tensor) -> Result<Tensor> {
        self.log_likelihood(x, &self.decode(z1)?)
    }
}

fn params_shape(config: &VaeConfig, name: &str) -> Vec<usize> {
    config
        .conv_parameter_shapes()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s)
        .unwrap_or_default()
}

/// Splits an MLP's `[..., 2L]` output into the Gaussian's mean and log-variance.
fn gaussian_heads(out: &Tensor) -> Result<DiagGaussian> {
    let last = out.rank() - 1;
    let l = out.dim(last)? / 2;
    Ok(DiagGaussian::new(
        out.narrow(last, 0, l)?.contiguous()?,
        out.narrow(last, l, l)?.contiguous()?,
    )?)
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
    Ok(VaeConfig::mlp(enc[1], enc[0], mu[0]))
}

/// Decoded means of `n` ancestral samples from the prior: `[n, input_dim]`.
pub fn sample_prior(vae: &Vae, n: usize, noise: &mut Noise) -> Result<Tensor> {
    let z = vae.sample_z1(n, noise)?;
    vae.mean_from_logits(&vae.decode(&z)?)
}

/// Reconstructions decoded from the posterior means of z_1: `[B, input_dim]`.
pub fn reconstruct(vae: &Vae, x: &Tensor) -> Result<Tensor> {
    let q = vae.encode(x)?;
    vae.mean_from_logits(&vae.decode(&q.mean)?)
}
