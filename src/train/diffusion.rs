//! Training a diffusion model with the simplified loss ([`crate::diffusion::objective`]):
//! Adam, an exponential moving average (EMA) of the weights used for sampling and evaluation,
//! per-epoch metrics, one atomic commit per epoch, resume, pictures.
//!
//! Files: `model.safetensors` (EMA weights + the model config as metadata),
//! `train_state.safetensors` (raw weights `raw.*`, Adam state, epoch), `metrics.jsonl`,
//! `samples.png` (images) or `samples.png` scatter of data vs samples (2-D toys).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use candle_nn::VarMap;
use indicatif::ProgressBar;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::derive_seed;
use crate::checkpoint;
use crate::data::toy::Toy;
use crate::data::{Dataset, ImageShape, Named, Source};
use crate::diffusion::model::{DiffusionConfig, image_batch, model_config};
use crate::diffusion::nets::{Net, NetConfig, sorted_vars};
use crate::diffusion::objective::simple_loss;
use crate::diffusion::process::{Denoiser, GaussianDiffusion};
use crate::diffusion::sampler::ddim_sample;
use crate::distributions::Noise;
use crate::engine::{Engine, FrozenNet, fused_simple_loss};
use crate::optim::{Adam, AdamConfig};
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

/// The simple loss of a global batch `x0` (`[B, ...]`) taken by the ranks together through
/// candle's autodiff ([`crate::collective`]): every rank draws the whole batch's t, eps and dropout
/// seed as one process does ([`crate::diffusion::objective::simple_loss`]), runs its rows
/// (each with the dropout masks of its example in the batch), and differentiates its share
/// `sum_rows ||target - f(x_t, t)||^2 / (B D)`; the shares' gradients and sums are summed over
/// the ranks, so every rank returns the batch's mean loss and its gradients.
fn simple_loss_on_my_rows(
    process: &GaussianDiffusion,
    net: &Net,
    vars: &[(String, Var)],
    x0: &Tensor,
    rng: &mut StdRng,
    noise: &mut Noise,
) -> Result<(f32, candle_core::backprop::GradStore)> {
    use crate::diffusion::objective::simple_loss_inputs;
    use crate::diffusion::process::timestep_tensor;
    let (xt, t, target) = simple_loss_inputs(process, x0, rng, noise)?;
    let b = x0.dim(0)?;
    let total = x0.elem_count() as f64;
    let rows = crate::collective::my_shard(b);
    let (sum, grads) = if rows.is_empty() {
        (0.0, None)
    } else {
        let (first, n) = (rows.start, rows.len());
        let xs = xt.narrow(0, first, n)?;
        let ts = timestep_tensor(&t[rows], x0.device())?;
        let out = net.forward_train_rows(&xs, &ts, rng, first)?;
        let sse = (out - target.narrow(0, first, n)?)?.sqr()?.sum_all()?;
        let grads = (&sse / total)?.backward()?;
        (sse.to_scalar::<f32>()? as f64, Some(grads))
    };
    let grads = super::all_reduce_grads(vars, grads)?;
    let mut sum = [sum];
    crate::collective::world().all_reduce_sum_f64(&mut sum)?;
    Ok(((sum[0] / total) as f32, grads))
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
    use crate::limits::{COUNT_CEILING, count};
    count("--epochs", config.epochs, 1_000_000)?;
    count("--batch-size", config.batch_size, 1_000_000)?;
    count(
        "--train-limit",
        config.train_limit.unwrap_or(1),
        COUNT_CEILING,
    )?;
    count(
        "--test-limit",
        config.test_limit.unwrap_or(1),
        COUNT_CEILING,
    )?;
    count("--sample-steps", config.sample_steps, 100_000)?;
    if matches!(config.data, DiffusionData::Toy(_)) {
        count(
            "--toy-steps-per-epoch",
            config.toy_steps_per_epoch,
            COUNT_CEILING,
        )?;
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
    if !(config.lr.is_finite() && config.lr > 0.0) {
        bail!("--lr must be a positive number, got {}", config.lr);
    }
    if !(0.0..1.0).contains(&config.ema_decay) {
        bail!("--ema-decay must be in [0, 1), got {}", config.ema_decay);
    }
    let source = match &config.data {
        DiffusionData::Images(s) => {
            let (train, valid, test) = super::load_splits(
                s,
                config.valid,
                config.train_limit,
                Some(config.test_limit.unwrap_or(1000)),
            )?;
            // The model's input shape is the data's.
            model.image_shape = Some(train.shape);
            if let NetConfig::Unet { in_channels, .. } = &mut model.net {
                *in_channels = train.shape.channels;
            }
            model.net.check_training_memory(
                config.batch_size.min(train.len().max(1)),
                train.shape.height * train.shape.width,
            )?;
            TrainingData::Images { train, valid, test }
        }
        DiffusionData::Toy(t) => {
            let n = config.test_limit.unwrap_or(2000);
            TrainingData::Toy {
                toy: *t,
                test: t.sample(
                    n,
                    &mut StdRng::seed_from_u64(derive_seed(config.seed, 9, 0)),
                ),
            }
        }
    };

    model.validate()?;
    // Data parallelism (crate::collective): rank 0 sets the run up and alone writes to it; the
    // others receive its EMA weights, raw weights and Adam state.
    let world = crate::collective::world();
    let main = world.rank() == 0;
    let show_progress = show_progress && main;
    let set_up = || -> Result<(RunDir, DiffusionConfig, VarMap, Adam, Vec<Tensor>, usize)> {
        Ok(if resume {
            let (run, committed) = RunDir::resume(dir)?;
            let model_path = committed.file(run_dir::MODEL);
            let ema_loaded = checkpoint::load(&model_path, device)?;
            let state_path = committed.file(run_dir::STATE);
            let state = checkpoint::load(&state_path, device)?;
            let (epoch, step) = crate::train::state_counters(&state, &state_path, &committed)?;
            let (model, varmap, adam, ema) = restore(
                ema_loaded,
                &model_path,
                state,
                &state_path,
                step,
                config,
                device,
            )?;
            if let TrainingData::Images { train, .. } = &source
                && model.image_shape() != Some(train.shape)
            {
                bail!(
                    "--resume: the run's model takes {:?} images but the data holds {}",
                    model.image_shape(),
                    train.shape
                );
            }
            (run, model, varmap, adam, ema, epoch)
        } else {
            let run = RunDir::create(dir)?;
            let (_, varmap) = Net::trainable(&model.net, &mut Noise::new(config.seed), device)?;
            let vars = sorted_vars(&varmap);
            let ema = vars
                .iter()
                .map(|(_, v)| v.as_tensor().detach().copy())
                .collect::<candle_core::Result<Vec<_>>>()?;
            let adam = Adam::new(vars, AdamConfig::with_lr(config.lr))?;
            (run, model.clone(), varmap, adam, ema, 0)
        })
    };
    let (mut run, model, varmap, mut adam, mut ema, start_epoch) = if world.world_size() == 1 {
        let (run, model, varmap, adam, ema, epoch) = set_up()?;
        (Some(run), model, varmap, adam, ema, epoch)
    } else {
        let mine = match main {
            true => Some(set_up()?),
            false => None,
        };
        let given = match &mine {
            Some((_, model, varmap, adam, ema, epoch)) => {
                let vars = sorted_vars(varmap);
                let (m, st) = state_bytes(model, &vars, ema, adam, *epoch)?;
                Some((m, st, *epoch as u64, adam.step_count()))
            }
            None => None,
        };
        let (model_bytes, state, epoch, step) = super::share_state(given)?;
        let here = Path::new("(rank 0's state)");
        let ema_loaded = checkpoint::decode(&model_bytes, here, device)?;
        let state = checkpoint::decode(&state, here, device)?;
        let (model, varmap, adam, ema) =
            restore(ema_loaded, here, state, here, step, config, device)?;
        (mine.map(|m| m.0), model, varmap, adam, ema, epoch as usize)
    };
    if config.epochs <= start_epoch {
        bail!(
            "--epochs {}: the run in {} has done {start_epoch} epochs already; give a larger --epochs to continue it",
            config.epochs,
            dir.display()
        );
    }
    let process = model.process()?;
    let net = Net::build(
        &model.net,
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )?;
    // The U-Net trains on the fused CPU engine: the same loss, draws and gradients as candle's
    // autodiff (checked in tests/diffusion.rs), without the graph. Elsewhere (other devices,
    // the toys' MLP, --engine candle) candle's autodiff, each rank on its rows of the batch.
    let (mut fused, engine_name) = crate::engine::unet_training(config.engine, &net)?;
    let vars: Vec<(String, Var)> = sorted_vars(&varmap);
    let n_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    if show_progress {
        eprintln!(
            "training diffusion ({} params, {:?} schedule, T = {}, {:?}-prediction) on {} for {} epochs -> {}",
            n_params,
            model.beta_schedule,
            model.num_train_timesteps,
            model.prediction,
            config.data.describe(),
            config.epochs,
            dir.display()
        );
        eprintln!("engine: {engine_name}");
    }
    let data = match &source {
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
    let run_config = serde_json::to_string_pretty(
        &serde_json::json!({ "model": model, "train": config, "data": data }),
    )?;

    let mut all = Vec::new();
    for epoch in start_epoch + 1..=config.epochs {
        let started = Instant::now();
        let seed = derive_seed(config.seed, 1, epoch as u64);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut noise = Noise::new(seed.wrapping_add(1));
        let batches: Vec<Vec<usize>> = match &source {
            TrainingData::Images { train, .. } => {
                let mut order: Vec<usize> = (0..train.len()).collect();
                order.shuffle(&mut rng);
                order
                    .chunks(config.batch_size)
                    .map(|c| c.to_vec())
                    .collect()
            }
            TrainingData::Toy { .. } => vec![Vec::new(); config.toy_steps_per_epoch],
        };
        let bar = super::epoch_bar(batches.len(), epoch, config.epochs, show_progress);
        let mut loss_sum = 0.0;
        for (step, idx) in batches.iter().enumerate() {
            let x0 = match &source {
                TrainingData::Images { train, .. } => image_batch(train, idx, device)?,
                TrainingData::Toy { toy, .. } => Tensor::from_vec(
                    toy.sample(config.batch_size, &mut rng),
                    (config.batch_size, 2),
                    device,
                )?,
            };
            let (value, grads) = match fused.as_mut() {
                Some(engine) => {
                    engine.refresh()?;
                    crate::fault::training_step(world.rank());
                    fused_simple_loss(&process, engine, &x0, &mut rng, &mut noise)?
                }
                None if world.world_size() == 1 => {
                    let loss = simple_loss(&process, &net, &x0, &mut rng, &mut noise)?;
                    (loss.to_scalar::<f32>()?, loss.backward()?)
                }
                None => {
                    crate::fault::training_step(world.rank());
                    simple_loss_on_my_rows(&process, &net, &vars, &x0, &mut rng, &mut noise)?
                }
            };
            if !value.is_finite() {
                bar.abandon();
                bail!(
                    "training stopped: the loss became {value} at epoch {epoch}, step {}; {} (try a smaller --lr)",
                    step + 1,
                    if epoch > 1 {
                        // Every epoch commits: the last one is epoch - 1 on every rank.
                        format!(
                            "the last good checkpoint {} (epoch {}) is kept",
                            dir.join(run_dir::MODEL).display(),
                            epoch - 1
                        )
                    } else {
                        "no checkpoint had been written yet".into()
                    }
                );
            }
            adam.step(&grads)?;
            let decay = ema_decay_at(config.ema_decay, adam.step_count());
            for ((_, var), e) in vars.iter().zip(ema.iter_mut()) {
                *e = ((&*e * decay)? + (var.as_tensor().detach() * (1.0 - decay))?)?;
            }
            loss_sum += value as f64;
            bar.set_message(format!("loss {value:.4}"));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let ema_net = ema_net(&model, &vars, &ema, device)?;
        let test_loss = test_loss(&process, &ema_net, &source, config.seed, device)?;
        let valid_loss = match &source {
            TrainingData::Images {
                valid: Some(valid), ..
            } => Some(images_loss(&process, &ema_net, valid, config.seed, device)?),
            _ => None,
        };
        let m = DiffusionEpochMetrics {
            epoch,
            step: adam.step_count(),
            train_loss: loss_sum / batches.len().max(1) as f64,
            valid_loss,
            test_loss,
            seconds: started.elapsed().as_secs_f64(),
        };
        let named = |tensors: Vec<Tensor>| -> Vec<(String, Tensor)> {
            vars.iter().map(|(n, _)| n.clone()).zip(tensors).collect()
        };
        super::check_epoch_finite(
            epoch,
            run.as_ref().map_or(epoch - 1, run_dir::RunDir::last_epoch),
            dir,
            &[
                ("train loss", Some(m.train_loss)),
                ("test loss (EMA)", Some(m.test_loss)),
                ("validation loss (EMA)", m.valid_loss),
            ],
            &[
                (
                    "raw",
                    &named(vars.iter().map(|(_, v)| v.as_tensor().clone()).collect()),
                ),
                ("EMA", &named(ema.clone())),
            ],
        )?;
        if let Some(run) = run.as_mut() {
            let (model_bytes, state_bytes) = state_bytes(&model, &vars, &ema, &adam, epoch)?;
            run.commit(
                epoch,
                adam.step_count(),
                &[
                    (run_dir::MODEL, &model_bytes),
                    (run_dir::STATE, &state_bytes),
                    (run_dir::CONFIG, run_config.as_bytes()),
                ],
                &serde_json::to_string(&m)?,
            )?;
        }
        if show_progress {
            let valid = m
                .valid_loss
                .map_or(String::new(), |v| format!("valid loss (EMA) {v:.5} | "));
            eprintln!(
                "epoch {epoch}: train loss {:.5} | {valid}test loss (EMA) {:.5} | {:.1}s",
                m.train_loss, m.test_loss, m.seconds
            );
        }
        if let (TrainingData::Images { .. }, true) = (&source, main) {
            let s = model.image_shape().unwrap_or(ImageShape::MNIST);
            save_epoch_samples(&process, &ema_net, s, dir, epoch, config, device)?;
        }
        all.push(m);
    }
    if !main {
        return Ok(all);
    }
    let ema_net = ema_net(&model, &vars, &ema, device)?;
    let mut noise = Noise::new(derive_seed(config.seed, 3, 0));
    let bar = if show_progress {
        ProgressBar::new(config.sample_steps as u64)
    } else {
        ProgressBar::hidden()
    };
    match &source {
        TrainingData::Images { .. } => {
            let s = model.image_shape().unwrap_or(ImageShape::MNIST);
            let x_t = noise.randn((64, s.channels, s.height, s.width), device)?;
            let x = ddim_sample(
                &process,
                &ema_net,
                x_t,
                config.sample_steps,
                0.0,
                true,
                &mut noise,
                &bar,
            )?;
            save_image_grid(&x, &dir.join("samples.png"))?;
        }
        TrainingData::Toy { test, .. } => {
            let x_t = noise.randn((test.len() / 2, 2), device)?;
            let x = ddim_sample(
                &process,
                &ema_net,
                x_t,
                config.sample_steps,
                0.0,
                false,
                &mut noise,
                &bar,
            )?;
            crate::plot::save_scatter(
                &[test, &x.flatten_all()?.to_vec1::<f32>()?],
                &dir.join("samples.png"),
            )?;
        }
    }
    bar.finish_and_clear();
    super::write_report(dir, show_progress);
    Ok(all)
}

/// The model, raw weights (in a fresh `VarMap`), Adam and EMA weights of a run from its
/// decoded checkpoint (`ema_loaded`, the EMA weights and config) and training state (`raw.*`
/// weights and Adam's moments at `step`); the paths name them in errors.
fn restore(
    ema_loaded: checkpoint::Loaded,
    model_path: &Path,
    state: checkpoint::Loaded,
    state_path: &Path,
    step: u64,
    config: &DiffusionTrainConfig,
    device: &Device,
) -> Result<(DiffusionConfig, VarMap, Adam, Vec<Tensor>)> {
    let model = model_config(&ema_loaded, model_path)?;
    let (_, varmap) = Net::trainable(&model.net, &mut Noise::new(0), device)?;
    let vars = sorted_vars(&varmap);
    let mut ema = Vec::new();
    for (name, var) in &vars {
        let raw = state
            .tensors
            .get(&format!("raw.{name}"))
            .with_context(|| format!("{}: no raw.{name}", state_path.display()))?;
        var.set(raw)
            .with_context(|| format!("{}: raw.{name}", state_path.display()))?;
        let e = ema_loaded
            .tensors
            .get(name)
            .with_context(|| format!("{}: no {name}", model_path.display()))?;
        if e.dims() != var.dims() {
            bail!(
                "{}: tensor {name} has shape {:?}, expected {:?}",
                model_path.display(),
                e.dims(),
                var.dims()
            );
        }
        ema.push(e.to_dtype(DType::F32)?);
    }
    let mut adam = Adam::new(vars, AdamConfig::with_lr(config.lr))?;
    adam.load_state(&state.tensors, step)
        .with_context(|| format!("{}: cannot restore the optimizer", state_path.display()))?;
    Ok((model, varmap, adam, ema))
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

fn ema_net(
    model: &DiffusionConfig,
    vars: &[(String, Var)],
    ema: &[Tensor],
    device: &Device,
) -> Result<FrozenNet> {
    let map: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, _)| n.clone())
        .zip(ema.iter().cloned())
        .collect();
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

/// The mean simple loss over a set of images, with the same t and eps draws every epoch:
/// chunk j of 250 images draws them from `derive_seed(seed, 2, 2j)` and `(.., 2j + 1)`. With
/// several ranks ([`crate::collective`]) each runs its share of the chunks and the sums are added
/// over the ranks, so N ranks report what one process reports.
fn images_loss(
    process: &GaussianDiffusion,
    net: &dyn Denoiser,
    data: &Dataset,
    seed: u64,
    device: &Device,
) -> Result<f64> {
    let idx: Vec<usize> = (0..data.len()).collect();
    let chunks: Vec<&[usize]> = idx.chunks(250).collect();
    // [sum of the chunks' mean losses x their sizes, examples]
    let mut sums = [0.0, 0.0];
    for j in crate::collective::my_shard(chunks.len()) {
        let chunk = chunks[j];
        let mut rng = StdRng::seed_from_u64(derive_seed(seed, 2, 2 * j as u64));
        let mut noise = Noise::new(derive_seed(seed, 2, 2 * j as u64 + 1));
        let x0 = image_batch(data, chunk, device)?;
        let loss = simple_loss(process, net, &x0, &mut rng, &mut noise)?.to_scalar::<f32>()?;
        sums[0] += loss as f64 * chunk.len() as f64;
        sums[1] += chunk.len() as f64;
    }
    crate::collective::world().all_reduce_sum_f64(&mut sums)?;
    Ok(sums[0] / sums[1].max(1.0))
}

/// The bytes of `model.safetensors` (EMA weights and the config) and of
/// `train_state.safetensors` (Adam's state, the raw weights `raw.*`, epoch and step).
fn state_bytes(
    model: &DiffusionConfig,
    vars: &[(String, Var)],
    ema: &[Tensor],
    adam: &Adam,
    epoch: usize,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let ema_tensors: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, _)| n.clone())
        .zip(ema.iter().cloned())
        .collect();
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("elbo.model".to_string(), "diffusion".to_string()),
        ("elbo.config".to_string(), serde_json::to_string(model)?),
    ]);
    let model_bytes = checkpoint::serialize(&ema_tensors, metadata)?;
    let (mut tensors, step) = adam.state();
    tensors.extend(
        vars.iter()
            .map(|(n, v)| (format!("raw.{n}"), v.as_tensor().clone())),
    );
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
