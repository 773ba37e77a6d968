//! Multi-head self-attention over the pixels of one example (DDPM's AttnBlock; heads as in
//! improved-diffusion and diffusers), with its GroupNorm and residual. Head i reads rows
//! `i d..(i + 1) d` (d = C / heads) of each of Q, K, V:
//!
//! ```text
//! [Q; K; V] = qkv(gn(x)),  S_i = Q_i^T K_i / sqrt(d),  A_i = softmax_rows(S_i),  O_i = V_i A_i^T
//! y = x + P [O_1; ...; O_heads] + p
//! dV_i = dO_i A_i,  dA_i = dO_i^T V_i,  dS_i = A_i * (dA_i - rowsum(A_i * dA_i)) / sqrt(d),
//! dQ_i = K_i dS_i^T,  dK_i = Q_i dS_i
//! ```
//!
//! Q, K, V, O are `[C, HW]` (Q_i `[d, HW]`), A_i and S_i `[HW, HW]` (row: query pixel).

use super::conv::{Cols, ConvP, Dx, Init};
use super::norm::{NormP, NormTape};
use super::{BlockScratch, sized};
use crate::nn::conv::gemm_rm;
use crate::nn::kernels::{add_assign, softmax_scaled, softmax_scaled_backward};

/// The attention block's parameters.
#[derive(Debug, Clone)]
pub(crate) struct AttnP {
    pub(crate) norm: NormP,
    pub(crate) qkv: ConvP,
    pub(crate) proj: ConvP,
    pub(crate) heads: usize,
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
    /// Channels per head.
    fn head_dim(&self) -> usize {
        self.proj.o / self.heads
    }

    pub(crate) fn scale(&self) -> f32 {
        (1.0 / (self.head_dim() as f64).sqrt()) as f32
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
        let (nh, d) = (self.heads, self.head_dim());
        sized(&mut t.att, nh * n * n);
        sized(&mut t.ot, c * n);
        for i in 0..nh {
            let (r, a) = (i * d * n..(i + 1) * d * n, i * n * n..(i + 1) * n * n);
            gemm_rm(
                &mut t.att[a.clone()],
                &q[r.clone()],
                true,
                &k[r.clone()],
                false,
                (n, n, d),
                false,
            );
        }
        let scale = self.scale();
        for row in t.att.chunks_mut(n) {
            softmax_scaled(row, scale);
        }
        for i in 0..nh {
            let (r, a) = (i * d * n..(i + 1) * d * n, i * n * n..(i + 1) * n * n);
            gemm_rm(
                &mut t.ot[r.clone()],
                &v[r],
                false,
                &t.att[a],
                true,
                (d, n, n),
                false,
            );
        }
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
        let (nh, d) = (self.heads, self.head_dim());
        let scale = self.scale();
        sized(&mut s.d3, n * n); // dA_i, then dS_i
        for i in 0..nh {
            let (r, a) = (i * d * n..(i + 1) * d * n, i * n * n..(i + 1) * n * n);
            let att = &t.att[a];
            gemm_rm(
                &mut dv[r.clone()],
                &s.d1[r.clone()],
                false,
                att,
                false,
                (d, n, n),
                false,
            );
            gemm_rm(
                &mut s.d3,
                &s.d1[r.clone()],
                true,
                &v[r.clone()],
                false,
                (n, n, d),
                false,
            );
            for (ds, a) in s.d3.chunks_mut(n).zip(att.chunks(n)) {
                softmax_scaled_backward(ds, a, scale);
            }
            gemm_rm(
                &mut dq[r.clone()],
                &k[r.clone()],
                false,
                &s.d3,
                true,
                (d, n, n),
                false,
            );
            gemm_rm(
                &mut dk[r.clone()],
                &q[r],
                false,
                &s.d3,
                false,
                (d, n, n),
                false,
            );
        }
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
