//! The layer engine: SIMD kernels, the linear layer, activations, MLPs of any depth, width
//! and activation, convolutions and transposed convolutions of any geometry, group
//! normalisation with an optional SiLU, the sinusoidal timestep embedding, dropout, and in
//! [`planar`] the U-Net's layers on one example (convolution, GroupNorm, linear, self-attention,
//! the residual block with its timestep embedding, nearest upsampling); each a forward pass and
//! a hand-derived backward pass over reused buffers, used by the fused CPU engines of every
//! model (the VAE family's and the U-Net's, in `engine`).

pub mod activation;
pub mod conv;
pub mod dropout;
pub mod embedding;
pub mod group_norm;
pub mod kernels;
pub mod linear;
pub mod mlp;
pub mod modules;
pub mod planar;
pub mod winograd;
