//! The VAE family's training step on XLA: the VAEs of [`crate::vae::model`] that the fused
//! engine takes (any number of stochastic layers, MLPs of any depth, width and activation,
//! convolutional encoders and decoders without residual blocks, the Bernoulli likelihood), the
//! ELBO (closed-form or Monte Carlo top KL, beta) and the IWAE objective with K samples. The
//! step is traced once per (rows, K) as an array program ([`super::graph`]), differentiated
//! there and compiled into one XLA executable; a step is one call of it.
//!
//! It computes what the fused CPU engine ([`crate::engine::vae`]) computes, from the same
//! batch and noise (drawn on the host, [`VaeBatch`], and uploaded: `[K, B, L_l]` per layer, a
//! few hundred kB per step at batch 128), with the same parameter layout, and is checked
//! against it in `tests/xla.rs`. With rows `r = k n + b` of the n examples' K samples:
//!
//! ```text
//! z_l   = m + e^{lv/2} eps                 [K n, L_l]  (q(z_1|x)'s m, lv [n, L_1], shared by the K rows)
//! ratio = log p(z_l|.) - log q(z_l|.)      [K n]       (constants cancel: log q = -1/2 sum (lv + eps^2))
//! rec   = sum_d x l - softplus(l)          [K n]       (log p(x|z_1), Bernoulli logits l)
//! ELBO  loss = -(1/B) sum_b [(1/K) sum_k (rec + beta sum_{l<L} ratio_l) - beta KL_L]
//! IWAE  loss = -(1/B) sum_b [log sum_k e^{rec + sum_l ratio_l} - log K]
//! ```
//!
//! with B the whole batch (a data-parallel rank runs n of its rows) and KL_L the top layer's
//! closed form `-1/2 sum (1 + lv - m^2 - e^lv)` (or, with `KlEstimator::MonteCarlo`, `-ratio_L`
//! inside the sum).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use anyhow::{Result, bail, ensure};

use super::graph::{Conv, Graph, T};
use super::pjrt::{Buffer, Executable, Runtime};
use crate::distributions::Noise;
use crate::engine::vae::{VaeBatch, flat_params, gather_noise};
use crate::engine::{Resident, TrainStep};
use crate::nn::activation::Activation;
use crate::nn::mlp::MlpShape;
use crate::optim::{AdamScalars, ParamTable};
use crate::vae::estimate::{LikelihoodEstimate, log_add_exp};
use crate::vae::model::{Likelihood, Vae, VaeConfig};
use crate::vae::objective::{KlEstimator, Objective};

/// Whether the XLA engine computes this model: the Bernoulli likelihood, MLP VAEs and
/// convolutional ones without residual blocks (what the fused engine takes).
pub fn supports(vae: &Vae) -> bool {
    vae.config.likelihood == Likelihood::Bernoulli
        && vae.config.conv.as_ref().is_none_or(|c| !c.residual)
}

/// One convolution of a convolutional VAE: its weight and bias in the flat buffer and its
/// channels. The encoder's are PyTorch's `Conv2d(c_in, c_out, 4, stride 2, padding 1)` (weight
/// `[c_out, c_in, 4, 4]`), the decoder's `ConvTranspose2d` of the same geometry (weight
/// `[c_in, c_out, 4, 4]`).
#[derive(Debug, Clone)]
struct ConvLayer {
    w: usize,
    b: usize,
    c_in: usize,
    c_out: usize,
}

/// The convolutional encoder and decoder around the first layer's MLPs (`VaeConfig::conv`):
///
/// ```text
/// encoder  h_0 = x [n, C, H, W],  h_{j+1} = f(conv_j(h_j)),  features = flatten(h_last)
/// decoder  u_0 = f(MLP output) [K n, c, h, w],  u_{j+1} = f(deconv_j(u_j)),  logits = deconv_last(u)
/// ```
#[derive(Debug, Clone)]
struct ConvLayout {
    image: (usize, usize, usize),
    features: (usize, usize, usize),
    down: Vec<ConvLayer>,
    up: Vec<ConvLayer>,
}

/// The model's networks and where each sits in the flat parameter buffer.
#[derive(Debug, Clone)]
struct Layout {
    d: usize,
    latents: Vec<usize>,
    /// q(z_1|x), ..., q(z_L|z_{L-1}), then p(x|z_1), p(z_1|z_2), ..., p(z_{L-1}|z_L).
    nets: Vec<(MlpShape, usize)>,
    conv: Option<ConvLayout>,
    activation: Activation,
    /// The conv layers' `state_dict` entries `(name, offset, shape)`, after the MLPs'.
    conv_entries: Vec<(String, usize, Vec<usize>)>,
    len: usize,
}

impl Layout {
    fn new(config: &VaeConfig) -> Result<Self> {
        let mut offset = 0;
        let mut nets = Vec::new();
        for spec in config.networks() {
            let count = spec.shape.parameter_count();
            nets.push((spec.shape, offset));
            offset += count;
        }
        let mut conv_entries = Vec::new();
        for (name, shape) in config.conv_parameter_shapes() {
            let n: usize = shape.iter().product();
            conv_entries.push((name, offset, shape));
            offset += n;
        }
        let conv = match (&config.conv, config.image_shape(), config.conv_features()) {
            (Some(c), Some(image), Some(features)) => {
                let find = |name: String| -> Result<(usize, Vec<usize>)> {
                    conv_entries
                        .iter()
                        .find(|e| e.0 == name)
                        .map(|e| (e.1, e.2.clone()))
                        .ok_or_else(|| anyhow::anyhow!("XLA VAE: no {name} in the model"))
                };
                let layer = |prefix: String, transposed: bool| -> Result<ConvLayer> {
                    let (w, shape) = find(format!("{prefix}.weight"))?;
                    let (b, _) = find(format!("{prefix}.bias"))?;
                    let (c_in, c_out) = match transposed {
                        true => (shape[0], shape[1]),
                        false => (shape[1], shape[0]),
                    };
                    Ok(ConvLayer { w, b, c_in, c_out })
                };
                let n = c.channels.len();
                Some(ConvLayout {
                    image: (image.channels, image.height, image.width),
                    features,
                    down: (0..n)
                        .map(|j| layer(format!("encoder.conv.{j}"), false))
                        .collect::<Result<_>>()?,
                    up: (0..n)
                        .map(|j| layer(format!("decoder.deconv.{j}"), true))
                        .collect::<Result<_>>()?,
                })
            }
            _ => None,
        };
        Ok(Self {
            d: config.input_dim,
            latents: config.latent_dims.clone(),
            nets,
            conv,
            activation: config.activation,
            conv_entries,
            len: offset,
        })
    }

    fn layers(&self) -> usize {
        self.latents.len()
    }
}

/// The traced step's parameters: each a slice of the flat input, recorded with its offset so
/// the derivatives can be concatenated back into one flat gradient.
struct Params {
    flat: T,
    pieces: Vec<(usize, T)>,
}

impl Params {
    /// Values `offset..offset + numel(shape)` of the flat buffer, as an array of `shape`.
    fn take(&mut self, g: &mut Graph, offset: usize, shape: &[usize]) -> Result<T> {
        let n = shape.iter().product();
        let s = g.slice(self.flat, offset, n)?;
        let t = g.reshape(s, shape)?;
        self.pieces.push((offset, t));
        Ok(t)
    }

    /// The derivative of `loss` with respect to the whole flat buffer.
    fn gradient(&self, g: &mut Graph, loss: T, len: usize) -> Result<T> {
        g.flat_gradient(loss, &self.pieces, len)
    }
}

/// `f(a)` elementwise, as [`Activation::forward`] computes it.
fn activate(g: &mut Graph, f: Activation, a: T) -> Result<T> {
    Ok(match f {
        Activation::Tanh => g.tanh(a),
        Activation::Sigmoid => g.sigmoid(a),
        Activation::Relu => {
            let z = g.full_like(0.0, a);
            g.max(a, z)?
        }
        Activation::Softplus => g.softplus(a)?,
        // max(a, 0) + e^{min(a, 0)} - 1
        Activation::Elu => {
            let z = g.full_like(0.0, a);
            let pos = g.max(a, z)?;
            let na = g.neg(a);
            let m = g.max(na, z)?;
            let nm = g.neg(m);
            let e = g.exp(nm);
            let em1 = g.offset(e, -1.0)?;
            g.add(pos, em1)?
        }
        Activation::Silu => {
            let s = g.sigmoid(a);
            g.mul(a, s)?
        }
    })
}

/// `h W^T + b` for `h` `[rows, in]`, `W` `[out, in]`, `b` `[out]`.
fn affine(g: &mut Graph, h: T, w: T, b: T) -> Result<T> {
    let y = g.dot(h, w, 1, 1)?;
    let shape = g.shape(y).to_vec();
    let bb = g.broadcast(b, &[1], &shape)?;
    g.add(y, bb)
}

/// An MLP of `net` on `x` `[rows, sizes[0]]`: hidden layers through the activation, the last
/// linear. With `split`, the last layer's `2L` outputs come back as two `[rows, L]` arrays
/// (the Gaussian head `[mean; log variance]`, its weight rows and bias halves adjacent).
fn mlp(
    g: &mut Graph,
    p: &mut Params,
    net: &(MlpShape, usize),
    x: T,
    split: bool,
) -> Result<(T, Option<T>)> {
    let (shape, base) = net;
    let layers = shape.layers();
    let mut h = x;
    for i in 0..layers {
        let (offset, inp, out) = shape.layer(i);
        let at = base + offset;
        if i + 1 == layers && split {
            let half = out / 2;
            let wm = p.take(g, at, &[half, inp])?;
            let wv = p.take(g, at + half * inp, &[half, inp])?;
            let bm = p.take(g, at + out * inp, &[half])?;
            let bv = p.take(g, at + out * inp + half, &[half])?;
            let m = affine(g, h, wm, bm)?;
            let lv = affine(g, h, wv, bv)?;
            return Ok((m, Some(lv)));
        }
        let w = p.take(g, at, &[out, inp])?;
        let b = p.take(g, at + out * inp, &[out])?;
        let a = affine(g, h, w, b)?;
        h = if i + 1 == layers {
            a
        } else {
            activate(g, shape.activation, a)?
        };
    }
    Ok((h, None))
}

/// `conv(h) + b` for `h` `[rows, c_in, h, w]`: the encoder's stride-2 4 x 4 convolution
/// (padding 1), or with `transposed` the decoder's transposed one, written as XLA writes it: the
/// input dilated by 2, padded by 2, the kernel reversed with its in and out swapped.
fn conv_layer(g: &mut Graph, p: &mut Params, c: &ConvLayer, h: T, transposed: bool) -> Result<T> {
    let (w, spec) = match transposed {
        true => {
            let w = p.take(g, c.w, &[c.c_in, c.c_out, 4, 4])?;
            let w = g.reverse(w, &[2, 3])?;
            let spec = Conv {
                rhs: [1, 0, 2, 3],
                pad: [(2, 2); 2],
                lhs_dil: [2, 2],
                ..Conv::nchw(1, 0)
            };
            (w, spec)
        }
        false => (p.take(g, c.w, &[c.c_out, c.c_in, 4, 4])?, Conv::nchw(2, 1)),
    };
    let b = p.take(g, c.b, &[c.c_out])?;
    let y = g.conv(h, w, spec)?;
    let shape = g.shape(y).to_vec();
    let bb = g.broadcast(b, &[1], &shape)?;
    g.add(y, bb)
}

/// The encoder: `x` `[n, D]` to the first MLP's input `[n, features]`.
fn conv_encode(g: &mut Graph, p: &mut Params, layout: &Layout, x: T) -> Result<T> {
    let Some(conv) = &layout.conv else {
        return Ok(x);
    };
    let n = g.shape(x)[0];
    let (c, hh, ww) = conv.image;
    let mut h = g.reshape(x, &[n, c, hh, ww])?;
    for layer in &conv.down {
        let a = conv_layer(g, p, layer, h, false)?;
        h = activate(g, layout.activation, a)?;
    }
    let (fc, fh, fw) = conv.features;
    g.reshape(h, &[n, fc * fh * fw])
}

/// The decoder: the first generative MLP's output `[rows, features]` to the logits `[rows, D]`.
fn conv_decode(g: &mut Graph, p: &mut Params, layout: &Layout, out: T) -> Result<T> {
    let Some(conv) = &layout.conv else {
        return Ok(out);
    };
    let rows = g.shape(out)[0];
    let (fc, fh, fw) = conv.features;
    let u = activate(g, layout.activation, out)?;
    let mut u = g.reshape(u, &[rows, fc, fh, fw])?;
    for (j, layer) in conv.up.iter().enumerate() {
        let a = conv_layer(g, p, layer, u, true)?;
        u = if j + 1 < conv.up.len() {
            activate(g, layout.activation, a)?
        } else {
            a
        };
    }
    g.reshape(u, &[rows, layout.d])
}

/// The sum over the last dimension of a 2-D array.
fn row_sum(g: &mut Graph, a: T) -> Result<T> {
    g.sum(a, &[1])
}

/// `[n, L]` repeated for the K samples as `[K n, L]` (row `k n + b` is row b).
fn repeat_k(g: &mut Graph, a: T, k: usize) -> Result<T> {
    let s = g.shape(a).to_vec();
    let b = g.broadcast(a, &[1, 2], &[k, s[0], s[1]])?;
    g.reshape(b, &[k * s[0], s[1]])
}

/// Per example, the sum over its K rows of `[K n]` values: `[n]`.
fn sum_k(g: &mut Graph, a: T, k: usize) -> Result<T> {
    let n = g.shape(a)[0] / k;
    let r = g.reshape(a, &[k, n])?;
    g.sum(r, &[0])
}

/// A traced step: its sums (the loss, then per example `sum_k log p(x|z_1)`, per layer
/// `sum_k KL_l`, `log sum_k w`), and the flat gradient.
struct StepGraph {
    graph: Graph,
    sums: Vec<T>,
    params: T,
    grad: T,
}

impl StepGraph {
    /// The gradient program: inputs as traced, outputs the sums then the gradient.
    fn gradient_program(&self) -> Result<(String, usize)> {
        let mut outputs = self.sums.clone();
        outputs.push(self.grad);
        Ok((self.graph.to_stablehlo(&outputs)?, outputs.len()))
    }

    /// The resident training program: the traced inputs, then Adam's moments `m`, `v` `[P]` and
    /// its scalars `[beta1, beta2, lr/(1 - beta1^t), 1/(1 - beta2^t), eps]`; outputs the updated
    /// parameters, `m` and `v` (written over their inputs), then the sums.
    ///
    /// `m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,  p -= (lr/bc1) m / (sqrt(v/bc2) + eps)`
    fn resident_program(mut self) -> Result<(String, usize)> {
        let g = &mut self.graph;
        let (p2, m2, v2) = super::adam_update(g, self.params, self.grad)?;
        let mut outputs = vec![p2, m2, v2];
        outputs.extend(&self.sums);
        let inputs = g.input_shapes().len();
        let donated = [(0, 0), (inputs - 3, 1), (inputs - 2, 2)];
        Ok((g.to_stablehlo_donating(&outputs, &donated)?, outputs.len()))
    }
}

/// Traces the training step on n examples with K samples (module doc). Inputs: the flat
/// parameters `[P]`, `x` `[n, D]`, the noise `[K n, L_l]` per layer, `1/B` and beta (scalars).
/// Its sums: the loss (the derivative's target), per example `sum_k log p(x|z_1)` `[n]`, per
/// layer `sum_k KL_l` `[n]`, `log sum_k w` `[n]`; and the flat gradient `[P]`.
fn trace_step(
    layout: &Layout,
    n: usize,
    k: usize,
    objective: Objective,
    kl: KlEstimator,
) -> Result<StepGraph> {
    let mut g = Graph::new();
    let flat = g.input(&[layout.len]);
    let mut p = Params {
        flat,
        pieces: Vec::new(),
    };
    let x = g.input(&[n, layout.d]);
    let eps: Vec<T> = layout
        .latents
        .iter()
        .map(|&l| g.input(&[k * n, l]))
        .collect();
    let inv_b = g.input(&[]);
    let beta = g.input(&[]);
    let layers = layout.layers();
    let top = layers - 1;
    let rows = k * n;

    // Inference, bottom-up: z_l = m + e^{lv/2} eps, and -log q(z_l|.) + const per row.
    let mut z = Vec::with_capacity(layers);
    let mut neg_log_q = Vec::with_capacity(layers);
    let mut top_kl = None;
    for l in 0..layers {
        let input = if l == 0 {
            conv_encode(&mut g, &mut p, layout, x)?
        } else {
            z[l - 1]
        };
        let (m, lv) = mlp(&mut g, &mut p, &layout.nets[l], input, true)?;
        let lv = lv.expect("a Gaussian head");
        if l == top {
            // -1/2 sum (1 + lv - m^2 - e^lv) per source row.
            let one = g.offset(lv, 1.0)?;
            let m2 = g.mul(m, m)?;
            let e = g.exp(lv);
            let a = g.sub(one, m2)?;
            let a = g.sub(a, e)?;
            let s = row_sum(&mut g, a)?;
            let s = g.scale(s, -0.5)?;
            // Per row of the K n: the K samples of an example share q(z_1|x).
            top_kl = Some(if l == 0 {
                let s2 = g.reshape(s, &[n, 1])?;
                let r = repeat_k(&mut g, s2, k)?;
                g.reshape(r, &[rows])?
            } else {
                s
            });
        }
        let (m, lv) = if l == 0 {
            (repeat_k(&mut g, m, k)?, repeat_k(&mut g, lv, k)?)
        } else {
            (m, lv)
        };
        let half = g.scale(lv, 0.5)?;
        let sd = g.exp(half);
        let se = g.mul(sd, eps[l])?;
        z.push(g.add(m, se)?);
        let e2 = g.mul(eps[l], eps[l])?;
        let q = g.add(lv, e2)?;
        let q = row_sum(&mut g, q)?;
        neg_log_q.push(g.scale(q, 0.5)?);
    }

    // Generation: log p(z_l|z_{l+1}) (the top's prior N(0, I)) and log p(x|z_1).
    let mut ratio = Vec::with_capacity(layers);
    for l in 0..layers {
        let log_p = if l == top {
            let z2 = g.mul(z[l], z[l])?;
            let s = row_sum(&mut g, z2)?;
            g.scale(s, -0.5)?
        } else {
            let (pm, plv) = mlp(&mut g, &mut p, &layout.nets[layers + l + 1], z[l + 1], true)?;
            let plv = plv.expect("a Gaussian head");
            // -1/2 sum (plv + (z - m)^2 e^{-plv})
            let dz = g.sub(z[l], pm)?;
            let dz2 = g.mul(dz, dz)?;
            let nplv = g.neg(plv);
            let prec = g.exp(nplv);
            let t = g.mul(dz2, prec)?;
            let a = g.add(plv, t)?;
            let s = row_sum(&mut g, a)?;
            g.scale(s, -0.5)?
        };
        ratio.push(g.add(log_p, neg_log_q[l])?);
    }
    let (out, _) = mlp(&mut g, &mut p, &layout.nets[layers], z[0], false)?;
    let logits = conv_decode(&mut g, &mut p, layout, out)?;
    let xk = repeat_k(&mut g, x, k)?;
    let xl = g.mul(xk, logits)?;
    let sp = g.softplus(logits)?;
    let lp = g.sub(xl, sp)?;
    let rec = row_sum(&mut g, lp)?;

    // log w per row, and per example log sum_k w.
    let mut log_w = rec;
    for &r in &ratio {
        log_w = g.add(log_w, r)?;
    }
    let lw = g.reshape(log_w, &[k, n])?;
    let lse = g.logsumexp(lw, 0)?;

    let inv_bn = g.broadcast(inv_b, &[], &[n])?;
    let per_example = match objective {
        Objective::Iwae => g.offset(lse, -(k as f32).ln())?,
        Objective::Elbo => {
            let closed = kl == KlEstimator::Analytic;
            let mut f = rec;
            let beta_r = g.broadcast(beta, &[], &[rows])?;
            for (l, &r) in ratio.iter().enumerate() {
                if l == top && closed {
                    let t = g.mul(beta_r, top_kl.expect("the top layer's KL"))?;
                    f = g.sub(f, t)?;
                } else {
                    let t = g.mul(beta_r, r)?;
                    f = g.add(f, t)?;
                }
            }
            let s = sum_k(&mut g, f, k)?;
            g.scale(s, 1.0 / k as f32)?
        }
    };
    let weighted = g.mul(per_example, inv_bn)?;
    let total = g.sum_all(weighted)?;
    let loss = g.neg(total);

    // Reported per example: sum_k rec, sum_k KL_l (the top's closed form unless the ELBO
    // trains on its Monte Carlo estimate), log sum_k w.
    let rec_b = sum_k(&mut g, rec, k)?;
    let mut outputs = vec![loss, rec_b];
    for (l, &r) in ratio.iter().enumerate() {
        let mc_top = objective == Objective::Elbo && kl == KlEstimator::MonteCarlo;
        let v = if l == top && !mc_top {
            top_kl.expect("the top layer's KL")
        } else {
            g.neg(r)
        };
        outputs.push(sum_k(&mut g, v, k)?);
    }
    outputs.push(lse);
    let grad = p.gradient(&mut g, loss, layout.len)?;
    Ok(StepGraph {
        graph: g,
        sums: outputs,
        params: flat,
        grad,
    })
}

/// Which program of a traced step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Program {
    /// The sums and the gradient ([`TrainStep::loss_and_grads`]).
    Gradient,
    /// The sums, and the Adam update of resident parameters ([`TrainStep::step_resident`]).
    Resident,
    /// The sums only, the forward pass (the log p(x) estimate).
    Forward,
}

/// The VAE's training step on XLA (a [`TrainStep`] of the one training loop). Either the loop
/// keeps the parameters and its Adam updates them from the gradient this step returns
/// ([`TrainStep::loss_and_grads`]: every rank's rows, for MPI), or, on one process, the
/// parameters and Adam's moments stay on the device and one compiled program runs the step
/// and the update ([`TrainStep::step_resident`]), the buffers donated from step to step.
pub struct XlaVae {
    layout: Layout,
    table: ParamTable,
    params: Vec<f32>,
    objective: Objective,
    kl: KlEstimator,
    beta: f64,
    runtime: Arc<Runtime>,
    /// One executable per (rows, K, program).
    compiled: HashMap<(usize, usize, Program), Executable>,
    noise: Vec<Vec<f32>>,
    /// The resident parameters and moments `[p, m, v]`.
    resident: Option<[Buffer; 3]>,
}

impl XlaVae {
    /// The engine for `vae`, with a copy of its parameters, on `runtime`.
    pub fn from_vae(vae: &Vae, runtime: Arc<Runtime>) -> Result<Self> {
        if !supports(vae) {
            bail!("the XLA engine takes the Bernoulli likelihood and no residual blocks");
        }
        let layout = Layout::new(&vae.config)?;
        let mut entries = vae.config.flat_entries();
        entries.extend(layout.conv_entries.iter().cloned());
        let (table, params) = flat_params(vae, entries, layout.len)?;
        Ok(Self {
            layout,
            table,
            params,
            objective: Objective::Elbo,
            kl: KlEstimator::Analytic,
            beta: 1.0,
            runtime,
            compiled: HashMap::new(),
            noise: Vec::new(),
            resident: None,
        })
    }

    pub fn set_objective(&mut self, objective: Objective) {
        if objective != self.objective {
            self.compiled.clear();
        }
        self.objective = objective;
    }

    pub fn set_kl_estimator(&mut self, kl: KlEstimator) {
        if kl != self.kl {
            self.compiled.clear();
        }
        self.kl = kl;
    }

    pub fn set_beta(&mut self, beta: f64) {
        self.beta = beta;
    }

    /// The model's parameters as the engine holds them.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// The StableHLO module of the gradient step on `n` examples with `k` samples.
    pub fn stablehlo(&self, n: usize, k: usize) -> Result<String> {
        let s = trace_step(&self.layout, n, k, self.objective, self.kl)?;
        Ok(s.gradient_program()?.0)
    }

    fn executable(&mut self, n: usize, k: usize, program: Program) -> Result<&Executable> {
        let key = (n, k, program);
        if !self.compiled.contains_key(&key) {
            let (text, outputs) = match program {
                Program::Gradient => {
                    trace_step(&self.layout, n, k, self.objective, self.kl)?.gradient_program()?
                }
                Program::Resident => {
                    trace_step(&self.layout, n, k, self.objective, self.kl)?.resident_program()?
                }
                // The estimate's pass: log w per row and the ELBO's parts with the closed-form
                // top KL, whatever the model trains on.
                Program::Forward => {
                    let s = trace_step(&self.layout, n, k, Objective::Elbo, KlEstimator::Analytic)?;
                    (s.graph.to_stablehlo(&s.sums)?, s.sums.len())
                }
            };
            let exe = self.runtime.compile(&text, outputs)?;
            self.compiled.insert(key, exe);
        }
        Ok(&self.compiled[&key])
    }

    /// The importance-sampled log p(x) of the fused engine's
    /// [`crate::engine::vae::FusedVae::estimate_log_likelihood`]: the same noise in the same
    /// chunks of at most `max_rows` decoded rows, the chunks' log-sum-exps combined in f64.
    /// `x` `[B, D]`.
    pub fn estimate_log_likelihood(
        &mut self,
        x: &[f32],
        k: usize,
        max_rows: usize,
        noise: &mut Noise,
    ) -> Result<LikelihoodEstimate> {
        let d = self.layout.d;
        ensure!(
            k > 0 && !x.is_empty() && x.len().is_multiple_of(d),
            "XLA VAE: log p(x) of {} values ({d} per example) with K = {k}",
            x.len()
        );
        let b = x.len() / d;
        let layers = self.layout.layers();
        let chunk = (max_rows / b).clamp(1, k);
        let mut lse = vec![f64::NEG_INFINITY; b];
        let mut rec = vec![0f64; b];
        let mut kl = vec![vec![0f64; b]; layers];
        let params = self.runtime.upload(&self.params, &[self.layout.len])?;
        let mut done = 0;
        while done < k {
            let kc = chunk.min(k - done);
            let batch = VaeBatch::draw(x.to_vec(), d, &self.layout.latents, kc, noise);
            let mut inputs = vec![];
            inputs.extend(self.batch_inputs(&batch, &(0..b))?);
            let exe = self.executable(b, kc, Program::Forward)?;
            let mut refs: Vec<&Buffer> = vec![&params];
            refs.extend(inputs.iter());
            let out = exe.run(&refs)?;
            let values = |i: usize| -> Result<Vec<f32>> { out[i].to_vec(b) };
            for (acc, v) in rec.iter_mut().zip(values(1)?) {
                *acc += v as f64;
            }
            for (l, acc) in kl.iter_mut().enumerate() {
                for (a, v) in acc.iter_mut().zip(values(2 + l)?) {
                    *a += v as f64;
                }
            }
            for (acc, v) in lse.iter_mut().zip(values(2 + layers)?) {
                *acc = log_add_exp(*acc, v as f64);
            }
            done += kc;
        }
        Ok(LikelihoodEstimate::from_sums(lse, rec, kl, k))
    }

    /// Uploads the traced step's inputs after the parameters: `x` and the noise of rows
    /// `rows`, `1/B` and beta.
    fn batch_inputs(&mut self, batch: &VaeBatch, rows: &Range<usize>) -> Result<Vec<Buffer>> {
        let (d, k) = (self.layout.d, batch.k);
        let (b, n) = (batch.len(d), rows.len());
        let mut noise = std::mem::take(&mut self.noise);
        gather_noise(
            &batch.eps,
            &self.layout.latents,
            k,
            b,
            rows.start,
            rows.end,
            &mut noise,
        );
        let rt = &self.runtime;
        let mut inputs = vec![rt.upload(&batch.x[rows.start * d..rows.end * d], &[n, d])?];
        for (e, &l) in noise.iter().zip(&self.layout.latents) {
            inputs.push(rt.upload(e, &[k * n, l])?);
        }
        self.noise = noise;
        inputs.push(rt.upload(&[1.0 / b as f32], &[])?);
        inputs.push(rt.upload(&[self.beta as f32], &[])?);
        Ok(inputs)
    }

    /// Checks a batch and rows `rows` of it against the model.
    fn check(&self, batch: &VaeBatch, rows: &Range<usize>) -> Result<()> {
        let (d, k) = (self.layout.d, batch.k);
        let b = batch.len(d);
        ensure!(
            rows.start <= rows.end && rows.end <= b && batch.x.len() == b * d,
            "XLA VAE: rows {rows:?} of a batch of {b}"
        );
        ensure!(
            batch.eps.len() == self.layout.layers()
                && batch
                    .eps
                    .iter()
                    .zip(&self.layout.latents)
                    .all(|(e, &l)| e.len() == k * b * l),
            "XLA VAE: the batch's noise does not match the model's latent layers"
        );
        Ok(())
    }

    /// [`crate::engine::vae::VAE_SUMS`] from the program's per-example outputs `out[1..]`
    /// (`out[0]` the loss), summed in f64 as the fused engine sums them.
    fn sums(&self, out: &[Buffer], n: usize, k: usize, b: usize) -> Result<Vec<f64>> {
        let layers = self.layout.layers();
        let per_example = |i: usize| -> Result<Vec<f64>> {
            Ok(out[i].to_vec(n)?.into_iter().map(f64::from).collect())
        };
        let kf = k as f64;
        let reconstruction = per_example(1)?.iter().sum::<f64>() / kf;
        let mut kl_layers = Vec::with_capacity(layers);
        for l in 0..layers {
            kl_layers.push(per_example(2 + l)?.iter().sum::<f64>() / kf);
        }
        let kl = kl_layers.iter().sum::<f64>();
        let objective_sum = match self.objective {
            Objective::Elbo => reconstruction - self.beta * kl,
            Objective::Iwae => per_example(2 + layers)?.iter().map(|l| l - kf.ln()).sum(),
        };
        let mut sums = vec![-objective_sum / b as f64, objective_sum, reconstruction];
        sums.extend(kl_layers);
        Ok(sums)
    }
}

impl TrainStep for XlaVae {
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
        rows: Range<usize>,
        grads: &mut [f32],
    ) -> Result<Vec<f64>> {
        self.check(batch, &rows)?;
        ensure!(
            params.len() == self.layout.len && grads.len() == self.layout.len,
            "XLA VAE: {} parameters, {} gradients for a buffer of {}",
            params.len(),
            grads.len(),
            self.layout.len
        );
        let (n, k, b) = (rows.len(), batch.k, batch.len(self.layout.d));
        if n == 0 {
            grads.fill(0.0);
            return Ok(vec![0.0; 3 + self.layout.layers()]);
        }
        let mut inputs = vec![self.runtime.upload(params, &[self.layout.len])?];
        inputs.extend(self.batch_inputs(batch, &rows)?);
        let exe = self.executable(n, k, Program::Gradient)?;
        let refs: Vec<&Buffer> = inputs.iter().collect();
        let out = exe.run(&refs)?;
        out[out.len() - 1].read(grads)?;
        self.sums(&out, n, k, b)
    }

    fn resident(&self) -> bool {
        true
    }

    fn load_resident(&mut self, state: &Resident<'_>) -> Result<()> {
        let len = self.layout.len;
        let (params, m, v) = (&*state.params, &*state.m, &*state.v);
        ensure!(
            params.len() == len && m.len() == len && v.len() == len,
            "XLA VAE: resident buffers of {}, {}, {} values for {len} parameters",
            params.len(),
            m.len(),
            v.len()
        );
        ensure!(
            state.average.is_none(),
            "XLA VAE: the VAE keeps no average of its weights"
        );
        let rt = &self.runtime;
        self.resident = Some([
            rt.upload(params, &[len])?,
            rt.upload(m, &[len])?,
            rt.upload(v, &[len])?,
        ]);
        Ok(())
    }

    fn step_resident(
        &mut self,
        batch: &VaeBatch,
        adam: AdamScalars,
        _average_decay: Option<f32>,
    ) -> Result<Vec<f64>> {
        let (d, k) = (self.layout.d, batch.k);
        let b = batch.len(d);
        self.check(batch, &(0..b))?;
        let Some([p, m, v]) = self.resident.take() else {
            bail!("XLA VAE: step_resident before load_resident");
        };
        let mut inputs = vec![p];
        inputs.extend(self.batch_inputs(batch, &(0..b))?);
        inputs.push(m);
        inputs.push(v);
        inputs.push(self.runtime.upload(&super::adam_scalars(&adam), &[5])?);
        let exe = self.executable(b, k, Program::Resident)?;
        let refs: Vec<&Buffer> = inputs.iter().collect();
        let mut out = exe.run(&refs)?;
        // The parameters and moments were donated: the outputs are the new resident state.
        let rest = out.split_off(3);
        let mut it = out.into_iter();
        let (p, m, v) = (it.next(), it.next(), it.next());
        if let (Some(p), Some(m), Some(v)) = (p, m, v) {
            self.resident = Some([p, m, v]);
        }
        self.sums(&rest, b, k, b)
    }

    fn store_resident(&mut self, state: &mut Resident<'_>) -> Result<()> {
        let Some([pb, mb, vb]) = &self.resident else {
            bail!("XLA VAE: store_resident before load_resident");
        };
        pb.read(state.params)?;
        mb.read(state.m)?;
        vb.read(state.v)?;
        let params: &[f32] = state.params;
        self.params.copy_from_slice(params);
        Ok(())
    }
}
