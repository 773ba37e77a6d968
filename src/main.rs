//! The `elbo` command line: train, evaluate, sample and reconstruct.

use std::path::PathBuf;

/// mimalloc keeps freed tensor buffers for reuse instead of returning them to the system, so an
/// eager training step stops paying a page fault per fresh buffer (measured: see bench/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use rand::SeedableRng;
use rand::rngs::StdRng;

use elbo::data::{Named, PixelMode, Source, Split};
use elbo::diffusion::model::{DiffusionConfig, LoadedDiffusion, image_batch, save_image_grid};
use elbo::diffusion::nets::NetConfig;
use elbo::diffusion::sampler::{SamplerKind, ddim_sample, ddpm_sample};
use elbo::diffusion::{BetaSchedule, Decoder, Prediction, Schedule, VarianceType};
use elbo::distributions::Noise;
use elbo::train::diffusion::{DiffusionData, DiffusionTrainConfig, train_diffusion};
use elbo::train::{TrainConfig, train_vae};
use elbo::vae::{self, Likelihood, Vae, VaeConfig};

#[derive(Parser)]
#[command(
    name = "elbo",
    version,
    about = "Variational inference for deep generative models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Never fetch a named data set: a file missing from the cache is an error.
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
    /// Print a DDPM noise schedule and its derived arrays.
    Schedule(ScheduleArgs),
    /// Write a run's report: one self-contained HTML page (curves, evaluation, samples, latent
    /// space), also written as RUN_DIR/report.html at the end of training.
    Report(ReportArgs),
}

#[derive(Args)]
struct ReportArgs {
    /// The run folder (`train --out`).
    run_dir: PathBuf,
    /// Where to write the page [default: RUN_DIR/report.html].
    #[arg(long, value_name = "FILE.html")]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct ScheduleArgs {
    #[arg(long, value_enum, default_value = "linear")]
    beta_schedule: BetaSchedule,
    /// The number of diffusion steps T (diffusers' `num_train_timesteps`).
    #[arg(
        long = "num-train-timesteps",
        visible_alias = "timesteps",
        allow_negative_numbers = true,
        default_value_t = 1000
    )]
    num_train_timesteps: usize,
    /// One JSON object with every array (index t = 0..T-1).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TrainDiffusionArgs {
    /// mnist-10k (default), mnist, fashion-mnist, cifar10, cifar100, or
    /// toy:moons|swiss-roll|8gaussians|ring.
    #[arg(long)]
    dataset: Option<String>,
    /// Images from PATH, as for `train vae --data` (wins over --dataset).
    #[arg(long, value_name = "PATH")]
    data: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "linear")]
    beta_schedule: BetaSchedule,
    /// The number of diffusion steps T (diffusers' `num_train_timesteps`).
    #[arg(
        long = "num-train-timesteps",
        visible_alias = "timesteps",
        allow_negative_numbers = true,
        default_value_t = 1000
    )]
    num_train_timesteps: usize,
    /// What the network predicts.
    #[arg(long, value_enum, default_value = "eps")]
    prediction: Prediction,
    /// Epochs (the default U-Net gives recognisable digits after 20, ~19 min on 2 cores).
    #[arg(long, allow_negative_numbers = true, default_value_t = 20)]
    epochs: usize,
    #[arg(long, allow_negative_numbers = true, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3, allow_hyphen_values = true)]
    lr: f64,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.999)]
    ema_decay: f64,
    /// U-Net base channels (images) or MLP width (toys).
    #[arg(long, allow_negative_numbers = true)]
    channels: Option<usize>,
    /// U-Net channel multiplier of each level (default 1,2,2: 28, 14, 7 pixels for MNIST;
    /// DDPM's CIFAR-10 net: 1,2,2,2).
    #[arg(long, value_name = "M,M,..")]
    channel_mult: Option<String>,
    /// U-Net in DDPM's layout with N residual blocks per level (DDPM: 2); without it, the
    /// compact layout (one block per level).
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    res_blocks: Option<usize>,
    /// U-Net levels (0 = full resolution) whose blocks are followed by self-attention (DDPM's
    /// CIFAR-10 net: 1, at 16 x 16).
    #[arg(long, value_name = "L,L,..")]
    attention_levels: Option<String>,
    /// U-Net dropout probability in every residual block (DDPM's CIFAR-10 net: 0.1).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    dropout: f32,
    /// Toy data: optimizer steps per epoch.
    #[arg(long, allow_negative_numbers = true, default_value_t = 500)]
    toy_steps_per_epoch: usize,
    /// DDIM steps for the samples written at the end.
    #[arg(long, allow_negative_numbers = true, default_value_t = 50)]
    sample_steps: usize,
    /// Implementation of the training step: auto is the fused CPU engine for the U-Net.
    #[arg(long, value_enum, default_value = "auto")]
    engine: elbo::train::Engine,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "runs/diffusion")]
    out: PathBuf,
    #[arg(long)]
    resume: bool,
    /// Images: hold out the last N training images as a validation split.
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    valid: Option<usize>,
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    train_limit: Option<usize>,
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    test_limit: Option<usize>,
}

#[derive(Args)]
struct SampleDiffusionArgs {
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    #[arg(long, value_enum, default_value = "ddim")]
    sampler: SamplerKind,
    /// Sampling steps (diffusers' `num_inference_steps`; DDIM only, DDPM always takes all T).
    #[arg(long, allow_negative_numbers = true, default_value_t = 50)]
    steps: usize,
    /// DDIM noise: 0 is deterministic.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    eta: f64,
    /// DDPM variance: fixed-small (posterior variance) or fixed-large (beta).
    #[arg(long, value_enum, default_value = "fixed-small")]
    variance: VarianceType,
    /// Do not clip the predicted x_0 to [-1, 1] (images clip by default).
    #[arg(long)]
    no_clip: bool,
    #[arg(long, allow_negative_numbers = true, default_value_t = 64)]
    n: usize,
    #[arg(long, value_name = "FILE.png", default_value = "samples.png")]
    out: PathBuf,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct EvalDiffusionArgs {
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    /// A named image set (mnist-10k, mnist, fashion-mnist, cifar10, cifar100) or toy:NAME
    /// (default: mnist-10k for image models).
    #[arg(long)]
    dataset: Option<String>,
    #[arg(long, value_name = "PATH")]
    data: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "test")]
    split: Split,
    /// Evaluate the first N examples (every one costs T network calls).
    #[arg(
        long,
        allow_negative_numbers = true,
        value_name = "N",
        default_value_t = 100
    )]
    limit: usize,
    #[arg(long, allow_negative_numbers = true, default_value_t = 50)]
    batch_size: usize,
    #[arg(long, value_enum, default_value = "fixed-small")]
    variance: VarianceType,
    /// Also draw L_t against t on log axes, with labels and units, as an SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
    /// Also write the results into RUN_DIR/eval.json and refresh RUN_DIR/report.html.
    #[arg(long, value_name = "RUN_DIR")]
    report: Option<PathBuf>,
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

/// A published protocol: its architecture, optimiser, schedule and data handling.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Preset {
    /// Burda, Grosse & Salakhutdinov (2015), Section 5: tanh MLPs 784-[200-200]-50 (or with
    /// `--latent-dim 100,50`, 784-[200-200]-100-[100-100]-50), Glorot initialisation, Adam
    /// (0.9, 0.999, eps 1e-4), batch 20, 3^i epochs at 1e-3 x 10^(-i/7) for i = 0..7 (3,280
    /// epochs), pixels binarized by a fresh Bernoulli draw. Flags given explicitly win.
    IwaePaper,
}

#[derive(Args)]
struct TrainVaeArgs {
    #[command(flatten)]
    data: DataArgs,
    /// A published protocol's settings (explicit flags win).
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// Epochs [default: 10; iwae-paper: 3280].
    #[arg(long, allow_negative_numbers = true)]
    epochs: Option<usize>,
    /// Examples per batch [default: 128; iwae-paper: 20].
    #[arg(long, allow_negative_numbers = true)]
    batch_size: Option<usize>,
    /// Adam learning rate (the base of --lr-schedule).
    #[arg(long, default_value_t = 1e-3, allow_hyphen_values = true)]
    lr: f64,
    /// How the learning rate changes over epochs [default: constant; iwae-paper: iwae-paper].
    #[arg(long, value_enum)]
    lr_schedule: Option<elbo::train::vae::LrSchedule>,
    /// Adam's epsilon [default: 1e-8; iwae-paper: 1e-4].
    #[arg(long, allow_hyphen_values = true)]
    adam_eps: Option<f64>,
    /// Initial parameters [default: pytorch; iwae-paper: glorot].
    #[arg(long, value_enum)]
    init: Option<vae::Init>,
    /// Sizes of the stochastic layers z_1,z_2,... bottom-up [default: 32; iwae-paper: 50].
    #[arg(long, value_name = "L1,L2,...", allow_negative_numbers = true)]
    latent_dim: Option<String>,
    /// Hidden widths of each stochastic layer's MLPs, layers separated by '/'
    /// [default: 256; iwae-paper: 200,200 or 200,200/100,100].
    #[arg(
        long,
        visible_alias = "hidden-dim",
        value_name = "H,H/H,H",
        allow_negative_numbers = true
    )]
    hidden: Option<String>,
    /// The MLPs' activation [default: relu; iwae-paper: tanh].
    #[arg(long, value_enum)]
    activation: Option<elbo::nn::activation::Activation>,
    /// A convolutional VAE: channels after each stride-2 convolution of the encoder (the
    /// decoder mirrors them with transposed convolutions), then the MLPs of --hidden.
    #[arg(long, value_name = "C1,C2,...")]
    conv: Option<String>,
    /// With --conv: a residual block after each convolution.
    #[arg(long)]
    residual: bool,
    /// Weight on the KL term (beta-VAE); 1 is the ELBO.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    beta: f64,
    /// Monte Carlo samples K of z per example for the reconstruction term.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
    mc_samples: usize,
    /// Maximise the ELBO, or the IWAE bound with K = --mc-samples.
    #[arg(long, value_enum, default_value = "elbo")]
    objective: elbo::train::Objective,
    /// The ELBO's top-layer KL: in closed form, or by Monte Carlo at the samples (Burda et
    /// al.'s code; Pyro's Trace_ELBO).
    #[arg(long, value_enum, default_value = "analytic")]
    kl: elbo::train::KlEstimator,
    /// Implementation of the training step: the fused CPU engine where it applies, or candle.
    #[arg(long, value_enum, default_value = "auto")]
    engine: elbo::train::Engine,
    /// Observation model p(x|z).
    #[arg(long, value_enum, default_value = "bernoulli")]
    likelihood: Likelihood,
    /// Gaussian likelihood: a fixed log sigma^2 (learned when omitted).
    #[arg(long, allow_hyphen_values = true)]
    obs_log_var: Option<f64>,
    /// Discretized logistic: a mixture of this many logistics per value (PixelCNN++'s).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
    mixtures: usize,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    seed: u64,
    /// Output folder for checkpoints, metrics and pictures.
    #[arg(long, default_value = "runs/vae")]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint, up to --epochs in all.
    #[arg(long)]
    resume: bool,
    /// Hold out the last N training examples as a validation split, reported with the test set.
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    valid: Option<usize>,
    /// Evaluate the test (and validation) set every N epochs and at the last
    /// [default: 1; iwae-paper: 10].
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    eval_every: Option<usize>,
    /// Use only the first N training examples (after --valid).
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    train_limit: Option<usize>,
    /// Use only the first N test examples.
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    test_limit: Option<usize>,
}

#[derive(Args)]
struct EvalVaeArgs {
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, value_enum, default_value = "test")]
    split: Split,
    /// Importance samples K per example for the log p(x) estimate.
    #[arg(long, allow_negative_numbers = true, default_value_t = 5000)]
    iw_samples: usize,
    /// Evaluate only the first N examples.
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    limit: Option<usize>,
    /// Examples per batch.
    #[arg(long, allow_negative_numbers = true, default_value_t = 100)]
    batch_size: usize,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the results into RUN_DIR/eval.json and refresh RUN_DIR/report.html.
    #[arg(long, value_name = "RUN_DIR")]
    report: Option<PathBuf>,
}

#[derive(Args)]
struct SampleVaeArgs {
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    #[arg(long, allow_negative_numbers = true, default_value_t = 64)]
    n: usize,
    #[arg(long, value_name = "FILE.png", default_value = "samples.png")]
    out: PathBuf,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct ReconstructVaeArgs {
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, value_enum, default_value = "test")]
    split: Split,
    #[arg(long, allow_negative_numbers = true, default_value_t = 32)]
    n: usize,
    #[arg(long, value_name = "FILE.png", default_value = "reconstructions.png")]
    out: PathBuf,
}

fn main() -> ExitCode {
    // candle asks for its thread count on every matrix product, and without RAYON_NUM_THREADS
    // that means reading /proc/cpuinfo each time (3% of a U-Net step): answer it once.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: first statement of main, before any other thread exists.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    }
    // Errors are one line whatever the shell sets: RUST_BACKTRACE=1 (common in developers'
    // shells) would make candle and anyhow capture a backtrace into every error message.
    // Panics still honour RUST_BACKTRACE; RUST_LIB_BACKTRACE=1 brings error backtraces back.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: as above, no other thread exists yet.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                let _ = e.print();
                return if e.use_stderr() {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            let text = e.render().to_string();
            eprintln!(
                "{} (see --help)",
                text.lines().next().unwrap_or("error: bad arguments")
            );
            return ExitCode::from(2);
        }
    };
    // MPI (with the `mpi` feature, under mpirun) or one process; finalised when this drops.
    let _process_group = match elbo::dist::init() {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let world = elbo::dist::world();
            let message = format!("{e:#}").replace('\n', " ");
            if world.world_size() > 1 {
                // The other ranks would wait for this one in their next collective: end the
                // whole job, saying which rank failed.
                eprintln!(
                    "error: rank {} of {}: {message}; ending every rank",
                    world.rank(),
                    world.world_size()
                );
                world.abort(1);
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
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

fn run(cli: Cli) -> Result<()> {
    elbo::data::datasets::set_offline(cli.offline);
    let device = device(cli.device)?;
    let parallel = matches!(cli.command, Command::Train { .. } | Command::Eval { .. });
    if !parallel && !elbo::dist::is_main() {
        return Ok(()); // under mpirun, rank 0 alone samples, reconstructs and reports
    }
    match cli.command {
        Command::Train {
            model: TrainModel::Vae(a),
        } => {
            if a.likelihood != Likelihood::Gaussian && a.obs_log_var.is_some() {
                bail!("--obs-log-var applies only to --likelihood gaussian");
            }
            // log sigma^2 of the decoder's Gaussian: exp() must stay a normal f32 and the
            // log-density -x^2 / (2 sigma^2) finite for pixels in [0, 1].
            if let Some(v) = a.obs_log_var
                && !(-30.0..=30.0).contains(&v)
            {
                bail!(
                    "--obs-log-var {v}: must be between -30 and 30 (the log-variance of the Gaussian decoder; exp(-30) is already 1e-13)"
                );
            }
            let paper = a.preset == Some(Preset::IwaePaper);
            let latent_dims = parse_sizes(
                "--latent-dim",
                a.latent_dim
                    .as_deref()
                    .unwrap_or(if paper { "50" } else { "32" }),
            )?;
            let default_hidden = match (paper, latent_dims.len()) {
                (false, _) => "256",
                (true, 1) => "200,200",
                (true, _) => "200,200/100,100",
            };
            let hidden = a
                .hidden
                .as_deref()
                .unwrap_or(default_hidden)
                .split('/')
                .map(|group| parse_sizes("--hidden", group))
                .collect::<Result<Vec<_>>>()?;
            let model = VaeConfig {
                input_dim: 0, // taken from the data
                image_shape: None,
                latent_dims,
                hidden,
                activation: a.activation.unwrap_or(if paper {
                    elbo::nn::activation::Activation::Tanh
                } else {
                    elbo::nn::activation::Activation::Relu
                }),
                likelihood: a.likelihood,
                obs_log_var: a.obs_log_var,
                mixtures: a.mixtures,
                conv: match (&a.conv, a.residual) {
                    (Some(c), residual) => Some(vae::model::ConvNet {
                        channels: parse_sizes("--conv", c)?,
                        residual,
                    }),
                    (None, true) => bail!("--residual applies only with --conv"),
                    (None, false) => None,
                },
            };
            use elbo::train::vae::LrSchedule;
            let config = TrainConfig {
                source: a.data.source(),
                epochs: a.epochs.unwrap_or(if paper {
                    LrSchedule::IwaePaper.epochs().unwrap_or(1)
                } else {
                    10
                }),
                batch_size: a.batch_size.unwrap_or(if paper { 20 } else { 128 }),
                lr: a.lr,
                lr_schedule: a.lr_schedule.unwrap_or(if paper {
                    LrSchedule::IwaePaper
                } else {
                    LrSchedule::Constant
                }),
                adam_eps: a.adam_eps.unwrap_or(if paper { 1e-4 } else { 1e-8 }),
                init: a.init.unwrap_or(if paper {
                    vae::Init::Glorot
                } else {
                    vae::Init::Pytorch
                }),
                beta: a.beta,
                mc_samples: a.mc_samples,
                objective: a.objective,
                kl: a.kl,
                engine: a.engine,
                pixels: a.data.binarize.unwrap_or(if paper {
                    PixelMode::Dynamic
                } else {
                    PixelMode::Grey
                }),
                seed: a.seed,
                valid: a.valid,
                eval_every: a.eval_every.unwrap_or(if paper { 10 } else { 1 }),
                train_limit: a.train_limit,
                test_limit: a.test_limit,
            };
            let started = std::time::Instant::now();
            train_vae(model, &config, &a.out, a.resume, true, &device)?;
            if !elbo::dist::is_main() {
                return Ok(());
            }
            eprintln!(
                "done in {:.1}s: {}/model.safetensors, metrics.jsonl, samples.png, reconstructions.png, pictures/, report.html",
                started.elapsed().as_secs_f64(),
                a.out.display()
            );
        }
        Command::Eval {
            model: EvalModel::Vae(a),
        } => eval_vae(a, &device)?,
        Command::Eval {
            model: EvalModel::Diffusion(a),
        } => eval_diffusion(a, &device)?,
        Command::Train {
            model: TrainModel::Diffusion(a),
        } => {
            let data = DiffusionData::from_flags(a.dataset.as_deref(), a.data.as_deref())?;
            if a.channels == Some(0) {
                bail!("--channels must be at least 1");
            }
            let unet_flags = a.channel_mult.is_some()
                || a.res_blocks.is_some()
                || a.attention_levels.is_some()
                || a.dropout != 0.0;
            let net = match (&data, a.channels) {
                (DiffusionData::Images(_), c) => match NetConfig::default_unet() {
                    NetConfig::Unet {
                        base,
                        channel_mult,
                        attention,
                        ..
                    } => {
                        let base = c.unwrap_or(base);
                        let levels = |flag: &str, text: &str| -> Result<Vec<usize>> {
                            text.split(',')
                                .map(|v| v.trim().parse::<usize>().map_err(|_| {
                                    anyhow::anyhow!("{flag}: expected level numbers separated by commas (like 1 or 1,2), got {text:?}")
                                }))
                                .collect()
                        };
                        NetConfig::Unet {
                            base,
                            channel_mult: match &a.channel_mult {
                                Some(m) => parse_sizes("--channel-mult", m)?,
                                None => channel_mult,
                            },
                            // GroupNorm groups: 8 in the compact layout, DDPM's 32 in its
                            // own (fewer where the width has no such divisor).
                            groups: elbo::diffusion::nets::gcd(
                                base,
                                if a.res_blocks.is_some() { 32 } else { 8 },
                            ),
                            attention,
                            in_channels: 1, // taken from the data
                            res_blocks: a.res_blocks,
                            attention_levels: match &a.attention_levels {
                                Some(l) => levels("--attention-levels", l)?,
                                None => Vec::new(),
                            },
                            dropout: a.dropout,
                        }
                    }
                    other => other,
                },
                (DiffusionData::Toy(_), _) if unet_flags => bail!(
                    "--channel-mult, --res-blocks, --attention-levels and --dropout shape the U-Net of image data; toy data trains an MLP"
                ),
                (DiffusionData::Toy(_), None) => NetConfig::default_mlp(2),
                (DiffusionData::Toy(_), Some(c)) => NetConfig::Mlp {
                    dim: 2,
                    hidden: c,
                    layers: 3,
                    time_dim: 32,
                },
            };
            let model = DiffusionConfig {
                net,
                beta_schedule: a.beta_schedule,
                num_train_timesteps: a.num_train_timesteps,
                prediction: a.prediction,
                image_shape: None, // taken from the data
            };
            model.process()?;
            let config = DiffusionTrainConfig {
                data,
                epochs: a.epochs,
                batch_size: a.batch_size,
                lr: a.lr,
                ema_decay: a.ema_decay,
                seed: a.seed,
                toy_steps_per_epoch: a.toy_steps_per_epoch,
                valid: a.valid,
                train_limit: a.train_limit,
                test_limit: a.test_limit,
                sample_steps: a.sample_steps,
                engine: a.engine,
            };
            let started = std::time::Instant::now();
            train_diffusion(model, &config, &a.out, a.resume, true, &device)?;
            if !elbo::dist::is_main() {
                return Ok(());
            }
            eprintln!(
                "done in {:.1}s: {}/model.safetensors (EMA), metrics.jsonl, samples.png, report.html",
                started.elapsed().as_secs_f64(),
                a.out.display()
            );
        }
        Command::Sample {
            model: SampleModel::Diffusion(a),
        } => sample_diffusion(a, &device)?,
        Command::Report(a) => {
            let out = a.out.unwrap_or_else(|| a.run_dir.join("report.html"));
            elbo::report::write_report(&a.run_dir, &out)?;
            eprintln!("report: {}", out.display());
        }
        Command::Schedule(a) => {
            let s = Schedule::new(a.beta_schedule, a.num_train_timesteps)?;
            if a.json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!(
                    "{:>5} {:>12} {:>12} {:>14} {:>14} {:>14} {:>12}",
                    "t", "beta", "alpha", "alphas_cumprod", "sqrt(1-abar)", "post_variance", "snr"
                );
                for t in 0..s.len() {
                    println!(
                        "{t:>5} {:>12.6e} {:>12.8} {:>14.8e} {:>14.8} {:>14.6e} {:>12.4e}",
                        s.betas[t],
                        s.alphas[t],
                        s.alphas_cumprod[t],
                        s.sqrt_one_minus_alphas_cumprod[t],
                        s.posterior_variance[t],
                        s.snr[t]
                    );
                }
            }
        }
        Command::Sample {
            model: SampleModel::Vae(a),
        } => {
            elbo::limits::count("--n", a.n, 1_000_000)?;
            let vae = Vae::load(&a.checkpoint, &device)?.frozen()?;
            let shape = elbo::train::image_shape(&vae)?;
            check_grid_memory(a.n, shape.dim())?;
            // Decoded 4,096 at a time (the same draws as one call), with progress.
            let bar = progress(a.n as u64, "samples");
            let mut noise = Noise::new(a.seed);
            let mut parts = Vec::new();
            for start in (0..a.n).step_by(4096) {
                let len = 4096.min(a.n - start);
                parts.push(vae::sample_prior(&vae, len, &mut noise)?);
                bar.inc(len as u64);
            }
            bar.finish_and_clear();
            let images = candle_core::Tensor::cat(&parts, 0)?;
            let cols = (a.n as f64).sqrt().ceil() as usize;
            elbo::plot::save_grid(&images, shape, cols, &a.out)?;
            eprintln!("wrote {} samples to {}", a.n, a.out.display());
        }
        Command::Reconstruct {
            model: ReconstructModel::Vae(a),
        } => {
            elbo::limits::count("--n", a.n, 1_000_000)?;
            let vae = Vae::load(&a.checkpoint, &device)?.frozen()?;
            let data = a.data.source().load(a.split)?;
            check_model_takes(&vae, &data, &a.data.source().describe())?;
            elbo::train::save_reconstructions(&vae, &data, a.data.pixels(), a.n, &a.out)?;
            eprintln!(
                "wrote {} originals and reconstructions to {}",
                a.n.min(data.len()),
                a.out.display()
            );
        }
    }
    Ok(())
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
    let text = String::from_utf8(elbo::files::read_regular_file(&config, 1 << 20)?)
        .with_context(|| format!("{}: not UTF-8 text", config.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", config.display()))?;
    let model = &value["model"];
    let run_kind = if model.get("latent_dims").is_some() {
        "vae"
    } else if model.get("net").is_some() {
        "diffusion"
    } else {
        "unknown"
    };
    if run_kind != kind {
        bail!(
            "--report {}: holds a {run_kind} run, but this is eval {kind}; give the folder of a {kind} run",
            dir.display()
        );
    }
    Ok(())
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

fn eval_vae(a: EvalVaeArgs, device: &Device) -> Result<()> {
    use elbo::limits::{COUNT_CEILING, count};
    count("--iw-samples", a.iw_samples, 10_000_000)?;
    count("--batch-size", a.batch_size, 1_000_000)?;
    count("--limit", a.limit.unwrap_or(1), COUNT_CEILING)?;
    if let Some(dir) = &a.report {
        check_report_run(dir, "vae")?;
    }
    let vae = Vae::load(&a.checkpoint, device)?.frozen()?;
    let mut data = a.data.source().load(a.split)?;
    check_model_takes(&vae, &data, &a.data.source().describe())?;
    if let Some(n) = a.limit {
        data = data.take(n);
    }
    if data.is_empty() {
        bail!("--limit 0: nothing to evaluate");
    }
    // One importance sample costs about a pass through the networks: 2 multiply-adds a weight.
    elbo::limits::check_work(
        &format!(
            "--iw-samples {} x {} examples (--limit)",
            a.iw_samples,
            data.len()
        ),
        (data.len() as u64).checked_mul(a.iw_samples as u64),
        2 * vae.config.parameter_count_checked().unwrap_or(u64::MAX / 4),
    )?;
    let bar = progress(
        (data.len() as u64).saturating_mul(a.iw_samples as u64),
        "importance samples",
    );
    if !elbo::dist::is_main() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let ev = elbo::eval::evaluate_vae(
        &vae,
        &data,
        a.data.pixels(),
        a.iw_samples,
        a.batch_size,
        a.seed,
        &|n| bar.inc(n),
    )?;
    let (log_px, rec, kl_layers, activity) =
        (ev.log_px, ev.reconstruction, ev.kl_layers, ev.activity);
    let layers = vae.config.layers();
    bar.finish_and_clear();
    use elbo::eval::{mean, standard_error as stderr};
    let kl_means: Vec<f64> = kl_layers.iter().map(|l| mean(l)).collect();
    let active: Vec<usize> = activity.iter().map(|a| a.active(1e-2)).collect();
    let (nll, reconstruction, kl_mean) =
        (-mean(&log_px), -mean(&rec), kl_means.iter().sum::<f64>());
    let neg_elbo = reconstruction + kl_mean;
    check_finite_result(&a.checkpoint, &[("-ELBO", neg_elbo), ("NLL", nll)])?;
    if !elbo::dist::is_main() {
        return Ok(()); // rank 0 reports what every rank computed
    }
    let results = serde_json::json!({
            "neg_elbo": neg_elbo,
            "reconstruction": reconstruction,
            "kl": kl_mean,
            "kl_layers": kl_means,
            "nll": nll,
            "gap": neg_elbo - nll,
            "nll_stderr": stderr(&log_px),
            "nll_bits_per_dim": elbo::eval::bits_per_dim(nll, vae.config.input_dim),
            "active_units": active,
            "iw_samples": a.iw_samples,
            "n": log_px.len(),
            "split": a.split,
            "checkpoint": a.checkpoint,
    });
    if let Some(dir) = &a.report {
        save_eval_report(dir, "vae", &results)?;
    }
    if a.json {
        println!("{results}");
    } else {
        println!("checkpoint      {}", a.checkpoint.display());
        println!("model           VAE {}", vae.config.describe());
        println!(
            "data            {} ({:?}), n = {}",
            a.data.source().describe(),
            a.split,
            log_px.len()
        );
        println!("-ELBO           {neg_elbo:10.3} nats per example");
        println!(
            "  reconstruction{reconstruction:10.3}   -E_q[log p(x|z)], K = {} samples",
            a.iw_samples
        );
        if layers == 1 {
            println!("  KL            {kl_mean:10.3}   KL(q(z|x) || p(z)), closed form");
        } else {
            for (l, kl) in kl_means.iter().enumerate() {
                let how = if l + 1 == layers {
                    format!("closed form given the sampled z_{l}")
                } else {
                    "Monte Carlo, E_q[log q(z|.) - log p(z|.)]".to_string()
                };
                println!("  KL layer {}    {kl:10.3}   {how}", l + 1);
            }
        }
        println!(
            "NLL (IS)        {nll:10.3}   -log p(x), importance sampling, K = {} (+- {:.3})",
            a.iw_samples,
            stderr(&log_px)
        );
        println!(
            "                {:10.4}   bits/dim (NLL / ({} ln 2))",
            elbo::eval::bits_per_dim(nll, vae.config.input_dim),
            vae.config.input_dim
        );
        println!(
            "gap             {:10.3}   -ELBO - NLL = KL(q(z|x) || p(z|x))",
            neg_elbo - nll
        );
        let units: Vec<String> = active
            .iter()
            .zip(&vae.config.latent_dims)
            .map(|(a, l)| format!("{a} of {l}"))
            .collect();
        println!(
            "active units    {}   Cov_x(E_q[u|x]) > 0.01 per layer",
            units.join(", ")
        );
    }
    Ok(())
}

fn sample_diffusion(a: SampleDiffusionArgs, device: &Device) -> Result<()> {
    elbo::limits::count("--n", a.n, 1_000_000)?;
    elbo::limits::count("--steps", a.steps, 100_000)?;
    if !(a.eta.is_finite() && a.eta >= 0.0) {
        bail!("--eta must be a non-negative number, got {}", a.eta);
    }
    let m = LoadedDiffusion::load(&a.checkpoint, device)?;
    check_grid_memory(a.n, m.config.image_shape().map_or(1, |s| s.dim()))?;
    let mut noise = Noise::new(a.seed);
    let clip = m.config.is_image() && !a.no_clip;
    let total = match a.sampler {
        SamplerKind::Ddpm => m.process.num_timesteps(),
        SamplerKind::Ddim => a.steps.min(m.process.num_timesteps()),
    };
    elbo::limits::check_work(
        &format!("--n {} x {total} steps (--sampler, --steps)", a.n),
        (a.n as u64).checked_mul(total as u64),
        diffusion_net_cost(&m.config),
    )?;
    // In chunks of 256 samples, so the network's activations stay bounded whatever --n is.
    const CHUNK: usize = 256;
    let bar = progress(
        (a.n.div_ceil(CHUNK) as u64).saturating_mul(total as u64),
        "network calls",
    );
    let started = std::time::Instant::now();
    let mut parts = Vec::new();
    for start in (0..a.n).step_by(CHUNK) {
        let len = CHUNK.min(a.n - start);
        let shape: Vec<usize> = match m.config.image_shape() {
            Some(s) => vec![len, s.channels, s.height, s.width],
            None => vec![len, 2],
        };
        let x_t = noise.randn(shape, device)?;
        parts.push(match a.sampler {
            SamplerKind::Ddpm => {
                ddpm_sample(&m.process, &m.net, x_t, a.variance, clip, &mut noise, &bar)?
            }
            SamplerKind::Ddim => ddim_sample(
                &m.process, &m.net, x_t, a.steps, a.eta, clip, &mut noise, &bar,
            )?,
        });
    }
    bar.finish_and_clear();
    let x = candle_core::Tensor::cat(&parts, 0)?;
    if m.config.is_image() {
        save_image_grid(&x, &a.out)?;
    } else {
        elbo::plot::save_scatter(&[&x.flatten_all()?.to_vec1::<f32>()?], &a.out)?;
    }
    eprintln!(
        "wrote {} samples ({:?}, {total} steps, {:.1}s) to {}",
        a.n,
        a.sampler,
        started.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

fn eval_diffusion(a: EvalDiffusionArgs, device: &Device) -> Result<()> {
    use elbo::limits::{COUNT_CEILING, count};
    count("--batch-size", a.batch_size, 1_000_000)?;
    count("--limit", a.limit, COUNT_CEILING)?;
    if let Some(dir) = &a.report {
        check_report_run(dir, "diffusion")?;
    }
    if let Some(p) = &a.plot
        && !p.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg"))
    {
        bail!(
            "--plot {}: the L_t plot is an SVG (axes, labels, units); name it FILE.svg",
            p.display()
        );
    }
    let m = LoadedDiffusion::load(&a.checkpoint, device)?;
    m.config.net.check_training_memory(
        a.batch_size.min(a.limit),
        m.config.image_shape().map_or(0, |s| s.height * s.width),
    )?;
    let (x_all, decoder, dims) = if m.config.is_image() {
        let data = DiffusionData::from_flags(a.dataset.as_deref(), a.data.as_deref())?;
        let DiffusionData::Images(source) = data else {
            bail!("--dataset: the checkpoint is an image model; give an image data set");
        };
        let d = source.load(a.split)?.take(a.limit);
        if m.config.image_shape() != Some(d.shape) {
            bail!(
                "{}: images are {}, but the checkpoint's model takes {}",
                source.describe(),
                d.shape,
                m.config
                    .image_shape()
                    .map_or("points".into(), |s| s.to_string())
            );
        }
        let idx: Vec<usize> = (0..d.len()).collect();
        (
            image_batch(&d, &idx, device)?,
            Decoder::Discretized,
            d.shape.dim(),
        )
    } else {
        let Some(toy) = a
            .dataset
            .as_deref()
            .and_then(|s| s.strip_prefix("toy:"))
            .and_then(elbo::data::toy::Toy::parse)
        else {
            bail!("--dataset: the checkpoint is a 2-D model; give toy:NAME");
        };
        elbo::limits::check_bytes(
            &format!("--limit {}", a.limit),
            "the toy points",
            elbo::limits::product(&[a.limit as u64, 2 * 4 * 4]),
        )?;
        let mut rng = StdRng::seed_from_u64(a.seed ^ 0x5eed);
        let pts = toy.sample(a.limit, &mut rng);
        (
            candle_core::Tensor::from_vec(pts, (a.limit, 2), device)?,
            Decoder::Continuous,
            2,
        )
    };
    let n = x_all.dim(0)?;
    let t_max = m.process.num_timesteps();
    elbo::limits::check_work(
        &format!("--limit {n} x {t_max} timesteps"),
        (n as u64).checked_mul(t_max as u64),
        diffusion_net_cost(&m.config),
    )?;
    let bar = indicatif::ProgressBar::new((n.div_ceil(a.batch_size) * t_max) as u64);
    if !elbo::dist::is_main() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let means = elbo::eval::bound_terms(
        &m.process,
        &m.net,
        &x_all,
        a.variance,
        decoder,
        a.batch_size,
        a.seed,
        &|| bar.inc(1),
    )?;
    bar.finish_and_clear();
    let (l0, lt, lp) = (means.l0, means.lt, means.l_prior);
    let lt_sum: f64 = lt.iter().sum();
    let total = l0 + lt_sum + lp;
    let bpd = elbo::eval::bits_per_dim(total, dims);
    check_finite_result(&a.checkpoint, &[("the bound", total)])?;
    if !elbo::dist::is_main() {
        return Ok(()); // rank 0 reports what every rank computed
    }
    if let Some(path) = &a.plot {
        let svg = elbo::report::lt_plot_svg(&lt)?;
        elbo::files::write_atomic(path, svg.as_bytes())?;
    }
    let results = serde_json::json!({
        "bpd": bpd, "nll_bound_nats": total, "l0": l0, "lt_sum": lt_sum, "lT": lp, "n": n,
        "lt": lt, "decoder": format!("{decoder:?}").to_lowercase(), "split": a.split,
        "checkpoint": a.checkpoint, "seconds": started.elapsed().as_secs_f64(),
    });
    if let Some(dir) = &a.report {
        save_eval_report(dir, "diffusion", &results)?;
    }
    if a.json {
        println!("{results}");
    } else {
        println!("checkpoint      {}", a.checkpoint.display());
        println!(
            "examples        {n} ({:?}), T = {t_max}, {:?} decoder",
            a.split, decoder
        );
        println!("bound           {total:10.3} nats per example = {bpd:.4} bits/dim");
        println!("  L_0           {l0:10.3}   -log p(x_0 | x_1)");
        println!(
            "  sum L_t       {lt_sum:10.3}   KL(q(x_t-1 | x_t, x_0) || p(x_t-1 | x_t)), t = 2..T"
        );
        println!("  L_T           {lp:10.5}   KL(q(x_T | x_0) || N(0, I))");
    }
    Ok(())
}
