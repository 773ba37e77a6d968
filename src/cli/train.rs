//! `elbo train vae|diffusion`: flags to configs, then the trainer.

use super::*;

/// A published protocol: its architecture, optimiser, schedule and data handling.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// Burda, Grosse & Salakhutdinov (2015), Section 5: tanh MLPs 784-[200-200]-50 (or with
    /// `--latent-dim 100,50`, 784-[200-200]-100-[100-100]-50), Glorot initialisation, Adam
    /// (0.9, 0.999, eps 1e-4), batch 20, 3^i epochs at 1e-3 x 10^(-i/7) for i = 0..7 (3,280
    /// epochs), pixels binarized by a fresh Bernoulli draw. Flags given explicitly win.
    IwaePaper,
}

#[derive(Args)]
pub struct TrainVaeArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// A published protocol's settings (explicit flags win).
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Epochs [default: 10; iwae-paper: 3280].
    #[arg(long, allow_negative_numbers = true)]
    pub epochs: Option<usize>,
    /// Examples per batch [default: 128; iwae-paper: 20].
    #[arg(long, allow_negative_numbers = true)]
    pub batch_size: Option<usize>,
    /// Adam learning rate (the base of --lr-schedule).
    #[arg(long, default_value_t = 1e-3, allow_hyphen_values = true)]
    pub lr: f64,
    /// How the learning rate changes over epochs [default: constant; iwae-paper: iwae-paper].
    #[arg(long, value_enum)]
    pub lr_schedule: Option<elbo::train::vae::LrSchedule>,
    /// Adam's epsilon [default: 1e-8; iwae-paper: 1e-4].
    #[arg(long, allow_hyphen_values = true)]
    pub adam_eps: Option<f64>,
    /// Initial parameters [default: pytorch; iwae-paper: glorot].
    #[arg(long, value_enum)]
    pub init: Option<vae::Init>,
    /// Sizes of the stochastic layers z_1,z_2,... bottom-up [default: 32; iwae-paper: 50].
    #[arg(long, value_name = "L1,L2,...", allow_negative_numbers = true)]
    pub latent_dim: Option<String>,
    /// Hidden widths of each stochastic layer's MLPs, layers separated by '/'
    /// [default: 256; iwae-paper: 200,200 or 200,200/100,100].
    #[arg(
        long,
        visible_alias = "hidden-dim",
        value_name = "H,H/H,H",
        allow_negative_numbers = true
    )]
    pub hidden: Option<String>,
    /// The MLPs' activation [default: relu; iwae-paper: tanh].
    #[arg(long, value_enum)]
    pub activation: Option<elbo::nn::activation::Activation>,
    /// A convolutional VAE: channels after each stride-2 convolution of the encoder (the
    /// decoder mirrors them with transposed convolutions), then the MLPs of --hidden.
    #[arg(long, value_name = "C1,C2,...")]
    pub conv: Option<String>,
    /// With --conv: a residual block after each convolution.
    #[arg(long)]
    pub residual: bool,
    /// Weight on the KL term (beta-VAE); 1 is the ELBO.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub beta: f64,
    /// Monte Carlo samples K of z per example for the reconstruction term.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
    pub mc_samples: usize,
    /// Maximise the ELBO, or the IWAE bound with K = --mc-samples.
    #[arg(long, value_enum, default_value = "elbo")]
    pub objective: elbo::train::Objective,
    /// The ELBO's top-layer KL: in closed form, or by Monte Carlo at the samples (Burda et
    /// al.'s code; Pyro's Trace_ELBO).
    #[arg(long, value_enum, default_value = "analytic")]
    pub kl: elbo::train::KlEstimator,
    /// Implementation of the training step: the fused CPU engine where it applies, or candle.
    #[arg(long, value_enum, default_value = "auto")]
    pub engine: elbo::train::Engine,
    /// Observation model p(x|z).
    #[arg(long, value_enum, default_value = "bernoulli")]
    pub likelihood: Likelihood,
    /// Gaussian likelihood: a fixed log sigma^2 (learned when omitted).
    #[arg(long, allow_hyphen_values = true)]
    pub obs_log_var: Option<f64>,
    /// Discretized logistic: a mixture of this many logistics per value (PixelCNN++'s).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
    pub mixtures: usize,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    pub seed: u64,
    /// Output folder for checkpoints, metrics and pictures.
    #[arg(long, default_value = "runs/vae")]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint, up to --epochs in all.
    #[arg(long)]
    pub resume: bool,
    /// Hold out the last N training examples as a validation split, reported with the test set.
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub valid: Option<usize>,
    /// Evaluate the test (and validation) set every N epochs and at the last
    /// [default: 1; iwae-paper: 10].
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub eval_every: Option<usize>,
    /// Use only the first N training examples (after --valid).
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub train_limit: Option<usize>,
    /// Use only the first N test examples.
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub test_limit: Option<usize>,
}

#[derive(Args)]
pub struct TrainDiffusionArgs {
    /// mnist-10k (default), mnist, fashion-mnist, cifar10, cifar100, or
    /// toy:moons|swiss-roll|8gaussians|ring.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Images from PATH, as for `train vae --data` (wins over --dataset).
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "linear")]
    pub beta_schedule: BetaSchedule,
    /// The number of diffusion steps T (diffusers' `num_train_timesteps`).
    #[arg(
        long = "num-train-timesteps",
        visible_alias = "timesteps",
        allow_negative_numbers = true,
        default_value_t = 1000
    )]
    pub num_train_timesteps: usize,
    /// What the network predicts.
    #[arg(long, value_enum, default_value = "eps")]
    pub prediction: Prediction,
    /// Epochs (the default U-Net gives recognisable digits after 20, ~19 min on 2 cores).
    #[arg(long, allow_negative_numbers = true, default_value_t = 20)]
    pub epochs: usize,
    #[arg(long, allow_negative_numbers = true, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-3, allow_hyphen_values = true)]
    pub lr: f64,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.999)]
    pub ema_decay: f64,
    /// U-Net base channels (images) or MLP width (toys).
    #[arg(long, allow_negative_numbers = true)]
    pub channels: Option<usize>,
    /// U-Net channel multiplier of each level (default 1,2,2: 28, 14, 7 pixels for MNIST;
    /// DDPM's CIFAR-10 net: 1,2,2,2).
    #[arg(long, value_name = "M,M,..")]
    pub channel_mult: Option<String>,
    /// U-Net in DDPM's layout with N residual blocks per level (DDPM: 2); without it, the
    /// compact layout (one block per level).
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub res_blocks: Option<usize>,
    /// U-Net levels (0 = full resolution) whose blocks are followed by self-attention (DDPM's
    /// CIFAR-10 net: 1, at 16 x 16).
    #[arg(long, value_name = "L,L,..")]
    pub attention_levels: Option<String>,
    /// U-Net dropout probability in every residual block (DDPM's CIFAR-10 net: 0.1).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    pub dropout: f32,
    /// Toy data: optimizer steps per epoch.
    #[arg(long, allow_negative_numbers = true, default_value_t = 500)]
    pub toy_steps_per_epoch: usize,
    /// DDIM steps for the samples written at the end.
    #[arg(long, allow_negative_numbers = true, default_value_t = 50)]
    pub sample_steps: usize,
    /// learned-range: the U-Net also gives v, each reverse step's log-variance between log
    /// beta~_t and log beta_t (Nichol & Dhariwal 2021, eq. 15), used by the bound and the
    /// samplers; trained by --loss hybrid (its default) or vlb. Without it, fixed variances
    /// (chosen when sampling).
    #[arg(long, value_enum)]
    pub variance: Option<elbo::diffusion::VarianceType>,
    /// simple (L_simple; fixed variances), hybrid (L_simple + 0.001 L_vlb, the mean's
    /// gradient stopped in L_vlb) or vlb (L_vlb alone); default: simple, or hybrid with
    /// --variance learned-range.
    #[arg(long, value_enum)]
    pub loss: Option<elbo::diffusion::learned::TrainLoss>,
    /// discrete (T steps, --beta-schedule) or continuous (VDM: t in [0, 1], the schedule
    /// gamma(t) = -log SNR(t) of --gamma, trained on the continuous-time bound with a 256-level
    /// decoder; images only).
    #[arg(long, value_enum, default_value = "discrete")]
    pub time: TimeKind,
    /// Continuous time: linear (in gamma, VDM's fixed schedule), cosine (the cosine schedule's
    /// log-SNR between the same endpoints) or learned (VDM's monotone network, its endpoints
    /// trained on the bound and its shape on the variance of the bound's estimate).
    #[arg(long, value_enum, default_value = "linear")]
    pub gamma: elbo::diffusion::vdm::GammaKind,
    /// Continuous time: gamma at t = 0 (the learned schedule's start).
    #[arg(long, allow_hyphen_values = true, default_value_t = elbo::diffusion::vdm::GAMMA_MIN)]
    pub gamma_min: f64,
    /// Continuous time: gamma at t = 1 (the learned schedule's start).
    #[arg(long, allow_hyphen_values = true, default_value_t = elbo::diffusion::vdm::GAMMA_MAX)]
    pub gamma_max: f64,
    /// Implementation of the training step: auto is the fused CPU engine for the U-Net.
    #[arg(long, value_enum, default_value = "auto")]
    pub engine: elbo::train::Engine,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "runs/diffusion")]
    pub out: PathBuf,
    #[arg(long)]
    pub resume: bool,
    /// Images: hold out the last N training images as a validation split.
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub valid: Option<usize>,
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub train_limit: Option<usize>,
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub test_limit: Option<usize>,
}

pub fn train_vae_command(a: TrainVaeArgs, device: &Device) -> Result<()> {
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
    // The defaults live on the config (the plain one or the preset's); given flags win.
    let base = match paper {
        true => TrainConfig::iwae_paper(a.data.source()),
        false => TrainConfig::new(a.data.source()),
    };
    let config = TrainConfig {
        epochs: a.epochs.unwrap_or(base.epochs),
        batch_size: a.batch_size.unwrap_or(base.batch_size),
        lr: a.lr,
        lr_schedule: a.lr_schedule.unwrap_or(base.lr_schedule),
        adam_eps: a.adam_eps.unwrap_or(base.adam_eps),
        init: a.init.unwrap_or(base.init),
        beta: a.beta,
        mc_samples: a.mc_samples,
        objective: a.objective,
        kl: a.kl,
        engine: a.engine,
        pixels: a.data.binarize.unwrap_or(base.pixels),
        seed: a.seed,
        valid: a.valid,
        eval_every: a.eval_every.unwrap_or(base.eval_every),
        train_limit: a.train_limit,
        test_limit: a.test_limit,
        ..base
    };
    let started = std::time::Instant::now();
    train_vae(model, &config, &a.out, a.resume, true, device)?;
    if !elbo::collective::is_main() {
        return Ok(());
    }
    eprintln!(
        "done in {:.1}s: {}/model.safetensors, metrics.jsonl, samples.png, reconstructions.png, pictures/, report.html",
        started.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

pub fn train_diffusion_command(a: TrainDiffusionArgs, device: &Device) -> Result<()> {
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
                    options: elbo::diffusion::nets::UnetOptions::default(),
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
        betas: None,
        model_times: None,
        variance: match a.variance {
            None | Some(VarianceType::LearnedRange) => a.variance,
            Some(other) => bail!(
                "--variance {}: training learns learned-range variances; fixed-small and fixed-large are chosen when sampling (sample diffusion --variance)",
                clap::ValueEnum::to_possible_value(&other)
                    .map_or(String::new(), |v| v.get_name().to_string())
            ),
        },
        continuous: match a.time {
            TimeKind::Discrete => None,
            TimeKind::Continuous => Some(elbo::diffusion::vdm::ContinuousTime {
                gamma: a.gamma,
                gamma_min: a.gamma_min,
                gamma_max: a.gamma_max,
                features: elbo::diffusion::vdm::FEATURES,
            }),
        },
    };
    if a.time == TimeKind::Discrete
        && (a.gamma != elbo::diffusion::vdm::GammaKind::Linear
            || a.gamma_min != elbo::diffusion::vdm::GAMMA_MIN
            || a.gamma_max != elbo::diffusion::vdm::GAMMA_MAX)
    {
        bail!(
            "--gamma, --gamma-min and --gamma-max shape continuous time's schedule; give --time continuous"
        );
    }
    match &model.continuous {
        // The rest (prediction, variances, the data) is checked with the data's shape.
        Some(c) => c.validate()?,
        None => {
            model.process()?;
        }
    }
    let loss = a.loss.unwrap_or(if a.variance.is_some() {
        elbo::diffusion::learned::TrainLoss::Hybrid
    } else {
        elbo::diffusion::learned::TrainLoss::Simple
    });
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
        loss,
    };
    let started = std::time::Instant::now();
    train_diffusion(model, &config, &a.out, a.resume, true, device)?;
    if !elbo::collective::is_main() {
        return Ok(());
    }
    eprintln!(
        "done in {:.1}s: {}/model.safetensors (EMA), metrics.jsonl, samples.png, report.html",
        started.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

/// `train diffusion --time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TimeKind {
    /// T discrete steps (DDPM).
    Discrete,
    /// t in [0, 1] (VDM).
    Continuous,
}
