//! The U-Net's forward pass on XLA: the denoiser of sampling and of the diffusion bound, one
//! compiled program per batch size, the weights uploaded once and kept on the device.
//!
//! It traces what [`UNet::forward_candle`] computes, module by module (both layouts, the
//! residual blocks with their timestep projection or scale-shift norm, multi-head
//! self-attention, stride-2 downsampling with either padding, nearest upsampling, the skip
//! concatenations, GroupNorm + SiLU, 2C output channels for learned variances):
//!
//! ```text
//! emb   = sinusoid(t)                      [B, base]   (computed on the host, as candle does)
//! temb  = SiLU(W2 SiLU(W1 emb + b1) + b2)  [B, 4 base]
//! h     = conv_in(x_t); stages; eps_hat = conv_out(SiLU(GroupNorm(h)))
//! GroupNorm(x) = (x - mean_g) / sqrt(var_g + eps) gamma + beta   (biased variance per group)
//! attention: O_i = softmax(Q_i^T K_i / sqrt(d)) V_i^T per head, y = x + proj(O)
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Result, bail, ensure};
use candle_core::{DType, Tensor};

use super::graph::{Conv, Graph, T};
use super::pjrt::{Buffer, Executable, Runtime};
use crate::diffusion::nets::{Attention, ResBlock, Stage, UNet, timestep_embedding_with};
use crate::nn::modules::conv::Conv2d;
use crate::nn::modules::group_norm::GroupNorm;

/// The network's tensors as they are read, each given its place in one flat buffer.
struct Weights {
    flat: T,
    values: Vec<f32>,
    /// Whether `values` is being filled (the first trace) or only checked.
    collect: bool,
    at: usize,
}

impl Weights {
    fn take(&mut self, g: &mut Graph, t: &Tensor) -> Result<T> {
        let shape = t.dims().to_vec();
        let n: usize = shape.iter().product();
        if self.collect {
            // The first trace only reads the weights and checks the shapes.
            self.values
                .extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            self.at += n;
            return Ok(g.constant(0.0, &shape));
        }
        ensure!(
            self.at + n <= self.values.len(),
            "XLA U-Net: the network's tensors changed between traces"
        );
        let s = g.slice(self.flat, self.at, n)?;
        self.at += n;
        g.reshape(s, &shape)
    }
}

/// Traces the forward pass of `net` on `b` examples of `c x h x w`; returns the graph and
/// its output. Inputs: the flat weights `[P]`, `x_t` `[b, c, h, w]`, the timestep embedding
/// `[b, base]`. With `values` empty the weights are collected into it.
fn trace(
    net: &UNet,
    b: usize,
    chw: (usize, usize, usize),
    values: &mut Vec<f32>,
) -> Result<(Graph, T)> {
    let mut g = Graph::new();
    let collect = values.is_empty();
    let len = if collect { 0 } else { values.len() };
    // The flat input's size is known only after the first trace: trace twice then.
    let flat = g.input(&[len.max(1)]);
    let mut w = Weights {
        flat,
        values: std::mem::take(values),
        collect,
        at: 0,
    };
    let (c, h, wd) = chw;
    let x = g.input(&[b, c, h, wd]);
    let emb = g.input(&[b, net.base]);
    let result = forward(&mut g, &mut w, net, x, emb);
    *values = w.values;
    let out = result?;
    ensure!(
        w.at == values.len(),
        "XLA U-Net: {} of {} weights read",
        w.at,
        values.len()
    );
    Ok((g, out))
}

fn forward(g: &mut Graph, w: &mut Weights, net: &UNet, x: T, emb: T) -> Result<T> {
    let t1 = linear(g, w, &net.time1, emb)?;
    let t1 = silu(g, t1)?;
    let temb = linear(g, w, &net.time2, t1)?;
    let temb_act = silu(g, temb)?;
    let mut h = conv(g, w, &net.conv_in, x, None)?;
    let mut skips = Vec::new();
    if net.push_input {
        skips.push(h);
    }
    for stage in &net.stages {
        match stage {
            Stage::Res {
                block,
                attn,
                concat,
                push,
            } => {
                if *concat {
                    let Some(skip) = skips.pop() else {
                        bail!("XLA U-Net: an up block without a skip");
                    };
                    h = g.join(&[h, skip], 1)?;
                }
                h = res_block(g, w, block, h, temb_act)?;
                if let Some(a) = attn {
                    h = attention(g, w, a, h)?;
                }
                if *push {
                    skips.push(h);
                }
            }
            Stage::Downsample {
                conv: c,
                push,
                pad_end,
            } => {
                h = conv(g, w, c, h, pad_end.then_some([(0, 1), (0, 1)]))?;
                if *push {
                    skips.push(h);
                }
            }
            Stage::Upsample { conv: c } => {
                let s = g.shape(h).to_vec();
                let target = skips.last().map(|&k| {
                    let ks = g.shape(k);
                    (ks[2], ks[3])
                });
                let (th, tw) = target.unwrap_or((2 * s[2], 2 * s[3]));
                ensure!(
                    th == 2 * s[2] && tw == 2 * s[3],
                    "XLA U-Net: upsampling {}x{} to {th}x{tw} (only 2x)",
                    s[2],
                    s[3]
                );
                // Nearest: each pixel repeated 2 x 2.
                let up = g.broadcast(h, &[0, 1, 2, 4], &[s[0], s[1], s[2], 2, s[3], 2])?;
                let up = g.reshape(up, &[s[0], s[1], th, tw])?;
                h = conv(g, w, c, up, None)?;
            }
        }
    }
    let n = group_norm(g, w, &net.norm_out, h)?;
    let n = silu(g, n)?;
    conv(g, w, &net.conv_out, n, None)
}

fn silu(g: &mut Graph, a: T) -> Result<T> {
    let s = g.sigmoid(a);
    g.mul(a, s)
}

/// `x W^T + b`, `x` `[B, in]`.
fn linear(g: &mut Graph, w: &mut Weights, l: &candle_nn::Linear, x: T) -> Result<T> {
    let Some(bias) = l.bias() else {
        bail!("XLA U-Net: a linear layer without a bias");
    };
    let wt = w.take(g, l.weight())?;
    let bt = w.take(g, bias)?;
    let y = g.dot(x, wt, 1, 1)?;
    let shape = g.shape(y).to_vec();
    let bb = g.broadcast(bt, &[1], &shape)?;
    g.add(y, bb)
}

/// The convolution with its bias; `pad_end`: padding (low, high) per spatial dimension in
/// place of the layer's own.
fn conv(
    g: &mut Graph,
    w: &mut Weights,
    c: &Conv2d,
    x: T,
    pad_end: Option<[(i64, i64); 2]>,
) -> Result<T> {
    let (weight, bias, stride) = c.parts();
    let wt = w.take(g, weight)?;
    let bt = w.take(g, bias)?;
    let mut spec = Conv::nchw(stride, c.padding());
    if let Some(p) = pad_end {
        spec.pad = p;
    }
    let y = g.conv(x, wt, spec)?;
    let shape = g.shape(y).to_vec();
    let bb = g.broadcast(bt, &[1], &shape)?;
    g.add(y, bb)
}

/// GroupNorm over `[B, C, H, W]`: per example and group of C / G channels, the mean and the
/// biased variance over the group's values; then the per-channel scale and shift.
fn group_norm(g: &mut Graph, w: &mut Weights, n: &GroupNorm, x: T) -> Result<T> {
    let (gamma, beta, groups, eps) = n.parts();
    let s = g.shape(x).to_vec();
    let (b, c) = (s[0], s[1]);
    let per = c / groups * s[2] * s[3];
    let r = g.reshape(x, &[b, groups, per])?;
    let sum = g.sum(r, &[2])?;
    let mean = g.scale(sum, 1.0 / per as f32)?;
    let mb = g.broadcast(mean, &[0, 1], &[b, groups, per])?;
    let d = g.sub(r, mb)?;
    let d2 = g.mul(d, d)?;
    let v = g.sum(d2, &[2])?;
    let var = g.scale(v, 1.0 / per as f32)?;
    let ve = g.offset(var, eps as f32)?;
    let sd = g.sqrt(ve);
    let sdb = g.broadcast(sd, &[0, 1], &[b, groups, per])?;
    let xh = g.div(d, sdb)?;
    let xh = g.reshape(xh, &s)?;
    let gt = w.take(g, gamma)?;
    let bt = w.take(g, beta)?;
    let gb = g.broadcast(gt, &[1], &s)?;
    let bb = g.broadcast(bt, &[1], &s)?;
    let y = g.mul(xh, gb)?;
    g.add(y, bb)
}

fn res_block(g: &mut Graph, w: &mut Weights, r: &ResBlock, x: T, temb: T) -> Result<T> {
    let n1 = group_norm(g, w, &r.norm1, x)?;
    let n1 = silu(g, n1)?;
    let h = conv(g, w, &r.conv1, n1, None)?;
    let t = linear(g, w, &r.time, temb)?;
    let s = g.shape(h).to_vec();
    let o = s[1];
    let h = if r.scale_shift {
        let scale = g.narrow(t, 1, 0, o)?;
        let shift = g.narrow(t, 1, o, o)?;
        let n2 = group_norm(g, w, &r.norm2, h)?;
        let scale1 = g.offset(scale, 1.0)?;
        let sb = g.broadcast(scale1, &[0, 1], &s)?;
        let hb = g.broadcast(shift, &[0, 1], &s)?;
        let y = g.mul(n2, sb)?;
        let y = g.add(y, hb)?;
        silu(g, y)?
    } else {
        let tb = g.broadcast(t, &[0, 1], &s)?;
        let y = g.add(h, tb)?;
        let n2 = group_norm(g, w, &r.norm2, y)?;
        silu(g, n2)?
    };
    let h = conv(g, w, &r.conv2, h, None)?;
    let skip = match &r.skip {
        Some(c) => conv(g, w, c, x, None)?,
        None => x,
    };
    g.add(h, skip)
}

fn attention(g: &mut Graph, w: &mut Weights, a: &Attention, x: T) -> Result<T> {
    let s = g.shape(x).to_vec();
    let (b, c, hw) = (s[0], s[1], s[2] * s[3]);
    let (nh, d) = (a.heads, c / a.heads);
    let n = group_norm(g, w, &a.norm, x)?;
    let qkv = conv(g, w, &a.qkv, n, None)?;
    let qkv = g.reshape(qkv, &[b, 3, nh, d, hw])?;
    let part = |g: &mut Graph, i: usize| -> Result<T> {
        let p = g.narrow(qkv, 1, i, 1)?;
        g.reshape(p, &[b * nh, d, hw])
    };
    let q = part(g, 0)?;
    let k = part(g, 1)?;
    let v = part(g, 2)?;
    let qt = g.transpose(q, &[0, 2, 1])?; // [B nh, HW, d]
    let scores = g.batch_dot(qt, k)?; // [B nh, HW, HW]
    let scores = g.scale(scores, 1.0 / (d as f32).sqrt())?;
    let att = g.softmax_last(scores)?;
    let vt = g.transpose(v, &[0, 2, 1])?; // [B nh, HW, d]
    let out = g.batch_dot(att, vt)?; // [B nh, HW, d]
    let out = g.transpose(out, &[0, 2, 1])?; // [B nh, d, HW]
    let out = g.reshape(out, &[b, c, s[2], s[3]])?;
    let p = conv(g, w, &a.proj, out, None)?;
    g.add(x, p)
}

/// The U-Net's forward pass on XLA: one program per batch size, the weights resident.
pub struct XlaUnet {
    runtime: Arc<Runtime>,
    base: usize,
    options: crate::diffusion::nets::UnetOptions,
    /// The network is kept to trace it again for another batch size.
    net: UNet,
    weights: Buffer,
    len: usize,
    out_channels: usize,
    compiled: HashMap<(usize, usize, usize, usize), Executable>,
}

impl XlaUnet {
    /// The forward pass of `net` on `runtime`, its weights uploaded.
    pub fn new(net: &UNet, runtime: Arc<Runtime>) -> Result<Self> {
        let mut values = Vec::new();
        // One trace on one image collects the weights in the order they are read: an image
        // that halves down to 2 x 2.
        let c = net.conv_in.parts().0.dim(1)?;
        let downs = net
            .stages
            .iter()
            .filter(|s| matches!(s, Stage::Downsample { .. }))
            .count();
        let side = 2usize << downs.min(10);
        trace(net, 1, (c, side, side), &mut values)?;
        let len = values.len();
        let weights = runtime.upload(&values, &[len])?;
        Ok(Self {
            base: net.base,
            options: net.options.clone(),
            out_channels: net.conv_out.parts().0.dim(0)?,
            net: net.clone(),
            weights,
            len,
            runtime,
            compiled: HashMap::new(),
        })
    }

    /// The output channels (C, or 2C with learned variances).
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// `eps_hat(x_t, t)` for `x_t` `[B, C, H, W]` and `t` `[B]` (any float tensors on any
    /// device); the result is on `x_t`'s device.
    pub fn forward(&mut self, xt: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xt.dims4()?;
        let key = (b, c, h, w);
        if !self.compiled.contains_key(&key) {
            let mut values = vec![0f32; self.len];
            let (g, out) = trace(&self.net, b, (c, h, w), &mut values)?;
            let text = g.to_stablehlo(&[out])?;
            self.compiled.insert(key, self.runtime.compile(&text, 1)?);
        }
        let cpu = candle_core::Device::Cpu;
        let t = t.to_device(&cpu)?.to_dtype(DType::F32)?;
        let emb = timestep_embedding_with(&t, self.base, &self.options)?;
        let emb = emb.flatten_all()?.to_vec1::<f32>()?;
        let x = xt
            .to_device(&cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let xb = self.runtime.upload(&x, &[b, c, h, w])?;
        let eb = self.runtime.upload(&emb, &[b, self.base])?;
        let out = self.compiled[&key].run(&[&self.weights, &xb, &eb])?;
        let y = out[0].to_vec(b * self.out_channels * h * w)?;
        Ok(Tensor::from_vec(y, (b, self.out_channels, h, w), &cpu)?
            .to_device(xt.device())?
            .to_dtype(xt.dtype())?)
    }
}
