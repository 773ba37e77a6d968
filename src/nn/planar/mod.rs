//! The U-Net's layers on one example at a time (`[C, H, W]` planar, in buffers reused from
//! example to example), each a forward pass and a hand-derived backward pass, their parameters
//! at offsets of one flat vector: what the fused U-Net engine (`engine::unet`) composes.
//! Checked end to end against candle's autodiff and finite differences in
//! `tests/diffusion.rs` (`fused_unet_matches_candle_autodiff_and_finite_differences`).

pub mod attention;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod conv;
pub mod linear;
pub mod norm;
pub mod residual;
pub mod upsample;

use conv::Cols;

/// `buf` resized to `n` values, for a buffer the caller overwrites whole (no zeroing when it
/// already has that length, as when it is reused from the previous example).
pub(crate) fn sized(buf: &mut Vec<f32>, n: usize) {
    buf.resize(n, 0.0);
}

/// `buf` resized to `n` zeros.
pub(crate) fn zeroed(buf: &mut Vec<f32>, n: usize) {
    buf.clear();
    buf.resize(n, 0.0);
}

/// Buffers the blocks' backward passes use.
#[derive(Default)]
pub(crate) struct BlockScratch {
    pub(crate) cols: Cols,
    pub(crate) gn: Vec<f32>,
    pub(crate) d1: Vec<f32>,
    pub(crate) d2: Vec<f32>,
    pub(crate) d3: Vec<f32>,
    pub(crate) dt: Vec<f32>,
}
