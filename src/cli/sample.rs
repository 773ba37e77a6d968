//! `elbo sample vae|diffusion` and `elbo reconstruct vae`: picture grids.

use super::*;

#[derive(Args)]
pub struct SampleVaeArgs {
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    #[arg(long, allow_negative_numbers = true, default_value_t = 64)]
    pub n: usize,
    #[arg(long, value_name = "FILE.png", default_value = "samples.png")]
    pub out: PathBuf,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args)]
pub struct SampleDiffusionArgs {
    /// elbo's model.safetensors or run folder, a folder diffusers' save_pretrained wrote (a DDPM or DDIM
    /// pipeline, or a UNet2DModel), or an improved-diffusion / guided-diffusion model.pt with
    /// its MODEL_FLAGS and DIFFUSION_FLAGS (below).
    #[arg(long, value_name = "FILE|DIR")]
    pub checkpoint: PathBuf,
    #[arg(long, value_enum, default_value = "ddim")]
    pub sampler: SamplerKind,
    /// Sampling steps (diffusers' `num_inference_steps`): DDIM's (default 50); DDPM's default
    /// is all T, fewer are evenly strided with respaced variances (improved DDPM, Section 4).
    #[arg(long, allow_negative_numbers = true)]
    pub steps: Option<usize>,
    /// DDIM noise: 0 is deterministic.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    pub eta: f64,
    /// DDPM variance: fixed-small (posterior variance) or fixed-large (beta); default: the
    /// model's own (learned variances are always the network's).
    #[arg(long, value_enum)]
    pub variance: Option<VarianceType>,
    /// Do not clip the predicted x_0 to [-1, 1] (images clip by default).
    #[arg(long)]
    pub no_clip: bool,
    #[arg(long, allow_negative_numbers = true, default_value_t = 64)]
    pub n: usize,
    #[arg(long, value_name = "FILE.png", default_value = "samples.png")]
    pub out: PathBuf,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    pub seed: u64,
    /// What runs the network: the fused CPU engine for the U-Net on the CPU (auto), candle, or
    /// XLA (the U-Net's forward pass compiled once per batch shape; docs/xla.md).
    #[arg(long, value_enum, default_value = "auto")]
    pub engine: elbo::train::Engine,
    #[command(flatten)]
    pub model_flags: Box<elbo::interop::improved_diffusion::ModelFlags>,
}

#[derive(Args)]
pub struct ReconstructVaeArgs {
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, value_enum, default_value = "test")]
    pub split: Split,
    #[arg(long, allow_negative_numbers = true, default_value_t = 32)]
    pub n: usize,
    #[arg(long, value_name = "FILE.png", default_value = "reconstructions.png")]
    pub out: PathBuf,
}

pub fn sample_diffusion(a: SampleDiffusionArgs, device: &Device) -> Result<()> {
    elbo::limits::count("--n", a.n, 1_000_000)?;
    let steps = a.steps.unwrap_or(50);
    elbo::limits::count("--steps", steps, 100_000)?;
    if !(a.eta.is_finite() && a.eta >= 0.0) {
        bail!("--eta must be a non-negative number, got {}", a.eta);
    }
    let m = load_diffusion(&a.checkpoint, &a.model_flags, device)?;
    let net = elbo::engine::FrozenNet::with_engine(m.net, a.engine)?;
    check_grid_memory(a.n, m.config.image_shape().map_or(1, |s| s.dim()))?;
    let mut noise = Noise::new(a.seed);
    let clip = m.config.is_image() && !a.no_clip;
    let variance = super::model_variance(&m.process, a.variance)?;
    let t_max = m.process.num_timesteps();
    // DDPM with fewer steps than T: the evenly strided process of improved-diffusion's
    // `--timestep_respacing K` (abar kept at the kept steps, beta and beta~ respaced).
    let strided = match (a.sampler, a.steps) {
        (SamplerKind::Ddpm, Some(k)) if k < t_max => {
            let kept = elbo::interop::improved_diffusion::space_timesteps(t_max, &k.to_string())?;
            Some(m.process.respaced(&kept)?)
        }
        _ => None,
    };
    let ddpm_process = strided.as_ref().unwrap_or(&m.process);
    let total = match a.sampler {
        SamplerKind::Ddpm => ddpm_process.num_timesteps(),
        SamplerKind::Ddim => steps.min(t_max),
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
                ddpm_sample(ddpm_process, &net, x_t, variance, clip, &mut noise, &bar)?
            }
            SamplerKind::Ddim => {
                ddim_sample(&m.process, &net, x_t, steps, a.eta, clip, &mut noise, &bar)?
            }
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

pub fn sample_vae_command(a: SampleVaeArgs, device: &Device) -> Result<()> {
    elbo::limits::count("--n", a.n, 1_000_000)?;
    let vae = Vae::load(&a.checkpoint, device)?.frozen()?;
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
    Ok(())
}

pub fn reconstruct_vae_command(a: ReconstructVaeArgs, device: &Device) -> Result<()> {
    elbo::limits::count("--n", a.n, 1_000_000)?;
    let vae = Vae::load(&a.checkpoint, device)?.frozen()?;
    let data = a.data.source().load(a.split)?;
    check_model_takes(&vae, &data, &a.data.source().describe())?;
    elbo::train::save_reconstructions(&vae, &data, a.data.pixels(), a.n, &a.out)?;
    eprintln!(
        "wrote {} originals and reconstructions to {}",
        a.n.min(data.len()),
        a.out.display()
    );
    Ok(())
}
