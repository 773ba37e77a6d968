//! 2-D convolutions of the layer engine, one example at a time over buffers reused from call to
//! call: the input is unfolded (im2col) and multiplied by the weight matrix in one `gemm` call;
//! the backward pass does the same for both gradients, and folds back (col2im, the adjoint of
//! im2col). A transposed convolution is the adjoint of a convolution, so it runs the same two
//! kernels the other way round.
//!
//! ```text
//! conv2d            y[o, i, j] = b[o] + sum_{c,u,v} w[o, c, u, v] x[c, s i + u - p, s j + v - p]
//!                   cols = im2col(x) [C k k, OH OW];  y = W cols + b      W = w as [O, C k k]
//!                   dW = dy cols^T;  db = rowsum dy;  dx = col2im(W^T dy)
//! conv_transpose2d  y = col2im(W^T x) + b  (weight [C_in, C_out, k, k] as PyTorch stores it:
//!                   W = w as [C_in, C_out k k]; the geometry is that of the convolution from y
//!                   back to x); dx = W im2col(dy);  dW = x im2col(dy)^T;  db = rowsum dy
//! ```
//!
//! Shapes are planar (C x H x W per example). Tested against candle's autodiff and central
//! finite differences in `tests/nn.rs`.

use gemm::Parallelism;

/// Kernel size, stride, padding and input size of one convolution.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
    pub h: usize,
    pub w: usize,
}

impl Geometry {
    pub fn output(&self) -> (usize, usize) {
        let out = |n: usize| (n + 2 * self.padding - self.k) / self.stride + 1;
        (out(self.h), out(self.w))
    }
}

impl Geometry {
    /// `cols [C k k, OH OW] = im2col(image [C, H, W])`, zero where the kernel overhangs.
    pub fn im2col(&self, image: &[f32], channels: usize, cols: &mut [f32]) {
        let (oh, ow) = self.output();
        if self.stride == 1 && (oh, ow) == (self.h, self.w) {
            return im2col_same(image, channels, (self.h, self.w), self.k, cols);
        }
        let (k, s, p) = (self.k, self.stride, self.padding as isize);
        for c in 0..channels {
            let plane = &image[c * self.h * self.w..(c + 1) * self.h * self.w];
            for u in 0..k {
                for v in 0..k {
                    let row = &mut cols[((c * k + u) * k + v) * oh * ow..][..oh * ow];
                    // Output columns whose pixel ox * s + v - p lies inside a line (the same
                    // for every line: worked out once, not once a line).
                    let first = ((p - v as isize).max(0) as usize).div_ceil(s);
                    let last = ((self.w as isize - 1 + p - v as isize).div_euclid(s as isize) + 1)
                        .clamp(first as isize, ow as isize) as usize;
                    let first = first.min(last);
                    for oy in 0..oh {
                        let iy = (oy * s + u) as isize - p;
                        let out = &mut row[oy * ow..(oy + 1) * ow];
                        if iy < 0 || iy >= self.h as isize {
                            out.fill(0.0);
                            continue;
                        }
                        let line = &plane[iy as usize * self.w..(iy as usize + 1) * self.w];
                        out[..first].fill(0.0);
                        out[last..].fill(0.0);
                        let start = (first * s + v) as isize - p;
                        if s == 1 {
                            let start = start as usize;
                            out[first..last].copy_from_slice(&line[start..start + last - first]);
                        } else if s == 2 {
                            // The stride as a constant: LLVM loads the line's pairs and keeps
                            // every other value (the indexed loop below stays scalar).
                            let src = line[start as usize..].iter().step_by(2);
                            for (o, &v) in out[first..last].iter_mut().zip(src) {
                                *o = v;
                            }
                        } else {
                            for (j, o) in out[first..last].iter_mut().enumerate() {
                                *o = line[start as usize + j * s];
                            }
                        }
                    }
                }
            }
        }
    }

    /// The adjoint of [`Geometry::im2col`]: `image += col2im(cols)`.
    pub fn col2im(&self, cols: &[f32], channels: usize, image: &mut [f32]) {
        let (oh, ow) = self.output();
        if self.stride == 1 && (oh, ow) == (self.h, self.w) {
            return col2im_same(cols, channels, (self.h, self.w), self.k, image);
        }
        let (k, s, p) = (self.k, self.stride, self.padding as isize);
        for c in 0..channels {
            let plane = &mut image[c * self.h * self.w..(c + 1) * self.h * self.w];
            for u in 0..k {
                for v in 0..k {
                    let row = &cols[((c * k + u) * k + v) * oh * ow..][..oh * ow];
                    for oy in 0..oh {
                        let iy = (oy * s + u) as isize - p;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        let line = &mut plane[iy as usize * self.w..(iy as usize + 1) * self.w];
                        for (ox, &g) in row[oy * ow..(oy + 1) * ow].iter().enumerate() {
                            let ix = (ox * s + v) as isize - p;
                            if ix >= 0 && ix < self.w as isize {
                                line[ix as usize] += g;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// For kernel offset (u, v) of a stride-1 "same" convolution (padding p = k / 2): the shift
/// (du, dv) = (u - p, v - p), and the output rows `oy0..oy1` whose input row oy + du exists.
fn same_offsets(h: usize, k: usize, u: usize, v: usize) -> (isize, isize, usize, usize) {
    let p = (k / 2) as isize;
    let (du, dv) = (u as isize - p, v as isize - p);
    let oy0 = (-du).max(0) as usize;
    let oy1 = (h as isize - du).min(h as isize) as usize;
    (du, dv, oy0, oy1.max(oy0))
}

/// [`Geometry::im2col`] for stride 1 and output size = input size: each kernel offset's row
/// is the input plane shifted by du rows and dv columns, so it is one flat copy, after which
/// the |dv| columns that wrapped around a line are zeroed.
fn im2col_same(image: &[f32], channels: usize, (h, w): (usize, usize), k: usize, cols: &mut [f32]) {
    let hw = h * w;
    for c in 0..channels {
        let plane = &image[c * hw..(c + 1) * hw];
        for u in 0..k {
            for v in 0..k {
                let row = &mut cols[((c * k + u) * k + v) * hw..][..hw];
                let (du, dv, oy0, oy1) = same_offsets(h, k, u, v);
                let d = du * w as isize + dv;
                let lo = ((oy0 * w) as isize).max(-d) as usize;
                let hi = ((oy1 * w) as isize).min(hw as isize - d).max(lo as isize) as usize;
                row[..lo].fill(0.0);
                row[hi..].fill(0.0);
                row[lo..hi].copy_from_slice(
                    &plane[(lo as isize + d) as usize..(hi as isize + d) as usize],
                );
                let (first, last) = (
                    (-dv).max(0) as usize,
                    (w as isize - dv).min(w as isize) as usize,
                );
                // Element by element: these runs are p values long, too short for memset.
                for oy in oy0..oy1 {
                    for z in 0..first {
                        row[oy * w + z] = 0.0;
                    }
                    for z in last..w {
                        row[oy * w + z] = 0.0;
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col_same`]: `image += col2im(cols)`, one vectorised add per line.
#[multiversion::multiversion(targets = "simd")]
fn col2im_same(cols: &[f32], channels: usize, (h, w): (usize, usize), k: usize, image: &mut [f32]) {
    let hw = h * w;
    for c in 0..channels {
        let plane = &mut image[c * hw..(c + 1) * hw];
        for u in 0..k {
            for v in 0..k {
                let row = &cols[((c * k + u) * k + v) * hw..][..hw];
                let (du, dv, oy0, oy1) = same_offsets(h, k, u, v);
                let (first, last) = (
                    (-dv).max(0) as usize,
                    (w as isize - dv).min(w as isize) as usize,
                );
                for oy in oy0..oy1 {
                    let iy = (oy as isize + du) as usize;
                    let src = &row[oy * w + first..oy * w + last];
                    let start = (first as isize + dv) as usize;
                    let dst = &mut plane[iy * w + start..iy * w + start + src.len()];
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d += s;
                    }
                }
            }
        }
    }
}

/// `dst [m, n] (+)= a [m, k] b [k, n]` on row-major slices, `a` or `b` read transposed when
/// asked (`a_t`: `a` is stored `[k, m]`; `b_t`: `b` is stored `[n, k]`); single-threaded,
/// the callers run one example per thread.
#[allow(clippy::too_many_arguments)]
pub fn gemm_rm(
    dst: &mut [f32],
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    let (a_rs, a_cs) = if a_t {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (b_rs, b_cs) = if b_t {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    // SAFETY: the asserts above bound every index the strides reach; `dst` is exclusively
    // borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// Scratch of the convolution layers (the unfolded columns), reused from call to call.
#[derive(Debug, Default)]
pub struct ConvScratch {
    cols: Vec<f32>,
}

impl ConvScratch {
    fn cols(&mut self, n: usize) -> &mut [f32] {
        self.cols.resize(n, 0.0);
        &mut self.cols
    }
}

/// `y [O, OH, OW] = conv2d(x [C, H, W], w [O, C, k, k]) + b [O]` for one example (`g.h`, `g.w`
/// are x's height and width).
pub fn conv2d_forward(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    g: Geometry,
    (c, o): (usize, usize),
    s: &mut ConvScratch,
) {
    let (oh, ow) = g.output();
    let (ckk, ohw) = (c * g.k * g.k, oh * ow);
    let cols = s.cols(ckk * ohw);
    g.im2col(x, c, cols);
    for (row, &bias) in y[..o * ohw].chunks_mut(ohw).zip(b) {
        row.fill(bias);
    }
    gemm_rm(y, &w[..o * ckk], false, cols, false, (o, ohw, ckk), true);
}

/// The backward pass of [`conv2d_forward`] for one example: adds `dW = dy cols^T` to `dw`
/// and `rowsum dy` to `db`, and when asked writes `dx = col2im(W^T dy)` (overwriting).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward(
    dw: &mut [f32],
    db: &mut [f32],
    dx: Option<&mut [f32]>,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    g: Geometry,
    (c, o): (usize, usize),
    s: &mut ConvScratch,
) {
    let (oh, ow) = g.output();
    let (ckk, ohw) = (c * g.k * g.k, oh * ow);
    let cols = s.cols(ckk * ohw);
    g.im2col(x, c, cols);
    gemm_rm(dw, dy, false, cols, true, (o, ckk, ohw), true);
    for (d, row) in db.iter_mut().zip(dy.chunks(ohw)) {
        *d += crate::nn::kernels::sum(row);
    }
    if let Some(dx) = dx {
        conv2d_input_grad(dx, w, dy, g, (c, o), s);
    }
}

/// `dx = col2im(W^T dy)` (overwriting) of [`conv2d_forward`] for one example.
pub fn conv2d_input_grad(
    dx: &mut [f32],
    w: &[f32],
    dy: &[f32],
    g: Geometry,
    (c, o): (usize, usize),
    s: &mut ConvScratch,
) {
    let (oh, ow) = g.output();
    let (ckk, ohw) = (c * g.k * g.k, oh * ow);
    let cols = s.cols(ckk * ohw);
    gemm_rm(cols, w, true, dy, false, (ckk, ohw, o), false);
    dx.fill(0.0);
    g.col2im(cols, c, dx);
}

/// `y [C_out, H, W] = conv_transpose2d(x [C_in, h, w], w [C_in, C_out, k, k]) + b [C_out]` for
/// one example, where `g` is the geometry of the convolution that maps y's size (`g.h`, `g.w`)
/// to x's (`g.output()`): stride 2, kernel 4, padding 1 doubles the size.
pub fn conv_transpose2d_forward(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    g: Geometry,
    (c_in, c_out): (usize, usize),
    s: &mut ConvScratch,
) {
    let (ih, iw) = g.output();
    let (ckk, hw_in, hw_out) = (c_out * g.k * g.k, ih * iw, g.h * g.w);
    let cols = s.cols(ckk * hw_in);
    // cols [C_out k k, h w] = W^T [C_out k k, C_in] x [C_in, h w]
    gemm_rm(
        cols,
        &w[..c_in * ckk],
        true,
        x,
        false,
        (ckk, hw_in, c_in),
        false,
    );
    for (plane, &bias) in y[..c_out * hw_out].chunks_mut(hw_out).zip(b) {
        plane.fill(bias);
    }
    g.col2im(cols, c_out, y);
}

/// The backward pass of [`conv_transpose2d_forward`] for one example: adds
/// `dW = x im2col(dy)^T` to `dw` and `rowsum dy` to `db`, and when asked writes
/// `dx = W im2col(dy)` (overwriting).
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d_backward(
    dw: &mut [f32],
    db: &mut [f32],
    dx: Option<&mut [f32]>,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    g: Geometry,
    (c_in, c_out): (usize, usize),
    s: &mut ConvScratch,
) {
    let (ih, iw) = g.output();
    let (ckk, hw_in, hw_out) = (c_out * g.k * g.k, ih * iw, g.h * g.w);
    let cols = s.cols(ckk * hw_in);
    g.im2col(dy, c_out, cols);
    // dW [C_in, C_out k k] += x [C_in, h w] cols^T [h w, C_out k k]
    gemm_rm(dw, x, false, cols, true, (c_in, ckk, hw_in), true);
    for (d, plane) in db.iter_mut().zip(dy.chunks(hw_out)) {
        *d += crate::nn::kernels::sum(plane);
    }
    if let Some(dx) = dx {
        // dx [C_in, h w] = W [C_in, C_out k k] cols [C_out k k, h w]
        gemm_rm(
            dx,
            &w[..c_in * ckk],
            false,
            cols,
            false,
            (c_in, hw_in, ckk),
            false,
        );
    }
}
