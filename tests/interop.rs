//! Checkpoints of other projects (`elbo::interop`): a diffusers DDPM pipeline folder with
//! google/ddpm-cifar10-32's block layout at a small width (`tests/fixtures/diffusers_ddpm_tiny`,
//! made with diffusers' own code by `bench/make_diffusers_unet_fixture.py`) is read as elbo's
//! U-Net: its output equals diffusers' forward; the commands evaluate and sample it; a folder
//! elbo cannot reproduce is refused with one line naming what.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use elbo::diffusion::Denoiser;
use elbo::interop::diffusers;

use common::elbo;

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
    // The engine the commands use (the fused CPU engine, "SAME" padding included) gives the
    // same.
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
    // A tensor the network does not read (an extra key in the weights file).
    let folder = edited(&tmp.path().join("x"), "model_index.json", |_| {});
    let weights = folder.join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let extra = tensors["conv_in.bias"].clone();
    tensors.insert("mid_block.resnets.0.extra_scale".into(), extra);
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let err = format!(
        "{:#}",
        diffusers::load(&folder, &Device::Cpu).err().unwrap()
    );
    assert!(
        err.contains("mid.res1.extra_scale") && !err.contains('\n'),
        "{err}"
    );
    // A missing weights file.
    let folder = edited(&tmp.path().join("w"), "model_index.json", |_| {});
    std::fs::remove_file(folder.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let err = format!(
        "{:#}",
        diffusers::load(&folder, &Device::Cpu).err().unwrap()
    );
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

/// `eval diffusion` takes the folder as `--checkpoint`: its bound on four 32 x 32 colour images
/// (`tests/fixtures/diffusers_ddpm_tiny_images`) against the bound written in PyTorch from the
/// formulas with diffusers' own forward and schedule (`bench/make_diffusers_bound_fixture.py`,
/// 8 draws of x_t per term), as the network predicts x_0 and with `--clip-denoised`
/// (improved-diffusion's default). elbo draws one x_t per term, so the two means differ by
/// Monte Carlo error alone: the reference stores each image's one-draw variance (the sum over
/// t of its terms' variances), and the difference must be within 4 standard errors (about 60
/// nats of 46,300 here). L_T has no draw and agrees to f32 rounding.
#[test]
fn diffusers_bound_matches_a_pytorch_recomputation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("diffusers_ddpm_tiny_bound.json")).unwrap(),
    )
    .unwrap();
    let floats = |key: &str| -> Vec<f64> {
        reference[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let draws = reference["draws_per_term"].as_f64().unwrap();
    for (suffix, flag) in [("", None), ("_clipped", Some("--clip-denoised"))] {
        let (totals, variances) = (
            floats(&format!("total_nats{suffix}")),
            floats(&format!("one_draw_variance{suffix}")),
        );
        let n = totals.len() as f64;
        let (ckpt, images) = (fixture(), root.join("diffusers_ddpm_tiny_images"));
        let mut args = vec![
            "eval",
            "diffusion",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--data",
            images.to_str().unwrap(),
            "--limit",
            "4",
            "--json",
        ];
        args.extend(flag);
        let o = elbo(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["n"], 4);
        assert!(v["bpd_stderr"].as_f64().unwrap() > 0.0, "{v}");
        assert_eq!(v["lt"].as_array().unwrap().len(), 999);
        let ours = v["nll_bound_nats"].as_f64().unwrap();
        let theirs = totals.iter().sum::<f64>() / n;
        let one_draw = variances.iter().sum::<f64>() / (n * n);
        let se = (one_draw + one_draw / draws).sqrt();
        let z = (ours - theirs) / se;
        eprintln!(
            "bound{suffix}: elbo {ours:.2}, PyTorch {theirs:.2} nats (standard error {se:.2}, z = {z:.2})"
        );
        assert!(
            z.abs() < 4.0,
            "{suffix}: elbo {ours} vs PyTorch {theirs}: z = {z}"
        );
        let prior = floats("l_prior").iter().sum::<f64>() / n;
        let l_t = v["lT"].as_f64().unwrap();
        // elbo sums L_T's 3,072 KLs of near-equal Gaussians in f32: 0.0218 nats to within 1e-5.
        assert!((l_t - prior).abs() < 1e-5, "L_T: {l_t} vs {prior}");
        let parts = v["l0"].as_f64().unwrap() + v["lt_sum"].as_f64().unwrap() + l_t;
        assert!((parts - ours).abs() < 1e-9 * ours);
    }
}

/// `sample diffusion` takes the folder as `--checkpoint`: a grid of samples.
#[test]
fn sample_diffusion_takes_a_diffusers_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("samples.png");
    let o = elbo(&[
        "sample",
        "diffusion",
        "--checkpoint",
        fixture().to_str().unwrap(),
        "--n",
        "4",
        "--steps",
        "5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&out).unwrap();
    assert!(img.width() >= 64, "{}", img.width());
}
