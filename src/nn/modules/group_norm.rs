//! Group normalisation (Wu & He 2018) as one fused CPU op with its own backward, in place of
//! candle_nn's composition of ~10 element-wise passes (each allocating) per call.
//!
//! For each example b and group g of C/G channels (N = C/G * H * W values):
//!
//! ```text
//! forward    mu = mean(x), sigma = sqrt(var(x) + eps), x_hat = (x - mu) / sigma
//!            y = gamma_c x_hat + beta_c
//! backward   dbeta_c = sum_{b,hw} dy,  dgamma_c = sum_{b,hw} dy x_hat,  g = gamma_c dy
//!            dx = (g - mean(g) - x_hat mean(g x_hat)) / sigma
//! ```
//!
//! [`GroupNorm::forward_silu`] fuses the SiLU that follows most norms of the U-Net:
//! `y = silu(a)`, `a = gamma_c x_hat + beta_c`, and in the backward `da = dy s (1 + a (1 - s))`
//! with `s = sigmoid(a)` takes the place of dy above.
//!
//! `x` `[B, C, ...]`, `gamma`, `beta` `[C]`; the names and shapes of PyTorch's `nn.GroupNorm`
//! (`weight`, `bias`). Other devices use `candle_nn::GroupNorm`. The per-group kernels
//! (`group_forward`, `group_backward`) are the layer engine's, in `nn::group_norm`.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, bail};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::conv::{contiguous_f32, with_values};
use crate::nn::group_norm::{group_backward, group_forward};

#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    fallback: candle_nn::GroupNorm,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            bail!("GroupNorm: {channels} channels do not split into {groups} groups");
        }
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
        let fallback =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
            fallback,
        })
    }
}

impl GroupNorm {
    /// `weight` (gamma), `bias` (beta), the number of groups and epsilon.
    pub(crate) fn parts(&self) -> (&Tensor, &Tensor, usize, f64) {
        (&self.weight, &self.bias, self.groups, self.eps)
    }

    fn apply(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            let y = self.fallback.forward(x)?;
            return if silu { y.silu() } else { Ok(y) };
        }
        x.contiguous()?.apply_op3(
            &self.weight,
            &self.bias,
            GroupNormOp {
                groups: self.groups,
                eps: self.eps,
                silu,
            },
        )
    }

    /// `silu(group_norm(x))` in one pass.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNormOp {
    /// `(batch, channels, spatial size)` of `x`.
    fn dims(&self, shape: &Shape) -> Result<(usize, usize, usize)> {
        let dims = shape.dims();
        if dims.len() < 3 {
            bail!("group_norm: input rank must be at least 3, got {shape:?}");
        }
        let (b, c) = (dims[0], dims[1]);
        if !c.is_multiple_of(self.groups) {
            bail!(
                "group_norm: {c} channels do not split into {} groups",
                self.groups
            );
        }
        Ok((b, c, dims[2..].iter().product()))
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group_norm"
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
        let x = contiguous_f32(s1, l1, "group_norm")?;
        let (gamma, beta) = (
            contiguous_f32(s2, l2, "group_norm")?,
            contiguous_f32(s3, l3, "group_norm")?,
        );
        let (_, c, hw) = self.dims(l1.shape())?;
        let cg = c / self.groups;
        let group_len = cg * hw;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(group_len)
            .zip(x.par_chunks(group_len))
            .enumerate()
            .for_each_init(
                || vec![0f32; if self.silu { hw } else { 0 }],
                |sig, (i, (y, x))| {
                    let first = (i % self.groups) * cg;
                    let (gm, bt) = (&gamma[first..first + cg], &beta[first..first + cg]);
                    group_forward(y, sig, x, gm, bt, hw, self.eps, self.silu);
                },
            );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, c, hw) = self.dims(x.shape())?;
        with_values([x, gamma, beta, grad], "group_norm", |[xv, gv, bv, dy]| {
            let cg = c / self.groups;
            let group_len = cg * hw;
            let mut dx = vec![0f32; xv.len()];
            // Per group: the forward pass again (for the statistics and the sigmoid), then dx
            // and the group's contributions to dgamma and dbeta.
            let partial: Vec<(usize, Vec<f32>, Vec<f32>)> = dx
                .par_chunks_mut(group_len)
                .zip(xv.par_chunks(group_len).zip(dy.par_chunks(group_len)))
                .enumerate()
                .map(|(i, (dx, (x, dy)))| {
                    let first = (i % self.groups) * cg;
                    let (gm, bt) = (&gv[first..first + cg], &bv[first..first + cg]);
                    let (mut y, mut sig) = (vec![0f32; group_len], vec![0f32; group_len]);
                    let stats = group_forward(&mut y, &mut sig, x, gm, bt, hw, self.eps, self.silu);
                    let (mut dgamma, mut dbeta) = (vec![0f32; cg], vec![0f32; cg]);
                    group_backward(
                        dx,
                        &mut dgamma,
                        &mut dbeta,
                        dy,
                        &sig,
                        x,
                        stats,
                        (gm, bt),
                        hw,
                        self.silu,
                        &mut y,
                    );
                    (first, dgamma, dbeta)
                })
                .collect();
            let (mut dgamma, mut dbeta) = (vec![0f32; c], vec![0f32; c]);
            for (first, dg, db) in partial {
                for j in 0..cg {
                    dgamma[first + j] += dg[j];
                    dbeta[first + j] += db[j];
                }
            }
            let dev = x.device();
            Ok((
                Some(Tensor::from_vec(dx, x.shape(), dev)?),
                Some(Tensor::from_vec(dgamma, c, dev)?),
                Some(Tensor::from_vec(dbeta, c, dev)?),
            ))
        })
    }
}
