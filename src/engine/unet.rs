//! The U-Net of [`crate::diffusion::nets`] (either layout, any channels, attention levels
//! and dropout) on the CPU as one fused engine: the layers of [`crate::nn::planar`] composed
//! along the network's stages, forward and hand-derived backward, and the simple loss.
//!
//! Every layer of the U-Net (GroupNorm included: its statistics are per example and group)
//! acts on each example separately, so the batch splits into one contiguous range per thread.
//! A thread runs forward and backward for one example after the other in buffers it reuses
//! (an example's activations stay in cache), adding its parameter gradients into its own
//! buffer; the ranges' gradients are summed in batch order at the end, so the result does not
//! depend on scheduling. No tensor is allocated, no graph recorded, and there is no barrier
//! between layers. The stages are walked forward (`Plan::forward`) and back
//! (`Plan::backward`); a skip connection's gradient is gathered from the blocks that
//! concatenated it and added to the running gradient when the walk reaches the activation
//! that was pushed. The loss: `L = mean (y - target)^2`, `dy = 2 (y - target) / (B C H W)`.
//!
//! The engine is checked against candle's autodiff of the same network in `tests/diffusion.rs`.

use candle_core::{DType, Result, Tensor, Var, bail};
use candle_nn::Linear;
use std::sync::Mutex;

use rayon::prelude::*;

use crate::diffusion::learned::LearnedHead;
use crate::diffusion::nets::{Attention, ResBlock, Stage, UNet};
use crate::diffusion::process::Denoiser;
use crate::engine::{DenoiseBatch, TrainStep};
use crate::nn::group_norm::{silu, silu_grad};
use crate::nn::kernels::add_assign;
use crate::nn::modules::conv::Conv2d;
use crate::nn::modules::group_norm::GroupNorm;
use crate::nn::planar::attention::{AttnP, AttnTape};
use crate::nn::planar::conv::{ConvP, Dx, Init};
use crate::nn::planar::linear::LinP;
use crate::nn::planar::norm::{NormP, NormTape};
use crate::nn::planar::residual::{ResP, ResTape};
use crate::nn::planar::upsample::{upsample, upsample_backward};
use crate::nn::planar::{BlockScratch, sized, zeroed};
use crate::optim::ParamTable;

/// One stage of the body (see [`crate::diffusion::nets::Stage`]), with its parameters' places.
#[derive(Debug, Clone)]
enum StageP {
    Res {
        block: Box<ResP>,
        attn: Option<AttnP>,
        concat: bool,
        push: bool,
    },
    Downsample {
        conv: ConvP,
        push: bool,
    },
    Upsample {
        conv: ConvP,
    },
}

/// Receives an example's dL/d(input) and dL/d(time value): `(row, dx, dt)`
/// ([`FusedUnet::grads_with_inputs`]).
pub type InputSink<'a> = dyn Fn(usize, &[f32], f64) + Sync + 'a;

/// A loss of one example's output: `(global row, y, dL/dy to write) -> its share of the sum`
/// ([`FusedUnet::grads_with`]).
pub type OutputLoss<'a> = dyn Fn(usize, &[f32], &mut Vec<f32>) -> f64 + Sync + 'a;

/// The narrowest convolution (input and output channels) that runs Winograd F(2x2, 3x3):
/// `cargo bench --bench conv` on this 2-core machine measured it 1.4x (64 channels, 16 x 16)
/// to 1.8x (256, 16 x 16) faster than the row-shift gemms, and slower at 16 and 32 channels
/// (its 16 small gemms and the transforms cost more than they save).
pub const WINOGRAD_CHANNELS: usize = 64;

/// The whole network's parameters.
#[derive(Debug, Clone)]
struct Plan {
    freqs: Vec<f32>,
    /// The embedding's order: cosines first (elbo's) or sines first (DDPM's).
    cos_first: bool,
    time1: LinP,
    time2: LinP,
    conv_in: ConvP,
    push_input: bool,
    stages: Vec<StageP>,
    norm_out: NormP,
    conv_out: ConvP,
    dropout: f32,
    /// The number of residual blocks (dropout streams per example).
    blocks: u64,
}

/// Where the stages read and write for one input size. Activation `a` is `conv_in`'s output
/// for a = 0 and stage a - 1's output after.
struct Route {
    /// (H, W) of each activation.
    sizes: Vec<(usize, usize)>,
    /// The activation each stage concatenates (a residual block on the way up).
    skip: Vec<Option<usize>>,
    /// Whether each activation is pushed as a skip.
    pushed: Vec<bool>,
    /// The index of each stage's residual block among all of them (its dropout stream).
    block: Vec<u64>,
}

/// One stage's record of its forward pass.
#[derive(Default)]
struct StageTape {
    /// A residual block that concatenates: its input, the running activation then the skip.
    input: Vec<f32>,
    res: ResTape,
    /// A residual block with attention: the block's output, attention's input.
    res_out: Vec<f32>,
    attn: AttnTape,
    /// Upsampling: the nearest-neighbour copy, the convolution's input.
    nearest: Vec<f32>,
}

/// One example's activations, named after the layer that wrote them (C = base channels,
/// T = 4C the time embedding's width; `[c, h, w]` planar at the stage's resolution).
#[derive(Default)]
struct Tape {
    /// The sinusoidal embedding of t, `[C]`.
    time_sinusoid: Vec<f32>,
    /// `time_embedding.linear_1` before its SiLU, `[T]`.
    time1_pre: Vec<f32>,
    /// SiLU of `time1_pre`, `[T]`.
    time1_silu: Vec<f32>,
    /// `time_embedding.linear_2`, `[T]`: the time embedding before the blocks' SiLU.
    time2_pre: Vec<f32>,
    /// SiLU of `time2_pre`, `[T]`: what every residual block's time projection reads.
    time_act: Vec<f32>,
    /// The activations of [`Route`]: `conv_in`'s output, then each stage's.
    acts: Vec<Vec<f32>>,
    /// Each stage's record.
    stages: Vec<StageTape>,
    /// `norm_out` (GroupNorm + SiLU) of the last activation: `conv_out`'s input.
    norm_out_silu: Vec<f32>,
    /// `norm_out`'s statistics for the backward pass.
    norm_out: NormTape,
    /// The network's output (the predicted eps, x_0 or v), `[C_in, H, W]`.
    output: Vec<f32>,
}

/// A thread's buffers: the tape, the blocks' scratch and the backward walk's gradients.
#[derive(Default)]
struct Workspace {
    tape: Tape,
    block: BlockScratch,
    /// dL/d(the activation being walked back through).
    d_hidden: Vec<f32>,
    /// dL/d(the next activation down the walk).
    d_next: Vec<f32>,
    /// dL/d(each activation pushed as a skip), from the blocks that concatenated it.
    dskip: Vec<Vec<f32>>,
    d_time_act: Vec<f32>,
    d_time2_pre: Vec<f32>,
    d_time1_silu: Vec<f32>,
    /// dL/d(output), set by the caller.
    d_output: Vec<f32>,
    /// dL/d(input), when the pass is a vector-Jacobian product ([`Pass::InputGradient`]) or a
    /// training pass with `input_grads`.
    d_input: Vec<f32>,
    /// A training pass also computes dL/d(input) and dL/d(time value) (`d_time`).
    input_grads: bool,
    d_sinusoid: Vec<f32>,
    d_time: f64,
    /// The parameter gradients of the examples this thread ran.
    grads: Vec<f32>,
}

/// What a forward pass is followed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Nothing: no tape kept.
    Inference,
    /// The parameters' gradient: every im2col matrix and every sigmoid kept.
    Training,
    /// The gradient with respect to the input only (dx, no dW): the sigmoids and the norms'
    /// statistics kept, no im2col matrix.
    InputGradient,
}

impl Workspace {
    fn set_pass(&mut self, pass: Pass) {
        let training = pass != Pass::Inference;
        self.input_grads = false;
        self.block.cols.keep = pass == Pass::Training;
        self.block.cols.dx_only = pass == Pass::InputGradient;
        for st in &mut self.tape.stages {
            st.res.norm1.inference = !training;
            st.res.norm2.inference = !training;
            st.attn.norm.inference = !training;
        }
        self.tape.norm_out.inference = !training;
    }

    fn new(stages: usize) -> Self {
        let mut w = Workspace::default();
        w.tape.acts = vec![Vec::new(); stages + 1];
        w.tape.stages = (0..stages).map(|_| StageTape::default()).collect();
        w.dskip = vec![Vec::new(); stages + 1];
        w
    }
}

impl Plan {
    /// Every convolution of the network.
    fn convs_mut(&mut self) -> Vec<&mut ConvP> {
        let mut v = vec![&mut self.conv_in, &mut self.conv_out];
        for stage in &mut self.stages {
            match stage {
                StageP::Res { block, attn, .. } => {
                    v.push(&mut block.conv1);
                    v.push(&mut block.conv2);
                    if let Some(s) = block.skip.as_mut() {
                        v.push(s);
                    }
                    if let Some(a) = attn.as_mut() {
                        v.push(&mut a.qkv);
                        v.push(&mut a.proj);
                    }
                }
                StageP::Downsample { conv, .. } | StageP::Upsample { conv } => v.push(conv),
            }
        }
        v
    }

    /// Writes each convolution's derived weights ([`ConvP::wf`], [`ConvP::wu`]) from its
    /// weight.
    fn derive_weights(&mut self, params: &mut [f32]) {
        for c in self.convs_mut() {
            if let Some((u, ut)) = c.wino {
                let (o, ci) = (c.o, c.c);
                let w = params[c.w..c.w + o * ci * 9].to_vec();
                crate::nn::winograd::transform_filter(&w, (o, ci), &mut params[u..u + 16 * o * ci]);
                // W'[c, o, 2 - u, 2 - v] = W[o, c, u, v]: dx's filters.
                let mut flipped = vec![0f32; ci * o * 9];
                for oo in 0..o {
                    for cc in 0..ci {
                        for k in 0..9 {
                            flipped[(cc * o + oo) * 9 + 8 - k] = w[(oo * ci + cc) * 9 + k];
                        }
                    }
                }
                let dst = &mut params[ut..ut + 16 * o * ci];
                crate::nn::winograd::transform_filter(&flipped, (ci, o), dst);
            }
            let k = c.k;
            let n = c.o * c.c * k * k;
            if let Some(wu) = c.wu {
                let w = params[c.w..c.w + n].to_vec();
                crate::nn::planar::conv::weights_by_row(&w, (c.o, c.c, k), &mut params[wu..wu + n]);
            }
            let Some(wf) = c.wf else { continue };
            for o in 0..c.o {
                for ci in 0..c.c {
                    for u in 0..k {
                        for v in 0..k {
                            params[wf + ((u * c.c + ci) * c.o + o) * k + v] =
                                params[c.w + ((o * c.c + ci) * k + (k - 1 - u)) * k + (k - 1 - v)];
                        }
                    }
                }
            }
        }
    }

    /// Adds each shifted-row weight gradient (accumulated in the [`ConvP::wu`] region of
    /// `grads`, see [`shifted_weight_grad`]), or Winograd's dU (in the [`ConvP::wino`] region),
    /// into the convolution's own `[O, C, k, k]` gradient.
    fn fold_shifted_grads(&self, grads: &mut [f32]) {
        let mut plan = self.clone();
        for c in plan.convs_mut() {
            if let Some((u, _)) = c.wino {
                // Winograd's dU (transposed, [16, C, O]) into dW = G^T dU G.
                let n = 16 * c.o * c.c;
                let du = grads[u..u + n].to_vec();
                let dw = &mut grads[c.w..c.w + c.o * c.c * 9];
                crate::nn::winograd::filter_gradient(&du, (c.o, c.c), dw);
                // Planes below WINOGRAD_PIXELS went through the row-shift gemms: fold those
                // too (zeros where none did).
            }
            let Some(wu) = c.wu else { continue };
            let (k, ck) = (c.k, c.c * c.k);
            for u in 0..k {
                for o in 0..c.o {
                    for ci in 0..c.c {
                        for v in 0..k {
                            grads[c.w + ((o * c.c + ci) * k + u) * k + v] +=
                                grads[wu + (u * ck + ci * k + v) * c.o + o];
                        }
                    }
                }
            }
        }
    }

    /// Multiply-adds of one example's forward pass at `size`: every convolution
    /// (`O C k^2` per output pixel, counted as the direct convolution whatever algorithm runs
    /// it), the time MLP, each residual block's time projection, and attention's two
    /// products per head (`Q^T K`, `[n, d] x [d, n]`, and `V A^T`, `[d, n] x [n, n]`: `2 C n^2`
    /// with `n = H W`). Normalisations, activations and softmax are not counted.
    fn forward_macs(&self, size: (usize, usize)) -> u64 {
        let conv = |c: &ConvP, input: (usize, usize)| c.macs(input);
        let lin = |l: &LinP| (l.o * l.i) as u64;
        let route = self.route(size);
        let mut macs = lin(&self.time1) + lin(&self.time2) + conv(&self.conv_in, size);
        for (k, stage) in self.stages.iter().enumerate() {
            let at = route.sizes[k];
            macs += match stage {
                StageP::Res { block, attn, .. } => {
                    let b = &**block;
                    let res = conv(&b.conv1, at)
                        + conv(&b.conv2, at)
                        + lin(&b.time)
                        + b.skip.as_ref().map_or(0, |s| conv(s, at));
                    let n = (at.0 * at.1) as u64;
                    res + attn.as_ref().map_or(0, |a| {
                        conv(&a.qkv, at) + conv(&a.proj, at) + 2 * a.proj.o as u64 * n * n
                    })
                }
                StageP::Downsample { conv: c, .. } => conv(c, at),
                StageP::Upsample { conv: c } => conv(c, route.sizes[k + 1]),
            };
        }
        macs + conv(&self.conv_out, size)
    }

    /// The route of an input of `size` through the stages.
    fn route(&self, size: (usize, usize)) -> Route {
        let n = self.stages.len();
        let mut r = Route {
            sizes: vec![size],
            skip: Vec::with_capacity(n),
            pushed: vec![self.push_input],
            block: Vec::with_capacity(n),
        };
        let mut stack: Vec<usize> = if self.push_input { vec![0] } else { Vec::new() };
        let mut blocks = 0usize;
        for (k, stage) in self.stages.iter().enumerate() {
            let cur = r.sizes[k];
            let (out, skip, push) = match stage {
                StageP::Res { concat, push, .. } => {
                    blocks += 1;
                    (cur, concat.then(|| stack.pop()).flatten(), *push)
                }
                StageP::Downsample { conv, push } => (conv.geometry(cur).output(), None, *push),
                StageP::Upsample { .. } => {
                    let up = stack.last().map_or((2 * cur.0, 2 * cur.1), |&a| r.sizes[a]);
                    (up, None, false)
                }
            };
            // Only residual blocks read it: the index of the last block so far.
            r.block.push((blocks as u64).saturating_sub(1));
            r.sizes.push(out);
            r.skip.push(skip);
            r.pushed.push(push);
            if push {
                stack.push(k + 1);
            }
        }
        r
    }

    /// One example `x` `[C_in, H, W]` at time `t`; the output lands in `tape.output`.
    /// `dropout`: the step's seed and the example's index in the batch (training only).
    fn forward(
        &self,
        p: &[f32],
        x: &[f32],
        route: &Route,
        t: f32,
        dropout: Option<(u64, u64)>,
        ws: &mut Workspace,
    ) {
        let tape = &mut ws.tape;
        let cols = &mut ws.block.cols;
        let half = self.freqs.len();
        sized(&mut tape.time_sinusoid, 2 * half);
        let e = &mut tape.time_sinusoid;
        crate::nn::embedding::sinusoidal_embedding_ordered(t, &self.freqs, self.cos_first, e);
        self.time1
            .forward(p, &tape.time_sinusoid, &mut tape.time1_pre);
        tape.time1_silu.clear();
        tape.time1_silu
            .extend(tape.time1_pre.iter().map(|&a| silu(a)));
        self.time2.forward(p, &tape.time1_silu, &mut tape.time2_pre);
        tape.time_act.clear();
        tape.time_act
            .extend(tape.time2_pre.iter().map(|&a| silu(a)));
        let sizes = &route.sizes;
        self.conv_in
            .forward(p, x, sizes[0], &mut tape.acts[0], Init::Bias, cols);
        for (k, stage) in self.stages.iter().enumerate() {
            let (before, after) = tape.acts.split_at_mut(k + 1);
            let (x, out) = (&before[k], &mut after[0]);
            let st = &mut tape.stages[k];
            match stage {
                StageP::Res {
                    block,
                    attn,
                    concat,
                    ..
                } => {
                    let input: &[f32] = if *concat {
                        let skip = &before[route.skip[k].expect("a skip to concatenate")];
                        st.input.clear();
                        st.input.extend_from_slice(x);
                        st.input.extend_from_slice(skip);
                        &st.input
                    } else {
                        x
                    };
                    let drop = dropout
                        .filter(|_| self.dropout > 0.0)
                        .map(|(seed, e)| (seed, e * self.blocks + route.block[k], self.dropout));
                    let size = sizes[k];
                    match attn {
                        Some(a) => {
                            let ta = &tape.time_act;
                            block.forward(
                                p,
                                input,
                                size,
                                ta,
                                &mut st.res,
                                &mut st.res_out,
                                cols,
                                drop,
                            );
                            a.forward(p, &st.res_out, size, &mut st.attn, out, cols);
                        }
                        None => {
                            let ta = &tape.time_act;
                            block.forward(p, input, size, ta, &mut st.res, out, cols, drop);
                        }
                    }
                }
                StageP::Downsample { conv, .. } => {
                    conv.forward(p, x, sizes[k], out, Init::Bias, cols);
                }
                StageP::Upsample { conv } => {
                    upsample(x, sizes[k], sizes[k + 1], &mut st.nearest);
                    conv.forward(p, &st.nearest, sizes[k + 1], out, Init::Bias, cols);
                }
            }
        }
        let last = tape.acts.last().expect("conv_in's output at least");
        let hw = sizes[0].0 * sizes[0].1;
        self.norm_out.forward(
            p,
            last,
            hw,
            &mut tape.norm_out_silu,
            true,
            &mut tape.norm_out,
        );
        self.conv_out.forward(
            p,
            &tape.norm_out_silu,
            sizes[0],
            &mut tape.output,
            Init::Bias,
            cols,
        );
    }

    /// Adds the gradients of one example into `grads`, `ws.d_output` holding dL/dy; in a
    /// [`Pass::InputGradient`], dL/dx into `ws.d_input` instead (`grads` then gets only the
    /// norms' and linear layers' share, scratch to the caller).
    fn backward(&self, p: &[f32], grads: &mut [f32], x: &[f32], route: &Route, ws: &mut Workspace) {
        let tape = &ws.tape;
        let sizes = &route.sizes;
        let hw = sizes[0].0 * sizes[0].1;
        sized(&mut ws.d_hidden, tape.norm_out_silu.len());
        self.conv_out.backward(
            p,
            grads,
            &tape.norm_out_silu,
            sizes[0],
            &ws.d_output,
            Dx::Set(&mut ws.d_hidden),
            &mut ws.block.cols,
        );
        let last = tape.acts.last().expect("conv_in's output at least");
        zeroed(&mut ws.d_next, last.len());
        self.norm_out.backward(
            p,
            grads,
            last,
            hw,
            &tape.norm_out,
            true,
            &ws.d_hidden,
            &mut ws.d_next,
            &mut ws.block.gn,
        );
        std::mem::swap(&mut ws.d_hidden, &mut ws.d_next);
        for (a, act) in tape.acts.iter().enumerate() {
            if route.pushed[a] {
                zeroed(&mut ws.dskip[a], act.len());
            }
        }
        zeroed(&mut ws.d_time_act, tape.time_act.len());
        for (k, stage) in self.stages.iter().enumerate().rev() {
            // Activation k + 1's gradient is complete: the running path's plus its skip's.
            if route.pushed[k + 1] {
                add_assign(&mut ws.d_hidden, &ws.dskip[k + 1]);
            }
            let (x, st) = (&tape.acts[k], &tape.stages[k]);
            match stage {
                StageP::Res {
                    block,
                    attn,
                    concat,
                    ..
                } => {
                    let size = sizes[k];
                    if let Some(a) = attn {
                        zeroed(&mut ws.d_next, st.res_out.len());
                        a.backward(
                            p,
                            grads,
                            &st.res_out,
                            size,
                            &st.attn,
                            &ws.d_hidden,
                            &mut ws.d_next,
                            &mut ws.block,
                        );
                        std::mem::swap(&mut ws.d_hidden, &mut ws.d_next);
                    }
                    let input: &[f32] = if *concat { &st.input } else { x };
                    zeroed(&mut ws.d_next, input.len());
                    block.backward(
                        p,
                        grads,
                        input,
                        size,
                        &tape.time_act,
                        &st.res,
                        &ws.d_hidden,
                        &mut ws.d_next,
                        &mut ws.d_time_act,
                        &mut ws.block,
                    );
                    if let Some(s) = route.skip[k].filter(|_| *concat) {
                        add_assign(&mut ws.dskip[s], &ws.d_next[x.len()..]);
                        ws.d_next.truncate(x.len());
                    }
                }
                StageP::Downsample { conv, .. } => {
                    sized(&mut ws.d_next, x.len());
                    conv.backward(
                        p,
                        grads,
                        x,
                        sizes[k],
                        &ws.d_hidden,
                        Dx::Set(&mut ws.d_next),
                        &mut ws.block.cols,
                    );
                }
                StageP::Upsample { conv } => {
                    sized(&mut ws.d_next, st.nearest.len());
                    conv.backward(
                        p,
                        grads,
                        &st.nearest,
                        sizes[k + 1],
                        &ws.d_hidden,
                        Dx::Set(&mut ws.d_next),
                        &mut ws.block.cols,
                    );
                    zeroed(&mut ws.d_hidden, x.len());
                    upsample_backward(&ws.d_next, sizes[k], sizes[k + 1], &mut ws.d_hidden);
                    continue;
                }
            }
            std::mem::swap(&mut ws.d_hidden, &mut ws.d_next);
        }
        if route.pushed[0] {
            add_assign(&mut ws.d_hidden, &ws.dskip[0]);
        }
        if ws.block.cols.dx_only {
            // A vector-Jacobian product: dx, and no time embedding's gradient.
            sized(&mut ws.d_input, x.len());
            let dx = Dx::Set(&mut ws.d_input);
            let cols = &mut ws.block.cols;
            self.conv_in
                .backward(p, grads, x, sizes[0], &ws.d_hidden, dx, cols);
            return;
        }
        let dx = if ws.input_grads {
            sized(&mut ws.d_input, x.len());
            Dx::Set(&mut ws.d_input)
        } else {
            Dx::None
        };
        self.conv_in
            .backward(p, grads, x, sizes[0], &ws.d_hidden, dx, &mut ws.block.cols);
        ws.d_time2_pre.clear();
        ws.d_time2_pre.extend(
            ws.d_time_act
                .iter()
                .zip(&tape.time2_pre)
                .map(|(d, &a)| d * silu_grad(a)),
        );
        zeroed(&mut ws.d_time1_silu, tape.time1_silu.len());
        self.time2.backward(
            p,
            grads,
            &tape.time1_silu,
            &ws.d_time2_pre,
            Some(&mut ws.d_time1_silu),
        );
        ws.d_time1_silu
            .iter_mut()
            .zip(&tape.time1_pre)
            .for_each(|(d, &a)| *d *= silu_grad(a));
        if !ws.input_grads {
            self.time1
                .backward(p, grads, &tape.time_sinusoid, &ws.d_time1_silu, None);
            return;
        }
        zeroed(&mut ws.d_sinusoid, tape.time_sinusoid.len());
        let e = &tape.time_sinusoid;
        let d_sin = Some(&mut ws.d_sinusoid[..]);
        self.time1.backward(p, grads, e, &ws.d_time1_silu, d_sin);
        // dL/dt through [cos(t f_i), sin(t f_i)]: d cos = -f sin, d sin = f cos.
        let half = self.freqs.len();
        let (c, s) = if self.cos_first { (0, half) } else { (half, 0) };
        let d = &ws.d_sinusoid;
        ws.d_time = self
            .freqs
            .iter()
            .enumerate()
            .map(|(i, &f)| {
                let f = f as f64;
                -(d[c + i] as f64) * f * e[s + i] as f64 + d[s + i] as f64 * f * e[c + i] as f64
            })
            .sum();
    }
}

/// Collects the network's parameters into one flat vector, in the order they are visited.
#[derive(Default)]
struct Builder {
    params: Vec<f32>,
    tensors: Vec<(Tensor, usize)>,
    convs: usize,
}

impl Builder {
    fn add(&mut self, t: &Tensor) -> Result<usize> {
        let at = self.params.len();
        self.params
            .extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        self.tensors.push((t.clone(), at));
        Ok(at)
    }

    fn conv(&mut self, c: &Conv2d) -> Result<ConvP> {
        let (w, b, stride) = c.parts();
        let (o, ci, k, _) = w.dims4()?;
        self.convs += 1;
        Ok(ConvP {
            id: self.convs - 1,
            w: self.add(w)?,
            wf: None,
            wu: None,
            wino: None,
            b: self.add(b)?,
            o,
            c: ci,
            k,
            stride,
            pad_end: false,
        })
    }

    fn norm(&mut self, n: &GroupNorm) -> Result<NormP> {
        let (g, b, groups, eps) = n.parts();
        Ok(NormP {
            g: self.add(g)?,
            b: self.add(b)?,
            c: g.elem_count(),
            groups,
            eps,
        })
    }

    fn linear(&mut self, l: &Linear) -> Result<LinP> {
        let (o, i) = l.weight().dims2()?;
        let Some(bias) = l.bias() else {
            bail!("fused U-Net: every linear layer must have a bias");
        };
        Ok(LinP {
            w: self.add(l.weight())?,
            b: self.add(bias)?,
            o,
            i,
        })
    }

    fn res(&mut self, r: &ResBlock) -> Result<ResP> {
        Ok(ResP {
            norm1: self.norm(&r.norm1)?,
            conv1: self.conv(&r.conv1)?,
            time: self.linear(&r.time)?,
            norm2: self.norm(&r.norm2)?,
            conv2: self.conv(&r.conv2)?,
            skip: r.skip.as_ref().map(|s| self.conv(s)).transpose()?,
            scale_shift: r.scale_shift,
        })
    }

    fn attn(&mut self, a: &Attention) -> Result<AttnP> {
        Ok(AttnP {
            norm: self.norm(&a.norm)?,
            qkv: self.conv(&a.qkv)?,
            proj: self.conv(&a.proj)?,
            heads: a.heads,
        })
    }
}

/// The fused CPU engine for a [`UNet`]: a flat copy of its parameters and the plan of its
/// layers.
pub struct FusedUnet {
    plan: Plan,
    params: Vec<f32>,
    /// Each parameter tensor of the network and its offset in `params`.
    tensors: Vec<(Tensor, usize)>,
    /// Workspaces kept from call to call (their buffers would otherwise be fresh pages, which
    /// the kernel clears, at every step).
    pool: Mutex<Vec<Workspace>>,
}

impl FusedUnet {
    /// Copies the parameters of `net` (CPU or not) into the engine.
    pub fn new(net: &UNet) -> Result<Self> {
        Self::with_winograd(net, WINOGRAD_CHANNELS)
    }

    /// [`FusedUnet::new`] running Winograd F(2x2, 3x3) (`nn::winograd`) for the stride-1 3x3
    /// convolutions of at least `winograd_channels` input and output channels (the forward
    /// pass, dx and dW, on planes of `nn::planar::conv::WINOGRAD_PIXELS` and more).
    pub fn with_winograd(net: &UNet, winograd_channels: usize) -> Result<Self> {
        let mut b = Builder::default();
        let base = net.time1.weight().dim(1)?;
        if base % 2 != 0 {
            bail!("fused U-Net: the time embedding width must be even, got {base}");
        }
        let shift = net.options.freq_shift;
        let freqs = crate::nn::embedding::sinusoid_frequencies_shifted(base, shift);
        let mut stages = Vec::with_capacity(net.stages.len());
        for stage in &net.stages {
            stages.push(match stage {
                Stage::Res {
                    block,
                    attn,
                    concat,
                    push,
                } => StageP::Res {
                    block: Box::new(b.res(block)?),
                    attn: attn.as_ref().map(|a| b.attn(a)).transpose()?,
                    concat: *concat,
                    push: *push,
                },
                Stage::Downsample {
                    conv,
                    push,
                    pad_end,
                } => StageP::Downsample {
                    conv: ConvP {
                        pad_end: *pad_end,
                        ..b.conv(conv)?
                    },
                    push: *push,
                },
                Stage::Upsample { conv } => StageP::Upsample {
                    conv: b.conv(conv)?,
                },
            });
        }
        let plan = Plan {
            freqs,
            cos_first: net.options.flip_sin_to_cos,
            time1: b.linear(&net.time1)?,
            time2: b.linear(&net.time2)?,
            conv_in: b.conv(&net.conv_in)?,
            push_input: net.push_input,
            stages,
            norm_out: b.norm(&net.norm_out)?,
            conv_out: b.conv(&net.conv_out)?,
            dropout: net.dropout,
            blocks: net.res_blocks() as u64,
        };
        let mut plan = plan;
        let mut params = b.params;
        for c in plan.convs_mut() {
            if c.stride == 1 && c.k > 1 {
                c.wf = Some(params.len());
                c.wu = Some(params.len() + c.o * c.c * c.k * c.k);
                params.resize(params.len() + 2 * c.o * c.c * c.k * c.k, 0.0);
            }
            if c.stride == 2 && c.k > 1 {
                // The forward pass of the downsampling convolutions (strided_conv).
                c.wu = Some(params.len());
                params.resize(params.len() + c.o * c.c * c.k * c.k, 0.0);
            }
            if c.stride == 1 && c.k == 3 && !c.pad_end && c.o.min(c.c) >= winograd_channels {
                let n = 16 * c.o * c.c;
                c.wino = Some((params.len(), params.len() + n));
                params.resize(params.len() + 2 * n, 0.0);
            }
        }
        plan.derive_weights(&mut params);
        Ok(Self {
            plan,
            params,
            tensors: b.tensors,
            pool: Mutex::new(Vec::new()),
        })
    }

    /// Floating-point operations (2 per multiply-add) of one example's forward pass on
    /// `(H, W)` images: the convolutions as direct convolutions, the linear layers and
    /// attention's products (see `bench/run`'s "% of peak"; a training step:
    /// [`FusedUnet::train_flops`]).
    pub fn forward_flops(&self, size: (usize, usize)) -> f64 {
        2.0 * self.plan.forward_macs(size) as f64
    }

    /// Floating-point operations of one example's training step on `(H, W)` images: the
    /// forward pass, dW and dx of every layer ([`FusedUnet::forward_flops`] three times) less
    /// the dx of the two layers that read inputs needing none (`conv_in` and the time MLP's
    /// first layer).
    pub fn train_flops(&self, size: (usize, usize)) -> f64 {
        let p = &self.plan;
        let data_layers = p.conv_in.macs(size) + (p.time1.o * p.time1.i) as u64;
        3.0 * self.forward_flops(size) - 2.0 * data_layers as f64
    }

    /// The number of parameters.
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(|(t, _)| t.elem_count()).sum()
    }

    /// The values of one example (C x H x W), after checking the batch's sizes.
    fn check(&self, x: &[f32], t: &[f32], size: (usize, usize)) -> Result<usize> {
        let n = self.plan.conv_in.c * size.0 * size.1;
        if n == 0 || x.len() != t.len() * n {
            bail!(
                "fused U-Net: {} input values for {} timesteps of {}x{}x{} images",
                x.len(),
                t.len(),
                self.plan.conv_in.c,
                size.0,
                size.1
            );
        }
        Ok(n)
    }

    /// The number of image channels the network takes.
    pub fn channels(&self) -> usize {
        self.plan.conv_in.c
    }

    /// The number of channels the network gives: C, or 2C with learned variances.
    pub fn out_channels(&self) -> usize {
        self.plan.conv_out.o
    }

    /// The dropout probability of its residual blocks (applied by [`FusedUnet::loss_and_grads`]
    /// when given a seed).
    pub fn dropout(&self) -> f32 {
        self.plan.dropout
    }

    fn workspace(&self) -> Workspace {
        let kept = self.pool.lock().map(|mut p| p.pop()).unwrap_or(None);
        kept.unwrap_or_else(|| Workspace::new(self.plan.stages.len()))
    }

    fn give_back(&self, ws: Workspace) {
        if let Ok(mut p) = self.pool.lock() {
            p.push(ws);
        }
    }

    /// Contiguous ranges of the batch, one per thread.
    fn chunk(&self, batch: usize) -> usize {
        batch.div_ceil(rayon::current_num_threads().max(1)).max(1)
    }

    /// eps_theta(x_t, t) of a batch: `x` `[B, C, H, W]` values, `t` `[B]` -> `[B, C, H, W]`.
    pub fn forward_values(&self, x: &[f32], t: &[f32], size: (usize, usize)) -> Result<Vec<f32>> {
        let n = self.check(x, t, size)?;
        let m = self.out_channels() * size.0 * size.1;
        let route = self.plan.route(size);
        let chunk = self.chunk(t.len());
        let mut out = vec![0f32; t.len() * m];
        out.par_chunks_mut(chunk * m)
            .zip(x.par_chunks(chunk * n).zip(t.par_chunks(chunk)))
            .for_each(|(out, (x, t))| {
                let mut ws = self.workspace();
                ws.set_pass(Pass::Inference);
                for (e, &te) in t.iter().enumerate() {
                    let xe = &x[e * n..(e + 1) * n];
                    self.plan
                        .forward(&self.params, xe, &route, te, None, &mut ws);
                    out[e * m..(e + 1) * m].copy_from_slice(&ws.tape.output);
                }
                self.give_back(ws);
            });
        Ok(out)
    }

    /// The [`crate::diffusion::process::Denoiser`] forward on tensors (`xt` `[B, C, H, W]`, `t` `[B]`).
    pub fn forward(&self, xt: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xt.dims4()?;
        if c != self.channels() {
            bail!(
                "fused U-Net: {} input channels expected, got {c}",
                self.channels()
            );
        }
        let x = xt.flatten_all()?.to_vec1::<f32>()?;
        let t = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let out = self.forward_values(&x, &t, (h, w))?;
        Tensor::from_vec(out, (b, self.out_channels(), h, w), xt.device())
    }

    /// The network's output and its vector-Jacobian products: `x` `[B, C, H, W]` values, `t`
    /// `[B]`, `cotangents` K buffers `[B, C_out, H, W]` -> (y `[B, C_out, H, W]`, K buffers
    /// `[B, C, H, W]` with row b = (dy_b / dx_b)^T v_b). One forward pass per example, then
    /// one backward pass per cotangent through the same tape, computing dx only (no dW, no
    /// kept im2col): the divergence of the probability-flow ODE by Hutchinson's estimator.
    pub fn vjp_values(
        &self,
        x: &[f32],
        t: &[f32],
        size: (usize, usize),
        cotangents: &[Vec<f32>],
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let n = self.check(x, t, size)?;
        let m = self.out_channels() * size.0 * size.1;
        if let Some(v) = cotangents.iter().find(|v| v.len() != t.len() * m) {
            bail!(
                "fused U-Net: a cotangent of {} values for {} outputs",
                v.len(),
                t.len() * m
            );
        }
        let route = self.plan.route(size);
        let chunk = self.chunk(t.len());
        let k = cotangents.len();
        let parts: Vec<(Vec<f32>, Vec<Vec<f32>>)> = x
            .par_chunks(chunk * n)
            .zip(t.par_chunks(chunk))
            .enumerate()
            .map(|(part, (x, t))| {
                let mut ws = self.workspace();
                ws.set_pass(Pass::InputGradient);
                let mut scratch = std::mem::take(&mut ws.grads);
                zeroed(&mut scratch, self.params.len());
                let mut out = Vec::with_capacity(t.len() * m);
                // (`vec![v; k]` would clone an empty vector without its capacity.)
                let mut dx: Vec<Vec<f32>> =
                    (0..k).map(|_| Vec::with_capacity(t.len() * n)).collect();
                for (e, &te) in t.iter().enumerate() {
                    let xe = &x[e * n..(e + 1) * n];
                    self.plan
                        .forward(&self.params, xe, &route, te, None, &mut ws);
                    out.extend_from_slice(&ws.tape.output);
                    let row = (part * chunk + e) * m;
                    for (v, d) in cotangents.iter().zip(dx.iter_mut()) {
                        ws.d_output.clear();
                        ws.d_output.extend_from_slice(&v[row..row + m]);
                        self.plan
                            .backward(&self.params, &mut scratch, xe, &route, &mut ws);
                        d.extend_from_slice(&ws.d_input);
                    }
                }
                ws.grads = scratch;
                self.give_back(ws);
                (out, dx)
            })
            .collect();
        let mut out = Vec::with_capacity(t.len() * m);
        let mut dx: Vec<Vec<f32>> = (0..k).map(|_| Vec::with_capacity(x.len())).collect();
        for (o, d) in parts {
            out.extend(o);
            for (acc, part) in dx.iter_mut().zip(d) {
                acc.extend(part);
            }
        }
        Ok((out, dx))
    }

    /// [`FusedUnet::vjp_values`] on tensors: `xt` `[B, C, H, W]`, `t` `[B]`, cotangents
    /// `[B, C_out, H, W]`.
    pub fn vjp(
        &self,
        xt: &Tensor,
        t: &Tensor,
        cotangents: &[Tensor],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (b, c, h, w) = xt.dims4()?;
        if c != self.channels() {
            bail!(
                "fused U-Net: {} input channels expected, got {c}",
                self.channels()
            );
        }
        let values = |x: &Tensor| -> Result<Vec<f32>> {
            x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
        };
        let x = values(xt)?;
        let t = values(t)?;
        let v = cotangents.iter().map(values).collect::<Result<Vec<_>>>()?;
        let (out, dx) = self.vjp_values(&x, &t, (h, w), &v)?;
        let dev = xt.device();
        let out = Tensor::from_vec(out, (b, self.out_channels(), h, w), dev)?;
        let dx = dx
            .into_iter()
            .map(|d| Tensor::from_vec(d, (b, c, h, w), dev))
            .collect::<Result<Vec<_>>>()?;
        Ok((out, dx))
    }

    /// The simple loss `mean (eps_theta(x_t, t) - target)^2` of a batch and its gradient with
    /// respect to the flat parameters (the layout of [`FusedUnet::table`], then scratch). With
    /// `dropout_seed`, the residual blocks drop what `UNet::forward_dropout` drops from the
    /// same seed.
    pub fn loss_and_grads(
        &self,
        x: &[f32],
        t: &[f32],
        target: &[f32],
        size: (usize, usize),
        dropout_seed: Option<u64>,
    ) -> Result<(f64, Vec<f32>)> {
        let (sum, grads) =
            self.loss_and_grads_rows(x, t, target, size, dropout_seed, 0, x.len())?;
        Ok((sum / x.len() as f64, grads))
    }

    /// A shard of a batch (data parallelism, [`crate::collective`]): `x`, `t`, `target` are the
    /// rows of this rank, `first` the index of its first example in the global batch (for the
    /// dropout masks) and `total` the global batch's number of values (the mean's
    /// denominator). Returns the shard's sum of squared errors and its share of the gradient
    /// of the global mean; the shards' gradients add up to the whole batch's.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grads_rows(
        &self,
        x: &[f32],
        t: &[f32],
        target: &[f32],
        size: (usize, usize),
        dropout_seed: Option<u64>,
        first: usize,
        total: usize,
    ) -> Result<(f64, Vec<f32>)> {
        if t.is_empty() {
            return Ok((0.0, vec![0f32; self.params.len()]));
        }
        let n = self.check(x, t, size)?;
        if self.out_channels() != self.channels() {
            bail!(
                "fused U-Net: the simple loss trains a network with as many output channels as input channels, not {} -> {}",
                self.channels(),
                self.out_channels()
            );
        }
        if target.len() != x.len() {
            bail!(
                "fused U-Net: {} target values for {} inputs",
                target.len(),
                x.len()
            );
        }
        let scale = 2.0 / total.max(1) as f32;
        let head = |row: usize, y: &[f32], dy: &mut Vec<f32>| -> f64 {
            let tg = &target[(row - first) * n..(row - first + 1) * n];
            let mut sum = 0f64;
            dy.clear();
            for (&y, &tg) in y.iter().zip(tg) {
                let d = y - tg;
                sum += (d * d) as f64;
                dy.push(scale * d);
            }
            sum
        };
        self.grads_with(x, t, size, dropout_seed, first, &head)
    }

    /// The gradient of any loss that adds up over examples: `head(row, y, dy)` is given the
    /// global index of an example and its output y `[C_out, H, W]`, writes dL/dy into `dy`
    /// (resized by the head to y's length) and returns the example's share of the sum the
    /// caller wants. Returns (that sum, the parameters' gradient); rows as
    /// [`FusedUnet::loss_and_grads_rows`].
    pub fn grads_with(
        &self,
        x: &[f32],
        t: &[f32],
        size: (usize, usize),
        dropout_seed: Option<u64>,
        first: usize,
        head: &OutputLoss<'_>,
    ) -> Result<(f64, Vec<f32>)> {
        self.grads_with_inputs(x, t, size, dropout_seed, first, head, None)
    }

    /// [`FusedUnet::grads_with`], and with a `sink` each example's gradient with respect to
    /// its input and its time value, `sink(row, dL/dx, dL/dt)`, from the same backward pass
    /// (continuous time's learned schedule differentiates through both).
    #[allow(clippy::too_many_arguments)]
    pub fn grads_with_inputs(
        &self,
        x: &[f32],
        t: &[f32],
        size: (usize, usize),
        dropout_seed: Option<u64>,
        first: usize,
        head: &OutputLoss<'_>,
        sink: Option<&InputSink<'_>>,
    ) -> Result<(f64, Vec<f32>)> {
        if t.is_empty() {
            return Ok((0.0, vec![0f32; self.params.len()]));
        }
        let n = self.check(x, t, size)?;
        let m = self.out_channels() * size.0 * size.1;
        let route = self.plan.route(size);
        let chunk = self.chunk(t.len());
        let parts: Vec<(Workspace, Result<f64>)> = x
            .par_chunks(chunk * n)
            .zip(t.par_chunks(chunk))
            .enumerate()
            .map(|(part, (x, t))| {
                let mut ws = self.workspace();
                ws.set_pass(Pass::Training);
                ws.input_grads = sink.is_some();
                // The thread's gradient buffer lives in its workspace: zeroing it is cheaper
                // than fresh pages, which the kernel clears.
                let mut grads = std::mem::take(&mut ws.grads);
                grads.clear();
                grads.resize(self.params.len(), 0.0);
                let mut sum = 0f64;
                let mut bad = None;
                for (e, &te) in t.iter().enumerate() {
                    let xe = &x[e * n..(e + 1) * n];
                    let row = first + part * chunk + e;
                    let dropout = dropout_seed.map(|s| (s, row as u64));
                    self.plan
                        .forward(&self.params, xe, &route, te, dropout, &mut ws);
                    let mut dy = std::mem::take(&mut ws.d_output);
                    sum += head(row, &ws.tape.output, &mut dy);
                    ws.d_output = dy;
                    if ws.d_output.len() != m {
                        bad = Some(ws.d_output.len());
                        break;
                    }
                    self.plan
                        .backward(&self.params, &mut grads, xe, &route, &mut ws);
                    if let Some(sink) = sink {
                        sink(row, &ws.d_input, ws.d_time);
                    }
                }
                ws.grads = grads;
                let sum = match bad {
                    Some(len) => Err(candle_core::Error::Msg(format!(
                        "fused U-Net: a loss gave {len} output gradients for {m} outputs"
                    ))),
                    None => Ok(sum),
                };
                (ws, sum)
            })
            .collect();
        let mut grads = Vec::with_capacity(self.params.len());
        let mut sum = 0f64;
        // Summed in batch order, so the result does not depend on scheduling.
        for (ws, s) in parts {
            if grads.is_empty() {
                grads.extend_from_slice(&ws.grads);
            } else {
                add_assign(&mut grads, &ws.grads);
            }
            self.give_back(ws);
            sum += s?;
        }
        self.plan.fold_shifted_grads(&mut grads);
        Ok((sum, grads))
    }

    /// The layout of the network's parameters at the start of the engine's buffer (the order
    /// the engine visits them), named after `vars`, the network's variables.
    pub fn table(&self, vars: &[(String, Var)]) -> anyhow::Result<ParamTable> {
        ParamTable::of_tensors(&self.tensors, vars, self.num_params(), "fused U-Net")
    }

    /// Takes the parameters from a buffer of [`FusedUnet::table`]'s layout.
    pub fn load_params(&mut self, params: &[f32]) -> anyhow::Result<()> {
        let n = self.num_params();
        if params.len() != n {
            anyhow::bail!("fused U-Net: {} parameters, expected {n}", params.len());
        }
        self.params[..n].copy_from_slice(params);
        self.plan.derive_weights(&mut self.params);
        Ok(())
    }
}

/// The fused U-Net as a [`TrainStep`] of the simple loss (sums: `[loss]`).
pub struct FusedUnetStep {
    engine: FusedUnet,
    table: ParamTable,
    /// The learned-variance loss, in place of the simple loss (sums: `engine::learned_sums`).
    head: Option<LearnedHead>,
}

impl FusedUnetStep {
    /// `vars`: the network's variables (for the parameters' names).
    pub fn new(
        engine: FusedUnet,
        vars: &[(String, Var)],
        head: Option<LearnedHead>,
    ) -> anyhow::Result<Self> {
        let table = engine.table(vars)?;
        Ok(Self {
            engine,
            table,
            head,
        })
    }
}

impl FusedUnetStep {
    /// The loss of a [`crate::engine::WeightedRows`] batch: each example's dL/dy is
    /// `2 w_b / B (y - target)`; with a tangent, the same backward pass gives dL/dx and dL/dc,
    /// projected on it.
    #[allow(clippy::too_many_arguments)]
    fn weighted(
        &mut self,
        batch: &DenoiseBatch,
        wr: &crate::engine::WeightedRows,
        xt: &[f32],
        target: &[f32],
        size: (usize, usize),
        rows: std::ops::Range<usize>,
        grads: &mut [f32],
    ) -> anyhow::Result<Vec<f64>> {
        let b = wr.weights.len();
        let n = xt.len() / b.max(1);
        if wr.model_t.len() != b || n * b != xt.len() || target.len() != xt.len() {
            anyhow::bail!("fused U-Net: a weighted batch's sizes do not match");
        }
        if self.engine.out_channels() != self.engine.channels() {
            anyhow::bail!("fused U-Net: a weighted loss trains a network of C output channels");
        }
        let tangent = wr.tangent_values()?;
        let dc = wr.tangent.as_ref().map_or(0.0, |t| t.1);
        let target_tangent = match &wr.target_tangent {
            Some(t) => t.flatten_all()?.to_vec1::<f32>()?,
            None => Vec::new(),
        };
        // Each row's SSE, g_b through the network, and -2 w_b (y - target) . d target/d gamma.
        let per = std::sync::Mutex::new(vec![0f64; 3 * b]);
        let record = |at: usize, v: f64| {
            if let Ok(mut p) = per.lock() {
                p[at] = v;
            }
        };
        let head = |row: usize, y: &[f32], dy: &mut Vec<f32>| -> f64 {
            let tg = &target[row * n..(row + 1) * n];
            let w = wr.weights[row];
            let scale = (2.0 * w / b as f64) as f32;
            let mut sse = 0f64;
            dy.clear();
            for (&y, &tg) in y.iter().zip(tg) {
                let d = y - tg;
                sse += (d * d) as f64;
                dy.push(scale * d);
            }
            record(row, sse);
            if !target_tangent.is_empty() {
                let tt = &target_tangent[row * n..(row + 1) * n];
                let dot: f64 = y
                    .iter()
                    .zip(tg)
                    .zip(tt)
                    .map(|((&y, &tg), &t)| (y - tg) as f64 * t as f64)
                    .sum();
                record(2 * b + row, -2.0 * w * dot);
            }
            w * sse / b as f64
        };
        let sink = |row: usize, dx: &[f32], dt: f64| {
            let tan = &tangent[row * n..(row + 1) * n];
            let along: f64 = dx.iter().zip(tan).map(|(&a, &t)| a as f64 * t as f64).sum();
            record(b + row, b as f64 * (along + dt * dc));
        };
        let sink: Option<&crate::engine::unet::InputSink<'_>> =
            wr.tangent.is_some().then_some(&sink);
        let (loss, g) = self.engine.grads_with_inputs(
            &xt[rows.start * n..rows.end * n],
            &wr.model_t[rows.clone()],
            size,
            batch.dropout_seed,
            rows.start,
            &head,
            sink,
        )?;
        grads.copy_from_slice(&g[..grads.len()]);
        let per = per.into_inner().unwrap_or_default();
        let mut sums = vec![0.0; wr.sums_len(b)];
        sums[0] = loss;
        for row in rows {
            sums[1 + row] = per[row];
            if wr.tangent.is_some() {
                sums[1 + b + row] = per[b + row] + per[2 * b + row];
            }
        }
        Ok(sums)
    }
}

impl TrainStep for FusedUnetStep {
    type Batch = DenoiseBatch;

    fn table(&self) -> &ParamTable {
        &self.table
    }

    fn read_params(&self) -> anyhow::Result<Vec<f32>> {
        Ok(self.engine.params[..self.table.len()].to_vec())
    }

    fn loss_and_grads(
        &mut self,
        params: &[f32],
        batch: &DenoiseBatch,
        rows: std::ops::Range<usize>,
        grads: &mut [f32],
    ) -> anyhow::Result<Vec<f64>> {
        self.engine.load_params(params)?;
        let dims = batch.xt.dims();
        let (b, size) = match *dims {
            [b, _, h, w] => (b, (h, w)),
            _ => anyhow::bail!("fused U-Net: images [B, C, H, W] expected, got {dims:?}"),
        };
        let values = |x: &Tensor| -> Result<Vec<f32>> { x.flatten_all()?.to_vec1::<f32>() };
        let (xt, target) = (values(&batch.xt)?, values(&batch.target)?);
        let n = xt.len() / b.max(1);
        let (from, to) = (rows.start * n, rows.end * n);
        if let Some(wr) = &batch.weighted {
            return self.weighted(batch, wr, &xt, &target, size, rows, grads);
        }
        let tf: Vec<f32> = batch.t.iter().map(|&t| t as f32).collect();
        if let Some(head) = &self.head {
            // The head's closed-form dL/dy of each example, its rows one at a time.
            if self.engine.out_channels() != 2 * self.engine.channels() {
                anyhow::bail!(
                    "fused U-Net: learned variances need 2C output channels, this network gives {} for {}",
                    self.engine.out_channels(),
                    self.engine.channels()
                );
            }
            let values = crate::engine::LearnedValues::new(batch)?;
            let vb = std::sync::Mutex::new(vec![f64::NAN; values.len()]);
            let one = |row: usize, y: &[f32], dy: &mut Vec<f32>| -> f64 {
                dy.resize(y.len(), 0.0);
                match values.rows_into(head, row..row + 1, y, dy) {
                    Ok((loss, v)) => {
                        if let (Ok(mut acc), Some(v)) = (vb.lock(), v.first()) {
                            acc[row] = *v;
                        }
                        loss
                    }
                    Err(_) => {
                        dy.clear();
                        f64::NAN
                    }
                }
            };
            let (loss, g) = self.engine.grads_with(
                &xt[from..to],
                &tf[rows.clone()],
                size,
                batch.dropout_seed,
                rows.start,
                &one,
            )?;
            grads.copy_from_slice(&g[..grads.len()]);
            let vb = vb.into_inner().unwrap_or_default();
            let mine = &vb[rows.clone()];
            return Ok(crate::engine::learned_sums(vb.len(), rows, loss, mine));
        }
        let (sum, g) = self.engine.loss_and_grads_rows(
            &xt[from..to],
            &tf[rows.clone()],
            &target[from..to],
            size,
            batch.dropout_seed,
            rows.start,
            xt.len(),
        )?;
        grads.copy_from_slice(&g[..grads.len()]);
        Ok(vec![sum / xt.len().max(1) as f64])
    }
}

impl Denoiser for FusedUnet {
    fn forward(&self, xt: &Tensor, t: &Tensor) -> Result<Tensor> {
        FusedUnet::forward(self, xt, t)
    }

    /// The engine's output is outside candle's autodiff graph: refused rather than silently
    /// constant (its own [`Denoiser::vjp`] differentiates it).
    fn forward_differentiable(&self, _xt: &Tensor, _t: &Tensor) -> Result<Tensor> {
        bail!(
            "the fused U-Net engine's output is outside candle's autodiff; use its vector-Jacobian products (Denoiser::vjp)"
        )
    }

    fn vjp(&self, xt: &Tensor, t: &Tensor, cotangents: &[Tensor]) -> Result<(Tensor, Vec<Tensor>)> {
        FusedUnet::vjp(self, xt, t, cotangents)
    }
}
