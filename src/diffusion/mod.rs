//! Diffusion models as hierarchical VAEs: schedules, the forward and reverse processes, the
//! variational bound, samplers, denoisers and 2-D toy data.

pub mod config;
pub mod learned;
pub mod model;
pub mod nets;
pub mod objective;
pub mod ode;
pub mod process;
pub mod sampler;
pub mod schedule;
pub mod vdm;

pub use process::{Decoder, Denoiser, GaussianDiffusion, Prediction, VarianceType};
pub use schedule::{BetaSchedule, Schedule};
