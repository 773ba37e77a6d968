//! Checkpoints of other projects, each format in one file with its tests: [`diffusers`]
//! (`save_pretrained` folders of `UNet2DModel` and the DDPM pipelines). They build elbo's own
//! networks (the U-Net family of [`crate::diffusion::nets`], extended where a format's field
//! needs it) and are reached through the commands' loading code only.

pub mod diffusers;
