//! improved-diffusion's and guided-diffusion's checkpoints (Nichol & Dhariwal 2021, Dhariwal
//! & Nichol 2021): a `torch.save` state dict of their `UNetModel` ([`super::pickle`]) and the
//! flags of their scripts under their own names, so that the README's `MODEL_FLAGS` and
//! `DIFFUSION_FLAGS` paste unchanged after `--checkpoint model.pt`.
//!
//! The `UNetModel` is elbo's U-Net in the DDPM layout with improved-diffusion's options
//! (scale-shift norm, attention heads, 2C output channels with `--learn_sigma`), its
//! parameters renamed:
//!
//! ```text
//! time_embed.{0,2}                   time_embedding.linear_{1,2}
//! input_blocks.0.0                   conv_in
//! input_blocks.k.0 (ResBlock)        down.{i}.res.{j}   in_layers.{0,2} -> norm1, conv1,
//!                                                       emb_layers.1 -> time_emb_proj,
//!                                                       out_layers.{0,3} -> norm2, conv2,
//!                                                       skip_connection -> conv_shortcut
//! input_blocks.k.1 (AttentionBlock)  down.{i}.attn.{j}  norm, qkv (rows regrouped), proj_out
//! input_blocks.k.0.op                down.{i}.downsample
//! middle_block.{0,1,2}               mid.res1, mid.attn, mid.res2
//! output_blocks.k.{0,1,2}            up.{i}.res.{j}, up.{i}.attn.{j}, up.{i}.upsample (.conv)
//! out.{0,2}                          norm_out, conv_out
//! ```
//!
//! Their attention's `qkv` rows are grouped by head (`[head, q|k|v, d]`, improved-diffusion's
//! `QKVAttention`) unless `--use_new_attention_order`; elbo's are `[q|k|v, head, d]`, so the
//! rows are regrouped on load. The process: `--noise_schedule` linear (betas 1e-4 .. 0.02
//! scaled by 1000 / T) or cosine over `--diffusion_steps`, `--timestep_respacing` (their
//! `space_timesteps`: the kept steps and the betas that keep their abar), the network given
//! `t 1000 / T` with `--rescale_timesteps` (the original step of a respaced one), learned
//! variances (`--learn_sigma`: improved DDPM eq. 15), else beta~_t (`--sigma_small`) or
//! beta_t.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};

use crate::data::ImageShape;
use crate::diffusion::model::{DiffusionConfig, LoadedDiffusion};
use crate::diffusion::nets::{NetConfig, UnetOptions};
use crate::diffusion::schedule::{BETA_END, BETA_START, linspace, respaced_betas};
use crate::diffusion::{BetaSchedule, Prediction, Schedule, VarianceType};

/// `True` / `False` as their scripts' `str2bool` reads them.
fn py_bool(s: &str) -> std::result::Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "1" => Ok(true),
        "false" | "f" | "no" | "n" | "0" => Ok(false),
        _ => Err(format!("True or False expected, got {s:?}")),
    }
}

/// The model and diffusion flags of improved-diffusion's and guided-diffusion's scripts
/// (their defaults: improved-diffusion's `model_and_diffusion_defaults`).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(
    next_help_heading = "improved-diffusion / guided-diffusion checkpoints (--checkpoint model.pt)"
)]
pub struct ModelFlags {
    /// Image size (32, 64, 128, 256; default 64).
    #[arg(long = "image_size", id = "id_image_size", value_name = "N")]
    pub image_size: Option<usize>,
    /// Base channels (default 128).
    #[arg(long = "num_channels", id = "id_num_channels", value_name = "N")]
    pub num_channels: Option<usize>,
    /// Residual blocks per level (default 2).
    #[arg(long = "num_res_blocks", id = "id_num_res_blocks", value_name = "N")]
    pub num_res_blocks: Option<usize>,
    /// Attention heads (default 4).
    #[arg(long = "num_heads", id = "id_num_heads", value_name = "N")]
    pub num_heads: Option<usize>,
    /// Attention heads of the up path (-1: --num_heads).
    #[arg(
        long = "num_heads_upsample",
        id = "id_num_heads_upsample",
        allow_negative_numbers = true,
        value_name = "N"
    )]
    pub num_heads_upsample: Option<i64>,
    /// Channels per attention head, in place of --num_heads (guided-diffusion; -1: unused).
    #[arg(
        long = "num_head_channels",
        id = "id_num_head_channels",
        allow_negative_numbers = true,
        value_name = "N"
    )]
    pub num_head_channels: Option<i64>,
    /// Resolutions with attention (default "16,8").
    #[arg(
        long = "attention_resolutions",
        id = "id_attention_resolutions",
        value_name = "LIST"
    )]
    pub attention_resolutions: Option<String>,
    /// Channel multipliers per level (guided-diffusion; default by --image_size).
    #[arg(long = "channel_mult", id = "id_channel_mult", value_name = "LIST")]
    pub channel_mult: Option<String>,
    /// Dropout of training (no effect on evaluation or sampling).
    #[arg(long = "dropout", id = "id_dropout", value_name = "P")]
    pub dropout: Option<f64>,
    /// The network also gives its variances (6 output channels; improved DDPM eq. 15).
    #[arg(long = "learn_sigma", id = "id_learn_sigma", value_parser = py_bool, value_name = "BOOL")]
    pub learn_sigma: Option<bool>,
    /// Fixed variance beta~_t instead of beta_t (without --learn_sigma).
    #[arg(long = "sigma_small", id = "id_sigma_small", value_parser = py_bool, value_name = "BOOL")]
    pub sigma_small: Option<bool>,
    /// Class-conditional models are not read (False only).
    #[arg(long = "class_cond", id = "id_class_cond", value_parser = py_bool, value_name = "BOOL")]
    pub class_cond: Option<bool>,
    /// Gradient checkpointing of training (no effect here).
    #[arg(long = "use_checkpoint", id = "id_use_checkpoint", value_parser = py_bool, value_name = "BOOL")]
    pub use_checkpoint: Option<bool>,
    /// FiLM conditioning of the residual blocks (default True).
    #[arg(long = "use_scale_shift_norm", id = "id_use_scale_shift_norm", value_parser = py_bool, value_name = "BOOL")]
    pub use_scale_shift_norm: Option<bool>,
    /// guided-diffusion's resampling residual blocks (False only).
    #[arg(long = "resblock_updown", id = "id_resblock_updown", value_parser = py_bool, value_name = "BOOL")]
    pub resblock_updown: Option<bool>,
    /// guided-diffusion's half-precision training (the weights are read and run in float32).
    #[arg(long = "use_fp16", id = "id_use_fp16", value_parser = py_bool, value_name = "BOOL")]
    pub use_fp16: Option<bool>,
    /// guided-diffusion's q|k|v-first attention rows.
    #[arg(long = "use_new_attention_order", id = "id_use_new_attention_order", value_parser = py_bool, value_name = "BOOL")]
    pub use_new_attention_order: Option<bool>,
    /// Diffusion steps T (default 1000).
    #[arg(long = "diffusion_steps", id = "id_diffusion_steps", value_name = "T")]
    pub diffusion_steps: Option<usize>,
    /// linear or cosine (default linear).
    #[arg(long = "noise_schedule", id = "id_noise_schedule", value_name = "NAME")]
    pub noise_schedule: Option<String>,
    /// Respaced process: "" (all T), section counts "250" or "10,5", or "ddimN".
    #[arg(
        long = "timestep_respacing",
        id = "id_timestep_respacing",
        value_name = "SPEC"
    )]
    pub timestep_respacing: Option<String>,
    /// Training loss (no effect on the bound).
    #[arg(long = "use_kl", id = "id_use_kl", value_parser = py_bool, value_name = "BOOL")]
    pub use_kl: Option<bool>,
    /// The network predicts x_0 instead of eps.
    #[arg(long = "predict_xstart", id = "id_predict_xstart", value_parser = py_bool, value_name = "BOOL")]
    pub predict_xstart: Option<bool>,
    /// The network is given t 1000 / T (default True; guided-diffusion's default is False).
    #[arg(long = "rescale_timesteps", id = "id_rescale_timesteps", value_parser = py_bool, value_name = "BOOL")]
    pub rescale_timesteps: Option<bool>,
    /// Training loss (no effect on the bound).
    #[arg(long = "rescale_learned_sigmas", id = "id_rescale_learned_sigmas", value_parser = py_bool, value_name = "BOOL")]
    pub rescale_learned_sigmas: Option<bool>,
    /// Training only: accepted and ignored.
    #[arg(
        long = "schedule_sampler",
        id = "id_schedule_sampler",
        value_name = "NAME"
    )]
    pub schedule_sampler: Option<String>,
    /// Training only: accepted and ignored.
    #[arg(long = "lr", id = "id_lr", value_name = "LR")]
    pub lr: Option<String>,
    /// Training only: accepted and ignored (elbo's batch is --batch-size).
    #[arg(long = "batch_size", id = "id_batch_size", value_name = "N")]
    pub batch_size: Option<String>,
}

impl ModelFlags {
    /// The first flag given, for "only with a .pt checkpoint" errors.
    pub fn first_given(&self) -> Option<&'static str> {
        let f = self;
        [
            (f.image_size.is_some(), "--image_size"),
            (f.num_channels.is_some(), "--num_channels"),
            (f.num_res_blocks.is_some(), "--num_res_blocks"),
            (f.num_heads.is_some(), "--num_heads"),
            (f.num_heads_upsample.is_some(), "--num_heads_upsample"),
            (f.num_head_channels.is_some(), "--num_head_channels"),
            (f.attention_resolutions.is_some(), "--attention_resolutions"),
            (f.channel_mult.is_some(), "--channel_mult"),
            (f.dropout.is_some(), "--dropout"),
            (f.learn_sigma.is_some(), "--learn_sigma"),
            (f.sigma_small.is_some(), "--sigma_small"),
            (f.class_cond.is_some(), "--class_cond"),
            (f.use_checkpoint.is_some(), "--use_checkpoint"),
            (f.use_scale_shift_norm.is_some(), "--use_scale_shift_norm"),
            (f.resblock_updown.is_some(), "--resblock_updown"),
            (f.use_fp16.is_some(), "--use_fp16"),
            (
                f.use_new_attention_order.is_some(),
                "--use_new_attention_order",
            ),
            (f.diffusion_steps.is_some(), "--diffusion_steps"),
            (f.noise_schedule.is_some(), "--noise_schedule"),
            (f.timestep_respacing.is_some(), "--timestep_respacing"),
            (f.use_kl.is_some(), "--use_kl"),
            (f.predict_xstart.is_some(), "--predict_xstart"),
            (f.rescale_timesteps.is_some(), "--rescale_timesteps"),
            (
                f.rescale_learned_sigmas.is_some(),
                "--rescale_learned_sigmas",
            ),
            (f.schedule_sampler.is_some(), "--schedule_sampler"),
            (f.lr.is_some(), "--lr"),
            (f.batch_size.is_some(), "--batch_size"),
        ]
        .into_iter()
        .find(|(given, _)| *given)
        .map(|(_, name)| name)
    }

    /// What elbo does not use of the flags given (training-only ones), as notes for stderr.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for (given, name) in [
            (self.schedule_sampler.is_some(), "--schedule_sampler"),
            (self.lr.is_some(), "--lr"),
            (self.batch_size.is_some(), "--batch_size"),
            (self.use_kl.is_some(), "--use_kl"),
            (
                self.rescale_learned_sigmas.is_some(),
                "--rescale_learned_sigmas",
            ),
            (self.use_checkpoint.is_some(), "--use_checkpoint"),
        ] {
            if given {
                notes.push(format!("{name}: a training option, ignored"));
            }
        }
        if self.use_fp16 == Some(true) {
            notes.push("--use_fp16 True: the weights are read and run in float32".into());
        }
        notes
    }
}

/// Whether `path` names a `torch.save` checkpoint (`.pt`, `.pth`).
pub fn is_checkpoint(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("pt") || e.eq_ignore_ascii_case("pth"))
}

/// The model of an improved-diffusion / guided-diffusion checkpoint run with `flags`.
pub fn load(path: &Path, flags: &ModelFlags, device: &Device) -> Result<LoadedDiffusion> {
    let plan = model_config(flags)?;
    plan.config
        .validate()
        .context("the improved-diffusion flags")?;
    let tensors = super::pickle::read_state_dict(path)?;
    let tensors = rename(tensors, &plan, path)?;
    let net = super::build_net(
        &plan.config.net,
        tensors,
        device,
        path,
        "the network the improved-diffusion flags describe (check --image_size, --num_channels, --num_res_blocks, --learn_sigma, --attention_resolutions, --num_heads)",
    )?;
    Ok(LoadedDiffusion {
        process: plan.config.process()?,
        config: plan.config,
        net,
        continuous: None,
    })
}

/// The config the flags describe, with what renaming needs.
pub struct Plan {
    pub config: DiffusionConfig,
    /// Attention rows grouped by head (improved-diffusion's legacy order).
    legacy_qkv: bool,
}

/// elbo's config of the model and process the flags describe.
pub fn model_config(f: &ModelFlags) -> Result<Plan> {
    if f.class_cond == Some(true) {
        bail!("--class_cond True: elbo reads unconditional models");
    }
    if f.resblock_updown == Some(true) {
        bail!(
            "--resblock_updown True: guided-diffusion's resampling residual blocks are not supported (elbo's U-Net resamples by convolution)"
        );
    }
    let size = f.image_size.unwrap_or(64);
    let base = f.num_channels.unwrap_or(128);
    let mult: Vec<usize> = match f.channel_mult.as_deref().filter(|s| !s.is_empty()) {
        Some(list) => list
            .split(',')
            .map(|v| v.trim().parse::<usize>().ok().filter(|&m| m >= 1))
            .collect::<Option<_>>()
            .with_context(|| format!("--channel_mult {list:?}: whole multipliers like 1,2,2,2 expected (guided-diffusion's 0.5 is not supported)"))?,
        None => match size {
            256 => vec![1, 1, 2, 2, 4, 4],
            128 => vec![1, 1, 2, 3, 4],
            64 => vec![1, 2, 3, 4],
            32 => vec![1, 2, 2, 2],
            _ => bail!("--image_size {size}: their scripts build 32, 64, 128 or 256 (or pass --channel_mult)"),
        },
    };
    let attention_levels = attention_levels(
        f.attention_resolutions.as_deref().unwrap_or("16,8"),
        size,
        mult.len(),
    )?;
    let heads = f.num_heads.unwrap_or(4);
    let heads_up = match f.num_heads_upsample.unwrap_or(-1) {
        -1 => 0,
        n if n >= 1 => n as usize,
        n => bail!("--num_heads_upsample {n}: a count or -1 expected"),
    };
    let head_channels = match f.num_head_channels.unwrap_or(-1) {
        -1 => 0,
        n if n >= 1 => n as usize,
        n => bail!("--num_head_channels {n}: a count or -1 expected"),
    };
    let learn_sigma = f.learn_sigma.unwrap_or(false);
    let dropout = f.dropout.unwrap_or(0.0);
    if !(0.0..1.0).contains(&dropout) {
        bail!("--dropout {dropout}: a probability in [0, 1) expected");
    }
    let net = NetConfig::Unet {
        base,
        channel_mult: mult,
        groups: 32,
        attention: true,
        in_channels: 3,
        res_blocks: Some(f.num_res_blocks.unwrap_or(2)),
        attention_levels,
        dropout: dropout as f32,
        options: UnetOptions {
            heads,
            heads_up,
            head_channels,
            scale_shift: f.use_scale_shift_norm.unwrap_or(true),
            out_channels: if learn_sigma { 6 } else { 0 },
            ..UnetOptions::default()
        },
    };
    let t = f.diffusion_steps.unwrap_or(1000);
    Schedule::check_size(t).context("--diffusion_steps")?;
    let (beta_schedule, betas) = match f.noise_schedule.as_deref().unwrap_or("linear") {
        // Their linear schedule keeps beta_t T fixed: 1e-4 .. 0.02 scaled by 1000 / T.
        "linear" if t == 1000 => (BetaSchedule::Linear, None),
        "linear" => {
            let scale = 1000.0 / t as f64;
            (
                BetaSchedule::Linear,
                Some(linspace(scale * BETA_START, scale * BETA_END, t)),
            )
        }
        "cosine" => (BetaSchedule::Cosine, None),
        other => bail!("--noise_schedule {other}: linear or cosine expected"),
    };
    let base_schedule = match &betas {
        Some(b) => Schedule::custom(beta_schedule, b.clone()).context("--noise_schedule")?,
        None => Schedule::new(beta_schedule, t)?,
    };
    let rescale = f.rescale_timesteps.unwrap_or(true);
    let spacing = f.timestep_respacing.as_deref().unwrap_or("");
    let (betas, model_times, steps) = if spacing.is_empty() {
        let times =
            (rescale && t != 1000).then(|| (0..t).map(|s| s as f64 * 1000.0 / t as f64).collect());
        (betas, times, t)
    } else {
        let kept = space_timesteps(t, spacing)?;
        let (new_betas, map) = respaced_betas(&base_schedule.alphas_cumprod, &kept);
        let scale = if rescale { 1000.0 / t as f64 } else { 1.0 };
        let times: Vec<f64> = map.iter().map(|&s| s as f64 * scale).collect();
        let n = new_betas.len();
        (Some(new_betas), Some(times), n)
    };
    let variance = match (learn_sigma, f.sigma_small.unwrap_or(false)) {
        (true, _) => VarianceType::LearnedRange,
        (false, true) => VarianceType::FixedSmall,
        (false, false) => VarianceType::FixedLarge,
    };
    let config = DiffusionConfig {
        net,
        beta_schedule,
        num_train_timesteps: steps,
        prediction: if f.predict_xstart == Some(true) {
            Prediction::X0
        } else {
            Prediction::Eps
        },
        image_shape: Some(ImageShape {
            channels: 3,
            height: size,
            width: size,
        }),
        betas,
        model_times,
        variance: Some(variance),
        continuous: None,
    };
    Ok(Plan {
        config,
        legacy_qkv: f.use_new_attention_order != Some(true),
    })
}

/// The levels with attention: level i (downsampling factor 2^i) where `image_size / r` is 2^i
/// for one of the resolutions r.
fn attention_levels(list: &str, size: usize, levels: usize) -> Result<Vec<usize>> {
    let mut factors = Vec::new();
    for r in list.split(',').filter(|r| !r.trim().is_empty()) {
        let r: usize = r.trim().parse().ok().filter(|&r| r >= 1).with_context(|| {
            format!("--attention_resolutions {list:?}: resolutions like 16,8 expected")
        })?;
        factors.push(size / r);
    }
    Ok((0..levels)
        .filter(|&i| factors.contains(&(1usize << i)))
        .collect())
}

/// improved-diffusion's `space_timesteps`: the steps kept of T for "ddimN" (a stride that keeps
/// exactly N) or section counts "a,b,..." (T cut into equal sections, each spaced evenly with
/// Python's rounding).
pub fn space_timesteps(t: usize, spec: &str) -> Result<Vec<usize>> {
    if let Some(n) = spec.strip_prefix("ddim") {
        let n: usize = n
            .parse()
            .ok()
            .with_context(|| format!("--timestep_respacing {spec}: ddimN expected"))?;
        for stride in 1..t {
            if (0..t).step_by(stride).count() == n {
                return Ok((0..t).step_by(stride).collect());
            }
        }
        bail!("--timestep_respacing {spec}: no stride of T = {t} gives exactly {n} steps");
    }
    let counts: Vec<usize> = spec
        .split(',')
        .map(|c| c.trim().parse::<usize>().ok())
        .collect::<Option<_>>()
        .with_context(|| {
            format!("--timestep_respacing {spec:?}: section counts like 250 or 10,5 expected")
        })?;
    let (per, extra) = (t / counts.len(), t % counts.len());
    let mut steps = Vec::new();
    let mut start = 0;
    for (i, &count) in counts.iter().enumerate() {
        let size = per + usize::from(i < extra);
        if size < count || count == 0 {
            bail!(
                "--timestep_respacing {spec}: cannot take {count} steps from a section of {size}"
            );
        }
        let stride = if count <= 1 {
            1.0
        } else {
            (size - 1) as f64 / (count - 1) as f64
        };
        let mut cur = 0.0f64;
        for _ in 0..count {
            steps.push(start + cur.round_ties_even() as usize);
            cur += stride;
        }
        start += size;
    }
    steps.sort_unstable();
    steps.dedup();
    Ok(steps)
}

/// Where a module of their `UNetModel` goes in elbo's.
#[derive(Debug, Clone)]
enum Place {
    Res(String),
    /// An attention block and its head count.
    Attn(String, usize),
    Plain(String),
}

/// Their module prefixes and elbo's, walking the architecture as their `UNetModel.__init__`.
fn places(net: &NetConfig) -> Result<Vec<(String, Place)>> {
    let NetConfig::Unet {
        base,
        channel_mult,
        res_blocks,
        attention_levels,
        options,
        ..
    } = net
    else {
        bail!("a U-Net expected");
    };
    let nrb = res_blocks.unwrap_or(1);
    let levels = channel_mult.len();
    let mut v = vec![
        (
            "time_embed.0".to_string(),
            Place::Plain("time_embedding.linear_1".into()),
        ),
        (
            "time_embed.2".to_string(),
            Place::Plain("time_embedding.linear_2".into()),
        ),
        (
            "input_blocks.0.0".to_string(),
            Place::Plain("conv_in".into()),
        ),
        ("out.0".to_string(), Place::Plain("norm_out".into())),
        ("out.2".to_string(), Place::Plain("conv_out".into())),
    ];
    let mut k = 1;
    for (i, &m) in channel_mult.iter().enumerate() {
        let c = base * m;
        for j in 0..nrb {
            v.push((
                format!("input_blocks.{k}.0"),
                Place::Res(format!("down.{i}.res.{j}")),
            ));
            if attention_levels.contains(&i) {
                let h = options.heads_at(c, false)?;
                v.push((
                    format!("input_blocks.{k}.1"),
                    Place::Attn(format!("down.{i}.attn.{j}"), h),
                ));
            }
            k += 1;
        }
        if i + 1 < levels {
            v.push((
                format!("input_blocks.{k}.0.op"),
                Place::Plain(format!("down.{i}.downsample")),
            ));
            k += 1;
        }
    }
    let c_mid = base * channel_mult[levels - 1];
    v.push(("middle_block.0".into(), Place::Res("mid.res1".into())));
    v.push((
        "middle_block.1".into(),
        Place::Attn("mid.attn".into(), options.heads_at(c_mid, false)?),
    ));
    v.push(("middle_block.2".into(), Place::Res("mid.res2".into())));
    let mut k = 0;
    for (i, &m) in channel_mult.iter().enumerate().rev() {
        let c = base * m;
        for j in 0..=nrb {
            v.push((
                format!("output_blocks.{k}.0"),
                Place::Res(format!("up.{i}.res.{j}")),
            ));
            let mut idx = 1;
            if attention_levels.contains(&i) {
                let h = options.heads_at(c, true)?;
                v.push((
                    format!("output_blocks.{k}.1"),
                    Place::Attn(format!("up.{i}.attn.{j}"), h),
                ));
                idx = 2;
            }
            if i > 0 && j == nrb {
                v.push((
                    format!("output_blocks.{k}.{idx}.conv"),
                    Place::Plain(format!("up.{i}.upsample")),
                ));
            }
            k += 1;
        }
    }
    // Longest prefixes first, so "input_blocks.1.0" does not take "input_blocks.1.0.op"'s.
    v.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    Ok(v)
}

/// Their parameter names to elbo's (see the module's table); every tensor must find its place.
fn rename(
    tensors: HashMap<String, Tensor>,
    plan: &Plan,
    path: &Path,
) -> Result<HashMap<String, Tensor>> {
    let at = path.display();
    let places = places(&plan.config.net)?;
    let mut out = HashMap::with_capacity(tensors.len());
    for (name, t) in tensors {
        let Some((prefix, place)) = places.iter().find(|(p, _)| {
            name.len() > p.len() && name.starts_with(p.as_str()) && name.as_bytes()[p.len()] == b'.'
        }) else {
            bail!(
                "{at}: tensor {name} has no place in the network the flags describe (class-conditional, or other flags?)"
            );
        };
        let rest = &name[prefix.len() + 1..];
        let (mapped, t) = match place {
            Place::Plain(p) => (format!("{p}.{rest}"), t),
            Place::Res(p) => {
                let (module, param) = rest.rsplit_once('.').unwrap_or((rest, ""));
                let m = match module {
                    "in_layers.0" => "norm1",
                    "in_layers.2" => "conv1",
                    "emb_layers.1" => "time_emb_proj",
                    "out_layers.0" => "norm2",
                    "out_layers.3" => "conv2",
                    "skip_connection" => "conv_shortcut",
                    _ => bail!("{at}: tensor {name} is not part of a residual block elbo knows"),
                };
                (format!("{p}.{m}.{param}"), t)
            }
            Place::Attn(p, heads) => {
                let (module, param) = rest.rsplit_once('.').unwrap_or((rest, ""));
                match module {
                    "norm" => (format!("{p}.norm.{param}"), t),
                    "qkv" => {
                        let t = if plan.legacy_qkv {
                            regroup_qkv(&t, *heads).with_context(|| format!("{at}: {name}"))?
                        } else {
                            t
                        };
                        (format!("{p}.qkv.{param}"), as_conv2d(t)?)
                    }
                    "proj_out" => (format!("{p}.proj_out.{param}"), as_conv2d(t)?),
                    _ => bail!("{at}: tensor {name} is not part of an attention block elbo knows"),
                }
            }
        };
        out.insert(mapped, t);
    }
    Ok(out)
}

/// A conv1d weight `[O, I, 1]` as a 1 x 1 conv2d's `[O, I, 1, 1]` (biases stay).
fn as_conv2d(t: Tensor) -> Result<Tensor> {
    Ok(match t.dims() {
        [o, i, 1] => t.reshape((*o, *i, 1, 1))?,
        _ => t,
    })
}

/// Rows `[head, q|k|v, d]` (improved-diffusion's `QKVAttention`) regrouped as `[q|k|v, head,
/// d]` (elbo's and guided-diffusion's new order); the first dimension is 3C.
fn regroup_qkv(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if !rows.is_multiple_of(3 * heads) {
        bail!("{rows} qkv rows do not split into 3 x {heads} heads");
    }
    let d = rows / (3 * heads);
    let rest: usize = dims[1..].iter().product();
    Ok(t.reshape((heads, 3, d, rest))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape(dims)?)
}
