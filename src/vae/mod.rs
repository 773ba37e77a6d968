//! The variational autoencoder of the text: model and objectives.

pub mod estimate;
pub mod fused;
pub mod model;
pub mod objective;

pub use model::{Likelihood, Vae, VaeConfig, reconstruct, sample_prior};
pub use objective::{
    ElboTerms, LikelihoodEstimate, elbo_terms, estimate_log_likelihood_candle, iwae_bound,
};
