//! candle modules for the networks the models define: parameters from a `VarBuilder` (names and
//! shapes of the PyTorch module of the same name), any device, candle's autodiff; on the CPU
//! their forward and backward passes are custom ops over this crate's kernels (candle 0.11's
//! own CPU conv2d backward and its composed GroupNorm are several times slower).

pub mod conv;
pub mod group_norm;
