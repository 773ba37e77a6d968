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
use rayon::prelude::*;

pub(crate) use crate::nn::conv::{Geometry, gemm_rm};

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
    /// As [`Conv2d::new`] with zero padding `padding` on every side.
    pub fn new_padded(
        i: usize,
        o: usize,
        k: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            padding,
            ..Self::new(i, o, k, stride, vb)?
        })
    }

    /// `weight` `[O, C, k, k]`, `bias` `[O]` and the stride.
    pub(crate) fn parts(&self) -> (&Tensor, &Tensor, usize) {
        (&self.weight, &self.bias, self.stride)
    }

    /// The zero padding on every side.
    pub(crate) fn padding(&self) -> usize {
        self.padding
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
