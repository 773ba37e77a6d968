//! Checkpoints of other projects (`elbo::interop`): a diffusers DDPM pipeline folder with
//! google/ddpm-cifar10-32's block layout at a small width (`tests/fixtures/diffusers_ddpm_tiny`,
//! made with diffusers' own code by `bench/make_diffusers_unet_fixture.py`) is read as elbo's
//! U-Net: its output equals diffusers' forward; the commands evaluate and sample it; a folder
//! elbo cannot reproduce is refused with one line naming what.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use elbo::diffusion::Denoiser;
use elbo::interop::diffusers;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers_ddpm_tiny")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// diffusers' `UNet2DModel` forward (sines first, frequency shift 1, GroupNorm eps 1e-6,
/// "SAME" downsampling, single-head attention from three linear maps) on 4 images at t = 0,
/// 17, 500, 999, against elbo's U-Net built from the same folder: equal to float32 rounding.
#[test]
fn diffusers_unet_matches_diffusers_forward() {
    let m = diffusers::load(&fixture(), &Device::Cpu).unwrap();
    assert_eq!(m.config.num_train_timesteps, 1000);
    assert_eq!(
        m.config.beta_schedule,
        elbo::diffusion::BetaSchedule::Linear
    );
    assert_eq!(m.config.prediction, elbo::diffusion::Prediction::Eps);
    assert_eq!(
        m.config.image_shape.map(|s| s.to_string()),
        Some("3 x 32 x 32".into())
    );
    let io = candle_core::safetensors::load(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/diffusers_ddpm_tiny_io.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let (x, t, want) = (&io["x"], &io["t"], &io["out"]);
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let got = m.net.forward(x, t).unwrap();
    let err = max_abs(&got, want);
    eprintln!("max abs difference {err:e}, max abs output {scale}");
    assert!(
        err < 1e-4 * scale.max(1.0),
        "max |elbo - diffusers| = {err:e} (max |diffusers| = {scale})"
    );
    // The engine the commands use gives the same (the fused engine declines this padding and
    // hands the network to candle).
    let frozen = elbo::engine::FrozenNet::new(m.net);
    assert!(max_abs(&frozen.forward(x, t).unwrap(), want) < 1e-4 * scale.max(1.0));
}

/// A copy of the fixture folder with `edit` applied to a file's JSON.
fn edited(dir: &Path, file: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let out = dir.join("pipe");
    for sub in ["", "unet", "scheduler"] {
        std::fs::create_dir_all(out.join(sub)).unwrap();
    }
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ] {
        std::fs::copy(fixture().join(f), out.join(f)).unwrap();
    }
    let path = out.join(file);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
    out
}

/// What elbo's network cannot reproduce is refused, naming the file and the field.
#[test]
fn unsupported_diffusers_folders_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "unet/config.json",
            Box::new(|v| v["down_block_types"][1] = "CrossAttnDownBlock2D".into()),
            "CrossAttnDownBlock2D",
        ),
        (
            "unet/config.json",
            Box::new(|v| v["resnet_time_scale_shift"] = "scale_shift".into()),
            "resnet_time_scale_shift",
        ),
        (
            "unet/config.json",
            Box::new(|v| v["class_embed_type"] = "timestep".into()),
            "class_embed_type",
        ),
        (
            "unet/config.json",
            Box::new(|v| v["some_future_field"] = 3.into()),
            "some_future_field",
        ),
        (
            "unet/config.json",
            Box::new(|v| v["block_out_channels"] = serde_json::json!([8, 16, 16, 32])),
            "do not fit",
        ),
        (
            "unet/config.json",
            Box::new(|v| v["attention_head_dim"] = 4.into()),
            "one head",
        ),
        (
            "scheduler/scheduler_config.json",
            Box::new(|v| v["variance_type"] = "learned_range".into()),
            "variance_type",
        ),
        (
            "scheduler/scheduler_config.json",
            Box::new(|v| v["beta_start"] = 0.00085.into()),
            "beta_start",
        ),
        (
            "model_index.json",
            Box::new(|v| v["_class_name"] = "StableDiffusionPipeline".into()),
            "StableDiffusionPipeline",
        ),
    ];
    for (i, (file, edit, want)) in cases.iter().enumerate() {
        let dir = tmp.path().join(i.to_string());
        let folder = edited(&dir, file, edit);
        let err = match diffusers::load(&folder, &Device::Cpu) {
            Ok(_) => panic!("case {i} ({want}) was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(want), "case {i}: {err}");
        assert!(!err.contains('\n'), "case {i}: {err}");
    }
    // A missing weights file.
    let folder = edited(&tmp.path().join("w"), "model_index.json", |_| {});
    std::fs::remove_file(folder.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let err = format!(
        "{:#}",
        diffusers::load(&folder, &Device::Cpu).err().unwrap()
    );
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

fn elbo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_elbo"))
        .args(args)
        .output()
        .unwrap()
}

/// `eval diffusion` and `sample diffusion` take the folder as `--checkpoint`: the bound of two
/// 32 x 32 colour images in bits/dim (finite, and its parts adding up), and a grid of samples.
#[test]
fn the_commands_take_a_diffusers_folder() {
    let tmp = tempfile::tempdir().unwrap();
    // Two random colour images in an image folder, both splits.
    for split in ["train", "test"] {
        let d = tmp.path().join("data").join(split).join("0");
        std::fs::create_dir_all(&d).unwrap();
        for k in 0..2u32 {
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                image::Rgb([(x * 8) as u8, (y * 8) as u8, (k * 100 + x + y) as u8])
            });
            img.save(d.join(format!("{k}.png"))).unwrap();
        }
    }
    let ckpt = fixture();
    let data = tmp.path().join("data");
    let o = elbo(&[
        "eval",
        "diffusion",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "2",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bpd = v["bpd"].as_f64().unwrap();
    assert!(bpd.is_finite() && bpd > 0.0, "{v}");
    let sum = v["l0"].as_f64().unwrap() + v["lt_sum"].as_f64().unwrap() + v["lT"].as_f64().unwrap();
    assert!((sum - v["nll_bound_nats"].as_f64().unwrap()).abs() < 1e-6 * sum.abs());
    assert_eq!(v["lt"].as_array().unwrap().len(), 999);

    let out = tmp.path().join("samples.png");
    let o = elbo(&[
        "sample",
        "diffusion",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--n",
        "4",
        "--steps",
        "5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(image::open(&out).is_ok());
}
