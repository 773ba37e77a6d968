//! Training a diffusion model with the simplified loss ([`crate::diffusion::objective`]) on
//! the one loop ([`super::run_epochs`]): its batches (x_t, t, target), an exponential moving
//! average (EMA) of the weights used for sampling and evaluation, per-epoch metrics, one
//! atomic commit per epoch, resume, pictures.
//!
//! Files: `model.safetensors` (EMA weights + the model config as metadata),
//! `train_state.safetensors` (raw weights `raw.*`, Adam state, epoch), `metrics.jsonl`,
//! `samples.png` (images) or `samples.png` scatter of data vs samples (2-D toys).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_nn::VarMap;
use indicatif::ProgressBar;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::derive_seed;
use crate::checkpoint;
use crate::data::toy::Toy;
use crate::data::{Dataset, ImageShape, Named, Source};
use crate::diffusion::learned::{LearnedHead, LossAwareSampler, TrainLoss};
use crate::diffusion::model::{DiffusionConfig, image_batch, model_config};
use crate::diffusion::nets::{Net, NetConfig, sorted_vars};
use crate::diffusion::objective::{loss_inputs_at, simple_loss, simple_loss_inputs};
use crate::diffusion::process::{Denoiser, GaussianDiffusion};
use crate::diffusion::sampler::ddim_sample;
use crate::diffusion::vdm::ContinuousModel;
use crate::distributions::Noise;
use crate::engine::vdm::{ContinuousStep, DiffusionBatch, Discrete, continuous_batch};
use crate::engine::{DenoiseBatch, Engine, FrozenNet, TrainStep};
use crate::optim::{Adam, AdamConfig, ParamTable};
use crate::plot::save_signed_image_grid as save_image_grid;
use crate::run_dir::{self, RunDir};

/// What a diffusion model is trained on.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum DiffusionData {
    /// Images scaled to [-1, 1], `[B, C, H, W]`.
    Images(Source),
    /// 2-D points, `[B, 2]`.
    Toy(Toy),
}

impl DiffusionData {
    /// `--data PATH` wins; `--dataset` takes a named image set (`mnist-10k`, `mnist`,
    /// `fashion-mnist`, `cifar10`, `cifar100`) or `toy:NAME`.
    pub fn from_flags(dataset: Option<&str>, data: Option<&Path>) -> Result<Self> {
        if let Some(path) = data {
            return Ok(DiffusionData::Images(Source::Dir(path.to_path_buf())));
        }
        let name = dataset.unwrap_or("mnist-10k");
        if let Ok(named) = <Named as clap::ValueEnum>::from_str(name, false) {
            return Ok(DiffusionData::Images(Source::Named(named)));
        }
        match name.strip_prefix("toy:").and_then(Toy::parse) {
            Some(t) => Ok(DiffusionData::Toy(t)),
            None => bail!(
                "--dataset {name}: expected mnist-10k, mnist, fashion-mnist, cifar10, cifar100 or toy:NAME with NAME one of {}",
                Toy::NAMES.join(", ")
            ),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            DiffusionData::Images(s) => s.describe(),
            DiffusionData::Toy(t) => format!("toy:{}", t.name()),
        }
    }
}

/// Options of `elbo train diffusion`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DiffusionTrainConfig {
    pub data: DiffusionData,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub ema_decay: f64,
    pub seed: u64,
    /// Toy data only: optimizer steps per epoch (each on fresh samples).
    pub toy_steps_per_epoch: usize,
    /// Images only: hold out the last N training images as a validation split.
    #[serde(default)]
    pub valid: Option<usize>,
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    /// DDIM steps for the pictures written at the end.
    pub sample_steps: usize,
    /// The training step's implementation: auto is the fused engine for a U-Net on the CPU.
    #[serde(default)]
    pub engine: Engine,
    /// The loss: simple (fixed variances), or hybrid / vlb (the model's learned variances).
    #[serde(default)]
    pub loss: TrainLoss,
}

/// One line of `metrics.jsonl`: mean simple loss on train (running) and test (EMA weights).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DiffusionEpochMetrics {
    pub epoch: usize,
    pub step: u64,
    pub train_loss: f64,
    /// The simple loss (EMA weights) on the held-out training images (`--valid N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_loss: Option<f64>,
    pub test_loss: f64,
    /// Learned variances: the mean L_t (nats per example, at the drawn t) of the training
    /// steps, the bound's term the variances train on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_lt_nats: Option<f64>,
    pub seconds: f64,
}

/// Training data: images in [-1, 1] or an endless toy stream.
enum TrainingData {
    Images {
        train: Dataset,
        valid: Option<Dataset>,
        test: Dataset,
    },
    Toy {
        toy: Toy,
        test: Vec<f32>,
    },
}

/// Checks the options and the model's sizes before anything is allocated.
fn validate(model: &DiffusionConfig, config: &DiffusionTrainConfig) -> Result<()> {
    use crate::limits::{COUNT_CEILING, count};
    count("--epochs", config.epochs, 1_000_000)?;
    count("--batch-size", config.batch_size, 1_000_000)?;
    let ceiling = COUNT_CEILING;
    count("--train-limit", config.train_limit.unwrap_or(1), ceiling)?;
    count("--test-limit", config.test_limit.unwrap_or(1), ceiling)?;
    count("--sample-steps", config.sample_steps, 100_000)?;
    if matches!(config.data, DiffusionData::Toy(_)) {
        count("--toy-steps-per-epoch", config.toy_steps_per_epoch, ceiling)?;
    }
    model.net.validate()?;
    if let DiffusionData::Toy(_) = config.data {
        model.net.check_training_memory(config.batch_size, 0)?;
        crate::limits::check_bytes(
            &format!("--test-limit {}", config.test_limit.unwrap_or(2000)),
            "the toy test set and its samples",
            crate::limits::product(&[config.test_limit.unwrap_or(2000) as u64, 2 * 4 * 8]),
        )?;
    }
    let learned = model
        .variance
        .is_some_and(crate::diffusion::VarianceType::is_learned);
    match (learned, config.loss) {
        (true, TrainLoss::Simple) => bail!(
            "--variance learned-range: the variances train on --loss hybrid or vlb (the simple loss does not reach them)"
        ),
        (false, TrainLoss::Hybrid | TrainLoss::Vlb) => bail!(
            "--loss {}: trains learned variances; give --variance learned-range",
            if config.loss == TrainLoss::Hybrid {
                "hybrid"
            } else {
                "vlb"
            }
        ),
        _ => {}
    }
    if model.continuous.is_some() {
        if !matches!(config.data, DiffusionData::Images(_)) {
            bail!(
                "--time continuous: its decoder is over the 256 levels of 8-bit images; toy data trains in discrete time"
            );
        }
        if config.loss != TrainLoss::Simple {
            bail!("--time continuous trains on its own bound; --loss is for discrete time");
        }
    }
    if learned && !matches!(config.data, DiffusionData::Images(_)) {
        bail!(
            "--variance learned-range: the discretized decoder of L_0 is for 8-bit images; toy data trains with fixed variances"
        );
    }
    if !(config.lr.is_finite() && config.lr > 0.0) {
        bail!("--lr must be a positive number, got {}", config.lr);
    }
    if !(0.0..1.0).contains(&config.ema_decay) {
        bail!("--ema-decay must be in [0, 1), got {}", config.ema_decay);
    }
    Ok(())
}

/// The training data of `config`, fitting the model's input to it.
fn load_data(model: &mut DiffusionConfig, config: &DiffusionTrainConfig) -> Result<TrainingData> {
    Ok(match &config.data {
        DiffusionData::Images(s) => {
            let (train, valid, test) = super::load_splits(
                s,
                config.valid,
                config.train_limit,
                Some(config.test_limit.unwrap_or(1000)),
            )?;
            // The model's input shape is the data's.
            model.image_shape = Some(train.shape);
            let learned = model
                .variance
                .is_some_and(crate::diffusion::VarianceType::is_learned);
            if let NetConfig::Unet {
                in_channels,
                options,
                ..
            } = &mut model.net
            {
                *in_channels = train.shape.channels;
                // Learned variances: the prediction's C channels, then v's.
                if learned {
                    options.out_channels = 2 * train.shape.channels;
                }
            }
            model.net.check_training_memory(
                config.batch_size.min(train.len().max(1)),
                train.shape.height * train.shape.width,
            )?;
            TrainingData::Images { train, valid, test }
        }
        DiffusionData::Toy(t) => {
            let n = config.test_limit.unwrap_or(2000);
            let mut rng = StdRng::seed_from_u64(derive_seed(config.seed, 9, 0));
            TrainingData::Toy {
                toy: *t,
                test: t.sample(n, &mut rng),
            }
        }
    })
}

/// A run's start on every rank: rank 0's run folder, the model, its raw weights (in a
/// `VarMap`), its EMA weights by name, the Adam state when it continues, the epochs done.
struct Start {
    run: Option<RunDir>,
    model: DiffusionConfig,
    varmap: VarMap,
    ema: HashMap<String, Tensor>,
    adam: Option<HashMap<String, Tensor>>,
    /// A learned schedule's raw parameters (empty otherwise).
    gamma: Vec<f32>,
    epoch: usize,
    step: u64,
}

/// The raw parameter table and values of a fresh run: the network's variables, then a learned
/// schedule's parameters (VDM's initialisation, drawn from `seed`).
fn fresh_params(
    model: &DiffusionConfig,
    varmap: &VarMap,
    seed: u64,
) -> Result<(ParamTable, Vec<f32>)> {
    use rand_distr::Distribution;
    let vars = sorted_vars(varmap);
    let mut items: Vec<(String, Vec<usize>)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    let mut params = ParamTable::of_vars(&vars).gather(&vars)?;
    if let Some(spec) = &model.continuous {
        items.extend(spec.param_shapes());
        let mut rng = StdRng::seed_from_u64(derive_seed(seed, 10, 0));
        let normal = || rand_distr::StandardNormal.sample(&mut rng);
        params.extend(spec.initial_params(normal).into_iter().map(|v| v as f32));
    }
    Ok((ParamTable::packed(items), params))
}

/// Rank 0 opens the run (`resume`: from its last commit; else a fresh folder and fresh
/// weights); every rank decodes rank 0's checkpoint bytes ([`crate::collective`]), so all hold
/// the same weights and optimiser state.
fn start_diffusion(
    model: &DiffusionConfig,
    config: &DiffusionTrainConfig,
    dir: &Path,
    resume: bool,
    device: &Device,
) -> Result<Start> {
    let world = crate::collective::world();
    // (run, model bytes, state bytes, epoch, step)
    type Opened = (RunDir, Vec<u8>, Vec<u8>, u64, u64);
    let set_up = || -> Result<Opened> {
        if resume {
            let (run, committed) = RunDir::resume(dir)?;
            let (model_path, state_path) = (
                committed.file(run_dir::MODEL),
                committed.file(run_dir::STATE),
            );
            let state = checkpoint::load(&state_path, device)?;
            let (epoch, step) = crate::train::state_counters(&state, &state_path, &committed)?;
            let read = |p: &Path| crate::files::read_regular_file(p, u64::MAX);
            return Ok((
                run,
                read(&model_path)?,
                read(&state_path)?,
                epoch as u64,
                step,
            ));
        }
        let run = RunDir::create(dir)?;
        let (_, varmap) = Net::trainable(&model.net, &mut Noise::new(config.seed), device)?;
        let (table, params) = fresh_params(model, &varmap, config.seed)?;
        let (m, s) = state_bytes(model, &table, &params, &params, None, None, 0)?;
        Ok((run, m, s, 0, 0))
    };
    let (run, model_bytes, state, epoch, step) = if world.world_size() == 1 {
        let (run, m, s, e, st) = set_up()?;
        (Some(run), m, s, e, st)
    } else {
        let mine = if world.rank() == 0 {
            Some(set_up()?)
        } else {
            None
        };
        let given = mine
            .as_ref()
            .map(|(_, m, s, e, st)| (m.clone(), s.clone(), *e, *st));
        let (m, s, e, st) = super::share_state(given)?;
        (mine.map(|m| m.0), m, s, e, st)
    };
    let (model_path, state_path) = if world.world_size() == 1 {
        (dir.join(run_dir::MODEL), dir.join(run_dir::STATE))
    } else {
        let here = Path::new("(rank 0's state)");
        (here.to_path_buf(), here.to_path_buf())
    };
    let loaded = checkpoint::decode(&model_bytes, &model_path, device)?;
    let model = model_config(&loaded, &model_path)?;
    let state = checkpoint::decode(&state, &state_path, device)?;
    let (_, varmap) = Net::trainable(&model.net, &mut Noise::new(0), device)?;
    for (name, var) in sorted_vars(&varmap) {
        let raw = state
            .tensors
            .get(&format!("raw.{name}"))
            .with_context(|| format!("{}: no raw.{name}", state_path.display()))?;
        var.set(raw)
            .with_context(|| format!("{}: raw.{name}", state_path.display()))?;
    }
    let mut gamma = Vec::new();
    for (name, shape) in model.continuous.iter().flat_map(|c| c.param_shapes()) {
        let raw = state
            .tensors
            .get(&format!("raw.{name}"))
            .with_context(|| format!("{}: no raw.{name}", state_path.display()))?;
        if raw.dims() != shape.as_slice() {
            bail!(
                "{}: raw.{name} has shape {:?}, expected {shape:?}",
                state_path.display(),
                raw.dims()
            );
        }
        gamma.extend(raw.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    let has_adam = state.tensors.keys().any(|k| k.starts_with("adam."));
    Ok(Start {
        run,
        model,
        varmap,
        ema: loaded.tensors,
        adam: has_adam.then_some(state.tensors),
        gamma,
        epoch: epoch as usize,
        step,
    })
}

/// Trains (or continues, with `resume`) a diffusion model in `dir`.
pub fn train_diffusion(
    mut model: DiffusionConfig,
    config: &DiffusionTrainConfig,
    dir: &Path,
    resume: bool,
    show_progress: bool,
    device: &Device,
) -> Result<Vec<DiffusionEpochMetrics>> {
    validate(&model, config)?;
    let source = load_data(&mut model, config)?;
    model.validate()?;
    // Data parallelism (crate::collective): rank 0 sets the run up and alone writes to it.
    let main = crate::collective::world().rank() == 0;
    let show_progress = show_progress && main;
    let start = start_diffusion(&model, config, dir, resume, device)?;
    let model = start.model;
    if let TrainingData::Images { train, .. } = &source
        && model.image_shape() != Some(train.shape)
    {
        bail!(
            "--resume: the run's model takes {:?} images but the data holds {}",
            model.image_shape(),
            train.shape
        );
    }
    let start_epoch = start.epoch;
    if config.epochs <= start_epoch {
        bail!(
            "--epochs {}: the run in {} has done {start_epoch} epochs already; give a larger --epochs to continue it",
            config.epochs,
            dir.display()
        );
    }
    let varmap = start.varmap;
    let net = Net::build(
        &model.net,
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )?;
    // The U-Net trains on the fused CPU engine: the same loss, draws and gradients as candle's
    // autodiff (checked in tests/diffusion.rs), without the graph. Elsewhere (other devices,
    // the toys' MLP, --engine candle) candle's autodiff.
    let head = match model.variance {
        Some(v) if v.is_learned() => Some(LearnedHead::new(&model.process()?, config.loss)?),
        _ => None,
    };
    let (inner, engine_name) =
        crate::engine::denoiser_step(config.engine, &net, sorted_vars(&varmap), head)?;
    let mut step: Box<dyn TrainStep<Batch = DiffusionBatch>> = match &model.continuous {
        Some(spec) => Box::new(ContinuousStep::new(
            inner,
            spec.clone(),
            model.prediction,
            start.gamma.clone(),
        )?),
        None => Box::new(Discrete(inner)),
    };
    let table = step.table().clone();
    // The process of the samplers: a continuous model's T-step grid (of the EMA schedule,
    // renewed every epoch).
    let mut ema = vec![0f32; table.len()];
    table.read(&start.ema, "", "the EMA weights", &mut ema)?;
    let continuous = continuous_model(&model, &table, &ema, device)?;
    let process = match &continuous {
        Some(c) => c.discretized(model.num_train_timesteps)?,
        None => model.process()?,
    };
    let mut adam = Adam::new(table.clone(), AdamConfig::with_lr(config.lr));
    if let Some(state) = &start.adam {
        adam.load_state(state, start.step).with_context(|| {
            format!(
                "{}: cannot restore the optimizer",
                dir.join(run_dir::STATE).display()
            )
        })?;
    }
    if show_progress {
        let schedule = match &model.continuous {
            Some(c) => format!("continuous time, {:?} gamma", c.gamma),
            None => format!(
                "{:?} schedule, T = {}",
                model.beta_schedule, model.num_train_timesteps
            ),
        };
        eprintln!(
            "training diffusion ({} params, {schedule}, {:?}-prediction) on {} for {} epochs -> {}",
            table.count(),
            model.prediction,
            config.data.describe(),
            config.epochs,
            dir.display()
        );
        eprintln!("engine: {engine_name}");
    }
    let run_config = run_config(&model, config, &source)?;
    let sampler = restore_sampler(&process, config, start.adam.as_ref())?;
    let mut family = DiffusionTraining {
        model: &model,
        config,
        process,
        continuous,
        net: &net,
        source: &source,
        table: &table,
        ema,
        ema_net: None,
        run_config,
        dir,
        device,
        sampler,
    };
    let mut params = step.read_params()?;
    let mut run = start.run;
    let all = super::run_epochs(
        &mut family,
        step.as_mut(),
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
        family.save_final_samples(show_progress)?;
        super::write_report(dir, show_progress);
    }
    Ok(all)
}

/// `config.json`: the model, the training options and the data.
fn run_config(
    model: &DiffusionConfig,
    config: &DiffusionTrainConfig,
    source: &TrainingData,
) -> Result<String> {
    let data = match source {
        TrainingData::Images { train, valid, test } => serde_json::json!({
            "source": config.data.describe(),
            "shape": train.shape.to_string(),
            "train": train.len(),
            "valid": valid.as_ref().map(Dataset::len),
            "test": test.len(),
        }),
        TrainingData::Toy { test, .. } => serde_json::json!({
            "source": config.data.describe(),
            "shape": "2-D points",
            "test": test.len() / 2,
        }),
    };
    Ok(serde_json::to_string_pretty(
        &serde_json::json!({ "model": model, "train": config, "data": data }),
    )?)
}

/// A denoiser in the one training loop: batches of (x_t, t, target) draws, an exponential
/// moving average of the weights, the simple loss of the EMA weights on the test and
/// validation sets, and the EMA weights, raw weights and Adam's state committed every epoch.
struct DiffusionTraining<'a> {
    model: &'a DiffusionConfig,
    config: &'a DiffusionTrainConfig,
    /// The samplers' process (a continuous model's T-step grid).
    process: GaussianDiffusion,
    /// A continuous-time model with the EMA schedule of the last epoch's end.
    continuous: Option<ContinuousModel>,
    net: &'a Net,
    source: &'a TrainingData,
    table: &'a ParamTable,
    /// The EMA weights (the table's layout).
    ema: Vec<f32>,
    /// The EMA network of the last epoch's end (for its pictures).
    ema_net: Option<FrozenNet>,
    run_config: String,
    dir: &'a Path,
    device: &'a Device,
    /// `--loss vlb`: the loss-aware timestep sampler, kept in the train state.
    sampler: Option<LossAwareSampler>,
}

impl DiffusionTraining<'_> {
    /// `samples.png` at the end of a run: 64 DDIM samples of the EMA weights (images) or a
    /// scatter of the toy's test points and as many samples.
    fn save_final_samples(&self, show_progress: bool) -> Result<()> {
        let (config, device, process) = (self.config, self.device, &self.process);
        let ema_net = ema_net(self.model, self.table, &self.ema, device)?;
        let mut noise = Noise::new(derive_seed(config.seed, 3, 0));
        let bar = if show_progress {
            ProgressBar::new(config.sample_steps as u64)
        } else {
            ProgressBar::hidden()
        };
        let steps = config.sample_steps;
        let path = self.dir.join("samples.png");
        match self.source {
            TrainingData::Images { .. } => {
                let s = self.model.image_shape().unwrap_or(ImageShape::MNIST);
                let x_t = noise.randn((64, s.channels, s.height, s.width), device)?;
                let x = ddim_sample(process, &ema_net, x_t, steps, 0.0, true, &mut noise, &bar)?;
                save_image_grid(&x, &path)?;
            }
            TrainingData::Toy { test, .. } => {
                let x_t = noise.randn((test.len() / 2, 2), device)?;
                let x = ddim_sample(process, &ema_net, x_t, steps, 0.0, false, &mut noise, &bar)?;
                crate::plot::save_scatter(&[test, &x.flatten_all()?.to_vec1::<f32>()?], &path)?;
            }
        }
        bar.finish_and_clear();
        Ok(())
    }
}

impl super::Family for DiffusionTraining<'_> {
    type Batch = DiffusionBatch;
    type Metrics = DiffusionEpochMetrics;

    fn batches(&self, rng: &mut StdRng) -> Vec<Vec<usize>> {
        match self.source {
            TrainingData::Images { train, .. } => {
                super::shuffled_batches(train.len(), self.config.batch_size, rng)
            }
            TrainingData::Toy { .. } => vec![Vec::new(); self.config.toy_steps_per_epoch],
        }
    }

    fn batch(
        &self,
        idx: &[usize],
        rng: &mut StdRng,
        noise: &mut Noise,
    ) -> Result<(DiffusionBatch, usize)> {
        let x0 = match self.source {
            TrainingData::Images { train, .. } => image_batch(train, idx, self.device)?,
            TrainingData::Toy { toy, .. } => {
                let b = self.config.batch_size;
                Tensor::from_vec(toy.sample(b, rng), (b, 2), self.device)?
            }
        };
        // Every rank draws the whole batch's t, eps and dropout seed (crate::collective), the
        // loss-aware sampler's t from the history every rank holds alike.
        if self.model.continuous.is_some() {
            let u = rand::Rng::random::<f64>(rng);
            let dropout_seed = (self.net.dropout() > 0.0).then(|| rand::Rng::random::<u64>(rng));
            let rows = x0.dim(0)?;
            let batch = continuous_batch(x0, u, dropout_seed, noise, self.device)?;
            return Ok((DiffusionBatch::Continuous(batch), rows));
        }
        let process = &self.process;
        let (xt, t, target, weights) = match &self.sampler {
            Some(sampler) => {
                let (t, w) = sampler.draw(x0.dim(0)?, rng);
                let (xt, target) = loss_inputs_at(process, &x0, &t, noise)?;
                (xt, t, target, Some(w))
            }
            None => {
                let (xt, t, target) = simple_loss_inputs(process, &x0, rng, noise)?;
                (xt, t, target, None)
            }
        };
        let dropout_seed = (self.net.dropout() > 0.0).then(|| rand::Rng::random::<u64>(rng));
        let rows = t.len();
        let learned = self.process.variance.is_some_and(|v| v.is_learned());
        let batch = DenoiseBatch {
            xt,
            t,
            target,
            dropout_seed,
            x0: learned.then_some(x0),
            weights,
            weighted: None,
        };
        Ok((DiffusionBatch::Discrete(batch), rows))
    }

    fn lr(&self, _epoch: usize) -> f64 {
        self.config.lr
    }

    fn step_done(&mut self, batch: &DiffusionBatch, sums: &[f64]) {
        if let (Some(sampler), DiffusionBatch::Discrete(batch)) = (&mut self.sampler, batch) {
            let b = batch.t.len();
            if let Some(lt) = sums.get(2..2 + b) {
                sampler.update(&batch.t, lt);
            }
        }
    }

    fn average(&mut self, adam_step: u64) -> Option<(&mut [f32], f32)> {
        let decay = ema_decay_at(self.config.ema_decay, adam_step) as f32;
        Some((&mut self.ema, decay))
    }

    fn updated(&mut self, params: &[f32], adam_step: u64) {
        let decay = ema_decay_at(self.config.ema_decay, adam_step) as f32;
        for (e, &p) in self.ema.iter_mut().zip(params) {
            *e = *e * decay + p * (1.0 - decay);
        }
    }

    fn end_epoch(
        &mut self,
        end: &super::EpochEnd<'_>,
    ) -> Result<super::EpochReport<DiffusionEpochMetrics>> {
        let (seed, device) = (self.config.seed, self.device);
        let ema_net = ema_net(self.model, self.table, &self.ema, device)?;
        self.continuous = continuous_model(self.model, self.table, &self.ema, device)?;
        if let Some(c) = &self.continuous {
            self.process = c.discretized(self.model.num_train_timesteps)?;
        }
        // Continuous time reports its bound (bits/dim), not the simple loss.
        let bpd = match (&self.continuous, self.model.image_shape()) {
            (Some(_), Some(s)) => 1.0 / (s.dim() as f64 * std::f64::consts::LN_2),
            _ => 1.0,
        };
        let loss_of = |data: &Dataset| -> Result<f64> {
            match &self.continuous {
                Some(c) => continuous_bound_bpd(c, &ema_net, data, seed, device),
                None => images_loss(&self.process, &ema_net, data, seed, device),
            }
        };
        let test_loss = match self.source {
            TrainingData::Images { test, .. } => loss_of(test)?,
            _ => test_loss(&self.process, &ema_net, self.source, seed, device)?,
        };
        let valid_loss = match self.source {
            TrainingData::Images {
                valid: Some(valid), ..
            } => Some(loss_of(valid)?),
            _ => None,
        };
        let m = DiffusionEpochMetrics {
            epoch: end.epoch,
            step: end.adam.step_count(),
            train_loss: bpd * end.sums.first().copied().unwrap_or(0.0) / end.steps.max(1) as f64,
            valid_loss,
            test_loss,
            train_lt_nats: end
                .sums
                .get(1)
                .filter(|_| self.continuous.is_none())
                .map(|v| v / end.steps.max(1) as f64),
            seconds: end.started.elapsed().as_secs_f64(),
        };
        self.ema_net = Some(ema_net);
        let files = if end.commit {
            let (model_bytes, state) = state_bytes(
                self.model,
                self.table,
                end.params,
                &self.ema,
                Some(end.adam),
                self.sampler.as_ref(),
                end.epoch,
            )?;
            vec![
                (run_dir::MODEL, model_bytes),
                (run_dir::STATE, state),
                (run_dir::CONFIG, self.run_config.clone().into_bytes()),
            ]
        } else {
            Vec::new()
        };
        let valid = m
            .valid_loss
            .map_or(String::new(), |v| format!("valid loss (EMA) {v:.5} | "));
        let lt = m
            .train_lt_nats
            .map_or(String::new(), |v| format!(" (mean L_t {v:.2} nats)"));
        let line = match &self.continuous {
            Some(c) => {
                let (g0, g1) = c.gamma.endpoints();
                format!(
                    "epoch {}: train bound {:.4} bits/dim | {valid}test bound (EMA) {:.4} bits/dim | gamma {g0:.2} .. {g1:.2} | {:.1}s",
                    m.epoch, m.train_loss, m.test_loss, m.seconds
                )
            }
            None => format!(
                "epoch {}: train loss {:.5}{lt} | {valid}test loss (EMA) {:.5} | {:.1}s",
                m.epoch, m.train_loss, m.test_loss, m.seconds
            ),
        };
        Ok(super::EpochReport {
            losses: vec![
                ("train loss", Some(m.train_loss)),
                ("test loss (EMA)", Some(m.test_loss)),
                ("validation loss (EMA)", m.valid_loss),
            ],
            weights: vec![("EMA", self.ema.clone())],
            files,
            line,
            metrics: m,
        })
    }

    fn after_commit(&mut self, epoch: usize, _params: &[f32]) -> Result<()> {
        if let (TrainingData::Images { .. }, Some(net)) = (self.source, &self.ema_net) {
            let s = self.model.image_shape().unwrap_or(ImageShape::MNIST);
            save_epoch_samples(
                &self.process,
                net,
                s,
                self.dir,
                epoch,
                self.config,
                self.device,
            )?;
        }
        Ok(())
    }
}

/// `pictures/samples-NNNNNN.png`: 16 DDIM samples of the EMA weights from the same x_T every
/// epoch (at most 20 steps, so it stays a small share of an epoch), for the report.
fn save_epoch_samples(
    process: &GaussianDiffusion,
    net: &dyn Denoiser,
    s: ImageShape,
    dir: &Path,
    epoch: usize,
    config: &DiffusionTrainConfig,
    device: &Device,
) -> Result<()> {
    let mut noise = Noise::new(derive_seed(config.seed, 3, 1));
    let x_t = noise.randn((16, s.channels, s.height, s.width), device)?;
    let steps = config.sample_steps.clamp(1, 20);
    let bar = ProgressBar::hidden();
    let x = ddim_sample(process, net, x_t, steps, 0.0, true, &mut noise, &bar)?;
    // save_image_grid creates the folder and writes through a temporary file.
    let path = dir
        .join(crate::report::PICTURES_DIR)
        .join(format!("samples-{epoch:06}.png"));
    save_image_grid(&x, &path)
}

/// The EMA decay after `step` optimizer steps: `min(decay, (1 + step) / (10 + step))`, the
/// warm-up of diffusers' `EMAModel`, so that early averages are not dominated by the random
/// initial weights (with a flat 0.999, 57% of the average is still the initialisation after
/// 564 steps).
pub fn ema_decay_at(decay: f64, step: u64) -> f64 {
    decay.min((1.0 + step as f64) / (10.0 + step as f64))
}

/// The network of the EMA weights `ema` (laid out by `table`), for sampling and evaluation.
fn ema_net(
    model: &DiffusionConfig,
    table: &ParamTable,
    ema: &[f32],
    device: &Device,
) -> Result<FrozenNet> {
    let map: HashMap<String, Tensor> = table.tensors(ema, "", device)?.into_iter().collect();
    Ok(FrozenNet::new(Net::build(
        &model.net,
        VarBuilder::from_tensors(map, DType::F32, device),
    )?))
}

fn test_loss(
    process: &GaussianDiffusion,
    net: &dyn Denoiser,
    source: &TrainingData,
    seed: u64,
    device: &Device,
) -> Result<f64> {
    match source {
        TrainingData::Images { test, .. } => images_loss(process, net, test, seed, device),
        TrainingData::Toy { test, .. } => {
            let mut rng = StdRng::seed_from_u64(derive_seed(seed, 2, 0));
            let mut noise = Noise::new(derive_seed(seed, 2, 1));
            let n = test.len() / 2;
            let x0 = Tensor::from_slice(test, (n, 2), device)?;
            Ok(simple_loss(process, net, &x0, &mut rng, &mut noise)?.to_scalar::<f32>()? as f64)
        }
    }
}

/// A continuous-time model of the run's schedule, its parameters read from `values` (a buffer
/// of `table`'s layout: the raw or EMA weights); `None` in discrete time.
fn continuous_model(
    model: &DiffusionConfig,
    table: &ParamTable,
    values: &[f32],
    device: &Device,
) -> Result<Option<ContinuousModel>> {
    if model.continuous.is_none() {
        return Ok(None);
    }
    let tensors: HashMap<String, Tensor> = table
        .tensors(values, "", device)?
        .into_iter()
        .filter(|(n, _)| n.starts_with("gamma."))
        .collect();
    model.continuous_model(&tensors)
}

/// The continuous-time bound in bits/dim over a set of images (one draw of t, eps and eps_0
/// per image, the same every epoch), sharded over the ranks as [`images_loss`].
fn continuous_bound_bpd(
    model: &ContinuousModel,
    net: &dyn Denoiser,
    data: &Dataset,
    seed: u64,
    device: &Device,
) -> Result<f64> {
    let mean = sharded_image_mean(data, seed, device, &mut |x0, rng, noise| {
        let terms = model.bound_terms(net, x0, 1, None, noise, rng)?;
        Ok(terms.iter().map(|t| t.total()).sum::<f64>())
    })?;
    Ok(mean / (data.shape.dim() as f64 * std::f64::consts::LN_2))
}

/// The mean simple loss over a set of images, with the same t and eps draws every epoch
/// ([`sharded_image_mean`]).
fn images_loss(
    process: &GaussianDiffusion,
    net: &dyn Denoiser,
    data: &Dataset,
    seed: u64,
    device: &Device,
) -> Result<f64> {
    sharded_image_mean(data, seed, device, &mut |x0, rng, noise| {
        let loss = simple_loss(process, net, x0, rng, noise)?.to_scalar::<f32>()?;
        Ok(loss as f64 * x0.dim(0)? as f64)
    })
}

/// The mean over a set of images of a per-image quantity: `sum(x0, rng, noise)` gives its sum
/// over a chunk of up to 250 images, chunk j drawing from `derive_seed(seed, 2, 2j)` (rng)
/// and `(.., 2j + 1)` (noise), the same every epoch. With several ranks
/// ([`crate::collective`]) each runs its share of the chunks and the sums are added over the
/// ranks, so N ranks report what one process reports.
fn sharded_image_mean(
    data: &Dataset,
    seed: u64,
    device: &Device,
    sum: &mut dyn FnMut(&Tensor, &mut StdRng, &mut Noise) -> Result<f64>,
) -> Result<f64> {
    let idx: Vec<usize> = (0..data.len()).collect();
    let chunks: Vec<&[usize]> = idx.chunks(250).collect();
    // [the chunks' sums, examples]
    let mut sums = [0.0, 0.0];
    for j in crate::collective::my_shard(chunks.len()) {
        let chunk = chunks[j];
        let mut rng = StdRng::seed_from_u64(derive_seed(seed, 2, 2 * j as u64));
        let mut noise = Noise::new(derive_seed(seed, 2, 2 * j as u64 + 1));
        let x0 = image_batch(data, chunk, device)?;
        sums[0] += sum(&x0, &mut rng, &mut noise)?;
        sums[1] += chunk.len() as f64;
    }
    crate::collective::world().all_reduce_sum_f64(&mut sums)?;
    Ok(sums[0] / sums[1].max(1.0))
}

/// The bytes of `model.safetensors` (the EMA weights and the config) and of
/// `train_state.safetensors` (the raw weights `raw.*`, Adam's state, epoch and step), both
/// buffers laid out by `table`.
/// The loss-aware sampler's history in `train_state.safetensors`: `[T, 10]` and `[T]` f32 (the
/// sampler keeps its values at f32 precision, so they come back exactly).
const SAMPLER_HISTORY: &str = "sampler.history";
const SAMPLER_COUNTS: &str = "sampler.counts";

/// The loss-aware sampler of a run that trains with `--loss vlb`: the committed history when
/// it continues (`state`), else an empty one.
fn restore_sampler(
    process: &GaussianDiffusion,
    config: &DiffusionTrainConfig,
    state: Option<&HashMap<String, Tensor>>,
) -> Result<Option<LossAwareSampler>> {
    if config.loss != TrainLoss::Vlb {
        return Ok(None);
    }
    let t = process.num_timesteps();
    let kept = state.and_then(|s| Some((s.get(SAMPLER_HISTORY)?, s.get(SAMPLER_COUNTS)?)));
    let Some((h, c)) = kept else {
        return Ok(Some(LossAwareSampler::new(t)));
    };
    let values = |x: &Tensor| -> Result<Vec<f64>> {
        Ok(x.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    };
    let (h, c) = (values(h)?, values(c)?);
    if c.len() != t {
        bail!(
            "--resume: the run's loss-aware sampler has {} timesteps, the model {t}",
            c.len()
        );
    }
    Ok(Some(
        LossAwareSampler::from_values(&h, &c).context("--resume")?,
    ))
}

fn state_bytes(
    model: &DiffusionConfig,
    table: &ParamTable,
    raw: &[f32],
    ema: &[f32],
    adam: Option<&Adam>,
    sampler: Option<&LossAwareSampler>,
    epoch: usize,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("elbo.model".to_string(), "diffusion".to_string()),
        ("elbo.config".to_string(), serde_json::to_string(model)?),
    ]);
    let cpu = &Device::Cpu;
    let model_bytes = checkpoint::serialize(&table.tensors(ema, "", cpu)?, metadata)?;
    let (mut tensors, step) = match adam {
        Some(adam) => adam.state()?,
        None => (Vec::new(), 0),
    };
    tensors.extend(table.tensors(raw, "raw.", cpu)?);
    if let Some(sampler) = sampler {
        let (values, counts) = sampler.to_values();
        let f32s = |v: Vec<f64>| -> Vec<f32> { v.into_iter().map(|x| x as f32).collect() };
        let (values, counts) = (f32s(values), f32s(counts));
        let t = counts.len();
        tensors.push((
            SAMPLER_HISTORY.to_string(),
            Tensor::from_vec(values, (t, LossAwareSampler::HISTORY), cpu)?,
        ));
        tensors.push((
            SAMPLER_COUNTS.to_string(),
            Tensor::from_vec(counts, t, cpu)?,
        ));
    }
    let state = checkpoint::serialize(&tensors, crate::train::state_metadata(epoch, step))?;
    Ok((model_bytes, state))
}

#[cfg(test)]
mod tests {
    use super::ema_decay_at;

    #[test]
    fn ema_decay_warms_up_to_its_ceiling() {
        assert!((ema_decay_at(0.999, 1) - 2.0 / 11.0).abs() < 1e-12);
        assert!((ema_decay_at(0.999, 90) - 0.91).abs() < 1e-12);
        assert_eq!(ema_decay_at(0.999, 100_000), 0.999);
    }
}
