//! Training the VAE family on the one loop ([`super::run_epochs`]): its batches (pixels and
//! noise), the negative (beta-)ELBO or IWAE_K on the engine's step, per-epoch train and test
//! metrics as JSON lines, an atomic checkpoint every epoch, resume, and pictures at the end.
//!
//! Files in the output folder (the first four are one commit per epoch, see [`crate::run_dir`]):
//! - `model.safetensors`: the weights under PyTorch `SimpleVAE.state_dict()` names;
//! - `train_state.safetensors`: Adam's moments, the step and the epochs done (for `--resume`);
//! - `metrics.jsonl`: one JSON object per epoch; `config.json`: the model and training config;
//! - `samples.png`, `reconstructions.png`, and `manifold.png` when the latent is 2-D.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::{derive_seed, state_counters, state_metadata};
use crate::checkpoint;
use crate::data::{Dataset, ImageShape, PixelMode, Source};
use crate::distributions::Noise;
pub use crate::engine::Engine;
use crate::engine::VaeObjective;
use crate::engine::vae::VaeBatch;
use crate::limits;
use crate::optim::{Adam, AdamConfig};
use crate::plot;
use crate::run_dir::{self, RunDir};
use crate::vae::{self, Init, Vae, VaeConfig};
pub use crate::vae::{KlEstimator, Objective};

/// Everything `elbo train vae` needs besides the model config.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub source: Source,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// How the learning rate changes over the epochs.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Adam's epsilon.
    #[serde(default = "default_adam_eps")]
    pub adam_eps: f64,
    /// How fresh parameters are drawn.
    #[serde(default)]
    pub init: Init,
    pub beta: f64,
    pub mc_samples: usize,
    /// What is maximised: the (beta-)ELBO, or the importance-weighted bound with K = mc_samples.
    #[serde(default)]
    pub objective: Objective,
    /// How the ELBO's top-layer KL is estimated (`--kl`; the IWAE's is always Monte Carlo).
    #[serde(default)]
    pub kl: KlEstimator,
    pub pixels: PixelMode,
    pub seed: u64,
    /// Which implementation computes the training steps.
    #[serde(default)]
    pub engine: Engine,
    /// Hold out the last N training examples as a validation split, evaluated with the test set.
    #[serde(default)]
    pub valid: Option<usize>,
    /// Evaluate the test (and validation) set every N epochs and at the last.
    #[serde(default = "one")]
    pub eval_every: usize,
    /// Use only the first N training examples (all when `None`; after `valid` is held out).
    pub train_limit: Option<usize>,
    /// Use only the first N test examples (all when `None`).
    pub test_limit: Option<usize>,
}

fn one() -> usize {
    1
}

fn default_adam_eps() -> f64 {
    1e-8
}

/// A learning-rate schedule over epochs.
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
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// `--lr` throughout.
    #[default]
    Constant,
    /// Burda et al. (2015): stage i = 0..7 lasts 3^i epochs at `--lr` x 10^(-i/7), the factor
    /// rounded to two digits as their code does (1, 0.72, 0.52, ..., 0.1): 3,280 epochs in all.
    IwaePaper,
}

impl LrSchedule {
    /// The learning rate of (1-based) `epoch` for base rate `lr`.
    pub fn lr(self, lr: f64, epoch: usize) -> f64 {
        match self {
            LrSchedule::Constant => lr,
            LrSchedule::IwaePaper => {
                let (mut end, mut stage) = (0usize, 0u32);
                loop {
                    end += 3usize.pow(stage);
                    if epoch <= end || stage == 7 {
                        break;
                    }
                    stage += 1;
                }
                // 1e-4 * round(10^(1 - i/7), 1) for a base of 1e-3.
                let factor = (10f64.powf(1.0 - stage as f64 / 7.0) * 10.0).round() / 100.0;
                lr * factor
            }
        }
    }

    /// The epochs the schedule is made for, if it has an end (3,280 for `iwae-paper`).
    pub fn epochs(self) -> Option<usize> {
        match self {
            LrSchedule::Constant => None,
            LrSchedule::IwaePaper => Some((0..8).map(|i| 3usize.pow(i)).sum()),
        }
    }
}

impl TrainConfig {
    /// The defaults of `elbo train vae` (10 epochs of batch 128, Adam at 1e-3, one sample of
    /// the ELBO, grey pixels, seed 0) on `source`.
    pub fn new(source: Source) -> Self {
        Self {
            source,
            epochs: 10,
            batch_size: 128,
            lr: 1e-3,
            lr_schedule: LrSchedule::Constant,
            adam_eps: default_adam_eps(),
            init: Init::Pytorch,
            beta: 1.0,
            mc_samples: 1,
            objective: Objective::Elbo,
            kl: KlEstimator::Analytic,
            pixels: PixelMode::Grey,
            seed: 0,
            engine: Engine::Auto,
            valid: None,
            eval_every: 1,
            train_limit: None,
            test_limit: None,
        }
    }

    /// The protocol of Burda, Grosse & Salakhutdinov (2015), Section 5, on `source`: batch 20,
    /// Adam with eps 1e-4 at 1e-3 x 10^(-i/7) for 3^i epochs, i = 0..7 (3,280 epochs), Glorot
    /// initialisation, pixels binarized by a fresh Bernoulli draw, the test set evaluated every
    /// 10 epochs. `elbo train vae --preset iwae-paper` starts from this.
    pub fn iwae_paper(source: Source) -> Self {
        Self {
            epochs: LrSchedule::IwaePaper.epochs().unwrap_or(1),
            batch_size: 20,
            lr_schedule: LrSchedule::IwaePaper,
            adam_eps: 1e-4,
            init: Init::Glorot,
            pixels: PixelMode::Dynamic,
            eval_every: 10,
            ..Self::new(source)
        }
    }

    pub fn validate(&self) -> Result<()> {
        limits::count("--epochs", self.epochs, 1_000_000)?;
        limits::count("--batch-size", self.batch_size, 1_000_000)?;
        limits::count("--mc-samples", self.mc_samples, 100_000)?;
        limits::count("--eval-every", self.eval_every, limits::COUNT_CEILING)?;
        let ceiling = limits::COUNT_CEILING;
        limits::count("--train-limit", self.train_limit.unwrap_or(1), ceiling)?;
        limits::count("--test-limit", self.test_limit.unwrap_or(1), ceiling)?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            bail!(
                "--adam-eps must be a positive number, got {}",
                self.adam_eps
            );
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            bail!("--beta must be a non-negative number, got {}", self.beta);
        }
        if self.kl == KlEstimator::MonteCarlo && self.objective != Objective::Elbo {
            bail!("--kl mc applies to --objective elbo (the IWAE bound is all Monte Carlo)");
        }
        Ok(())
    }
}

/// Per-example averages in nats: `reconstruction = -E_q[log p(x|z_1)]`, `kl = sum_l KL_l`,
/// `neg_elbo = reconstruction + kl`, and with more than one stochastic layer each `KL_l`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Terms {
    pub neg_elbo: f64,
    pub reconstruction: f64,
    pub kl: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kl_layers: Vec<f64>,
}

impl Terms {
    /// Per-example averages from sums over `n` examples (`kl_layers`: one sum per layer; kept
    /// only when there are several).
    pub fn from_sums(reconstruction: f64, kl_layers: &[f64], n: usize) -> Self {
        let n = n.max(1) as f64;
        let kl: f64 = kl_layers.iter().sum();
        Self {
            neg_elbo: (reconstruction + kl) / n,
            reconstruction: reconstruction / n,
            kl: kl / n,
            kl_layers: if kl_layers.len() > 1 {
                kl_layers.iter().map(|k| k / n).collect()
            } else {
                Vec::new()
            },
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train: Terms,
    /// The held-out part of the training set (`--valid N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid: Option<Terms>,
    /// The test set's terms (every `eval_every` epochs and at the last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<Terms>,
    /// The learning rate of the epoch.
    #[serde(default)]
    pub lr: f64,
    pub seconds: f64,
}

const STREAM_TEST: u64 = 2;
const STREAM_PICTURES: u64 = 3;

/// ELBO terms of a whole data set (per-example means), with a frozen model. Binarized pixel
/// modes draw one fixed binarization (seed 0) of the set, the same every epoch (the protocol of
/// Burda et al. 2015 for test and validation sets). Chunk j of 500 examples draws its noise
/// from `derive_seed(seed, 5, j)`; with several ranks ([`crate::collective`]) each evaluates its
/// share of the chunks and the sums are added over the ranks, so N ranks report what one
/// process reports. With `engine` `xla` the passes run on the XLA engine (the model's own
/// training engine), else on the fused engine where it applies.
pub fn evaluate_elbo(
    vae: &Vae,
    data: &Dataset,
    pixels: PixelMode,
    mc_samples: usize,
    seed: u64,
    engine: Engine,
) -> Result<Terms> {
    let frozen = vae.frozen()?;
    let engine = if engine == Engine::Xla {
        Engine::Xla
    } else {
        Engine::Auto
    };
    let mut estimator = crate::engine::LikelihoodEstimator::new(&frozen, engine)?;
    let mut pixel_rng = StdRng::seed_from_u64(0); // a fixed binarization of the test set
    let layers = vae.config.layers();
    // [reconstruction, KL of each layer], summed over examples and then over ranks.
    let mut sums = vec![0.0; 1 + layers];
    let idx: Vec<usize> = (0..data.len()).collect();
    let chunks: Vec<&[usize]> = idx.chunks(500).collect();
    let mine = crate::collective::my_shard(chunks.len());
    for (j, chunk) in chunks.iter().enumerate() {
        // Every rank draws every chunk's pixels, so the binarization is one process's.
        let values = data.batch_values(chunk, pixels, &mut pixel_rng);
        if !mine.contains(&j) {
            continue;
        }
        let x = Tensor::from_vec(values, (chunk.len(), data.shape.dim()), vae.device())?;
        let mut noise = Noise::new(derive_seed(seed, 5, j as u64));
        // The K-sample ELBO's parts are those of the log p(x) estimate's pass (the same noise
        // as `elbo_terms`), on the fused engine where it applies.
        let est = estimator.estimate(&x, mc_samples, 1 << 20, &mut noise)?;
        sums[0] -= est.reconstruction.iter().sum::<f64>();
        for (sum, layer) in sums[1..].iter_mut().zip(&est.kl_layers) {
            *sum += layer.iter().sum::<f64>();
        }
    }
    crate::collective::world().all_reduce_sum_f64(&mut sums)?;
    Ok(Terms::from_sums(sums[0], &sums[1..], data.len()))
}

/// How a run starts: rank 0's run folder (when it writes one), the model, the training state
/// it continues from (`None`: a fresh run) and the epochs done.
struct Start {
    run: Option<RunDir>,
    vae: Vae,
    state: Option<checkpoint::Loaded>,
    epoch: usize,
    step: u64,
}

/// Rank 0 opens the run (`resume`: from its last commit; else a fresh folder and a fresh
/// model); with several ranks ([`crate::collective`]) the others receive its model and state.
fn start_vae(
    model_config: &VaeConfig,
    config: &TrainConfig,
    train: &Dataset,
    dir: &Path,
    resume: bool,
    device: &Device,
) -> Result<Start> {
    let set_up = || -> Result<Start> {
        if !resume {
            let run = RunDir::create(dir)?;
            let bias = (config.init == Init::Glorot).then(|| train_mean_logits(train));
            let mut noise = Noise::new(config.seed);
            let vae = Vae::initialised(
                model_config.clone(),
                config.init,
                bias.as_deref(),
                &mut noise,
                device,
            )?;
            return Ok(Start {
                run: Some(run),
                vae,
                state: None,
                epoch: 0,
                step: 0,
            });
        }
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
        if vae.config != *model_config {
            eprintln!(
                "note: --resume uses the model config stored in {}",
                model_path.display()
            );
        }
        let state_path = committed.file(run_dir::STATE);
        let state = checkpoint::load(&state_path, device)?;
        let (epoch, step) = state_counters(&state, &state_path, &committed)?;
        Ok(Start {
            run: Some(run),
            vae,
            state: Some(state),
            epoch,
            step,
        })
    };
    let world = crate::collective::world();
    if world.world_size() == 1 {
        return set_up();
    }
    // Rank 0's (model, state) bytes to every rank; every rank decodes them, so all hold the
    // same parameters and optimiser state.
    let mine = if world.rank() == 0 {
        Some(set_up()?)
    } else {
        None
    };
    let given = match &mine {
        Some(s) => {
            let tensors: Vec<(String, Tensor)> = match &s.state {
                Some(state) => state.tensors.clone().into_iter().collect(),
                None => Vec::new(),
            };
            let state = checkpoint::serialize(&tensors, state_metadata(s.epoch, s.step))?;
            Some((s.vae.to_safetensors()?, state, s.epoch as u64, s.step))
        }
        None => None,
    };
    let (model, state, epoch, step) = super::share_state(given)?;
    let here = Path::new("(rank 0's state)");
    let vae = Vae::from_loaded(checkpoint::decode(&model, here, device)?, here)?;
    let state = checkpoint::decode(&state, here, device)?;
    Ok(Start {
        run: mine.and_then(|m| m.run),
        vae,
        state: (!state.tensors.is_empty()).then_some(state),
        epoch: epoch as usize,
        step,
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

    // Data parallelism (crate::collective): rank 0 sets the run up and alone writes to it.
    let world = crate::collective::world();
    let main = world.rank() == 0;
    let show_progress = show_progress && main;
    let Start {
        mut run,
        vae,
        state,
        epoch: start_epoch,
        step,
    } = start_vae(&model_config, config, &train, dir, resume, device)?;
    if config.epochs <= start_epoch {
        bail!(
            "--epochs {}: the run in {} has done {start_epoch} epochs already; give a larger --epochs to continue it",
            config.epochs,
            dir.display()
        );
    }
    let objective = VaeObjective {
        objective: config.objective,
        kl: config.kl,
        beta: config.beta,
    };
    let (mut step_engine, engine_name) = crate::engine::vae_step(config.engine, &vae, objective)?;
    let mut adam = Adam::new(step_engine.table().clone(), adam_config(config));
    if let Some(state) = &state {
        let state_path = dir.join(run_dir::STATE);
        adam.load_state(&state.tensors, step)
            .with_context(|| format!("{}: cannot restore the optimizer", state_path.display()))?;
    }
    if show_progress {
        eprintln!(
            "training VAE {} on {} ({} train, {} test) for {} epochs -> {}",
            vae.config.describe(),
            config.source.describe(),
            train.len(),
            test.len(),
            config.epochs,
            dir.display()
        );
        eprintln!("engine: {engine_name}");
        if world.world_size() > 1 {
            eprintln!(
                "data parallel: {} ranks ({}), global batch {}",
                world.world_size(),
                world.name(),
                config.batch_size
            );
        }
    }
    let data = serde_json::json!({
        "source": config.source.describe(),
        "shape": train.shape.to_string(),
        "train": train.len(),
        "valid": valid.as_ref().map(Dataset::len),
        "test": test.len(),
    });
    let run_config = serde_json::to_string_pretty(
        &serde_json::json!({ "model": vae.config, "train": config, "data": data }),
    )?;
    let mut family = VaeTraining {
        config,
        vae: &vae,
        train: &train,
        valid: valid.as_ref(),
        test: &test,
        run_config,
        dir,
        evaluated: false,
    };
    let mut params = step_engine.read_params()?;
    let all = super::run_epochs(
        &mut family,
        step_engine.as_mut(),
        &mut params,
        &mut adam,
        super::LoopOptions {
            dir: Some(dir),
            run: run.as_mut(),
            seed: config.seed,
            start_epoch,
            epochs: config.epochs,
            show_progress,
        },
    )?;
    if main {
        save_pictures(&vae, &test, config.pixels, dir, config.seed)?;
        super::write_report(dir, show_progress);
    }
    Ok(all)
}

/// The VAE family in the one training loop: batches of pixels and noise, the ELBO's terms on
/// the test and validation sets, the model and Adam's state committed every epoch.
struct VaeTraining<'a> {
    config: &'a TrainConfig,
    /// The model the step trains (the fused engine's parameters are written into it at the end
    /// of each epoch).
    vae: &'a Vae,
    train: &'a Dataset,
    valid: Option<&'a Dataset>,
    test: &'a Dataset,
    run_config: String,
    dir: &'a Path,
    /// Whether the last epoch evaluated the test set (and draws its samples).
    evaluated: bool,
}

impl super::Family for VaeTraining<'_> {
    type Batch = VaeBatch;
    type Metrics = EpochMetrics;

    fn batches(&self, rng: &mut StdRng) -> Vec<Vec<usize>> {
        super::shuffled_batches(self.train.len(), self.config.batch_size, rng)
    }

    fn batch(
        &self,
        idx: &[usize],
        rng: &mut StdRng,
        noise: &mut Noise,
    ) -> Result<(VaeBatch, usize)> {
        // Every rank draws the global batch's pixels and noise; it runs its rows.
        let x = self.train.batch_values(idx, self.config.pixels, rng);
        let (d, latents) = (self.vae.config.input_dim, &self.vae.config.latent_dims);
        let batch = VaeBatch::draw(x, d, latents, self.config.mc_samples, noise);
        Ok((batch, idx.len()))
    }

    fn lr(&self, epoch: usize) -> f64 {
        self.config.lr_schedule.lr(self.config.lr, epoch)
    }

    fn end_epoch(&mut self, end: &super::EpochEnd<'_>) -> Result<super::EpochReport<EpochMetrics>> {
        let config = self.config;
        end.table.write_named(end.params, self.vae.params())?;
        // The step's sums: engine::vae::VAE_SUMS.
        let rec = -end.sums.get(2).copied().unwrap_or(0.0);
        let kl_layers = end.sums.get(3..).unwrap_or(&[]);
        let train = Terms::from_sums(rec, kl_layers, self.train.len());
        let epoch = end.epoch;
        self.evaluated = epoch.is_multiple_of(config.eval_every.max(1)) || epoch == config.epochs;
        let evaluate = |data: &Dataset| -> Result<Terms> {
            let seed = derive_seed(config.seed, STREAM_TEST, 0);
            evaluate_elbo(
                self.vae,
                data,
                config.pixels,
                config.mc_samples,
                seed,
                config.engine,
            )
        };
        let test = self.evaluated.then(|| evaluate(self.test)).transpose()?;
        let valid = match self.valid {
            Some(v) if self.evaluated => Some(evaluate(v)?),
            _ => None,
        };
        let metrics = EpochMetrics {
            epoch,
            train,
            valid,
            test,
            lr: end.lr,
            seconds: end.started.elapsed().as_secs_f64(),
        };
        let files = if end.commit {
            let (state_tensors, step) = end.adam.state()?;
            let state = checkpoint::serialize(&state_tensors, state_metadata(epoch, step))?;
            vec![
                (run_dir::MODEL, self.vae.to_safetensors()?),
                (run_dir::STATE, state),
                (run_dir::CONFIG, self.run_config.clone().into_bytes()),
            ]
        } else {
            Vec::new()
        };
        Ok(super::EpochReport {
            losses: vec![
                ("train -ELBO", Some(metrics.train.neg_elbo)),
                ("test -ELBO", metrics.test.as_ref().map(|t| t.neg_elbo)),
                (
                    "validation -ELBO",
                    metrics.valid.as_ref().map(|t| t.neg_elbo),
                ),
            ],
            weights: Vec::new(),
            files,
            line: epoch_line(&metrics),
            metrics,
        })
    }

    fn after_commit(&mut self, epoch: usize, _params: &[f32]) -> Result<()> {
        if self.evaluated {
            save_epoch_samples(self.vae, self.dir, epoch, self.config.seed)?;
        }
        Ok(())
    }
}

/// The progress line of an epoch.
fn epoch_line(m: &EpochMetrics) -> String {
    let valid = m.valid.as_ref().map_or(String::new(), |v| {
        format!("valid -ELBO {:.2} | ", v.neg_elbo)
    });
    let test = m.test.as_ref().map_or(String::new(), |t| {
        format!(
            "test -ELBO {:.2} (rec {:.2}, KL {:.2}) | ",
            t.neg_elbo, t.reconstruction, t.kl
        )
    });
    let t = &m.train;
    format!(
        "epoch {}: train -ELBO {:.2} (rec {:.2}, KL {:.2}) | {valid}{test}lr {:.2e} | {:.1}s",
        m.epoch, t.neg_elbo, t.reconstruction, t.kl, m.lr, m.seconds
    )
}

/// `pictures/samples-NNNNNN.png`: 16 samples decoded from the same z every epoch (kept small,
/// as pytorch/examples' VAE does), for the report's view of training.
pub fn save_epoch_samples(vae: &Vae, dir: &Path, epoch: usize, seed: u64) -> Result<()> {
    let Some(shape) = vae.config.image_shape() else {
        return Ok(());
    };
    let frozen = vae.frozen()?;
    let mut noise = Noise::new(derive_seed(seed, STREAM_PICTURES, 1));
    // save_grid creates the folder and writes through a temporary file.
    let path = dir
        .join(crate::report::PICTURES_DIR)
        .join(format!("samples-{epoch:06}.png"));
    plot::save_grid(
        &vae::sample_prior(&frozen, 16, &mut noise)?,
        shape,
        8,
        &path,
    )
}

/// Adam as the run asks for it (`--lr`, `--adam-eps`, PyTorch's betas).
fn adam_config(config: &TrainConfig) -> AdamConfig {
    AdamConfig {
        eps: config.adam_eps,
        ..AdamConfig::with_lr(config.lr)
    }
}

/// The logits of the training set's mean pixel, clipped to [0.001, 0.999]: the initial
/// output bias of p(x|z_1) under [`Init::Glorot`] (Burda et al.'s code).
pub fn train_mean_logits(train: &Dataset) -> Vec<f32> {
    let d = train.shape.dim();
    let mut sums = vec![0f64; d];
    for image in train.images.chunks(d) {
        for (s, &p) in sums.iter_mut().zip(image) {
            *s += p as f64 / 255.0;
        }
    }
    sums.iter()
        .map(|s| {
            let m = (s / train.len().max(1) as f64).clamp(0.001, 0.999);
            (m / (1.0 - m)).ln() as f32
        })
        .collect()
}

/// Refuses, before anything is allocated, a training step or test pass whose activations
/// (K samples of every example in a batch, forward and backward) exceed the memory budget.
fn check_step_memory(model: &VaeConfig, config: &TrainConfig, n_train: usize) -> Result<()> {
    // Per sample row, f32: every layer's pre-activation, output and gradient (3 per unit of
    // every MLP), the input and its gradient (2 D), and mu, log_var, eps, z per latent unit.
    // Test batches are 500 examples. (The sizes were validated, so these sums fit in u64.)
    let units: u64 = model
        .hidden
        .iter()
        .flatten()
        .map(|&w| 2 * w as u64)
        .chain(model.latent_dims.iter().map(|&l| 8 * l as u64))
        .sum();
    let row = units
        .checked_mul(3)
        .and_then(|u| u.checked_add((model.input_dim as u64).checked_mul(4)?));
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
    if vae.config.latent_dims == [2] {
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

#[cfg(test)]
mod tests {
    use super::LrSchedule;

    /// Burda et al.'s schedule as their code computes it: stage i = 0..7 lasts 3^i epochs at
    /// 1e-4 * round(10^(1 - i/7), 1), 3,280 epochs in all.
    #[test]
    fn iwae_paper_schedule() {
        let s = LrSchedule::IwaePaper;
        let want = [1e-3, 7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4];
        let mut first = 1;
        for (i, w) in want.iter().enumerate() {
            let last = first + 3usize.pow(i as u32) - 1;
            for e in [first, last] {
                assert!(
                    (s.lr(1e-3, e) - w).abs() < 1e-12,
                    "epoch {e}: {} vs {w}",
                    s.lr(1e-3, e)
                );
            }
            first = last + 1;
        }
        assert_eq!(first - 1, 3280);
        assert_eq!(s.epochs(), Some(3280));
        assert_eq!(LrSchedule::Constant.lr(3e-4, 77), 3e-4);
    }
}
