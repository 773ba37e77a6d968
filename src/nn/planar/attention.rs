//! Single-head self-attention over the pixels of one example (DDPM's AttnBlock), with its
//! GroupNorm and residual:
//!
//! ```text
//! [Q; K; V] = qkv(gn(x)),  S = Q^T K / sqrt(C),  A = softmax_rows(S),  O = V A^T,  y = x + P O + p
//! dV = dO A,  dA = dO^T V,  dS = A * (dA - rowsum(A * dA)) / sqrt(C),  dQ = K dS^T,  dK = Q dS
//! ```
//!
//! Q, K, V, O are `[C, HW]`, A and S `[HW, HW]` (row: query pixel).

use super::conv::{Cols, ConvP, Dx, Init};
use super::norm::{NormP, NormTape};
use super::{BlockScratch, sized};
use crate::nn::conv::gemm_rm;
use crate::nn::kernels::add_assign;

/// The attention block's parameters.
#[derive(Debug, Clone)]
pub(crate) struct AttnP {
    pub(crate) norm: NormP,
    pub(crate) qkv: ConvP,
    pub(crate) proj: ConvP,
}

#[derive(Default)]
pub(crate) struct AttnTape {
    pub(crate) hn: Vec<f32>,
    pub(crate) norm: NormTape,
    pub(crate) qkv: Vec<f32>,
    pub(crate) att: Vec<f32>,
    pub(crate) ot: Vec<f32>,
}

impl AttnP {
    pub(crate) fn scale(&self) -> f32 {
        (1.0 / (self.proj.o as f64).sqrt()) as f32
    }

    /// `y = x + proj(V softmax(Q^T K / sqrt(C))^T)`, `[Q; K; V] = qkv(group_norm(x))`.
    pub(crate) fn forward(
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
    pub(crate) fn backward(
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
