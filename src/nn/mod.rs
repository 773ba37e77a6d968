//! The layer engine's shared parts: SIMD kernels and the linear layer used by the fused CPU
//! engines of every model
//! ([`crate::vae::fused`], [`crate::diffusion::fused_unet`]).

pub mod activation;
pub mod kernels;
pub mod linear;
