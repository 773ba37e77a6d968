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
//! (`group_forward`, `group_backward`) also serve the fused U-Net engine.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, bail};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::conv::{contiguous_f32, with_values};

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

/// silu(a) = a sigmoid(a).
#[inline(always)]
pub(crate) fn silu(a: f32) -> f32 {
    a / (1.0 + (-a).exp())
}

/// d silu(a) / da = s (1 + a (1 - s)), s = sigmoid(a).
#[inline(always)]
pub(crate) fn silu_grad(a: f32) -> f32 {
    let s = 1.0 / (1.0 + (-a).exp());
    s * (1.0 + a * (1.0 - s))
}

/// `1 / d` for d in [1, 2] without a division (a vector division costs as much as the rest of
/// the SiLU): the linear first guess 24/17 - 8/17 d has relative error at most 1/17, and each
/// Newton step r <- r (2 - d r) squares it, so three steps leave < 2e-10.
#[inline(always)]
fn recip_1_2(d: f32) -> f32 {
    let mut r = 24.0 / 17.0 - 8.0 / 17.0 * d;
    r *= 2.0 - d * r;
    r *= 2.0 - d * r;
    r * (2.0 - d * r)
}

/// `sigmoid(a)` without a branch, a division or a libm call, so that loops over it vectorise:
/// e = exp(-|a|) in (0, 1], sigmoid(a) = 1 / (1 + e) for a >= 0 and e / (1 + e) below.
#[inline(always)]
fn sigmoid_fast(a: f32) -> f32 {
    let e = crate::nn::kernels::exp_nonpositive(-a.abs());
    let r = recip_1_2(1.0 + e);
    if a >= 0.0 { r } else { e * r }
}

/// `y = [silu](gamma (x - mean) inv + beta)` over one channel; with the SiLU, `sig` (as long
/// as `x`) gets sigmoid(a) for the backward pass.
#[multiversion::multiversion(targets = "simd")]
#[allow(clippy::too_many_arguments)]
fn normalize_channel(
    y: &mut [f32],
    sig: &mut [f32],
    x: &[f32],
    mean: f32,
    inv: f32,
    gamma: f32,
    beta: f32,
    with_silu: bool,
) {
    if with_silu {
        for ((y, s), &x) in y.iter_mut().zip(sig.iter_mut()).zip(x) {
            let a = gamma * (x - mean) * inv + beta;
            *s = sigmoid_fast(a);
            *y = a * *s;
        }
    } else {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = gamma * (x - mean) * inv + beta;
        }
    }
}

/// Over one channel, `out = dy silu'(a)` (`dy` itself without the SiLU), a = gamma x_hat +
/// beta, x_hat = (x - mean) inv, silu'(a) = s (1 + a (1 - s)) with s = `sig` (stored by
/// [`normalize_channel`]); returns (sum out, sum out x_hat).
#[multiversion::multiversion(targets = "simd")]
#[allow(clippy::too_many_arguments)]
fn channel_grad_sums(
    out: &mut [f32],
    dy: &[f32],
    sig: &[f32],
    x: &[f32],
    mean: f32,
    inv: f32,
    gamma: f32,
    beta: f32,
    with_silu: bool,
) -> (f32, f32) {
    const LANES: usize = 16;
    let (mut sg, mut sgx) = ([0f32; LANES], [0f32; LANES]);
    let n = x.len();
    let whole = n - n % LANES;
    let silu_grad = |d: f32, x_hat: f32, s: f32| {
        let a = gamma * x_hat + beta;
        d * s * (1.0 + a * (1.0 - s))
    };
    if with_silu {
        let (out, dy, sig, x) = (&mut out[..n], &dy[..n], &sig[..n], &x[..n]);
        for i in (0..whole).step_by(LANES) {
            for l in 0..LANES {
                let x_hat = (x[i + l] - mean) * inv;
                let o = silu_grad(dy[i + l], x_hat, sig[i + l]);
                out[i + l] = o;
                sg[l] += o;
                sgx[l] += o * x_hat;
            }
        }
    } else {
        let (dy, x) = (&dy[..n], &x[..n]);
        out[..n].copy_from_slice(dy);
        for i in (0..whole).step_by(LANES) {
            for l in 0..LANES {
                let x_hat = (x[i + l] - mean) * inv;
                sg[l] += dy[i + l];
                sgx[l] += dy[i + l] * x_hat;
            }
        }
    }
    let (mut sg, mut sgx) = (sg.iter().sum::<f32>(), sgx.iter().sum::<f32>());
    for i in whole..n {
        let x_hat = (x[i] - mean) * inv;
        let o = if with_silu {
            silu_grad(dy[i], x_hat, sig[i])
        } else {
            dy[i]
        };
        out[i] = o;
        sg += o;
        sgx += o * x_hat;
    }
    (sg, sgx)
}

/// `dx += (gamma dy - mean_g - x_hat mean_gx) inv` over one channel.
#[multiversion::multiversion(targets = "simd")]
#[allow(clippy::too_many_arguments)]
fn channel_dx(
    dx: &mut [f32],
    dy: &[f32],
    x: &[f32],
    mean: f32,
    inv: f32,
    gamma: f32,
    mean_g: f32,
    mean_gx: f32,
) {
    for ((dx, &d), &x) in dx.iter_mut().zip(dy).zip(x) {
        let x_hat = (x - mean) * inv;
        *dx += (gamma * d - mean_g - x_hat * mean_gx) * inv;
    }
}

/// Forward of one (example, group): `x`, `y` `[cg, hw]` (cg = `gamma.len()` channels),
/// `y = [silu](gamma (x - mu) / sigma + beta)`; returns (mu, 1/sigma). With the SiLU, `sig`
/// gets sigmoid(a): for every value when it is as long as `x` (kept for the backward pass),
/// else one channel's worth (`hw`), overwritten channel by channel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_forward(
    y: &mut [f32],
    sig: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    hw: usize,
    eps: f64,
    with_silu: bool,
) -> (f32, f32) {
    let (mean, inv) = moments(x, eps);
    let keep = sig.len() >= x.len();
    for (j, (yc, xc)) in y.chunks_mut(hw).zip(x.chunks(hw)).enumerate() {
        let at = if keep { j * hw } else { 0 };
        let s = if with_silu {
            &mut sig[at..at + hw]
        } else {
            &mut []
        };
        normalize_channel(yc, s, xc, mean, inv, gamma[j], beta[j], with_silu);
    }
    (mean, inv)
}

/// Backward of one (example, group), the closed form of the module doc: `dx +=`, and the
/// group's channels' `dgamma`, `dbeta +=`. `sig` is the sigmoid [`group_forward`] kept (with
/// the SiLU), `scratch` `[cg, hw]` takes dy through the SiLU.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_backward(
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dy: &[f32],
    sig: &[f32],
    x: &[f32],
    (mean, inv): (f32, f32),
    (gamma, beta): (&[f32], &[f32]),
    hw: usize,
    with_silu: bool,
    scratch: &mut [f32],
) {
    let n = x.len() as f64;
    let (mut mean_g, mut mean_gx) = (0f64, 0f64);
    for j in 0..gamma.len() {
        let r = j * hw..(j + 1) * hw;
        let s = if with_silu { &sig[r.clone()] } else { &[] };
        let (sg, sgx) = channel_grad_sums(
            &mut scratch[r.clone()],
            &dy[r.clone()],
            s,
            &x[r],
            mean,
            inv,
            gamma[j],
            beta[j],
            with_silu,
        );
        dbeta[j] += sg;
        dgamma[j] += sgx;
        mean_g += (gamma[j] * sg) as f64;
        mean_gx += (gamma[j] * sgx) as f64;
    }
    let (mean_g, mean_gx) = ((mean_g / n) as f32, (mean_gx / n) as f32);
    for (j, &gm) in gamma.iter().enumerate() {
        let r = j * hw..(j + 1) * hw;
        let (dxc, g, xc) = (&mut dx[r.clone()], &scratch[r.clone()], &x[r]);
        channel_dx(dxc, g, xc, mean, inv, gm, mean_g, mean_gx);
    }
}

/// Mean and 1/sigma of one group, in one pass: sums of d and d^2 for d = x - x_0, in 16
/// float lanes (a group has at most a few thousand values per lane) added up in f64.
/// Shifting by the first value keeps var = E[d^2] - E[d]^2 free of cancellation when the mean
/// is large against the spread.
#[multiversion::multiversion(targets = "simd")]
fn moments(x: &[f32], eps: f64) -> (f32, f32) {
    const LANES: usize = 16;
    let n = x.len() as f64;
    let shift = x.first().copied().unwrap_or(0.0);
    let (mut s1, mut s2) = ([0f32; LANES], [0f32; LANES]);
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let d = c[l] - shift;
            s1[l] += d;
            s2[l] += d * d;
        }
    }
    let mut t1: f64 = s1.iter().map(|&v| v as f64).sum();
    let mut t2: f64 = s2.iter().map(|&v| v as f64).sum();
    for &v in rest {
        let d = (v - shift) as f64;
        t1 += d;
        t2 += d * d;
    }
    let mean_d = t1 / n;
    let var = (t2 / n - mean_d * mean_d).max(0.0);
    (
        (shift as f64 + mean_d) as f32,
        (1.0 / (var + eps).sqrt()) as f32,
    )
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

#[cfg(test)]
mod tests {
    use super::{recip_1_2, sigmoid_fast};

    /// The division-free reciprocal and sigmoid agree with the exact ones (computed in f64)
    /// to float32 rounding, over [1, 2] and over a = -100..100.
    #[test]
    fn division_free_sigmoid_matches_the_exact_one() {
        let mut worst_recip = 0f64;
        for i in 0..=10_000 {
            let d = 1.0 + i as f64 / 10_000.0;
            let err = (recip_1_2(d as f32) as f64 * d - 1.0).abs();
            worst_recip = worst_recip.max(err);
        }
        assert!(worst_recip < 3e-7, "1/d: relative error {worst_recip:e}");
        let mut worst = 0f64;
        for i in -100_000..=100_000 {
            let a = i as f64 / 1000.0;
            let exact = 1.0 / (1.0 + (-a).exp());
            worst = worst.max((sigmoid_fast(a as f32) as f64 - exact).abs());
        }
        assert!(worst < 3e-7, "sigmoid: absolute error {worst:e}");
    }
}
