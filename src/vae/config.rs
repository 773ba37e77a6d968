//! The VAE family's parameter table: [`VaeConfig`] (sizes, activation, likelihood, the
//! convolutional part) with its validation, the networks it implies ([`NetSpec`]) and every
//! parameter's `state_dict` name and shape ([`VaeConfig::flat_entries`],
//! [`VaeConfig::conv_parameter_shapes`]): what candle's model (`vae::model`), the
//! fused engine and checkpoints all read. How fresh parameters are drawn: [`Init`].
//!
//! The names are those the equivalent PyTorch module's `state_dict()` gives (docs/library.md,
//! "Checkpoint names"):
//!
//! ```text
//! L = 1   encoder.{2j}.weight  [out, in]    an nn.Sequential of Linear and activation
//!         fc_mu.weight, fc_logvar.weight    the two heads of q(z_1|x)
//!         decoder.{2j}.weight               p(x|z_1): logits (Bernoulli) or sigmoid mean (Gaussian)
//! L > 1   encoder.{l}.net.{2j}, encoder.{l}.fc_mu, encoder.{l}.fc_logvar        q(z_{l+1}|z_l)
//!         decoder.0.net.{2j}                                                    p(x|z_1)
//!         decoder.{l}.net.{2j}, decoder.{l}.fc_mu, decoder.{l}.fc_logvar        p(z_l|z_{l+1})
//! ```

use anyhow::{Result, bail};

use crate::data::ImageShape;
use crate::nn::activation::Activation;
use crate::nn::mlp::MlpShape;

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
    /// Discretized logistic over the 256 levels of 8-bit pixels (PixelCNN++): the decoder gives
    /// a mean and a log-scale per pixel and channel (`2 D` outputs), so the NLL is a
    /// probability of the data itself and reads as bits/dim.
    Logistic,
}

/// Model hyper-parameters; defaults are exactly the text's `SimpleVAE`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "RawVaeConfig")]
pub struct VaeConfig {
    pub input_dim: usize,
    /// Sizes of z_1..z_L, bottom (next to x) to top.
    pub latent_dims: Vec<usize>,
    /// For each stochastic layer l, the hidden widths of the MLP of q(z_l|z_{l-1}) (z_0 = x);
    /// the generative MLP between the same two layers uses them in reverse.
    pub hidden: Vec<Vec<usize>>,
    /// The activation after every hidden layer.
    pub activation: Activation,
    pub likelihood: Likelihood,
    /// Gaussian likelihood only: a fixed log sigma^2; `None` learns it.
    pub obs_log_var: Option<f64>,
    /// Discretized logistic only: components of a mixture per value (1: a single logistic).
    #[serde(default = "one_component", skip_serializing_if = "is_one")]
    pub mixtures: usize,
    /// The images x flattens (C x H x W = input_dim), for sample and reconstruction grids;
    /// `None` in checkpoints from before it was stored (then 784 means 1 x 28 x 28).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_shape: Option<ImageShape>,
    /// A convolutional encoder and mirrored decoder around the MLPs of the first stochastic
    /// layer (one stochastic layer only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv: Option<ConvNet>,
}

/// The convolutional part of a VAE for C x H x W images:
///
/// ```text
/// encoder  x [C, H, W] -> (conv 4x4 stride 2 pad 1 -> act [-> residual block]) per channel
///          count -> flatten [c_n H/2^n W/2^n] -> MLP -> (mu, log_var)
/// decoder  z -> MLP -> [c_n H/2^n W/2^n] -> act -> ([residual block ->] transposed conv 4x4
///          stride 2 pad 1 -> act) per channel count, mirrored, the last to C outputs (2C for
///          the discretized logistic), no activation
/// residual block  h + conv3x3(act(conv3x3(act(h))))
/// ```
///
/// Names: `encoder.conv.{j}`, `encoder.res.{j}.conv1|conv2`, `encoder.mlp.{2j}`, `fc_mu`,
/// `fc_logvar`, `decoder.mlp.{2j}`, `decoder.res.{j}.conv1|conv2`, `decoder.deconv.{j}`
/// (`decoder.*.{j}` counted from the bottleneck outwards).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConvNet {
    /// Channels after each stride-2 convolution (e.g. `[32, 64]`).
    pub channels: Vec<usize>,
    /// A residual block after each convolution (and before each transposed one).
    pub residual: bool,
}

fn one_component() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// The config as stored: today's fields, or the SimpleVAE form of earlier checkpoints
/// (`hidden_dim`, `latent_dim`).
#[derive(serde::Deserialize)]
struct RawVaeConfig {
    input_dim: usize,
    #[serde(default)]
    latent_dims: Option<Vec<usize>>,
    #[serde(default)]
    hidden: Option<Vec<Vec<usize>>>,
    #[serde(default)]
    activation: Option<Activation>,
    #[serde(default)]
    hidden_dim: Option<usize>,
    #[serde(default)]
    latent_dim: Option<usize>,
    likelihood: Likelihood,
    #[serde(default)]
    obs_log_var: Option<f64>,
    #[serde(default = "one_component")]
    mixtures: usize,
    #[serde(default)]
    image_shape: Option<ImageShape>,
    #[serde(default)]
    conv: Option<ConvNet>,
}

impl TryFrom<RawVaeConfig> for VaeConfig {
    type Error = String;
    fn try_from(raw: RawVaeConfig) -> std::result::Result<Self, String> {
        let latent_dims = match (raw.latent_dims, raw.latent_dim) {
            (Some(v), _) => v,
            (None, Some(l)) => vec![l],
            (None, None) => return Err("no latent_dims".into()),
        };
        let hidden = match (raw.hidden, raw.hidden_dim) {
            (Some(h), _) => h,
            (None, Some(h)) => vec![vec![h]],
            (None, None) => return Err("no hidden".into()),
        };
        Ok(Self {
            input_dim: raw.input_dim,
            latent_dims,
            hidden,
            activation: raw.activation.unwrap_or(Activation::Relu),
            likelihood: raw.likelihood,
            obs_log_var: raw.obs_log_var,
            mixtures: raw.mixtures,
            image_shape: raw.image_shape,
            conv: raw.conv,
        })
    }
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self::mlp(784, 256, 32)
    }
}

/// One MLP of the model, in the flat parameter order (all inference networks bottom-up, then
/// the generative ones, `p(x|z_1)` first).
#[derive(Debug, Clone)]
pub struct NetSpec {
    /// Name prefix of its `nn.Sequential` layers (`encoder`, `encoder.1.net`, ...).
    pub prefix: String,
    /// `Some(prefix)` of `fc_mu` / `fc_logvar` when its last layer is a Gaussian's two heads.
    pub heads: Option<String>,
    pub shape: MlpShape,
}

impl VaeConfig {
    /// One stochastic layer with one hidden layer of ReLUs: the text's `SimpleVAE`
    /// (`mlp(784, 256, 32)`), Bernoulli likelihood.
    pub fn mlp(input_dim: usize, hidden_dim: usize, latent_dim: usize) -> Self {
        Self {
            input_dim,
            latent_dims: vec![latent_dim],
            hidden: vec![vec![hidden_dim]],
            activation: Activation::Relu,
            likelihood: Likelihood::Bernoulli,
            obs_log_var: None,
            mixtures: 1,
            image_shape: (input_dim == 784).then_some(ImageShape::MNIST),
            conv: None,
        }
    }

    /// The convolutional part's feature map at the bottleneck `(channels, h, w)`, when the
    /// model has one (its image shape must be known and divisible; see `validate`).
    pub fn conv_features(&self) -> Option<(usize, usize, usize)> {
        let conv = self.conv.as_ref()?;
        let shape = self.image_shape()?;
        let n = conv.channels.len() as u32;
        let (h, w) = (shape.height >> n, shape.width >> n);
        Some((*conv.channels.last()?, h, w))
    }

    /// The conv part's parameters: `(name, shape)` in `state_dict` order.
    pub fn conv_parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (Some(conv), Some(shape)) = (&self.conv, self.image_shape()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut push = |name: String, o: usize, i: usize, k: usize| {
            out.push((format!("{name}.weight"), vec![o, i, k, k]));
            // A transposed convolution's bias has its output channels, the weight's second
            // dimension; a convolution's, its first.
            let bias = if name.contains("deconv") { i } else { o };
            out.push((format!("{name}.bias"), vec![bias]));
        };
        let mut c_in = shape.channels;
        for (j, &c) in conv.channels.iter().enumerate() {
            push(format!("encoder.conv.{j}"), c, c_in, 4);
            if conv.residual {
                push(format!("encoder.res.{j}.conv1"), c, c, 3);
                push(format!("encoder.res.{j}.conv2"), c, c, 3);
            }
            c_in = c;
        }
        let c_out = self.output_dim() / (shape.height * shape.width);
        let n = conv.channels.len();
        for j in 0..n {
            let c = conv.channels[n - 1 - j];
            let next = if j + 1 < n {
                conv.channels[n - 2 - j]
            } else {
                c_out
            };
            if conv.residual {
                push(format!("decoder.res.{j}.conv1"), c, c, 3);
                push(format!("decoder.res.{j}.conv2"), c, c, 3);
            }
            // ConvTranspose2d weights are [in, out, k, k]: (o, i) = (c, next) in that order.
            push(format!("decoder.deconv.{j}"), c, next, 4);
        }
        out
    }

    /// The image shape of x: stored, or 1 x 28 x 28 for a 784-dimensional model without one.
    pub fn image_shape(&self) -> Option<ImageShape> {
        self.image_shape
            .or((self.input_dim == ImageShape::MNIST.dim()).then_some(ImageShape::MNIST))
    }

    /// The decoder's outputs per example: `input_dim`, or two per value (mean and log-scale)
    /// for the discretized logistic.
    pub fn output_dim(&self) -> usize {
        match self.likelihood {
            Likelihood::Logistic if self.mixtures > 1 => 3 * self.mixtures * self.input_dim,
            Likelihood::Logistic => 2 * self.input_dim,
            _ => self.input_dim,
        }
    }

    /// The number of stochastic layers L.
    pub fn layers(&self) -> usize {
        self.latent_dims.len()
    }

    /// The size of z_1, the layer the likelihood's decoder reads.
    pub fn latent_dim(&self) -> usize {
        self.latent_dims[0]
    }

    /// A short description: `784-[200-200]-50 tanh` or `784-[200-200]-100-[100-100]-50 tanh`.
    pub fn describe(&self) -> String {
        let mut s = self.input_dim.to_string();
        for (h, l) in self.hidden.iter().zip(&self.latent_dims) {
            let widths: Vec<String> = h.iter().map(|w| w.to_string()).collect();
            s.push_str(&format!("-[{}]-{l}", widths.join("-")));
        }
        let act = serde_json::to_string(&self.activation).unwrap_or_default();
        format!("{s} {}", act.trim_matches('"'))
    }

    /// The MLPs in flat-parameter order: q(z_1|x), ..., q(z_L|z_{L-1}), p(x|z_1),
    /// p(z_1|z_2), ..., p(z_{L-1}|z_L).
    pub fn networks(&self) -> Vec<NetSpec> {
        let layers = self.layers();
        let act = self.activation;
        let mut nets = Vec::new();
        for l in 0..layers {
            let features = self.conv_features().map(|(c, h, w)| c * h * w);
            let input = match (l, features) {
                (0, Some(f)) => f,
                (0, None) => self.input_dim,
                _ => self.latent_dims[l - 1],
            };
            let mut sizes = vec![input];
            sizes.extend(&self.hidden[l]);
            sizes.push(2 * self.latent_dims[l]);
            let (prefix, heads) = if features.is_some() {
                ("encoder.mlp".to_string(), String::new())
            } else if layers == 1 {
                ("encoder".to_string(), String::new())
            } else {
                (format!("encoder.{l}.net"), format!("encoder.{l}."))
            };
            nets.push(NetSpec {
                prefix,
                heads: Some(heads),
                shape: MlpShape {
                    sizes,
                    activation: act,
                },
            });
        }
        for l in 0..layers {
            let mut sizes = vec![self.latent_dims[l]];
            sizes.extend(self.hidden[l].iter().rev());
            let features = self.conv_features().map(|(c, h, w)| c * h * w);
            let (prefix, heads) = if l == 0 {
                sizes.push(features.unwrap_or(self.output_dim()));
                let prefix = match (features, layers) {
                    (Some(_), _) => "decoder.mlp",
                    (None, 1) => "decoder",
                    _ => "decoder.0.net",
                };
                (prefix.to_string(), None)
            } else {
                sizes.push(2 * self.latent_dims[l - 1]);
                (format!("decoder.{l}.net"), Some(format!("decoder.{l}.")))
            };
            nets.push(NetSpec {
                prefix,
                heads,
                shape: MlpShape {
                    sizes,
                    activation: act,
                },
            });
        }
        nets
    }

    /// Every MLP parameter: `(state_dict name, offset in the flat vector, shape)`. A Gaussian
    /// head's `[2L, H]` weight is `[fc_mu; fc_logvar]`, so the two are adjacent rows.
    pub fn flat_entries(&self) -> Vec<(String, usize, Vec<usize>)> {
        let mut out = Vec::new();
        let mut base = 0;
        for net in self.networks() {
            let layers = net.shape.layers();
            for j in 0..layers {
                let (offset, inp, outp) = net.shape.layer(j);
                let (w, b) = (base + offset, base + offset + outp * inp);
                match (&net.heads, j + 1 == layers) {
                    (Some(h), true) => {
                        let l = outp / 2;
                        out.push((format!("{h}fc_mu.weight"), w, vec![l, inp]));
                        out.push((format!("{h}fc_mu.bias"), b, vec![l]));
                        out.push((format!("{h}fc_logvar.weight"), w + l * inp, vec![l, inp]));
                        out.push((format!("{h}fc_logvar.bias"), b + l, vec![l]));
                    }
                    _ => {
                        let p = &net.prefix;
                        out.push((format!("{p}.{}.weight", 2 * j), w, vec![outp, inp]));
                        out.push((format!("{p}.{}.bias", 2 * j), b, vec![outp]));
                    }
                }
            }
            base += net.shape.parameter_count();
        }
        out
    }

    /// Every parameter's name and shape (the MLPs', the convolutions', then `obs_log_var` when
    /// it is learned), in the order fresh parameters are drawn.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut shapes: Vec<(String, Vec<usize>)> = self
            .flat_entries()
            .into_iter()
            .map(|(n, _, s)| (n, s))
            .collect();
        shapes.extend(self.conv_parameter_shapes());
        if self.learns_obs_var() {
            shapes.push(("obs_log_var".to_string(), vec![1]));
        }
        shapes
    }

    pub(crate) fn learns_obs_var(&self) -> bool {
        self.likelihood == Likelihood::Gaussian && self.obs_log_var.is_none()
    }

    pub fn validate(&self) -> Result<()> {
        if self.input_dim == 0 {
            bail!("--input-dim must be at least 1");
        }
        if self.latent_dims.is_empty() || self.latent_dims.contains(&0) {
            bail!(
                "--latent-dim: every stochastic layer needs at least 1 unit, got {:?}",
                self.latent_dims
            );
        }
        if self.hidden.len() != self.latent_dims.len() {
            bail!(
                "--hidden: {} groups of hidden widths for {} stochastic layers (give one group per layer, separated by '/')",
                self.hidden.len(),
                self.latent_dims.len()
            );
        }
        if self.hidden.iter().flatten().any(|&w| w == 0) {
            bail!("--hidden: every hidden width must be at least 1");
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
        if !(1..=64).contains(&self.mixtures) {
            bail!("--mixtures: from 1 to 64 components, got {}", self.mixtures);
        }
        if self.mixtures > 1 && self.likelihood != Likelihood::Logistic {
            bail!("--mixtures applies only to --likelihood logistic");
        }
        if let Some(conv) = &self.conv {
            let Some(shape) = self.image_shape() else {
                bail!("--conv needs images of a known shape (C x H x W)");
            };
            if self.layers() != 1 {
                bail!("--conv: convolutional VAEs have one stochastic layer here");
            }
            if conv.channels.is_empty() || conv.channels.iter().any(|&c| c == 0 || c > 1 << 16) {
                bail!(
                    "--conv: channel counts from 1 to 65536, got {:?}",
                    conv.channels
                );
            }
            let n = conv.channels.len();
            let step = 1usize
                .checked_shl(n as u32)
                .filter(|s| *s <= shape.height && *s <= shape.width);
            match step {
                Some(s) if shape.height.is_multiple_of(s) && shape.width.is_multiple_of(s) => {}
                _ => bail!(
                    "--conv: {n} stride-2 convolutions need H and W divisible by {}, but the images are {shape}",
                    1u128 << n.min(100)
                ),
            }
        }
        // Weights, gradients and Adam's two moments: four f32 copies of every parameter.
        let count = self.parameter_count_checked();
        crate::limits::check_bytes(
            &format!(
                "--hidden {} with --latent-dim {}",
                self.hidden_flag(),
                join(&self.latent_dims, ",")
            ),
            "the model's parameters with their gradients and Adam's moments",
            count.and_then(|c| c.checked_mul(16)),
        )
    }

    /// The hidden widths as the `--hidden` flag writes them: `200,200/100,100`.
    pub fn hidden_flag(&self) -> String {
        let groups: Vec<String> = self.hidden.iter().map(|h| join(h, ",")).collect();
        groups.join("/")
    }

    /// The number of parameters, computed without overflow (`None` when it overflows).
    pub fn parameter_count_checked(&self) -> Option<u64> {
        let mut total = 1u64; // obs_log_var
        let count = |sizes: &[u64]| -> Option<u64> {
            sizes.windows(2).try_fold(0u64, |acc, p| {
                acc.checked_add(p[1].checked_mul(p[0].checked_add(1)?)?)
            })
        };
        let d = self.input_dim as u64;
        for (l, (h, &z)) in self.hidden.iter().zip(&self.latent_dims).enumerate() {
            let z = z as u64;
            let below = if l == 0 {
                d
            } else {
                self.latent_dims[l - 1] as u64
            };
            let hidden: Vec<u64> = h.iter().map(|&w| w as u64).collect();
            let mut q = vec![below];
            q.extend(&hidden);
            q.push(z.checked_mul(2)?);
            let mut p = vec![z];
            p.extend(hidden.iter().rev());
            let out = match self.likelihood {
                Likelihood::Logistic => d.checked_mul(if self.mixtures > 1 {
                    3 * self.mixtures as u64
                } else {
                    2
                })?,
                _ => d,
            };
            p.push(if l == 0 { out } else { below.checked_mul(2)? });
            total = total.checked_add(count(&q)?)?.checked_add(count(&p)?)?;
        }
        Some(total)
    }

    /// The number of values in the flat MLP parameter vector.
    pub fn flat_len(&self) -> usize {
        self.networks()
            .iter()
            .map(|n| n.shape.parameter_count())
            .sum()
    }
}

/// How fresh parameters are drawn.
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
pub enum Init {
    /// PyTorch's `nn.Linear` default: weight and bias ~ U(+-1/sqrt(fan_in)).
    #[default]
    Pytorch,
    /// Glorot & Bengio (2010) uniform weights U(+-sqrt(6 / (fan_in + fan_out))), zero biases,
    /// and the last bias of p(x|z_1) at the logits of the training mean clipped to
    /// [0.001, 0.999] (Burda et al. 2015's code).
    Glorot,
}

fn join(values: &[usize], sep: &str) -> String {
    let parts: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    parts.join(sep)
}
