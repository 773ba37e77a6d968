//! Denoisers eps_theta(x_t, t): a time-conditioned MLP for 2-D data and a small U-Net for
//! 28x28 images (Ho et al. 2020, scaled down). Both are built through a candle `VarBuilder`,
//! so parameter names are stable checkpoint keys.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{D, DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder, VarMap};

use crate::nn::modules::conv::Conv2d;
use crate::nn::modules::group_norm::GroupNorm;
use rand::Rng;

use super::process::Denoiser;
use crate::distributions::Noise;

/// Sinusoidal timestep embedding (Vaswani et al. 2017, as in DDPM / improved-diffusion):
/// `[cos(t f_i), sin(t f_i)]`, f_i = 10000^{-i/half}. `t` `[B]` -> `[B, dim]` (dim even).
pub fn timestep_embedding(t: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    timestep_embedding_with(t, dim, &UnetOptions::default())
}

/// The embedding with a U-Net's options: frequencies `10000^{-i/(half - freq_shift)}`, cosines
/// first when `flip_sin_to_cos` (diffusers' `get_timestep_embedding`).
pub fn timestep_embedding_with(
    t: &Tensor,
    dim: usize,
    o: &UnetOptions,
) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let freqs = crate::nn::embedding::sinusoid_frequencies_shifted(dim, o.freq_shift);
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    match o.flip_sin_to_cos {
        true => Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1),
        false => Tensor::cat(&[args.sin()?, args.cos()?], D::Minus1),
    }
}

/// Details of a U-Net that elbo's own nets leave at their defaults and checkpoints of other
/// projects set (diffusers' `UNet2DModel` and improved-diffusion's flag names): the timestep
/// embedding's order and frequency shift, the GroupNorm epsilon, the downsampling
/// convolutions' padding (1: symmetric; 0: diffusers' and DDPM's "SAME" padding, one row and
/// column of zeros after the image, then no padding), attention heads, scale-shift norm and
/// the output channels (2C for learned variances).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct UnetOptions {
    pub flip_sin_to_cos: bool,
    pub freq_shift: usize,
    pub norm_eps: f64,
    pub downsample_padding: usize,
    /// Attention heads of the down path and the middle block (improved-diffusion
    /// `--num_heads`).
    #[serde(skip_serializing_if = "is_one")]
    pub heads: usize,
    /// Attention heads of the up path; 0: `heads` (improved-diffusion `--num_heads_upsample`).
    #[serde(skip_serializing_if = "is_zero_usize")]
    pub heads_up: usize,
    /// Channels per head, overriding `heads` where set (guided-diffusion
    /// `--num_head_channels`; diffusers' `attention_head_dim`).
    #[serde(skip_serializing_if = "is_zero_usize")]
    pub head_channels: usize,
    /// FiLM conditioning of the residual blocks (improved-diffusion `--use_scale_shift_norm`):
    /// the time projection gives `[scale; shift]` (2 x channels) and the second norm becomes
    /// `gn2(h) (1 + scale) + shift` in place of `gn2(h + time)`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub scale_shift: bool,
    /// Channels out of `conv_out`; 0: as many as in. 2C: the second C are the variance
    /// interpolation of learned variances (improved DDPM eq. 15).
    #[serde(skip_serializing_if = "is_zero_usize")]
    pub out_channels: usize,
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

fn is_zero_usize(v: &usize) -> bool {
    *v == 0
}

impl Default for UnetOptions {
    fn default() -> Self {
        Self {
            flip_sin_to_cos: true,
            freq_shift: 0,
            norm_eps: 1e-5,
            downsample_padding: 1,
            heads: 1,
            heads_up: 0,
            head_channels: 0,
            scale_shift: false,
            out_channels: 0,
        }
    }
}

impl UnetOptions {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The attention heads at `c` channels (`up`: on the up path), checked to divide `c`.
    pub fn heads_at(&self, c: usize, up: bool) -> anyhow::Result<usize> {
        let heads = match (self.head_channels, up && self.heads_up > 0) {
            (0, true) => self.heads_up,
            (0, false) => self.heads,
            (hc, _) => c / hc.max(1),
        };
        if heads == 0
            || !c.is_multiple_of(heads)
            || (self.head_channels > 0 && !c.is_multiple_of(self.head_channels))
        {
            anyhow::bail!(
                "attention at {c} channels does not split into heads (heads {}, heads_up {}, head_channels {})",
                self.heads,
                self.heads_up,
                self.head_channels
            );
        }
        Ok(heads)
    }

    /// The channels `conv_out` gives for `in_channels` in.
    pub fn out_channels(&self, in_channels: usize) -> usize {
        match self.out_channels {
            0 => in_channels,
            n => n,
        }
    }
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
        /// Self-attention between the middle block's two residual blocks.
        attention: bool,
        #[serde(default = "one")]
        in_channels: usize,
        /// DDPM's layout (Ho et al. 2020, appendix B): `res_blocks` residual blocks per level
        /// on the way down and `res_blocks + 1` on the way up, a skip connection after
        /// `conv_in`, every block and every downsampling. Absent: elbo's compact layout, one
        /// block per level each way and one skip per level.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        res_blocks: Option<usize>,
        /// The levels (0 = full resolution, i = H / 2^i) whose residual blocks are each
        /// followed by self-attention (DDPM layout; DDPM's CIFAR-10 net: level 1, 16 x 16).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        attention_levels: Vec<usize>,
        /// Dropout probability before each residual block's second convolution, in training.
        #[serde(default, skip_serializing_if = "is_zero")]
        dropout: f32,
        /// What checkpoints of other projects set differently ([`UnetOptions`]).
        #[serde(default, skip_serializing_if = "UnetOptions::is_default")]
        options: UnetOptions,
    },
}

fn one() -> usize {
    1
}

fn is_zero(v: &f32) -> bool {
    *v == 0.0
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
                res_blocks,
                attention_levels,
                dropout,
                attention,
                options,
            } => {
                if let Some(n) = res_blocks
                    && !(1..=8).contains(n)
                {
                    bail!("--res-blocks {n}: the U-Net's residual blocks per level must be 1 to 8");
                }
                if let Some(l) = attention_levels.iter().find(|&&l| l >= channel_mult.len()) {
                    bail!(
                        "U-Net attention level {l} (--attention-levels): the net has levels 0 to {}",
                        channel_mult.len().saturating_sub(1)
                    );
                }
                if !(0.0..1.0).contains(dropout) {
                    bail!("U-Net dropout (--dropout) must be in [0, 1), got {dropout}");
                }
                if *base == 0 {
                    bail!("U-Net base channels (--channels) must be at least 1");
                }
                // The sinusoidal time embedding is `base` wide: half cosines, half sines.
                if base % 2 != 0 {
                    bail!(
                        "--channels {base}: the U-Net's base width must be divisible by 2 (its sinusoidal time embedding is half cosines, half sines)"
                    );
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
                let o = options.out_channels;
                if o != 0 && o != *in_channels && o != 2 * in_channels {
                    bail!(
                        "U-Net out_channels {o}: C = {in_channels} (the prediction) or 2C (with learned variances) expected"
                    );
                }
                let c_mid = base * channel_mult.last().copied().unwrap_or(1);
                if *attention {
                    options.heads_at(c_mid, false)?;
                }
                for &l in attention_levels {
                    let c = base * channel_mult[l];
                    options.heads_at(c, false)?;
                    options.heads_at(c, true)?;
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
            res_blocks: None,
            attention_levels: Vec::new(),
            dropout: 0.0,
            options: UnetOptions::default(),
        }
    }

    /// DDPM's CIFAR-10 U-Net (Ho et al. 2020, appendix B) at base width `base` (theirs: 128):
    /// channel multipliers 1, 2, 2, 2, two residual blocks per level, self-attention at
    /// 16 x 16 and in the middle, dropout 0.1, GroupNorm with 32 groups (fewer when `base`
    /// has no multiple of 32).
    pub fn ddpm_cifar10(base: usize, in_channels: usize) -> Self {
        NetConfig::Unet {
            base,
            channel_mult: vec![1, 2, 2, 2],
            groups: gcd(base, 32),
            attention: true,
            in_channels,
            res_blocks: Some(2),
            attention_levels: vec![1],
            dropout: 0.1,
            options: UnetOptions::default(),
        }
    }
}

/// The greatest common divisor (the GroupNorm group count that divides a channel count).
pub fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
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

/// A k x k convolution with padding k / 2 (see [`crate::nn::modules::conv`]).
fn conv(
    i: usize,
    o: usize,
    k: usize,
    stride: usize,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    Conv2d::new(i, o, k, stride, vb)
}

/// GroupNorm -> SiLU -> conv3x3, + time projection, GroupNorm -> SiLU -> conv3x3, + skip;
/// with `scale_shift` the time projection `[scale; shift]` modulates the second norm instead:
/// `silu(gn2(h) (1 + scale) + shift)` (improved-diffusion's `use_scale_shift_norm`).
#[derive(Clone)]
pub(crate) struct ResBlock {
    pub(crate) norm1: GroupNorm,
    pub(crate) conv1: Conv2d,
    pub(crate) time: Linear,
    pub(crate) norm2: GroupNorm,
    pub(crate) conv2: Conv2d,
    pub(crate) skip: Option<Conv2d>,
    pub(crate) scale_shift: bool,
}

impl ResBlock {
    fn new(
        (i, o, temb): (usize, usize, usize),
        groups: usize,
        o_opts: &UnetOptions,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let eps = o_opts.norm_eps;
        let scale_shift = o_opts.scale_shift;
        let time_out = if scale_shift { 2 * o } else { o };
        Ok(Self {
            scale_shift,
            norm1: GroupNorm::new(groups, i, eps, vb.pp("norm1"))?,
            conv1: conv(i, o, 3, 1, vb.pp("conv1"))?,
            time: candle_nn::linear(temb, time_out, vb.pp("time_emb_proj"))?,
            norm2: GroupNorm::new(groups, o, eps, vb.pp("norm2"))?,
            conv2: conv(o, o, 3, 1, vb.pp("conv2"))?,
            skip: if i != o {
                Some(conv(i, o, 1, 1, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
        })
    }

    /// `dropout`: (seed, blocks, this block's index, p, the batch's first row) of the training
    /// masks: row `e` of `x` is example `first + e` of the global batch.
    fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        dropout: Option<(u64, u64, u64, f32, usize)>,
    ) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let t = self.time.forward(temb)?.unsqueeze(2)?.unsqueeze(3)?;
        let mut h = if self.scale_shift {
            let o = h.dim(1)?;
            let (scale, shift) = (t.narrow(1, 0, o)?, t.narrow(1, o, o)?);
            let g = self.norm2.forward(&h)?;
            g.broadcast_mul(&(scale + 1.0)?)?
                .broadcast_add(&shift)?
                .silu()?
        } else {
            self.norm2.forward_silu(&h.broadcast_add(&t)?)?
        };
        if let Some((seed, blocks, index, p, first)) = dropout {
            let (b, c, hh, ww) = h.dims4()?;
            let n = c * hh * ww;
            let mut mask = vec![0f32; b * n];
            for (e, m) in mask.chunks_mut(n).enumerate() {
                let stream = (first + e) as u64 * blocks + index;
                crate::nn::dropout::fill_mask(seed, stream, p, m);
            }
            let mask = Tensor::from_vec(mask, (b, c, hh, ww), h.device())?;
            h = (h * mask)?;
        }
        let h = self.conv2.forward(&h)?;
        let skip = match &self.skip {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        h + skip
    }
}

/// Multi-head self-attention over the pixels of a feature map, with a residual. The 1 x 1
/// `qkv` convolution gives `[Q; K; V]`, each `[C, HW]`, and head `i` reads channels
/// `i d..(i + 1) d` of each (d = C / heads):
/// `O_i = V_i softmax(Q_i^T K_i / sqrt(d))^T`, `y = x + proj([O_1; ...; O_heads])`.
#[derive(Clone)]
pub(crate) struct Attention {
    pub(crate) norm: GroupNorm,
    pub(crate) qkv: Conv2d,
    pub(crate) proj: Conv2d,
    pub(crate) heads: usize,
}

impl Attention {
    fn new(
        c: usize,
        groups: usize,
        heads: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if heads == 0 || !c.is_multiple_of(heads) {
            candle_core::bail!("attention: {c} channels do not split into {heads} heads");
        }
        Ok(Self {
            norm: GroupNorm::new(groups, c, eps, vb.pp("norm"))?,
            qkv: conv(c, 3 * c, 1, 1, vb.pp("qkv"))?,
            proj: conv(c, c, 1, 1, vb.pp("proj_out"))?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (nh, d) = (self.heads, c / self.heads);
        let qkv = self
            .qkv
            .forward(&self.norm.forward(x)?)?
            .reshape((b, 3, nh, d, h * w))?;
        let part = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(1, i, 1)?.squeeze(1)?.reshape((b * nh, d, h * w))
        };
        let q = part(0)?.transpose(1, 2)?.contiguous()?; // [B nh, HW, d]
        let k = part(1)?.contiguous()?; // [B nh, d, HW]
        let v = part(2)?.transpose(1, 2)?.contiguous()?; // [B nh, HW, d]
        // candle_nn's `softmax_last_dim` has no backward pass (its gradient is silently
        // dropped, so q and k would never train): the composed softmax differentiates.
        let att = candle_nn::ops::softmax(&(q.matmul(&k)? / (d as f64).sqrt())?, D::Minus1)?;
        let out = att
            .matmul(&v)? // [B nh, HW, d]
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        x + self.proj.forward(&out)?
    }
}

/// One step of a U-Net's body after `conv_in`, in the order the forward pass runs them.
#[derive(Clone)]
pub(crate) enum Stage {
    /// A residual block, then self-attention when `attn` is set. `concat`: the block's input
    /// is the running activation concatenated (channels) with the last skip pushed, which is
    /// popped; `push`: the output is pushed as a skip.
    Res {
        block: Box<ResBlock>,
        attn: Option<Attention>,
        concat: bool,
        push: bool,
    },
    /// A stride-2 3 x 3 convolution; `pad_end`: one row and column of zeros after the image
    /// and no padding in the convolution (TensorFlow's "SAME", DDPM's and diffusers'
    /// `downsample_padding = 0`), else padding 1 on every side.
    Downsample {
        conv: Conv2d,
        push: bool,
        pad_end: bool,
    },
    /// Nearest-neighbour upsampling to the size of the next skip, then a 3 x 3 convolution.
    Upsample { conv: Conv2d },
}

/// The U-Net of DDPM (Ho et al. 2020, appendix B; the PixelCNN++ backbone with
/// self-attention), in two layouts (see [`NetConfig::Unet`]): residual blocks with a timestep
/// embedding, stride-2 convolutions down, nearest-neighbour up + conv, skip connections by
/// concatenation, self-attention in the middle block and at chosen levels, dropout. The body
/// is a list of `Stage`s, which the candle path here and the fused engine
/// (`engine::unet`) both walk.
#[derive(Clone)]
pub struct UNet {
    pub(crate) base: usize,
    /// The timestep embedding's order and shift, the norms' epsilon (checkpoints of other
    /// projects).
    pub(crate) options: UnetOptions,
    pub(crate) time1: Linear,
    pub(crate) time2: Linear,
    pub(crate) conv_in: Conv2d,
    /// Whether `conv_in`'s output is pushed as a skip (DDPM layout).
    pub(crate) push_input: bool,
    pub(crate) stages: Vec<Stage>,
    pub(crate) norm_out: GroupNorm,
    pub(crate) conv_out: Conv2d,
    /// Dropout probability in each residual block (training only).
    pub(crate) dropout: f32,
}

/// The channel counts and options [`UNet::new`] builds from.
struct UnetShape<'a> {
    base: usize,
    mult: &'a [usize],
    groups: usize,
    attention: bool,
    in_channels: usize,
    res_blocks: Option<usize>,
    attention_levels: &'a [usize],
    options: &'a UnetOptions,
}

impl UNet {
    fn new(s: UnetShape, dropout: f32, vb: VarBuilder) -> candle_core::Result<Self> {
        let (base, groups) = (s.base, s.groups);
        let temb = 4 * base;
        let chans: Vec<usize> = s.mult.iter().map(|m| m * base).collect();
        let levels = chans.len();
        let eps = s.options.norm_eps;
        let res = |i, o, name: String| ResBlock::new((i, o, temb), groups, s.options, vb.pp(name));
        let heads = |c: usize, up: bool| {
            s.options
                .heads_at(c, up)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        };
        let attn = |level: usize, c, up: bool, name: String| {
            if s.attention_levels.contains(&level) {
                let h = heads(c, up)?;
                Ok::<_, candle_core::Error>(Some(Attention::new(c, groups, h, eps, vb.pp(name))?))
            } else {
                Ok(None)
            }
        };
        let mut stages = Vec::new();
        let mut prev = base;
        // The channels of each skip pushed, so the up path knows what it concatenates.
        let mut skips = Vec::new();
        let compact = s.res_blocks.is_none();
        let per_level = s.res_blocks.unwrap_or(1);
        if !compact {
            skips.push(base);
        }
        for (i, &c) in chans.iter().enumerate() {
            for j in 0..per_level {
                let name = |what: &str| match compact {
                    true => format!("down.{i}.{what}"),
                    false => format!("down.{i}.{what}.{j}"),
                };
                stages.push(Stage::Res {
                    block: Box::new(res(prev, c, name("res"))?),
                    attn: attn(i, c, false, name("attn"))?,
                    concat: false,
                    push: true,
                });
                skips.push(c);
                prev = c;
            }
            if i + 1 < levels {
                let pad_end = s.options.downsample_padding == 0;
                let name = vb.pp(format!("down.{i}.downsample"));
                stages.push(Stage::Downsample {
                    conv: match pad_end {
                        true => Conv2d::new_padded(c, c, 3, 2, 0, name)?,
                        false => conv(c, c, 3, 2, name)?,
                    },
                    push: !compact,
                    pad_end,
                });
                if !compact {
                    skips.push(c);
                }
            }
        }
        let mid_attn = if s.attention {
            Some(Attention::new(
                prev,
                groups,
                heads(prev, false)?,
                eps,
                vb.pp("mid.attn"),
            )?)
        } else {
            None
        };
        for (name, attn) in [("mid.res1", mid_attn), ("mid.res2", None)] {
            stages.push(Stage::Res {
                block: Box::new(res(prev, prev, name.to_string())?),
                attn,
                concat: false,
                push: false,
            });
        }
        for (i, &c) in chans.iter().enumerate().rev() {
            // The compact layout's up blocks give the next level's channels (base at the
            // top); DDPM's keep the level's own.
            let out = match (compact, i) {
                (true, 0) => base,
                (true, _) => chans[i - 1],
                (false, _) => c,
            };
            for j in 0..per_level + usize::from(!compact) {
                let name = |what: &str| match compact {
                    true => format!("up.{i}.{what}"),
                    false => format!("up.{i}.{what}.{j}"),
                };
                let skip = skips.pop().expect("one skip per up block");
                stages.push(Stage::Res {
                    block: Box::new(res(prev + skip, out, name("res"))?),
                    attn: attn(i, out, true, name("attn"))?,
                    concat: true,
                    push: false,
                });
                prev = out;
            }
            if i > 0 {
                stages.push(Stage::Upsample {
                    conv: conv(prev, prev, 3, 1, vb.pp(format!("up.{i}.upsample")))?,
                });
            }
        }
        Ok(Self {
            base,
            options: s.options.clone(),
            time1: candle_nn::linear(base, temb, vb.pp("time_embedding.linear_1"))?,
            time2: candle_nn::linear(temb, temb, vb.pp("time_embedding.linear_2"))?,
            conv_in: conv(s.in_channels, base, 3, 1, vb.pp("conv_in"))?,
            push_input: !compact,
            stages,
            norm_out: GroupNorm::new(groups, prev, eps, vb.pp("norm_out"))?,
            conv_out: conv(
                prev,
                s.options.out_channels(s.in_channels),
                3,
                1,
                vb.pp("conv_out"),
            )?,
            dropout,
        })
    }

    /// The number of residual blocks (each draws its own dropout mask).
    pub(crate) fn res_blocks(&self) -> usize {
        self.stages
            .iter()
            .filter(|s| matches!(s, Stage::Res { .. }))
            .count()
    }
}

impl UNet {
    /// Whether the parameters are variables (a network being trained).
    pub fn is_trainable(&self) -> bool {
        self.conv_in.parts().0.is_variable()
    }

    /// The forward pass through candle's ops (what autodiff records), without dropout.
    pub fn forward_candle(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_masked(xt, t, None)
    }

    /// The training forward pass: dropout in every residual block with the masks of
    /// [`crate::nn::dropout::fill_mask`] from `seed` (stream = example x blocks + block), the
    /// masks the fused engine draws.
    pub fn forward_dropout(
        &self,
        xt: &Tensor,
        t: &Tensor,
        seed: u64,
    ) -> candle_core::Result<Tensor> {
        self.forward_masked(xt, t, Some((seed, 0)))
    }

    /// [`UNet::forward_dropout`] of rows `first..first + B` of a larger batch: each row gets the
    /// masks of its example in that batch (one rank's share in data-parallel training).
    pub fn forward_dropout_rows(
        &self,
        xt: &Tensor,
        t: &Tensor,
        seed: u64,
        first: usize,
    ) -> candle_core::Result<Tensor> {
        self.forward_masked(xt, t, Some((seed, first)))
    }

    fn forward_masked(
        &self,
        xt: &Tensor,
        t: &Tensor,
        seed: Option<(u64, usize)>,
    ) -> candle_core::Result<Tensor> {
        let emb = timestep_embedding_with(t, self.base, &self.options)?;
        let temb = self
            .time2
            .forward(&candle_nn::ops::silu(&self.time1.forward(&emb)?)?)?;
        let temb_act = candle_nn::ops::silu(&temb)?;
        let mut h = self.conv_in.forward(xt)?;
        let mut skips = Vec::new();
        if self.push_input {
            skips.push(h.clone());
        }
        let blocks = self.res_blocks() as u64;
        let mut block_index = 0u64;
        for stage in &self.stages {
            match stage {
                Stage::Res {
                    block,
                    attn,
                    concat,
                    push,
                } => {
                    if *concat {
                        let skip = skips.pop().expect("one skip per up block");
                        h = Tensor::cat(&[&h, &skip], 1)?;
                    }
                    let dropout = match seed {
                        Some((seed, first)) if self.dropout > 0.0 => {
                            Some((seed, blocks, block_index, self.dropout, first))
                        }
                        _ => None,
                    };
                    h = block.forward(&h, &temb_act, dropout)?;
                    block_index += 1;
                    if let Some(a) = attn {
                        h = a.forward(&h)?;
                    }
                    if *push {
                        skips.push(h.clone());
                    }
                }
                Stage::Downsample {
                    conv,
                    push,
                    pad_end,
                } => {
                    if *pad_end {
                        h = h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
                    }
                    h = conv.forward(&h)?;
                    if *push {
                        skips.push(h.clone());
                    }
                }
                Stage::Upsample { conv } => {
                    let (_, _, hh, ww) = h.dims4()?;
                    let target = skips
                        .last()
                        .map(|s| s.dims4())
                        .transpose()?
                        .map(|d| (d.2, d.3))
                        .unwrap_or((2 * hh, 2 * ww));
                    h = conv.forward(&h.upsample_nearest2d(target.0, target.1)?)?;
                }
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

impl Denoiser for UNet {
    /// candle's ops (any device, autodiff); the fused CPU engine is chosen by the caller
    /// (`engine::FrozenNet`, `engine::unet_training`, which the commands and trainers wrap it in).
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

    /// The U-Net with dropout draws one seed from `rng` for the step's masks.
    fn forward_train(
        &self,
        xt: &Tensor,
        t: &Tensor,
        rng: &mut rand::rngs::StdRng,
    ) -> candle_core::Result<Tensor> {
        self.forward_train_rows(xt, t, rng, 0)
    }
}

impl Net {
    /// [`Denoiser::forward_train`] of rows `first..first + B` of a larger batch: the same draw
    /// from `rng`, and each row gets the dropout masks of its example in that batch (one
    /// rank's share in data-parallel training).
    pub fn forward_train_rows(
        &self,
        xt: &Tensor,
        t: &Tensor,
        rng: &mut rand::rngs::StdRng,
        first: usize,
    ) -> candle_core::Result<Tensor> {
        match self {
            Net::Unet(u) if u.dropout > 0.0 => u.forward_dropout_rows(xt, t, rng.random(), first),
            _ => self.forward(xt, t),
        }
    }

    /// The dropout probability of the network's residual blocks (0 for the MLP).
    pub fn dropout(&self) -> f32 {
        match self {
            Net::Unet(u) => u.dropout,
            _ => 0.0,
        }
    }

    /// [`Net::forward_train_rows`] with the dropout seed drawn already (`None` where there is
    /// no dropout).
    pub fn forward_train_seeded(
        &self,
        xt: &Tensor,
        t: &Tensor,
        seed: Option<u64>,
        first: usize,
    ) -> candle_core::Result<Tensor> {
        match (self, seed) {
            (Net::Unet(u), Some(seed)) if u.dropout > 0.0 => {
                u.forward_dropout_rows(xt, t, seed, first)
            }
            _ => self.forward(xt, t),
        }
    }

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
                res_blocks,
                attention_levels,
                dropout,
                options,
            } => {
                let shape = UnetShape {
                    base: *base,
                    mult: channel_mult,
                    groups: *groups,
                    attention: *attention,
                    in_channels: *in_channels,
                    res_blocks: *res_blocks,
                    attention_levels,
                    options,
                };
                Net::Unet(Box::new(UNet::new(shape, *dropout, vb)?))
            }
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
