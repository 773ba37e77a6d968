//! # elbo: variational inference for deep generative models
//!
//! A latent variable model p(x) = ∫ p(x|z) p(z) dz is trained by maximising the evidence lower
//! bound (ELBO)
//!
//! ```text
//! log p(x) >= L(x) = E_{q(z|x)}[log p(x|z)] - KL(q(z|x) || p(z))
//! ```
//!
//! whose gap is exactly KL(q(z|x) || p(z|x)). elbo reports the two parts (reconstruction, KL)
//! separately, estimates the expectation with K reparameterized samples, and estimates
//! log p(x) itself by importance sampling with q(z|x) as proposal, so the gap can be measured.
//!
//! Modules:
//! - [`data`]: images of any shape (C x H x W): IDX, image folders, CIFAR archives, NumPy
//!   files, the built-in digits, named sets fetched and verified, pixel modes;
//! - [`distributions`]: diagonal Gaussian, Bernoulli and Gaussian likelihoods, seeded noise;
//! - [`vae`]: the VAE family (MLPs of any depth with one or more stochastic layers,
//!   convolutional VAEs; Bernoulli, Gaussian and discretized logistic likelihoods) and its
//!   objectives written once over `LatentVariableModel` (ELBO with per-layer KL, IWAE,
//!   importance-sampled log p(x));
//! - [`diffusion`]: DDPM schedules, the forward process and the full variational bound, the
//!   simplified loss, samplers (DDPM, DDIM), the denoisers (MLP, U-Net), the model's config
//!   and loading;
//! - [`collective`]: data parallelism over processes (one process, or MPI with the `mpi`
//!   feature): rank, world size, all-reduce, broadcast, shards;
//! - [`engine`]: the one place that chooses the fused CPU engine or candle for a model, and
//!   the fused engines ([`engine::vae`] for the VAE family, [`engine::unet`] for the U-Net);
//! - [`nn`]: the layer engine: SIMD kernels, the linear layer, activations, MLPs,
//!   convolutions, GroupNorm, dropout, the sinusoidal embedding, the U-Net's layers on one
//!   example ([`nn::planar`]: conv, GroupNorm, linear, self-attention, the residual block,
//!   upsampling), each forward and hand-derived backward; and [`nn::modules`], the candle
//!   modules (Conv2d, GroupNorm) the models' networks are built from;
//! - [`optim`]: Adam with a state that can be checkpointed;
//! - [`checkpoint`]: PyTorch-compatible safetensors, written atomically, read defensively;
//! - [`run_dir`]: the run folder, one atomic commit per epoch, checked resume;
//! - [`limits`]: sizes checked against memory before they are allocated; [`fault`]: fault
//!   injection for the file-system steps of a save (tests);
//! - [`train`]: the training loops ([`train::vae`], [`train::diffusion`]) and what they share;
//! - [`eval`]: aggregation of evaluations (means, standard errors, bits/dim);
//! - [`plot`]: PNG image grids (grey or colour) and scatter plots;
//! - [`report`]: the run report, one self-contained HTML page (SVG plots, inline pictures).

pub mod alloc;
pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod diffusion;
pub mod distributions;
pub mod engine;
pub mod eval;
pub mod fault;
pub mod files;
pub mod interop;
pub mod limits;
pub mod nn;
pub mod optim;
pub mod plot;
pub mod report;
pub mod run_dir;
pub mod train;
pub mod vae;
