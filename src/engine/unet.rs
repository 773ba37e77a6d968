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
use crate::diffusion::nets::{Attention, ResBlock, UNet};
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
    n2: Vec<f32>,
    norm2: NormTape,
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
    /// `out = conv2(silu(gn2(conv1(silu(gn1(x))) + time(ta)))) + skip(x)`.
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
    ) {
        let hw = size.0 * size.1;
        self.norm1.forward(p, x, hw, &mut t.n1, true, &mut t.norm1);
        self.time.forward(p, ta, &mut t.tproj);
        self.conv1
            .forward(p, &t.n1, size, &mut t.h1, Init::BiasPlus(&t.tproj), cols);
        self.norm2
            .forward(p, &t.h1, hw, &mut t.n2, true, &mut t.norm2);
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

/// The whole network's parameters.
#[derive(Debug, Clone)]
struct Plan {
    freqs: Vec<f32>,
    time1: LinP,
    time2: LinP,
    conv_in: ConvP,
    down: Vec<ResP>,
    downsample: Vec<ConvP>,
    mid1: ResP,
    attn: Option<AttnP>,
    mid2: ResP,
    up: Vec<ResP>,
    upsample: Vec<ConvP>,
    norm_out: NormP,
    conv_out: ConvP,
}

/// One example's activations, named after the layer that wrote them (C = base channels,
/// T = 4C the time embedding's width; `[c, h, w]` planar at the level's resolution).
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
    /// `conv_in`'s output, `[C, H, W]`.
    conv_in_out: Vec<f32>,
    /// Each down level's residual block.
    down: Vec<ResTape>,
    /// Each down level's output (also the up path's skip input).
    down_out: Vec<Vec<f32>>,
    /// Each stride-2 downsampling convolution's output.
    downsample_out: Vec<Vec<f32>>,
    mid1: ResTape,
    mid1_out: Vec<f32>,
    attn: AttnTape,
    attn_out: Vec<f32>,
    mid2: ResTape,
    mid2_out: Vec<f32>,
    /// Each up level's input: the previous output concatenated with the skip.
    up_in: Vec<Vec<f32>>,
    /// Each up level's residual block.
    up: Vec<ResTape>,
    /// Each up level's output.
    up_out: Vec<Vec<f32>>,
    /// Each up level's output repeated 2 x 2 (nearest neighbour), before its convolution.
    up_nearest: Vec<Vec<f32>>,
    /// Each upsampling convolution's output.
    upsample_out: Vec<Vec<f32>>,
    /// `norm_out` (GroupNorm + SiLU) of the last up level, `[C, H, W]`: `conv_out`'s input.
    norm_out_silu: Vec<f32>,
    /// `norm_out`'s statistics for the backward pass.
    norm_out: NormTape,
    /// The network's output (the predicted eps, x_0 or v), `[C_in, H, W]`.
    output: Vec<f32>,
}

/// A thread's buffers: the tape, the blocks' scratch and the backward walk's gradients
/// (`d_x` is dL/dx for the tape's `x`).
#[derive(Default)]
struct Workspace {
    tape: Tape,
    block: BlockScratch,
    /// dL/d(the activation being walked back through).
    d_hidden: Vec<f32>,
    /// dL/d(the next activation down the walk).
    d_next: Vec<f32>,
    /// dL/d(each skip connection), added where the up path read it.
    dskip: Vec<Vec<f32>>,
    d_time_act: Vec<f32>,
    d_time2_pre: Vec<f32>,
    d_time1_silu: Vec<f32>,
    /// dL/d(output), set by the caller.
    d_output: Vec<f32>,
}

impl Workspace {
    /// Training keeps what the backward pass reads (every im2col matrix, every sigmoid);
    /// inference keeps neither.
    fn set_training(&mut self, training: bool) {
        self.block.cols.keep = training;
        let t = &mut self.tape;
        let blocks = t.down.iter_mut().chain(t.up.iter_mut());
        for r in blocks.chain([&mut t.mid1, &mut t.mid2]) {
            r.norm1.inference = !training;
            r.norm2.inference = !training;
        }
        t.attn.norm.inference = !training;
        t.norm_out.inference = !training;
    }

    fn new(levels: usize) -> Self {
        let mut w = Workspace::default();
        let many = || (0..levels).map(|_| Vec::new()).collect::<Vec<Vec<f32>>>();
        w.tape.down = (0..levels).map(|_| ResTape::default()).collect();
        w.tape.up = (0..levels).map(|_| ResTape::default()).collect();
        w.tape.down_out = many();
        w.tape.downsample_out = many();
        w.tape.up_in = many();
        w.tape.up_out = many();
        w.tape.up_nearest = many();
        w.tape.upsample_out = many();
        w.dskip = many();
        w
    }
}

impl Plan {
    /// Every convolution of the network.
    fn convs_mut(&mut self) -> Vec<&mut ConvP> {
        let mut v = vec![&mut self.conv_in, &mut self.conv_out];
        let blocks = self.down.iter_mut().chain(self.up.iter_mut());
        for r in blocks.chain([&mut self.mid1, &mut self.mid2]) {
            v.push(&mut r.conv1);
            v.push(&mut r.conv2);
            if let Some(s) = r.skip.as_mut() {
                v.push(s);
            }
        }
        v.extend(self.downsample.iter_mut());
        v.extend(self.upsample.iter_mut());
        if let Some(a) = self.attn.as_mut() {
            v.push(&mut a.qkv);
            v.push(&mut a.proj);
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

    fn levels(&self) -> usize {
        self.down.len()
    }

    /// The (H, W) of each level for an input of `size`.
    fn sizes(&self, size: (usize, usize)) -> Vec<(usize, usize)> {
        let mut out = vec![size];
        for ds in &self.downsample {
            let last = *out.last().expect("one size");
            out.push(ds.geometry(last).output());
        }
        out
    }

    /// One example `x` `[1, H, W]` at time `t`; the output lands in `tape.output`.
    fn forward(&self, p: &[f32], x: &[f32], sizes: &[(usize, usize)], t: f32, ws: &mut Workspace) {
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
        self.conv_in
            .forward(p, x, sizes[0], &mut tape.conv_in_out, Init::Bias, cols);
        let levels = self.levels();
        #[allow(clippy::needless_range_loop)] // i indexes five parallel lists
        for i in 0..levels {
            let input: &[f32] = if i == 0 {
                &tape.conv_in_out
            } else {
                &tape.downsample_out[i - 1]
            };
            self.down[i].forward(
                p,
                input,
                sizes[i],
                &tape.time_act,
                &mut tape.down[i],
                &mut tape.down_out[i],
                cols,
            );
            if let Some(ds) = self.downsample.get(i) {
                ds.forward(
                    p,
                    &tape.down_out[i],
                    sizes[i],
                    &mut tape.downsample_out[i],
                    Init::Bias,
                    cols,
                );
            }
        }
        let deepest = sizes[levels - 1];
        self.mid1.forward(
            p,
            &tape.down_out[levels - 1],
            deepest,
            &tape.time_act,
            &mut tape.mid1,
            &mut tape.mid1_out,
            cols,
        );
        let mid2_in: &[f32] = match &self.attn {
            Some(a) => {
                a.forward(
                    p,
                    &tape.mid1_out,
                    deepest,
                    &mut tape.attn,
                    &mut tape.attn_out,
                    cols,
                );
                &tape.attn_out
            }
            None => &tape.mid1_out,
        };
        self.mid2.forward(
            p,
            mid2_in,
            deepest,
            &tape.time_act,
            &mut tape.mid2,
            &mut tape.mid2_out,
            cols,
        );
        for j in 0..levels {
            let i = levels - 1 - j;
            let prev: &[f32] = if j == 0 {
                &tape.mid2_out
            } else {
                &tape.upsample_out[j - 1]
            };
            let cat = &mut tape.up_in[j];
            cat.clear();
            cat.extend_from_slice(prev);
            cat.extend_from_slice(&tape.down_out[i]);
            self.up[j].forward(
                p,
                &tape.up_in[j],
                sizes[i],
                &tape.time_act,
                &mut tape.up[j],
                &mut tape.up_out[j],
                cols,
            );
            if let Some(us) = self.upsample.get(j) {
                upsample(
                    &tape.up_out[j],
                    sizes[i],
                    sizes[i - 1],
                    &mut tape.up_nearest[j],
                );
                us.forward(
                    p,
                    &tape.up_nearest[j],
                    sizes[i - 1],
                    &mut tape.upsample_out[j],
                    Init::Bias,
                    cols,
                );
            }
        }
        let hw = sizes[0].0 * sizes[0].1;
        self.norm_out.forward(
            p,
            &tape.up_out[levels - 1],
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
    fn backward(
        &self,
        p: &[f32],
        grads: &mut [f32],
        x: &[f32],
        sizes: &[(usize, usize)],
        ws: &mut Workspace,
    ) {
        let tape = &ws.tape;
        let levels = self.levels();
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
        zeroed(&mut ws.d_next, tape.up_out[levels - 1].len());
        self.norm_out.backward(
            p,
            grads,
            &tape.up_out[levels - 1],
            hw,
            &tape.norm_out,
            true,
            &ws.d_hidden,
            &mut ws.d_next,
            &mut ws.block.gn,
        );
        std::mem::swap(&mut ws.d_hidden, &mut ws.d_next);
        for (d, out) in ws.dskip.iter_mut().zip(&tape.down_out) {
            zeroed(d, out.len());
        }
        zeroed(&mut ws.d_time_act, tape.time_act.len());
        for j in (0..levels).rev() {
            let i = levels - 1 - j;
            if let Some(us) = self.upsample.get(j) {
                // ws.d_hidden: the gradient of us_out[j]; through the conv, then the upsampling.
                sized(&mut ws.d_next, tape.up_nearest[j].len());
                us.backward(
                    p,
                    grads,
                    &tape.up_nearest[j],
                    sizes[i - 1],
                    &ws.d_hidden,
                    Dx::Set(&mut ws.d_next),
                    &mut ws.block.cols,
                );
                zeroed(&mut ws.d_hidden, tape.up_out[j].len());
                upsample_backward(&ws.d_next, sizes[i], sizes[i - 1], &mut ws.d_hidden);
            }
            zeroed(&mut ws.d_next, tape.up_in[j].len());
            self.up[j].backward(
                p,
                grads,
                &tape.up_in[j],
                sizes[i],
                &tape.time_act,
                &tape.up[j],
                &ws.d_hidden,
                &mut ws.d_next,
                &mut ws.d_time_act,
                &mut ws.block,
            );
            let prev = tape.up_in[j].len() - tape.down_out[i].len();
            add_assign(&mut ws.dskip[i], &ws.d_next[prev..]);
            ws.d_hidden.clear();
            ws.d_hidden.extend_from_slice(&ws.d_next[..prev]);
        }
        let deepest = sizes[levels - 1];
        let mid2_in: &[f32] = if self.attn.is_some() {
            &tape.attn_out
        } else {
            &tape.mid1_out
        };
        zeroed(&mut ws.d_next, mid2_in.len());
        self.mid2.backward(
            p,
            grads,
            mid2_in,
            deepest,
            &tape.time_act,
            &tape.mid2,
            &ws.d_hidden,
            &mut ws.d_next,
            &mut ws.d_time_act,
            &mut ws.block,
        );
        std::mem::swap(&mut ws.d_hidden, &mut ws.d_next);
        if let Some(a) = &self.attn {
            zeroed(&mut ws.d_next, tape.mid1_out.len());
            a.backward(
                p,
                grads,
                &tape.mid1_out,
                deepest,
                &tape.attn,
                &ws.d_hidden,
                &mut ws.d_next,
                &mut ws.block,
            );
            std::mem::swap(&mut ws.d_hidden, &mut ws.d_next);
        }
        self.mid1.backward(
            p,
            grads,
            &tape.down_out[levels - 1],
            deepest,
            &tape.time_act,
            &tape.mid1,
            &ws.d_hidden,
            &mut ws.dskip[levels - 1],
            &mut ws.d_time_act,
            &mut ws.block,
        );
        for i in (0..levels).rev() {
            let input: &[f32] = if i == 0 {
                &tape.conv_in_out
            } else {
                &tape.downsample_out[i - 1]
            };
            zeroed(&mut ws.d_next, input.len());
            let (lower, this) = ws.dskip.split_at_mut(i);
            self.down[i].backward(
                p,
                grads,
                input,
                sizes[i],
                &tape.time_act,
                &tape.down[i],
                &this[0],
                &mut ws.d_next,
                &mut ws.d_time_act,
                &mut ws.block,
            );
            if i > 0 {
                self.downsample[i - 1].backward(
                    p,
                    grads,
                    &tape.down_out[i - 1],
                    sizes[i - 1],
                    &ws.d_next,
                    Dx::Add(&mut lower[i - 1]),
                    &mut ws.block.cols,
                );
            } else {
                self.conv_in.backward(
                    p,
                    grads,
                    x,
                    sizes[0],
                    &ws.d_next,
                    Dx::None,
                    &mut ws.block.cols,
                );
            }
        }
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
        let plan = Plan {
            freqs,
            time1: b.linear(&net.time1)?,
            time2: b.linear(&net.time2)?,
            conv_in: b.conv(&net.conv_in)?,
            down: net.down.iter().map(|r| b.res(r)).collect::<Result<_>>()?,
            downsample: net
                .downsample
                .iter()
                .map(|c| b.conv(c))
                .collect::<Result<_>>()?,
            mid1: b.res(&net.mid1)?,
            attn: net.attn.as_ref().map(|a| b.attn(a)).transpose()?,
            mid2: b.res(&net.mid2)?,
            up: net.up.iter().map(|r| b.res(r)).collect::<Result<_>>()?,
            upsample: net
                .upsample
                .iter()
                .map(|c| b.conv(c))
                .collect::<Result<_>>()?,
            norm_out: b.norm(&net.norm_out)?,
            conv_out: b.conv(&net.conv_out)?,
        };
        if plan.conv_in.c != 1 || plan.conv_out.o != 1 {
            bail!("fused U-Net: one input and one output channel expected");
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

    fn check(&self, x: &[f32], t: &[f32], size: (usize, usize)) -> Result<usize> {
        let n = size.0 * size.1;
        if n == 0 || x.len() != t.len() * n {
            bail!(
                "fused U-Net: {} input values for {} timesteps of {}x{} images",
                x.len(),
                t.len(),
                size.0,
                size.1
            );
        }
        Ok(n)
    }

    fn workspace(&self) -> Workspace {
        let kept = self.pool.lock().map(|mut p| p.pop()).unwrap_or(None);
        kept.unwrap_or_else(|| Workspace::new(self.plan.levels()))
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

    /// eps_theta(x_t, t) of a batch: `x` `[B, 1, H, W]` values, `t` `[B]` -> `[B, 1, H, W]`.
    pub fn forward_values(&self, x: &[f32], t: &[f32], size: (usize, usize)) -> Result<Vec<f32>> {
        let n = self.check(x, t, size)?;
        let sizes = self.plan.sizes(size);
        let chunk = self.chunk(t.len());
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(chunk * n)
            .zip(x.par_chunks(chunk * n).zip(t.par_chunks(chunk)))
            .for_each(|(out, (x, t))| {
                let mut ws = self.workspace();
                ws.set_training(false);
                for (e, &te) in t.iter().enumerate() {
                    self.plan
                        .forward(&self.params, &x[e * n..(e + 1) * n], &sizes, te, &mut ws);
                    out[e * n..(e + 1) * n].copy_from_slice(&ws.tape.output);
                }
                self.give_back(ws);
            });
        Ok(out)
    }

    /// The [`crate::diffusion::process::Denoiser`] forward on tensors (`xt` `[B, 1, H, W]`, `t` `[B]`).
    pub fn forward(&self, xt: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xt.dims4()?;
        if c != 1 {
            bail!("fused U-Net: one input channel expected, got {c}");
        }
        let x = xt.flatten_all()?.to_vec1::<f32>()?;
        let t = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let out = self.forward_values(&x, &t, (h, w))?;
        Tensor::from_vec(out, (b, c, h, w), xt.device())
    }

    /// The simple loss `mean (eps_theta(x_t, t) - target)^2` of a batch and its gradient with
    /// respect to the flat parameters (the layout of [`FusedUnet::grad_store`]).
    pub fn loss_and_grads(
        &self,
        x: &[f32],
        t: &[f32],
        target: &[f32],
        size: (usize, usize),
    ) -> Result<(f64, Vec<f32>)> {
        let n = self.check(x, t, size)?;
        if target.len() != x.len() {
            bail!(
                "fused U-Net: {} target values for {} inputs",
                target.len(),
                x.len()
            );
        }
        let sizes = self.plan.sizes(size);
        let chunk = self.chunk(t.len());
        let scale = 2.0 / x.len() as f32;
        let parts: Vec<(Vec<f32>, f64)> = x
            .par_chunks(chunk * n)
            .zip(t.par_chunks(chunk).zip(target.par_chunks(chunk * n)))
            .map(|(x, (t, target))| {
                let mut ws = self.workspace();
                ws.set_training(true);
                let mut grads = vec![0f32; self.params.len()];
                let mut sum = 0f64;
                for (e, &te) in t.iter().enumerate() {
                    let xe = &x[e * n..(e + 1) * n];
                    self.plan.forward(&self.params, xe, &sizes, te, &mut ws);
                    ws.d_output.clear();
                    for (&y, &tg) in ws.tape.output.iter().zip(&target[e * n..(e + 1) * n]) {
                        let d = y - tg;
                        sum += (d * d) as f64;
                        ws.d_output.push(scale * d);
                    }
                    self.plan
                        .backward(&self.params, &mut grads, xe, &sizes, &mut ws);
                }
                (grads, sum)
            })
            .collect();
        let mut grads = vec![0f32; self.params.len()];
        let mut sum = 0f64;
        for (g, s) in parts {
            add_assign(&mut grads, &g);
            sum += s;
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
