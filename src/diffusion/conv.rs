//! 2-D convolution as im2col + one matrix product, so that the forward pass and both gradients
//! run at `gemm` speed on the CPU (candle 0.11's CPU `conv2d` backward goes through a direct
//! `conv_transpose2d` and a conv2d whose kernel is the whole image: ~90% of a U-Net step).
//!
//! ```text
//! y[b, o, i, j] = bias[o] + sum_{c, u, v} w[o, c, u, v] x[b, c, s i + u - p, s j + v - p]
//! cols = im2col(x)                      [B * OH * OW, C * k * k]
//! y    = cols W^T + bias                [B * OH * OW, O] -> permuted to [B, O, OH, OW]
//! ```
//!
//! `im2col` is a candle custom op whose backward is `col2im` (the sum of each column entry back
//! into its pixel) and vice versa; candle's autodiff does the rest through the matmul. Other
//! devices use candle's own `conv2d`. Parameters are `weight` `[O, C, k, k]` and `bias` `[O]`,
//! the names and shapes of PyTorch's `nn.Conv2d`.

use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor, bail};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// A square-kernel convolution with zero padding.
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

impl Module for Conv2d {
    /// `x` `[B, C, H, W]` -> `[B, O, OH, OW]`, OH = (H + 2p - k) / s + 1.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (o, c, k, _) = self.weight.dims4()?;
        if !x.device().is_cpu() {
            let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
            return y.broadcast_add(&self.bias.reshape((1, o, 1, 1))?);
        }
        let (b, _, h, w) = x.dims4()?;
        let geometry = Geometry {
            k,
            stride: self.stride,
            padding: self.padding,
            h,
            w,
        };
        let (oh, ow) = geometry.output();
        let cols = x.contiguous()?.apply_op1(Im2Col(geometry))?; // [B, OH*OW, C*k*k]
        let cols = cols.reshape((b * oh * ow, c * k * k))?;
        let y = cols.matmul(&self.weight.reshape((o, c * k * k))?.t()?)?;
        y.broadcast_add(&self.bias)?
            .reshape((b, oh, ow, o))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }
}

/// Kernel size, stride, padding and input size of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    k: usize,
    stride: usize,
    padding: usize,
    h: usize,
    w: usize,
}

impl Geometry {
    fn output(&self) -> (usize, usize) {
        let out = |n: usize| (n + 2 * self.padding - self.k) / self.stride + 1;
        (out(self.h), out(self.w))
    }

    /// Calls `f(col_index, pixel_index)` for every (output position, kernel entry) of one
    /// channel-image whose pixel lies inside the image; `col_index` counts within the
    /// `[OH*OW, C*k*k]` matrix of one example, `pixel_index` within its `[C, H, W]`.
    #[inline]
    fn for_each(&self, channels: usize, mut f: impl FnMut(usize, usize)) {
        let (oh, ow) = self.output();
        let kk = self.k * self.k;
        let row_len = channels * kk;
        for oy in 0..oh {
            for ox in 0..ow {
                let row = (oy * ow + ox) * row_len;
                for c in 0..channels {
                    for u in 0..self.k {
                        let iy = (oy * self.stride + u) as isize - self.padding as isize;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        for v in 0..self.k {
                            let ix = (ox * self.stride + v) as isize - self.padding as isize;
                            if ix < 0 || ix >= self.w as isize {
                                continue;
                            }
                            let pixel = (c * self.h + iy as usize) * self.w + ix as usize;
                            f(row + c * kk + u * self.k + v, pixel);
                        }
                    }
                }
            }
        }
    }
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: only f32 is supported");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the input must be contiguous"),
    }
}

/// `[B, C, H, W]` -> `[B, OH*OW, C*k*k]`, zeros where the kernel overhangs the image.
struct Im2Col(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "im2col")?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let g = self.0;
        let (oh, ow) = g.output();
        let per_example = oh * ow * c * g.k * g.k;
        let mut out = vec![0f32; b * per_example];
        out.par_chunks_mut(per_example)
            .zip(x.par_chunks(c * h * w))
            .for_each(|(cols, image)| g.for_each(c, |col, pixel| cols[col] = image[pixel]));
        Ok((
            CpuStorage::F32(out),
            Shape::from((b, oh * ow, c * g.k * g.k)),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let channels = arg.dim(1)?;
        Ok(Some(
            grad_res.contiguous()?.apply_op1(Col2Im(self.0, channels))?,
        ))
    }
}

/// The adjoint of [`Im2Col`]: `[B, OH*OW, C*k*k]` -> `[B, C, H, W]`, each entry added into its
/// pixel.
struct Col2Im(Geometry, usize);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = contiguous_f32(storage, layout, "col2im")?;
        let (b, _, _) = layout.shape().dims3()?;
        let (g, c) = (self.0, self.1);
        let (oh, ow) = g.output();
        let per_example = oh * ow * c * g.k * g.k;
        let mut out = vec![0f32; b * c * g.h * g.w];
        out.par_chunks_mut(c * g.h * g.w)
            .zip(cols.par_chunks(per_example))
            .for_each(|(image, cols)| g.for_each(c, |col, pixel| image[pixel] += cols[col]));
        Ok((CpuStorage::F32(out), Shape::from((b, c, g.h, g.w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}
