//! The U-Net of [`crate::diffusion::nets`] on the CPU as one fused engine: forward pass, hand-derived
//! backward pass and the simple loss, one example at a time per thread.
//!
//! Every layer of the U-Net (GroupNorm included: its statistics are per example and group)
//! acts on each example separately, so the batch splits into one contiguous range per thread.
//! A thread runs forward and backward for one example after the other in buffers it reuses
//! (an example's activations, ~2 MB, stay in cache), adding its parameter gradients into its
//! own buffer; the ranges' gradients are summed in order at the end, so the result does not
//! depend on scheduling. No tensor is allocated, no graph recorded, and there is no barrier
//! between layers. A stride-1 3x3 convolution is 3 gemms over 3 row-shifted copies of its
//! input (`shifted_rows`; im2col would make 9), its dx the same convolution of dy with the
//! flipped weights, its dW 3 gemms against the copies kept from the forward pass; the
//! stride-2 ones are im2col + one gemm (see [`crate::diffusion::conv`]). The time projection of each
//! residual block is added as a per-channel bias of its first convolution, its skip branch is
//! the starting value of the second convolution's output (accumulated in the gemm), and the
//! up path's concatenation is one copy per example.
//!
//! Backward, per layer (dy is the gradient of the output; `+=` accumulates):
//!
//! ```text
//! conv        y = W im2col(x) + b        dW += dy im2col(x)^T, db += sum dy, dx += col2im(W^T dy)
//!             (stride 1: col2im(W^T dy) = the convolution of dy with W'[c,o,u,v] = W[o,c,-u,-v])
//! group norm  see crate::diffusion::group_norm (closed form, optionally through the SiLU)
//! linear      y = W x + b                dW += dy x^T, db += dy, dx += W^T dy
//! attention   S = Q^T K / sqrt(C), A = softmax_rows(S), O = V A^T, y = x + P O + p
//!             dV = dO A, dA = dO^T V, dS = A * (dA - rowsum(A * dA)) / sqrt(C),
//!             dQ = K dS^T, dK = Q dS
//! upsample    nearest: dx[c, src(i), src(j)] += dy[c, i, j]
//! loss        L = mean (y - target)^2    dy = 2 (y - target) / (B H W)
//! ```
//!
//! Q, K, V, O are `[C, HW]`, A and S `[HW, HW]` (row: query pixel). The engine is checked
//! against candle's autodiff of the same network in `tests/diffusion.rs`.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, bail};
use candle_nn::Linear;
use std::sync::Mutex;

use rayon::prelude::*;

use crate::diffusion::conv::Conv2d;
use crate::diffusion::group_norm::GroupNorm;
use crate::diffusion::nets::{Attention, ResBlock, Stage, UNet};
use crate::diffusion::process::Denoiser;
use crate::nn::conv::{Geometry, gemm_rm};
use crate::nn::group_norm::{group_backward, group_forward, silu, silu_grad};
use crate::nn::kernels::add_assign;

/// A convolution's place in the flat parameter vector.
#[derive(Debug, Clone, Copy)]
struct ConvP {
    /// Index among the network's convolutions (the slot of its kept im2col matrix).
    id: usize,
    w: usize,
    /// Stride-1 k x k convolutions (k > 1): where the flipped, transposed weight
    /// `W'[c, o, u, v] = W[o, c, k-1-u, k-1-v]` is kept (as k matrices `W'_u [C, O k]`, for
    /// [`shifted_conv`]), so that dx is itself a convolution of dy instead of a gemm and a
    /// col2im.
    wf: Option<usize>,
    /// The same convolutions: where `W_u[o, c k + v] = W[o, c, u, v]` (u = 0..k, each
    /// `[O, C k]`) is kept, for the row-shift forward pass ([`shifted_rows`]).
    wu: Option<usize>,
    b: usize,
    o: usize,
    c: usize,
    k: usize,
    stride: usize,
}

/// The unfolded inputs of the convolutions (im2col matrices, or the shifted rows of
/// [`shifted_rows`]): one scratch buffer, and when training (`keep`) one kept buffer per
/// convolution, written by the forward pass and read again by the backward pass for dW (in
/// place of unfolding the same input a second time).
#[derive(Default)]
struct Cols {
    scratch: Vec<f32>,
    kept: Vec<Vec<f32>>,
    keep: bool,
}

impl Cols {
    fn for_forward(&mut self, id: usize) -> &mut Vec<f32> {
        if !self.keep {
            return &mut self.scratch;
        }
        if self.kept.len() <= id {
            self.kept.resize_with(id + 1, Vec::new);
        }
        &mut self.kept[id]
    }
}

/// Where a convolution's backward pass puts dx.
enum Dx<'a> {
    None,
    Add(&'a mut [f32]),
    Set(&'a mut [f32]),
}

/// How a convolution's output starts before the gemm adds `W im2col(x)`.
enum Init<'a> {
    /// The bias.
    Bias,
    /// The bias plus a per-channel term (the time projection).
    BiasPlus(&'a [f32]),
    /// What the buffer holds (the residual branch) plus the bias.
    Accumulate,
}

/// `buf` resized to `n` values, for a buffer the caller overwrites whole (no zeroing when it
/// already has that length, as when it is reused from the previous example).
fn sized(buf: &mut Vec<f32>, n: usize) {
    buf.resize(n, 0.0);
}

/// What a GroupNorm's backward pass reads: (mean, 1/sigma) per group and, after a fused
/// SiLU, sigmoid(a) per value.
#[derive(Default)]
struct NormTape {
    stats: Vec<f32>,
    sig: Vec<f32>,
    /// Forward only: `sig` is one channel's scratch, not kept.
    inference: bool,
}

/// For a stride-1 "same" k x k convolution (p = k / 2): `e [C k, (H + 2p) W]`, row (c, v)
/// = channel c shifted by v - p columns (zero where the kernel overhangs a side), with p zero
/// rows above and below. The im2col row of kernel offset (u, v) is then the contiguous run
/// of row (c, v) starting at u W, so `y = sum_u W_u e[:, u W ..]` with `W_u[o, c k + v] =
/// W[o, c, u, v]`: k gemms over k shifted copies of x, where im2col makes k^2.
fn shifted_rows(x: &[f32], c: usize, (h, w): (usize, usize), k: usize, e: &mut [f32]) {
    let p = k / 2;
    let plane = (h + 2 * p) * w;
    for ci in 0..c {
        let src = &x[ci * h * w..(ci + 1) * h * w];
        for v in 0..k {
            let row = &mut e[(ci * k + v) * plane..(ci * k + v + 1) * plane];
            row[..p * w].fill(0.0);
            row[(p + h) * w..].fill(0.0);
            let mid = &mut row[p * w..(p + h) * w];
            let dv = v as isize - p as isize;
            // mid[f] = src[f + dv], then the |dv| wrapped columns of each line zeroed.
            if dv >= 0 {
                let d = dv as usize;
                mid[..h * w - d].copy_from_slice(&src[d..]);
                mid[h * w - d..].fill(0.0);
                for y in 0..h {
                    for z in w - d..w {
                        mid[y * w + z] = 0.0;
                    }
                }
            } else {
                let d = (-dv) as usize;
                mid[d..].copy_from_slice(&src[..h * w - d]);
                mid[..d].fill(0.0);
                for y in 0..h {
                    for z in 0..d {
                        mid[y * w + z] = 0.0;
                    }
                }
            }
        }
    }
}

/// `y [M, H W] (+)= sum_u W_u e_u` for `e` from [`shifted_rows`] (e_u: its rows from
/// offset u W), `wts` = the k matrices `W_u [M, CK]` one after the other; `add` false
/// overwrites `y`.
fn shifted_conv(
    y: &mut [f32],
    wts: &[f32],
    e: &[f32],
    (m, ck, k): (usize, usize, usize),
    (h, w): (usize, usize),
    add: bool,
) {
    let (hw, plane) = (h * w, (h + k - 1) * w);
    assert!(y.len() >= m * hw && wts.len() >= k * m * ck && e.len() >= ck * plane);
    for u in 0..k {
        // SAFETY: the asserts above bound every index: row r of e_u spans
        // r plane + u w .. r plane + u w + hw <= (r + 1) plane.
        unsafe {
            gemm::gemm(
                m,
                hw,
                ck,
                y.as_mut_ptr(),
                1,
                hw as isize,
                add || u > 0,
                wts.as_ptr().add(u * m * ck),
                1,
                ck as isize,
                e.as_ptr().add(u * w),
                1,
                plane as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

/// `dW_u[o, (c, v)] += sum_j dy[o, j] e_u[(c, v), j]` for u = 0..k: the weight gradient of a
/// stride-1 same convolution from the shifted rows `e` of its input, in the layout of
/// [`ConvP::wu`] (`dwu` = k matrices `[O, C k]`); [`Plan::fold_shifted_grads`] moves it into
/// the `[O, C, k, k]` gradient once per step.
fn shifted_weight_grad(
    dwu: &mut [f32],
    dy: &[f32],
    e: &[f32],
    (o, c, k): (usize, usize, usize),
    (h, w): (usize, usize),
) {
    let (hw, plane, ck) = (h * w, (h + k - 1) * w, c * k);
    assert!(dy.len() >= o * hw && e.len() >= ck * plane && dwu.len() >= k * o * ck);
    for u in 0..k {
        // SAFETY: as in shifted_conv; e_u^T is read as the [HW, C k] matrix with row stride
        // 1 and column stride `plane`; dW_u is the u-th [O, C k] block of `dwu`.
        unsafe {
            gemm::gemm(
                o,
                ck,
                hw,
                dwu.as_mut_ptr().add(u * o * ck),
                1,
                ck as isize,
                true,
                dy.as_ptr(),
                1,
                hw as isize,
                e.as_ptr().add(u * w),
                plane as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

/// `buf` resized to `n` zeros.
fn zeroed(buf: &mut Vec<f32>, n: usize) {
    buf.clear();
    buf.resize(n, 0.0);
}

impl ConvP {
    fn geometry(&self, (h, w): (usize, usize)) -> Geometry {
        Geometry {
            k: self.k,
            stride: self.stride,
            padding: self.k / 2,
            h,
            w,
        }
    }

    fn weight<'a>(&self, p: &'a [f32]) -> &'a [f32] {
        &p[self.w..self.w + self.o * self.c * self.k * self.k]
    }

    /// A 1x1 stride-1 convolution reads its input as the im2col matrix.
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1
    }

    /// `y [O, OH OW] = init + W im2col(x)`, `x` `[C, H W]`; returns (OH, OW).
    fn forward(
        &self,
        p: &[f32],
        x: &[f32],
        size: (usize, usize),
        y: &mut Vec<f32>,
        init: Init,
        cols: &mut Cols,
    ) -> (usize, usize) {
        let g = self.geometry(size);
        let (oh, ow) = g.output();
        let (ohw, ckk) = (oh * ow, self.c * self.k * self.k);
        let bias = &p[self.b..self.b + self.o];
        match init {
            Init::Accumulate => {
                debug_assert_eq!(y.len(), self.o * ohw);
                for (row, b) in y.chunks_mut(ohw).zip(bias) {
                    row.iter_mut().for_each(|v| *v += b);
                }
            }
            Init::Bias => {
                y.clear();
                for &b in bias {
                    y.extend(std::iter::repeat_n(b, ohw));
                }
            }
            Init::BiasPlus(extra) => {
                y.clear();
                for (&b, &e) in bias.iter().zip(extra) {
                    y.extend(std::iter::repeat_n(b + e, ohw));
                }
            }
        }
        let w = self.weight(p);
        if self.pointwise() {
            gemm_rm(y, w, false, x, false, (self.o, ohw, self.c), true);
        } else if let (Some(wu), true) = (self.wu, (oh, ow) == size) {
            // k shifted copies of the input instead of im2col's k^2 (see shifted_rows); kept
            // for dW when training.
            let (c, k) = (self.c, self.k);
            let buf = cols.for_forward(self.id);
            let len = c * k * (size.0 + k - 1) * size.1;
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            shifted_rows(x, c, size, k, buf);
            shifted_conv(y, &p[wu..], buf, (self.o, c * k, k), size, true);
        } else {
            let buf = cols.for_forward(self.id);
            if buf.len() < ckk * ohw {
                buf.resize(ckk * ohw, 0.0);
            }
            g.im2col(x, self.c, buf);
            gemm_rm(y, w, false, buf, false, (self.o, ohw, ckk), true);
        }
        (oh, ow)
    }

    /// `dW += dy im2col(x)^T`, `db += sum dy` and, when asked, `dx (+)= col2im(W^T dy)`:
    /// `Dx::Add` accumulates into the buffer, `Dx::Set` overwrites it.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        p: &[f32],
        grads: &mut [f32],
        x: &[f32],
        size: (usize, usize),
        dy: &[f32],
        dx: Dx,
        cols: &mut Cols,
    ) {
        let g = self.geometry(size);
        let (oh, ow) = g.output();
        let (ohw, ckk) = (oh * ow, self.c * self.k * self.k);
        if self.pointwise() {
            let dw = &mut grads[self.w..self.w + self.o * ckk];
            gemm_rm(dw, dy, false, x, true, (self.o, ckk, ohw), true);
        } else {
            let shifted = self.wu.is_some() && (oh, ow) == size;
            let len = if shifted {
                self.c * self.k * (size.0 + self.k - 1) * size.1
            } else {
                ckk * ohw
            };
            let buf = match cols
                .kept
                .get(self.id)
                .filter(|b| cols.keep && b.len() >= len)
            {
                Some(buf) => buf,
                None => {
                    let buf = &mut cols.scratch;
                    if buf.len() < len {
                        buf.resize(len, 0.0);
                    }
                    if shifted {
                        shifted_rows(x, self.c, size, self.k, buf);
                    } else {
                        g.im2col(x, self.c, buf);
                    }
                    buf
                }
            };
            match self.wu.filter(|_| shifted) {
                Some(wu) => {
                    let dwu = &mut grads[wu..wu + self.o * ckk];
                    shifted_weight_grad(dwu, dy, buf, (self.o, self.c, self.k), size);
                }
                None => {
                    let dw = &mut grads[self.w..self.w + self.o * ckk];
                    gemm_rm(dw, dy, false, buf, true, (self.o, ckk, ohw), true);
                }
            }
        }
        for (db, row) in grads[self.b..self.b + self.o]
            .iter_mut()
            .zip(dy.chunks(ohw))
        {
            *db += row.iter().sum::<f32>();
        }
        let (dx, add) = match dx {
            Dx::None => return,
            Dx::Add(dx) => (dx, true),
            Dx::Set(dx) => (dx, false),
        };
        {
            let w = self.weight(p);
            if self.pointwise() {
                gemm_rm(dx, w, true, dy, false, (ckk, ohw, self.o), add);
            } else if let (Some(wf), true) = (self.wf, (oh, ow) == size) {
                // dx = the convolution of dy with the flipped weights, by shifted rows.
                let (o, k) = (self.o, self.k);
                let e = &mut cols.scratch;
                let len = o * k * (size.0 + k - 1) * size.1;
                if e.len() < len {
                    e.resize(len, 0.0);
                }
                shifted_rows(dy, o, size, k, e);
                shifted_conv(dx, &p[wf..], e, (self.c, o * k, k), size, add);
            } else {
                if !add {
                    dx.fill(0.0);
                }
                let cols = &mut cols.scratch;
                if cols.len() < ckk * ohw {
                    cols.resize(ckk * ohw, 0.0);
                }
                gemm_rm(cols, w, true, dy, false, (ckk, ohw, self.o), false);
                g.col2im(cols, self.c, dx);
            }
        }
    }
}

/// A GroupNorm's place in the flat parameter vector.
#[derive(Debug, Clone, Copy)]
struct NormP {
    g: usize,
    b: usize,
    c: usize,
    groups: usize,
    eps: f64,
}

impl NormP {
    /// `y = [silu](gamma (x - mu) / sigma + beta)` over `x` `[C, HW]`; `nt` gets (mu, 1/sigma)
    /// per group and, with the SiLU, sigmoid(a) per value.
    fn forward(
        &self,
        p: &[f32],
        x: &[f32],
        hw: usize,
        y: &mut Vec<f32>,
        with_silu: bool,
        nt: &mut NormTape,
    ) {
        let (gamma, beta) = (&p[self.g..self.g + self.c], &p[self.b..self.b + self.c]);
        let cg = self.c / self.groups;
        sized(y, x.len());
        sized(&mut nt.stats, 2 * self.groups);
        // Inference keeps no sigmoid for a backward pass: one channel's worth, reused.
        let keep = !nt.inference;
        sized(
            &mut nt.sig,
            if !with_silu {
                0
            } else if keep {
                x.len()
            } else {
                hw
            },
        );
        let len = cg * hw;
        for (gi, (yg, xg)) in y.chunks_mut(len).zip(x.chunks(len)).enumerate() {
            let sig = match (with_silu, keep) {
                (false, _) => &mut [][..],
                (true, true) => &mut nt.sig[gi * len..(gi + 1) * len],
                (true, false) => &mut nt.sig[..],
            };
            let ch = gi * cg..(gi + 1) * cg;
            let (gm, bt) = (&gamma[ch.clone()], &beta[ch]);
            let (mean, inv) = group_forward(yg, sig, xg, gm, bt, hw, self.eps, with_silu);
            nt.stats[2 * gi] = mean;
            nt.stats[2 * gi + 1] = inv;
        }
    }

    /// `dx += d group_norm`, `dgamma`, `dbeta +=` (see [`crate::diffusion::group_norm`]).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        p: &[f32],
        grads: &mut [f32],
        x: &[f32],
        hw: usize,
        nt: &NormTape,
        with_silu: bool,
        dy: &[f32],
        dx: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        let (gamma, beta) = (&p[self.g..self.g + self.c], &p[self.b..self.b + self.c]);
        let cg = self.c / self.groups;
        let len = cg * hw;
        sized(scratch, len);
        // The builder adds gamma before beta, so their gradients split at beta's offset.
        let (lower, upper) = grads.split_at_mut(self.b);
        let (dgamma, dbeta) = (&mut lower[self.g..self.g + self.c], &mut upper[..self.c]);
        for gi in 0..self.groups {
            let (r, ch) = (gi * len..(gi + 1) * len, gi * cg..(gi + 1) * cg);
            let sig = if with_silu { &nt.sig[r.clone()] } else { &[] };
            group_backward(
                &mut dx[r.clone()],
                &mut dgamma[ch.clone()],
                &mut dbeta[ch.clone()],
                &dy[r.clone()],
                sig,
                &x[r],
                (nt.stats[2 * gi], nt.stats[2 * gi + 1]),
                (&gamma[ch.clone()], &beta[ch]),
                hw,
                with_silu,
                scratch,
            );
        }
    }
}

/// A linear layer's place in the flat parameter vector (`weight` `[O, I]`).
#[derive(Debug, Clone, Copy)]
struct LinP {
    w: usize,
    b: usize,
    o: usize,
    i: usize,
}

impl LinP {
    /// `y = W x + b` for one example.
    fn forward(&self, p: &[f32], x: &[f32], y: &mut Vec<f32>) {
        sized(y, self.o);
        for (o, y) in y.iter_mut().enumerate() {
            let row = &p[self.w + o * self.i..self.w + (o + 1) * self.i];
            *y = p[self.b + o] + row.iter().zip(x).map(|(w, x)| w * x).sum::<f32>();
        }
    }

    /// `dW += dy x^T`, `db += dy` and, when asked, `dx += W^T dy`.
    fn backward(
        &self,
        p: &[f32],
        grads: &mut [f32],
        x: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
    ) {
        for (o, &d) in dy.iter().enumerate() {
            grads[self.b + o] += d;
            let at = self.w + o * self.i;
            add_scaled(&mut grads[at..at + self.i], x, d);
            if let Some(dx) = dx.as_deref_mut() {
                add_scaled(dx, &p[at..at + self.i], d);
            }
        }
    }
}

fn add_scaled(dst: &mut [f32], src: &[f32], a: f32) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += a * s);
}

/// A residual block's parameters.
#[derive(Debug, Clone)]
struct ResP {
    norm1: NormP,
    conv1: ConvP,
    time: LinP,
    norm2: NormP,
    conv2: ConvP,
    skip: Option<ConvP>,
}

/// What a residual block's backward pass reads of its forward pass.
#[derive(Default)]
struct ResTape {
    n1: Vec<f32>,
    norm1: NormTape,
    tproj: Vec<f32>,
    h1: Vec<f32>,
    /// silu(gn2(..)) times the dropout mask: the second convolution's input.
    n2: Vec<f32>,
    norm2: NormTape,
    /// The dropout mask ([`crate::nn::dropout`]); empty when nothing was dropped.
    mask: Vec<f32>,
}

/// Buffers the blocks' backward passes use.
#[derive(Default)]
struct BlockScratch {
    cols: Cols,
    gn: Vec<f32>,
    d1: Vec<f32>,
    d2: Vec<f32>,
    d3: Vec<f32>,
    dt: Vec<f32>,
}

impl ResP {
    /// `out = conv2(dropout(silu(gn2(conv1(silu(gn1(x))) + time(ta))))) + skip(x)`;
    /// `dropout` = (seed, stream, p) in training.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        p: &[f32],
        x: &[f32],
        size: (usize, usize),
        ta: &[f32],
        t: &mut ResTape,
        out: &mut Vec<f32>,
        cols: &mut Cols,
        dropout: Option<(u64, u64, f32)>,
    ) {
        let hw = size.0 * size.1;
        self.norm1.forward(p, x, hw, &mut t.n1, true, &mut t.norm1);
        self.time.forward(p, ta, &mut t.tproj);
        self.conv1
            .forward(p, &t.n1, size, &mut t.h1, Init::BiasPlus(&t.tproj), cols);
        self.norm2
            .forward(p, &t.h1, hw, &mut t.n2, true, &mut t.norm2);
        match dropout {
            Some((seed, stream, rate)) => {
                sized(&mut t.mask, t.n2.len());
                crate::nn::dropout::fill_mask(seed, stream, rate, &mut t.mask);
                crate::nn::dropout::apply(&mut t.n2, &t.mask);
            }
            None => t.mask.clear(),
        }
        match &self.skip {
            Some(s) => {
                s.forward(p, x, size, out, Init::Bias, cols);
            }
            None => {
                out.clear();
                out.extend_from_slice(x);
            }
        }
        self.conv2
            .forward(p, &t.n2, size, out, Init::Accumulate, cols);
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        p: &[f32],
        grads: &mut [f32],
        x: &[f32],
        size: (usize, usize),
        ta: &[f32],
        t: &ResTape,
        dout: &[f32],
        dx: &mut [f32],
        dta: &mut [f32],
        s: &mut BlockScratch,
    ) {
        let hw = size.0 * size.1;
        let o = self.conv2.o;
        sized(&mut s.d1, o * hw);
        self.conv2
            .backward(p, grads, &t.n2, size, dout, Dx::Set(&mut s.d1), &mut s.cols);
        if !t.mask.is_empty() {
            crate::nn::dropout::apply(&mut s.d1, &t.mask);
        }
        match &self.skip {
            Some(sk) => sk.backward(p, grads, x, size, dout, Dx::Add(&mut *dx), &mut s.cols),
            None => add_assign(dx, dout),
        }
        zeroed(&mut s.d2, o * hw);
        self.norm2.backward(
            p, grads, &t.h1, hw, &t.norm2, true, &s.d1, &mut s.d2, &mut s.gn,
        );
        sized(&mut s.dt, o);
        for (dt, row) in s.dt.iter_mut().zip(s.d2.chunks(hw)) {
            *dt = row.iter().sum();
        }
        self.time.backward(p, grads, ta, &s.dt, Some(dta));
        sized(&mut s.d1, x.len());
        self.conv1.backward(
            p,
            grads,
            &t.n1,
            size,
            &s.d2,
            Dx::Set(&mut s.d1),
            &mut s.cols,
        );
        self.norm1
            .backward(p, grads, x, hw, &t.norm1, true, &s.d1, dx, &mut s.gn);
    }
}

/// The attention block's parameters.
#[derive(Debug, Clone)]
struct AttnP {
    norm: NormP,
    qkv: ConvP,
    proj: ConvP,
}

#[derive(Default)]
struct AttnTape {
    hn: Vec<f32>,
    norm: NormTape,
    qkv: Vec<f32>,
    att: Vec<f32>,
    ot: Vec<f32>,
}

impl AttnP {
    fn scale(&self) -> f32 {
        (1.0 / (self.proj.o as f64).sqrt()) as f32
    }

    /// `y = x + proj(V softmax(Q^T K / sqrt(C))^T)`, `[Q; K; V] = qkv(group_norm(x))`.
    fn forward(
        &self,
        p: &[f32],
        x: &[f32],
        size: (usize, usize),
        t: &mut AttnTape,
        out: &mut Vec<f32>,
        cols: &mut Cols,
    ) {
        let (c, n) = (self.proj.o, size.0 * size.1);
        self.norm.forward(p, x, n, &mut t.hn, false, &mut t.norm);
        self.qkv
            .forward(p, &t.hn, size, &mut t.qkv, Init::Bias, cols);
        let (q, rest) = t.qkv.split_at(c * n);
        let (k, v) = rest.split_at(c * n);
        sized(&mut t.att, n * n);
        gemm_rm(&mut t.att, q, true, k, false, (n, n, c), false);
        let scale = self.scale();
        for row in t.att.chunks_mut(n) {
            row.iter_mut().for_each(|s| *s *= scale);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in row.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            row.iter_mut().for_each(|s| *s /= sum);
        }
        sized(&mut t.ot, c * n);
        gemm_rm(&mut t.ot, v, false, &t.att, true, (c, n, n), false);
        out.clear();
        out.extend_from_slice(x);
        self.proj
            .forward(p, &t.ot, size, out, Init::Accumulate, cols);
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        p: &[f32],
        grads: &mut [f32],
        x: &[f32],
        size: (usize, usize),
        t: &AttnTape,
        dy: &[f32],
        dx: &mut [f32],
        s: &mut BlockScratch,
    ) {
        let (c, n) = (self.proj.o, size.0 * size.1);
        add_assign(dx, dy);
        sized(&mut s.d1, c * n); // dO
        self.proj
            .backward(p, grads, &t.ot, size, dy, Dx::Set(&mut s.d1), &mut s.cols);
        let (q, rest) = t.qkv.split_at(c * n);
        let (k, v) = rest.split_at(c * n);
        sized(&mut s.d2, 3 * c * n);
        let (dq, rest) = s.d2.split_at_mut(c * n);
        let (dk, dv) = rest.split_at_mut(c * n);
        gemm_rm(dv, &s.d1, false, &t.att, false, (c, n, n), false);
        sized(&mut s.d3, n * n); // dA, then dS
        gemm_rm(&mut s.d3, &s.d1, true, v, false, (n, n, c), false);
        let scale = self.scale();
        for (ds, a) in s.d3.chunks_mut(n).zip(t.att.chunks(n)) {
            let dot: f32 = ds.iter().zip(a).map(|(d, a)| d * a).sum();
            for (d, &a) in ds.iter_mut().zip(a) {
                *d = a * (*d - dot) * scale;
            }
        }
        gemm_rm(dq, k, false, &s.d3, true, (c, n, n), false);
        gemm_rm(dk, q, false, &s.d3, false, (c, n, n), false);
        sized(&mut s.d1, c * n); // d group_norm(x)
        self.qkv.backward(
            p,
            grads,
            &t.hn,
            size,
            &s.d2,
            Dx::Set(&mut s.d1),
            &mut s.cols,
        );
        self.norm
            .backward(p, grads, x, n, &t.norm, false, &s.d1, dx, &mut s.gn);
    }
}

/// candle's nearest-neighbour source index for each of `dst` positions.
fn nearest(src: usize, dst: usize) -> impl Iterator<Item = usize> {
    let scale = src as f64 / dst as f64;
    (0..dst).map(move |i| ((i as f64 * scale) as usize).min(src - 1))
}

/// `y [C, DH, DW]` = nearest-neighbour upsampling of `x [C, SH, SW]`.
fn upsample(x: &[f32], (sh, sw): (usize, usize), (dh, dw): (usize, usize), y: &mut Vec<f32>) {
    let c = x.len() / (sh * sw);
    sized(y, c * dh * dw);
    let cols: Vec<usize> = nearest(sw, dw).collect();
    for (plane, out) in x.chunks(sh * sw).zip(y.chunks_mut(dh * dw)) {
        for (row, sy) in out.chunks_mut(dw).zip(nearest(sh, dh)) {
            for (v, &sx) in row.iter_mut().zip(&cols) {
                *v = plane[sy * sw + sx];
            }
        }
    }
}

/// The adjoint of [`upsample`]: `dx += ` the sum of `dy` over each source pixel's copies.
fn upsample_backward(
    dy: &[f32],
    (sh, sw): (usize, usize),
    (dh, dw): (usize, usize),
    dx: &mut [f32],
) {
    let cols: Vec<usize> = nearest(sw, dw).collect();
    for (plane, d) in dx.chunks_mut(sh * sw).zip(dy.chunks(dh * dw)) {
        for (row, sy) in d.chunks(dw).zip(nearest(sh, dh)) {
            for (&g, &sx) in row.iter().zip(&cols) {
                plane[sy * sw + sx] += g;
            }
        }
    }
}

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

/// The whole network's parameters.
#[derive(Debug, Clone)]
struct Plan {
    freqs: Vec<f32>,
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
    /// The parameter gradients of the examples this thread ran.
    grads: Vec<f32>,
}

impl Workspace {
    /// Training keeps what the backward pass reads (every im2col matrix, every sigmoid);
    /// inference keeps neither.
    fn set_training(&mut self, training: bool) {
        self.block.cols.keep = training;
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
            let (Some(wf), Some(wu)) = (c.wf, c.wu) else {
                continue;
            };
            let k = c.k;
            for o in 0..c.o {
                for ci in 0..c.c {
                    for u in 0..k {
                        for v in 0..k {
                            params[wf + ((u * c.c + ci) * c.o + o) * k + v] =
                                params[c.w + ((o * c.c + ci) * k + (k - 1 - u)) * k + (k - 1 - v)];
                            params[wu + (u * c.o + o) * c.c * k + ci * k + v] =
                                params[c.w + ((o * c.c + ci) * k + u) * k + v];
                        }
                    }
                }
            }
        }
    }

    /// Adds each shifted-row weight gradient (accumulated in the [`ConvP::wu`] region of
    /// `grads`, see [`shifted_weight_grad`]) into the convolution's own `[O, C, k, k]`
    /// gradient.
    fn fold_shifted_grads(&self, grads: &mut [f32]) {
        let mut plan = self.clone();
        for c in plan.convs_mut() {
            let Some(wu) = c.wu else { continue };
            let (k, ck) = (c.k, c.c * c.k);
            for u in 0..k {
                for o in 0..c.o {
                    for ci in 0..c.c {
                        for v in 0..k {
                            grads[c.w + ((o * c.c + ci) * k + u) * k + v] +=
                                grads[wu + (u * c.o + o) * ck + ci * k + v];
                        }
                    }
                }
            }
        }
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
        crate::nn::embedding::sinusoidal_embedding(t, &self.freqs, &mut tape.time_sinusoid);
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

    /// Adds the gradients of one example into `grads`, `ws.d_output` holding dL/dy.
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
        self.conv_in.backward(
            p,
            grads,
            x,
            sizes[0],
            &ws.d_hidden,
            Dx::None,
            &mut ws.block.cols,
        );
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
        self.time1
            .backward(p, grads, &tape.time_sinusoid, &ws.d_time1_silu, None);
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
            b: self.add(b)?,
            o,
            c: ci,
            k,
            stride,
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
        })
    }

    fn attn(&mut self, a: &Attention) -> Result<AttnP> {
        Ok(AttnP {
            norm: self.norm(&a.norm)?,
            qkv: self.conv(&a.qkv)?,
            proj: self.conv(&a.proj)?,
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
        let mut b = Builder::default();
        let base = net.time1.weight().dim(1)?;
        if base % 2 != 0 {
            bail!("fused U-Net: the time embedding width must be even, got {base}");
        }
        let freqs = crate::nn::embedding::sinusoid_frequencies(base);
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
                Stage::Downsample { conv, push } => StageP::Downsample {
                    conv: b.conv(conv)?,
                    push: *push,
                },
                Stage::Upsample { conv } => StageP::Upsample {
                    conv: b.conv(conv)?,
                },
            });
        }
        let plan = Plan {
            freqs,
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
        if plan.conv_in.c != plan.conv_out.o {
            bail!("fused U-Net: as many output channels as input channels expected");
        }
        let mut plan = plan;
        let mut params = b.params;
        for c in plan.convs_mut() {
            if c.stride == 1 && c.k > 1 {
                c.wf = Some(params.len());
                c.wu = Some(params.len() + c.o * c.c * c.k * c.k);
                params.resize(params.len() + 2 * c.o * c.c * c.k * c.k, 0.0);
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

    /// Re-reads the parameter values from the network's tensors (after an optimiser step
    /// changed its variables).
    pub fn refresh(&mut self) -> Result<()> {
        for (t, at) in &self.tensors {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            self.params[*at..*at + v.len()].copy_from_slice(&v);
        }
        self.plan.derive_weights(&mut self.params);
        Ok(())
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

    /// The number of image channels the network takes and gives.
    pub fn channels(&self) -> usize {
        self.plan.conv_in.c
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
        let route = self.plan.route(size);
        let chunk = self.chunk(t.len());
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(chunk * n)
            .zip(x.par_chunks(chunk * n).zip(t.par_chunks(chunk)))
            .for_each(|(out, (x, t))| {
                let mut ws = self.workspace();
                ws.set_training(false);
                for (e, &te) in t.iter().enumerate() {
                    let xe = &x[e * n..(e + 1) * n];
                    self.plan
                        .forward(&self.params, xe, &route, te, None, &mut ws);
                    out[e * n..(e + 1) * n].copy_from_slice(&ws.tape.output);
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
        Tensor::from_vec(out, (b, c, h, w), xt.device())
    }

    /// The simple loss `mean (eps_theta(x_t, t) - target)^2` of a batch and its gradient with
    /// respect to the flat parameters (the layout of [`FusedUnet::grad_store`]). With
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
        let n = self.check(x, t, size)?;
        if target.len() != x.len() {
            bail!(
                "fused U-Net: {} target values for {} inputs",
                target.len(),
                x.len()
            );
        }
        let route = self.plan.route(size);
        let chunk = self.chunk(t.len());
        let scale = 2.0 / x.len() as f32;
        let parts: Vec<(Workspace, f64)> = x
            .par_chunks(chunk * n)
            .zip(t.par_chunks(chunk).zip(target.par_chunks(chunk * n)))
            .enumerate()
            .map(|(part, (x, (t, target)))| {
                let mut ws = self.workspace();
                ws.set_training(true);
                // The thread's gradient buffer lives in its workspace: zeroing it is cheaper
                // than fresh pages, which the kernel clears.
                let mut grads = std::mem::take(&mut ws.grads);
                grads.clear();
                grads.resize(self.params.len(), 0.0);
                let mut sum = 0f64;
                for (e, &te) in t.iter().enumerate() {
                    let xe = &x[e * n..(e + 1) * n];
                    let dropout = dropout_seed.map(|s| (s, (part * chunk + e) as u64));
                    self.plan
                        .forward(&self.params, xe, &route, te, dropout, &mut ws);
                    ws.d_output.clear();
                    for (&y, &tg) in ws.tape.output.iter().zip(&target[e * n..(e + 1) * n]) {
                        let d = y - tg;
                        sum += (d * d) as f64;
                        ws.d_output.push(scale * d);
                    }
                    self.plan
                        .backward(&self.params, &mut grads, xe, &route, &mut ws);
                }
                ws.grads = grads;
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
            sum += s;
            self.give_back(ws);
        }
        self.plan.fold_shifted_grads(&mut grads);
        Ok((sum / x.len() as f64, grads))
    }

    /// Flat gradients as a `GradStore` keyed by the network's own parameter tensors, what
    /// `loss.backward()` returns and [`crate::optim::Adam::step`] reads.
    pub fn grad_store(&self, grads: &[f32]) -> Result<GradStore> {
        if grads.len() != self.params.len() {
            bail!(
                "fused U-Net: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            );
        }
        let mut store = GradStore::default();
        for (t, at) in &self.tensors {
            let g = Tensor::from_slice(&grads[*at..*at + t.elem_count()], t.shape(), t.device())?;
            store.insert(t, g);
        }
        Ok(store)
    }
}

impl Denoiser for FusedUnet {
    fn forward(&self, xt: &Tensor, t: &Tensor) -> Result<Tensor> {
        FusedUnet::forward(self, xt, t)
    }
}
