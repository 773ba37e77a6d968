//! Training: the one loop ([`run_epochs`]: epochs, batches, sharding over the ranks, Adam, the
//! NaN stop, the epoch commit, progress) and one file per model family, each a [`Family`] that
//! gives the loop its batches, its evaluation and its files: [`vae`] (the VAE family),
//! [`diffusion`] (denoisers) and [`latent`] (any `LatentVariableModel` of your own). The step
//! itself is an engine's [`crate::engine::TrainStep`]; the run folder is [`crate::run_dir`].

pub mod diffusion;
pub mod latent;
pub mod vae;

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::checkpoint;
use crate::data::{Dataset, Source, Split};
use crate::distributions::Noise;
pub use crate::engine::Engine;
use crate::engine::TrainStep;
use crate::optim::{Adam, ParamTable};
use crate::run_dir::{Committed, RunDir};
pub use vae::{
    EpochMetrics, KlEstimator, Objective, Terms, TrainConfig, evaluate_elbo, image_shape, manifold,
    save_pictures, save_reconstructions, train_vae,
};

pub use crate::distributions::derive_seed;

/// The training state's metadata: the epochs done and Adam's step count.
pub fn state_metadata(epoch: usize, step: u64) -> HashMap<String, String> {
    HashMap::from([
        ("epoch".to_string(), epoch.to_string()),
        ("adam_step".to_string(), step.to_string()),
    ])
}

/// Rank 0's model and training state on every rank (data parallelism, see [`crate::collective`]):
/// rank 0 passes `Some((model bytes, state bytes, epoch, Adam step))`, the others `None`, and
/// every rank gets rank 0's. With one process it returns what it was given.
pub fn share_state(
    mine: Option<(Vec<u8>, Vec<u8>, u64, u64)>,
) -> Result<(Vec<u8>, Vec<u8>, u64, u64)> {
    let world = crate::collective::world();
    if world.world_size() == 1 {
        return mine.context("share_state: rank 0 gives the state");
    }
    let mut buf = Vec::new();
    if let Some((model, state, epoch, step)) = &mine {
        for n in [model.len() as u64, *epoch, *step] {
            buf.extend_from_slice(&n.to_le_bytes());
        }
        buf.extend_from_slice(model);
        buf.extend_from_slice(state);
    }
    world.broadcast_bytes(&mut buf, 0)?;
    let number = |i: usize| -> Result<u64> {
        let bytes = buf
            .get(8 * i..8 * i + 8)
            .context("share_state: a short message from rank 0")?;
        Ok(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    };
    let (len, epoch, step) = (number(0)? as usize, number(1)?, number(2)?);
    if buf.len() < 24 + len {
        bail!("share_state: a short message from rank 0");
    }
    let model = buf[24..24 + len].to_vec();
    let state = buf[24 + len..].to_vec();
    Ok((model, state, epoch, step))
}

/// The (epoch, Adam step) a training state records, checked against its commit.
pub fn state_counters(
    state: &checkpoint::Loaded,
    path: &Path,
    committed: &Committed,
) -> Result<(usize, u64)> {
    let number = |key: &str| -> Result<u64> {
        state
            .metadata
            .get(key)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{}: metadata {key} missing", path.display()))
    };
    let (epoch, step) = (number("epoch")? as usize, number("adam_step")?);
    if epoch != committed.epoch || step != committed.step {
        bail!(
            "{}: records epoch {epoch}, step {step}, but its commit is epoch {}, step {}: the run is out of step",
            path.display(),
            committed.epoch,
            committed.step
        );
    }
    Ok((epoch, step))
}

/// The train, validation and test splits of `source`: `valid` holds out the last N training
/// examples (before `train_limit` takes the first of the rest), `test_limit` the first of the
/// test set. Fails unless both splits hold images of one shape.
pub fn load_splits(
    source: &Source,
    valid: Option<usize>,
    train_limit: Option<usize>,
    test_limit: Option<usize>,
) -> Result<(Dataset, Option<Dataset>, Dataset)> {
    let mut train = source.load(Split::Train)?;
    let mut test = source.load(Split::Test)?;
    let mut held = None;
    if let Some(n) = valid {
        let (rest, last) = train.split_last(n, "--valid")?;
        train = rest;
        held = Some(last);
    }
    if let Some(n) = train_limit {
        train = train.take(n);
    }
    if let Some(n) = test_limit {
        test = test.take(n);
    }
    if test.shape != train.shape {
        bail!(
            "{}: train images are {} but test images are {}",
            source.describe(),
            train.shape,
            test.shape
        );
    }
    Ok((train, held, test))
}

/// What the last good checkpoint is, for the message of a stopped run: `last_commit` (0: none)
/// in `dir` (`None`: a run in memory, which has none).
fn kept(dir: Option<&Path>, last_commit: usize) -> String {
    match dir {
        Some(dir) if last_commit > 0 => format!(
            "the last good checkpoint {} (epoch {last_commit}) is kept",
            dir.join(crate::run_dir::MODEL).display()
        ),
        Some(_) => "no checkpoint had been written yet".to_string(),
        None => "nothing was written".to_string(),
    }
}

/// Refuses to commit `epoch` when one of its losses (name, value) or weights (kind, layout,
/// values) is not finite: training stops with one line naming it, and the run keeps its last
/// commit (`last_commit`, 0 for none). [`run_epochs`] calls it before each commit.
pub fn check_epoch_finite(
    epoch: usize,
    last_commit: usize,
    dir: Option<&Path>,
    losses: &[(&str, Option<f64>)],
    weights: &[(&str, &ParamTable, &[f32])],
) -> Result<()> {
    for (name, value) in losses {
        if let Some(v) = value
            && !v.is_finite()
        {
            bail!(
                "training stopped: the {name} became {v} at epoch {epoch}; {} (try a smaller --lr)",
                kept(dir, last_commit)
            );
        }
    }
    for (kind, table, values) in weights {
        for e in table.entries() {
            let part = &values[e.range()];
            if let Some((i, v)) = part.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                bail!(
                    "training stopped: the {kind} weight {} became non-finite at epoch {epoch} ({v} at flat index {i}); {} (try a smaller --lr)",
                    e.name,
                    kept(dir, last_commit)
                );
            }
        }
    }
    Ok(())
}

/// What a model family gives the one training loop ([`run_epochs`]): its batches, its
/// evaluation, its files. The loop does the rest, alike for every family.
pub trait Family {
    /// The batch its [`TrainStep`] takes.
    type Batch;
    /// One line of `metrics.jsonl`.
    type Metrics: serde::Serialize;

    /// The batches of one epoch (index lists into the training set), drawn from `rng`.
    fn batches(&self, rng: &mut StdRng) -> Vec<Vec<usize>>;

    /// The global batch of examples `idx` with every draw made (pixels, noise, timesteps, in
    /// that order from `rng` and `noise`), and its number of examples.
    fn batch(
        &self,
        idx: &[usize],
        rng: &mut StdRng,
        noise: &mut Noise,
    ) -> Result<(Self::Batch, usize)>;

    /// The learning rate of (1-based) `epoch`.
    fn lr(&self, epoch: usize) -> f64;

    /// After each update of the parameters: the running average of the weights, where the
    /// family keeps one ([`Family::average`]), and nothing else.
    fn updated(&mut self, _params: &[f32], _adam_step: u64) {}

    /// The family's running average of the weights (the diffusion EMA) and its decay after
    /// update `adam_step`: what [`Family::updated`] computes, for a step that keeps the average
    /// where it runs ([`TrainStep::resident`]). `None`: no average.
    fn average(&mut self, _adam_step: u64) -> Option<(&mut [f32], f32)> {
        None
    }

    /// After each step, with its batch and its sums over every rank (the loss-aware
    /// timestep sampler learns from them).
    fn step_done(&mut self, _batch: &Self::Batch, _sums: &[f64]) {}

    /// The end of an epoch: the evaluation, the metrics and, when `end.commit`, the files.
    fn end_epoch(&mut self, end: &EpochEnd<'_>) -> Result<EpochReport<Self::Metrics>>;

    /// After the epoch's commit, on rank 0 (the report's pictures).
    fn after_commit(&mut self, _epoch: usize, _params: &[f32]) -> Result<()> {
        Ok(())
    }
}

/// The minibatches of one epoch over `n` examples: a shuffle (from `rng`) cut into batches of
/// `batch_size` (the last one shorter).
pub fn shuffled_batches(n: usize, batch_size: usize, rng: &mut StdRng) -> Vec<Vec<usize>> {
    use rand::seq::SliceRandom;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

/// What the loop knows at the end of an epoch.
pub struct EpochEnd<'a> {
    pub epoch: usize,
    /// The parameters (the step's table's layout) and the optimiser.
    pub params: &'a [f32],
    pub table: &'a ParamTable,
    pub adam: &'a Adam,
    /// The epoch's step sums (the loss first), added over the steps and ranks.
    pub sums: &'a [f64],
    pub steps: usize,
    pub lr: f64,
    pub started: Instant,
    /// Whether this process commits (rank 0 of a run with a folder): the files are wanted.
    pub commit: bool,
}

/// What a family reports at the end of an epoch.
pub struct EpochReport<M> {
    pub metrics: M,
    /// The losses that must be finite for the epoch to commit (name, value).
    pub losses: Vec<(&'static str, Option<f64>)>,
    /// Weights besides the parameters that must be finite (an average of the weights).
    pub weights: Vec<(&'static str, Vec<f32>)>,
    /// The files of the commit (empty unless `EpochEnd::commit`).
    pub files: Vec<(&'static str, Vec<u8>)>,
    /// The line printed for the epoch.
    pub line: String,
}

/// Where the loop runs: its folder and commit (rank 0), its epochs and seed.
pub struct LoopOptions<'a> {
    /// The run folder (`None`: in memory).
    pub dir: Option<&'a Path>,
    /// Rank 0's run, which commits every epoch (`None` on the other ranks and in memory).
    pub run: Option<&'a mut RunDir>,
    pub seed: u64,
    pub start_epoch: usize,
    pub epochs: usize,
    pub show_progress: bool,
}

/// The one training loop: epochs `start_epoch + 1..=epochs` of `family` on `step`, Adam on
/// the flat buffer `params`. Each epoch draws its order, pixels and noise from
/// `derive_seed(seed, 1, epoch)` (and `+ 1` for the noise); each step runs this rank's rows
/// of the global batch ([`crate::collective::my_shard`]), sums the gradients and sums over the
/// ranks, stops on a non-finite loss with the last commit kept, and updates the parameters.
/// Each epoch ends with the family's evaluation, a check that everything is finite, and one
/// atomic commit. Returns the epochs' metrics.
pub fn run_epochs<F: Family>(
    family: &mut F,
    step: &mut dyn TrainStep<Batch = F::Batch>,
    params: &mut [f32],
    adam: &mut Adam,
    options: LoopOptions<'_>,
) -> Result<Vec<F::Metrics>> {
    let world = crate::collective::world();
    let LoopOptions {
        dir,
        mut run,
        seed,
        start_epoch,
        epochs,
        show_progress,
    } = options;
    let table = step.table().clone();
    let mut grads = vec![0f32; table.len()];
    let mut all = Vec::new();
    for epoch in start_epoch + 1..=epochs {
        let started = Instant::now();
        let mut rng = StdRng::seed_from_u64(derive_seed(seed, 1, epoch as u64));
        let mut noise = Noise::new(derive_seed(seed, 1, epoch as u64).wrapping_add(1));
        let batches = family.batches(&mut rng);
        let bar = epoch_bar(batches.len(), epoch, epochs, show_progress);
        let lr = family.lr(epoch);
        adam.config.lr = lr;
        let mut totals: Vec<f64> = Vec::new();
        // Parameters and moments stay where the step runs for the epoch (one process only:
        // ranks sum their gradients before the update).
        let resident = step.resident() && world.world_size() == 1;
        if resident {
            let count = adam.step_count();
            let (m, v) = adam.moments_mut();
            let average = family.average(count).map(|(a, _)| a);
            step.load_resident(&crate::engine::Resident {
                params,
                m,
                v,
                average,
            })?;
        }
        for (i, idx) in batches.iter().enumerate() {
            let (batch, rows) = family.batch(idx, &mut rng, &mut noise)?;
            crate::fault::training_step(world.rank());
            let mine = crate::collective::my_shard(rows);
            let mut sums = if resident {
                let scalars = adam.advance();
                let decay = family.average(adam.step_count()).map(|(_, d)| d);
                step.step_resident(&batch, scalars, decay)?
            } else {
                step.loss_and_grads(params, &batch, mine, &mut grads)?
            };
            if world.world_size() > 1 {
                crate::collective::all_reduce_buckets(&mut grads)?;
                world.all_reduce_sum_f64(&mut sums)?;
            }
            let loss = sums.first().copied().unwrap_or(f64::NAN);
            if !loss.is_finite() {
                bar.abandon();
                // Every epoch commits, so the last one is epoch - 1 on every rank.
                let last = run.as_deref().map_or(epoch - 1, RunDir::last_epoch);
                bail!(
                    "training stopped: the loss became {loss} at epoch {epoch}, step {}; {} (try a smaller --lr)",
                    i + 1,
                    kept(dir, last)
                );
            }
            if !resident {
                adam.step(params, &grads, step.update_threads())?;
                step.updated(params)?;
                family.updated(params, adam.step_count());
            }
            family.step_done(&batch, &sums);
            totals.resize(sums.len(), 0.0);
            for (t, s) in totals.iter_mut().zip(&sums) {
                *t += s;
            }
            bar.set_message(format!("loss {loss:.4}"));
            bar.inc(1);
        }
        bar.finish_and_clear();
        if resident {
            let count = adam.step_count();
            let (m, v) = adam.moments_mut();
            let average = family.average(count).map(|(a, _)| a);
            step.store_resident(&mut crate::engine::Resident {
                params,
                m,
                v,
                average,
            })?;
        }
        let report = family.end_epoch(&EpochEnd {
            epoch,
            params,
            table: &table,
            adam,
            sums: &totals,
            steps: batches.len(),
            lr,
            started,
            commit: run.is_some(),
        })?;
        let last = run.as_deref().map_or(epoch - 1, RunDir::last_epoch);
        let mut weights: Vec<(&str, &ParamTable, &[f32])> = vec![("model", &table, params)];
        for (kind, values) in &report.weights {
            weights.push((kind, &table, values));
        }
        check_epoch_finite(epoch, last, dir, &report.losses, &weights)?;
        if let Some(run) = run.as_deref_mut() {
            let files: Vec<(&str, &[u8])> = report
                .files
                .iter()
                .map(|(name, bytes)| (*name, bytes.as_slice()))
                .collect();
            let line = serde_json::to_string(&report.metrics)?;
            run.commit(epoch, adam.step_count(), &files, &line)?;
        }
        if show_progress {
            eprintln!("{}", report.line);
        }
        if world.rank() == 0 {
            family.after_commit(epoch, params)?;
        }
        all.push(report.metrics);
    }
    Ok(all)
}

/// Writes `dir/report.html` at the end of a run. A report that cannot be drawn does not undo
/// the training: it is a warning (with `show`), the run's files are all in place.
pub fn write_report(dir: &Path, show: bool) {
    let out = dir.join("report.html");
    match crate::report::write_report(dir, &out) {
        Ok(()) if show => eprintln!("report: {}", out.display()),
        Ok(()) => {}
        Err(e) => eprintln!(
            "warning: no report: {}",
            format!("{e:#}").replace('\n', " ")
        ),
    }
}

/// The progress bar of one epoch of `steps` steps (hidden unless `show`).
pub fn epoch_bar(steps: usize, epoch: usize, epochs: usize, show: bool) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(steps as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("epoch {prefix} {bar:30} {pos}/{len} {msg} [{elapsed}<{eta}]")
            .expect("valid template"),
    );
    bar.set_prefix(format!("{epoch}/{epochs}"));
    bar
}
