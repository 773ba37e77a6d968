//! 2-D convolution on the CPU as one fused op: per example, the input is unfolded (im2col)
//! into a buffer reused from example to example and multiplied by the weight matrix in one
//! `gemm` call, writing the output in NCHW order directly; the backward pass does the same
//! for both gradients. candle 0.11's own CPU `conv2d` backward goes through a direct
//! `conv_transpose2d` and a conv2d whose kernel is the whole image (~90% of a U-Net step).
//!
//! ```text
//! y[b, o, i, j] = bias[o] + sum_{c,u,v} w[o, c, u, v] x[b, c, s i + u - p, s j + v - p]
//! cols_b = im2col(x_b)                 [C k k, OH OW]
//! y_b    = W cols_b + bias             W = w as [O, C k k]
//! dW     = sum_b dy_b cols_b^T         dx_b = col2im(W^T dy_b)        db = sum_{b,i,j} dy
//! ```
//!
//! Other devices use candle's `conv2d`. Parameters are `weight` `[O, C, k, k]` and `bias`
//! `[O]`, the names and shapes of PyTorch's `nn.Conv2d`.

use candle_core::{
    CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Storage, Tensor, bail,
};
use candle_nn::VarBuilder;
use gemm::Parallelism;
use rayon::prelude::*;

/// A square-kernel convolution with zero padding k / 2.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// `i` input and `o` output channels, kernel `k` x `k`, padding `k / 2`.
    pub fn new(i: usize, o: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let bound = 1.0 / ((i * k * k) as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Ok(Self {
            weight: vb.get_with_hints((o, i, k, k), "weight", init)?,
            bias: vb.get_with_hints(o, "bias", init)?,
            stride,
            padding: k / 2,
        })
    }
}

impl Conv2d {
    /// `weight` `[O, C, k, k]`, `bias` `[O]` and the stride.
    pub(crate) fn parts(&self) -> (&Tensor, &Tensor, usize) {
        (&self.weight, &self.bias, self.stride)
    }
}

impl Module for Conv2d {
    /// `x` `[B, C, H, W]` -> `[B, O, OH, OW]`, OH = (H + 2p - k) / s + 1.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (o, _, k, _) = self.weight.dims4()?;
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
            return y.broadcast_add(&self.bias.reshape((1, o, 1, 1))?);
        }
        let (_, _, h, w) = x.dims4()?;
        let geometry = Geometry {
            k,
            stride: self.stride,
            padding: self.padding,
            h,
            w,
        };
        x.contiguous()?
            .apply_op3(&self.weight, &self.bias, Conv2dOp(geometry))
    }
}

/// Kernel size, stride, padding and input size of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) k: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
}

impl Geometry {
    pub(crate) fn output(&self) -> (usize, usize) {
        let out = |n: usize| (n + 2 * self.padding - self.k) / self.stride + 1;
        (out(self.h), out(self.w))
    }
}

pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: only f32 is supported");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the input must be contiguous"),
    }
}

/// Runs `f` on the values of f32 CPU tensors, read in place (a non-contiguous one is made
/// contiguous first).
pub(crate) fn with_values<R, const N: usize>(
    tensors: [&Tensor; N],
    op: &str,
    f: impl FnOnce([&[f32]; N]) -> Result<R>,
) -> Result<R> {
    let owned: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<_>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: [&[f32]; N] = [&[]; N];
    for (slot, (storage, layout)) in slices.iter_mut().zip(&guards) {
        *slot = match &**storage {
            Storage::Cpu(cpu) => contiguous_f32(cpu, layout, op)?,
            _ => bail!("{op}: CPU tensors only"),
        };
    }
    f(slices)
}

impl Geometry {
    /// `cols [C k k, OH OW] = im2col(image [C, H, W])`, zero where the kernel overhangs.
    pub(crate) fn im2col(&self, image: &[f32], channels: usize, cols: &mut [f32]) {
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
                    for oy in 0..oh {
                        let iy = (oy * s + u) as isize - p;
                        let out = &mut row[oy * ow..(oy + 1) * ow];
                        if iy < 0 || iy >= self.h as isize {
                            out.fill(0.0);
                            continue;
                        }
                        let line = &plane[iy as usize * self.w..(iy as usize + 1) * self.w];
                        // Output columns whose pixel ox * s + v - p lies inside the line.
                        let first = ((p - v as isize).max(0) as usize).div_ceil(s);
                        let last = ((self.w as isize - 1 + p - v as isize).div_euclid(s as isize)
                            + 1)
                        .clamp(first as isize, ow as isize)
                            as usize;
                        let first = first.min(last);
                        out[..first].fill(0.0);
                        out[last..].fill(0.0);
                        let start = (first * s + v) as isize - p;
                        if s == 1 {
                            let start = start as usize;
                            out[first..last].copy_from_slice(&line[start..start + last - first]);
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
    pub(crate) fn col2im(&self, cols: &[f32], channels: usize, image: &mut [f32]) {
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
pub(crate) fn gemm_rm(
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

/// The convolution as one op of (x, weight, bias).
struct Conv2dOp(Geometry);

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d_im2col"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "conv2d")?;
        let w = contiguous_f32(s2, l2, "conv2d")?;
        let bias = contiguous_f32(s3, l3, "conv2d")?;
        let (b, c, h, wd) = l1.shape().dims4()?;
        let (o, wc, k, _) = l2.shape().dims4()?;
        let g = self.0;
        if wc != c || k != g.k || h != g.h || wd != g.w {
            bail!(
                "conv2d: input {:?} does not fit weight {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let (oh, ow) = g.output();
        let (ckk, ohw) = (c * k * k, oh * ow);
        let mut y = vec![0f32; b * o * ohw];
        y.par_chunks_mut(o * ohw)
            .zip(x.par_chunks(c * h * wd))
            .for_each_init(
                || vec![0f32; ckk * ohw],
                |cols, (y, image)| {
                    g.im2col(image, c, cols);
                    for (oi, row) in y.chunks_mut(ohw).enumerate() {
                        row.fill(bias[oi]);
                    }
                    gemm_rm(y, w, false, cols, false, (o, ohw, ckk), true);
                },
            );
        Ok((CpuStorage::F32(y), Shape::from((b, o, oh, ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, wd) = x.dims4()?;
        let (o, _, k, _) = weight.dims4()?;
        let g = self.0;
        let (oh, ow) = g.output();
        let (ckk, ohw) = (c * k * k, oh * ow);
        with_values([x, weight, grad], "conv2d", |[xv, wv, dy]| {
            let mut dx = vec![0f32; xv.len()];
            // Per thread: its share of dW and db, and two scratch buffers.
            let (dw, db) = dx
                .par_chunks_mut(c * h * wd)
                .zip(xv.par_chunks(c * h * wd).zip(dy.par_chunks(o * ohw)))
                .fold(
                    || (vec![0f32; o * ckk], vec![0f32; o], vec![0f32; ckk * ohw]),
                    |(mut dw, mut db, mut cols), (dx, (image, dy))| {
                        // dW += dy_b [O, OHW] cols_b^T [OHW, CKK]
                        g.im2col(image, c, &mut cols);
                        gemm_rm(&mut dw, dy, false, &cols, true, (o, ckk, ohw), true);
                        for (oi, row) in dy.chunks(ohw).enumerate() {
                            db[oi] += row.iter().sum::<f32>();
                        }
                        // dx_b = col2im(W^T [CKK, O] dy_b [O, OHW])
                        gemm_rm(&mut cols, wv, true, dy, false, (ckk, ohw, o), false);
                        g.col2im(&cols, c, dx);
                        (dw, db, cols)
                    },
                )
                .map(|(dw, db, _)| (dw, db))
                .reduce(
                    || (vec![0f32; o * ckk], vec![0f32; o]),
                    |(mut dw, mut db), (dw2, db2)| {
                        dw.iter_mut().zip(&dw2).for_each(|(a, b)| *a += b);
                        db.iter_mut().zip(&db2).for_each(|(a, b)| *a += b);
                        (dw, db)
                    },
                );
            let dev = x.device();
            Ok((
                Some(Tensor::from_vec(dx, (b, c, h, wd), dev)?),
                Some(Tensor::from_vec(dw, (o, c, k, k), dev)?),
                Some(Tensor::from_vec(db, o, dev)?),
            ))
        })
    }
}
