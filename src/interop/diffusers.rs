//! diffusers' `save_pretrained` folders as elbo diffusion models: a `UNet2DModel` folder
//! (`config.json` with `_class_name: UNet2DModel`, `diffusion_pytorch_model.safetensors`) or a
//! pipeline folder (`model_index.json`, `unet/`, `scheduler/scheduler_config.json`), as
//! `google/ddpm-cifar10-32` and the other DDPM pipelines are published.
//!
//! The `UNet2DModel` becomes elbo's U-Net in the DDPM layout ([`NetConfig::Unet`] with
//! `res_blocks`), its parameters renamed (no copy of the architecture):
//!
//! ```text
//! down_blocks.{i}.resnets.{j}.*            down.{i}.res.{j}.*     (norm1, conv1, time_emb_proj, ...)
//! down_blocks.{i}.attentions.{j}.*         down.{i}.attn.{j}.*    group_norm -> norm,
//!                                                                  [to_q; to_k; to_v] -> qkv (1x1 conv),
//!                                                                  to_out.0 -> proj_out
//! down_blocks.{i}.downsamplers.0.conv.*    down.{i}.downsample.*
//! mid_block.resnets.{0,1}, attentions.0    mid.res1, mid.res2, mid.attn
//! up_blocks.{L-1-i}.resnets.{j}, ...       up.{i}.res.{j}, up.{i}.attn.{j}, up.{i}.upsample
//! conv_norm_out                            norm_out
//! ```
//!
//! Every config field is checked: a field or value elbo's network cannot reproduce is an error
//! naming it, never a silently different network. The scheduler's `beta_schedule`,
//! `num_train_timesteps` and `prediction_type` give the process; a bare `UNet2DModel` folder
//! takes DDPM's (linear, T = 1000, epsilon).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::data::ImageShape;
use crate::diffusion::model::{DiffusionConfig, LoadedDiffusion};
use crate::diffusion::nets::{NetConfig, UnetOptions};
use crate::diffusion::{BetaSchedule, Prediction, VarianceType};

/// The most bytes a diffusers JSON config may have.
const CONFIG_MAX: u64 = 1 << 20;

/// Whether `path` is a folder diffusers wrote (a pipeline's `model_index.json` or a model's
/// `config.json`).
pub fn is_diffusers_folder(path: &Path) -> bool {
    // An elbo run folder has a config.json too (the run's), beside its model.safetensors.
    let run = path.join(crate::run_dir::MODEL).is_file();
    path.is_dir()
        && (path.join("model_index.json").is_file() || (path.join("config.json").is_file() && !run))
}

/// A diffusers folder's config and its tensors under elbo's names (with the weights file and
/// the UNet config's path, for errors).
pub fn load_parts(
    path: &Path,
    device: &Device,
) -> Result<(DiffusionConfig, HashMap<String, Tensor>, PathBuf, PathBuf)> {
    let (unet_dir, scheduler) = if path.join("model_index.json").is_file() {
        let index = read_json(&path.join("model_index.json"))?;
        let class = index
            .get("_class_name")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !matches!(class, "DDPMPipeline" | "DDIMPipeline") {
            bail!(
                "{}: a {class} pipeline; elbo reads the unconditional DDPM and DDIM pipelines (DDPMPipeline, DDIMPipeline)",
                path.join("model_index.json").display()
            );
        }
        let sched = path.join("scheduler").join("scheduler_config.json");
        (
            path.join("unet"),
            Some(read_json(&sched)?).map(|v| (sched, v)),
        )
    } else {
        (path.to_path_buf(), None)
    };
    let config_path = unet_dir.join("config.json");
    let unet = read_json(&config_path)?;
    let (net, shape) = unet_config(&unet, &config_path)?;
    let sched = match &scheduler {
        Some((p, v)) => scheduler_config(v, p)?,
        None => SchedulerConfig {
            beta_schedule: BetaSchedule::Linear,
            num_train_timesteps: 1000,
            prediction: Prediction::Eps,
            betas: None,
            variance: None,
        },
    };
    let config = DiffusionConfig {
        net,
        beta_schedule: sched.beta_schedule,
        num_train_timesteps: sched.num_train_timesteps,
        prediction: sched.prediction,
        image_shape: Some(shape),
        betas: sched.betas,
        model_times: None,
        variance: sched.variance,
        continuous: None,
    };
    let learned_net =
        matches!(&config.net, NetConfig::Unet { options, .. } if options.out_channels != 0);
    if learned_net && !config.variance.is_some_and(VarianceType::is_learned) {
        bail!(
            "{}: the UNet gives 2C channels (learned variances) but {} names no learned variance_type (learned, learned_range)",
            config_path.display(),
            match &scheduler {
                Some((p, _)) => p.display().to_string(),
                None => "a bare UNet folder (no scheduler)".to_string(),
            }
        );
    }
    config
        .validate()
        .with_context(|| format!("{}", config_path.display()))?;
    let weights = weights_path(&unet_dir)?;
    let raw = if weights.extension().is_some_and(|e| e == "bin") {
        // A torch.save pickle (older diffusers folders): candle's reader behind elbo's checks.
        let tensors = super::pickle::read_state_dict(&weights)?;
        for (name, t) in &tensors {
            crate::checkpoint::check_finite(t)
                .with_context(|| format!("{}: tensor {name}", weights.display()))?;
        }
        tensors
    } else {
        crate::checkpoint::load(&weights, device)?.tensors
    };
    let tensors = rename(raw, &config.net, &weights)?;
    Ok((config, tensors, weights, config_path))
}

/// The model of a diffusers folder: a DDPM-style pipeline or a bare `UNet2DModel`.
pub fn load(path: &Path, device: &Device) -> Result<LoadedDiffusion> {
    let (config, tensors, weights, config_path) = load_parts(path, device)?;
    let net = super::build_net(
        &config.net,
        tensors,
        device,
        &weights,
        &format!("the network {}'s config describes", config_path.display()),
    )?;
    Ok(LoadedDiffusion {
        process: config.process()?,
        config,
        net,
        continuous: None,
    })
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = crate::files::read_regular_file(path, CONFIG_MAX)?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not a JSON config", path.display()))
}

fn weights_path(dir: &Path) -> Result<PathBuf> {
    let p = dir.join("diffusion_pytorch_model.safetensors");
    if p.is_file() {
        return Ok(p);
    }
    let bin = dir.join("diffusion_pytorch_model.bin");
    if bin.is_file() {
        return Ok(bin);
    }
    bail!(
        "{}: no diffusion_pytorch_model.safetensors (or .bin) in the folder",
        dir.display()
    )
}

/// The fields of a `UNet2DModel` config and what elbo's network does with each: `Some(v)`
/// the values it reproduces (`null` counts as the default), `None` any value (sizes and the
/// fields read below).
fn unet_fields() -> Vec<(&'static str, Option<Vec<Value>>)> {
    use serde_json::json;
    vec![
        ("_class_name", Some(vec![json!("UNet2DModel")])),
        ("_diffusers_version", None),
        ("_name_or_path", None),
        ("sample_size", None),
        ("in_channels", None),
        ("out_channels", None),
        ("center_input_sample", Some(vec![json!(false)])),
        ("time_embedding_type", Some(vec![json!("positional")])),
        ("time_embedding_dim", Some(vec![Value::Null])),
        ("freq_shift", None),
        ("flip_sin_to_cos", None),
        ("down_block_types", None),
        ("mid_block_type", Some(vec![json!("UNetMidBlock2D")])),
        ("up_block_types", None),
        ("block_out_channels", None),
        ("layers_per_block", None),
        ("mid_block_scale_factor", Some(vec![json!(1), json!(1.0)])),
        ("downsample_padding", None),
        ("downsample_type", Some(vec![json!("conv")])),
        ("upsample_type", Some(vec![json!("conv")])),
        ("dropout", None),
        ("act_fn", Some(vec![json!("silu"), json!("swish")])),
        ("attention_head_dim", None),
        ("norm_num_groups", None),
        ("attn_norm_num_groups", None),
        ("norm_eps", None),
        (
            "resnet_time_scale_shift",
            Some(vec![json!("default"), json!("scale_shift")]),
        ),
        ("add_attention", None),
        ("class_embed_type", Some(vec![Value::Null])),
        ("num_class_embeds", Some(vec![Value::Null])),
        ("num_train_timesteps", Some(vec![Value::Null])),
    ]
}

/// elbo's U-Net config and the image shape of a `UNet2DModel` config (`path` names it in
/// errors).
pub fn unet_config(v: &Value, path: &Path) -> Result<(NetConfig, ImageShape)> {
    let at = path.display();
    let Some(obj) = v.as_object() else {
        bail!("{at}: not a JSON object");
    };
    let fields = unet_fields();
    for (key, value) in obj {
        match fields.iter().find(|(k, _)| k == key) {
            None if value.is_null() => {}
            None => bail!("{at}: field {key} = {value} is not supported by elbo's U-Net"),
            Some((_, Some(allowed))) if !value.is_null() && !allowed.contains(value) => {
                bail!("{at}: {key} = {value} is not supported (elbo's U-Net takes {allowed:?})")
            }
            _ => {}
        }
    }
    let uint = |key: &str, default: Option<u64>| -> Result<usize> {
        match obj.get(key).filter(|v| !v.is_null()) {
            Some(v) => v
                .as_u64()
                .filter(|&n| n <= 1 << 24)
                .map(|n| n as usize)
                .with_context(|| format!("{at}: {key} = {v}: a whole number expected")),
            None => default
                .map(|n| n as usize)
                .with_context(|| format!("{at}: no {key}")),
        }
    };
    let strings = |key: &str| -> Result<Vec<String>> {
        let list = obj
            .get(key)
            .and_then(Value::as_array)
            .with_context(|| format!("{at}: {key}: a list of block names expected"))?;
        list.iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("{at}: {key}: {s} is not a block name"))
            })
            .collect()
    };
    let channels: Vec<usize> = obj
        .get("block_out_channels")
        .and_then(Value::as_array)
        .with_context(|| format!("{at}: block_out_channels: a list of channel counts expected"))?
        .iter()
        .map(|c| {
            c.as_u64()
                .filter(|&n| (1..=1 << 24).contains(&n))
                .map(|n| n as usize)
                .with_context(|| format!("{at}: block_out_channels: {c} is not a channel count"))
        })
        .collect::<Result<_>>()?;
    let levels = channels.len();
    if levels == 0 || levels > 6 {
        bail!("{at}: block_out_channels {channels:?}: 1 to 6 levels expected");
    }
    let base = channels[0];
    let mut mult = Vec::with_capacity(levels);
    for &c in &channels {
        if c % base != 0 {
            bail!(
                "{at}: block_out_channels {channels:?}: elbo's U-Net needs every level's channels a multiple of the first's"
            );
        }
        mult.push(c / base);
    }
    let attention_levels = attention_levels(
        &strings("down_block_types")?,
        &strings("up_block_types")?,
        &channels,
        &at.to_string(),
    )?;
    // Channels per head (diffusers' `heads = channels / attention_head_dim`); null: one head.
    let head_channels = match obj.get("attention_head_dim").filter(|v| !v.is_null()) {
        None => 0,
        Some(h) => h
            .as_u64()
            .filter(|&n| (1..=1 << 24).contains(&n))
            .with_context(|| format!("{at}: attention_head_dim = {h}: a channel count expected"))?
            as usize,
    };
    let add_attention = obj
        .get("add_attention")
        .map_or(Some(true), Value::as_bool)
        .with_context(|| format!("{at}: add_attention: true or false expected"))?;
    let float = |key: &str, default: f64| -> Result<f64> {
        match obj.get(key).filter(|v| !v.is_null()) {
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite())
                .with_context(|| format!("{at}: {key} = {v}: a number expected")),
            None => Ok(default),
        }
    };
    let norm_eps = float("norm_eps", 1e-5)?;
    if !(norm_eps > 0.0 && norm_eps < 1.0) {
        bail!("{at}: norm_eps = {norm_eps}: a small positive number expected");
    }
    let dropout = float("dropout", 0.0)?;
    let flip = match obj.get("flip_sin_to_cos").filter(|v| !v.is_null()) {
        Some(v) => v
            .as_bool()
            .with_context(|| format!("{at}: flip_sin_to_cos: true or false expected"))?,
        None => true,
    };
    let freq_shift = uint("freq_shift", Some(0))?;
    let downsample_padding = uint("downsample_padding", Some(1))?;
    if downsample_padding > 1 {
        bail!("{at}: downsample_padding = {downsample_padding}: elbo's U-Net takes 0 or 1");
    }
    let in_channels = uint("in_channels", Some(3))?;
    let out_channels = uint("out_channels", Some(in_channels as u64))?;
    if out_channels != in_channels && out_channels != 2 * in_channels {
        bail!(
            "{at}: {in_channels} channels in, {out_channels} out; elbo's U-Net gives C (the prediction) or 2C (with learned variances)"
        );
    }
    let groups = uint("norm_num_groups", Some(32))?;
    let scale_shift =
        obj.get("resnet_time_scale_shift").and_then(Value::as_str) == Some("scale_shift");
    // diffusers' middle attention takes `attn_norm_num_groups`, or with scale-shift blocks
    // none at all (no GroupNorm); elbo's has the blocks' GroupNorm.
    match obj.get("attn_norm_num_groups").filter(|v| !v.is_null()) {
        Some(v) if v.as_u64() != Some(groups as u64) => bail!(
            "{at}: attn_norm_num_groups = {v} differs from norm_num_groups = {groups}; elbo's attention norms use the blocks' groups"
        ),
        None if scale_shift && add_attention => bail!(
            "{at}: resnet_time_scale_shift = scale_shift with attn_norm_num_groups null gives a middle attention without GroupNorm, which elbo's U-Net does not have"
        ),
        _ => {}
    }
    let size = uint("sample_size", None)?;
    let net = NetConfig::Unet {
        base,
        channel_mult: mult,
        groups,
        attention: add_attention,
        in_channels,
        res_blocks: Some(uint("layers_per_block", Some(2))?),
        attention_levels,
        dropout: dropout as f32,
        options: UnetOptions {
            flip_sin_to_cos: flip,
            freq_shift,
            norm_eps,
            downsample_padding,
            head_channels,
            scale_shift,
            out_channels: if out_channels == in_channels {
                0
            } else {
                out_channels
            },
            ..UnetOptions::default()
        },
    };
    let shape = ImageShape {
        channels: in_channels,
        height: size,
        width: size,
    };
    Ok((net, shape))
}

/// The levels with attention, from the down and up block types (each level's attention the
/// same both ways).
fn attention_levels(
    down: &[String],
    up: &[String],
    channels: &[usize],
    at: &str,
) -> Result<Vec<usize>> {
    let levels = channels.len();
    if down.len() != levels || up.len() != levels {
        bail!(
            "{at}: {} down and {} up blocks for {levels} levels (block_out_channels)",
            down.len(),
            up.len()
        );
    }
    let mut attention_levels = Vec::new();
    for (i, d) in down.iter().enumerate() {
        let u = &up[levels - 1 - i];
        let attn = match (d.as_str(), u.as_str()) {
            ("DownBlock2D", "UpBlock2D") => false,
            ("AttnDownBlock2D", "AttnUpBlock2D") => true,
            ("DownBlock2D" | "AttnDownBlock2D", "UpBlock2D" | "AttnUpBlock2D") => bail!(
                "{at}: level {i} has {d} down but {u} up; elbo's U-Net puts attention on both ways of a level"
            ),
            _ => bail!(
                "{at}: block types {d} / {u} are not supported (DownBlock2D, AttnDownBlock2D, UpBlock2D, AttnUpBlock2D)"
            ),
        };
        if attn {
            attention_levels.push(i);
        }
    }
    Ok(attention_levels)
}

/// What a `DDPMScheduler` / `DDIMScheduler` config says about the process.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    pub beta_schedule: BetaSchedule,
    pub num_train_timesteps: usize,
    pub prediction: Prediction,
    /// Explicit betas: `trained_betas`, or a linear range other than DDPM's.
    pub betas: Option<Vec<f64>>,
    /// `variance_type`: fixed_small, fixed_large, learned or learned_range.
    pub variance: Option<VarianceType>,
}

/// The schedule, T, prediction target and learned variances of a `DDPMScheduler` /
/// `DDIMScheduler` config.
pub fn scheduler_config(v: &Value, path: &Path) -> Result<SchedulerConfig> {
    let at = path.display();
    let Some(obj) = v.as_object() else {
        bail!("{at}: not a JSON object");
    };
    let s = |key: &str, default: &str| -> String {
        obj.get(key)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    let schedule = match s("beta_schedule", "linear").as_str() {
        "linear" => BetaSchedule::Linear,
        "scaled_linear" => BetaSchedule::ScaledLinear,
        "squaredcos_cap_v2" => BetaSchedule::Cosine,
        other => bail!(
            "{at}: beta_schedule = {other} is not supported (linear, scaled_linear, squaredcos_cap_v2)"
        ),
    };
    let t = match obj.get("num_train_timesteps") {
        None => 1000,
        Some(v) => v
            .as_u64()
            .filter(|&n| n >= 2 && n <= crate::diffusion::schedule::MAX_TIMESTEPS as u64)
            .with_context(|| format!("{at}: num_train_timesteps = {v}: 2 to 1,000,000 expected"))?
            as usize,
    };
    let float = |key: &str, default: f64| -> Result<f64> {
        match obj.get(key).filter(|v| !v.is_null()) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|b| *b > 0.0 && *b < 1.0)
                .with_context(|| format!("{at}: {key} = {v}: a number in (0, 1) expected")),
        }
    };
    use crate::diffusion::schedule::{BETA_END, BETA_START, linspace};
    let (start, end) = (
        float("beta_start", BETA_START)?,
        float("beta_end", BETA_END)?,
    );
    // A linear range other than DDPM's: the betas written out.
    let mut betas = match schedule {
        BetaSchedule::Cosine => None,
        _ if start == BETA_START && end == BETA_END => None,
        BetaSchedule::Linear => Some(linspace(start, end, t)),
        BetaSchedule::ScaledLinear => Some(
            linspace(start.sqrt(), end.sqrt(), t)
                .into_iter()
                .map(|b| b * b)
                .collect(),
        ),
    };
    if let Some(list) = obj.get("trained_betas").filter(|v| !v.is_null()) {
        let list = list.as_array().filter(|l| l.len() == t).with_context(|| {
            format!("{at}: trained_betas: a list of num_train_timesteps = {t} numbers expected")
        })?;
        let values: Vec<f64> = list
            .iter()
            .map(|b| {
                b.as_f64()
                    .filter(|b| *b > 0.0 && *b < 1.0)
                    .with_context(|| format!("{at}: trained_betas: {b} is not in (0, 1)"))
            })
            .collect::<Result<_>>()?;
        betas = Some(values);
    }
    if obj.get("rescale_betas_zero_snr").and_then(Value::as_bool) == Some(true) {
        bail!("{at}: rescale_betas_zero_snr = true is not supported");
    }
    let variance = match s("variance_type", "fixed_small").as_str() {
        "fixed_small" | "fixed_small_log" => Some(VarianceType::FixedSmall),
        "fixed_large" | "fixed_large_log" => Some(VarianceType::FixedLarge),
        "learned" => Some(VarianceType::Learned),
        "learned_range" => Some(VarianceType::LearnedRange),
        other => bail!(
            "{at}: variance_type = {other} is not supported (fixed_small, fixed_large, learned, learned_range)"
        ),
    };
    let prediction = match s("prediction_type", "epsilon").as_str() {
        "epsilon" => Prediction::Eps,
        "sample" => Prediction::X0,
        "v_prediction" => Prediction::V,
        other => bail!(
            "{at}: prediction_type = {other} is not supported (epsilon, sample, v_prediction)"
        ),
    };
    Ok(SchedulerConfig {
        beta_schedule: schedule,
        num_train_timesteps: t,
        prediction,
        betas,
        variance,
    })
}

/// diffusers' parameter names to elbo's (see the module's table); attention's three linear
/// maps become one 1 x 1 convolution. Every tensor must find its place.
fn rename(
    tensors: HashMap<String, Tensor>,
    net: &NetConfig,
    path: &Path,
) -> Result<HashMap<String, Tensor>> {
    let NetConfig::Unet {
        channel_mult,
        res_blocks,
        ..
    } = net
    else {
        bail!("{}: a U-Net expected", path.display());
    };
    if res_blocks.is_none() {
        bail!("{}: the DDPM layout expected", path.display());
    }
    let levels = channel_mult.len();
    let mut out = HashMap::new();
    let mut attn: HashMap<String, [Option<Tensor>; 3]> = HashMap::new();
    for (name, t) in tensors {
        let parts: Vec<&str> = name.split('.').collect();
        let mapped = match parts.as_slice() {
            ["down_blocks", i, "resnets", j, rest @ ..] => {
                Some(format!("down.{i}.res.{j}.{}", rest.join(".")))
            }
            ["down_blocks", i, "attentions", j, rest @ ..] => {
                attention(&mut attn, &format!("down.{i}.attn.{j}"), rest, &t)?
            }
            ["down_blocks", i, "downsamplers", "0", "conv", p] => {
                Some(format!("down.{i}.downsample.{p}"))
            }
            ["up_blocks", k, kind, j, rest @ ..] => {
                let k: usize = k.parse().unwrap_or(usize::MAX);
                if k >= levels {
                    bail!("{}: {name}: no such up block", path.display());
                }
                let i = levels - 1 - k;
                match (*kind, rest) {
                    ("resnets", rest) => Some(format!("up.{i}.res.{j}.{}", rest.join("."))),
                    ("attentions", rest) => {
                        attention(&mut attn, &format!("up.{i}.attn.{j}"), rest, &t)?
                    }
                    ("upsamplers", ["conv", p]) if *j == "0" => {
                        Some(format!("up.{i}.upsample.{p}"))
                    }
                    _ => bail!(
                        "{}: tensor {name} has no place in elbo's U-Net",
                        path.display()
                    ),
                }
            }
            ["mid_block", "resnets", j, rest @ ..] => {
                let which = match *j {
                    "0" => "res1",
                    "1" => "res2",
                    _ => bail!(
                        "{}: {name}: the middle block has two resnets",
                        path.display()
                    ),
                };
                Some(format!("mid.{which}.{}", rest.join(".")))
            }
            ["mid_block", "attentions", "0", rest @ ..] => {
                attention(&mut attn, "mid.attn", rest, &t)?
            }
            ["conv_norm_out", p] => Some(format!("norm_out.{p}")),
            ["conv_in" | "conv_out" | "time_embedding", ..] => Some(name.clone()),
            _ => bail!(
                "{}: tensor {name} has no place in elbo's U-Net",
                path.display()
            ),
        };
        if let Some(m) = mapped {
            // The attention's output map: a linear layer in diffusers, a 1 x 1 conv in elbo.
            let t = if m.ends_with(".proj_out.weight") {
                as_conv(&t)?
            } else {
                t
            };
            out.insert(m, t);
        }
    }
    for (key, [q, k, v]) in attn {
        let (Some(q), Some(k), Some(v)) = (q, k, v) else {
            bail!(
                "{}: attention {key} lacks one of its query, key and value maps",
                path.display()
            );
        };
        let cat = Tensor::cat(&[&q, &k, &v], 0)?;
        // key = "{prefix}.{weight|bias}"
        let (prefix, p) = key.rsplit_once('.').unwrap_or((&key, ""));
        out.insert(format!("{prefix}.qkv.{p}"), as_conv(&cat)?);
    }
    Ok(out)
}

/// A linear map's weight `[O, I]` as a 1 x 1 convolution's `[O, I, 1, 1]` (biases stay).
fn as_conv(t: &Tensor) -> Result<Tensor> {
    Ok(match t.dims() {
        [o, i] => t.reshape((*o, *i, 1, 1))?,
        _ => t.clone(),
    })
}

/// One attention tensor (`rest`: its name after the block's prefix): the norm and the output
/// map are renamed; the query, key and value maps are held until all three are read.
fn attention(
    held: &mut HashMap<String, [Option<Tensor>; 3]>,
    prefix: &str,
    rest: &[&str],
    t: &Tensor,
) -> Result<Option<String>> {
    let (which, p) = match rest {
        ["group_norm", p] => return Ok(Some(format!("{prefix}.norm.{p}"))),
        ["to_out", "0", p] | ["proj_attn", p] => return Ok(Some(format!("{prefix}.proj_out.{p}"))),
        ["to_q", p] | ["query", p] => (0, p),
        ["to_k", p] | ["key", p] => (1, p),
        ["to_v", p] | ["value", p] => (2, p),
        _ => bail!(
            "attention tensor {prefix}.{} is not supported",
            rest.join(".")
        ),
    };
    let key = format!("{prefix}.{p}");
    held.entry(key).or_insert([None, None, None])[which] = Some(t.clone());
    Ok(None)
}

/// diffusers' name of an elbo U-Net parameter (the inverse of [`rename`]'s table; attention's
/// `qkv` is split by the caller). `levels`: the number of levels.
fn diffusers_name(name: &str, levels: usize) -> Result<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let attn = |prefix: String, rest: &[&str]| -> Result<String> {
        Ok(match rest {
            ["norm", p] => format!("{prefix}.group_norm.{p}"),
            ["proj_out", p] => format!("{prefix}.to_out.0.{p}"),
            _ => bail!("{name}: not an attention parameter elbo writes"),
        })
    };
    Ok(match parts.as_slice() {
        ["down", i, "res", j, rest @ ..] => {
            format!("down_blocks.{i}.resnets.{j}.{}", rest.join("."))
        }
        ["down", i, "attn", j, rest @ ..] => attn(format!("down_blocks.{i}.attentions.{j}"), rest)?,
        ["down", i, "downsample", p] => format!("down_blocks.{i}.downsamplers.0.conv.{p}"),
        ["up", i, kind, rest @ ..] => {
            let i: usize = i.parse().unwrap_or(usize::MAX);
            if i >= levels {
                bail!("{name}: no such level");
            }
            let k = levels - 1 - i;
            match (*kind, rest) {
                ("res", [j, rest @ ..]) => format!("up_blocks.{k}.resnets.{j}.{}", rest.join(".")),
                ("attn", [j, rest @ ..]) => attn(format!("up_blocks.{k}.attentions.{j}"), rest)?,
                ("upsample", [p]) => format!("up_blocks.{k}.upsamplers.0.conv.{p}"),
                _ => bail!("{name}: not a parameter elbo writes"),
            }
        }
        ["mid", "res1", rest @ ..] => format!("mid_block.resnets.0.{}", rest.join(".")),
        ["mid", "res2", rest @ ..] => format!("mid_block.resnets.1.{}", rest.join(".")),
        ["mid", "attn", rest @ ..] => attn("mid_block.attentions.0".into(), rest)?,
        ["norm_out", p] => format!("conv_norm_out.{p}"),
        ["conv_in" | "conv_out" | "time_embedding", ..] => name.to_string(),
        _ => bail!("{name}: not a parameter of elbo's DDPM-layout U-Net"),
    })
}

/// The `UNet2DModel` config of an elbo U-Net in the DDPM layout (`shape`: its images).
fn unet_config_json(net: &NetConfig, shape: ImageShape) -> Result<Value> {
    use serde_json::json;
    let NetConfig::Unet {
        base,
        channel_mult,
        groups,
        attention,
        in_channels,
        res_blocks,
        attention_levels,
        dropout,
        options,
    } = net
    else {
        bail!("diffusers' UNet2DModel is a U-Net; this model is an MLP");
    };
    let Some(layers) = res_blocks else {
        bail!(
            "elbo's compact U-Net (one block per level) has no diffusers counterpart; train with --res-blocks N for DDPM's layout"
        );
    };
    let channels: Vec<usize> = channel_mult.iter().map(|m| base * m).collect();
    // One `attention_head_dim` for every attention block: a head count that gives one width.
    let mut attn_channels: Vec<usize> = attention_levels.iter().map(|&l| channels[l]).collect();
    if *attention {
        attn_channels.push(*channels.last().unwrap_or(base));
    }
    let one_head = options.heads == 1 && options.heads_up <= 1;
    let head_dim = if options.head_channels > 0 {
        json!(options.head_channels)
    } else if one_head {
        // null: each block's own width, one head (diffusers' default).
        Value::Null
    } else {
        let mut widths = Vec::new();
        for &c in &attn_channels {
            for up in [false, true] {
                widths.push(c / options.heads_at(c, up)?);
            }
        }
        widths.sort_unstable();
        widths.dedup();
        match widths.as_slice() {
            [] => Value::Null,
            [w] => json!(w),
            _ => bail!(
                "attention heads of different widths ({widths:?} channels): diffusers' UNet2DModel takes one attention_head_dim"
            ),
        }
    };
    let kinds = |attn: &str, plain: &str| -> Vec<String> {
        (0..channels.len())
            .map(|l| {
                if attention_levels.contains(&l) {
                    attn
                } else {
                    plain
                }
                .to_string()
            })
            .collect()
    };
    let down = kinds("AttnDownBlock2D", "DownBlock2D");
    let mut up = kinds("AttnUpBlock2D", "UpBlock2D");
    up.reverse();
    let sample_size = if shape.height == shape.width {
        json!(shape.height)
    } else {
        json!([shape.height, shape.width])
    };
    Ok(json!({
        "_class_name": "UNet2DModel",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        "add_attention": attention,
        "attention_head_dim": head_dim,
        // Without it, diffusers' scale-shift middle attention would have no GroupNorm.
        "attn_norm_num_groups": if options.scale_shift { json!(groups) } else { Value::Null },
        "block_out_channels": channels,
        "center_input_sample": false,
        "class_embed_type": null,
        "down_block_types": down,
        "downsample_padding": options.downsample_padding,
        "downsample_type": "conv",
        "dropout": dropout,
        "flip_sin_to_cos": options.flip_sin_to_cos,
        "freq_shift": options.freq_shift,
        "in_channels": in_channels,
        "layers_per_block": layers,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2D",
        "norm_eps": options.norm_eps,
        "norm_num_groups": groups,
        "num_class_embeds": null,
        "num_train_timesteps": null,
        "out_channels": options.out_channels(*in_channels),
        "resnet_time_scale_shift": if options.scale_shift { "scale_shift" } else { "default" },
        "sample_size": sample_size,
        "time_embedding_dim": null,
        "time_embedding_type": "positional",
        "up_block_types": up,
        "upsample_type": "conv",
    }))
}

/// The `DDPMScheduler` config of a process.
fn scheduler_config_json(config: &DiffusionConfig) -> Result<Value> {
    use serde_json::json;
    if config.model_times.is_some() {
        bail!(
            "the network is given rescaled or respaced timesteps (an improved-diffusion model with T != 1000 or respacing), which a diffusers scheduler cannot say"
        );
    }
    let schedule = match config.beta_schedule {
        BetaSchedule::Linear => "linear",
        BetaSchedule::ScaledLinear => "scaled_linear",
        BetaSchedule::Cosine => "squaredcos_cap_v2",
    };
    let variance = match config.variance.unwrap_or(VarianceType::FixedSmall) {
        VarianceType::FixedSmall => "fixed_small",
        VarianceType::FixedLarge => "fixed_large",
        VarianceType::Learned => "learned",
        VarianceType::LearnedRange => "learned_range",
    };
    let prediction = match config.prediction {
        Prediction::Eps => "epsilon",
        Prediction::X0 => "sample",
        Prediction::V => "v_prediction",
    };
    use crate::diffusion::schedule::{BETA_END, BETA_START};
    Ok(json!({
        "_class_name": "DDPMScheduler",
        "_diffusers_version": "0.42.1",
        "beta_end": BETA_END,
        "beta_schedule": schedule,
        "beta_start": BETA_START,
        "clip_sample": true,
        "clip_sample_range": 1.0,
        "dynamic_thresholding_ratio": 0.995,
        "num_train_timesteps": config.num_train_timesteps,
        "prediction_type": prediction,
        "rescale_betas_zero_snr": false,
        "sample_max_value": 1.0,
        "steps_offset": 0,
        "thresholding": false,
        "timestep_spacing": "leading",
        "trained_betas": config.betas,
        "variance_type": variance,
    }))
}

/// Writes an elbo diffusion model (its config and its parameters under elbo's names) as a
/// diffusers `DDPMPipeline` folder at `out`: `model_index.json`, `unet/config.json`,
/// `unet/diffusion_pytorch_model.safetensors`, `scheduler/scheduler_config.json`, which
/// `DDPMPipeline.from_pretrained(out)` loads. Everything is written into a fresh temporary
/// folder beside `out`, synced, and renamed to `out` at once; `out` must not exist.
pub fn export(
    config: &DiffusionConfig,
    tensors: &HashMap<String, Tensor>,
    out: &Path,
) -> Result<()> {
    if out.symlink_metadata().is_ok() {
        bail!("{}: exists; export writes a new folder", out.display());
    }
    if config.continuous.is_some() {
        bail!(
            "a continuous-time (VDM) model: diffusers' DDPMPipeline runs discrete timesteps given as integers, and this network takes gamma(t) scaled to [0, 1000]; it has no diffusers equivalent"
        );
    }
    let shape = config
        .image_shape()
        .context("diffusers' UNet2DModel takes images; this model is a 2-D toy")?;
    let unet = unet_config_json(&config.net, shape)?;
    let scheduler = scheduler_config_json(config)?;
    let NetConfig::Unet { channel_mult, .. } = &config.net else {
        bail!("a U-Net expected");
    };
    let levels = channel_mult.len();
    let mut named: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len() + 8);
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        if let Some(prefix) = name
            .strip_suffix(".qkv.weight")
            .or(name.strip_suffix(".qkv.bias"))
        {
            // [to_q; to_k; to_v] as one 1 x 1 convolution in elbo: three linear maps.
            let p = if name.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            let c = t.dim(0)? / 3;
            let base = diffusers_name(&format!("{prefix}.norm.{p}"), levels)?;
            let block = base
                .trim_end_matches(&format!(".group_norm.{p}"))
                .to_string();
            for (k, which) in ["to_q", "to_k", "to_v"].iter().enumerate() {
                let part = t.narrow(0, k * c, c)?;
                let part = if p == "weight" {
                    part.reshape((c, c))?
                } else {
                    part
                };
                named.push((format!("{block}.{which}.{p}"), part));
            }
            continue;
        }
        let t = if name.ends_with(".proj_out.weight") {
            let (o, i) = (t.dim(0)?, t.dim(1)?);
            t.reshape((o, i))?
        } else {
            t.clone()
        };
        named.push((diffusers_name(name, levels)?, t));
    }
    let parent = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("{}: cannot create folder", parent.display()))?;
    let name = out
        .file_name()
        .with_context(|| format!("{}: not a folder name", out.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".partial")
        .tempdir_in(parent)
        .with_context(|| format!("{}: cannot write", out.display()))?;
    let dir = tmp.path();
    for sub in ["unet", "scheduler"] {
        std::fs::create_dir(dir.join(sub))
            .with_context(|| format!("{}: cannot write", out.display()))?;
    }
    let index = serde_json::json!({
        "_class_name": "DDPMPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    });
    let pretty = |v: &Value| serde_json::to_string_pretty(v).map(|s| s + "\n");
    crate::files::write_new(&dir.join("model_index.json"), pretty(&index)?.as_bytes())?;
    crate::files::write_new(&dir.join("unet/config.json"), pretty(&unet)?.as_bytes())?;
    crate::files::write_new(
        &dir.join("scheduler/scheduler_config.json"),
        pretty(&scheduler)?.as_bytes(),
    )?;
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    crate::files::write_new(
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        &crate::checkpoint::serialize(&named, metadata)?,
    )?;
    for d in [dir.join("unet"), dir.join("scheduler"), dir.to_path_buf()] {
        if let Ok(f) = std::fs::File::open(&d) {
            let _ = f.sync_all();
        }
    }
    // The rename is the commit: `out` appears whole or not at all.
    let kept = tmp.keep();
    std::fs::rename(&kept, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&kept);
        anyhow::anyhow!("{}: cannot rename into place: {e}", out.display())
    })?;
    if let Ok(f) = std::fs::File::open(parent) {
        let _ = f.sync_all();
    }
    Ok(())
}
