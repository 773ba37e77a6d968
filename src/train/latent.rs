//! Training and evaluation for any [`LatentVariableModel`] made of candle modules: the loop and
//! the summary `train vae` and `eval vae` give the shipped VAE family, for a model of your own
//! (`examples/custom_vae.rs`). The one training loop and its Adam on the negative ELBO or
//! IWAE_K, minibatches of a shuffled [`Dataset`] in a pixel mode, seeded noise; the
//! evaluation estimates log p(x) by importance sampling and reports the ELBO's parts, the KL
//! of each layer and the active units.

use anyhow::Result;
use candle_core::Var;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::data::{Dataset, PixelMode};
use crate::distributions::Noise;
use crate::engine::vae::VaeBatch;
use crate::engine::{TrainStep, VaeObjective, candle_vae_step};
use crate::eval::{Activity, mean, standard_error};
use crate::optim::{Adam, AdamConfig};
use crate::vae::objective::{
    KlEstimator, LatentVariableModel, Objective, estimate_log_likelihood_candle, posterior_means,
};

/// How [`fit`] trains.
#[derive(Debug, Clone)]
pub struct FitConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub objective: Objective,
    /// How the ELBO's top-layer KL is estimated (the IWAE's is always Monte Carlo).
    pub kl: KlEstimator,
    /// Samples K per example (the IWAE's K; Monte Carlo samples of the ELBO).
    pub k: usize,
    pub pixels: PixelMode,
    pub seed: u64,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 64,
            lr: 1e-3,
            objective: Objective::Elbo,
            kl: KlEstimator::Analytic,
            k: 1,
            pixels: PixelMode::Dynamic,
            seed: 0,
        }
    }
}

/// Trains `model` (whose parameters are `vars`) on `train` with the one training loop
/// ([`super::run_epochs`], in memory: nothing is written) and candle's step; returns the mean
/// training loss (-ELBO or -IWAE_K, nats per example) of each epoch.
pub fn fit<M: LatentVariableModel + ?Sized>(
    model: &M,
    vars: Vec<Var>,
    train: &Dataset,
    config: &FitConfig,
) -> Result<Vec<f64>> {
    crate::limits::at_least_one("batch size", config.batch_size)?;
    crate::limits::at_least_one("K", config.k)?;
    let vars: Vec<(String, Var)> = vars
        .into_iter()
        .enumerate()
        .map(|(i, v)| (format!("param.{i}"), v))
        .collect();
    let objective = VaeObjective {
        objective: config.objective,
        kl: config.kl,
        beta: 1.0,
    };
    let d = train.shape.dim();
    let mut step = candle_vae_step(model, vars, objective, d);
    let mut adam = Adam::new(step.table().clone(), AdamConfig::with_lr(config.lr));
    let mut params = step.read_params()?;
    let mut family = Fit {
        config,
        train,
        latents: model.latent_dims(),
    };
    super::run_epochs(
        &mut family,
        &mut step,
        &mut params,
        &mut adam,
        super::LoopOptions {
            dir: None,
            run: None,
            seed: config.seed,
            start_epoch: 0,
            epochs: config.epochs,
            show_progress: false,
        },
    )
}

/// [`fit`]'s family: shuffled minibatches in a pixel mode and their noise; the epoch's mean
/// loss per example.
struct Fit<'a> {
    config: &'a FitConfig,
    train: &'a Dataset,
    latents: Vec<usize>,
}

impl super::Family for Fit<'_> {
    type Batch = VaeBatch;
    type Metrics = f64;

    fn batches(&self, rng: &mut StdRng) -> Vec<Vec<usize>> {
        super::shuffled_batches(self.train.len(), self.config.batch_size, rng)
    }

    fn batch(
        &self,
        idx: &[usize],
        rng: &mut StdRng,
        noise: &mut Noise,
    ) -> Result<(VaeBatch, usize)> {
        let x = self.train.batch_values(idx, self.config.pixels, rng);
        let d = self.train.shape.dim();
        let batch = VaeBatch::draw(x, d, &self.latents, self.config.k, noise);
        Ok((batch, idx.len()))
    }

    fn lr(&self, _epoch: usize) -> f64 {
        self.config.lr
    }

    fn end_epoch(&mut self, end: &super::EpochEnd<'_>) -> Result<super::EpochReport<f64>> {
        // The step's sums (engine::vae::VAE_SUMS): the objective summed over the examples.
        let loss = -end.sums.get(1).copied().unwrap_or(0.0) / self.train.len().max(1) as f64;
        Ok(super::EpochReport {
            metrics: loss,
            losses: vec![("training loss", Some(loss))],
            weights: Vec::new(),
            files: Vec::new(),
            line: format!("epoch {}: loss {loss:.4}", end.epoch),
        })
    }
}

/// What [`evaluate`] measured, per example in nats.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Evaluation {
    pub neg_elbo: f64,
    pub reconstruction: f64,
    /// The KL of each stochastic layer.
    pub kl_layers: Vec<f64>,
    /// -log p(x) by importance sampling with `iw_samples`, and its standard error.
    pub nll: f64,
    pub nll_stderr: f64,
    /// Per layer, the dimensions with Cov_x(E_q[u|x]) > 0.01.
    pub active_units: Vec<usize>,
    pub iw_samples: usize,
    pub n: usize,
}

/// Evaluates `model` on the first `limit` examples of `data` (one fixed binarization, seed 0,
/// in binarized modes): -ELBO and its parts from the K samples of the log p(x) estimate, the
/// NLL with its standard error, and the active units.
pub fn evaluate<M: LatentVariableModel + ?Sized>(
    model: &M,
    data: &Dataset,
    pixels: PixelMode,
    iw_samples: usize,
    limit: Option<usize>,
    seed: u64,
) -> Result<Evaluation> {
    crate::limits::at_least_one("importance samples", iw_samples)?;
    let n = limit.unwrap_or(data.len()).min(data.len());
    let layers = model.latent_dims().len();
    let (mut pixel_rng, mut noise) = (StdRng::seed_from_u64(0), Noise::new(seed));
    let mut means_noise = Noise::new(seed.wrapping_add(1));
    let (mut log_px, mut rec) = (Vec::new(), Vec::new());
    let mut kl = vec![Vec::new(); layers];
    let mut activity = vec![Activity::default(); layers];
    let idx: Vec<usize> = (0..n).collect();
    for chunk in idx.chunks(100) {
        let x = data.batch(chunk, pixels, &mut pixel_rng, model.device())?;
        let est = estimate_log_likelihood_candle(model, &x, iw_samples, 50_000, &mut noise)?;
        log_px.extend(est.log_px);
        rec.extend(est.reconstruction);
        for (acc, layer) in kl.iter_mut().zip(est.kl_layers) {
            acc.extend(layer);
        }
        for (acc, m) in activity
            .iter_mut()
            .zip(posterior_means(model, &x, 20, &mut means_noise)?)
        {
            acc.add(&m.flatten_all()?.to_vec1::<f32>()?, m.dim(1)?);
        }
    }
    let kl_layers: Vec<f64> = kl.iter().map(|v| mean(v)).collect();
    let reconstruction = -mean(&rec);
    Ok(Evaluation {
        neg_elbo: reconstruction + kl_layers.iter().sum::<f64>(),
        reconstruction,
        kl_layers,
        nll: -mean(&log_px),
        nll_stderr: standard_error(&log_px),
        active_units: activity.iter().map(|a| a.active(1e-2)).collect(),
        iw_samples,
        n,
    })
}
