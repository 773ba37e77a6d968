//! elbo's side of the side-by-side benchmark (`bench/run`): one workload per process, so that
//! the caller reads each one's peak memory. Prints one JSON object: the workload, the time of
//! each repetition in milliseconds (warm-up excluded) and what one repetition is.
//!
//! ```text
//! cargo run --release --example workloads -- WORKLOAD [--reps N] [--warmup N] [--engine fused|candle|xla] [--device cpu|cuda]
//! ```
//!
//! `--device cuda` (a `--features cuda` build, `--engine candle`: the fused engines are the
//! CPU's) puts the tensors on the first CUDA GPU, and each repetition ends when the GPU has
//! finished its work (`Device::synchronize`), so that the times are the GPU's, not the launches'.
//!
//! `--engine xla` runs the VAE training steps (`vae-step-*`, `iwae-step-*`, `conv-vae-step-128`,
//! `vae-epoch`), the U-Net's (`unet-step-64`, `unet-cifar-step-64`) and the samplers' U-Net
//! (`ddim-50`, `ddpm-1000`, `ddim-50-cifar`) on the
//! XLA engine through the PJRT plugin at `ELBO_PJRT_PLUGIN` (the device is the plugin's:
//! `xla_cuda_plugin.so` on a GPU), parameters and Adam resident as `elbo train` runs them on one
//! process; each repetition waits for the step's sums, so the times are the device's.
//!
//! Workloads (data: the built-in digits, grey levels):
//! - `vae-step-128`, `vae-step-1024`: one SimpleVAE training step (forward, backward, Adam);
//! - `gemm-peak`: square f32 products (256 to 2048) through the `gemm` crate the fused engines
//!   call, on `RAYON_NUM_THREADS` threads, one product split across them or one per thread at
//!   once; the fastest's times: the machine's measured peak (`bench/run`'s "% of
//!   peak" divides each workload's FLOPs per second by it);
//! - `vae-epoch`: one epoch over the 9,000 training digits at batch 128, batching included;
//! - `nll`: the importance-sampled log p(x), K = 5000, over `--images` test digits (1,000);
//! - `unet-step-64`: one training step of the default U-Net on the simple loss, batch 64;
//! - `ddim-50`, `ddpm-1000`: sampling 64 images with the default U-Net;
//! - `unet-cifar-step-64`: one training step of DDPM's CIFAR-10 U-Net at base width 32
//!   (3 x 32 x 32, channel multipliers 1,2,2,2, two residual blocks per level, attention at
//!   16 x 16, dropout 0.1), batch 64; `ddim-50-cifar`: 16 images sampled with it.
//!
//! Each workload also prints `flops`, the floating-point operations of one repetition as the
//! fused engines count them (`FusedVae::forward_flops` and `train_flops`, the same of
//! `FusedUnet`: products only).

use std::time::Instant;

/// mimalloc keeps freed tensor buffers for reuse instead of returning them to the system, so an
/// eager training step stops paying a page fault per fresh buffer (measured: see bench/README.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Result, bail};
use candle_core::Device;
use candle_core::Tensor;
use elbo::data::{Named, PixelMode, Source, Split};
use elbo::diffusion::Denoiser;
use elbo::diffusion::model::image_batch;
use elbo::diffusion::nets::{Net, NetConfig, UNet};
use elbo::diffusion::objective::simple_loss_inputs;
use elbo::diffusion::process::{GaussianDiffusion, Prediction, VarianceType};
use elbo::diffusion::sampler::{ddim_sample, ddpm_sample};
use elbo::diffusion::schedule::{BetaSchedule, Schedule};
use elbo::distributions::Noise;
use elbo::engine::unet::FusedUnet;
use elbo::engine::vae::{FusedVae, VaeBatch};
use elbo::engine::{
    DenoiseBatch, Engine, TrainStep, VaeObjective, denoiser_step, estimate_log_likelihood, vae_step,
};
use elbo::nn::linear::{Mat, matmul};
use elbo::optim::{Adam, AdamConfig};
use elbo::vae::{Init, KlEstimator, Objective, Vae, VaeConfig};
use indicatif::ProgressBar;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// The U-Net through candle's ops, for `--engine candle` (a network of plain tensors otherwise
/// runs on the fused engine).
struct CandleUnet<'a>(&'a UNet);

impl Denoiser for CandleUnet<'_> {
    fn forward(&self, xt: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward_candle(xt, t)
    }
}

/// One training step as `elbo train` takes it: the engine's step on a batch whose draws are
/// made, then the one Adam over the flat parameters.
struct Trainer<'a, B> {
    step: Box<dyn TrainStep<Batch = B> + 'a>,
    adam: Adam,
    params: Vec<f32>,
    grads: Vec<f32>,
    /// Whether a resident step holds the parameters.
    loaded: bool,
}

impl<'a, B> Trainer<'a, B> {
    fn new(step: Box<dyn TrainStep<Batch = B> + 'a>, config: AdamConfig) -> Result<Self> {
        let params = step.read_params()?;
        let adam = Adam::new(step.table().clone(), config);
        let grads = vec![0f32; params.len()];
        Ok(Self {
            step,
            adam,
            params,
            grads,
            loaded: false,
        })
    }

    fn step(&mut self, batch: &B, rows: usize) -> Result<()> {
        let s = &mut self.step;
        if s.resident() {
            // As the training loop runs it on one process: parameters and moments stay on the
            // device, one program a step.
            if !self.loaded {
                let (m, v) = self.adam.moments_mut();
                s.load_resident(&elbo::engine::Resident {
                    params: &mut self.params,
                    m,
                    v,
                    average: None,
                })?;
                self.loaded = true;
            }
            s.step_resident(batch, self.adam.advance(), None)?;
            return Ok(());
        }
        s.loss_and_grads(&self.params, batch, 0..rows, &mut self.grads)?;
        self.adam
            .step(&mut self.params, &self.grads, s.update_threads())?;
        s.updated(&self.params)
    }
}

/// The VAE's training step on `engine`.
fn vae_trainer<'a>(
    vae: &'a Vae,
    engine: Engine,
    objective: Objective,
    adam: AdamConfig,
) -> Result<Trainer<'a, VaeBatch>> {
    let objective = VaeObjective {
        objective,
        kl: KlEstimator::Analytic,
        beta: 1.0,
    };
    Trainer::new(vae_step(engine, vae, objective)?.0, adam)
}

/// One VAE step on the examples of `batch` with fresh noise, drawn as training draws it into
/// the batch's buffers (the examples stay: the data's cost is not part of the step).
fn vae_train_step(
    t: &mut Trainer<'_, VaeBatch>,
    batch: &mut VaeBatch,
    d: usize,
    noise: &mut Noise,
) -> Result<()> {
    for e in &mut batch.eps {
        noise.fill_randn(e);
    }
    t.step(batch, batch.len(d))
}

/// The FLOPs of a VAE's forward pass over `b` examples with `k` samples each, as the fused
/// engine counts them (0 where it does not take the model: on a GPU).
fn vae_flops(vae: &Vae, b: usize, k: usize) -> f64 {
    FusedVae::from_vae(vae).map_or(0.0, |f| f.forward_flops(b, k))
}

/// The same for a training step ([`FusedVae::train_flops`]).
fn vae_train_flops(vae: &Vae, b: usize, k: usize) -> f64 {
    FusedVae::from_vae(vae).map_or(0.0, |f| f.train_flops(b, k))
}

struct Args {
    workload: String,
    reps: usize,
    warmup: usize,
    engine: String,
    images: usize,
    device: String,
}

fn parse() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        workload: it.next().unwrap_or_default(),
        reps: 0,
        warmup: 0,
        engine: "fused".into(),
        images: 1000,
        device: "cpu".into(),
    };
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--reps" => a.reps = value.parse()?,
            "--warmup" => a.warmup = value.parse()?,
            "--engine" => a.engine = value,
            "--images" => a.images = value.parse()?,
            "--device" => a.device = value,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// The device the tensors live on, set once in `main`: `time` waits for it after each
/// repetition (a no-op on the CPU).
static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();

/// Runs `f` `warmup` times untimed, then `reps` times timed; milliseconds per repetition, each
/// ended when the device has finished the work `f` queued.
fn time(warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let sync = || DEVICE.get().map_or(Ok(()), Device::synchronize);
    for _ in 0..warmup {
        f()?;
    }
    sync()?;
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        sync()?;
        out.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

fn main() -> Result<()> {
    elbo::alloc::keep_freed_memory();
    let a = parse()?;
    let dev = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" if a.engine == "candle" => Device::new_cuda(0)?,
        // The plugin is the device: the model is built on the host and uploaded.
        "cuda" if a.engine == "xla" => Device::Cpu,
        "cuda" => bail!("--device cuda: the fused engines run on the CPU; add --engine candle"),
        other => bail!("--device {other}: expected cpu or cuda"),
    };
    let dev = DEVICE.get_or_init(|| dev).clone();
    let train = Source::Named(Named::Mnist10k).load(Split::Train)?;
    let test = Source::Named(Named::Mnist10k).load(Split::Test)?;
    let mut rng = StdRng::seed_from_u64(0);
    let mut noise = Noise::new(0);
    let engine = match a.engine.as_str() {
        "fused" => Engine::Fused,
        "candle" => Engine::Candle,
        "xla" => Engine::Xla,
        other => bail!("--engine {other}: expected fused, candle or xla"),
    };
    let fused_engine = engine == Engine::Fused;
    let xla_workload = a.workload.starts_with("vae-step-")
        || a.workload.starts_with("iwae-step-")
        || a.workload.starts_with("ddim-50")
        || a.workload.starts_with("unet-")
        || ["vae-epoch", "conv-vae-step-128", "ddpm-1000"].contains(&a.workload.as_str());
    if engine == Engine::Xla && !xla_workload {
        bail!(
            "--engine xla: the VAE and U-Net training steps (vae-step-*, iwae-step-*, \
             conv-vae-step-128, vae-epoch, unet-step-64, unet-cifar-step-64) and the samplers \
             (ddim-50, ddpm-1000, ddim-50-cifar)"
        );
    }
    let or = |n: usize, default: usize| if n == 0 { default } else { n };
    // The FLOPs of one repetition, set by each workload.
    let flops: f64;
    let (times, unit) = match a.workload.as_str() {
        "gemm-peak" => {
            // The fastest of four square sizes and two ways of using the threads: one product
            // split across them (as the VAE engine's big products) or one product per thread
            // at once (as the U-Net engine gives each thread its own examples).
            use rayon::prelude::*;
            let threads = rayon::current_num_threads();
            let mut best: Option<(f64, Vec<f64>, f64, String)> = None;
            for n in [256, 512, 1024, 2048] {
                let a_: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
                let b_: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.1).collect();
                let mut c_ = vec![vec![0f32; n * n]; threads];
                let reps = (or(a.reps, 10) * (1024 / n).pow(2).clamp(1, 16) / 2).max(2);
                let (am, bm) = (Mat::rows(&a_, n, n), Mat::rows(&b_, n, n));
                for split in [true, false] {
                    let t = time(or(a.warmup, 2), reps, || {
                        if split {
                            let par = elbo::nn::linear::parallelism(threads, n * n * n);
                            matmul(&mut c_[0], am, bm, false, par);
                        } else {
                            c_.par_iter_mut()
                                .with_max_len(1)
                                .for_each(|c| matmul(c, am, bm, false, gemm::Parallelism::None));
                        }
                        Ok(())
                    })?;
                    let products = if split { 1 } else { threads };
                    let f = (products * 2 * n * n * n) as f64;
                    let mut sorted = t.clone();
                    sorted.sort_by(f64::total_cmp);
                    let rate = f / sorted[sorted.len() / 2] / 1e6;
                    let unit = match split {
                        true => format!("C = A B, {n} x {n} x {n}, split across {threads} threads"),
                        false => {
                            format!("{threads} products of {n} x {n} x {n} at once, one a thread")
                        }
                    };
                    eprintln!("gemm-peak: {unit}: {rate:.1} GFLOP/s");
                    if best.as_ref().is_none_or(|b| rate > b.0) {
                        best = Some((rate, t, f, unit));
                    }
                }
            }
            let (_, t, f, unit) = best.expect("eight products measured");
            flops = f;
            (t, unit)
        }
        w @ ("vae-step-128" | "vae-step-1024") => {
            let b: usize = w.trim_start_matches("vae-step-").parse()?;
            let idx: Vec<usize> = (0..b).collect();
            let vae = Vae::new(VaeConfig::default(), &mut noise, &dev)?;
            let config = AdamConfig::with_lr(1e-3);
            let (reps, warmup) = (or(a.reps, 200), or(a.warmup, 20));
            let x = train.batch_values(&idx, PixelMode::Grey, &mut rng);
            let mut batch = VaeBatch::draw(x, 784, &vae.config.latent_dims, 1, &mut noise);
            let mut trainer = vae_trainer(&vae, engine, Objective::Elbo, config)?;
            flops = vae_train_flops(&vae, b, 1);
            let t = time(warmup, reps, || {
                vae_train_step(&mut trainer, &mut batch, 784, &mut noise)
            })?;
            (t, format!("one training step, batch {b}"))
        }
        w @ ("iwae-step-k1" | "iwae-step-k5" | "iwae-step-k50" | "iwae-step-2l-k1"
        | "iwae-step-2l-k5" | "iwae-step-2l-k50") => {
            // Burda et al.'s one-layer model (784-200-200-50 tanh, Glorot) or its two-layer one
            // (784-[200-200]-100-[100-100]-50), batch 20: the VAE (k = 1, ELBO) or the IWAE
            // (k = 5 or 50), Adam with epsilon 1e-4.
            let (layers, k) = match w.trim_start_matches("iwae-step-").split_once("l-k") {
                Some((layers, k)) => (layers.parse::<usize>()?, k.parse::<usize>()?),
                None => (1, w.trim_start_matches("iwae-step-k").parse()?),
            };
            let (hidden, latent_dims) = match layers {
                1 => (vec![vec![200, 200]], vec![50]),
                _ => (vec![vec![200, 200], vec![100, 100]], vec![100, 50]),
            };
            let config = VaeConfig {
                hidden,
                latent_dims,
                activation: elbo::nn::activation::Activation::Tanh,
                ..VaeConfig::default()
            };
            let vae = Vae::initialised(config, Init::Glorot, None, &mut noise, &dev)?;
            let adam = AdamConfig {
                eps: 1e-4,
                ..AdamConfig::with_lr(1e-3)
            };
            let idx: Vec<usize> = (0..20).collect();
            let x = train.batch_values(&idx, PixelMode::Dynamic, &mut rng);
            let objective = if k == 1 {
                Objective::Elbo
            } else {
                Objective::Iwae
            };
            let (reps, warmup) = (or(a.reps, 1000), or(a.warmup, 100));
            let mut batch = VaeBatch::draw(x, 784, &vae.config.latent_dims, k, &mut noise);
            let mut trainer = vae_trainer(&vae, engine, objective, adam)?;
            flops = vae_train_flops(&vae, 20, k);
            let t = time(warmup, reps, || {
                vae_train_step(&mut trainer, &mut batch, 784, &mut noise)
            })?;
            (
                t,
                format!(
                    "one training step of the IWAE paper's {layers}-layer model, batch 20, k = {k}"
                ),
            )
        }
        "conv-vae-step-128" => {
            // A convolutional VAE on 1 x 28 x 28: two stride-2 4x4 convolutions (32, 64
            // channels), an MLP of 256 to z (32), mirrored with transposed convolutions; ReLU.
            let config = VaeConfig {
                conv: Some(elbo::vae::model::ConvNet {
                    channels: vec![32, 64],
                    residual: false,
                }),
                ..VaeConfig::default()
            };
            let vae = Vae::new(config, &mut noise, &dev)?;
            let adam = AdamConfig::with_lr(1e-3);
            let idx: Vec<usize> = (0..128).collect();
            let (reps, warmup) = (or(a.reps, 50), or(a.warmup, 5));
            let x = train.batch_values(&idx, PixelMode::Grey, &mut rng);
            let mut batch = VaeBatch::draw(x, 784, &vae.config.latent_dims, 1, &mut noise);
            let mut trainer = vae_trainer(&vae, engine, Objective::Elbo, adam)?;
            flops = vae_train_flops(&vae, 128, 1);
            let t = time(warmup, reps, || {
                vae_train_step(&mut trainer, &mut batch, 784, &mut noise)
            })?;
            (t, "one conv VAE training step, batch 128".to_string())
        }
        "vae-epoch" => {
            let vae = Vae::new(VaeConfig::default(), &mut noise, &dev)?;
            let config = AdamConfig::with_lr(1e-3);
            let mut order: Vec<usize> = (0..train.len()).collect();
            let mut trainer = vae_trainer(&vae, engine, Objective::Elbo, config)?;
            flops = vae_train_flops(&vae, train.len(), 1);
            let t = time(or(a.warmup, 1), or(a.reps, 5), || {
                order.shuffle(&mut rng);
                for idx in order.chunks(128) {
                    // As the training loop: the batch's pixels, then its noise.
                    let x = train.batch_values(idx, PixelMode::Grey, &mut rng);
                    let latents = &vae.config.latent_dims;
                    let batch = VaeBatch::draw(x, 784, latents, 1, &mut noise);
                    trainer.step(&batch, idx.len())?;
                }
                Ok(())
            })?;
            (t, format!("one epoch, {} digits, batch 128", train.len()))
        }
        "nll" => {
            let vae = Vae::new(VaeConfig::default(), &mut noise, &dev)?.frozen()?;
            let n = a.images.min(test.len());
            flops = vae_flops(&vae, n, 5000);
            let t = time(or(a.warmup, 0), or(a.reps, 3), || {
                let idx: Vec<usize> = (0..n).collect();
                for chunk in idx.chunks(100) {
                    let x = test.batch(chunk, PixelMode::Grey, &mut rng, &dev)?;
                    if fused_engine {
                        estimate_log_likelihood(&vae, &x, 5000, 25_000, &mut noise)?;
                    } else {
                        elbo::vae::estimate_log_likelihood_candle(
                            &vae, &x, 5000, 25_000, &mut noise,
                        )?;
                    }
                }
                Ok(())
            })?;
            (t, format!("log p(x), K = 5000, {n} test digits"))
        }
        w @ ("unet-step-64" | "ddim-50" | "ddpm-1000" | "unet-cifar-step-64" | "ddim-50-cifar") => {
            // The default U-Net on 1 x 28 x 28, or DDPM's CIFAR-10 U-Net at base width 32 on
            // 3 x 32 x 32 (images N(0, 1) clipped to [-1, 1]: the step's cost does not depend
            // on them).
            let cifar = w.ends_with("cifar") || w.starts_with("unet-cifar");
            let (cfg, shape) = match cifar {
                true => (NetConfig::ddpm_cifar10(32, 3), (3, 32, 32)),
                false => (NetConfig::default_unet(), (1, 28, 28)),
            };
            let (net, varmap) = Net::trainable(&cfg, &mut noise, &dev)?;
            let process =
                GaussianDiffusion::new(Schedule::new(BetaSchedule::Linear, 1000)?, Prediction::Eps);
            let bar = ProgressBar::hidden();
            // Samplers run on plain tensors, as `elbo sample diffusion` does: a network of
            // `Var`s would record every step's graph, chained from step to step.
            let frozen: std::collections::HashMap<String, candle_core::Tensor> =
                elbo::diffusion::nets::sorted_vars(&varmap)
                    .into_iter()
                    .map(|(n, v)| (n, v.as_tensor().detach()))
                    .collect();
            let frozen = Net::build(
                &cfg,
                candle_nn::VarBuilder::from_tensors(frozen, candle_core::DType::F32, &dev),
            )?;
            let Net::Unet(frozen_unet) = &frozen else {
                unreachable!("the default network is a U-Net")
            };
            let candle_path = CandleUnet(frozen_unet);
            // The fused engine reads the weights into host memory: built only when it runs.
            let fused_frozen = match fused_engine {
                true => Some(FusedUnet::new(frozen_unet)?),
                false => None,
            };
            // One example's forward pass and training step, as the fused engine counts them.
            let size = (shape.1, shape.2);
            let counts = FusedUnet::new(frozen_unet).ok();
            let per_image = counts.as_ref().map_or(0.0, |f| f.forward_flops(size));
            let train_per_image = counts.as_ref().map_or(0.0, |f| f.train_flops(size));
            // The U-Net's forward pass compiled by XLA, for the samplers.
            let xla_frozen = match engine {
                Engine::Xla => {
                    let tensors = elbo::diffusion::nets::sorted_vars(&varmap)
                        .into_iter()
                        .map(|(n, v)| (n, v.as_tensor().detach()))
                        .collect();
                    let vb =
                        candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &dev);
                    Some(elbo::engine::FrozenNet::with_engine(
                        Net::build(&cfg, vb)?,
                        Engine::Xla,
                    )?)
                }
                _ => None,
            };
            let sampler_net: &dyn Denoiser = match (&xla_frozen, &fused_frozen) {
                (Some(xla), _) => xla,
                (None, Some(fused)) => fused,
                (None, None) => &candle_path,
            };
            match w {
                "unet-step-64" | "unet-cifar-step-64" => {
                    let vars = elbo::diffusion::nets::sorted_vars(&varmap);
                    let step = denoiser_step(engine, &net, vars, None)?.0;
                    let mut trainer = Trainer::new(step, AdamConfig::with_lr(1e-3))?;
                    flops = 64.0 * train_per_image;
                    let idx: Vec<usize> = (0..64).collect();
                    let x0 = match cifar {
                        true => noise.randn((64, 3, 32, 32), &dev)?.clamp(-1f32, 1f32)?,
                        false => image_batch(&train, &idx, &dev)?,
                    };
                    let t = time(or(a.warmup, 2), or(a.reps, 10), || {
                        let (xt, t, target) =
                            simple_loss_inputs(&process, &x0, &mut rng, &mut noise)?;
                        let dropout_seed =
                            (net.dropout() > 0.0).then(|| rand::Rng::random::<u64>(&mut rng));
                        let batch = DenoiseBatch {
                            xt,
                            t,
                            target,
                            dropout_seed,
                            x0: None,
                            weights: None,
                            weighted: None,
                        };
                        trainer.step(&batch, 64)
                    })?;
                    (t, "one U-Net training step, batch 64".to_string())
                }
                "ddim-50" | "ddim-50-cifar" => {
                    let n = if cifar { 16 } else { 64 };
                    flops = 50.0 * n as f64 * per_image;
                    let t = time(or(a.warmup, 1), or(a.reps, 3), || {
                        let xt = noise.randn((n, shape.0, shape.1, shape.2), &dev)?;
                        ddim_sample(&process, sampler_net, xt, 50, 0.0, true, &mut noise, &bar)?;
                        Ok(())
                    })?;
                    (t, format!("DDIM, 50 steps, {n} images"))
                }
                _ => {
                    flops = 1000.0 * 64.0 * per_image;
                    let t = time(or(a.warmup, 0), or(a.reps, 1), || {
                        let xt = noise.randn((64, 1, 28, 28), &dev)?;
                        let v = VarianceType::FixedSmall;
                        ddpm_sample(&process, sampler_net, xt, v, true, &mut noise, &bar)?;
                        Ok(())
                    })?;
                    (t, "DDPM, 1000 steps, 64 images".to_string())
                }
            }
        }
        other => bail!(
            "unknown workload {other:?}: gemm-peak, vae-step-128, vae-step-1024, iwae-step-k1, \
             iwae-step-k5, iwae-step-k50, iwae-step-2l-k1, iwae-step-2l-k5, iwae-step-2l-k50, \
             conv-vae-step-128, vae-epoch, nll, unet-step-64, ddim-50, ddpm-1000, \
             unet-cifar-step-64, ddim-50-cifar"
        ),
    };
    println!(
        "{}",
        serde_json::json!({
            "workload": a.workload, "engine": a.engine, "device": a.device, "unit": unit,
            "flops": flops, "ms": times
        })
    );
    Ok(())
}
