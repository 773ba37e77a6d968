//! The `elbo` command line: train, evaluate, sample and reconstruct.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use rand::SeedableRng;
use rand::rngs::StdRng;

use elbo::data::{Named, PixelMode, Source, Split};
use elbo::distributions::Noise;
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
}

#[derive(Subcommand)]
enum TrainModel {
    /// The text's VAE (MLP 784-256-32) by maximising the ELBO with Adam.
    Vae(TrainVaeArgs),
}

#[derive(Subcommand)]
enum EvalModel {
    Vae(EvalVaeArgs),
}

#[derive(Subcommand)]
enum SampleModel {
    Vae(SampleVaeArgs),
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
    /// A folder in the MNIST layout (train-images-idx3-ubyte[.gz], t10k-images-idx3-ubyte[.gz]).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Pixel mode: grey levels in [0,1], threshold at 0.5, or a fresh Bernoulli draw.
    #[arg(long, value_enum, default_value = "none")]
    binarize: PixelMode,
}

impl DataArgs {
    fn source(&self) -> Source {
        Source::from_flags(self.dataset, self.data.clone())
    }
}

#[derive(Args)]
struct TrainVaeArgs {
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3, allow_hyphen_values = true)]
    lr: f64,
    #[arg(long, default_value_t = 32)]
    latent_dim: usize,
    #[arg(long, default_value_t = 256)]
    hidden_dim: usize,
    /// Weight on the KL term (beta-VAE); 1 is the ELBO.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    beta: f64,
    /// Monte Carlo samples K of z per example for the reconstruction term.
    #[arg(long, default_value_t = 1)]
    mc_samples: usize,
    /// Observation model p(x|z).
    #[arg(long, value_enum, default_value = "bernoulli")]
    likelihood: Likelihood,
    /// Gaussian likelihood: a fixed log sigma^2 (learned when omitted).
    #[arg(long, allow_hyphen_values = true)]
    obs_log_var: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder for checkpoints, metrics and pictures.
    #[arg(long, default_value = "runs/vae")]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint, up to --epochs in all.
    #[arg(long)]
    resume: bool,
    /// Use only the first N training examples.
    #[arg(long, value_name = "N")]
    train_limit: Option<usize>,
    /// Use only the first N test examples.
    #[arg(long, value_name = "N")]
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
    #[arg(long, default_value_t = 5000)]
    iw_samples: usize,
    /// Evaluate only the first N examples.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Examples per batch.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SampleVaeArgs {
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    #[arg(long, default_value_t = 64)]
    n: usize,
    #[arg(long, value_name = "FILE.png", default_value = "samples.png")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
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
    #[arg(long, default_value_t = 32)]
    n: usize,
    #[arg(long, value_name = "FILE.png", default_value = "reconstructions.png")]
    out: PathBuf,
}

fn main() -> ExitCode {
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
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        if candle_core::utils::cuda_is_available() {
            return Ok(Device::new_cuda(0)?);
        }
    }
    Ok(Device::Cpu)
}

fn run(cli: Cli) -> Result<()> {
    let device = device()?;
    match cli.command {
        Command::Train {
            model: TrainModel::Vae(a),
        } => {
            if a.likelihood == Likelihood::Bernoulli && a.obs_log_var.is_some() {
                bail!("--obs-log-var applies only to --likelihood gaussian");
            }
            let model = VaeConfig {
                input_dim: elbo::data::PIXELS,
                hidden_dim: a.hidden_dim,
                latent_dim: a.latent_dim,
                likelihood: a.likelihood,
                obs_log_var: a.obs_log_var,
            };
            let config = TrainConfig {
                source: a.data.source(),
                epochs: a.epochs,
                batch_size: a.batch_size,
                lr: a.lr,
                beta: a.beta,
                mc_samples: a.mc_samples,
                pixels: a.data.binarize,
                seed: a.seed,
                train_limit: a.train_limit,
                test_limit: a.test_limit,
            };
            let started = std::time::Instant::now();
            train_vae(model, &config, &a.out, a.resume, true, &device)?;
            eprintln!(
                "done in {:.1}s: {}/model.safetensors, metrics.jsonl, samples.png, reconstructions.png",
                started.elapsed().as_secs_f64(),
                a.out.display()
            );
        }
        Command::Eval {
            model: EvalModel::Vae(a),
        } => eval_vae(a, &device)?,
        Command::Sample {
            model: SampleModel::Vae(a),
        } => {
            if a.n == 0 {
                bail!("--n must be at least 1");
            }
            let vae = Vae::load(&a.checkpoint, &device)?.frozen()?;
            check_image_model(&vae)?;
            let images = vae::sample_prior(&vae, a.n, &mut Noise::new(a.seed))?;
            let cols = (a.n as f64).sqrt().ceil() as usize;
            elbo::plot::save_grid(&images, cols, &a.out)?;
            eprintln!("wrote {} samples to {}", a.n, a.out.display());
        }
        Command::Reconstruct {
            model: ReconstructModel::Vae(a),
        } => {
            if a.n == 0 {
                bail!("--n must be at least 1");
            }
            let vae = Vae::load(&a.checkpoint, &device)?.frozen()?;
            check_image_model(&vae)?;
            let data = a.data.source().load(a.split)?;
            elbo::train::save_reconstructions(&vae, &data, a.data.binarize, a.n, &a.out)?;
            eprintln!(
                "wrote {} originals and reconstructions to {}",
                a.n.min(data.len()),
                a.out.display()
            );
        }
    }
    Ok(())
}

fn check_image_model(vae: &Vae) -> Result<()> {
    if vae.config.input_dim != elbo::data::PIXELS {
        bail!(
            "the checkpoint's model has input_dim {}, but images have {} pixels",
            vae.config.input_dim,
            elbo::data::PIXELS
        );
    }
    Ok(())
}

fn eval_vae(a: EvalVaeArgs, device: &Device) -> Result<()> {
    if a.iw_samples == 0 {
        bail!("--iw-samples must be at least 1");
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let vae = Vae::load(&a.checkpoint, device)?.frozen()?;
    check_image_model(&vae)?;
    let mut data = a.data.source().load(a.split)?;
    if let Some(n) = a.limit {
        data = data.take(n);
    }
    if data.is_empty() {
        bail!("--limit 0: nothing to evaluate");
    }
    let mut noise = Noise::new(a.seed);
    let mut pixel_rng = StdRng::seed_from_u64(0);
    let (mut log_px, mut rec, mut kl) = (Vec::new(), Vec::new(), Vec::new());
    let idx: Vec<usize> = (0..data.len()).collect();
    let bar = indicatif::ProgressBar::new(data.len() as u64);
    for chunk in idx.chunks(a.batch_size) {
        let x = data.batch(chunk, a.data.binarize, &mut pixel_rng, device)?;
        let est = vae::estimate_log_likelihood(&vae, &x, a.iw_samples, 25_000, &mut noise)?;
        log_px.extend(est.log_px);
        rec.extend(est.reconstruction);
        kl.extend(est.kl);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let n = log_px.len() as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n;
    let (nll, reconstruction, kl_mean) = (-mean(&log_px), -mean(&rec), mean(&kl));
    let neg_elbo = reconstruction + kl_mean;
    let stderr = |v: &[f64]| {
        let m = mean(v);
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0) / n).sqrt()
    };
    if a.json {
        let out = serde_json::json!({
            "neg_elbo": neg_elbo,
            "reconstruction": reconstruction,
            "kl": kl_mean,
            "nll": nll,
            "gap": neg_elbo - nll,
            "nll_stderr": stderr(&log_px),
            "iw_samples": a.iw_samples,
            "n": log_px.len(),
            "split": a.split,
            "checkpoint": a.checkpoint,
        });
        println!("{out}");
    } else {
        println!("checkpoint      {}", a.checkpoint.display());
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
        println!("  KL            {kl_mean:10.3}   KL(q(z|x) || p(z)), closed form");
        println!(
            "NLL (IS)        {nll:10.3}   -log p(x), importance sampling, K = {} (+- {:.3})",
            a.iw_samples,
            stderr(&log_px)
        );
        println!(
            "gap             {:10.3}   -ELBO - NLL = KL(q(z|x) || p(z|x))",
            neg_elbo - nll
        );
    }
    Ok(())
}
