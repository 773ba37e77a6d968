//! The `elbo` command line, one file per command family: `train.rs`, `eval.rs`, `sample.rs`
//! (sample and reconstruct), `report.rs`, `schedule.rs`. This file holds the argument tree,
//! the device choice, the dispatch and the helpers the commands share.

mod eval;
mod export;
mod report;
mod sample;
mod schedule;
mod train;

use std::path::PathBuf;

use eval::{EvalDiffusionArgs, EvalVaeArgs};
use report::ReportArgs;
use sample::{ReconstructVaeArgs, SampleDiffusionArgs, SampleVaeArgs};
use schedule::ScheduleArgs;
use train::{TrainDiffusionArgs, TrainVaeArgs};

use anyhow::{Result, bail};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use rand::SeedableRng;
use rand::rngs::StdRng;

use elbo::data::{Named, PixelMode, Source, Split};
use elbo::diffusion::model::{DiffusionConfig, LoadedDiffusion, image_batch};
use elbo::diffusion::nets::NetConfig;
use elbo::diffusion::sampler::{SamplerKind, ddim_sample, ddpm_sample};
use elbo::diffusion::{BetaSchedule, Decoder, Prediction, Schedule, VarianceType};
use elbo::distributions::Noise;
use elbo::plot::save_signed_image_grid as save_image_grid;
use elbo::train::diffusion::{DiffusionData, DiffusionTrainConfig, train_diffusion};
use elbo::train::{TrainConfig, train_vae};
use elbo::vae::{self, Likelihood, Vae, VaeConfig};

#[derive(Parser)]
#[command(
    name = "elbo",
    version,
    about = "Variational inference for deep generative models"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Never fetch a named data set or a hub checkpoint: what the caches lack is an error.
    #[arg(long, global = true)]
    offline: bool,
    /// Where tensors live: auto (the first CUDA GPU when built with --features cuda and one
    /// answers, else the CPU), cpu, or cuda (an error without one). ELBO_DEVICE sets it for
    /// every command (so the CLI tests can run on a GPU: ELBO_DEVICE=cuda cargo test).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "auto",
        env = "ELBO_DEVICE"
    )]
    device: DeviceChoice,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model.
    Train {
        #[command(subcommand)]
        model: TrainModel,
    },
    /// Evaluate a checkpoint: -ELBO, its two parts, and the importance-sampled NLL.
    Eval {
        #[command(subcommand)]
        model: EvalModel,
    },
    /// Draw samples from the prior and decode them into a PNG grid.
    Sample {
        #[command(subcommand)]
        model: SampleModel,
    },
    /// Encode and decode data; write originals and reconstructions as a PNG grid.
    Reconstruct {
        #[command(subcommand)]
        model: ReconstructModel,
    },
    /// Write a model in another project's format.
    Export {
        #[command(subcommand)]
        format: ExportFormat,
    },
    /// Print a DDPM noise schedule and its derived arrays.
    Schedule(ScheduleArgs),
    /// Write a run's report: one self-contained HTML page (curves, evaluation, samples, latent
    /// space), also written as RUN_DIR/report.html at the end of training.
    Report(ReportArgs),
}

#[derive(Subcommand)]
enum TrainModel {
    /// The text's VAE (MLP 784-256-32) by maximising the ELBO with Adam.
    Vae(TrainVaeArgs),
    /// A DDPM (U-Net on images, MLP on 2-D toys) with the simplified loss.
    Diffusion(TrainDiffusionArgs),
}

#[derive(Subcommand)]
enum EvalModel {
    Vae(EvalVaeArgs),
    /// The full variational bound L_0 + sum L_t + L_T, in nats and bits/dim.
    Diffusion(EvalDiffusionArgs),
}

#[derive(Subcommand)]
enum SampleModel {
    Vae(SampleVaeArgs),
    /// DDPM ancestral or DDIM sampling.
    Diffusion(SampleDiffusionArgs),
}

#[derive(Subcommand)]
enum ExportFormat {
    /// A diffusion model (elbo's DDPM-layout U-Net and its schedule) as a diffusers
    /// DDPMPipeline folder that `DDPMPipeline.from_pretrained(OUT_DIR)` loads.
    Diffusers(export::ExportDiffusersArgs),
}

#[derive(Subcommand)]
enum ReconstructModel {
    Vae(ReconstructVaeArgs),
}

/// Where the data comes from (`--data` wins over `--dataset`).
#[derive(Args, Clone)]
struct DataArgs {
    /// A built-in data set.
    #[arg(long, value_enum)]
    dataset: Option<Named>,
    /// A folder in the MNIST layout (IDX files), an image folder (train/<class>/*.png|jpg),
    /// a CIFAR binary .tar.gz, or a NumPy .npz / .npy file.
    #[arg(long, value_name = "PATH")]
    data: Option<PathBuf>,
    /// Pixel mode: grey levels in [0,1], threshold at 0.5, or a fresh Bernoulli draw
    /// [default: none; train vae --preset iwae-paper: dynamic].
    #[arg(long, value_enum)]
    binarize: Option<PixelMode>,
}

impl DataArgs {
    fn pixels(&self) -> PixelMode {
        self.binarize.unwrap_or(PixelMode::Grey)
    }

    fn source(&self) -> Source {
        Source::from_flags(self.dataset, self.data.clone())
    }
}

fn device(choice: DeviceChoice) -> Result<Device> {
    if choice == DeviceChoice::Cpu {
        return Ok(Device::Cpu);
    }
    #[cfg(feature = "cuda")]
    {
        // Under mpirun, one GPU per process on each machine: the process's local rank, round
        // robin when the ranks outnumber the GPUs (the host all-reduce lets ranks share a GPU;
        // NCCL refuses it).
        let local_rank = [
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "MPI_LOCALRANKID",
            "SLURM_LOCALID",
        ]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
        .unwrap_or(0);
        let gpus = candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
            .map_or(1, |n| n.max(1) as usize);
        let ordinal = local_rank % gpus;
        match Device::new_cuda(ordinal) {
            Ok(d) => return Ok(d),
            Err(e) if choice == DeviceChoice::Cuda => {
                bail!("--device cuda: no CUDA device answers ({e})")
            }
            Err(e) => {
                let e = format!("{e}").replace('\n', " ");
                eprintln!("note: no CUDA device answers ({e}); running on the CPU");
            }
        }
    }
    if choice == DeviceChoice::Cuda && !cfg!(feature = "cuda") {
        bail!(
            "--device cuda: this elbo was built without CUDA (cargo build --features cuda, see scripts/cuda-toolchain)"
        );
    }
    Ok(Device::Cpu)
}

pub fn run(cli: Cli) -> Result<()> {
    elbo::data::datasets::set_offline(cli.offline);
    let device = device(cli.device)?;
    let parallel = matches!(cli.command, Command::Train { .. } | Command::Eval { .. });
    if !parallel && !elbo::collective::is_main() {
        return Ok(()); // under mpirun, rank 0 alone samples, reconstructs and reports
    }
    match cli.command {
        Command::Train {
            model: TrainModel::Vae(a),
        } => train::train_vae_command(a, &device),
        Command::Train {
            model: TrainModel::Diffusion(a),
        } => train::train_diffusion_command(a, &device),
        Command::Eval {
            model: EvalModel::Vae(a),
        } => eval::eval_vae(a, &device),
        Command::Eval {
            model: EvalModel::Diffusion(a),
        } => eval::eval_diffusion(a, &device),
        Command::Sample {
            model: SampleModel::Vae(a),
        } => sample::sample_vae_command(a, &device),
        Command::Sample {
            model: SampleModel::Diffusion(a),
        } => sample::sample_diffusion(a, &device),
        Command::Reconstruct {
            model: ReconstructModel::Vae(a),
        } => sample::reconstruct_vae_command(a, &device),
        Command::Report(a) => report::report_command(a),
        Command::Export {
            format: ExportFormat::Diffusers(a),
        } => export::export_diffusers(a),
        Command::Schedule(a) => schedule::schedule_command(a),
    }
}

/// Multiply-adds of one network evaluation, from above: each weight used once per pixel (a
/// convolution's weights are, at the first level; lower levels use them less).
fn diffusion_net_cost(config: &DiffusionConfig) -> u64 {
    let params = config.net.parameter_count().unwrap_or(u64::MAX / 4);
    let pixels = config
        .image_shape()
        .map_or(1, |s| (s.height * s.width) as u64);
    params.saturating_mul(pixels)
}

/// A progress bar over `len` units of `unit` (hidden when stderr is not a terminal).
fn progress(len: u64, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:30}} {{human_pos}}/{{human_len}} {unit} [{{elapsed}}<{{eta}}]"
        ))
        .expect("valid template"),
    );
    bar
}

/// Refuses an `--n` whose samples and PNG grid (per pixel: two f32 copies of the samples and
/// up to 3 bytes of the picture) exceed the memory budget, before anything is drawn.
fn check_grid_memory(n: usize, pixels_per_image: usize) -> Result<()> {
    elbo::limits::check_bytes(
        &format!("--n {n}"),
        "the samples and their PNG grid",
        elbo::limits::product(&[n as u64, pixels_per_image as u64 * (4 * 2 + 3)]),
    )
}

/// Fails, naming the checkpoint, when an evaluation gave a non-finite number: weights that
/// are finite but overflow float32 on this data.
fn check_finite_result(checkpoint: &std::path::Path, values: &[(&str, f64)]) -> Result<()> {
    if let Some((name, v)) = values.iter().find(|(_, v)| !v.is_finite()) {
        bail!(
            "{}: evaluation gave {name} = {v}: its weights overflow float32 on this data",
            checkpoint.display()
        );
    }
    Ok(())
}

/// Fails unless the model takes the data's images (C x H x W values each).
fn check_model_takes(vae: &Vae, data: &elbo::data::Dataset, what: &str) -> Result<()> {
    if vae.config.input_dim != data.shape.dim() {
        bail!(
            "{what}: images are {} ({} values), but the checkpoint's model takes {} values",
            data.shape,
            data.shape.dim(),
            vae.config.input_dim
        );
    }
    Ok(())
}

/// Fails unless `dir` (from `--report`) is a run folder holding a run of `kind` ("vae" or
/// "diffusion"); checked before an evaluation starts and again before its results are written.
fn check_report_run(dir: &std::path::Path, kind: &str) -> Result<()> {
    let config = dir.join("config.json");
    if !config.exists() {
        bail!(
            "--report {}: not a run folder (no config.json); give the folder train --out wrote",
            dir.display()
        );
    }
    let run_kind = elbo::report::run_kind(dir)?;
    if run_kind != kind {
        bail!(
            "--report {}: holds a {run_kind} run, but this is eval {kind}; give the folder of a {kind} run",
            dir.display()
        );
    }
    Ok(())
}

/// A diffusion model for sampling or evaluation: elbo's checkpoint, a folder diffusers wrote
/// (`elbo::interop::diffusers`), or an improved-diffusion `.pt` with its flags
/// (`elbo::interop::improved_diffusion`).
fn load_diffusion(
    path: &std::path::Path,
    flags: &elbo::interop::improved_diffusion::ModelFlags,
    device: &Device,
) -> Result<LoadedDiffusion> {
    use elbo::interop::improved_diffusion as id;
    if id::is_checkpoint(path) {
        let m = id::load(path, flags, device)?;
        for note in flags.notes() {
            eprintln!("note: {note}");
        }
        return Ok(m);
    }
    if let Some(flag) = flags.first_given() {
        bail!(
            "{flag} describes an improved-diffusion / guided-diffusion checkpoint; {} is not one (a .pt file)",
            path.display()
        );
    }
    if elbo::interop::diffusers::is_diffusers_folder(path) {
        return elbo::interop::diffusers::load(path, device);
    }
    if let Some(text) = path
        .to_str()
        .filter(|t| elbo::interop::hub::looks_like_id(t))
    {
        let folder = elbo::interop::hub::resolve(text, elbo::data::datasets::offline())?;
        return elbo::interop::diffusers::load(&folder, device);
    }
    // An elbo run folder: its EMA model.
    let model = path.join(elbo::run_dir::MODEL);
    if path.is_dir() && model.is_file() {
        return LoadedDiffusion::load(&model, device);
    }
    LoadedDiffusion::load(path, device)
}

/// The variance of p_theta for sampling and the bound: `--variance`'s, else the model's own
/// (fixed-small where it names none). A model that learned its variances takes no other, and
/// one that did not cannot be asked for learned ones.
fn model_variance(
    process: &elbo::diffusion::GaussianDiffusion,
    flag: Option<elbo::diffusion::VarianceType>,
) -> Result<elbo::diffusion::VarianceType> {
    use clap::ValueEnum;
    use elbo::diffusion::VarianceType;
    let own = process.variance;
    let name = |v: VarianceType| {
        v.to_possible_value()
            .map_or_else(|| format!("{v:?}"), |p| p.get_name().to_string())
    };
    match (own, flag) {
        (Some(o), Some(f)) if o.is_learned() && f != o => bail!(
            "--variance {}: the model learned its variances ({}); leave out --variance",
            name(f),
            name(o)
        ),
        (o, Some(f)) if f.is_learned() && o != Some(f) => bail!(
            "--variance {}: this model's network gives no variances (fixed-small or fixed-large)",
            name(f)
        ),
        (_, Some(f)) => Ok(f),
        (o, None) => Ok(o.unwrap_or(VarianceType::FixedSmall)),
    }
}

/// Writes `results` as `dir/eval.json` and refreshes `dir/report.html`.
fn save_eval_report(dir: &std::path::Path, kind: &str, results: &serde_json::Value) -> Result<()> {
    check_report_run(dir, kind)?;
    let path = dir.join(elbo::report::EVAL_FILE);
    elbo::files::write_atomic(&path, serde_json::to_string_pretty(results)?.as_bytes())?;
    let out = dir.join("report.html");
    elbo::report::write_report(dir, &out)?;
    eprintln!("report: {}", out.display());
    Ok(())
}

/// A comma-separated list of sizes (`200,200`), each at least 1; `flag` names it in errors.
fn parse_sizes(flag: &str, text: &str) -> Result<Vec<usize>> {
    text.split(',')
        .map(|v| match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("{flag}: expected sizes of at least 1 separated by commas (like 200,200), got {text:?}"),
        })
        .collect()
}
