//! The fused CPU engine of the VAE family ([`crate::vae::model`]): any number of stochastic
//! layers, MLPs of any depth, width and activation, convolutional encoders and decoders (stride-2
//! convolutions and transposed convolutions of [`crate::nn::conv`]), the Bernoulli likelihood,
//! the ELBO and the IWAE objectives with K samples, and Adam, in one flat parameter buffer and scratch buffers
//! reused from step to step. Each network runs on [`crate::nn::mlp`] (one `gemm` call per
//! product); the densities, the reparameterization and their backward passes are fused loops.
//!
//! It computes what the candle autodiff path computes ([`crate::vae::objective`] +
//! `loss.backward()` + [`crate::optim::Adam`], and `estimate_log_likelihood_candle`), draws
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
use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::distributions::Noise;
use crate::nn::activation::Activation;
use crate::nn::conv::{
    ConvScratch, Geometry, conv_transpose2d_backward, conv_transpose2d_forward, conv2d_backward,
    conv2d_forward,
};
use crate::nn::kernels::{add_assign, bce_logits_grad, bernoulli_log_prob};
use crate::nn::mlp::{MlpShape, MlpTape, mlp_backward, mlp_forward};
use crate::optim::{Adam, AdamConfig};
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
    for (y, x) in out.chunks_mut(c.size_out).zip(input.chunks(c.size_in)) {
        let (w, b) = (&p[c.w..], &p[c.b..c.b + c.c_out]);
        if transposed {
            conv_transpose2d_forward(y, x, w, b, c.g, (c.c_in, c.c_out), sc);
        } else {
            conv2d_forward(y, x, w, b, c.g, (c.c_in, c.c_out), sc);
        }
    }
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

/// The model's parameters in one flat buffer, with Adam's moments and the scratch of a step.
pub struct FusedVae {
    model: Model,
    entries: Vec<(String, usize, Vec<usize>)>,
    params: Vec<f32>,
    grads: Vec<f32>,
    adam_m: Vec<f32>,
    adam_v: Vec<f32>,
    adam_step: u64,
    adam: AdamConfig,
    objective: Objective,
    kl: KlEstimator,
    /// The whole batch's noise, per layer `[K, B, L_l]`.
    eps: Vec<Vec<f32>>,
    slices: Vec<Slice>,
    /// Gradients of slices 1.. (slice 0 writes into `grads`).
    slice_grads: Vec<Vec<f32>>,
    threads: usize,
    /// Threads of the next Adam update (one after a single-threaded step).
    adam_threads: usize,
}

impl FusedVae {
    /// Copies `vae`'s parameters and, if given, `adam`'s moments and step.
    pub fn from_vae(vae: &Vae, adam: Option<&Adam>, adam_config: AdamConfig) -> Result<Self> {
        if !supports(vae) {
            bail!("the fused engine needs a CPU model with the Bernoulli likelihood");
        }
        let model = Model::new(&vae.config);
        let mut entries = vae.config.flat_entries();
        let mlp_len: usize = model.nets.iter().map(|(n, _)| n.parameter_count()).sum();
        if let Some((_, conv_entries)) = ConvStack::new(&vae.config, mlp_len) {
            entries.extend(conv_entries);
        }
        let mut params = vec![0f32; model.len];
        let mut adam_m = vec![0f32; model.len];
        let mut adam_v = vec![0f32; model.len];
        let named: std::collections::HashMap<&str, &candle_core::Var> =
            vae.params().iter().map(|(n, v)| (n.as_str(), v)).collect();
        let (state, adam_step) = match adam {
            Some(a) => {
                let (tensors, step) = a.state();
                (tensors.into_iter().collect(), step)
            }
            None => (std::collections::HashMap::new(), 0),
        };
        for (name, offset, shape) in &entries {
            let len: usize = shape.iter().product();
            let copy = |t: &Tensor, dst: &mut [f32]| -> Result<()> {
                let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                dst.copy_from_slice(&v);
                Ok(())
            };
            copy(named[name.as_str()], &mut params[*offset..offset + len])?;
            if let Some(m) = state.get(&format!("adam.m.{name}")) {
                copy(m, &mut adam_m[*offset..offset + len])?;
            }
            if let Some(v) = state.get(&format!("adam.v.{name}")) {
                copy(v, &mut adam_v[*offset..offset + len])?;
            }
        }
        Ok(Self {
            grads: vec![0f32; model.len],
            model,
            entries,
            params,
            adam_m,
            adam_v,
            adam_step,
            adam: adam_config,
            objective: Objective::Elbo,
            kl: KlEstimator::Analytic,
            eps: Vec::new(),
            slices: Vec::new(),
            slice_grads: Vec::new(),
            threads: rayon::current_num_threads(),
            adam_threads: rayon::current_num_threads(),
        })
    }

    /// Writes the parameters back into `vae` and, if given, the moments and step into `adam`.
    pub fn write_to(&self, vae: &Vae, adam: Option<&mut Adam>) -> Result<()> {
        let by_name: std::collections::HashMap<&str, &candle_core::Var> =
            vae.params().iter().map(|(n, v)| (n.as_str(), v)).collect();
        let mut moments = std::collections::HashMap::new();
        for (name, offset, shape) in &self.entries {
            let len: usize = shape.iter().product();
            let var = by_name[name.as_str()];
            let slice = |buf: &[f32]| {
                Tensor::from_slice(&buf[*offset..offset + len], shape.as_slice(), var.device())
            };
            var.set(&slice(&self.params)?)?;
            moments.insert(format!("adam.m.{name}"), slice(&self.adam_m)?);
            moments.insert(format!("adam.v.{name}"), slice(&self.adam_v)?);
        }
        if let Some(adam) = adam {
            adam.load_state(&moments, self.adam_step)?;
        }
        Ok(())
    }

    /// Threads for the slices, the matrix products and Adam (default: rayon's pool size).
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

    /// Adam's learning rate from the next step on (learning-rate schedules).
    pub fn set_lr(&mut self, lr: f64) {
        self.adam.lr = lr;
    }

    /// The gradient of the last [`FusedVae::forward_backward`], by `state_dict` name.
    pub fn gradients(&self) -> Vec<(String, Vec<f32>)> {
        self.entries
            .iter()
            .map(|(n, o, s)| {
                (
                    n.clone(),
                    self.grads[*o..o + s.iter().product::<usize>()].to_vec(),
                )
            })
            .collect()
    }

    /// One training step: forward, backward, Adam. `x` `[B, D]` row-major in [0, 1]; the noise
    /// of every layer is drawn from `noise` as [`crate::vae::objective::draw_noise`] draws it.
    pub fn train_step(
        &mut self,
        x: &[f32],
        k: usize,
        beta: f64,
        noise: &mut Noise,
    ) -> Result<StepSums> {
        let sums = self.forward_backward(x, k, beta, noise)?;
        if sums.loss.is_finite() {
            self.adam_update();
        }
        Ok(sums)
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

    fn draw_noise(&mut self, k: usize, b: usize, noise: &mut Noise) {
        self.eps.resize_with(self.model.layers(), Vec::new);
        for (eps, &l) in self.eps.iter_mut().zip(&self.model.latents) {
            eps.resize(k * b * l, 0.0);
            noise.fill_randn(eps);
        }
    }

    /// Runs `mode` over the batch `x` `[B, D]` (noise already in `self.eps`), one slice of
    /// examples per thread; returns the per-example results in batch order.
    fn run(&mut self, x: &[f32], k: usize, mode: Mode) -> SliceOut {
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
            gather_noise(&self.eps, &self.model.latents, k, b, from, to, &mut s.eps);
        }
        let train = matches!(mode, Mode::Train { .. });
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
        // Adam follows suit: a step this small is done on one thread from start to end.
        self.adam_threads = if slices == 1 && threads == 1 {
            1
        } else {
            self.threads
        };
        let (model, params) = (&self.model, &self.params);
        let outs: Vec<SliceOut> = if slices == 1 {
            let g = train.then_some(&mut self.grads[..]);
            vec![run_slice(
                model,
                params,
                x,
                k,
                mode,
                &mut self.slices[0],
                g,
                threads,
            )]
        } else {
            let mut grads: Vec<Option<&mut [f32]>> = Vec::new();
            if train {
                grads.push(Some(&mut self.grads[..]));
                grads.extend(self.slice_grads.iter_mut().map(|g| Some(&mut g[..])));
            } else {
                grads.resize_with(slices, || None);
            }
            grads
                .into_par_iter()
                .zip(self.slices.par_iter_mut())
                .zip(x.par_chunks(per * d))
                .map(|((g, s), xs)| run_slice(model, params, xs, k, mode, s, g, 1))
                .collect()
        };
        if train && slices > 1 {
            let piece = self.model.len.div_ceil(self.threads);
            let others = &self.slice_grads;
            self.grads
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

    /// Forward and backward of the loss; leaves the gradient in `self.grads`.
    pub fn forward_backward(
        &mut self,
        x: &[f32],
        k: usize,
        beta: f64,
        noise: &mut Noise,
    ) -> Result<StepSums> {
        let b = self.batch_size(x, k)?;
        self.forward_backward_rows(x, 0..b, k, beta, noise, false)
    }

    /// One data-parallel training step (see [`crate::collective`]): `x` is the global batch
    /// `[B, D]`, this process runs its rows `rows` with the noise one process draws for the
    /// whole batch, and the gradients (of the global batch's mean loss) and the step's sums
    /// are summed over the ranks before Adam, which every rank applies alike. With one process
    /// it is [`FusedVae::train_step`].
    pub fn train_step_shard(
        &mut self,
        x: &[f32],
        rows: std::ops::Range<usize>,
        k: usize,
        beta: f64,
        noise: &mut Noise,
    ) -> Result<StepSums> {
        let sums = self.forward_backward_rows(x, rows, k, beta, noise, true)?;
        if sums.loss.is_finite() {
            self.adam_update();
        }
        Ok(sums)
    }

    /// Forward and backward of rows `rows` of the batch `x` (the noise drawn for all of it, the
    /// loss the mean over all of it); `reduce`: sum gradients and sums over the ranks.
    fn forward_backward_rows(
        &mut self,
        x: &[f32],
        rows: std::ops::Range<usize>,
        k: usize,
        beta: f64,
        noise: &mut Noise,
        reduce: bool,
    ) -> Result<StepSums> {
        let b = self.batch_size(x, k)?;
        if rows.end > b || rows.start > rows.end {
            bail!("fused VAE: rows {rows:?} of a batch of {b}");
        }
        self.draw_noise(k, b, noise);
        if rows.len() != b {
            let mut mine = Vec::new();
            let latents = &self.model.latents;
            gather_noise(&self.eps, latents, k, b, rows.start, rows.end, &mut mine);
            self.eps = mine;
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
            self.grads.fill(0.0);
            SliceOut {
                lse: Vec::new(),
                rec: Vec::new(),
                kl: vec![Vec::new(); self.model.layers()],
            }
        } else {
            self.run(&x[rows.start * d..rows.end * d], k, mode)
        };
        let kf = k as f64;
        // [reconstruction, log-sum-exp, KL of each layer]: summed over the ranks in one call.
        let mut sums = vec![
            out.rec.iter().sum::<f64>() / kf,
            out.lse.iter().map(|l| l - kf.ln()).sum::<f64>(),
        ];
        sums.extend(out.kl.iter().map(|l| l.iter().sum::<f64>() / kf));
        if reduce {
            crate::collective::all_reduce_buckets(&mut self.grads)?;
            crate::collective::world().all_reduce_sum_f64(&mut sums)?;
        }
        let (reconstruction, iwae) = (sums[0], sums[1]);
        let kl_layers = sums[2..].to_vec();
        let kl = kl_layers.iter().sum::<f64>();
        let loss = match objective {
            Objective::Elbo => -(reconstruction - beta * kl) / b as f64,
            Objective::Iwae => -iwae / b as f64,
        };
        Ok(StepSums {
            reconstruction,
            kl,
            kl_layers,
            loss,
        })
    }

    /// Adam, as [`crate::optim::Adam::step`] computes it, over the whole flat buffer.
    fn adam_update(&mut self) {
        self.adam_step += 1;
        let c = self.adam;
        let bc1 = 1.0 - c.beta1.powi(self.adam_step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.adam_step as i32);
        let scalars = AdamScalars {
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            lr_bc1: (c.lr / bc1) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            eps: c.eps as f32,
        };
        // Memory-bound (four streams of the parameters): one piece per thread.
        let piece = self.params.len().div_ceil(self.adam_threads.max(1));
        if self.adam_threads <= 1 {
            adam_kernel(
                &mut self.params,
                &self.grads,
                &mut self.adam_m,
                &mut self.adam_v,
                scalars,
            );
            return;
        }
        self.params
            .par_chunks_mut(piece)
            .zip(self.grads.par_chunks(piece))
            .zip(self.adam_m.par_chunks_mut(piece))
            .zip(self.adam_v.par_chunks_mut(piece))
            .for_each(|(((p, g), m), v)| adam_kernel(p, g, m, v, scalars));
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
        while done < k {
            let kc = chunk.min(k - done);
            self.draw_noise(kc, b, noise);
            let out = self.run(x, kc, Mode::Estimate);
            for i in 0..b {
                lse[i] = log_add_exp(lse[i], out.lse[i]);
                rec[i] += out.rec[i];
            }
            for (acc, l) in kl.iter_mut().zip(&out.kl) {
                add_f64(acc, l);
            }
            done += kc;
        }
        Ok(LikelihoodEstimate::from_sums(lse, rec, kl, k))
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

/// Copies the noise of examples `from..to` out of the batch's `[K, B, L]` per layer.
fn gather_noise(
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

/// Forward (and in training, backward) of one slice: `x` `[b, D]`, `s.eps` its noise.
/// Writes the slice's share of the gradient into `grads` (overwriting every value).
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
    let (d, layers) = (model.d, model.layers());
    let b = x.len() / d;
    let rows = k * b;
    let top = layers - 1;
    s.q_tapes.resize_with(layers, MlpTape::default);
    s.p_tapes.resize_with(layers, MlpTape::default);
    s.z.resize_with(layers, Vec::new);
    s.dz.resize_with(layers, Vec::new);
    s.ratio.resize_with(layers, Vec::new);

    // A convolutional VAE's encoder: x -> features, the first MLP's input.
    if let Some(conv) = &model.conv {
        let t = &mut s.conv;
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
    // Inference, bottom-up: [m; lv] of q(z_l|z_{l-1}) on b rows (l = 0) or K b rows.
    for l in 0..layers {
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
    // Generation: logits of p(x|z_1), [m; lv] of p(z_{l-1}|z_l).
    for l in 0..layers {
        let (shape, _) = model.p(l);
        mlp_forward(
            shape,
            region(p, model.p(l)),
            &s.z[l],
            rows,
            &mut s.p_tapes[l],
            threads,
        );
    }

    // A convolutional VAE's decoder: the first MLP's output -> logits.
    if let Some(conv) = &model.conv {
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
    // Per-row terms. log p(x|z_1), and for ELBO training its gradient in the same pass.
    let logits_at = |t: &MlpTape| t.post.len() - 1;
    let last = logits_at(&s.p_tapes[0]);
    let mut logits = match &model.conv {
        Some(_) => std::mem::take(s.conv.dec_pre.last_mut().expect("a decoder layer")),
        None => std::mem::take(&mut s.p_tapes[0].post[last]),
    };
    s.rec.resize(rows, 0.0);
    let fused_grad = match mode {
        Mode::Train {
            objective: Objective::Elbo,
            b_total,
            ..
        } => Some(1.0 / (k * b_total) as f32),
        _ => None,
    };
    for (r, (row, rec)) in logits.chunks_mut(d).zip(s.rec.iter_mut()).enumerate() {
        let xb = &x[(r % b) * d..(r % b + 1) * d];
        *rec = match fused_grad {
            Some(scale) => bce_logits_grad(row, xb, scale),
            None => bernoulli_log_prob(xb, row),
        };
    }
    // log p(z_l|.) - log q(z_l|.) per row and layer; constants cancel, and with z = m + sigma
    // eps, log q = -1/2 sum (lv + eps^2).
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
    // The top layer's closed-form KL per source row.
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

    // The ELBO trained with a Monte Carlo top-layer KL reports that estimate (what it
    // differentiates); everything else reports the closed form.
    let mc_top = matches!(
        mode,
        Mode::Train {
            objective: Objective::Elbo,
            kl: KlEstimator::MonteCarlo,
            ..
        }
    );

    // Per-example results.
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

    let (
        Mode::Train {
            objective,
            kl,
            beta,
            b_total,
        },
        Some(grads),
    ) = (mode, grads)
    else {
        restore_logits(model, s, last, logits);
        return out;
    };

    // c_r = dloss/df_r.
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
    for (l, dz) in s.dz.iter_mut().enumerate() {
        dz.clear();
        dz.resize(rows * model.latents[l], 0.0);
    }
    // The conv layers' gradients are sums over rows: start them at zero.
    if let Some(conv) = &model.conv {
        let start = conv
            .down
            .iter()
            .chain(&conv.up)
            .map(|c| c.w)
            .min()
            .unwrap_or(0);
        grads[start..model.len].fill(0.0);
    }
    // p(x|z_1): backward from d logits (through the decoder's transposed convolutions first).
    {
        if let Some(conv) = &model.conv {
            let t = &mut s.conv;
            t.g.clear();
            t.g.extend_from_slice(&logits);
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
        let g = region_mut(grads, net);
        let dy: &[f32] = if model.conv.is_some() {
            &s.conv.g
        } else {
            &logits
        };
        mlp_backward(
            &net.0,
            region(p, net),
            g,
            &s.z[0],
            rows,
            &mut s.p_tapes[0],
            dy,
            Some(&mut s.dx),
            threads,
        );
        add_assign(&mut s.dz[0], &s.dx);
    }
    restore_logits(model, s, last, logits);
    // p(z_{l-1}|z_l) for l >= 1: the density of z_{l-1}, weighted a = c beta.
    for l in 1..layers {
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
        mlp_backward(
            &net.0,
            region(p, net),
            g,
            &s.z[l],
            rows,
            &mut s.p_tapes[l],
            &s.dout,
            Some(&mut s.dx),
            threads,
        );
        add_assign(&mut s.dz[l], &s.dx);
    }
    // The top prior, by Monte Carlo: log p(z_L), weighted a = c beta (beta = 1 for the IWAE):
    // d z_L -= a z_L. The ELBO's closed-form KL is differentiated below instead.
    let closed_form_top = objective == Objective::Elbo && kl == KlEstimator::Analytic;
    if !closed_form_top {
        let lat = model.latents[top];
        for r in 0..rows {
            let a = s.c[r] * beta;
            for i in 0..lat {
                let j = r * lat + i;
                s.dz[top][j] -= a * s.z[top][j];
            }
        }
    }
    // Inference networks, top-down: d [m; lv] from the reparameterization and the densities.
    for l in (0..layers).rev() {
        let lat = model.latents[l];
        let src_rows = if l == 0 { b } else { rows };
        let ml = q_output(&s.q_tapes[l]);
        let dout = &mut s.dout;
        dout.clear();
        dout.resize(src_rows * 2 * lat, 0.0);
        let closed_form = l == top && closed_form_top;
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
        if l == 0 {
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
                continue;
            };
            // The encoder: d features from the first MLP, then back through the convolutions.
            let t = &mut s.conv;
            let features = t.enc_post.last().expect("an encoder layer");
            let tape = &mut s.q_tapes[0];
            let dfeat = Some(&mut t.g);
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
        } else {
            mlp_backward(
                &net.0,
                region(p, net),
                g,
                &s.z[l - 1],
                rows,
                &mut s.q_tapes[l],
                &s.dout,
                Some(&mut s.dx),
                threads,
            );
            add_assign(&mut s.dz[l - 1], &s.dx);
        }
    }
    out
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

#[derive(Clone, Copy)]
struct AdamScalars {
    beta1: f32,
    beta2: f32,
    lr_bc1: f32,
    inv_bc2: f32,
    eps: f32,
}

/// `m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= (lr/bc1) m / (sqrt(v/bc2) + eps)`.
#[multiversion::multiversion(targets = "simd")]
fn adam_kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamScalars) {
    for i in 0..p.len() {
        let gi = g[i];
        m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * gi;
        v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * gi * gi;
        p[i] -= c.lr_bc1 * m[i] / ((v[i] * c.inv_bc2).sqrt() + c.eps);
    }
}
