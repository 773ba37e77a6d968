//! Training: the scaffolding both loops share (seeds, the training state's counters checked
//! against their commit, the epoch progress bar; the run folder itself is [`crate::run_dir`])
//! and one file per model family: [`vae`] (the VAE loop), [`diffusion`] (the diffusion
//! loop) and [`latent`] (training and evaluation for any `LatentVariableModel` of your own).

pub mod diffusion;
pub mod latent;
pub mod vae;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint;
use crate::data::{Dataset, Source, Split};
pub use crate::engine::Engine;
use crate::run_dir::Committed;
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

/// The gradients of `vars` from `loss.backward()` (`None`: this rank ran no rows, zeros)
/// summed over the ranks ([`crate::collective`]) with one all-reduce over their flat concatenation,
/// as a `GradStore` for [`crate::optim::Adam::step`]. With one process it returns them as
/// they are.
pub fn all_reduce_grads(
    vars: &[(String, candle_core::Var)],
    grads: Option<candle_core::backprop::GradStore>,
) -> Result<candle_core::backprop::GradStore> {
    use candle_core::Tensor;
    let world = crate::collective::world();
    if world.world_size() == 1
        && let Some(g) = grads
    {
        return Ok(g);
    }
    #[cfg(feature = "nccl")]
    if vars.first().is_some_and(|(_, v)| v.device().is_cuda()) {
        // On the GPUs: one flat device tensor, summed by NCCL, split back.
        let mut parts = Vec::with_capacity(vars.len());
        for (_, var) in vars {
            parts.push(match grads.as_ref().and_then(|g| g.get(var.as_tensor())) {
                Some(g) => g.flatten_all()?.to_dtype(candle_core::DType::F32)?,
                None => Tensor::zeros(var.elem_count(), candle_core::DType::F32, var.device())?,
            });
        }
        let summed = crate::collective::nccl::all_reduce(&Tensor::cat(&parts, 0)?)?;
        let mut store = candle_core::backprop::GradStore::default();
        let mut at = 0;
        for (_, var) in vars {
            let n = var.elem_count();
            let g = summed
                .narrow(0, at, n)?
                .reshape(var.shape())?
                .to_dtype(var.dtype())?;
            store.insert(var.as_tensor(), g);
            at += n;
        }
        return Ok(store);
    }
    let mut flat = Vec::new();
    for (_, var) in vars {
        match grads.as_ref().and_then(|g| g.get(var.as_tensor())) {
            Some(g) => flat.extend(
                g.flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()?,
            ),
            None => flat.resize(flat.len() + var.elem_count(), 0.0),
        }
    }
    crate::collective::all_reduce_buckets(&mut flat)?;
    let mut store = candle_core::backprop::GradStore::default();
    let mut at = 0;
    for (_, var) in vars {
        let n = var.elem_count();
        let t = Tensor::from_slice(&flat[at..at + n], var.shape(), var.device())?
            .to_dtype(var.dtype())?;
        store.insert(var.as_tensor(), t);
        at += n;
    }
    Ok(store)
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

/// Refuses to commit `epoch` when one of its losses (name, value) or weights (name, tensor) is
/// not finite: training stops with one line naming it, and the run keeps its last commit
/// (`last_commit`, 0 for none). Diffusion and VAE trainers alike call it before each commit.
pub fn check_epoch_finite(
    epoch: usize,
    last_commit: usize,
    dir: &Path,
    losses: &[(&str, Option<f64>)],
    weights: &[(&str, &[(String, candle_core::Tensor)])],
) -> Result<()> {
    let kept = || {
        if last_commit > 0 {
            format!(
                "the last good checkpoint {} (epoch {last_commit}) is kept",
                dir.join(crate::run_dir::MODEL).display()
            )
        } else {
            "no checkpoint had been written yet".to_string()
        }
    };
    for (name, value) in losses {
        if let Some(v) = value
            && !v.is_finite()
        {
            bail!(
                "training stopped: the {name} became {v} at epoch {epoch}; {} (try a smaller --lr)",
                kept()
            );
        }
    }
    for (kind, tensors) in weights {
        for (name, t) in tensors.iter() {
            if let Err(e) = checkpoint::check_finite(t) {
                bail!(
                    "training stopped: the {kind} weight {name} became non-finite at epoch {epoch} ({e}); {} (try a smaller --lr)",
                    kept()
                );
            }
        }
    }
    Ok(())
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
