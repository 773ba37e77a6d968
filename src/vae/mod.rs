//! The VAE family: the models (MLPs with one or more stochastic layers) and their objectives
//! (ELBO with per-layer KL, IWAE, importance-sampled log p(x)), written once for all of them.
//! Their fused CPU engine is `engine::vae`.

pub mod config;
pub mod estimate;
pub mod model;
pub mod objective;

pub use model::{Init, Likelihood, Vae, VaeConfig, reconstruct, sample_prior};
pub use objective::{
    ElboTerms, KlEstimator, LatentVariableModel, LikelihoodEstimate, Objective, elbo_terms,
    elbo_terms_with, estimate_log_likelihood_candle, iwae_bound,
};
