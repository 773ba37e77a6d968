//! Writes an elbo DDPM-layout U-Net (google/ddpm-cifar10-32's layout at width 32, random
//! weights, the cosine schedule, learned-range variances' six output channels, two-head
//! attention and scale-shift norm: every option the export writes) as a diffusers pipeline
//! folder, and elbo's forward on a few inputs beside it, for `bench/check_export_diffusers.py`
//! to load with diffusers and compare.
//!
//! cargo run --release --example export_check -- OUT_DIR

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use elbo::diffusion::Denoiser;
use elbo::diffusion::model::DiffusionConfig;
use elbo::diffusion::nets::{Net, NetConfig, UnetOptions, sorted_vars};
use elbo::distributions::Noise;

fn main() -> anyhow::Result<()> {
    let out = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or("export-check".into()));
    let dev = Device::Cpu;
    let NetConfig::Unet {
        base,
        channel_mult,
        groups,
        in_channels,
        res_blocks,
        attention_levels,
        ..
    } = NetConfig::ddpm_cifar10(32, 3)
    else {
        unreachable!()
    };
    let net_config = NetConfig::Unet {
        base,
        channel_mult,
        groups,
        attention: true,
        in_channels,
        res_blocks,
        attention_levels,
        dropout: 0.1,
        options: UnetOptions {
            head_channels: if std::env::var("ONE_HEAD").is_ok() {
                0
            } else {
                16
            },
            scale_shift: std::env::var("NO_SS").is_err(),
            out_channels: 6,
            ..Default::default()
        },
    };
    let config = DiffusionConfig {
        net: net_config,
        beta_schedule: elbo::diffusion::BetaSchedule::Cosine,
        num_train_timesteps: 1000,
        prediction: elbo::diffusion::Prediction::Eps,
        image_shape: Some(elbo::data::ImageShape {
            channels: 3,
            height: 32,
            width: 32,
        }),
        betas: None,
        model_times: None,
        variance: Some(elbo::diffusion::VarianceType::LearnedRange),
        continuous: None,
    };
    config.validate()?;
    let (net, varmap) = Net::trainable(&config.net, &mut Noise::new(0), &dev)?;
    let mut noise = Noise::new(1);
    for (_, var) in sorted_vars(&varmap) {
        let jitter = (noise.randn(var.shape(), &dev)? * 0.05)?;
        var.set(&(var.as_tensor() + jitter)?)?;
    }
    let tensors: HashMap<String, Tensor> = sorted_vars(&varmap)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    elbo::interop::diffusers::export(&config, &tensors, &out.join("pipeline"))?;
    let x = noise.randn((3, 3, 32, 32), &dev)?;
    let t = Tensor::new(&[0f32, 250.0, 999.0], &dev)?;
    let y = net.forward(&x, &t)?;
    let io = HashMap::from([
        ("x".to_string(), x),
        ("t".to_string(), t),
        ("out".to_string(), y),
    ]);
    candle_core::safetensors::save(&io, out.join("elbo_io.safetensors"))?;
    println!("{}", out.display());
    Ok(())
}
