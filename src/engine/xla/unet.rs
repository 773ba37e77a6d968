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
use candle_core::{DType, Tensor, Var};

use super::graph::{Conv, Graph, T, Unary};
use super::pjrt::{Buffer, Executable, Runtime};
use crate::diffusion::learned::LearnedHead;
use crate::diffusion::nets::{Attention, ResBlock, Stage, UNet, timestep_embedding_with};
use crate::diffusion::process::{BoundProgram, BoundRow, LinearStep};
use crate::engine::{DenoiseBatch, Resident, TrainStep};
use crate::nn::modules::conv::Conv2d;
use crate::nn::modules::group_norm::GroupNorm;
use crate::optim::AdamScalars;
use crate::optim::ParamTable;

/// The network's tensors as they are read, each given its place in one flat buffer; and, in
/// training, the dropout masks of the residual blocks as inputs, in the blocks' order.
struct Weights {
    flat: T,
    values: Vec<f32>,
    /// Whether `values` is being filled (the first trace) or only checked.
    collect: bool,
    at: usize,
    /// The tensors read in the first trace, with their offsets.
    tensors: Vec<(Tensor, usize)>,
    /// Training with dropout: each residual block's mask is computed from an input of the
    /// examples' hash bases (the mask's shape kept).
    masks: Option<Vec<Vec<usize>>>,
    /// The drop probability.
    dropout: f32,
    /// The weights' nodes and offsets (for the derivative).
    pieces: Vec<(usize, T)>,
}

impl Weights {
    fn take(&mut self, g: &mut Graph, t: &Tensor) -> Result<T> {
        let shape = t.dims().to_vec();
        let n: usize = shape.iter().product();
        if self.collect {
            // The first trace only reads the weights and checks the shapes.
            self.values
                .extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            self.tensors.push((t.clone(), self.at));
            self.at += n;
            return Ok(g.constant(0.0, &shape));
        }
        ensure!(
            self.at + n <= self.values.len(),
            "XLA U-Net: the network's tensors changed between traces"
        );
        let s = g.slice(self.flat, self.at, n)?;
        let t = g.reshape(s, &shape)?;
        self.pieces.push((self.at, t));
        self.at += n;
        Ok(t)
    }
}

/// A traced forward pass: the graph, its output, the tensors in the order they were read
/// (the first trace) and the dropout masks' shapes (training).
struct Traced {
    graph: Graph,
    out: T,
    /// The inputs `x_t` and (with time values) `c`.
    x: T,
    time: Option<T>,
    tensors: Vec<(Tensor, usize)>,
    masks: Vec<Vec<usize>>,
    pieces: Vec<(usize, T)>,
    len: usize,
}

impl Traced {
    /// The derivative of `loss` with respect to the flat weights.
    fn weights_grad(&mut self, loss: T) -> Result<T> {
        self.graph.flat_gradient(loss, &self.pieces, self.len)
    }
}

/// Traces the forward pass of `net` on `b` examples of `c x h x w`. Inputs: the flat weights
/// `[P]`, `x_t` `[b, c, h, w]`, the timestep embedding `[b, base]`, and with `dropout` each
/// residual block's mask (`[b, C, H, W]` of its activation, scaled by 1 / (1 - p)). With
/// `values` empty the weights are collected into it.
fn trace(
    net: &UNet,
    b: usize,
    chw: (usize, usize, usize),
    values: &mut Vec<f32>,
    dropout: bool,
) -> Result<Traced> {
    trace_with(net, b, chw, values, dropout, false)
}

/// [`trace`]; with `time_values` the inputs after `x_t` are the time values `c` `[b]` and the
/// embedding's frequencies `[base / 2]`, and the embedding is computed in the program
/// (`[cos(c f); sin(c f)]`, or sines first), so that the derivative reaches `c`.
fn trace_with(
    net: &UNet,
    b: usize,
    chw: (usize, usize, usize),
    values: &mut Vec<f32>,
    dropout: bool,
    time_values: bool,
) -> Result<Traced> {
    let mut g = Graph::new();
    let collect = values.is_empty();
    let len = if collect { 0 } else { values.len() };
    let flat = g.input(&[len.max(1)]);
    let mut w = Weights {
        flat,
        values: std::mem::take(values),
        collect,
        at: 0,
        tensors: Vec::new(),
        masks: dropout.then(Vec::new),
        dropout: net.dropout,
        pieces: Vec::new(),
    };
    let (c, h, wd) = chw;
    let x = g.input(&[b, c, h, wd]);
    let (emb, time) = match time_values {
        false => (g.input(&[b, net.base]), None),
        true => {
            let half = net.base / 2;
            let cv = g.input(&[b]);
            let freqs = g.input(&[half]);
            let cb = g.broadcast(cv, &[0], &[b, half])?;
            let fb = g.broadcast(freqs, &[1], &[b, half])?;
            let args = g.mul(cb, fb)?;
            let cos = g.unary(super::graph::Unary::Cos, args);
            let sin = g.unary(super::graph::Unary::Sin, args);
            let parts = match net.options.flip_sin_to_cos {
                true => [cos, sin],
                false => [sin, cos],
            };
            (g.join(&parts, 1)?, Some(cv))
        }
    };
    let result = forward(&mut g, &mut w, net, x, emb);
    *values = w.values;
    let out = result?;
    ensure!(
        w.at == values.len(),
        "XLA U-Net: {} of {} weights read",
        w.at,
        values.len()
    );
    Ok(Traced {
        graph: g,
        out,
        x,
        time,
        tensors: w.tensors,
        masks: w.masks.unwrap_or_default(),
        pieces: w.pieces,
        len: values.len(),
    })
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
    // Dropout: the mask computed on the device from each example's hash base (an input
    // `[B, 4]` of 16-bit pieces), the values `nn::dropout::fill_mask` gives.
    let p = w.dropout;
    let h = match &mut w.masks {
        Some(shapes) => {
            let s = g.shape(h).to_vec();
            shapes.push(s.clone());
            let bases = g.input(&[s[0], 4]);
            let m = g.dropout_mask(bases, p, &s)?;
            g.mul(h, m)?
        }
        None => h,
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

/// A sampler step's program: B, C, H, W, whether it clips x_0_hat, draws noise, and learns the
/// variance.
type SamplerKey = (usize, usize, usize, usize, bool, bool, bool);

/// The U-Net's forward pass on XLA: one program per batch size, the weights resident.
pub struct XlaUnet {
    runtime: Arc<Runtime>,
    base: usize,
    options: crate::diffusion::nets::UnetOptions,
    /// The network is kept to trace it again for another batch size.
    net: UNet,
    weights: Buffer,
    /// The network's tensors and their offsets in the flat buffer.
    tensors: Vec<(Tensor, usize)>,
    len: usize,
    out_channels: usize,
    compiled: HashMap<(usize, usize, usize, usize), Executable>,
    /// The vector-Jacobian programs, per (B, C, H, W, cotangents).
    vjps: HashMap<(usize, usize, usize, usize, usize), Executable>,
    /// The sampler's step programs.
    steps: HashMap<SamplerKey, Executable>,
    /// The bound's programs, per shape and [`BoundProgram`].
    bounds: HashMap<(usize, usize, usize, usize, BoundProgram), Executable>,
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
        let first = trace(net, 1, (c, side, side), &mut values, false)?;
        let len = values.len();
        let weights = runtime.upload(&values, &[len])?;
        Ok(Self {
            base: net.base,
            options: net.options.clone(),
            out_channels: net.conv_out.parts().0.dim(0)?,
            net: net.clone(),
            weights,
            tensors: first.tensors,
            len,
            runtime,
            compiled: HashMap::new(),
            vjps: HashMap::new(),
            steps: HashMap::new(),
            bounds: HashMap::new(),
        })
    }

    /// The output channels (C, or 2C with learned variances).
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// The output and, for each cotangent v, `(d out / d x_t)^T v` (the probability-flow ODE's
    /// divergence probes), in one program per (shape, number of cotangents): the reverse mode
    /// of the traced forward pass, taken once per cotangent.
    pub fn vjp(
        &mut self,
        xt: &Tensor,
        t: &Tensor,
        cotangents: &[Tensor],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (b, c, h, w) = xt.dims4()?;
        let oc = self.out_channels;
        let k = cotangents.len();
        let key = (b, c, h, w, k);
        if !self.vjps.contains_key(&key) {
            let mut values = vec![0f32; self.len];
            let mut tr = trace(&self.net, b, (c, h, w), &mut values, false)?;
            let g = &mut tr.graph;
            let x = g.inputs()[1];
            let mut outputs = vec![tr.out];
            for _ in 0..k {
                let v = g.input(&[b, oc, h, w]);
                let p = g.mul(tr.out, v)?;
                let s = g.sum_all(p)?;
                outputs.push(g.grad(s, &[x])?[0]);
            }
            let text = g.to_stablehlo(&outputs)?;
            self.vjps
                .insert(key, self.runtime.compile(&text, outputs.len())?);
        }
        let cpu = candle_core::Device::Cpu;
        let host = |x: &Tensor| -> Result<Vec<f32>> {
            Ok(x.to_device(&cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let t = t.to_device(&cpu)?.to_dtype(DType::F32)?;
        let emb = timestep_embedding_with(&t, self.base, &self.options)?;
        let mut inputs = vec![
            self.runtime.upload(&host(xt)?, &[b, c, h, w])?,
            self.runtime.upload(&host(&emb)?, &[b, self.base])?,
        ];
        for v in cotangents {
            inputs.push(self.runtime.upload(&host(v)?, &[b, oc, h, w])?);
        }
        let mut refs: Vec<&Buffer> = vec![&self.weights];
        refs.extend(inputs.iter());
        let out = self.vjps[&key].run(&refs)?;
        let back = |buf: &Buffer, dims: (usize, usize, usize, usize)| -> Result<Tensor> {
            let v = buf.to_vec(dims.0 * dims.1 * dims.2 * dims.3)?;
            Ok(Tensor::from_vec(v, dims, &cpu)?
                .to_device(xt.device())?
                .to_dtype(xt.dtype())?)
        };
        let y = back(&out[0], (b, oc, h, w))?;
        let vjps = out[1..]
            .iter()
            .map(|o| back(o, (b, c, h, w)))
            .collect::<Result<_>>()?;
        Ok((y, vjps))
    }

    /// Uploads `x` `[B, C, H, W]`: a sampler's state ([`XlaUnet::linear_step`]).
    pub fn upload_state(&self, x: &Tensor) -> Result<Buffer> {
        let dims = x.dims4()?;
        let v = x
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        self.runtime.upload(&v, &[dims.0, dims.1, dims.2, dims.3])
    }

    /// One sampler step ([`LinearStep`]) of the state `x` `[B, C, H, W]` (donated: the result
    /// takes its memory) at the network's time values `t` `[B]`, with the noise `z` where
    /// sigma is positive or learned: the network's forward pass, the prediction's first C
    /// channels and the update, one program per (shape, clip, noise, learned variances).
    pub fn linear_step(
        &mut self,
        x: Buffer,
        dims: (usize, usize, usize, usize),
        t: &Tensor,
        step: &LinearStep,
        z: Option<&Tensor>,
    ) -> Result<Buffer> {
        let (b, c, h, w) = dims;
        let oc = self.out_channels;
        ensure!(
            oc == c || oc == 2 * c,
            "XLA U-Net: {oc} output channels for {c} input channels"
        );
        let noise = z.is_some();
        let learned = step.log_variance.is_some();
        ensure!(
            !learned || (noise && oc == 2 * c),
            "XLA U-Net: a learned variance needs the noise and 2C output channels"
        );
        let key = (b, c, h, w, step.clip, noise, learned);
        if !self.steps.contains_key(&key) {
            let mut values = vec![0f32; self.len];
            let mut tr = trace(&self.net, b, (c, h, w), &mut values, false)?;
            let g = &mut tr.graph;
            let full = [b, c, h, w];
            let coefs = g.input(&[8]);
            let mut k = Vec::with_capacity(8);
            for i in 0..8 {
                let v = g.slice(coefs, i, 1)?;
                let v = g.reshape(v, &[])?;
                k.push(g.broadcast(v, &[], &full)?);
            }
            let x = tr.x;
            let y = if oc == c {
                tr.out
            } else {
                g.narrow(tr.out, 1, 0, c)?
            };
            let ax = g.mul(k[0], x)?;
            let ay = g.mul(k[1], y)?;
            let mut x0 = g.add(ax, ay)?;
            if step.clip {
                x0 = clip_unit(g, x0)?;
            }
            let a = g.mul(k[2], x0)?;
            let bx = g.mul(k[3], x)?;
            let by = g.mul(k[4], y)?;
            let mut next = g.add(a, bx)?;
            next = g.add(next, by)?;
            if noise {
                let z = g.input(&full);
                // sigma, or e^{lv/2} with lv = lo + span (v + 1) / 2.
                let sigma = if learned {
                    let v = g.narrow(tr.out, 1, c, c)?;
                    let lv = interpolated_log_variance(g, v, k[6], k[7])?;
                    let half = g.scale(lv, 0.5)?;
                    g.exp(half)
                } else {
                    k[5]
                };
                let sz = g.mul(sigma, z)?;
                next = g.add(next, sz)?;
            }
            let text = g.to_stablehlo_donating(&[next], &[(1, 0)])?;
            self.steps.insert(key, self.runtime.compile(&text, 1)?);
        }
        let cpu = candle_core::Device::Cpu;
        let t = t.to_device(&cpu)?.to_dtype(DType::F32)?;
        let emb = timestep_embedding_with(&t, self.base, &self.options)?;
        let emb = emb.flatten_all()?.to_vec1::<f32>()?;
        let (lo, span) = step.log_variance.unwrap_or((0.0, 0.0));
        let coefs = [
            step.x0_from_x,
            step.x0_from_y,
            step.from_x0,
            step.from_x,
            step.from_y,
            step.sigma,
            lo,
            span,
        ]
        .map(|v| v as f32);
        let mut inputs = vec![
            x,
            self.runtime.upload(&emb, &[b, self.base])?,
            self.runtime.upload(&coefs, &[8])?,
        ];
        if let Some(z) = z {
            ensure!(
                z.dims4()? == dims,
                "XLA U-Net: the noise is not x_t's shape"
            );
            inputs.push(self.upload_state(z)?);
        }
        let mut refs: Vec<&Buffer> = vec![&self.weights];
        refs.extend(inputs.iter());
        let mut out = self.steps[&key].run(&refs)?;
        out.pop()
            .ok_or_else(|| anyhow::anyhow!("XLA U-Net: the sampler step returned nothing"))
    }

    /// Each example's bound term in nats ([`BoundRow`]; `GaussianDiffusion::bound_term`) from
    /// x_0 and x_t `[B, C, H, W]` at the network's time values `t` `[B]`: the forward pass,
    /// the posterior's and the model's means and log-variances, the KL or the decoder, and the
    /// sum over each example's values, one program per (shape, `how`), in f32.
    pub fn bound_terms(
        &mut self,
        x0: &Tensor,
        xt: &Tensor,
        t: &Tensor,
        rows: &[BoundRow],
        how: BoundProgram,
    ) -> Result<Vec<f64>> {
        let dims = xt.dims4()?;
        let (b, c, h, w) = dims;
        let oc = self.out_channels;
        ensure!(
            x0.dims4()? == dims && rows.len() == b,
            "XLA U-Net: the bound's x_0, x_t and rows differ in size"
        );
        let expected = if how.learned { 2 * c } else { c };
        ensure!(
            oc == expected,
            "XLA U-Net: the bound needs {expected} output channels (2C with learned variances), the network has {oc}"
        );
        let key = (b, c, h, w, how);
        if !self.bounds.contains_key(&key) {
            let mut values = vec![0f32; self.len];
            let mut tr = trace(&self.net, b, (c, h, w), &mut values, false)?;
            let g = &mut tr.graph;
            let full = [b, c, h, w];
            let x0 = g.input(&full);
            let k = g.input(&[BOUND_CONSTANTS, b]);
            let mut wide = Vec::with_capacity(BOUND_CONSTANTS);
            for i in 0..BOUND_CONSTANTS {
                let r = constant_row(g, k, i)?;
                wide.push(g.broadcast(r, &[0], &full)?);
            }
            let [ax, ay, c1, c2, qlv, fixed, lo, span, first] = wide[..] else {
                bail!("XLA U-Net: {BOUND_CONSTANTS} constants per row expected");
            };
            let xt = tr.x;
            let y = if how.learned {
                g.narrow(tr.out, 1, 0, c)?
            } else {
                tr.out
            };
            let a = g.mul(ax, xt)?;
            let by = g.mul(ay, y)?;
            let mut x0_hat = g.add(a, by)?;
            if how.clip {
                x0_hat = clip_unit(g, x0_hat)?;
            }
            let m1 = g.mul(c1, x0_hat)?;
            let m2 = g.mul(c2, xt)?;
            let mu = g.add(m1, m2)?;
            let q1 = g.mul(c1, x0)?;
            let mu_q = g.add(q1, m2)?;
            let lv = if how.learned {
                let v = g.narrow(tr.out, 1, c, c)?;
                interpolated_log_variance(g, v, lo, span)?
            } else {
                fixed
            };
            let kl = normal_kl(g, mu_q, qlv, mu, lv)?;
            let decoder = if how.continuous {
                // -log N(x_0; mu, e^lv) = 1/2 (log 2 pi + lv + (x_0 - mu)^2 e^{-lv})
                let d = g.sub(x0, mu)?;
                let d2 = g.mul(d, d)?;
                let nlv = g.neg(lv);
                let inv = g.exp(nlv);
                let q = g.mul(d2, inv)?;
                let s = g.add(q, lv)?;
                let s = g.offset(s, crate::distributions::LOG_2PI as f32)?;
                g.scale(s, 0.5)?
            } else {
                discretized_nll(g, x0, mu, lv)?
            };
            let swap = g.sub(decoder, kl)?;
            let swap = g.mul(first, swap)?;
            let term = g.add(kl, swap)?;
            let per = g.reshape(term, &[b, c * h * w])?;
            let terms = g.sum(per, &[1])?;
            let text = g.to_stablehlo(&[terms])?;
            self.bounds.insert(key, self.runtime.compile(&text, 1)?);
        }
        let cpu = candle_core::Device::Cpu;
        let t = t.to_device(&cpu)?.to_dtype(DType::F32)?;
        let emb = timestep_embedding_with(&t, self.base, &self.options)?;
        let emb = emb.flatten_all()?.to_vec1::<f32>()?;
        let mut k = vec![0f32; BOUND_CONSTANTS * b];
        for (i, r) in rows.iter().enumerate() {
            let values = [
                r.x0_from_x,
                r.x0_from_y,
                r.c1,
                r.c2,
                r.q_log_variance,
                r.log_variance,
                r.lo,
                r.span,
                if r.first { 1.0 } else { 0.0 },
            ];
            for (j, v) in values.into_iter().enumerate() {
                k[j * b + i] = v as f32;
            }
        }
        let inputs = [
            self.upload_state(xt)?,
            self.runtime.upload(&emb, &[b, self.base])?,
            self.upload_state(x0)?,
            self.runtime.upload(&k, &[BOUND_CONSTANTS, b])?,
        ];
        let mut refs: Vec<&Buffer> = vec![&self.weights];
        refs.extend(inputs.iter());
        let out = self.bounds[&key].run(&refs)?;
        let Some(terms) = out.first() else {
            bail!("XLA U-Net: the bound program returned nothing");
        };
        Ok(terms.to_vec(b)?.into_iter().map(f64::from).collect())
    }

    /// The state `x` `[B, C, H, W]` read back, on `like`'s device and dtype.
    pub fn read_state(
        &self,
        x: &Buffer,
        dims: (usize, usize, usize, usize),
        like: &Tensor,
    ) -> Result<Tensor> {
        let v = x.to_vec(dims.0 * dims.1 * dims.2 * dims.3)?;
        Ok(Tensor::from_vec(v, dims, &candle_core::Device::Cpu)?
            .to_device(like.device())?
            .to_dtype(like.dtype())?)
    }

    /// `eps_hat(x_t, t)` for `x_t` `[B, C, H, W]` and `t` `[B]` (any float tensors on any
    /// device); the result is on `x_t`'s device.
    pub fn forward(&mut self, xt: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xt.dims4()?;
        let key = (b, c, h, w);
        if !self.compiled.contains_key(&key) {
            let mut values = vec![0f32; self.len];
            let t = trace(&self.net, b, (c, h, w), &mut values, false)?;
            let text = t.graph.to_stablehlo(&[t.out])?;
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

/// Which program of the training step: the loss (simple, or the learned variances' with the
/// step's head) and its gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Simple,
    /// Continuous time: `sum_b (w_b / B) ||f(x_t, c)_b - target_b||^2` with the time values in
    /// the program, and the derivatives in `x_t` and `c` beside the parameters'.
    Weighted,
    /// The loss, then Adam's update of the resident parameters and moments and the EMA of the
    /// updated parameters, their buffers donated: one program a step.
    Resident,
    /// Continuous time's loss, resident.
    WeightedResident,
}

/// A compiled training program: rows, C, H, W, whether it takes dropout masks, and its kind.
type StepKey = (usize, usize, usize, usize, bool, Kind);

/// The U-Net's training step, traced with its derivative and compiled by XLA per shape:
///
/// - the simple loss `sum (f(x_t, t) - target)^2 / N` over the global batch's N values (eps,
///   x_0 or v prediction alike), one program;
/// - learned variances (`--loss hybrid|vlb`): the head's loss ([`learned_loss`]) in the
///   program too, from each example's constants ([`LearnedHead::row_constants`]);
/// - either one, resident: the loss, Adam and the EMA in one program;
/// - continuous time: the weighted loss with the derivatives the schedule's gradient needs.
///
/// Dropout masks are drawn on the host as the other engines draw them
/// ([`crate::nn::dropout::fill_mask`]) and uploaded. The loop's Adam updates the parameters
/// (the diffusion loop reads every update for its EMA).
pub struct XlaUnetStep {
    unet: XlaUnet,
    table: ParamTable,
    dropout: f32,
    blocks: u64,
    head: Option<LearnedHead>,
    /// The programs compiled so far, with their masks' shapes.
    compiled: HashMap<StepKey, (Executable, Vec<Vec<usize>>)>,
    /// The resident parameters, Adam's moments and the EMA `[p, m, v, ema]`.
    resident: Option<[Buffer; 4]>,
}

impl XlaUnetStep {
    /// The step of `net`, whose variables are `vars` (their names key the parameter table),
    /// with the learned-variance `head` of `--loss hybrid|vlb`.
    pub fn new(
        net: &UNet,
        vars: &[(String, Var)],
        head: Option<LearnedHead>,
        runtime: Arc<Runtime>,
    ) -> Result<Self> {
        let unet = XlaUnet::new(net, runtime)?;
        let table = ParamTable::of_tensors(&unet.tensors, vars, unet.len, "XLA U-Net")?;
        if head.is_some() && unet.out_channels != 2 * net.conv_in.parts().0.dim(1)? {
            bail!("--engine xla: learned variances need a network of 2C output channels");
        }
        Ok(Self {
            table,
            dropout: net.dropout,
            blocks: net.res_blocks() as u64,
            head,
            unet,
            compiled: HashMap::new(),
            resident: None,
        })
    }

    /// Compiles program `key` when it is new. Inputs: the weights, `x_t`, the embedding, the
    /// masks, then the simple loss's target and `1/N`, or the product's dL/dy.
    fn compile(&mut self, key: StepKey) -> Result<()> {
        if self.compiled.contains_key(&key) {
            return Ok(());
        }
        let (n, c, h, w, dropout, kind) = key;
        let mut values = vec![0f32; self.unet.len];
        let weighted = matches!(kind, Kind::Weighted | Kind::WeightedResident);
        let mut t = trace_with(&self.unet.net, n, (c, h, w), &mut values, dropout, weighted)?;
        // The loss and what the host reads beside it: each L_t (learned variances), or each
        // example's SSE, the output and the loss's derivatives in x_t and c (continuous time).
        let (loss, extra) = if weighted {
            let g = &mut t.graph;
            let target = g.input(&[n, c, h, w]);
            let scale = g.input(&[n]);
            let d = g.sub(t.out, target)?;
            let d2 = g.mul(d, d)?;
            let per = g.reshape(d2, &[n, c * h * w])?;
            let sse = g.sum(per, &[1])?;
            let ws = g.mul(sse, scale)?;
            let loss = g.sum_all(ws)?;
            let Some(time) = t.time else {
                bail!("XLA U-Net: a weighted program without its time values");
            };
            let dx = g.grad(loss, &[t.x, time])?;
            (loss, vec![sse, t.out, dx[0], dx[1]])
        } else {
            let (loss, vb) = self.step_loss(&mut t)?;
            (loss, vb.into_iter().collect())
        };
        let grad = t.weights_grad(loss)?;
        let mut donated = Vec::new();
        let mut outputs = match kind {
            Kind::Simple | Kind::Weighted => vec![loss, grad],
            // The updated parameters, m, v and EMA (over their inputs), then the loss. Inputs
            // after the loss's: m, v, Adam's scalars, the EMA, its decay.
            Kind::Resident | Kind::WeightedResident => {
                let g = &mut t.graph;
                let flat = g.inputs()[0];
                let (p2, m2, v2) = super::adam_update(g, flat, grad)?;
                let len = self.unet.len;
                let ema = g.input(&[len]);
                let decay = g.input(&[]);
                let db = g.broadcast(decay, &[], &[len])?;
                let one = g.constant(1.0, &[len]);
                let keep = g.mul(ema, db)?;
                let rest = g.sub(one, db)?;
                let add = g.mul(p2, rest)?;
                let e2 = g.add(keep, add)?;
                let inputs = g.inputs().len();
                donated = vec![(0, 0), (inputs - 5, 1), (inputs - 4, 2), (inputs - 2, 3)];
                vec![p2, m2, v2, e2, loss]
            }
        };
        outputs.extend(extra);
        let text = t.graph.to_stablehlo_donating(&outputs, &donated)?;
        let exe = self.unet.runtime.compile(&text, outputs.len())?;
        self.compiled.insert(key, (exe, t.masks));
        Ok(())
    }

    /// The step's loss of the traced output: the simple loss, or with a head the learned
    /// variances' and each example's L_t in nats. Its inputs follow the masks
    /// ([`XlaUnetStep::loss_inputs`]).
    fn step_loss(&self, t: &mut Traced) -> Result<(T, Option<T>)> {
        Ok(match &self.head {
            None => (simple_loss(&mut t.graph, t.out)?, None),
            Some(head) => {
                let hybrid = head.loss() == crate::diffusion::learned::TrainLoss::Hybrid;
                let (loss, vb) = learned_loss(&mut t.graph, t.out, t.x, hybrid)?;
                (loss, Some(vb))
            }
        })
    }

    /// The loss's inputs for rows `rows` of `batch`: the target and `1/N` (the simple loss), or
    /// x_0, the target and the rows' constants `[9, n]` (learned variances, scaled by 1/B of
    /// the global batch).
    fn loss_inputs(
        &self,
        batch: &DenoiseBatch,
        rows: &std::ops::Range<usize>,
    ) -> Result<Vec<Buffer>> {
        let (_, c, h, w) = batch.xt.dims4()?;
        ensure!(
            batch.target.dims4()? == batch.xt.dims4()?,
            "XLA U-Net: the target and x_t differ in shape"
        );
        let rt = &self.unet.runtime;
        let n = rows.len();
        let target = rt.upload(&rows_of(&batch.target, rows)?, &[n, c, h, w])?;
        let Some(head) = &self.head else {
            ensure!(
                self.unet.out_channels == c,
                "XLA U-Net: the simple loss needs a target of the network's output shape"
            );
            let inv = 1.0 / batch.xt.elem_count() as f32;
            return Ok(vec![target, rt.upload(&[inv], &[])?]);
        };
        let Some(x0) = &batch.x0 else {
            bail!("a learned-variance loss needs the batch's x_0");
        };
        ensure!(
            x0.dims4()? == batch.xt.dims4()? && self.unet.out_channels == 2 * c,
            "XLA U-Net: learned variances need x_0 of x_t's shape and 2C output channels"
        );
        let b = batch.t.len();
        let mut k = vec![0f32; ROW_CONSTANTS * n];
        for (i, row) in rows.clone().enumerate() {
            let weight = batch.weights.as_ref().and_then(|w| w.get(row)).copied();
            let r = head.row_constants(
                batch.t[row],
                c * h * w,
                weight.unwrap_or(1.0),
                1.0 / b as f64,
            );
            let values = [
                r.from_xt,
                r.from_out,
                r.c1,
                r.c2,
                r.lo,
                r.span,
                r.sse_weight,
                r.nats_weight,
                if r.first { 1.0 } else { 0.0 },
            ];
            for (j, v) in values.into_iter().enumerate() {
                k[j * n + i] = v as f32;
            }
        }
        Ok(vec![
            rt.upload(&rows_of(x0, rows)?, &[n, c, h, w])?,
            target,
            rt.upload(&k, &[ROW_CONSTANTS, n])?,
        ])
    }

    /// The inputs every program takes: the weights, rows `rows` of `x_t`, their timestep
    /// embedding and their dropout masks (program `key`'s).
    fn common_inputs(
        &self,
        params: &[f32],
        batch: &DenoiseBatch,
        rows: &std::ops::Range<usize>,
        key: StepKey,
    ) -> Result<Vec<Buffer>> {
        let (n, c, h, w, dropout, _) = key;
        let rt = &self.unet.runtime;
        let cpu = candle_core::Device::Cpu;
        let xt = rows_of(&batch.xt, rows)?;
        let tf: Vec<f32> = batch.t[rows.clone()].iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(tf, n, &cpu)?;
        let emb = timestep_embedding_with(&t, self.unet.base, &self.unet.options)?;
        let mut inputs = vec![
            rt.upload(params, &[self.unet.len])?,
            rt.upload(&xt, &[n, c, h, w])?,
            rt.upload(&emb.flatten_all()?.to_vec1::<f32>()?, &[n, self.unet.base])?,
        ];
        if let (true, Some(seed)) = (dropout, batch.dropout_seed) {
            inputs.extend(self.masks(seed, rows, key)?);
        }
        Ok(inputs)
    }

    /// The continuous-time loss of rows `rows` ([`crate::engine::WeightedRows`]) and its
    /// gradient in `grads`, with the fused engine's sums ([`XlaUnetStep::weighted_sums`]).
    fn weighted(
        &mut self,
        params: &[f32],
        batch: &DenoiseBatch,
        wr: &crate::engine::WeightedRows,
        rows: std::ops::Range<usize>,
        grads: &mut [f32],
        dropout: bool,
    ) -> Result<Vec<f64>> {
        let (_, c, h, w) = batch.xt.dims4()?;
        let key = (rows.len(), c, h, w, dropout, Kind::Weighted);
        self.compile(key)?;
        let p = self.unet.runtime.upload(params, &[self.unet.len])?;
        let (inputs, target) = self.weighted_inputs(p, batch, wr, &rows, key)?;
        let out = self.run(key, &inputs)?;
        out[1].read(grads)?;
        self.weighted_sums(&out[0], &out[2..6], batch, wr, rows, &target)
    }

    /// The inputs of weighted program `key` for rows `rows`, the parameters `params` first, and
    /// the rows' target on the host.
    fn weighted_inputs(
        &self,
        params: Buffer,
        batch: &DenoiseBatch,
        wr: &crate::engine::WeightedRows,
        rows: &std::ops::Range<usize>,
        key: StepKey,
    ) -> Result<(Vec<Buffer>, Vec<f32>)> {
        let dims = batch.xt.dims4()?;
        let (b, c, h, w) = dims;
        let n = rows.len();
        ensure!(
            wr.model_t.len() == b
                && wr.weights.len() == b
                && batch.target.dims4()? == dims
                && self.unet.out_channels == c,
            "XLA U-Net: a weighted batch's sizes do not match (or the network has 2C outputs)"
        );
        let rt = &self.unet.runtime;
        let half = self.unet.base / 2;
        let freqs = crate::nn::embedding::sinusoid_frequencies_shifted(
            self.unet.base,
            self.unet.options.freq_shift,
        );
        ensure!(
            freqs.len() == half,
            "XLA U-Net: the embedding has an odd width"
        );
        let mut inputs = vec![
            params,
            rt.upload(&rows_of(&batch.xt, rows)?, &[n, c, h, w])?,
            rt.upload(&wr.model_t[rows.clone()], &[n])?,
            rt.upload(&freqs, &[half])?,
        ];
        if let (true, Some(seed)) = (key.4, batch.dropout_seed) {
            inputs.extend(self.masks(seed, rows, key)?);
        }
        let target = rows_of(&batch.target, rows)?;
        inputs.push(rt.upload(&target, &[n, c, h, w])?);
        let scale: Vec<f32> = wr.weights[rows.clone()]
            .iter()
            .map(|w| (w / b as f64) as f32)
            .collect();
        inputs.push(rt.upload(&scale, &[n])?);
        Ok((inputs, target))
    }

    /// The fused engine's sums of a weighted program's `loss` and `outs` (each example's SSE,
    /// the output, dL/dx_t, dL/dc): `[loss, SSE_b of each example]` and, with a tangent,
    /// `[.., g_b]`, `g_b = B (dL/dx_b . tangent_b + dL/dc_b dc/dgamma) - 2 w_b (f_b -
    /// target_b) . d target_b / d gamma_b`.
    fn weighted_sums(
        &self,
        loss: &Buffer,
        outs: &[Buffer],
        batch: &DenoiseBatch,
        wr: &crate::engine::WeightedRows,
        rows: std::ops::Range<usize>,
        target: &[f32],
    ) -> Result<Vec<f64>> {
        let (b, c, h, w) = batch.xt.dims4()?;
        let (n, per) = (rows.len(), c * h * w);
        let [sse, y, dx, dt] = outs else {
            bail!(
                "XLA U-Net: a weighted program returned {} outputs",
                outs.len()
            );
        };
        let loss = loss.to_vec(1)?[0] as f64;
        let sse = sse.to_vec(n)?;
        let mut sums = vec![0.0; wr.sums_len(b)];
        sums[0] = loss;
        for (i, row) in rows.clone().enumerate() {
            sums[1 + row] = sse[i] as f64;
        }
        if let Some((tangent, dc)) = &wr.tangent {
            let tangent = rows_of(tangent, &rows)?;
            let y = y.to_vec(n * per)?;
            let dx = dx.to_vec(n * per)?;
            let dt = dt.to_vec(n)?;
            let target_tangent = match &wr.target_tangent {
                Some(t) => Some(rows_of(t, &rows)?),
                None => None,
            };
            for (i, row) in rows.enumerate() {
                let r = i * per..(i + 1) * per;
                let along: f64 = dx[r.clone()]
                    .iter()
                    .zip(&tangent[r.clone()])
                    .map(|(&a, &t)| a as f64 * t as f64)
                    .sum();
                let mut g = b as f64 * (along + dt[i] as f64 * dc);
                if let Some(tt) = &target_tangent {
                    let dot: f64 = y[r.clone()]
                        .iter()
                        .zip(&target[r.clone()])
                        .zip(&tt[r])
                        .map(|((&y, &tg), &t)| (y - tg) as f64 * t as f64)
                        .sum();
                    g -= 2.0 * wr.weights[row] * dot;
                }
                sums[1 + b + row] = g;
            }
        }
        Ok(sums)
    }

    /// The dropout masks' inputs of rows `rows` for program `key`, uploaded: per residual
    /// block, each example's hash base ([`crate::nn::dropout::mask_base`] of its stream) as
    /// four 16-bit pieces `[n, 4]`; the program computes the masks from them.
    fn masks(&self, seed: u64, rows: &std::ops::Range<usize>, key: StepKey) -> Result<Vec<Buffer>> {
        let n = rows.len();
        let mut out = Vec::new();
        for index in 0..self.compiled[&key].1.len() {
            let mut pieces = Vec::with_capacity(4 * n);
            for e in 0..n {
                let stream = (rows.start + e) as u64 * self.blocks + index as u64;
                let base = crate::nn::dropout::mask_base(seed, stream);
                pieces.extend((0..4).map(|j| ((base >> (16 * j)) & 0xFFFF) as f32));
            }
            out.push(self.unet.runtime.upload(&pieces, &[n, 4])?);
        }
        Ok(out)
    }

    fn run(&self, key: StepKey, inputs: &[Buffer]) -> Result<Vec<Buffer>> {
        let refs: Vec<&Buffer> = inputs.iter().collect();
        self.compiled[&key].0.run(&refs)
    }
}

/// The simple loss of the output `out`: appends the inputs `target` (its shape) and `1/N`, and
/// returns `sum (out - target)^2 / N`.
fn simple_loss(g: &mut Graph, out: T) -> Result<T> {
    let shape = g.shape(out).to_vec();
    let target = g.input(&shape);
    let inv_total = g.input(&[]);
    let d = g.sub(out, target)?;
    let d2 = g.mul(d, d)?;
    let sse = g.sum_all(d2)?;
    g.mul(sse, inv_total)
}

/// The number of each example's constants of the bound ([`BoundRow`]).
const BOUND_CONSTANTS: usize = 9;

/// The number of each example's constants of the learned-variance loss
/// ([`crate::diffusion::learned::RowConstants`]).
const ROW_CONSTANTS: usize = 9;

/// Row `i` of the constants `k` `[9, n]`, `[n]`.
fn constant_row(g: &mut Graph, k: T, i: usize) -> Result<T> {
    let n = g.shape(k)[1];
    let r = g.narrow(k, 0, i, 1)?;
    g.reshape(r, &[n])
}

/// The learned-variance loss ([`LearnedHead::example`], Nichol & Dhariwal 2021) of the output
/// `out` `[n, 2C, H, W]` (the prediction, then v) at the inputs `xt`, in f32. Appends the
/// inputs x_0 and the target `[n, C, H, W]` and the rows' constants `[9, n]`
/// ([`crate::diffusion::learned::RowConstants`] in its field order, `first` as 0 or 1), and
/// returns the loss and each example's L_t in nats `[n]`:
///
/// ```text
/// mu = from_xt x_t + from_out pred   (pred held constant in hybrid)
/// lv = lo + span (v + 1) / 2,   mu~ = c1 x_0 + c2 x_t
/// KL = 1/2 (lv - lo - 1 + e^{lo - lv} + (mu~ - mu)^2 e^{-lv})          t > 0
/// NLL = -log P,  P = Phi(z+) - Phi(z-),  z+- = e^{-lv/2} (x_0 - mu +- 1/255)   t = 0
/// loss = sum_b sse_weight_b ||pred_b - target_b||^2 + nats_weight_b L_t,b
/// ```
///
/// The KL and the decoder are [`normal_kl`]'s and [`discretized_nll`]'s, as the host's
/// [`crate::diffusion::learned::discretized_gaussian_nll_grad`] computes them in f64.
fn learned_loss(g: &mut Graph, out: T, xt: T, hybrid: bool) -> Result<(T, T)> {
    let shape = g.shape(out).to_vec();
    let [n, c2, h, w] = shape[..] else {
        bail!("XLA U-Net: learned variances need images, got {shape:?}");
    };
    let c = c2 / 2;
    let full = [n, c, h, w];
    let x0 = g.input(&full);
    let target = g.input(&full);
    let k = g.input(&[ROW_CONSTANTS, n]);
    let mut rows = Vec::with_capacity(ROW_CONSTANTS);
    for i in 0..ROW_CONSTANTS {
        rows.push(constant_row(g, k, i)?);
    }
    let mut wide = Vec::with_capacity(ROW_CONSTANTS);
    for &r in &rows {
        wide.push(g.broadcast(r, &[0], &full)?);
    }
    let [from_xt, from_out, c1, c2, lo, span, _, _, first] = wide[..] else {
        bail!("XLA U-Net: {ROW_CONSTANTS} constants per row expected");
    };
    let pred = g.narrow(out, 1, 0, c)?;
    let raw = g.narrow(out, 1, c, c)?;
    let e = if hybrid { g.stop_gradient(pred) } else { pred };
    let a = g.mul(from_xt, xt)?;
    let bterm = g.mul(from_out, e)?;
    let mu = g.add(a, bterm)?;
    let lv = interpolated_log_variance(g, raw, lo, span)?;
    let q1 = g.mul(c1, x0)?;
    let q2 = g.mul(c2, xt)?;
    let mu_q = g.add(q1, q2)?;
    let kl = normal_kl(g, mu_q, lo, mu, lv)?;
    let nll = discretized_nll(g, x0, mu, lv)?;
    // L_t per value: the decoder at t = 0, else the KL.
    let swap = g.sub(nll, kl)?;
    let swap = g.mul(first, swap)?;
    let term = g.add(kl, swap)?;
    let per = g.reshape(term, &[n, c * h * w])?;
    let vb = g.sum(per, &[1])?;
    let mut loss = g.mul(rows[7], vb)?;
    if hybrid {
        let r = g.sub(pred, target)?;
        let r2 = g.mul(r, r)?;
        let per = g.reshape(r2, &[n, c * h * w])?;
        let sse = g.sum(per, &[1])?;
        let ws = g.mul(rows[6], sse)?;
        loss = g.add(loss, ws)?;
    }
    Ok((g.sum_all(loss)?, vb))
}

/// `min(max(x, -1), 1)` (x_0_hat's clip), as `-max(-max(x, -1), -1)`.
fn clip_unit(g: &mut Graph, x: T) -> Result<T> {
    let lo = g.full_like(-1.0, x);
    let m = g.max(x, lo)?;
    let n = g.neg(m);
    let m = g.max(n, lo)?;
    Ok(g.neg(m))
}

/// The learned log-variance `lo + span (v + 1) / 2` of the output's variance channels `v`
/// (Nichol & Dhariwal's eq. 15: lo = log beta~_t, span = log beta_t - lo).
fn interpolated_log_variance(g: &mut Graph, v: T, lo: T, span: T) -> Result<T> {
    let frac = g.offset(v, 1.0)?;
    let frac = g.scale(frac, 0.5)?;
    let sf = g.mul(span, frac)?;
    g.add(lo, sf)
}

/// KL(N(mu_q, e^lv_q) || N(mu, e^lv)) per value:
/// `1/2 (lv - lv_q - 1 + e^{lv_q - lv} + (mu_q - mu)^2 e^{-lv})`.
fn normal_kl(g: &mut Graph, mu_q: T, lv_q: T, mu: T, lv: T) -> Result<T> {
    let d = g.sub(mu_q, mu)?;
    let d2 = g.mul(d, d)?;
    let nlv = g.neg(lv);
    let inv = g.exp(nlv);
    let diff = g.sub(lv_q, lv)?;
    let ratio = g.exp(diff);
    let quad = g.mul(d2, inv)?;
    let kl = g.sub(lv, lv_q)?;
    let kl = g.add(kl, ratio)?;
    let kl = g.add(kl, quad)?;
    let kl = g.offset(kl, -1.0)?;
    g.scale(kl, 0.5)
}

/// -log P(x_0) of the discretized Gaussian decoder N(mu, e^lv) per value (Ho et al. 2020,
/// eq. 13): P = Phi(z+) - Phi(z-), z+- = e^{-lv/2} (x_0 - mu +- 1/255), with
/// Phi(z) = erfc(-z / sqrt 2) / 2, the edge bins to -inf and +inf, the upper-tail form
/// Phi(-z-) - Phi(-z+) where z- > 0; P is floored at 1e-30 (the host's f64 at 1e-300).
fn discretized_nll(g: &mut Graph, x0: T, mu: T, lv: T) -> Result<T> {
    let nlv = g.neg(lv);
    let half = g.scale(nlv, 0.5)?;
    let inv_std = g.exp(half);
    let dx = g.sub(x0, mu)?;
    let up = g.offset(dx, 1.0 / 255.0)?;
    let down = g.offset(dx, -1.0 / 255.0)?;
    let z_hi = g.mul(inv_std, up)?;
    let z_lo = g.mul(inv_std, down)?;
    let top = g.full_like(0.999, x0);
    let edge_hi = g.greater(x0, top)?;
    let bottom = g.full_like(-0.999, x0);
    let edge_lo = g.greater(bottom, x0)?;
    let one = g.full_like(1.0, x0);
    let keep_hi = g.sub(one, edge_hi)?;
    let keep_lo = g.sub(one, edge_lo)?;
    let cdf_hi = std_normal_cdf(g, z_hi, 1.0)?;
    let cdf_lo = std_normal_cdf(g, z_lo, 1.0)?;
    let tail_hi = std_normal_cdf(g, z_hi, -1.0)?;
    let tail_lo = std_normal_cdf(g, z_lo, -1.0)?;
    // P = (Phi(z+) or 1) - (Phi(z-) or 0); upper form (Phi(-z-) or 1) - (Phi(-z+) or 0).
    let p_hi = g.mul(cdf_hi, keep_hi)?;
    let p_hi = g.add(p_hi, edge_hi)?;
    let p_lo = g.mul(cdf_lo, keep_lo)?;
    let lower = g.sub(p_hi, p_lo)?;
    let u_lo = g.mul(tail_lo, keep_lo)?;
    let u_lo = g.add(u_lo, edge_lo)?;
    let u_hi = g.mul(tail_hi, keep_hi)?;
    let upper = g.sub(u_lo, u_hi)?;
    let zero = g.full_like(0.0, x0);
    let positive = g.greater(z_lo, zero)?;
    let use_upper = g.mul(positive, keep_lo)?;
    let diff = g.sub(upper, lower)?;
    let pick = g.mul(use_upper, diff)?;
    let p = g.add(lower, pick)?;
    let floor = g.full_like(1e-30, x0);
    let p = g.max(p, floor)?;
    let logp = g.log(p);
    Ok(g.neg(logp))
}

/// Phi(sign z) = erfc(-sign z / sqrt 2) / 2, the standard normal CDF at `sign z`.
fn std_normal_cdf(g: &mut Graph, z: T, sign: f32) -> Result<T> {
    let a = g.scale(z, -sign * std::f32::consts::FRAC_1_SQRT_2)?;
    let e = g.unary(Unary::Erfc, a);
    g.scale(e, 0.5)
}

/// Rows `rows` of a batch's tensor, as f32 values on the host.
fn rows_of(x: &Tensor, rows: &std::ops::Range<usize>) -> Result<Vec<f32>> {
    Ok(x.narrow(0, rows.start, rows.len())?
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

impl TrainStep for XlaUnetStep {
    type Batch = DenoiseBatch;

    fn table(&self) -> &ParamTable {
        &self.table
    }

    fn read_params(&self) -> Result<Vec<f32>> {
        let mut v = vec![0f32; self.unet.len];
        self.unet.weights.read(&mut v)?;
        Ok(v)
    }

    fn loss_and_grads(
        &mut self,
        params: &[f32],
        batch: &DenoiseBatch,
        rows: std::ops::Range<usize>,
        grads: &mut [f32],
    ) -> Result<Vec<f64>> {
        let dims = batch.xt.dims().to_vec();
        let [b, c, h, w] = dims[..] else {
            bail!("XLA U-Net: images [B, C, H, W] expected, got {dims:?}");
        };
        ensure!(
            rows.end <= b && params.len() == self.unet.len && grads.len() == self.unet.len,
            "XLA U-Net: rows {rows:?} of {b}, {} parameters and {} gradients for {}",
            params.len(),
            grads.len(),
            self.unet.len
        );
        let n = rows.len();
        if n == 0 {
            grads.fill(0.0);
            let len = match (&batch.weighted, &self.head) {
                (Some(wr), _) => wr.sums_len(b),
                (None, Some(_)) => 2 + b,
                (None, None) => 1,
            };
            return Ok(vec![0.0; len]);
        }
        let dropout = self.dropout > 0.0 && batch.dropout_seed.is_some();
        if let Some(wr) = &batch.weighted {
            return self.weighted(params, batch, wr, rows, grads, dropout);
        }
        let key = (n, c, h, w, dropout, Kind::Simple);
        self.compile(key)?;
        let mut inputs = self.common_inputs(params, batch, &rows, key)?;
        inputs.extend(self.loss_inputs(batch, &rows)?);
        let out = self.run(key, &inputs)?;
        out[1].read(grads)?;
        let loss = out[0].to_vec(1)?[0] as f64;
        Ok(match out.get(2) {
            Some(vb) => {
                let vb: Vec<f64> = vb.to_vec(n)?.into_iter().map(f64::from).collect();
                crate::engine::learned_sums(b, rows, loss, &vb)
            }
            None => vec![loss],
        })
    }

    /// Every loss keeps its parameters, moments and EMA on the device (continuous time through
    /// [`crate::engine::vdm::ContinuousStep`], whose schedule stays on the host).
    fn resident(&self) -> bool {
        true
    }

    fn load_resident(&mut self, state: &Resident<'_>) -> Result<()> {
        let len = self.unet.len;
        ensure!(
            state.params.len() == len && state.m.len() == len && state.v.len() == len,
            "XLA U-Net: resident buffers for {len} parameters expected"
        );
        let rt = &self.unet.runtime;
        // Without an average, the EMA buffer follows nothing (decay 1) and is not read back.
        let average: &[f32] = match &state.average {
            Some(a) => a,
            None => state.params,
        };
        ensure!(
            average.len() == len,
            "XLA U-Net: an average of {} values",
            average.len()
        );
        self.resident = Some([
            rt.upload(state.params, &[len])?,
            rt.upload(state.m, &[len])?,
            rt.upload(state.v, &[len])?,
            rt.upload(average, &[len])?,
        ]);
        Ok(())
    }

    fn step_resident(
        &mut self,
        batch: &DenoiseBatch,
        adam: AdamScalars,
        average_decay: Option<f32>,
    ) -> Result<Vec<f64>> {
        let (b, c, h, w) = batch.xt.dims4()?;
        let dropout = self.dropout > 0.0 && batch.dropout_seed.is_some();
        let kind = match batch.weighted {
            Some(_) => Kind::WeightedResident,
            None => Kind::Resident,
        };
        let key = (b, c, h, w, dropout, kind);
        self.compile(key)?;
        let Some([p, m, v, e]) = self.resident.take() else {
            bail!("XLA U-Net: step_resident before load_resident");
        };
        let rows = 0..b;
        let rt = self.unet.runtime.clone();
        let (mut inputs, target) = match &batch.weighted {
            Some(wr) => {
                let (inputs, target) = self.weighted_inputs(p, batch, wr, &rows, key)?;
                (inputs, Some(target))
            }
            None => {
                let cpu = candle_core::Device::Cpu;
                let tf: Vec<f32> = batch.t.iter().map(|&t| t as f32).collect();
                let t = Tensor::from_vec(tf, b, &cpu)?;
                let emb = timestep_embedding_with(&t, self.unet.base, &self.unet.options)?;
                let mut inputs = vec![
                    p,
                    rt.upload(&rows_of(&batch.xt, &rows)?, &[b, c, h, w])?,
                    rt.upload(&emb.flatten_all()?.to_vec1::<f32>()?, &[b, self.unet.base])?,
                ];
                if let (true, Some(seed)) = (dropout, batch.dropout_seed) {
                    inputs.extend(self.masks(seed, &rows, key)?);
                }
                inputs.extend(self.loss_inputs(batch, &rows)?);
                (inputs, None)
            }
        };
        inputs.push(m);
        inputs.push(v);
        inputs.push(rt.upload(&super::adam_scalars(&adam), &[5])?);
        inputs.push(e);
        inputs.push(rt.upload(&[average_decay.unwrap_or(1.0)], &[])?);
        let mut out = self.run(key, &inputs)?;
        ensure!(
            out.len() >= 5,
            "XLA U-Net: the resident step returned {} outputs",
            out.len()
        );
        let rest = out.split_off(4);
        let mut it = out.into_iter();
        if let (Some(p), Some(m), Some(v), Some(e)) = (it.next(), it.next(), it.next(), it.next()) {
            self.resident = Some([p, m, v, e]);
        }
        let (loss, extra) = (&rest[0], &rest[1..]);
        let sums = match (&batch.weighted, &target) {
            (Some(wr), Some(target)) => self.weighted_sums(loss, extra, batch, wr, rows, target)?,
            _ => {
                let loss = loss.to_vec(1)?[0] as f64;
                match extra.first() {
                    Some(vb) => {
                        let vb: Vec<f64> = vb.to_vec(b)?.into_iter().map(f64::from).collect();
                        crate::engine::learned_sums(b, rows, loss, &vb)
                    }
                    None => vec![loss],
                }
            }
        };
        Ok(sums)
    }

    fn store_resident(&mut self, state: &mut Resident<'_>) -> Result<()> {
        let Some([p, m, v, e]) = &self.resident else {
            bail!("XLA U-Net: store_resident before load_resident");
        };
        p.read(state.params)?;
        m.read(state.m)?;
        v.read(state.v)?;
        if let Some(a) = state.average.as_deref_mut() {
            e.read(a)?;
        }
        Ok(())
    }
}
