//! A 2-D convolution over one example `[C, H, W]` (planar), its parameters at offsets of a
//! flat vector: stride-1 "same" k x k convolutions as k gemms over k row-shifted copies of
//! the input (im2col would make k^2), their dx the convolution of dy with the flipped weights;
//! other geometries im2col + one gemm (see [`crate::nn::conv`]).
//!
//! ```text
//! y = W im2col(x) + b        dW += dy im2col(x)^T, db += sum dy, dx += col2im(W^T dy)
//! (stride 1: col2im(W^T dy) = the convolution of dy with W'[c,o,u,v] = W[o,c,-u,-v])
//! ```

use crate::nn::conv::{Geometry, gemm_rm};

/// The smallest plane Winograd runs on (8 x 8: measured 1.16x the row-shift gemms at 64
/// channels, 1.4x at 16 x 16; `cargo bench --bench conv`).
pub const WINOGRAD_PIXELS: usize = 64;

/// The smallest plane whose weight gradient runs as dot products ([`dot_weight_grad`], AVX2) or
/// as [`super::avx512::weight_grad`] instead of gemms: measured on one core of the development
/// machine, 16 and 32 channels at 28 x 28 the dot products reach 71-74 GFLOP/s against gemm's
/// 43-49; on an AVX-512 machine (`cargo bench --bench conv -- weight`) the AVX-512 kernel takes
/// 40 us against gemm's 44 at 16 channels 28 x 28, 217 against 335 at 32 channels 32 x 32, and
/// 41 against 38 at 14 x 14 (7 x 7: level).
pub const DOT_WEIGHT_GRAD_PIXELS: usize = 512;

/// A convolution's place in the flat parameter vector.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvP {
    /// Index among the network's convolutions (the slot of its kept im2col matrix).
    pub(crate) id: usize,
    pub(crate) w: usize,
    /// Stride-1 k x k convolutions (k > 1): where the flipped, transposed weight
    /// `W'[c, o, u, v] = W[o, c, k-1-u, k-1-v]` is kept (as k matrices `W'_u [C, O k]`, for
    /// [`shifted_conv`]), so that dx is itself a convolution of dy instead of a gemm and a
    /// col2im.
    pub(crate) wf: Option<usize>,
    /// The same convolutions and the stride-2 ones: where `W_u[o, c k + v] = W[o, c, u, v]`
    /// (u = 0..k, each `[O, C k]`) is kept, for the row-shift forward pass ([`shifted_rows`],
    /// [`strided_rows`]); for stride 1 its region of the gradient takes dW transposed
    /// ([`shifted_weight_grad`]).
    pub(crate) wu: Option<usize>,
    /// Wide stride-1 3x3 convolutions: where Winograd's transformed filters are kept, `U
    /// [16, O, C]` of W (the forward pass) and of the flipped, transposed W' (dx), see
    /// [`crate::nn::winograd`]; on planes of at least [`WINOGRAD_PIXELS`] the forward pass, dx
    /// and dW (from the transformed input V, kept when training) run F(2x2, 3x3).
    pub(crate) wino: Option<(usize, usize)>,
    pub(crate) b: usize,
    pub(crate) o: usize,
    pub(crate) c: usize,
    pub(crate) k: usize,
    pub(crate) stride: usize,
    /// TensorFlow's "SAME" for a stride-2 convolution (DDPM's and diffusers'
    /// `downsample_padding = 0`): one row and one column of zeros after the input and no
    /// padding, in place of padding k / 2 on every side. The input is copied into a padded
    /// plane `[C, H + 1, W + 1]`.
    pub(crate) pad_end: bool,
}

/// The unfolded inputs of the convolutions (im2col matrices, or the shifted rows of
/// [`shifted_rows`]): one scratch buffer, and when training (`keep`) one kept buffer per
/// convolution, written by the forward pass and read again by the backward pass for dW (in
/// place of unfolding the same input a second time).
#[derive(Default)]
pub(crate) struct Cols {
    pub(crate) scratch: Vec<f32>,
    pub(crate) kept: Vec<Vec<f32>>,
    pub(crate) keep: bool,
    /// The backward pass computes dx only (a vector-Jacobian product with respect to the
    /// network's input): no dW or db, so no kept input either.
    pub(crate) dx_only: bool,
    /// Winograd's transformed inputs and products.
    pub(crate) wino: crate::nn::winograd::Scratch,
}

impl Cols {
    pub(crate) fn for_forward(&mut self, id: usize) -> &mut Vec<f32> {
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
pub(crate) enum Dx<'a> {
    None,
    Add(&'a mut [f32]),
    Set(&'a mut [f32]),
}

/// How a convolution's output starts before the gemm adds `W im2col(x)`.
pub(crate) enum Init<'a> {
    /// The bias.
    Bias,
    /// The bias plus a per-channel term (the time projection).
    BiasPlus(&'a [f32]),
    /// What the buffer holds (the residual branch) plus the bias.
    Accumulate,
}

/// For a stride-1 "same" k x k convolution (p = k / 2): `e [C k, (H + 2p) W]`, row (c, v)
/// = channel c shifted by v - p columns (zero where the kernel overhangs a side), with p zero
/// rows above and below. The im2col row of kernel offset (u, v) is then the contiguous run
/// of row (c, v) starting at u W, so `y = sum_u W_u e[:, u W ..]` with `W_u[o, c k + v] =
/// W[o, c, u, v]`: k gemms over k shifted copies of x, where im2col makes k^2.
pub fn shifted_rows(x: &[f32], c: usize, (h, w): (usize, usize), k: usize, e: &mut [f32]) {
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

/// `y [M, H W] (+)= W * x` for a stride-1 "same" k x k convolution read straight from `x`
/// `[C, H W]` (no [`shifted_rows`]; `wts` the k matrices `W_u [M, C k]`), where
/// [`same_conv_is_direct`]: the AVX-512 kernel [`super::avx512::conv_same`]. Else the shifted
/// rows and [`shifted_conv`].
pub fn same_conv(
    y: &mut [f32],
    wts: &[f32],
    x: &[f32],
    (m, c, k): (usize, usize, usize),
    (h, w): (usize, usize),
    add: bool,
) {
    assert!(y.len() >= m * h * w && wts.len() >= k * m * c * k && x.len() >= c * h * w);
    #[cfg(target_arch = "x86_64")]
    if same_conv_is_direct(m, k) && w > 0 {
        // SAFETY: AVX-512F is there, M, k and W as the kernel needs (checked), the lengths by
        // the assert.
        unsafe { super::avx512::conv_same(y, wts, x, (m, c, k), (h, w), add) };
        return;
    }
    let mut e = vec![0f32; c * k * (h + k - 1) * w];
    shifted_rows(x, c, (h, w), k, &mut e);
    shifted_conv(y, wts, &e, (m, c * k, k), (h, w), add);
}

/// Whether [`same_conv`] runs without shifted rows: AVX-512, M a multiple of 8, k odd up to 7.
pub fn same_conv_is_direct(m: usize, k: usize) -> bool {
    k % 2 == 1 && k <= 7 && offset_conv_is_direct(m)
}

/// Whether this CPU runs the AVX-512 kernels of [`super::avx512`].
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::avx512::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `y [M, H W] (+)= sum_u W_u e_u` for `e` from [`shifted_rows`] (e_u: its rows from
/// offset u W), `wts` = the k matrices `W_u [M, CK]` one after the other; `add` false
/// overwrites `y`. With AVX-512 and M a multiple of 8, [`super::avx512::conv`] (no packed
/// copies: measured in `cargo bench --bench conv`); else [`gemm_shifted_conv`].
pub fn shifted_conv(
    y: &mut [f32],
    wts: &[f32],
    e: &[f32],
    (m, ck, k): (usize, usize, usize),
    (h, w): (usize, usize),
    add: bool,
) {
    let offsets = shifted_offsets(k, w);
    offset_conv(y, wts, e, (m, ck), &offsets, (h * w, (h + k - 1) * w), add);
}

/// Where kernel row u of a stride-1 convolution reads the rows of [`shifted_rows`]: u W.
fn shifted_offsets(k: usize, w: usize) -> Vec<usize> {
    (0..k).map(|u| u * w).collect()
}

/// The bounds every row product ([`offset_conv`], [`offset_weight_grad`] and their gemms)
/// reads and writes within: the `[M, P]` matrix (y or dy) holds M P values, the k weight
/// matrices (W_u or dW_u^T) k M CK, `e` CK rows of `plane`, and each kernel row's run of P
/// values from `offsets[u]` stays inside its row.
fn check_row_product(
    (mp, weights, e): (usize, usize, usize),
    (m, ck): (usize, usize),
    offsets: &[usize],
    (hw, plane): (usize, usize),
) {
    let k = offsets.len();
    assert!(mp >= m * hw && weights >= k * m * ck && e >= ck * plane);
    assert!(offsets.iter().all(|&at| at + hw <= plane));
}

/// Whether [`offset_conv`] runs the AVX-512 kernel for M outputs (else it runs k gemms, which
/// the callers measured slower than one im2col gemm for strided convolutions).
pub fn offset_conv_is_direct(m: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return m.is_multiple_of(super::avx512::CONV_ROWS) && has_avx512();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `W [O, C, k, k]` into the k matrices `W_u[o, c k + v] = W[o, c, u, v]` (each `[O, C k]`)
/// of [`offset_conv`], [`shifted_conv`] and [`strided_conv`].
pub fn weights_by_row(w: &[f32], (o, c, k): (usize, usize, usize), wu: &mut [f32]) {
    for oi in 0..o {
        for ci in 0..c {
            for u in 0..k {
                for v in 0..k {
                    wu[(u * o + oi) * c * k + ci * k + v] = w[((oi * c + ci) * k + u) * k + v];
                }
            }
        }
    }
}

/// The inverse of [`weights_by_row`] for gradients: adds the k transposed matrices
/// `dW_u^T[c k + v, o]` that [`offset_weight_grad`] accumulates into `dw [O, C, k, k]`.
pub fn add_weight_grads_by_row(dwu: &[f32], (o, c, k): (usize, usize, usize), dw: &mut [f32]) {
    let ck = c * k;
    for u in 0..k {
        for (cv, row) in dwu[u * ck * o..(u + 1) * ck * o].chunks(o).enumerate() {
            let (ci, v) = (cv / k, cv % k);
            for (oi, &val) in row.iter().enumerate() {
                dw[((oi * c + ci) * k + u) * k + v] += val;
            }
        }
    }
}

/// `y [M, P] (+)= sum_u W_u e_u`, `e_u` the `P`-long runs of the rows of `e` (`[CK, plane]`)
/// starting at `offsets[u]` (u = 0..k), `wts` = the k matrices `W_u [M, CK]`: the product
/// under [`shifted_conv`] (offsets u W) and [`strided_conv`]. With AVX-512 and M a multiple
/// of 8, [`super::avx512::conv`]; else k gemms.
pub fn offset_conv(
    y: &mut [f32],
    wts: &[f32],
    e: &[f32],
    (m, ck): (usize, usize),
    offsets: &[usize],
    (hw, plane): (usize, usize),
    add: bool,
) {
    check_row_product((y.len(), wts.len(), e.len()), (m, ck), offsets, (hw, plane));
    #[cfg(target_arch = "x86_64")]
    if offset_conv_is_direct(m) {
        // SAFETY: AVX-512F is there (checked), the lengths and offsets by the asserts, M by
        // the condition.
        unsafe { super::avx512::conv(y, wts, e, (m, ck), offsets, (hw, plane), hw, add) };
        return;
    }
    gemm_offset_conv(y, wts, e, (m, ck), offsets, (hw, plane), add);
}

/// The rows [`strided_conv`] reads, for a stride-2 k x k convolution with padding p over
/// `x [C, H, W]` to `(OH, OW)`: `e [C k, 2 A OW]` (A = OH + (k - 1) / 2), row (c, v) = the
/// input's columns `2 j + v - p` (j < OW), its input lines split by parity: line `2 a + q - p`
/// at `(q A + a) OW` (zeros outside the input). Kernel row u then reads lines
/// `2 i + u - p` = parity u % 2, a = i + u / 2 for output rows i: one contiguous run of
/// `OH OW` from `(u % 2) A OW + (u / 2) OW`.
pub fn strided_rows(
    x: &[f32],
    c: usize,
    (h, w): (usize, usize),
    (k, p): (usize, usize),
    (oh, ow): (usize, usize),
    e: &mut [f32],
) {
    let a_rows = oh + (k - 1) / 2;
    let plane = 2 * a_rows * ow;
    assert!(x.len() >= c * h * w && e.len() >= c * k * plane);
    // Each input line once split by column parity, `split[par][m]` = column `2 m + par - p`
    // (zero outside the line); row (c, v)'s run for that line is then the contiguous
    // `split[v % 2][v / 2..][..OW]`.
    let half = ow + k / 2;
    let mut split = vec![0f32; 2 * half];
    // The line between p zeros and zeros to the end, rewritten in place line by line.
    let mut padded = vec![0f32; (2 * half).max(p + w)];
    for ci in 0..c {
        let src = &x[ci * h * w..(ci + 1) * h * w];
        let rows = &mut e[ci * k * plane..(ci + 1) * k * plane];
        for q in 0..2 {
            for a in 0..a_rows {
                let at = (q * a_rows + a) * ow;
                let iy = (2 * a + q) as isize - p as isize;
                if iy < 0 || iy >= h as isize {
                    for v in 0..k {
                        rows[v * plane + at..][..ow].fill(0.0);
                    }
                    continue;
                }
                let line = &src[iy as usize * w..(iy as usize + 1) * w];
                padded[p..p + w].copy_from_slice(line);
                let (even, odd) = split.split_at_mut(half);
                for ((e0, e1), pair) in even.iter_mut().zip(odd).zip(padded.chunks_exact(2)) {
                    (*e0, *e1) = (pair[0], pair[1]);
                }
                for v in 0..k {
                    let from = &split[(v % 2) * half + v / 2..][..ow];
                    rows[v * plane + at..][..ow].copy_from_slice(from);
                }
            }
        }
    }
}

/// A stride-2 k x k convolution with padding p, `y [M, OH OW] (+)= W * x`, from the rows of
/// [`strided_rows`] (`e`) and `wts` = the k matrices `W_u [M, C k]` (`W_u[o, c k + v] =
/// W[o, c, u, v]`, as [`ConvP::wu`]).
pub fn strided_conv(
    y: &mut [f32],
    wts: &[f32],
    e: &[f32],
    (m, c, k): (usize, usize, usize),
    (oh, ow): (usize, usize),
    add: bool,
) {
    let offsets = strided_offsets(k, (oh, ow));
    let plane = 2 * (oh + (k - 1) / 2) * ow;
    offset_conv(y, wts, e, (m, c * k), &offsets, (oh * ow, plane), add);
}

/// Where kernel row u of a stride-2 convolution reads the rows of [`strided_rows`]: line
/// parity u % 2 from line u / 2, `((u % 2) A + u / 2) OW` (A = OH + (k - 1) / 2).
fn strided_offsets(k: usize, (oh, ow): (usize, usize)) -> Vec<usize> {
    let a_rows = oh + (k - 1) / 2;
    (0..k).map(|u| ((u % 2) * a_rows + u / 2) * ow).collect()
}

/// A stride-2 transposed convolution that doubles the size (k even, padding `p = k / 2 - 1`:
/// the VAE decoder's 4 x 4, padding 1), `y [O, 2H, 2W] = conv_transpose(x [C, H, W], w [C, O,
/// k, k])`, as four stride-1 products, one per output parity (sub-pixel convolution, Shi et
/// al. 2016) instead of a gemm and a col2im:
///
/// ```text
/// y[o, 2q + a, 2r + b] = sum_{c, s, t} w[c, o, u_s, v_t] x[c, q + di_s, r + dj_t]
/// u_s = (a + p) % 2 + 2 s,  di_s = (a + p) / 2 - s   (s, t < k / 2; v_t, dj_t likewise with b)
/// ```
///
/// (kernel row u reaches output row `2 i - p + u` from input row i). The same operation is a
/// stride-2 convolution's dx (`w` = its weight `[O, C, k, k]`, read with C and O swapped).
/// Where [`offset_conv_is_direct`] for O; the products are k / 2 row products each, k^2 / 4
/// multiply-adds a pixel per parity, k^2 in all: as many as im2col's gemm.
#[derive(Debug, Clone, Copy)]
pub struct Transposed {
    /// Input channels, output channels, kernel size.
    pub c: usize,
    pub o: usize,
    pub k: usize,
    /// The input's size (the output is twice it).
    pub h: usize,
    pub w: usize,
}

impl Transposed {
    fn p(&self) -> usize {
        self.k / 2 - 1
    }

    /// Lines of zeros above and below the input in [`Self::rows`]: the largest |di_s|.
    fn pad(&self) -> usize {
        self.p().div_ceil(2)
    }

    /// Values of [`Self::rows`]' buffer: for each column parity, `C k / 2` rows of
    /// `(H + 2 pad) W`.
    pub fn rows_len(&self) -> usize {
        2 * self.c * self.k / 2 * (self.h + 2 * self.pad()) * self.w
    }

    /// Values of [`Self::weights`]' buffer: `O C k^2`.
    pub fn weights_len(&self) -> usize {
        self.o * self.c * self.k * self.k
    }

    /// Whether [`Self::conv`] runs: AVX-512, O a multiple of 8, k even, p = k / 2 - 1.
    pub fn is_direct(&self) -> bool {
        self.k >= 2 && self.k.is_multiple_of(2) && offset_conv_is_direct(self.o)
    }

    /// `w [C, O, k, k]` into the products' weights: for parity (a, b) (block `2 a + b`) the
    /// k / 2 matrices `W_s [O, C k / 2]`, `W_s[o, c k / 2 + t] = w[c, o, u_s, v_t]`.
    pub fn weights(&self, w: &[f32], wp: &mut [f32]) {
        let (c, o, k, h2) = (self.c, self.o, self.k, self.k / 2);
        assert!(w.len() >= self.weights_len() && wp.len() >= self.weights_len());
        let p = self.p();
        for a in 0..2 {
            for b in 0..2 {
                let block = &mut wp[(2 * a + b) * o * c * h2 * h2..][..o * c * h2 * h2];
                for s in 0..h2 {
                    let u = (a + p) % 2 + 2 * s;
                    for oi in 0..o {
                        for ci in 0..c {
                            for t in 0..h2 {
                                let v = (b + p) % 2 + 2 * t;
                                block[(s * o + oi) * c * h2 + ci * h2 + t] =
                                    w[((ci * o + oi) * k + u) * k + v];
                            }
                        }
                    }
                }
            }
        }
    }

    /// `x [C, H W]` into the rows the products read: for column parity b, row (c, t) = channel
    /// c shifted by dj_t columns (zero past a side) between `pad` zero lines above and below;
    /// product (a, b)'s kernel row s reads it from line `pad + di_s`.
    pub fn rows(&self, x: &[f32], e: &mut [f32]) {
        let (c, h, w, h2, pad) = (self.c, self.h, self.w, self.k / 2, self.pad());
        assert!(x.len() >= c * h * w && e.len() >= self.rows_len());
        let plane = (h + 2 * pad) * w;
        let p = self.p() as isize;
        for b in 0..2 {
            for ci in 0..c {
                let src = &x[ci * h * w..(ci + 1) * h * w];
                for t in 0..h2 {
                    let dj = (b as isize + p) / 2 - t as isize;
                    let row = &mut e[((b * c + ci) * h2 + t) * plane..][..plane];
                    row[..pad * w].fill(0.0);
                    row[(pad + h) * w..].fill(0.0);
                    for (line, from) in row[pad * w..(pad + h) * w].chunks_mut(w).zip(src.chunks(w))
                    {
                        // line[j] = from[j + dj] where that lies in the line.
                        let d = dj.unsigned_abs().min(w);
                        if dj >= 0 {
                            line[..w - d].copy_from_slice(&from[d..]);
                            line[w - d..].fill(0.0);
                        } else {
                            line[d..].copy_from_slice(&from[..w - d]);
                            line[..d].fill(0.0);
                        }
                    }
                }
            }
        }
    }

    /// `y [O, 2H, 2W] = conv_transpose(x) + bias` (zero without one) from [`Self::rows`]
    /// (`e`) and [`Self::weights`] (`wp`): each parity's products into `tmp [O, H W]`, then
    /// spread to its pixels.
    pub fn conv(
        &self,
        y: &mut [f32],
        wp: &[f32],
        e: &[f32],
        bias: Option<&[f32]>,
        tmp: &mut Vec<f32>,
    ) {
        let (c, o, h, w, h2, pad) = (self.c, self.o, self.h, self.w, self.k / 2, self.pad());
        assert!(y.len() >= 4 * o * h * w && bias.is_none_or(|b| b.len() >= o));
        let plane = (h + 2 * pad) * w;
        let (hw, block) = (h * w, o * c * h2 * h2);
        tmp.resize(o * hw, 0.0);
        let p = self.p();
        for a in 0..2 {
            // Kernel row s reads line pad + di_s, di_s = (a + p) / 2 - s.
            let offsets: Vec<usize> = (0..h2).map(|s| (pad + (a + p) / 2 - s) * w).collect();
            for b in 0..2 {
                let wts = &wp[(2 * a + b) * block..][..block];
                let eb = &e[b * c * h2 * plane..][..c * h2 * plane];
                offset_conv(tmp, wts, eb, (o, c * h2), &offsets, (hw, plane), false);
                for (oi, (src, dst)) in tmp.chunks(hw).zip(y.chunks_mut(4 * hw)).enumerate() {
                    let add = bias.map_or(0.0, |bs| bs[oi]);
                    for (q, line) in src.chunks(w).enumerate() {
                        let out = &mut dst[(2 * q + a) * 2 * w..][..2 * w];
                        for (d, &v) in out[b..].iter_mut().step_by(2).zip(line) {
                            *d = v + add;
                        }
                    }
                }
            }
        }
    }
}

/// [`shifted_conv`] as k gemms `y (+)= W_u e_u`.
pub fn gemm_shifted_conv(
    y: &mut [f32],
    wts: &[f32],
    e: &[f32],
    (m, ck, k): (usize, usize, usize),
    (h, w): (usize, usize),
    add: bool,
) {
    let offsets = shifted_offsets(k, w);
    gemm_offset_conv(y, wts, e, (m, ck), &offsets, (h * w, (h + k - 1) * w), add);
}

/// [`offset_conv`] as k gemms `y (+)= W_u e_u`.
pub fn gemm_offset_conv(
    y: &mut [f32],
    wts: &[f32],
    e: &[f32],
    (m, ck): (usize, usize),
    offsets: &[usize],
    (hw, plane): (usize, usize),
    add: bool,
) {
    check_row_product((y.len(), wts.len(), e.len()), (m, ck), offsets, (hw, plane));
    for (u, &offset) in offsets.iter().enumerate() {
        // SAFETY: the asserts above bound every index: row r of e_u spans
        // r plane + offset .. r plane + offset + hw <= (r + 1) plane.
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
                e.as_ptr().add(offset),
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

/// [`shifted_weight_grad`] as dot products: `dW_u^T[r, o] += dy[o, :] . e_u[r, :]`, both rows
/// contiguous over the plane's H W pixels, in tiles of 4 outputs o by 2 rows (u, r) that keep
/// their 8 sums in AVX registers for the whole plane (gemm would pack both K = H W panels of
/// this thin product first). `dwu` is k matrices `[C k, O]`, `e` the shifted rows
/// `[C k, (H + k - 1) W]`; every row is a checked slice (a short buffer panics); the caller
/// checks the CPU's AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_weight_grad(
    dwu: &mut [f32],
    dy: &[f32],
    e: &[f32],
    (o, ck, k): (usize, usize, usize),
    (h, w): (usize, usize),
) {
    use std::arch::x86_64::{__m256, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps};
    const TO: usize = 4;
    const TQ: usize = 2;
    let (hw, plane) = (h * w, (h + k - 1) * w);
    let rows = k * ck;
    // Row q = (u, r) of the stacked shifts: e_u's row r.
    let start = |q: usize| (q % ck) * plane + (q / ck) * w;
    let lanes = hw / 8;
    for ob in (0..o).step_by(TO) {
        let oc = (o - ob).min(TO);
        // A tile's rows past the last are the last again; their sums are dropped.
        let dyr: [&[f32]; TO] = std::array::from_fn(|i| {
            let at = (ob + i.min(oc - 1)) * hw;
            &dy[at..at + hw]
        });
        for qb in (0..rows).step_by(TQ) {
            let qc = (rows - qb).min(TQ);
            let er: [&[f32]; TQ] = std::array::from_fn(|j| {
                let at = start(qb + j.min(qc - 1));
                &e[at..at + hw]
            });
            let mut acc: [[__m256; TQ]; TO] = [[_mm256_setzero_ps(); TQ]; TO];
            for l in 0..lanes {
                // SAFETY: 8 l + 8 <= hw, the length of every row slice.
                unsafe {
                    let a: [__m256; TO] =
                        std::array::from_fn(|i| _mm256_loadu_ps(dyr[i].as_ptr().add(8 * l)));
                    for (j, row) in er.iter().enumerate() {
                        let b = _mm256_loadu_ps(row.as_ptr().add(8 * l));
                        for i in 0..TO {
                            acc[i][j] = _mm256_fmadd_ps(a[i], b, acc[i][j]);
                        }
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate().take(oc) {
                for (j, sums) in acc.iter().enumerate().take(qc) {
                    // SAFETY: __m256 and [f32; 8] have the same size, any bits are a float.
                    let v: [f32; 8] = unsafe { std::mem::transmute(*sums) };
                    let tail: f32 = (8 * lanes..hw).map(|p| dyr[i][p] * er[j][p]).sum();
                    let q = qb + j;
                    dwu[q * o + ob + i] += v.iter().sum::<f32>() + tail;
                }
            }
        }
    }
}

thread_local! {
    /// dy transposed, for the AVX-512 weight gradient (one buffer per thread, reused).
    static DY_T: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `dW_u^T[(c, v), o] += sum_j dy[o, j] e_u[(c, v), j]` for u = 0..k: the weight gradient of
/// a stride-1 same convolution from the shifted rows `e` of its input, transposed (`dwu` = k
/// matrices `[C k, O]`, row q = (u, c, v) at q O: the AVX-512 kernel adds whole registers of
/// outputs); the engine (`Plan::fold_shifted_grads`) moves it into the `[O, C, k, k]`
/// gradient once per step. With AVX-512 and O a multiple of 16, [`super::avx512::weight_grad`];
/// else, with AVX2 on planes of [`DOT_WEIGHT_GRAD_PIXELS`] and more, dot products; else
/// [`gemm_weight_grad`].
pub fn shifted_weight_grad(
    dwu: &mut [f32],
    dy: &[f32],
    e: &[f32],
    (o, c, k): (usize, usize, usize),
    (h, w): (usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    if h * w >= DOT_WEIGHT_GRAD_PIXELS && offset_weight_grad_is_direct(o) {
        let offsets = shifted_offsets(k, w);
        offset_weight_grad(dwu, dy, e, (o, c * k), &offsets, (h * w, (h + k - 1) * w));
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if h * w >= DOT_WEIGHT_GRAD_PIXELS
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has AVX2 and FMA (checked above); the kernel reads and writes
        // through bounds-checked slices only.
        unsafe { dot_weight_grad(dwu, dy, e, (o, c * k, k), (h, w)) };
        return;
    }
    gemm_weight_grad(dwu, dy, e, (o, c, k), (h, w));
}

/// Whether [`offset_weight_grad`] runs the AVX-512 kernel for O outputs.
pub fn offset_weight_grad_is_direct(o: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return o.is_multiple_of(16) && has_avx512();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `dW_u^T[r, o] += sum_p dy[o, p] e[r, offsets[u] + p]` (`dwu` = k matrices `[CK, O]`, `e`
/// `[CK, plane]`, `dy` `[O, P]`): the weight gradient under [`offset_conv`]'s product. With
/// AVX-512 and O a multiple of 16, [`super::avx512::weight_grad`]; else k gemms.
pub fn offset_weight_grad(
    dwu: &mut [f32],
    dy: &[f32],
    e: &[f32],
    (o, ck): (usize, usize),
    offsets: &[usize],
    (hw, plane): (usize, usize),
) {
    check_row_product(
        (dy.len(), dwu.len(), e.len()),
        (o, ck),
        offsets,
        (hw, plane),
    );
    #[cfg(target_arch = "x86_64")]
    if offset_weight_grad_is_direct(o) {
        DY_T.with_borrow_mut(|dyt| {
            // SAFETY: AVX-512F is there (checked), the lengths and offsets by the asserts, O
            // by the condition.
            unsafe {
                super::avx512::weight_grad(dwu, dy, e, (o, ck), offsets, (hw, plane), hw, dyt)
            }
        });
        return;
    }
    gemm_offset_weight_grad(dwu, dy, e, (o, ck), offsets, (hw, plane));
}

/// [`offset_weight_grad`] as k gemms `dW_u += dy e_u^T` (written transposed).
fn gemm_offset_weight_grad(
    dwu: &mut [f32],
    dy: &[f32],
    e: &[f32],
    (o, ck): (usize, usize),
    offsets: &[usize],
    (hw, plane): (usize, usize),
) {
    check_row_product(
        (dy.len(), dwu.len(), e.len()),
        (o, ck),
        offsets,
        (hw, plane),
    );
    for (u, &offset) in offsets.iter().enumerate() {
        // SAFETY: as in gemm_offset_conv; e_u^T is read as the [P, CK] matrix with row stride
        // 1 and column stride `plane`; dW_u^T is the u-th [CK, O] block of `dwu`, written as
        // dW_u with column stride O.
        unsafe {
            gemm::gemm(
                o,
                ck,
                hw,
                dwu.as_mut_ptr().add(u * o * ck),
                o as isize,
                1,
                true,
                dy.as_ptr(),
                1,
                hw as isize,
                e.as_ptr().add(offset),
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

/// The weight gradient of [`strided_conv`], `dW_u^T` (k matrices `[C k, O]`) from the rows of
/// [`strided_rows`] and `dy [O, OH OW]`.
pub fn strided_weight_grad(
    dwu: &mut [f32],
    dy: &[f32],
    e: &[f32],
    (o, c, k): (usize, usize, usize),
    (oh, ow): (usize, usize),
) {
    let offsets = strided_offsets(k, (oh, ow));
    let plane = 2 * (oh + (k - 1) / 2) * ow;
    offset_weight_grad(dwu, dy, e, (o, c * k), &offsets, (oh * ow, plane));
}

/// [`shifted_weight_grad`] as k gemms `dW_u += dy e_u^T` (written transposed).
pub fn gemm_weight_grad(
    dwu: &mut [f32],
    dy: &[f32],
    e: &[f32],
    (o, c, k): (usize, usize, usize),
    (h, w): (usize, usize),
) {
    let offsets = shifted_offsets(k, w);
    gemm_offset_weight_grad(dwu, dy, e, (o, c * k), &offsets, (h * w, (h + k - 1) * w));
}

impl ConvP {
    /// The geometry over an input of `(h, w)` (for `pad_end`, over the padded plane).
    pub(crate) fn geometry(&self, (h, w): (usize, usize)) -> Geometry {
        let (padding, h, w) = match self.pad_end {
            true => (0, h + 1, w + 1),
            false => (self.k / 2, h, w),
        };
        Geometry {
            k: self.k,
            stride: self.stride,
            padding,
            h,
            w,
        }
    }

    /// Multiply-adds of one example's pass over an input of `(h, w)`: `O C k^2` per output
    /// pixel (the direct convolution's count, whichever algorithm runs it).
    pub(crate) fn macs(&self, input: (usize, usize)) -> u64 {
        let (oh, ow) = self.geometry(input).output();
        (self.o * self.c * self.k * self.k * oh * ow) as u64
    }

    /// `x` `[C, H, W]` into `out` `[C, H + 1, W + 1]`, zeros in the last row and column.
    fn pad_end_into(&self, x: &[f32], (h, w): (usize, usize), out: &mut Vec<f32>) {
        out.clear();
        for plane in x.chunks(h * w).take(self.c) {
            for row in plane.chunks(w) {
                out.extend_from_slice(row);
                out.push(0.0);
            }
            out.extend(std::iter::repeat_n(0.0, w + 1));
        }
    }

    pub(crate) fn weight<'a>(&self, p: &'a [f32]) -> &'a [f32] {
        &p[self.w..self.w + self.o * self.c * self.k * self.k]
    }

    /// Winograd's filters where this convolution runs F(2x2, 3x3) over an input of `size`: at
    /// least [`WINOGRAD_PIXELS`] pixels (below, its gemms over a few tiles cost more than the
    /// row-shift gemms).
    pub(crate) fn winograd_at(&self, (h, w): (usize, usize)) -> Option<(usize, usize)> {
        self.wino.filter(|_| h * w >= WINOGRAD_PIXELS)
    }

    /// A 1x1 stride-1 convolution reads its input as the im2col matrix.
    pub(crate) fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1
    }

    /// `y [O, OH OW] = init + W im2col(x)`, `x` `[C, H W]`; returns (OH, OW).
    pub(crate) fn forward(
        &self,
        p: &[f32],
        x: &[f32],
        size: (usize, usize),
        y: &mut Vec<f32>,
        init: Init,
        cols: &mut Cols,
    ) -> (usize, usize) {
        let padded;
        let x = if self.pad_end {
            let mut buf = Vec::new();
            self.pad_end_into(x, size, &mut buf);
            padded = buf;
            &padded[..]
        } else {
            x
        };
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
            if let Some((u, _)) = self.winograd_at(size) {
                // Winograd F(2x2, 3x3); when training, its transformed input V is kept for dW.
                use crate::nn::winograd::{products, tiles, transform_input, transform_output};
                let (th, tw) = tiles(size);
                let tp = th * tw;
                let keep = cols.keep;
                let Cols { kept, wino, .. } = cols;
                let v = match keep {
                    true => {
                        if kept.len() <= self.id {
                            kept.resize_with(self.id + 1, Vec::new);
                        }
                        &mut kept[self.id]
                    }
                    false => &mut wino.v,
                };
                v.resize(16 * c * tp, 0.0);
                transform_input(x, c, size, v);
                wino.m.resize(16 * self.o * tp, 0.0);
                products(&p[u..], v, (self.o, c, tp), &mut wino.m);
                transform_output(&wino.m, self.o, size, y, true);
                return (oh, ow);
            }
            if !cols.keep && same_conv_is_direct(self.o, k) {
                // No rows kept (sampling, or dx only): the kernel reads x itself, edges masked.
                same_conv(y, &p[wu..], x, (self.o, c, k), size, true);
                return (oh, ow);
            }
            let buf = cols.for_forward(self.id);
            let len = c * k * (size.0 + k - 1) * size.1;
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            shifted_rows(x, c, size, k, buf);
            shifted_conv(y, &p[wu..], buf, (self.o, c * k, k), size, true);
        } else if let (Some(wu), 2, true) = (self.wu, self.stride, offset_conv_is_direct(self.o)) {
            // Stride 2: the input's columns and lines split by parity (strided_rows, 2 k
            // values a pixel where im2col makes k^2 / 4), then the AVX-512 kernel (k gemms
            // in place of im2col's one were not measured, so without it im2col stays). The
            // rows are not kept: dW unfolds the input again.
            let (c, k) = (self.c, self.k);
            let len = c * k * 2 * (oh + (k - 1) / 2) * ow;
            let buf = &mut cols.scratch;
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            strided_rows(x, c, (g.h, g.w), (k, g.padding), (oh, ow), buf);
            strided_conv(y, &p[wu..], buf, (self.o, c, k), (oh, ow), true);
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

    /// `dW += dy im2col(x)^T`, `db += sum dy` (the part of [`ConvP::backward`] a
    /// vector-Jacobian product with respect to the input skips).
    fn param_grads(
        &self,
        grads: &mut [f32],
        x: &[f32],
        size: (usize, usize),
        dy: &[f32],
        cols: &mut Cols,
    ) {
        let padded;
        let x = if self.pad_end {
            let mut buf = Vec::new();
            self.pad_end_into(x, size, &mut buf);
            padded = buf;
            &padded[..]
        } else {
            x
        };
        let g = self.geometry(size);
        let (oh, ow) = g.output();
        let (ohw, ckk) = (oh * ow, self.c * self.k * self.k);
        if let (Some((u, _)), true) = (self.winograd_at(size), (oh, ow) == size) {
            // dU += dM V^T with dM = A dY A^T (folded into dW = G^T dU G once per step, see
            // `Plan::fold_shifted_grads`), V kept by the forward pass.
            use crate::nn::winograd::{
                filter_products, tiles, transform_input, transform_output_gradient,
            };
            let (th, tw) = tiles(size);
            let (c, o, tp) = (self.c, self.o, th * tw);
            let Cols {
                kept,
                wino,
                keep,
                scratch,
                ..
            } = cols;
            let v = match kept
                .get(self.id)
                .filter(|b| *keep && b.len() >= 16 * c * tp)
            {
                Some(v) => v,
                None => {
                    scratch.resize(16 * c * tp, 0.0);
                    transform_input(x, c, size, scratch);
                    scratch
                }
            };
            wino.m.resize(16 * o * tp, 0.0);
            transform_output_gradient(dy, o, size, &mut wino.m);
            filter_products(&wino.m, v, (o, c, tp), &mut grads[u..u + 16 * o * c]);
        } else if self.pointwise() {
            let dw = &mut grads[self.w..self.w + self.o * ckk];
            gemm_rm(dw, dy, false, x, true, (self.o, ckk, ohw), true);
        } else if let (Some(wu), 2, true) =
            (self.wu, self.stride, offset_weight_grad_is_direct(self.o))
        {
            // Stride 2: dW^T from the parity-split rows (unfolded again here: the forward pass
            // keeps none), into the wu region as the row-shift gradients.
            let (c, k) = (self.c, self.k);
            let buf = &mut cols.scratch;
            let len = c * k * 2 * (oh + (k - 1) / 2) * ow;
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            strided_rows(x, c, (g.h, g.w), (k, g.padding), (oh, ow), buf);
            let dwu = &mut grads[wu..wu + self.o * ckk];
            strided_weight_grad(dwu, dy, buf, (self.o, c, k), (oh, ow));
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
            *db += crate::nn::kernels::sum(row);
        }
    }

    /// `dW += dy im2col(x)^T`, `db += sum dy` and, when asked, `dx (+)= col2im(W^T dy)`:
    /// `Dx::Add` accumulates into the buffer, `Dx::Set` overwrites it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
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
        if !cols.dx_only {
            self.param_grads(grads, x, size, dy, cols);
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
            } else if let (Some((_, ut)), true) = (self.winograd_at(size), (oh, ow) == size) {
                // dx = the convolution of dy with the flipped weights, by Winograd.
                let (o, c) = (self.o, self.c);
                crate::nn::winograd::conv3x3(dx, &p[ut..], dy, (c, o), size, add, &mut cols.wino);
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
                let cols = &mut cols.scratch;
                if cols.len() < ckk * ohw {
                    cols.resize(ckk * ohw, 0.0);
                }
                gemm_rm(cols, w, true, dy, false, (ckk, ohw, self.o), false);
                if self.pad_end {
                    // col2im into the padded plane, then its [C, H, W] corner into dx.
                    let (h, w) = size;
                    let mut full = vec![0f32; self.c * (h + 1) * (w + 1)];
                    g.col2im(cols, self.c, &mut full);
                    let rows = full
                        .chunks(w + 1)
                        .enumerate()
                        .filter(|(r, _)| r % (h + 1) < h);
                    for (d, (_, row)) in dx.chunks_mut(w).zip(rows) {
                        for (d, &v) in d.iter_mut().zip(&row[..w]) {
                            *d = if add { *d + v } else { v };
                        }
                    }
                } else {
                    if !add {
                        dx.fill(0.0);
                    }
                    g.col2im(cols, self.c, dx);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) for the kernels' operands.
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * seed) % 23) as f32 * 0.087 - 1.0)
            .collect()
    }

    /// The largest difference between two results over the largest value of the second.
    fn relative_error(fast: &[f32], slow: &[f32]) -> f32 {
        let scale = slow.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = fast
            .iter()
            .zip(slow)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        err / scale
    }

    /// The row-product convolution and weight gradient, whichever kernel this CPU runs them
    /// on (AVX-512, AVX2 dot products), equal the gemms, overwriting and adding, on planes
    /// whose pixel count leaves every kind of last tile (7 x 7 = 49: one register and one
    /// lane; 14 x 14 = 196: four full tiles and a partial register; 28 x 28; 5 x 3 = 15, a
    /// single masked register; 23 x 29, 24 x 23 and 31 x 17, odd planes past the weight
    /// gradient's 512 pixels, 31 x 17 with a tail of 7 past the last 8), at the U-Nets'
    /// channel counts and at 1, 3 and 5 channels (the AVX-512 convolution takes multiples of 8
    /// outputs, its weight gradient multiples of 16 in one to four registers and a fifth, 80;
    /// the other counts check the gemms' transposed layout against the AVX2 dot products,
    /// partial tiles of 1, 3 and 6 outputs among them); and the convolution read straight from
    /// x with masked edges (`same_conv`), 3 x 3 and 5 x 5.
    #[test]
    fn row_product_kernels_match_the_gemms() {
        for (m, c, (h, w)) in [
            (8, 1, (5, 3)),
            (8, 3, (7, 7)),
            (16, 16, (28, 28)),
            (32, 32, (14, 14)),
            (32, 16, (7, 7)),
            (24, 5, (9, 13)),
            (16, 3, (23, 29)),
            (32, 5, (24, 23)),
            (8, 3, (31, 17)),
            (8, 1, (32, 32)),
        ] {
            let k = 3;
            let (hw, plane, ck) = (h * w, (h + k - 1) * w, c * k);
            let wts = values(k * m * ck, 7919);
            let e = values(ck * plane, 104729);
            for add in [false, true] {
                let start = values(m * hw, 31);
                let (mut fast, mut slow) = (start.clone(), start);
                shifted_conv(&mut fast, &wts, &e, (m, ck, k), (h, w), add);
                gemm_shifted_conv(&mut slow, &wts, &e, (m, ck, k), (h, w), add);
                let err = relative_error(&fast, &slow);
                assert!(err <= 1e-6, "conv {m}x{c} {h}x{w} add {add}: {err:e}");
            }
            // The same convolution read straight from x (AVX-512: edges masked in the kernel).
            for add in [false, true] {
                let err = same_conv_error(&wts, (m, c, k), (h, w), add);
                // 9 C products a value, summed in another order than the rows' (v outer).
                assert!(err <= 1e-5, "same conv {m}x{c} {h}x{w} add {add}: {err:e}");
            }
            for o in [m, 16, 32, 48, 64, 80, 1, 3, 6] {
                let dy = values(o * hw, 7907);
                let start: Vec<f32> = (0..k * o * ck).map(|i| (i % 5) as f32).collect();
                let (mut fast, mut slow) = (start.clone(), start);
                shifted_weight_grad(&mut fast, &dy, &e, (o, c, k), (h, w));
                gemm_weight_grad(&mut slow, &dy, &e, (o, c, k), (h, w));
                let err = relative_error(&fast, &slow);
                // Sums over the whole plane (784 products), in another order than gemm's.
                assert!(err <= 1e-5, "weight grad {o}x{c} {h}x{w}: {err:e}");
            }
        }
        // A 5 x 5 kernel read straight from x (two lines and columns of edge each side).
        for (m, c, (h, w)) in [(8, 2, (6, 9)), (16, 3, (11, 4))] {
            let k = 5;
            let wts = values(k * m * c * k, 7919);
            let err = same_conv_error(&wts, (m, c, k), (h, w), false);
            assert!(err <= 1e-5, "same conv 5x5 {m}x{c} {h}x{w}: {err:e}");
        }
    }

    /// [`same_conv`] (x read in place) against the shifted rows and gemms, on an input and a
    /// starting y of fixed pseudo-random values: the relative error.
    fn same_conv_error(
        wts: &[f32],
        (m, c, k): (usize, usize, usize),
        (h, w): (usize, usize),
        add: bool,
    ) -> f32 {
        let hw = h * w;
        let x = values(c * hw, 4099);
        let mut rows = vec![0f32; c * k * (h + k - 1) * w];
        shifted_rows(&x, c, (h, w), k, &mut rows);
        let start = values(m * hw, 17);
        let (mut fast, mut slow) = (start.clone(), start);
        same_conv(&mut fast, wts, &x, (m, c, k), (h, w), add);
        gemm_shifted_conv(&mut slow, wts, &rows, (m, c * k, k), (h, w), add);
        relative_error(&fast, &slow)
    }

    /// The stride-2 convolution from the parity-split rows equals im2col and a gemm, at
    /// padding 1 (the compact U-Net's downsampling) and 0 (DDPM's, on the padded plane), even
    /// and odd sizes (7 x 9 under a 4 x 4 kernel among them), 3 and 4 wide kernels, output
    /// counts for the AVX-512 kernel and the gemms (8, 16; 3).
    #[test]
    fn strided_conv_matches_im2col() {
        for (m, c, (h, w), k, p) in [
            (16, 16, (28, 28), 3, 1),
            (8, 3, (15, 15), 3, 0),
            (16, 2, (9, 14), 3, 1),
            (3, 5, (14, 14), 3, 1),
            (8, 4, (16, 16), 4, 1),
            (16, 3, (7, 9), 4, 1),
            (8, 1, (7, 5), 3, 0),
        ] {
            let g = Geometry {
                k,
                stride: 2,
                padding: p,
                h,
                w,
            };
            let (oh, ow) = g.output();
            let x = values(c * h * w, 7919);
            let wt = values(m * c * k * k, 104729);
            let mut wu = vec![0f32; m * c * k * k];
            weights_by_row(&wt, (m, c, k), &mut wu);
            let mut cols = vec![0f32; c * k * k * oh * ow];
            g.im2col(&x, c, &mut cols);
            let start = values(m * oh * ow, 31);
            let mut slow = start.clone();
            gemm_rm(
                &mut slow,
                &wt,
                false,
                &cols,
                false,
                (m, oh * ow, c * k * k),
                true,
            );
            let mut e = vec![f32::NAN; c * k * 2 * (oh + (k - 1) / 2) * ow];
            strided_rows(&x, c, (h, w), (k, p), (oh, ow), &mut e);
            let mut fast = start;
            strided_conv(&mut fast, &wu, &e, (m, c, k), (oh, ow), true);
            let err = relative_error(&fast, &slow);
            assert!(err <= 1e-6, "{m}x{c} {h}x{w} k {k} p {p}: {err:e}");
        }
    }

    /// The sub-pixel transposed convolution equals the gemm and col2im one (bias added) and,
    /// with the weights read as a stride-2 convolution's, that convolution's dx: the decoder's
    /// 4 x 4 at 7 x 7 and 14 x 14 (64 -> 32, 32 -> 16), odd and uneven sizes, 1 and 3 input
    /// channels, k = 2, 6, 8 (pad 0, 1, 2); 8, 16 and 24 outputs.
    #[test]
    fn transposed_conv_matches_col2im() {
        use crate::nn::conv::{ConvScratch, conv_transpose2d_forward, conv2d_input_grad};
        let mut sc = ConvScratch::default();
        for (c, o, k, (h, w)) in [
            (64, 32, 4, (7, 7)),
            (32, 16, 4, (14, 14)),
            (3, 8, 4, (5, 9)),
            (1, 24, 4, (1, 3)),
            (2, 8, 2, (3, 4)),
            (3, 8, 6, (6, 5)),
            (5, 16, 8, (4, 7)),
        ] {
            let t = Transposed { c, o, k, h, w };
            assert!(t.is_direct() || !has_avx512());
            let g = Geometry {
                k,
                stride: 2,
                padding: k / 2 - 1,
                h: 2 * h,
                w: 2 * w,
            };
            assert_eq!(g.output(), (h, w));
            let x = values(c * h * w, 7919);
            let wt = values(c * o * k * k, 104729);
            let bias = values(o, 3);
            let mut wp = vec![0f32; t.weights_len()];
            t.weights(&wt, &mut wp);
            let mut e = vec![f32::NAN; t.rows_len()];
            t.rows(&x, &mut e);
            let mut tmp = Vec::new();
            let mut fast = vec![f32::NAN; 4 * o * h * w];
            t.conv(&mut fast, &wp, &e, Some(&bias), &mut tmp);
            let mut slow = vec![0f32; 4 * o * h * w];
            conv_transpose2d_forward(&mut slow, &x, &wt, &bias, g, (c, o), &mut sc);
            let err = relative_error(&fast, &slow);
            assert!(err <= 1e-6, "{c} -> {o} k {k} {h}x{w}: {err:e}");
            // x as a stride-2 convolution's dy (c outputs), wt as its weight [c, o, k, k].
            t.conv(&mut fast, &wp, &e, None, &mut tmp);
            conv2d_input_grad(&mut slow, &wt, &x, g, (o, c), &mut sc);
            let err = relative_error(&fast, &slow);
            assert!(err <= 1e-6, "dx {c} -> {o} k {k} {h}x{w}: {err:e}");
        }
    }
}
