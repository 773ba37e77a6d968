//! Denoisers eps_theta(x_t, t): a time-conditioned MLP for 2-D data and a small U-Net for
//! 28x28 images (Ho et al. 2020, scaled down). Both are built through a candle `VarBuilder`,
//! so parameter names are stable checkpoint keys.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{D, DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder, VarMap};

use super::conv::Conv2d;
use super::group_norm::GroupNorm;
use rand::Rng;

use super::process::Denoiser;
use crate::distributions::Noise;

/// Sinusoidal timestep embedding (Vaswani et al. 2017, as in DDPM / improved-diffusion):
/// `[cos(t f_i), sin(t f_i)]`, f_i = 10000^{-i/half}. `t` `[B]` -> `[B, dim]` (dim even).
pub fn timestep_embedding(t: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let freqs = crate::nn::embedding::sinusoid_frequencies(dim);
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)
}

/// Which network, with its sizes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum NetConfig {
    /// MLP on `[B, dim]`: concat(x, emb(t)) -> hidden x layers (SiLU) -> dim.
    Mlp {
        dim: usize,
        hidden: usize,
        layers: usize,
        time_dim: usize,
    },
    /// U-Net on `[B, C, H, W]`: channels `base * mult` at H, H/2, H/4, ... pixels (28, 14, 7
    /// for MNIST), `in_channels` = C image channels in and out.
    Unet {
        base: usize,
        channel_mult: Vec<usize>,
        groups: usize,
        attention: bool,
        #[serde(default = "one")]
        in_channels: usize,
    },
}

fn one() -> usize {
    1
}

impl NetConfig {
    pub fn default_mlp(dim: usize) -> Self {
        NetConfig::Mlp {
            dim,
            hidden: 128,
            layers: 3,
            time_dim: 32,
        }
    }

    /// Checks the sizes (before anything of them is built): every size at least 1, the U-Net's
    /// levels fit 28 x 28 images (at most 3: 28, 14, 7), its group count divides every channel
    /// count, and the parameters (weights, gradients, Adam's moments, EMA: 5 f32 copies) fit
    /// the memory budget.
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        match self {
            NetConfig::Mlp {
                dim,
                hidden,
                layers,
                time_dim,
            } => {
                for (name, v) in [
                    ("dim", dim),
                    ("hidden (--channels)", hidden),
                    ("layers", layers),
                ] {
                    if *v == 0 {
                        bail!("MLP {name} must be at least 1");
                    }
                }
                if *time_dim < 2 || time_dim % 2 != 0 {
                    bail!("MLP time_dim must be even and at least 2, got {time_dim}");
                }
                for (name, v) in [
                    ("dim", dim),
                    ("hidden (--channels)", hidden),
                    ("time_dim", time_dim),
                    ("layers", layers),
                ] {
                    if *v > MAX_WIDTH {
                        bail!("MLP {name} {v}: at most {MAX_WIDTH}");
                    }
                }
            }
            NetConfig::Unet {
                base,
                channel_mult,
                groups,
                in_channels,
                ..
            } => {
                if *base == 0 {
                    bail!("U-Net base channels (--channels) must be at least 1");
                }
                if !matches!(in_channels, 1 | 3) {
                    bail!("U-Net in_channels {in_channels}: images have 1 or 3 channels");
                }
                if channel_mult.is_empty() || channel_mult.len() > 6 {
                    bail!("U-Net channel_mult {channel_mult:?}: needs 1 to 6 levels");
                }
                if *groups == 0 {
                    bail!("U-Net groups must be at least 1");
                }
                for &m in channel_mult {
                    if base.saturating_mul(m) > MAX_WIDTH {
                        bail!(
                            "U-Net channels (--channels {base} x channel_mult {m}): at most {MAX_WIDTH}"
                        );
                    }
                    let c = base.checked_mul(m).unwrap_or(0);
                    if m == 0 || c == 0 || c % groups != 0 || base % groups != 0 {
                        bail!(
                            "U-Net channel_mult {channel_mult:?} with base {base}: every channel count must be a positive multiple of groups = {groups}"
                        );
                    }
                }
            }
        }
        let what = match self {
            NetConfig::Mlp { hidden, .. } => format!("--channels {hidden}"),
            NetConfig::Unet { base, .. } => format!("--channels {base}"),
        };
        crate::limits::check_bytes(
            &what,
            "the network's parameters with their gradients, Adam's moments and EMA",
            self.parameter_count().and_then(|c| c.checked_mul(20)),
        )
    }

    /// The number of parameters, from the shapes the network asks for (nothing allocated);
    /// `None` on overflow. Call after the per-size checks of [`NetConfig::validate`].
    pub fn parameter_count(&self) -> Option<u64> {
        let probe = ShapeProbe::default();
        let vb = VarBuilder::from_backend(Box::new(probe.clone()), DType::F32, Device::Cpu);
        Net::build(self, vb).ok()?;
        if probe.overflow.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        Some(probe.count.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Refuses a batch whose activations (forward and backward) exceed the memory budget;
    /// `pixels` = H x W of the images (ignored by the MLP).
    pub fn check_training_memory(&self, batch: usize, pixels: usize) -> anyhow::Result<()> {
        // Floats kept per example: the U-Net keeps ~16 activations of base * sum(mult)
        // channels at H x W (an upper estimate); the MLP a few of its width.
        let per_example = match self {
            NetConfig::Mlp { hidden, layers, .. } => {
                crate::limits::product(&[*hidden as u64, *layers as u64 + 1, 8])
            }
            NetConfig::Unet {
                base, channel_mult, ..
            } => {
                let mult: u64 = channel_mult.iter().map(|&m| m as u64).sum();
                crate::limits::product(&[*base as u64, mult, pixels as u64, 16])
            }
        };
        crate::limits::check_bytes(
            &format!("--batch-size {batch}"),
            "the activations of one training step",
            per_example.and_then(|p| crate::limits::product(&[p, batch as u64, 4])),
        )
    }

    pub fn default_unet() -> Self {
        NetConfig::Unet {
            base: 16,
            channel_mult: vec![1, 2, 2],
            groups: 8,
            attention: true,
            in_channels: 1,
        }
    }
}

/// The largest channel count or width a network may ask for (2^24): every parameter count
/// then fits in u64 before the memory check refuses it.
pub const MAX_WIDTH: usize = 1 << 24;

/// A `VarBuilder` backend that records how many parameters a network asks for and hands out
/// broadcast zeros (one element of memory) in their place.
#[derive(Clone, Default)]
struct ShapeProbe {
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    overflow: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl candle_nn::var_builder::SimpleBackend for ShapeProbe {
    fn get(
        &self,
        s: candle_core::Shape,
        _name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        use std::sync::atomic::Ordering;
        match crate::limits::product(&s.dims().iter().map(|&d| d as u64).collect::<Vec<_>>())
            .and_then(|n| n.checked_add(self.count.load(Ordering::Relaxed)))
        {
            Some(total) => self.count.store(total, Ordering::Relaxed),
            None => self.overflow.store(true, Ordering::Relaxed),
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape probe: {name} has no shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

pub struct Mlp {
    time_dim: usize,
    layers: Vec<Linear>,
}

impl Mlp {
    fn new(
        dim: usize,
        hidden: usize,
        layers: usize,
        time_dim: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let mut ls = Vec::new();
        let mut input = dim + time_dim;
        for i in 0..layers {
            ls.push(candle_nn::linear(input, hidden, vb.pp(format!("net.{i}")))?);
            input = hidden;
        }
        ls.push(candle_nn::linear(
            hidden,
            dim,
            vb.pp(format!("net.{layers}")),
        )?);
        Ok(Self {
            time_dim,
            layers: ls,
        })
    }
}

impl Denoiser for Mlp {
    fn forward(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        let emb = timestep_embedding(t, self.time_dim)?;
        let mut h = Tensor::cat(&[xt, &emb], D::Minus1)?;
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i < last {
                h = candle_nn::ops::silu(&h)?;
            }
        }
        Ok(h)
    }
}

/// A k x k convolution with padding k / 2 (see [`super::conv`]).
fn conv(
    i: usize,
    o: usize,
    k: usize,
    stride: usize,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    Conv2d::new(i, o, k, stride, vb)
}

/// GroupNorm -> SiLU -> conv3x3, + time projection, GroupNorm -> SiLU -> conv3x3, + skip.
pub(crate) struct ResBlock {
    pub(crate) norm1: GroupNorm,
    pub(crate) conv1: Conv2d,
    pub(crate) time: Linear,
    pub(crate) norm2: GroupNorm,
    pub(crate) conv2: Conv2d,
    pub(crate) skip: Option<Conv2d>,
}

impl ResBlock {
    fn new(
        i: usize,
        o: usize,
        temb: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(groups, i, 1e-5, vb.pp("norm1"))?,
            conv1: conv(i, o, 3, 1, vb.pp("conv1"))?,
            time: candle_nn::linear(temb, o, vb.pp("time_emb_proj"))?,
            norm2: GroupNorm::new(groups, o, 1e-5, vb.pp("norm2"))?,
            conv2: conv(o, o, 3, 1, vb.pp("conv2"))?,
            skip: if i != o {
                Some(conv(i, o, 1, 1, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor, temb: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let t = self.time.forward(temb)?.unsqueeze(2)?.unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.skip {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        h + skip
    }
}

/// Single-head self-attention over the pixels of a feature map, with a residual.
pub(crate) struct Attention {
    pub(crate) norm: GroupNorm,
    pub(crate) qkv: Conv2d,
    pub(crate) proj: Conv2d,
}

impl Attention {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(groups, c, 1e-5, vb.pp("norm"))?,
            qkv: conv(c, 3 * c, 1, 1, vb.pp("qkv"))?,
            proj: conv(c, c, 1, 1, vb.pp("proj_out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let qkv = self
            .qkv
            .forward(&self.norm.forward(x)?)?
            .reshape((b, 3, c, h * w))?;
        let q = qkv
            .narrow(1, 0, 1)?
            .squeeze(1)?
            .transpose(1, 2)?
            .contiguous()?; // [B, HW, C]
        let k = qkv.narrow(1, 1, 1)?.squeeze(1)?.contiguous()?; // [B, C, HW]
        let v = qkv
            .narrow(1, 2, 1)?
            .squeeze(1)?
            .transpose(1, 2)?
            .contiguous()?; // [B, HW, C]
        // candle_nn's `softmax_last_dim` has no backward pass (its gradient is silently
        // dropped, so q and k would never train): the composed softmax differentiates.
        let att = candle_nn::ops::softmax(&(q.matmul(&k)? / (c as f64).sqrt())?, D::Minus1)?;
        let out = att.matmul(&v)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        x + self.proj.forward(&out)?
    }
}

/// A small U-Net for 28x28: one residual block per level, stride-2 conv down, nearest-neighbour
/// up + conv, skip connections by concatenation, attention at the lowest resolution.
pub struct UNet {
    pub(crate) base: usize,
    pub(crate) time1: Linear,
    pub(crate) time2: Linear,
    pub(crate) conv_in: Conv2d,
    pub(crate) down: Vec<ResBlock>,
    pub(crate) downsample: Vec<Conv2d>,
    pub(crate) mid1: ResBlock,
    pub(crate) attn: Option<Attention>,
    pub(crate) mid2: ResBlock,
    pub(crate) up: Vec<ResBlock>,
    pub(crate) upsample: Vec<Conv2d>,
    pub(crate) norm_out: GroupNorm,
    pub(crate) conv_out: Conv2d,
}

impl UNet {
    fn new(
        base: usize,
        mult: &[usize],
        groups: usize,
        attention: bool,
        in_channels: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let temb = 4 * base;
        let chans: Vec<usize> = mult.iter().map(|m| m * base).collect();
        let mut down = Vec::new();
        let mut downsample = Vec::new();
        let mut prev = base;
        for (i, &c) in chans.iter().enumerate() {
            down.push(ResBlock::new(
                prev,
                c,
                temb,
                groups,
                vb.pp(format!("down.{i}.res")),
            )?);
            if i + 1 < chans.len() {
                downsample.push(conv(c, c, 3, 2, vb.pp(format!("down.{i}.downsample")))?);
            }
            prev = c;
        }
        let deepest = *chans.last().expect("at least one level");
        let mid1 = ResBlock::new(deepest, deepest, temb, groups, vb.pp("mid.res1"))?;
        let attn = if attention {
            Some(Attention::new(deepest, groups, vb.pp("mid.attn"))?)
        } else {
            None
        };
        let mid2 = ResBlock::new(deepest, deepest, temb, groups, vb.pp("mid.res2"))?;
        let mut up = Vec::new();
        let mut upsample = Vec::new();
        for (i, &c) in chans.iter().enumerate().rev() {
            let out = if i == 0 { base } else { chans[i - 1] };
            up.push(ResBlock::new(
                prev + c,
                out,
                temb,
                groups,
                vb.pp(format!("up.{i}.res")),
            )?);
            if i > 0 {
                upsample.push(conv(out, out, 3, 1, vb.pp(format!("up.{i}.upsample")))?);
            }
            prev = out;
        }
        Ok(Self {
            base,
            time1: candle_nn::linear(base, temb, vb.pp("time_embedding.linear_1"))?,
            time2: candle_nn::linear(temb, temb, vb.pp("time_embedding.linear_2"))?,
            conv_in: conv(in_channels, base, 3, 1, vb.pp("conv_in"))?,
            down,
            downsample,
            mid1,
            attn,
            mid2,
            up,
            upsample,
            norm_out: GroupNorm::new(groups, base, 1e-5, vb.pp("norm_out"))?,
            conv_out: conv(base, in_channels, 3, 1, vb.pp("conv_out"))?,
        })
    }
}

impl UNet {
    /// Whether the parameters are variables (a network being trained).
    pub fn is_trainable(&self) -> bool {
        self.conv_in.parts().0.is_variable()
    }

    /// The forward pass through candle's ops (what autodiff records).
    pub fn forward_candle(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        let emb = timestep_embedding(t, self.base)?;
        let temb = self
            .time2
            .forward(&candle_nn::ops::silu(&self.time1.forward(&emb)?)?)?;
        let temb_act = candle_nn::ops::silu(&temb)?;
        let mut h = self.conv_in.forward(xt)?;
        let mut skips = Vec::new();
        for (i, block) in self.down.iter().enumerate() {
            h = block.forward(&h, &temb_act)?;
            skips.push(h.clone());
            if let Some(ds) = self.downsample.get(i) {
                h = ds.forward(&h)?;
            }
        }
        h = self.mid1.forward(&h, &temb_act)?;
        if let Some(a) = &self.attn {
            h = a.forward(&h)?;
        }
        h = self.mid2.forward(&h, &temb_act)?;
        for (j, block) in self.up.iter().enumerate() {
            let skip = skips.pop().expect("one skip per level");
            h = block.forward(&Tensor::cat(&[&h, &skip], 1)?, &temb_act)?;
            if let Some(us) = self.upsample.get(j) {
                let (_, _, hh, ww) = h.dims4()?;
                let target = skips
                    .last()
                    .map(|s| s.dims4())
                    .transpose()?
                    .map(|d| (d.2, d.3))
                    .unwrap_or((2 * hh, 2 * ww));
                h = us.forward(&h.upsample_nearest2d(target.0, target.1)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

impl Denoiser for UNet {
    /// candle's ops (any device, autodiff); the fused CPU engine is chosen by the caller
    /// (`engine::FrozenNet`, `engine::unet_training`).
    fn forward(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_candle(xt, t)
    }
}

/// A denoiser of either kind.
pub enum Net {
    Mlp(Mlp),
    Unet(Box<UNet>),
}

impl Denoiser for Net {
    fn forward(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Net::Mlp(m) => m.forward(xt, t),
            Net::Unet(u) => u.forward(xt, t),
        }
    }
}

impl Net {
    pub fn build(config: &NetConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match config {
            NetConfig::Mlp {
                dim,
                hidden,
                layers,
                time_dim,
            } => Net::Mlp(Mlp::new(*dim, *hidden, *layers, *time_dim, vb)?),
            NetConfig::Unet {
                base,
                channel_mult,
                groups,
                attention,
                in_channels,
            } => Net::Unet(Box::new(UNet::new(
                *base,
                channel_mult,
                *groups,
                *attention,
                *in_channels,
                vb,
            )?)),
        })
    }

    /// A trainable network: its parameters live in the returned `VarMap`, initialised as
    /// PyTorch does (weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); GroupNorm
    /// scale 1, shift 0), from the seeded `noise` in name order, so a seed fixes the network.
    pub fn trainable(
        config: &NetConfig,
        noise: &mut Noise,
        device: &Device,
    ) -> Result<(Self, VarMap)> {
        let varmap = VarMap::new();
        let net = Self::build(config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        let vars = sorted_vars(&varmap);
        let shapes: HashMap<String, Vec<usize>> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect();
        for (name, var) in &vars {
            let n = var.elem_count();
            let is_norm = name.split('.').any(|p| p.starts_with("norm"));
            let values: Vec<f32> = if is_norm {
                vec![if name.ends_with("weight") { 1.0 } else { 0.0 }; n]
            } else {
                let weight = shapes
                    .get(&name.replace(".bias", ".weight"))
                    .unwrap_or(&shapes[name]);
                let fan_in: usize = weight[1..].iter().product::<usize>().max(1);
                let bound = 1.0 / (fan_in as f32).sqrt();
                (0..n)
                    .map(|_| noise.rng.random_range(-bound..bound))
                    .collect()
            };
            var.set(&Tensor::from_vec(values, var.shape(), device)?)?;
        }
        Ok((net, varmap))
    }
}

/// The variables of a `VarMap`, sorted by name.
pub fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
