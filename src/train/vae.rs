//! The VAE training loop: Adam on the negative (beta-)ELBO, per-epoch train and test metrics
//! as JSON lines, an atomic checkpoint every epoch, resume, and pictures at the end.
//!
//! Files in the output folder (the first four are one commit per epoch, see [`crate::run_dir`]):
//! - `model.safetensors`: the weights under PyTorch `SimpleVAE.state_dict()` names;
//! - `train_state.safetensors`: Adam's moments, the step and the epochs done (for `--resume`);
//! - `metrics.jsonl`: one JSON object per epoch; `config.json`: the model and training config;
//! - `samples.png`, `reconstructions.png`, and `manifold.png` when the latent is 2-D.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::{derive_seed, state_counters, state_metadata};
use crate::checkpoint;
use crate::data::{Dataset, ImageShape, PixelMode, Source};
use crate::distributions::Noise;
pub use crate::engine::Engine;
use crate::limits;
use crate::optim::{Adam, AdamConfig};
use crate::plot;
use crate::run_dir::{self, RunDir};
use crate::vae::fused::FusedVae;
use crate::vae::{self, Vae, VaeConfig, elbo_terms};

/// Everything `elbo train vae` needs besides the model config.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub source: Source,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub beta: f64,
    pub mc_samples: usize,
    /// What is maximised: the (beta-)ELBO, or the importance-weighted bound with K = mc_samples.
    #[serde(default)]
    pub objective: Objective,
    pub pixels: PixelMode,
    pub seed: u64,
    /// Which implementation computes the training steps.
    #[serde(default)]
    pub engine: Engine,
    /// Hold out the last N training examples as a validation split, evaluated every epoch.
    #[serde(default)]
    pub valid: Option<usize>,
    /// Use only the first N training examples (all when `None`; after `valid` is held out).
    pub train_limit: Option<usize>,
    /// Use only the first N test examples (all when `None`).
    pub test_limit: Option<usize>,
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        limits::at_least_one("--epochs", self.epochs)?;
        limits::at_least_one("--batch-size", self.batch_size)?;
        limits::at_least_one("--mc-samples", self.mc_samples)?;
        limits::at_least_one("--train-limit", self.train_limit.unwrap_or(1))?;
        limits::at_least_one("--test-limit", self.test_limit.unwrap_or(1))?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            bail!("--beta must be a non-negative number, got {}", self.beta);
        }
        Ok(())
    }
}

/// The training objective.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// `E_q[log p(x|z)] - beta KL(q || p)`, K-sample Monte Carlo (Kingma & Welling 2014).
    #[default]
    Elbo,
    /// `log (1/K) sum_k w_k`, the IWAE bound (Burda et al. 2015); beta is not used.
    Iwae,
}

/// Per-example averages in nats: `reconstruction = -E_q[log p(x|z)]`, `kl = KL(q || p)`,
/// `neg_elbo = reconstruction + kl`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Terms {
    pub neg_elbo: f64,
    pub reconstruction: f64,
    pub kl: f64,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train: Terms,
    /// The held-out part of the training set (`--valid N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid: Option<Terms>,
    pub test: Terms,
    pub seconds: f64,
}

const STREAM_EPOCH: u64 = 1;
const STREAM_TEST: u64 = 2;
const STREAM_PICTURES: u64 = 3;

/// ELBO terms of a whole data set (per-example means), with a frozen model. Binarized pixel
/// modes draw one fixed binarization (seed 0) of the set, the same every epoch (the protocol of
/// Burda et al. 2015 for test and validation sets).
pub fn evaluate_elbo(
    vae: &Vae,
    data: &Dataset,
    pixels: PixelMode,
    mc_samples: usize,
    seed: u64,
) -> Result<Terms> {
    let frozen = vae.frozen()?;
    let mut pixel_rng = StdRng::seed_from_u64(0); // a fixed binarization of the test set
    let mut noise = Noise::new(seed);
    let (mut rec, mut kl) = (0.0, 0.0);
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(500) {
        let x = data.batch(chunk, pixels, &mut pixel_rng, vae.device())?;
        let t = elbo_terms(&frozen, &x, mc_samples, &mut noise)?;
        rec -= vae::objective::sum_f64(&t.reconstruction)?;
        kl += vae::objective::sum_f64(&t.kl)?;
    }
    let n = data.len() as f64;
    Ok(Terms {
        neg_elbo: (rec + kl) / n,
        reconstruction: rec / n,
        kl: kl / n,
    })
}

/// Trains (or, with `resume`, continues) a VAE in `dir`; returns the metrics of the epochs run.
/// The model's `input_dim` and `image_shape` are taken from the data (C x H x W).
pub fn train_vae(
    model_config: VaeConfig,
    config: &TrainConfig,
    dir: &Path,
    resume: bool,
    show_progress: bool,
    device: &Device,
) -> Result<Vec<EpochMetrics>> {
    config.validate()?;
    let (train, valid, test) = super::load_splits(
        &config.source,
        config.valid,
        config.train_limit,
        config.test_limit,
    )?;
    // The model's input shape is the data's.
    let mut model_config = model_config;
    model_config.input_dim = train.shape.dim();
    model_config.image_shape = Some(train.shape);
    model_config.validate()?;
    check_step_memory(&model_config, config, train.len())?;

    let (mut run, vae, mut adam, start_epoch) = if resume {
        let (run, committed) = RunDir::resume(dir)?;
        let model_path = committed.file(run_dir::MODEL);
        let vae = Vae::load(&model_path, device)?;
        if vae.config.input_dim != train.shape.dim() {
            bail!(
                "--resume: the run's model takes {} values per example but the data's images are {} ({} values)",
                vae.config.input_dim,
                train.shape,
                train.shape.dim()
            );
        }
        if vae.config != model_config {
            eprintln!(
                "note: --resume uses the model config stored in {}",
                model_path.display()
            );
        }
        let state_path = committed.file(run_dir::STATE);
        let state = checkpoint::load(&state_path, device)?;
        let (epoch, step) = state_counters(&state, &state_path, &committed)?;
        let mut adam = Adam::new(vae.params().to_vec(), AdamConfig::with_lr(config.lr))?;
        adam.load_state(&state.tensors, step)
            .with_context(|| format!("{}: cannot restore the optimizer", state_path.display()))?;
        (run, vae, adam, epoch)
    } else {
        let run = RunDir::create(dir)?;
        let vae = Vae::new(model_config, &mut Noise::new(config.seed), device)?;
        let adam = Adam::new(vae.params().to_vec(), AdamConfig::with_lr(config.lr))?;
        (run, vae, adam, 0)
    };
    if config.epochs <= start_epoch {
        bail!(
            "--epochs {}: the run in {} has done {start_epoch} epochs already; give a larger --epochs to continue it",
            config.epochs,
            dir.display()
        );
    }
    if show_progress {
        eprintln!(
            "training VAE {}-{}-{} on {} ({} train, {} test) for {} epochs -> {}",
            vae.config.input_dim,
            vae.config.hidden_dim,
            vae.config.latent_dim,
            config.source.describe(),
            train.len(),
            test.len(),
            config.epochs,
            dir.display()
        );
    }
    let run_config =
        serde_json::to_string_pretty(&serde_json::json!({ "model": vae.config, "train": config }))?;

    let (use_fused, engine_name) =
        crate::engine::vae_training(config.engine, &vae, config.objective == Objective::Elbo)?;
    if show_progress {
        eprintln!("engine: {engine_name}");
    }
    let n = train.len();
    let steps_per_epoch = n.div_ceil(config.batch_size);
    let mut all = Vec::new();
    for epoch in start_epoch + 1..=config.epochs {
        let started = Instant::now();
        let mut rng = StdRng::seed_from_u64(derive_seed(config.seed, STREAM_EPOCH, epoch as u64));
        let mut noise =
            Noise::new(derive_seed(config.seed, STREAM_EPOCH, epoch as u64).wrapping_add(1));
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        let bar = super::epoch_bar(steps_per_epoch, epoch, config.epochs, show_progress);
        let (mut rec_sum, mut kl_sum) = (0.0, 0.0);
        let mut fused = if use_fused {
            Some(FusedVae::from_vae(&vae, Some(&adam), adam.config)?)
        } else {
            None
        };
        for (step, batch_idx) in order.chunks(config.batch_size).enumerate() {
            let stopped = |bar: &ProgressBar, loss_value: f64| -> anyhow::Error {
                bar.abandon();
                let kept = if run.last_epoch() > 0 {
                    format!(
                        "the last good checkpoint {} (epoch {}) is kept",
                        dir.join(run_dir::MODEL).display(),
                        run.last_epoch()
                    )
                } else {
                    "no checkpoint had been written yet".to_string()
                };
                anyhow::anyhow!(
                    "training stopped: the loss became {loss_value} at epoch {epoch}, step {}; {kept} \
                     (try a smaller --lr)",
                    step + 1
                )
            };
            if let Some(fused) = fused.as_mut() {
                let x = train.batch_values(batch_idx, config.pixels, &mut rng);
                let sums = fused.train_step(&x, config.mc_samples, config.beta, &mut noise)?;
                if !sums.loss.is_finite() {
                    return Err(stopped(&bar, sums.loss));
                }
                rec_sum -= sums.reconstruction;
                kl_sum += sums.kl;
                bar.set_message(format!("loss {:.2}", sums.loss));
                bar.inc(1);
                continue;
            }
            let x = train.batch(batch_idx, config.pixels, &mut rng, device)?;
            let (terms, loss) = match config.objective {
                Objective::Elbo => {
                    let terms = elbo_terms(&vae, &x, config.mc_samples, &mut noise)?;
                    let loss = terms.loss(config.beta)?;
                    (terms, loss)
                }
                Objective::Iwae => {
                    let (terms, iwae) =
                        vae::objective::iwae_terms(&vae, &x, config.mc_samples, &mut noise)?;
                    (terms, iwae.mean_all()?.neg()?)
                }
            };
            let loss_value = loss.to_scalar::<f32>()?;
            if !loss_value.is_finite() {
                return Err(stopped(&bar, loss_value as f64));
            }
            let grads = loss.backward()?;
            adam.step(&grads)?;
            rec_sum -= vae::objective::sum_f64(&terms.reconstruction.detach())?;
            kl_sum += vae::objective::sum_f64(&terms.kl.detach())?;
            bar.set_message(format!("loss {loss_value:.2}"));
            bar.inc(1);
        }
        bar.finish_and_clear();
        if let Some(fused) = &fused {
            fused.write_to(&vae, Some(&mut adam))?;
        }
        let train_terms = Terms {
            neg_elbo: (rec_sum + kl_sum) / n as f64,
            reconstruction: rec_sum / n as f64,
            kl: kl_sum / n as f64,
        };
        let test_terms = evaluate_elbo(
            &vae,
            &test,
            config.pixels,
            config.mc_samples,
            derive_seed(config.seed, STREAM_TEST, 0),
        )?;
        let valid_terms = match &valid {
            Some(v) => Some(evaluate_elbo(
                &vae,
                v,
                config.pixels,
                config.mc_samples,
                derive_seed(config.seed, STREAM_TEST, 0),
            )?),
            None => None,
        };
        let metrics = EpochMetrics {
            epoch,
            train: train_terms,
            valid: valid_terms,
            test: test_terms,
            seconds: started.elapsed().as_secs_f64(),
        };
        let (state_tensors, step) = adam.state();
        let state = checkpoint::serialize(&state_tensors, state_metadata(epoch, step))?;
        run.commit(
            epoch,
            step,
            &[
                (run_dir::MODEL, &vae.to_safetensors()?),
                (run_dir::STATE, &state),
                (run_dir::CONFIG, run_config.as_bytes()),
            ],
            &serde_json::to_string(&metrics)?,
        )?;
        if show_progress {
            let valid = valid_terms.map_or(String::new(), |v| {
                format!("valid -ELBO {:.2} | ", v.neg_elbo)
            });
            eprintln!(
                "epoch {epoch}: train -ELBO {:.2} (rec {:.2}, KL {:.2}) | {valid}test -ELBO {:.2} (rec {:.2}, KL {:.2}) | {:.1}s",
                train_terms.neg_elbo,
                train_terms.reconstruction,
                train_terms.kl,
                test_terms.neg_elbo,
                test_terms.reconstruction,
                test_terms.kl,
                metrics.seconds
            );
        }
        all.push(metrics);
    }
    save_pictures(&vae, &test, config.pixels, dir, config.seed)?;
    Ok(all)
}

/// Refuses, before anything is allocated, a training step or test pass whose activations
/// (K samples of every example in a batch, forward and backward) exceed the memory budget.
fn check_step_memory(model: &VaeConfig, config: &TrainConfig, n_train: usize) -> Result<()> {
    let (i, h, l) = (
        model.input_dim as u64,
        model.hidden_dim as u64,
        model.latent_dim as u64,
    );
    // Per sample row: logits and their gradient (2i), three hidden layers and their gradients
    // (6h), mu, log_var, eps, z (4l); f32. Test batches are 500 examples.
    let row = [i.checked_mul(2), h.checked_mul(6), l.checked_mul(4)]
        .into_iter()
        .try_fold(0u64, |acc, t| acc.checked_add(t?));
    let examples = config.batch_size.min(n_train.max(1)).max(500) as u64;
    let bytes = row.and_then(|r| limits::product(&[r, examples, config.mc_samples as u64, 4]));
    limits::check_bytes(
        &format!(
            "--mc-samples {} with --batch-size {}",
            config.mc_samples, config.batch_size
        ),
        "one training step",
        bytes,
    )
}

/// `samples.png` (64 prior samples), `reconstructions.png` (rows alternate 8 test digits and
/// their reconstructions) and, for a 2-D latent, `manifold.png`.
pub fn save_pictures(
    vae: &Vae,
    test: &Dataset,
    pixels: PixelMode,
    dir: &Path,
    seed: u64,
) -> Result<()> {
    let frozen = vae.frozen()?;
    let shape = image_shape(vae)?;
    let mut noise = Noise::new(derive_seed(seed, STREAM_PICTURES, 0));
    plot::save_grid(
        &vae::sample_prior(&frozen, 64, &mut noise)?,
        shape,
        8,
        &dir.join("samples.png"),
    )?;
    save_reconstructions(&frozen, test, pixels, 32, &dir.join("reconstructions.png"))?;
    if vae.config.latent_dim == 2 {
        plot::save_grid(
            &manifold(&frozen, 20)?,
            shape,
            20,
            &dir.join("manifold.png"),
        )?;
    }
    Ok(())
}

/// Rows alternate `8` originals and their reconstructions from the posterior mean.
pub fn save_reconstructions(
    vae: &Vae,
    data: &Dataset,
    pixels: PixelMode,
    n: usize,
    path: &Path,
) -> Result<()> {
    let n = n.min(data.len());
    let idx: Vec<usize> = (0..n).collect();
    let x = data.batch(&idx, pixels, &mut StdRng::seed_from_u64(0), vae.device())?;
    let recon = vae::reconstruct(vae, &x)?;
    let mut rows = Vec::new();
    for start in (0..n).step_by(8) {
        let len = 8.min(n - start);
        rows.push(x.narrow(0, start, len)?);
        rows.push(recon.narrow(0, start, len)?);
    }
    plot::save_grid(&Tensor::cat(&rows, 0)?, image_shape(vae)?, 8, path)
}

/// The shape of the images a VAE models (for its picture grids).
pub fn image_shape(vae: &Vae) -> Result<ImageShape> {
    vae.config.image_shape().with_context(|| {
        format!(
            "the model's input ({} values) has no image shape to draw",
            vae.config.input_dim
        )
    })
}

/// Decoded means over a `side x side` grid of z in [-2.5, 2.5]^2 (2-D latents only).
pub fn manifold(vae: &Vae, side: usize) -> Result<Tensor> {
    let step = 5.0 / (side.max(2) - 1) as f32;
    let mut z = Vec::with_capacity(side * side * 2);
    for r in 0..side {
        for c in 0..side {
            z.push(-2.5 + c as f32 * step);
            z.push(2.5 - r as f32 * step);
        }
    }
    let z = Tensor::from_vec(z, (side * side, 2), vae.device())?;
    vae.mean_from_logits(&vae.decode(&z)?)
}
