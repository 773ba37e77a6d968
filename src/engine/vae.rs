//! The fused CPU engine of the VAE family ([`crate::vae::model`]): any number of stochastic
//! layers, MLPs of any depth, width and activation, convolutional encoders and decoders (stride-2
//! convolutions as row products over parity-split copies, transposed convolutions as four
//! sub-pixel products ([`crate::nn::planar::conv`]; else [`crate::nn::conv`]'s im2col and
//! col2im)), the Bernoulli likelihood,
//! the ELBO and the IWAE objectives with K samples, in one flat parameter buffer and scratch
//! buffers reused from step to step (a [`crate::engine::TrainStep`]; the loop's Adam updates it). Each network runs on [`crate::nn::mlp`] (one `gemm` call per
//! product); the densities, the reparameterization and their backward passes are fused loops.
//!
//! It computes what the candle autodiff path computes ([`crate::vae::objective`] +
//! `loss.backward()`, and `estimate_log_likelihood_candle`), draws
//! the same noise in the same order, and is checked against it in `tests/vae.rs`.
//!
//! Rows of a batch of B examples with K samples are `r = k B + b`. With z_0 = x and, per row,
//! `f_r` the log weight (IWAE) or the ELBO's summand, the loss and its derivative per row are
//!
//! ```text
//! ELBO  f = log p(x|z_1) + beta sum_{l<L} [log p(z_l|z_{l+1}) - log q(z_l|.)] - beta KL_L
//!       (KL_L in closed form; with `KlEstimator::MonteCarlo` beta [log p(z_L) - log q(z_L|.)])
//!       loss = -(1/(K B)) sum_r f_r                      c_r = dloss/df_r = -1/(K B)
//! IWAE  f = log w = log p(x|z_1) + sum_l [log p(z_l|.) - log q(z_l|.)]
//!       loss = -(1/B) sum_b log (1/K) sum_k e^{f_kb}     c_r = -(1/B) w~_kb  (normalised weights)
//! ```
//!
//! and the backward pass, layer by layer (a = c_r, times beta for the ELBO's KL terms):
//!
//! ```text
//! d logits         = c (x - sigmoid(logits))                                   [R, D]
//! p(z_{l-1}|z_l):  d m = a (z - m) e^-lv,  d lv = a ((z - m)^2 e^-lv - 1)/2,  d z_{l-1} -= a (z - m) e^-lv
//! - log q(z_l|.) = 1/2 sum (lv + eps^2) + const, eps fixed:                    d lv += a / 2
//! log p(z_L) (IWAE, and the ELBO with `KlEstimator::MonteCarlo`):  d z_L -= a z_L
//! - beta KL_L (the ELBO's closed form):  d m -= C beta m,  d lv -= C beta (e^lv - 1)/2
//! z = m + e^{lv/2} eps:   d m += d z,   d lv += d z eps e^{lv/2} / 2        (summed over the rows of a source)
//! ```
//!
//! where C sums c over the rows that share the Gaussian (the K samples of an example when the
//! Gaussian is q(z_1|x)). Threads: the batch is cut into one slice of examples per thread,
//! each run start to end on its own thread with single-threaded products; the slices'
//! gradients are added at the end (the loss is a sum over examples).

use anyhow::{Result, bail};
use candle_core::Tensor;
use rayon::prelude::*;

use crate::distributions::Noise;
use crate::engine::TrainStep;
use crate::nn::activation::Activation;
use crate::nn::conv::{
    ConvScratch, Geometry, conv_transpose2d_backward, conv_transpose2d_forward, conv2d_backward,
    conv2d_forward, conv2d_input_grad,
};
use crate::nn::kernels::{add_assign, bce_logits_grad, bernoulli_log_prob};
use crate::nn::mlp::{MlpShape, MlpTape, mlp_backward, mlp_forward};
use crate::nn::planar::conv as planar;
use crate::optim::{Adam, ParamEntry, ParamTable};
use crate::vae::estimate::{LikelihoodEstimate, log_add_exp};
use crate::vae::model::{Likelihood, Vae, VaeConfig};
use crate::vae::objective::{KlEstimator, Objective};

/// Whether the fused engine computes this model: the CPU, the Bernoulli likelihood, MLPs, and
/// convolutional VAEs without residual blocks (those train on candle for now).
pub fn supports(vae: &Vae) -> bool {
    vae.device().is_cpu()
        && vae.config.likelihood == Likelihood::Bernoulli
        && vae.config.conv.as_ref().is_none_or(|c| !c.residual)
}

/// One convolution of a convolutional VAE: where its weight and bias sit in the flat buffer,
/// its channels and geometry (for a transposed one, the geometry of the convolution from its
/// output back to its input).
#[derive(Debug, Clone)]
struct ConvSpec {
    w: usize,
    b: usize,
    c_in: usize,
    c_out: usize,
    g: Geometry,
    /// Values per example in and out.
    size_in: usize,
    size_out: usize,
}

impl ConvSpec {
    /// Multiply-adds per example: `C_in C_out k^2` per pixel of `g`'s output (a transposed
    /// convolution's input).
    fn macs(&self) -> f64 {
        let (oh, ow) = self.g.output();
        (self.c_in * self.c_out * self.g.k * self.g.k * oh * ow) as f64
    }
}

/// The convolutional encoder (x -> features) and decoder (features -> logits) around the first
/// layer's MLPs (`VaeConfig::conv`):
///
/// ```text
/// encoder  h_0 = x,  a_j = conv_j(h_j),  h_{j+1} = f(a_j)             features = h_n
/// decoder  u_0 = f(MLP output),  a_j = deconv_j(u_j),  u_{j+1} = f(a_j)  logits = a_last
/// ```
#[derive(Debug, Clone)]
struct ConvStack {
    down: Vec<ConvSpec>,
    up: Vec<ConvSpec>,
    activation: Activation,
}

/// `state_dict` entries `(name, offset, shape)`.
type Entries = Vec<(String, usize, Vec<usize>)>;

impl ConvStack {
    /// The stack of `config` with its parameters from `offset` on, and their `state_dict`
    /// entries; `None` for an MLP VAE.
    fn new(config: &VaeConfig, offset: usize) -> Option<(Self, Entries)> {
        let conv = config.conv.as_ref()?;
        let shape = config.image_shape()?;
        let (fc, fh, fw) = config.conv_features()?;
        let mut entries = Vec::new();
        let mut at = offset;
        for (name, dims) in config.conv_parameter_shapes() {
            let n: usize = dims.iter().product();
            entries.push((name, at, dims));
            at += n;
        }
        let find = |name: &str| entries.iter().find(|(n, _, _)| n == name).map(|e| e.1);
        let (mut c, mut h, mut w) = (shape.channels, shape.height, shape.width);
        let mut down = Vec::new();
        for (j, &co) in conv.channels.iter().enumerate() {
            let g = Geometry {
                k: 4,
                stride: 2,
                padding: 1,
                h,
                w,
            };
            let (oh, ow) = g.output();
            down.push(ConvSpec {
                w: find(&format!("encoder.conv.{j}.weight"))?,
                b: find(&format!("encoder.conv.{j}.bias"))?,
                c_in: c,
                c_out: co,
                g,
                size_in: c * h * w,
                size_out: co * oh * ow,
            });
            (c, h, w) = (co, oh, ow);
        }
        let mut up = Vec::new();
        let n = conv.channels.len();
        let (mut c, mut h, mut w) = (fc, fh, fw);
        for j in 0..n {
            let next = if j + 1 < n {
                conv.channels[n - 2 - j]
            } else {
                shape.channels
            };
            let g = Geometry {
                k: 4,
                stride: 2,
                padding: 1,
                h: 2 * h,
                w: 2 * w,
            };
            up.push(ConvSpec {
                w: find(&format!("decoder.deconv.{j}.weight"))?,
                b: find(&format!("decoder.deconv.{j}.bias"))?,
                c_in: c,
                c_out: next,
                g,
                size_in: c * h * w,
                size_out: next * 4 * h * w,
            });
            (c, h, w) = (next, 2 * h, 2 * w);
        }
        let stack = Self {
            down,
            up,
            activation: config.activation,
        };
        Some((stack, entries))
    }

    /// Where the stack's parameters end in the flat buffer.
    fn end(&self) -> usize {
        self.down
            .iter()
            .chain(&self.up)
            .map(|c| c.b + c.c_out)
            .max()
            .unwrap_or(0)
    }
}

/// What the conv stack keeps from its forward pass for its backward pass.
#[derive(Default)]
struct ConvTape {
    /// Per encoder layer: pre-activations and outputs, `[b, size_out]`.
    enc_pre: Vec<Vec<f32>>,
    enc_post: Vec<Vec<f32>>,
    /// The decoder's input f(MLP output) `[R, features]`.
    dec_in: Vec<f32>,
    /// Per decoder layer: pre-activations (the last: the logits) and outputs `[R, size_out]`.
    dec_pre: Vec<Vec<f32>>,
    dec_post: Vec<Vec<f32>>,
    /// Gradients being walked back, and the next one down.
    g: Vec<f32>,
    g_next: Vec<f32>,
    scratch: ConvScratch,
}

/// `out[r] = conv(input[r])` for every example row.
fn conv_rows(
    p: &[f32],
    c: &ConvSpec,
    input: &[f32],
    out: &mut Vec<f32>,
    transposed: bool,
    sc: &mut ConvScratch,
) {
    let rows = input.len() / c.size_in;
    out.resize(rows * c.size_out, 0.0);
    let (g, k) = (c.g, c.g.k);
    if !transposed && g.stride == 2 && k > 1 && planar::offset_conv_is_direct(c.c_out) {
        // Stride 2 as k products over the input split by parity (planar::strided_rows: 2 k
        // values a pixel where im2col makes k^2 / 4), the weights reordered once per batch.
        let n = c.c_out * c.c_in * k * k;
        let mut wu = vec![0f32; n];
        planar::weights_by_row(&p[c.w..c.w + n], (c.c_out, c.c_in, k), &mut wu);
        let (oh, ow) = g.output();
        let mut e = vec![0f32; c.c_in * k * 2 * (oh + (k - 1) / 2) * ow];
        for (y, x) in out.chunks_mut(c.size_out).zip(input.chunks(c.size_in)) {
            for (row, &b) in y.chunks_mut(oh * ow).zip(&p[c.b..c.b + c.c_out]) {
                row.fill(b);
            }
            planar::strided_rows(x, c.c_in, (g.h, g.w), (k, g.padding), (oh, ow), &mut e);
            planar::strided_conv(y, &wu, &e, (c.c_out, c.c_in, k), (oh, ow), true);
        }
        return;
    }
    if let Some(t) = subpixel(g, c.c_in, c.c_out).filter(|_| transposed) {
        // The four output parities as stride-1 products (planar::Transposed): no col2im.
        let mut wp = vec![0f32; t.weights_len()];
        t.weights(&p[c.w..c.w + t.weights_len()], &mut wp);
        let mut e = vec![0f32; t.rows_len()];
        let mut tmp = Vec::new();
        let bias = &p[c.b..c.b + c.c_out];
        for (y, x) in out.chunks_mut(c.size_out).zip(input.chunks(c.size_in)) {
            t.rows(x, &mut e);
            t.conv(y, &wp, &e, Some(bias), &mut tmp);
        }
        return;
    }
    for (y, x) in out.chunks_mut(c.size_out).zip(input.chunks(c.size_in)) {
        let (w, b) = (&p[c.w..], &p[c.b..c.b + c.c_out]);
        if transposed {
            conv_transpose2d_forward(y, x, w, b, c.g, (c.c_in, c.c_out), sc);
        } else {
            conv2d_forward(y, x, w, b, c.g, (c.c_in, c.c_out), sc);
        }
    }
}

/// The transposed convolution of `g` (from its output's `c` channels back to its input's
/// `o`) as [`planar::Transposed`], where that runs: stride 2 doubling the size (k = 2 p + 2).
fn subpixel(g: Geometry, c: usize, o: usize) -> Option<planar::Transposed> {
    let (h, w) = g.output();
    let t = planar::Transposed { c, o, k: g.k, h, w };
    let doubles = g.stride == 2 && g.k == 2 * g.padding + 2 && (g.h, g.w) == (2 * h, 2 * w);
    (doubles && t.is_direct()).then_some(t)
}

/// Backward of [`conv_rows`]: adds every row's dW, db into `grads`; writes dx when asked.
#[allow(clippy::too_many_arguments)]
fn conv_rows_backward(
    p: &[f32],
    grads: &mut [f32],
    c: &ConvSpec,
    input: &[f32],
    dy: &[f32],
    dx: Option<&mut Vec<f32>>,
    transposed: bool,
    sc: &mut ConvScratch,
) {
    let rows = input.len() / c.size_in;
    let w = &p[c.w..];
    let (gw, gb) = grads.split_at_mut(c.b);
    let gw = &mut gw[c.w..];
    let gb = &mut gb[..c.c_out];
    let mut dx = dx;
    if let Some(d) = dx.as_deref_mut() {
        d.resize(rows * c.size_in, 0.0);
    }
    let (g, k) = (c.g, c.g.k);
    if !transposed && g.stride == 2 && k > 1 && planar::offset_weight_grad_is_direct(c.c_out) {
        // Stride 2: dW^T from the input split by parity (no im2col), summed over the batch
        // and then moved into [O, C, k, k]; dx (when asked) = the transposed convolution of dy
        // by W read as [O, C, k, k]: by sub-pixel products where they run, else col2im(W^T dy).
        let (o, ci, ck) = (c.c_out, c.c_in, c.c_in * k);
        let (oh, ow) = g.output();
        let mut e = vec![0f32; ck * 2 * (oh + (k - 1) / 2) * ow];
        let mut dwu = vec![0f32; o * ck * k];
        let sub = subpixel(g, o, ci).filter(|_| dx.is_some());
        let (mut wp, mut ed, mut tmp) = (Vec::new(), Vec::new(), Vec::new());
        if let Some(t) = sub {
            wp.resize(t.weights_len(), 0.0);
            t.weights(&w[..t.weights_len()], &mut wp);
            ed.resize(t.rows_len(), 0.0);
        }
        for r in 0..rows {
            let x = &input[r * c.size_in..(r + 1) * c.size_in];
            let dyr = &dy[r * c.size_out..(r + 1) * c.size_out];
            planar::strided_rows(x, ci, (g.h, g.w), (k, g.padding), (oh, ow), &mut e);
            planar::strided_weight_grad(&mut dwu, dyr, &e, (o, ci, k), (oh, ow));
            for (d, plane) in gb.iter_mut().zip(dyr.chunks(oh * ow)) {
                *d += crate::nn::kernels::sum(plane);
            }
            if let Some(d) = dx.as_deref_mut() {
                let dxr = &mut d[r * c.size_in..(r + 1) * c.size_in];
                match sub {
                    Some(t) => {
                        t.rows(dyr, &mut ed);
                        t.conv(dxr, &wp, &ed, None, &mut tmp);
                    }
                    None => conv2d_input_grad(dxr, w, dyr, g, (ci, o), sc),
                }
            }
        }
        planar::add_weight_grads_by_row(&dwu, (o, ci, k), gw);
        return;
    }
    if transposed
        && g.stride == 2
        && k > 1
        && planar::offset_weight_grad_is_direct(c.c_in)
        && planar::offset_conv_is_direct(c.c_in)
    {
        // A transposed convolution's backward pass is the stride-2 convolution of dy by W read
        // as a convolution's weights [C_in, C_out, k, k] (dx = W im2col(dy)) and that
        // convolution's weight gradient with x in dy's place (dW = x im2col(dy)^T): dy split
        // by parity once an example (planar::strided_rows) serves both, no im2col.
        let (ci, co, ck) = (c.c_in, c.c_out, c.c_out * k);
        let (ih, iw) = g.output();
        let mut e = vec![0f32; ck * 2 * (ih + (k - 1) / 2) * iw];
        let mut dwu = vec![0f32; ci * ck * k];
        let wu = match dx {
            Some(_) => {
                let mut wu = vec![0f32; ci * ck * k];
                planar::weights_by_row(&w[..ci * ck * k], (ci, co, k), &mut wu);
                wu
            }
            None => Vec::new(),
        };
        for r in 0..rows {
            let x = &input[r * c.size_in..(r + 1) * c.size_in];
            let dyr = &dy[r * c.size_out..(r + 1) * c.size_out];
            planar::strided_rows(dyr, co, (g.h, g.w), (k, g.padding), (ih, iw), &mut e);
            planar::strided_weight_grad(&mut dwu, x, &e, (ci, co, k), (ih, iw));
            for (d, plane) in gb.iter_mut().zip(dyr.chunks(g.h * g.w)) {
                *d += crate::nn::kernels::sum(plane);
            }
            if let Some(d) = dx.as_deref_mut() {
                let dxr = &mut d[r * c.size_in..(r + 1) * c.size_in];
                planar::strided_conv(dxr, &wu, &e, (ci, co, k), (ih, iw), false);
            }
        }
        // dW_u^T[(c_out, v), c_in] into dW[c_in, c_out, u, v].
        planar::add_weight_grads_by_row(&dwu, (ci, co, k), gw);
        return;
    }
    for r in 0..rows {
        let x = &input[r * c.size_in..(r + 1) * c.size_in];
        let g = &dy[r * c.size_out..(r + 1) * c.size_out];
        let dxr = dx
            .as_deref_mut()
            .map(|d| &mut d[r * c.size_in..(r + 1) * c.size_in]);
        if transposed {
            conv_transpose2d_backward(gw, gb, dxr, x, w, g, c.g, (c.c_in, c.c_out), sc);
        } else {
            conv2d_backward(gw, gb, dxr, x, w, g, c.g, (c.c_in, c.c_out), sc);
        }
    }
}

/// The networks' shapes and where each starts in the flat buffer.
#[derive(Debug, Clone)]
struct Model {
    d: usize,
    latents: Vec<usize>,
    /// q(z_{l+1}|z_l), l = 0..L, then p(x|z_1), p(z_l|z_{l+1}) for l = 1..L.
    nets: Vec<(MlpShape, usize)>,
    /// A convolutional VAE's convolutions (their parameters after the MLPs').
    conv: Option<ConvStack>,
    len: usize,
}

impl Model {
    fn new(config: &VaeConfig) -> Self {
        let mut offset = 0;
        let mut nets = Vec::new();
        for spec in config.networks() {
            let count = spec.shape.parameter_count();
            nets.push((spec.shape, offset));
            offset += count;
        }
        let conv = ConvStack::new(config, offset).map(|(c, _)| c);
        let len = conv.as_ref().map_or(offset, ConvStack::end);
        Self {
            d: config.input_dim,
            latents: config.latent_dims.clone(),
            nets,
            conv,
            len,
        }
    }

    fn layers(&self) -> usize {
        self.latents.len()
    }

    /// Inference network l: q(z_{l+1}|z_l).
    fn q(&self, l: usize) -> &(MlpShape, usize) {
        &self.nets[l]
    }

    /// Generative network l: p(x|z_1) for 0, p(z_l|z_{l+1}) above.
    fn p(&self, l: usize) -> &(MlpShape, usize) {
        &self.nets[self.layers() + l]
    }
}

/// The parameters of network `net` in the flat buffer `buf`.
fn region<'a>(buf: &'a [f32], net: &(MlpShape, usize)) -> &'a [f32] {
    &buf[net.1..net.1 + net.0.parameter_count()]
}

fn region_mut<'a>(buf: &'a mut [f32], net: &(MlpShape, usize)) -> &'a mut [f32] {
    &mut buf[net.1..net.1 + net.0.parameter_count()]
}

/// What one training step measured, summed over the batch (nats).
#[derive(Debug, Clone)]
pub struct StepSums {
    /// `sum_b E_q[log p(x_b|z_1)]` (K-sample mean per example).
    pub reconstruction: f64,
    /// `sum_b sum_l KL_l(x_b)`.
    pub kl: f64,
    /// `sum_b KL_l(x_b)` per stochastic layer, bottom-up.
    pub kl_layers: Vec<f64>,
    /// The loss that was differentiated: `-(1/B) sum_b [rec_b - beta kl_b]` (ELBO) or
    /// `-(1/B) sum_b IWAE_K(x_b)`.
    pub loss: f64,
}

/// Scratch buffers of one slice of a batch.
#[derive(Default)]
struct Slice {
    /// The slice's noise, per layer `[K, b, L_l]`.
    eps: Vec<Vec<f32>>,
    q_tapes: Vec<MlpTape>,
    p_tapes: Vec<MlpTape>,
    /// Samples z_l `[K b, L_l]` and their gradients.
    z: Vec<Vec<f32>>,
    dz: Vec<Vec<f32>>,
    /// Per row: log p(x|z_1), and per layer log p(z_l|.) - log q(z_l|.) (constants cancel).
    rec: Vec<f32>,
    ratio: Vec<Vec<f32>>,
    /// The top layer's closed-form KL per source row (ELBO).
    top_kl: Vec<f32>,
    /// dL/df per row.
    c: Vec<f32>,
    /// Gradients of network outputs, and of network inputs.
    dout: Vec<f32>,
    dx: Vec<f32>,
    conv: ConvTape,
}

/// Per-example results of a slice: `log sum_k e^{log w}`, `sum_k log p(x|z_1)`, and per layer
/// `sum_k KL_l` (closed form at the top).
struct SliceOut {
    lse: Vec<f64>,
    rec: Vec<f64>,
    kl: Vec<Vec<f64>>,
}

#[derive(Clone, Copy)]
enum Mode {
    /// Forward and backward of the training loss.
    Train {
        objective: Objective,
        /// The ELBO's top-layer KL (the IWAE's is always Monte Carlo).
        kl: KlEstimator,
        beta: f32,
        /// The whole batch (the loss is a mean over it).
        b_total: usize,
    },
    /// Forward only: log weights for the log p(x) estimate.
    Estimate,
}

/// The model's parameters in one flat buffer (laid out by its [`ParamTable`]) and the scratch
/// of a step. It owns no optimiser: training runs it as a [`TrainStep`] of the one training
/// loop, whose Adam updates the buffer it passes in.
pub struct FusedVae {
    model: Model,
    table: ParamTable,
    /// The model's parameters, for the standalone passes ([`FusedVae::forward_backward`],
    /// [`FusedVae::estimate_log_likelihood`]); a [`TrainStep`] reads the loop's buffer instead.
    params: Vec<f32>,
    /// The gradient of the last [`FusedVae::forward_backward`].
    grads: Vec<f32>,
    objective: Objective,
    kl: KlEstimator,
    beta: f64,
    slices: Vec<Slice>,
    /// Gradients of slices 1.. (slice 0 writes into the caller's buffer).
    slice_grads: Vec<Vec<f32>>,
    threads: usize,
    /// Threads of the next update (one after a single-threaded step).
    update_threads: usize,
}

/// The sums a VAE training step returns, over this rank's rows: `[loss, sum_b f(x_b),
/// sum_b E_q log p(x_b|z_1), sum_b KL_1(x_b), ..., sum_b KL_L(x_b)]`, f the objective per
/// example (the beta-ELBO or IWAE_K) and the loss `-(1/B) sum_b f(x_b)` over the global batch.
pub const VAE_SUMS: &str = "[loss, objective, reconstruction, KL per layer]";

/// A VAE training batch: `x` `[B, D]` row-major in [0, 1] and its noise, per stochastic layer
/// `[K, B, L_l]` (drawn as [`crate::vae::objective::draw_noise`] draws it).
pub struct VaeBatch {
    pub x: Vec<f32>,
    pub eps: Vec<Vec<f32>>,
    pub k: usize,
}

impl VaeBatch {
    /// The examples in the batch.
    pub fn len(&self, d: usize) -> usize {
        self.x.len() / d.max(1)
    }

    /// Draws the noise of `k` samples of every example of `x` (`d` values each) for a model
    /// with stochastic layers of widths `latents`, in the order of `draw_noise`.
    pub fn draw(x: Vec<f32>, d: usize, latents: &[usize], k: usize, noise: &mut Noise) -> Self {
        let b = x.len() / d.max(1);
        let eps = draw_eps(latents, k, b, noise);
        Self { x, eps, k }
    }
}

/// The noise of `k` samples of `b` examples, per stochastic layer `[K, B, L_l]`, in the order
/// of [`crate::vae::objective::draw_noise`].
fn draw_eps(latents: &[usize], k: usize, b: usize, noise: &mut Noise) -> Vec<Vec<f32>> {
    latents
        .iter()
        .map(|&l| {
            let mut e = vec![0f32; k * b * l];
            noise.fill_randn(&mut e);
            e
        })
        .collect()
}

impl FusedVae {
    /// The engine for `vae`, with a copy of its parameters.
    pub fn from_vae(vae: &Vae) -> Result<Self> {
        if !supports(vae) {
            bail!("the fused engine needs a CPU model with the Bernoulli likelihood");
        }
        let model = Model::new(&vae.config);
        let mut entries = vae.config.flat_entries();
        let mlp_len: usize = model.nets.iter().map(|(n, _)| n.parameter_count()).sum();
        if let Some((_, conv_entries)) = ConvStack::new(&vae.config, mlp_len) {
            entries.extend(conv_entries);
        }
        let (table, params) = flat_params(vae, entries, model.len)?;
        Ok(Self {
            grads: vec![0f32; model.len],
            model,
            table,
            params,
            objective: Objective::Elbo,
            kl: KlEstimator::Analytic,
            beta: 1.0,
            slices: Vec::new(),
            slice_grads: Vec::new(),
            threads: rayon::current_num_threads(),
            update_threads: rayon::current_num_threads(),
        })
    }

    /// The layout of the flat buffer (`state_dict` names).
    pub fn table(&self) -> &ParamTable {
        &self.table
    }

    /// The engine's copy of the parameters.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Replaces the engine's copy of the parameters (a buffer of its layout).
    pub fn set_params(&mut self, params: &[f32]) -> Result<()> {
        if params.len() != self.params.len() {
            bail!(
                "fused VAE: {} parameters for a buffer of {}",
                params.len(),
                self.params.len()
            );
        }
        self.params.copy_from_slice(params);
        Ok(())
    }

    /// Writes a buffer of the engine's layout into `vae`'s variables.
    pub fn write_to(&self, params: &[f32], vae: &Vae) -> Result<()> {
        self.table.write_named(params, vae.params())
    }

    /// Threads for the slices, the matrix products and the update (default: rayon's pool size).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// What the training step maximises (default: the ELBO).
    pub fn set_objective(&mut self, objective: Objective) {
        self.objective = objective;
    }

    /// How the ELBO's top-layer KL is estimated (default: in closed form).
    pub fn set_kl_estimator(&mut self, kl: KlEstimator) {
        self.kl = kl;
    }

    /// The ELBO's KL weight beta of a [`TrainStep`] (default 1).
    pub fn set_beta(&mut self, beta: f64) {
        self.beta = beta;
    }

    /// The gradient of the last [`FusedVae::forward_backward`], by `state_dict` name.
    pub fn gradients(&self) -> Vec<(String, Vec<f32>)> {
        self.table
            .entries()
            .iter()
            .map(|e| (e.name.clone(), self.grads[e.range()].to_vec()))
            .collect()
    }

    /// The flat gradient of the last [`FusedVae::forward_backward`] (the table's layout).
    pub fn flat_gradient(&self) -> &[f32] {
        &self.grads
    }

    /// Floating-point operations (2 per multiply-add) of the forward pass over `batch`
    /// examples with `k` samples each: the encoder's convolutions and q(z_1|x) on the
    /// `batch` rows, the other networks and the decoder's transposed convolutions on the
    /// `k batch` rows. A convolution's multiply-adds are `C_in C_out k^2` per output pixel
    /// (per input pixel for a transposed one). A training step is counted as three forward
    /// passes less the first layer's dx ([`FusedVae::train_flops`]); see `bench/run`'s "% of
    /// peak".
    pub fn forward_flops(&self, batch: usize, k: usize) -> f64 {
        let m = &self.model;
        let mlp = |net: &(MlpShape, usize)| -> f64 {
            let s = &net.0.sizes;
            s.windows(2).map(|w| (w[0] * w[1]) as f64).sum()
        };
        let (rows, krows) = (batch as f64, (batch * k) as f64);
        let mut macs = 0.0;
        for l in 0..m.layers() {
            macs += mlp(m.q(l)) * if l == 0 { rows } else { krows } + mlp(m.p(l)) * krows;
        }
        if let Some(conv) = &m.conv {
            macs += conv.down.iter().map(ConvSpec::macs).sum::<f64>() * rows;
            macs += conv.up.iter().map(ConvSpec::macs).sum::<f64>() * krows;
        }
        2.0 * macs
    }

    /// Floating-point operations of a training step over `batch` examples with `k` samples
    /// each: the forward pass, dW and dx of every layer ([`FusedVae::forward_flops`] three
    /// times) less the first layer's dx, which the data does not need.
    pub fn train_flops(&self, batch: usize, k: usize) -> f64 {
        let m = &self.model;
        let first = match &m.conv {
            Some(conv) => conv.down.first().map_or(0.0, ConvSpec::macs),
            None => {
                let s = &m.q(0).0.sizes;
                (s[0] * s[1]) as f64
            }
        };
        3.0 * self.forward_flops(batch, k) - 2.0 * first * batch as f64
    }

    fn batch_size(&self, x: &[f32], k: usize) -> Result<usize> {
        let d = self.model.d;
        if k == 0 || x.is_empty() || !x.len().is_multiple_of(d) {
            bail!(
                "fused VAE: x has {} values, expected a multiple of {d}, K = {k}",
                x.len()
            );
        }
        Ok(x.len() / d)
    }

    /// Runs `mode` over the batch `x` `[b, D]` with its noise `eps` (per layer `[K, b, L]`),
    /// one slice of examples per thread; returns the per-example results in batch order. In
    /// training the gradient is written into `grads`.
    fn run(
        &mut self,
        params: &[f32],
        x: &[f32],
        eps: &[Vec<f32>],
        k: usize,
        mode: Mode,
        grads: Option<&mut [f32]>,
    ) -> SliceOut {
        let (d, b) = (self.model.d, x.len() / self.model.d);
        let slices = if self.threads > 1 && b >= MIN_SLICE_EXAMPLES * 2 {
            self.threads.min(b / MIN_SLICE_EXAMPLES)
        } else {
            1
        };
        let per = b.div_ceil(slices);
        let slices = b.div_ceil(per);
        self.slices.resize_with(slices, Slice::default);
        for (i, s) in self.slices.iter_mut().enumerate() {
            let (from, to) = (i * per, ((i + 1) * per).min(b));
            gather_noise(eps, &self.model.latents, k, b, from, to, &mut s.eps);
        }
        let train = grads.is_some();
        if train {
            self.slice_grads.resize_with(slices - 1, Vec::new);
            for g in &mut self.slice_grads {
                g.resize(self.model.len, 0.0);
            }
        }
        // One slice: its products are split across the threads only when they are big enough
        // to repay the hand-offs (measured at batch 20 on 2 cores: 0.79 ms on one thread, 1.29
        // on two for k = 1; 1.99 and 2.16 for k = 5).
        let threads = if slices == 1 && k * b >= MIN_THREADED_ROWS {
            self.threads
        } else {
            1
        };
        // The update follows suit: a step this small is done on one thread from start to end.
        self.update_threads = if slices == 1 && threads == 1 {
            1
        } else {
            self.threads
        };
        let model = &self.model;
        let (outs, grads): (Vec<SliceOut>, Option<&mut [f32]>) = if slices == 1 {
            let mut grads = grads;
            let out = run_slice(
                model,
                params,
                x,
                k,
                mode,
                &mut self.slices[0],
                grads.as_deref_mut(),
                threads,
            );
            (vec![out], grads)
        } else {
            let mut grads = grads;
            let mut all: Vec<Option<&mut [f32]>> = Vec::new();
            match grads.as_deref_mut() {
                Some(g) => {
                    all.push(Some(g));
                    all.extend(self.slice_grads.iter_mut().map(|g| Some(&mut g[..])));
                }
                None => all.resize_with(slices, || None),
            }
            let outs = all
                .into_par_iter()
                .zip(self.slices.par_iter_mut())
                .zip(x.par_chunks(per * d))
                .map(|((g, s), xs)| run_slice(model, params, xs, k, mode, s, g, 1))
                .collect();
            (outs, grads)
        };
        if let Some(grads) = grads
            && slices > 1
        {
            let piece = self.model.len.div_ceil(self.threads);
            let others = &self.slice_grads;
            grads
                .par_chunks_mut(piece)
                .enumerate()
                .for_each(|(c, dst)| {
                    for g in others {
                        add_assign(dst, &g[c * piece..c * piece + dst.len()]);
                    }
                });
        }
        let mut all = SliceOut {
            lse: Vec::with_capacity(b),
            rec: Vec::with_capacity(b),
            kl: vec![Vec::with_capacity(b); self.model.layers()],
        };
        for o in outs {
            all.lse.extend(o.lse);
            all.rec.extend(o.rec);
            for (a, l) in all.kl.iter_mut().zip(o.kl) {
                a.extend(l);
            }
        }
        all
    }

    /// Forward and backward of the loss with the engine's parameters, the noise drawn from
    /// `noise` as [`crate::vae::objective::draw_noise`] draws it; leaves the gradient in the
    /// engine ([`FusedVae::gradients`]). `x` `[B, D]` row-major in [0, 1].
    pub fn forward_backward(
        &mut self,
        x: &[f32],
        k: usize,
        beta: f64,
        noise: &mut Noise,
    ) -> Result<StepSums> {
        let b = self.batch_size(x, k)?;
        let batch = VaeBatch::draw(x.to_vec(), self.model.d, &self.model.latents, k, noise);
        let params = std::mem::take(&mut self.params);
        let mut grads = std::mem::take(&mut self.grads);
        let sums = self.forward_backward_rows(&params, &batch, 0..b, beta, &mut grads);
        (self.params, self.grads) = (params, grads);
        let sums = sums?;
        let kl = sums[3..].iter().sum::<f64>();
        Ok(StepSums {
            reconstruction: sums[2],
            kl,
            kl_layers: sums[3..].to_vec(),
            loss: sums[0],
        })
    }

    /// One standalone training step on the engine's parameters: [`FusedVae::forward_backward`]
    /// and, when the loss is finite, `adam`'s update (an Adam over [`FusedVae::table`]).
    pub fn train_step(
        &mut self,
        x: &[f32],
        k: usize,
        beta: f64,
        noise: &mut Noise,
        adam: &mut Adam,
    ) -> Result<StepSums> {
        let sums = self.forward_backward(x, k, beta, noise)?;
        if sums.loss.is_finite() {
            adam.step(&mut self.params, &self.grads, self.update_threads)?;
        }
        Ok(sums)
    }

    /// Forward and backward of rows `rows` of `batch` (the loss the mean over the whole
    /// batch) with parameters `params`; writes this rank's share of the gradient into `grads`
    /// and returns its sums [`VAE_SUMS`].
    fn forward_backward_rows(
        &mut self,
        params: &[f32],
        batch: &VaeBatch,
        rows: std::ops::Range<usize>,
        beta: f64,
        grads: &mut [f32],
    ) -> Result<Vec<f64>> {
        let k = batch.k;
        let b = self.batch_size(&batch.x, k)?;
        if rows.end > b || rows.start > rows.end {
            bail!("fused VAE: rows {rows:?} of a batch of {b}");
        }
        if params.len() != self.model.len || grads.len() != self.model.len {
            bail!(
                "fused VAE: {} parameters, {} gradients for a buffer of {}",
                params.len(),
                grads.len(),
                self.model.len
            );
        }
        let objective = self.objective;
        let mode = Mode::Train {
            objective,
            kl: self.kl,
            beta: if objective == Objective::Iwae {
                1.0
            } else {
                beta as f32
            },
            b_total: b,
        };
        let d = self.model.d;
        let out = if rows.is_empty() {
            // More ranks than examples: this one contributes nothing.
            grads.fill(0.0);
            SliceOut {
                lse: Vec::new(),
                rec: Vec::new(),
                kl: vec![Vec::new(); self.model.layers()],
            }
        } else {
            let mut mine = Vec::new();
            let latents = &self.model.latents;
            gather_noise(&batch.eps, latents, k, b, rows.start, rows.end, &mut mine);
            let x = &batch.x[rows.start * d..rows.end * d];
            self.run(params, x, &mine, k, mode, Some(grads))
        };
        let kf = k as f64;
        let reconstruction = out.rec.iter().sum::<f64>() / kf;
        let kl_layers: Vec<f64> = out.kl.iter().map(|l| l.iter().sum::<f64>() / kf).collect();
        let kl = kl_layers.iter().sum::<f64>();
        let objective_sum = match objective {
            Objective::Elbo => reconstruction - beta * kl,
            Objective::Iwae => out.lse.iter().map(|l| l - kf.ln()).sum::<f64>(),
        };
        let mut sums = vec![-objective_sum / b as f64, objective_sum, reconstruction];
        sums.extend(kl_layers);
        Ok(sums)
    }

    /// The importance-sampled log p(x) of `engine::estimate_log_likelihood`: same noise,
    /// same chunks of at most `max_rows` decoded rows, log-sum-exp accumulated in f64.
    /// `x` `[B, D]`.
    pub fn estimate_log_likelihood(
        &mut self,
        x: &[f32],
        k: usize,
        max_rows: usize,
        noise: &mut Noise,
    ) -> Result<LikelihoodEstimate> {
        let b = self.batch_size(x, k)?;
        let chunk = (max_rows / b.max(1)).clamp(1, k);
        let mut lse = vec![f64::NEG_INFINITY; b];
        let mut rec = vec![0f64; b];
        let mut kl = vec![vec![0f64; b]; self.model.layers()];
        let mut done = 0;
        let params = std::mem::take(&mut self.params);
        while done < k {
            let kc = chunk.min(k - done);
            let eps = draw_eps(&self.model.latents, kc, b, noise);
            let out = self.run(&params, x, &eps, kc, Mode::Estimate, None);
            for i in 0..b {
                lse[i] = log_add_exp(lse[i], out.lse[i]);
                rec[i] += out.rec[i];
            }
            for (acc, l) in kl.iter_mut().zip(&out.kl) {
                add_f64(acc, l);
            }
            done += kc;
        }
        self.params = params;
        Ok(LikelihoodEstimate::from_sums(lse, rec, kl, k))
    }
}

impl TrainStep for FusedVae {
    type Batch = VaeBatch;

    fn table(&self) -> &ParamTable {
        &self.table
    }

    fn read_params(&self) -> Result<Vec<f32>> {
        Ok(self.params.clone())
    }

    fn loss_and_grads(
        &mut self,
        params: &[f32],
        batch: &VaeBatch,
        rows: std::ops::Range<usize>,
        grads: &mut [f32],
    ) -> Result<Vec<f64>> {
        self.forward_backward_rows(params, batch, rows, self.beta, grads)
    }

    fn update_threads(&self) -> usize {
        self.update_threads
    }
}

fn add_f64(dst: &mut [f64], src: &[f64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// Sample rows (K x B) below which one slice runs single-threaded products.
const MIN_THREADED_ROWS: usize = 256;

/// Examples per slice below which a batch is not cut (the hand-off costs more).
const MIN_SLICE_EXAMPLES: usize = 16;

/// The table of the `state_dict` entries `(name, offset, shape)` of a buffer of `len` values,
/// and `vae`'s parameters read into such a buffer.
pub(crate) fn flat_params(
    vae: &Vae,
    entries: Entries,
    len: usize,
) -> Result<(ParamTable, Vec<f32>)> {
    let entries = entries
        .into_iter()
        .map(|(name, offset, shape)| ParamEntry {
            name,
            shape,
            offset,
        })
        .collect();
    let table = ParamTable::with_offsets(entries, len)?;
    let named: std::collections::HashMap<String, Tensor> = vae
        .params()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let mut params = vec![0f32; len];
    table.read(&named, "", "the VAE", &mut params)?;
    Ok((table, params))
}

/// Copies the noise of examples `from..to` out of the batch's `[K, B, L]` per layer.
pub(crate) fn gather_noise(
    eps: &[Vec<f32>],
    latents: &[usize],
    k: usize,
    b: usize,
    from: usize,
    to: usize,
    out: &mut Vec<Vec<f32>>,
) {
    out.resize_with(latents.len(), Vec::new);
    for ((src, dst), &l) in eps.iter().zip(out.iter_mut()).zip(latents) {
        dst.clear();
        for ki in 0..k {
            dst.extend_from_slice(&src[(ki * b + from) * l..(ki * b + to) * l]);
        }
    }
}

/// z = m + e^{lv/2} eps for `rows` rows; the Gaussian of row r is row `r % sources` of `ml`
/// `[sources, 2L]` (sources = b for q(z_1|x), shared by the K samples; = rows above).
fn reparameterize(ml: &[f32], eps: &[f32], sources: usize, l: usize, z: &mut Vec<f32>) {
    z.resize(eps.len(), 0.0);
    for (row, (zr, er)) in z.chunks_mut(l).zip(eps.chunks(l)).enumerate() {
        let src = row % sources;
        let (mu, lv) = ml[src * 2 * l..(src + 1) * 2 * l].split_at(l);
        for i in 0..l {
            zr[i] = mu[i] + (0.5 * lv[i]).exp() * er[i];
        }
    }
}

/// Forward (and in training, backward) of one slice: `x` `[b, D]`, `s.eps` its noise, `s`
/// the activation record. Stage by stage, each a forward/backward pair: the conv encoder
/// ([`conv_encode`]), the inference MLPs and the reparameterization ([`infer_forward`]), the
/// generative MLPs and the conv decoder ([`generate_forward`]), the likelihood
/// ([`likelihood_forward`]), the densities ([`density_ratios`]); backward through the loss's
/// weights ([`loss_weights`]), [`likelihood_backward`], [`prior_backward`] and
/// [`inference_backward`]. Writes the slice's share of the gradient into `grads`
/// (overwriting every value).
#[allow(clippy::too_many_arguments)]
fn run_slice(
    model: &Model,
    p: &[f32],
    x: &[f32],
    k: usize,
    mode: Mode,
    s: &mut Slice,
    grads: Option<&mut [f32]>,
    threads: usize,
) -> SliceOut {
    let layers = model.layers();
    let b = x.len() / model.d;
    let rows = k * b;
    s.q_tapes.resize_with(layers, MlpTape::default);
    s.p_tapes.resize_with(layers, MlpTape::default);
    s.z.resize_with(layers, Vec::new);
    s.dz.resize_with(layers, Vec::new);
    s.ratio.resize_with(layers, Vec::new);

    if let Some(conv) = &model.conv {
        conv_encode(conv, p, x, &mut s.conv);
    }
    infer_forward(model, p, x, b, s, threads);
    generate_forward(model, p, rows, s, threads);
    // The logits leave their tape for the per-row pass and its gradient, and go back after.
    let last = s.p_tapes[0].post.len() - 1;
    let mut logits = match &model.conv {
        Some(_) => std::mem::take(s.conv.dec_pre.last_mut().expect("a decoder layer")),
        None => std::mem::take(&mut s.p_tapes[0].post[last]),
    };
    likelihood_forward(model.d, x, k, mode, &mut logits, &mut s.rec);
    density_ratios(model, b, s);
    let out = slice_results(model, b, mode, s);

    if let (
        Mode::Train {
            objective,
            kl,
            beta,
            b_total,
        },
        Some(grads),
    ) = (mode, grads)
    {
        loss_weights(model.d, x, objective, k, b_total, &out, &mut logits, s);
        for (l, dz) in s.dz.iter_mut().enumerate() {
            dz.clear();
            dz.resize(rows * model.latents[l], 0.0);
        }
        if let Some(conv) = &model.conv {
            // The conv layers' gradients are sums over rows: start them at zero.
            let start = conv.down.iter().chain(&conv.up).map(|c| c.w).min();
            grads[start.unwrap_or(0)..model.len].fill(0.0);
        }
        likelihood_backward(model, p, grads, &logits, rows, s, threads);
        restore_logits(model, s, last, logits);
        prior_backward(model, p, grads, rows, beta, s, threads);
        // The ELBO's closed-form top KL is differentiated with the inference network; else the
        // top prior by Monte Carlo: log p(z_L), weighted a = c beta: d z_L -= a z_L.
        let closed_form_top = objective == Objective::Elbo && kl == KlEstimator::Analytic;
        if !closed_form_top {
            let top = layers - 1;
            let lat = model.latents[top];
            for r in 0..rows {
                let a = s.c[r] * beta;
                for i in 0..lat {
                    let j = r * lat + i;
                    s.dz[top][j] -= a * s.z[top][j];
                }
            }
        }
        for l in (0..layers).rev() {
            inference_backward(model, p, grads, x, l, beta, closed_form_top, s, threads);
        }
    } else {
        restore_logits(model, s, last, logits);
    }
    out
}

/// A convolutional VAE's encoder: `x` -> features (the first MLP's input), `h_{j+1} =
/// f(conv_j(h_j))`, each layer's pre-activation and output kept in `t`.
fn conv_encode(conv: &ConvStack, p: &[f32], x: &[f32], t: &mut ConvTape) {
    t.enc_pre.resize_with(conv.down.len(), Vec::new);
    t.enc_post.resize_with(conv.down.len(), Vec::new);
    for (j, c) in conv.down.iter().enumerate() {
        let (done, rest) = t.enc_post.split_at_mut(j);
        let input: &[f32] = if j == 0 { x } else { &done[j - 1] };
        conv_rows(p, c, input, &mut t.enc_pre[j], false, &mut t.scratch);
        rest[0].resize(t.enc_pre[j].len(), 0.0);
        conv.activation.forward(&t.enc_pre[j], &mut rest[0]);
    }
}

/// Inference, bottom-up: `[m; lv]` of q(z_l|z_{l-1}) on the b examples (l = 0) or the K b
/// rows above, and `z_l = m + e^{lv/2} eps` into `s.z[l]` `[K b, L_l]`.
fn infer_forward(model: &Model, p: &[f32], x: &[f32], b: usize, s: &mut Slice, threads: usize) {
    let rows = s.eps[0].len() / model.latents[0];
    for l in 0..model.layers() {
        let (shape, _) = model.q(l);
        let (below, here) = s.z.split_at_mut(l);
        let first_input: &[f32] = match &model.conv {
            Some(_) => s.conv.enc_post.last().map_or(x, Vec::as_slice),
            None => x,
        };
        let (input, src_rows): (&[f32], usize) = if l == 0 {
            (first_input, b)
        } else {
            (&below[l - 1], rows)
        };
        let tape = &mut s.q_tapes[l];
        let ml = mlp_forward(shape, region(p, model.q(l)), input, src_rows, tape, threads);
        reparameterize(ml, &s.eps[l], src_rows, model.latents[l], &mut here[0]);
    }
}

/// Generation: the logits of p(x|z_1) (through a convolutional VAE's decoder, `u_0 = f(MLP
/// output)`, `u_{j+1} = f(deconv_j(u_j))`, the last pre-activation the logits) and `[m; lv]`
/// of p(z_{l-1}|z_l), on `rows` rows.
fn generate_forward(model: &Model, p: &[f32], rows: usize, s: &mut Slice, threads: usize) {
    for l in 0..model.layers() {
        let (shape, _) = model.p(l);
        let tape = &mut s.p_tapes[l];
        mlp_forward(shape, region(p, model.p(l)), &s.z[l], rows, tape, threads);
    }
    let Some(conv) = &model.conv else {
        return;
    };
    let t = &mut s.conv;
    let features = q_output(&s.p_tapes[0]);
    t.dec_in.resize(features.len(), 0.0);
    conv.activation.forward(features, &mut t.dec_in);
    t.dec_pre.resize_with(conv.up.len(), Vec::new);
    t.dec_post.resize_with(conv.up.len(), Vec::new);
    for (j, c) in conv.up.iter().enumerate() {
        let (done, rest) = t.dec_post.split_at_mut(j);
        let input: &[f32] = if j == 0 { &t.dec_in } else { &done[j - 1] };
        conv_rows(p, c, input, &mut t.dec_pre[j], true, &mut t.scratch);
        if j + 1 < conv.up.len() {
            rest[0].resize(t.dec_pre[j].len(), 0.0);
            conv.activation.forward(&t.dec_pre[j], &mut rest[0]);
        }
    }
}

/// `rec[r] = log p(x|z_1)` (Bernoulli) per row; in ELBO training, the logits become their
/// gradient `c (x - sigmoid(l))` with `c = -1/(K B)` in the same pass.
fn likelihood_forward(
    d: usize,
    x: &[f32],
    k: usize,
    mode: Mode,
    logits: &mut [f32],
    rec: &mut Vec<f32>,
) {
    let b = x.len() / d;
    rec.resize(k * b, 0.0);
    let fused_grad = match mode {
        Mode::Train {
            objective: Objective::Elbo,
            b_total,
            ..
        } => Some(1.0 / (k * b_total) as f32),
        _ => None,
    };
    for (r, (row, rec)) in logits.chunks_mut(d).zip(rec.iter_mut()).enumerate() {
        let xb = &x[(r % b) * d..(r % b + 1) * d];
        *rec = match fused_grad {
            Some(scale) => bce_logits_grad(row, xb, scale),
            None => bernoulli_log_prob(xb, row),
        };
    }
}

/// Per row and layer, `log p(z_l|.) - log q(z_l|.)` (constants cancel; with z = m + sigma eps,
/// log q = -1/2 sum (lv + eps^2)), and the top layer's closed-form KL per source row.
fn density_ratios(model: &Model, b: usize, s: &mut Slice) {
    let layers = model.layers();
    let top = layers - 1;
    let rows = s.rec.len();
    for l in 0..layers {
        let lat = model.latents[l];
        let ml = q_output(&s.q_tapes[l]);
        let src_rows = if l == 0 { b } else { rows };
        let ratio = &mut s.ratio[l];
        ratio.resize(rows, 0.0);
        for r in 0..rows {
            let src = r % src_rows;
            let lv = &ml[src * 2 * lat + lat..(src + 1) * 2 * lat];
            let eps = &s.eps[l][r * lat..(r + 1) * lat];
            let z = &s.z[l][r * lat..(r + 1) * lat];
            let mut log_q = 0f32;
            for i in 0..lat {
                log_q -= 0.5 * (lv[i] + eps[i] * eps[i]);
            }
            let log_p = if l == top {
                -0.5 * z.iter().map(|v| v * v).sum::<f32>()
            } else {
                let pm = q_output(&s.p_tapes[l + 1]);
                let (m, plv) = pm[r * 2 * lat..(r + 1) * 2 * lat].split_at(lat);
                let mut acc = 0f32;
                for i in 0..lat {
                    let dz = z[i] - m[i];
                    acc -= 0.5 * (plv[i] + dz * dz * (-plv[i]).exp());
                }
                acc
            };
            ratio[r] = log_p - log_q;
        }
    }
    let (top_lat, top_src) = (model.latents[top], if top == 0 { b } else { rows });
    let top_ml = q_output(&s.q_tapes[top]);
    s.top_kl.clear();
    s.top_kl
        .extend(top_ml.chunks(2 * top_lat).take(top_src).map(|row| {
            let (mu, lv) = row.split_at(top_lat);
            -0.5 * mu
                .iter()
                .zip(lv)
                .map(|(&m, &v)| 1.0 + v - m * m - v.exp())
                .sum::<f32>()
        }));
}

/// Per example: `log sum_k e^{log w}`, `sum_k log p(x|z_1)` and per layer `sum_k KL_l` (the
/// top's in closed form, except for the ELBO trained with a Monte Carlo top KL, which reports
/// the estimate it differentiates).
fn slice_results(model: &Model, b: usize, mode: Mode, s: &Slice) -> SliceOut {
    let layers = model.layers();
    let top = layers - 1;
    let rows = s.rec.len();
    let top_src = if top == 0 { b } else { rows };
    let mc_top = matches!(
        mode,
        Mode::Train {
            objective: Objective::Elbo,
            kl: KlEstimator::MonteCarlo,
            ..
        }
    );
    let mut out = SliceOut {
        lse: vec![f64::NEG_INFINITY; b],
        rec: vec![0.0; b],
        kl: vec![vec![0.0; b]; layers],
    };
    for r in 0..rows {
        let bi = r % b;
        let log_w = s.rec[r] as f64 + s.ratio.iter().map(|v| v[r] as f64).sum::<f64>();
        out.lse[bi] = log_add_exp(out.lse[bi], log_w);
        out.rec[bi] += s.rec[r] as f64;
        for l in 0..top {
            out.kl[l][bi] -= s.ratio[l][r] as f64;
        }
        out.kl[top][bi] += match mc_top {
            true => -s.ratio[top][r] as f64,
            false => s.top_kl[r % top_src] as f64,
        };
    }
    out
}

/// `c_r = dloss/df_r` per row into `s.c`: `-1/(K B)` for the ELBO, `-(1/B) w~_kb` (the
/// normalised weights) for the IWAE, whose logits' gradient `c (x - sigmoid(l))` is taken
/// here (the ELBO's was taken with the likelihood).
#[allow(clippy::too_many_arguments)]
fn loss_weights(
    d: usize,
    x: &[f32],
    objective: Objective,
    k: usize,
    b_total: usize,
    out: &SliceOut,
    logits: &mut [f32],
    s: &mut Slice,
) {
    let b = x.len() / d;
    let rows = k * b;
    s.c.resize(rows, 0.0);
    match objective {
        Objective::Elbo => s.c.fill(-1.0 / (k * b_total) as f32),
        Objective::Iwae => {
            for r in 0..rows {
                let bi = r % b;
                let log_w = s.rec[r] as f64 + s.ratio.iter().map(|v| v[r] as f64).sum::<f64>();
                s.c[r] = (-(log_w - out.lse[bi]).exp() / b_total as f64) as f32;
            }
            // d logits = c (x - sigmoid(l)) = (-c) (sigmoid(l) - x).
            for (r, row) in logits.chunks_mut(d).enumerate() {
                let xb = &x[(r % b) * d..(r % b + 1) * d];
                bce_logits_grad(row, xb, -s.c[r]);
            }
        }
    }
}

/// p(x|z_1): backward from d logits (through the decoder's transposed convolutions first) to
/// the parameters of the first generative MLP and `d z_1`.
fn likelihood_backward(
    model: &Model,
    p: &[f32],
    grads: &mut [f32],
    logits: &[f32],
    rows: usize,
    s: &mut Slice,
    threads: usize,
) {
    if let Some(conv) = &model.conv {
        let t = &mut s.conv;
        t.g.clear();
        t.g.extend_from_slice(logits);
        for (j, c) in conv.up.iter().enumerate().rev() {
            if j + 1 < conv.up.len() {
                conv.activation
                    .backward(&mut t.g, &t.dec_pre[j], &t.dec_post[j]);
            }
            let input: &[f32] = if j == 0 {
                &t.dec_in
            } else {
                &t.dec_post[j - 1]
            };
            let dx = Some(&mut t.g_next);
            conv_rows_backward(p, grads, c, input, &t.g, dx, true, &mut t.scratch);
            std::mem::swap(&mut t.g, &mut t.g_next);
        }
        // Through u_0 = f(MLP output): d(MLP output) = g f'.
        conv.activation
            .backward(&mut t.g, q_output(&s.p_tapes[0]), &t.dec_in);
    }
    let net = model.p(0);
    let dy: &[f32] = if model.conv.is_some() {
        &s.conv.g
    } else {
        logits
    };
    let g = region_mut(grads, net);
    let tape = &mut s.p_tapes[0];
    let dx = Some(&mut s.dx);
    mlp_backward(
        &net.0,
        region(p, net),
        g,
        &s.z[0],
        rows,
        tape,
        dy,
        dx,
        threads,
    );
    add_assign(&mut s.dz[0], &s.dx);
}

/// p(z_{l-1}|z_l) for l >= 1: the density of z_{l-1}, weighted a = c beta, back to the MLP's
/// parameters, `d z_{l-1}` and `d z_l`.
fn prior_backward(
    model: &Model,
    p: &[f32],
    grads: &mut [f32],
    rows: usize,
    beta: f32,
    s: &mut Slice,
    threads: usize,
) {
    for l in 1..model.layers() {
        let lat = model.latents[l - 1];
        let pm = q_output(&s.p_tapes[l]);
        let dout = &mut s.dout;
        dout.resize(rows * 2 * lat, 0.0);
        let z = &s.z[l - 1];
        let dz = &mut s.dz[l - 1];
        for r in 0..rows {
            let a = s.c[r] * beta;
            let (m, lv) = pm[r * 2 * lat..(r + 1) * 2 * lat].split_at(lat);
            let (dm, dlv) = dout[r * 2 * lat..(r + 1) * 2 * lat].split_at_mut(lat);
            for i in 0..lat {
                let diff = z[r * lat + i] - m[i];
                let inv_var = (-lv[i]).exp();
                dm[i] = a * diff * inv_var;
                dlv[i] = a * 0.5 * (diff * diff * inv_var - 1.0);
                dz[r * lat + i] -= a * diff * inv_var;
            }
        }
        let net = model.p(l);
        let g = region_mut(grads, net);
        let (tape, dx) = (&mut s.p_tapes[l], Some(&mut s.dx));
        mlp_backward(
            &net.0,
            region(p, net),
            g,
            &s.z[l],
            rows,
            tape,
            &s.dout,
            dx,
            threads,
        );
        add_assign(&mut s.dz[l], &s.dx);
    }
}

/// Inference network `l`: `d [m; lv]` from the reparameterization, `- log q` (and at the top,
/// the ELBO's closed-form KL), back through the MLP (and for l = 0 a convolutional VAE's
/// encoder) to its parameters and `d z_{l-1}`.
#[allow(clippy::too_many_arguments)]
fn inference_backward(
    model: &Model,
    p: &[f32],
    grads: &mut [f32],
    x: &[f32],
    l: usize,
    beta: f32,
    closed_form_top: bool,
    s: &mut Slice,
    threads: usize,
) {
    let b = x.len() / model.d;
    let rows = s.rec.len();
    let lat = model.latents[l];
    let src_rows = if l == 0 { b } else { rows };
    let ml = q_output(&s.q_tapes[l]);
    let dout = &mut s.dout;
    dout.clear();
    dout.resize(src_rows * 2 * lat, 0.0);
    let closed_form = l == model.layers() - 1 && closed_form_top;
    for r in 0..rows {
        let src = r % src_rows;
        let (_, lv) = ml[src * 2 * lat..(src + 1) * 2 * lat].split_at(lat);
        let (dm, dlv) = dout[src * 2 * lat..(src + 1) * 2 * lat].split_at_mut(lat);
        // - log q = 1/2 sum (lv + eps^2): d lv += a / 2 (the ELBO's top layer is closed form).
        let a_q = if closed_form {
            0.0
        } else {
            0.5 * s.c[r] * beta
        };
        for i in 0..lat {
            let j = r * lat + i;
            let g = s.dz[l][j];
            dm[i] += g;
            dlv[i] += 0.5 * g * s.eps[l][j] * (0.5 * lv[i]).exp() + a_q;
        }
    }
    if closed_form {
        // - beta KL(N(m, e^lv) || N(0, I)), weighted by C = the sum of c over the rows of
        // each source: d m -= C beta m, d lv -= C beta (e^lv - 1) / 2.
        for src in 0..src_rows {
            let c_sum: f32 = (0..rows / src_rows).map(|j| s.c[j * src_rows + src]).sum();
            let (m, lv) = ml[src * 2 * lat..(src + 1) * 2 * lat].split_at(lat);
            let (dm, dlv) = dout[src * 2 * lat..(src + 1) * 2 * lat].split_at_mut(lat);
            for i in 0..lat {
                dm[i] -= c_sum * beta * m[i];
                dlv[i] -= c_sum * beta * 0.5 * (lv[i].exp() - 1.0);
            }
        }
    }
    let net = model.q(l);
    let g = region_mut(grads, net);
    if l > 0 {
        let (tape, dx) = (&mut s.q_tapes[l], Some(&mut s.dx));
        let input = &s.z[l - 1];
        mlp_backward(
            &net.0,
            region(p, net),
            g,
            input,
            rows,
            tape,
            &s.dout,
            dx,
            threads,
        );
        add_assign(&mut s.dz[l - 1], &s.dx);
        return;
    }
    let Some(conv) = &model.conv else {
        let tape = &mut s.q_tapes[0];
        mlp_backward(
            &net.0,
            region(p, net),
            g,
            x,
            b,
            tape,
            &s.dout,
            None,
            threads,
        );
        return;
    };
    // The encoder: d features from the first MLP, then back through the convolutions.
    let t = &mut s.conv;
    let features = t.enc_post.last().expect("an encoder layer");
    let (tape, dfeat) = (&mut s.q_tapes[0], Some(&mut t.g));
    mlp_backward(
        &net.0,
        region(p, net),
        g,
        features,
        b,
        tape,
        &s.dout,
        dfeat,
        threads,
    );
    for (j, c) in conv.down.iter().enumerate().rev() {
        conv.activation
            .backward(&mut t.g, &t.enc_pre[j], &t.enc_post[j]);
        let input: &[f32] = if j == 0 { x } else { &t.enc_post[j - 1] };
        let dx = (j > 0).then_some(&mut t.g_next);
        conv_rows_backward(p, grads, c, input, &t.g, dx, false, &mut t.scratch);
        std::mem::swap(&mut t.g, &mut t.g_next);
    }
}

/// Puts the logits back where the forward pass left them (the tape they were taken from).
fn restore_logits(model: &Model, s: &mut Slice, last: usize, logits: Vec<f32>) {
    match &model.conv {
        Some(_) => *s.conv.dec_pre.last_mut().expect("a decoder layer") = logits,
        None => s.p_tapes[0].post[last] = logits,
    }
}

/// The output of the network a tape holds (its last layer's).
fn q_output(tape: &MlpTape) -> &[f32] {
    &tape.post[tape.post.len() - 1]
}
