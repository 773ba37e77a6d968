//! The layer engine's shared parts: SIMD kernels used by the fused CPU engines of every model
//! ([`crate::vae::fused`], [`crate::diffusion::fused_unet`]).

pub mod kernels;
