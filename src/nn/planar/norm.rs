//! GroupNorm (Wu & He 2018) with an optional fused SiLU over one example `[C, HW]`, its
//! scale and shift at offsets of a flat vector; the closed-form backward pass of
//! [`crate::nn::group_norm`].

use super::sized;
use crate::nn::group_norm::{group_backward, group_forward};

/// What a GroupNorm's backward pass reads: (mean, 1/sigma) per group and, after a fused
/// SiLU, sigmoid(a) per value.
#[derive(Default)]
pub(crate) struct NormTape {
    pub(crate) stats: Vec<f32>,
    pub(crate) sig: Vec<f32>,
    /// Forward only: `sig` is one channel's scratch, not kept.
    pub(crate) inference: bool,
}

/// A GroupNorm's place in the flat parameter vector.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NormP {
    pub(crate) g: usize,
    pub(crate) b: usize,
    pub(crate) c: usize,
    pub(crate) groups: usize,
    pub(crate) eps: f64,
}

impl NormP {
    /// `y = [silu](gamma (x - mu) / sigma + beta)` over `x` `[C, HW]`; `nt` gets (mu, 1/sigma)
    /// per group and, with the SiLU, sigmoid(a) per value.
    pub(crate) fn forward(
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

    /// `dx += d group_norm`, `dgamma`, `dbeta +=` (see [`crate::nn::group_norm`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
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
