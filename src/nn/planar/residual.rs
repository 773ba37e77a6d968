//! The residual block of DDPM's U-Net with its timestep embedding and dropout, over one
//! example `[C, H, W]`:
//!
//! ```text
//! out = conv2(dropout(silu(gn2(conv1(silu(gn1(x))) + time(silu(temb)))))) + skip(x)
//! ```
//!
//! The time projection enters as a per-channel bias of the first convolution; the skip branch
//! (identity or a 1x1 convolution) is the second convolution's starting value. With
//! `scale_shift` (improved-diffusion's `use_scale_shift_norm`) the projection is
//! `[scale; shift]`, `2 C_out` wide, and modulates the second norm instead:
//!
//! ```text
//! g = gn2(conv1(silu(gn1(x)))),  u = g (1 + scale_c) + shift_c,  n2 = silu(u)
//! du = dn2 silu'(u),  dscale_c = sum_hw du g,  dshift_c = sum_hw du,  dg = du (1 + scale_c)
//! ```

use super::conv::{Cols, ConvP, Dx, Init};
use super::linear::LinP;
use super::norm::{NormP, NormTape};
use super::{BlockScratch, sized, zeroed};
use crate::nn::group_norm::{silu, silu_grad};
use crate::nn::kernels::add_assign;

/// A residual block's parameters.
#[derive(Debug, Clone)]
pub(crate) struct ResP {
    pub(crate) norm1: NormP,
    pub(crate) conv1: ConvP,
    pub(crate) time: LinP,
    pub(crate) norm2: NormP,
    pub(crate) conv2: ConvP,
    pub(crate) skip: Option<ConvP>,
    pub(crate) scale_shift: bool,
}

/// What a residual block's backward pass reads of its forward pass.
#[derive(Default)]
pub(crate) struct ResTape {
    pub(crate) n1: Vec<f32>,
    pub(crate) norm1: NormTape,
    pub(crate) tproj: Vec<f32>,
    pub(crate) h1: Vec<f32>,
    /// silu(gn2(..)) times the dropout mask: the second convolution's input.
    pub(crate) n2: Vec<f32>,
    pub(crate) norm2: NormTape,
    /// Scale-shift blocks: gn2's output before the modulation.
    pub(crate) g: Vec<f32>,
    /// The dropout mask ([`crate::nn::dropout`]); empty when nothing was dropped.
    pub(crate) mask: Vec<f32>,
}

impl ResP {
    /// `out = conv2(dropout(silu(gn2(conv1(silu(gn1(x))) + time(ta))))) + skip(x)`;
    /// `dropout` = (seed, stream, p) in training.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        p: &[f32],
        x: &[f32],
        size: (usize, usize),
        ta: &[f32],
        t: &mut ResTape,
        out: &mut Vec<f32>,
        cols: &mut Cols,
        dropout: Option<(u64, u64, f32)>,
    ) {
        let hw = size.0 * size.1;
        self.norm1.forward(p, x, hw, &mut t.n1, true, &mut t.norm1);
        self.time.forward(p, ta, &mut t.tproj);
        if self.scale_shift {
            let o = self.conv1.o;
            self.conv1
                .forward(p, &t.n1, size, &mut t.h1, Init::Bias, cols);
            self.norm2
                .forward(p, &t.h1, hw, &mut t.g, false, &mut t.norm2);
            sized(&mut t.n2, t.g.len());
            let (scale, shift) = t.tproj.split_at(o);
            for (c, (n2, g)) in t.n2.chunks_mut(hw).zip(t.g.chunks(hw)).enumerate() {
                let (a, b) = (1.0 + scale[c], shift[c]);
                for (y, &g) in n2.iter_mut().zip(g) {
                    *y = silu(g * a + b);
                }
            }
        } else {
            self.conv1
                .forward(p, &t.n1, size, &mut t.h1, Init::BiasPlus(&t.tproj), cols);
            self.norm2
                .forward(p, &t.h1, hw, &mut t.n2, true, &mut t.norm2);
        }
        match dropout {
            Some((seed, stream, rate)) => {
                sized(&mut t.mask, t.n2.len());
                crate::nn::dropout::fill_mask(seed, stream, rate, &mut t.mask);
                crate::nn::dropout::apply(&mut t.n2, &t.mask);
            }
            None => t.mask.clear(),
        }
        match &self.skip {
            Some(s) => {
                s.forward(p, x, size, out, Init::Bias, cols);
            }
            None => {
                out.clear();
                out.extend_from_slice(x);
            }
        }
        self.conv2
            .forward(p, &t.n2, size, out, Init::Accumulate, cols);
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &self,
        p: &[f32],
        grads: &mut [f32],
        x: &[f32],
        size: (usize, usize),
        ta: &[f32],
        t: &ResTape,
        dout: &[f32],
        dx: &mut [f32],
        dta: &mut [f32],
        s: &mut BlockScratch,
    ) {
        let hw = size.0 * size.1;
        let o = self.conv2.o;
        sized(&mut s.d1, o * hw);
        self.conv2
            .backward(p, grads, &t.n2, size, dout, Dx::Set(&mut s.d1), &mut s.cols);
        if !t.mask.is_empty() {
            crate::nn::dropout::apply(&mut s.d1, &t.mask);
        }
        match &self.skip {
            Some(sk) => sk.backward(p, grads, x, size, dout, Dx::Add(&mut *dx), &mut s.cols),
            None => add_assign(dx, dout),
        }
        zeroed(&mut s.d2, o * hw);
        if self.scale_shift {
            // d1: dL/dn2 -> dL/dg in place; dt: [dscale; dshift].
            sized(&mut s.dt, 2 * o);
            let (scale, shift) = t.tproj.split_at(o);
            for (c, (d, g)) in s.d1.chunks_mut(hw).zip(t.g.chunks(hw)).enumerate() {
                let (a, b) = (1.0 + scale[c], shift[c]);
                let (mut ds, mut db) = (0f32, 0f32);
                for (d, &g) in d.iter_mut().zip(g) {
                    let du = *d * silu_grad(g * a + b);
                    ds += du * g;
                    db += du;
                    *d = du * a;
                }
                s.dt[c] = ds;
                s.dt[o + c] = db;
            }
            self.norm2.backward(
                p, grads, &t.h1, hw, &t.norm2, false, &s.d1, &mut s.d2, &mut s.gn,
            );
        } else {
            self.norm2.backward(
                p, grads, &t.h1, hw, &t.norm2, true, &s.d1, &mut s.d2, &mut s.gn,
            );
            sized(&mut s.dt, o);
            for (dt, row) in s.dt.iter_mut().zip(s.d2.chunks(hw)) {
                *dt = row.iter().sum();
            }
        }
        self.time.backward(p, grads, ta, &s.dt, Some(dta));
        sized(&mut s.d1, x.len());
        self.conv1.backward(
            p,
            grads,
            &t.n1,
            size,
            &s.d2,
            Dx::Set(&mut s.d1),
            &mut s.cols,
        );
        self.norm1
            .backward(p, grads, x, hw, &t.norm1, true, &s.d1, dx, &mut s.gn);
    }
}
