//! Checkpoints of other projects (`elbo::interop`): a diffusers DDPM pipeline folder with
//! google/ddpm-cifar10-32's block layout at a small width (`tests/fixtures/diffusers_ddpm_tiny`,
//! made with diffusers' own code by `bench/make_diffusers_unet_fixture.py`) and an
//! improved-diffusion checkpoint with learned variances, the cosine schedule, two heads and
//! scale-shift norm (`tests/fixtures/improved_diffusion_tiny.pt`, made with improved-diffusion's
//! own code by `bench/make_improved_diffusion_fixture.py`) are read as elbo's U-Net: their
//! outputs equal the projects' forwards, their bounds the projects' bounds within Monte Carlo
//! error; the commands evaluate and sample them; what elbo cannot reproduce is refused with
//! one line naming what.

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
            Box::new(|v| v["attention_head_dim"] = 5.into()),
            "does not split into heads",
        ),
        (
            "scheduler/scheduler_config.json",
            Box::new(|v| v["variance_type"] = "learned_range".into()),
            "2C output channels",
        ),
        (
            "scheduler/scheduler_config.json",
            Box::new(|v| v["beta_start"] = 2.0.into()),
            "beta_start",
        ),
        (
            "scheduler/scheduler_config.json",
            Box::new(|v| v["variance_type"] = "learned_sigma".into()),
            "variance_type",
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

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The flags `bench/make_improved_diffusion_fixture.py` made its model with, as a user types
/// them.
const ID_FLAGS: &[&str] = &[
    "--image_size",
    "32",
    "--num_channels",
    "32",
    "--num_res_blocks",
    "1",
    "--num_heads",
    "2",
    "--attention_resolutions",
    "16,8",
    "--learn_sigma",
    "True",
    "--dropout",
    "0.3",
    "--diffusion_steps",
    "40",
    "--noise_schedule",
    "cosine",
];

fn id_flags(extra: &[&str]) -> elbo::interop::improved_diffusion::ModelFlags {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        flags: elbo::interop::improved_diffusion::ModelFlags,
    }
    let mut args = vec!["x"];
    args.extend(ID_FLAGS);
    args.extend(extra);
    Cli::try_parse_from(args).unwrap().flags
}

fn id_reference() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("improved_diffusion_tiny.json")).unwrap(),
    )
    .unwrap()
}

/// improved-diffusion's `UNetModel` (scale-shift norm, two heads in its legacy q/k/v row order,
/// six output channels) on 3 inputs at t = 0, 17, 39 of T = 40, given t 1000 / T as their
/// wrapped model does: elbo's network from the `.pt` and the flags gives the same to float32
/// rounding, on candle and on the fused engine; the process is the cosine schedule with the
/// model given t 1000 / T and learned-range variances.
#[test]
fn improved_diffusion_unet_matches_its_forward() {
    use elbo::interop::improved_diffusion;
    let m = improved_diffusion::load(
        &fixtures().join("improved_diffusion_tiny.pt"),
        &id_flags(&[]),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(m.process.num_timesteps(), 40);
    assert_eq!(
        m.process.variance,
        Some(elbo::diffusion::VarianceType::LearnedRange)
    );
    let model_t = m.process.model_t(&[0, 17, 39], &Device::Cpu).unwrap();
    let io = candle_core::safetensors::load(
        fixtures().join("improved_diffusion_tiny_io.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let (x, t, want) = (&io["x"], &io["model_t"], &io["out"]);
    assert!(max_abs(&model_t, t) < 1e-4, "{model_t} vs {t}");
    assert_eq!(want.dims(), &[3, 6, 32, 32]);
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let got = m.net.forward(x, t).unwrap();
    let err = max_abs(&got, want);
    eprintln!("improved-diffusion: max abs difference {err:e}, max abs output {scale}");
    assert!(
        err < 1e-4 * scale.max(1.0),
        "max |elbo - improved-diffusion| = {err:e}"
    );
    let frozen = elbo::engine::FrozenNet::new(m.net);
    let fused = max_abs(&frozen.forward(x, t).unwrap(), want);
    assert!(fused < 1e-4 * scale.max(1.0), "fused engine: {fused:e}");
}

/// `eval diffusion --checkpoint model.pt` with the flags and `--clip-denoised` (their
/// `image_nll.py` default) against improved-diffusion's `calc_bpd_loop` on the same four
/// images (8 runs): the difference is within 4 standard errors of Monte Carlo error (one draw
/// of x_t per term in elbo; the reference's one-draw variance summed over t).
#[test]
fn improved_diffusion_bound_matches_calc_bpd_loop() {
    let reference = id_reference();
    let bound = &reference["bound"];
    let floats = |key: &str| -> Vec<f64> {
        bound[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let (totals, variances) = (floats("total_nats"), floats("one_draw_var"));
    let n = totals.len() as f64;
    let (ckpt, images) = (
        fixtures().join("improved_diffusion_tiny.pt"),
        fixtures().join("diffusers_ddpm_tiny_images"),
    );
    let mut args = vec![
        "eval",
        "diffusion",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--data",
        images.to_str().unwrap(),
        "--limit",
        "4",
        "--clip-denoised",
        "--json",
    ];
    args.extend(ID_FLAGS);
    let o = elbo(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["lt"].as_array().unwrap().len(), 39);
    assert_eq!(v["variance"], "learned-range");
    let ours = v["nll_bound_nats"].as_f64().unwrap();
    let theirs = totals.iter().sum::<f64>() / n;
    let one_draw = variances.iter().sum::<f64>() / (n * n);
    let se = (one_draw + one_draw / bound["runs"].as_f64().unwrap()).sqrt();
    let z = (ours - theirs) / se;
    eprintln!(
        "improved-diffusion bound: elbo {ours:.2}, calc_bpd_loop {theirs:.2} nats (se {se:.2}, z = {z:.2})"
    );
    assert!(
        z.abs() < 4.0,
        "elbo {ours} vs improved-diffusion {theirs}: z = {z}"
    );
    // L_T has no draw: equal up to f32 sums.
    let prior = floats("prior_nats").iter().sum::<f64>() / n;
    let l_t = v["lT"].as_f64().unwrap();
    eprintln!("L_T: elbo {l_t:e}, improved-diffusion {prior:e} nats");
    // Theirs sums in f32: 0.3% apart at 8e-4 nats.
    assert!((l_t - prior).abs() < 1e-2 * prior.max(1e-6), "{v}");
}

/// Their `space_timesteps` and `SpacedDiffusion` betas, and the linear schedule scaled by
/// 1000 / T, as elbo computes them.
#[test]
fn improved_diffusion_respacing_and_schedules_match() {
    use elbo::diffusion::schedule::respaced_betas;
    use elbo::interop::improved_diffusion::{model_config, space_timesteps};
    let reference = id_reference();
    let base = elbo::diffusion::Schedule::new(elbo::diffusion::BetaSchedule::Cosine, 40).unwrap();
    for spec in ["ddim10", "10,5"] {
        let r = &reference["respaced"][spec];
        let want_map: Vec<usize> = r["timestep_map"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let kept = space_timesteps(40, spec).unwrap();
        assert_eq!(kept, want_map, "{spec}");
        let (betas, _) = respaced_betas(&base.alphas_cumprod, &kept);
        for (b, w) in betas.iter().zip(r["betas"].as_array().unwrap()) {
            assert!(
                (b - w.as_f64().unwrap()).abs() < 1e-12,
                "{spec}: {b} vs {w}"
            );
        }
        // Through the flags: T' steps, the network given the original steps x 1000 / T.
        let mut flags = id_flags(&[]);
        flags.timestep_respacing = Some(spec.to_string());
        let plan = model_config(&flags).unwrap();
        let p = plan.config.process().unwrap();
        assert_eq!(p.num_timesteps(), kept.len());
        let t = p
            .model_t(&[1], &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert_eq!(t, kept[1] as f32 * 25.0, "{spec}");
    }
    let mut flags = id_flags(&[]);
    flags.noise_schedule = Some("linear".into());
    flags.diffusion_steps = Some(4000);
    let plan = model_config(&flags).unwrap();
    let s = plan.config.process().unwrap().schedule;
    let want: Vec<f64> = reference["linear_4000_betas_sample"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (i, w) in [0, 1, 1999, 3999].into_iter().zip(want) {
        assert!(
            (s.betas[i] - w).abs() < 1e-15,
            "beta_{i}: {} vs {w}",
            s.betas[i]
        );
    }
}

/// Flags that do not fit the checkpoint, flags without a `.pt`, a pickle of code instead of
/// tensors, a legacy pickle, unsupported flag values: one line each.
#[test]
fn improved_diffusion_bad_input_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = fixtures().join("improved_diffusion_tiny.pt");
    let images = fixtures().join("diffusers_ddpm_tiny_images");
    let run = |ckpt: &Path, flags: &[&str]| {
        let mut args = vec![
            "eval",
            "diffusion",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--data",
            images.to_str().unwrap(),
            "--limit",
            "1",
        ];
        args.extend(flags);
        elbo(&args)
    };
    // The channels the flags give do not fit the weights.
    let mut wrong: Vec<&str> = ID_FLAGS.to_vec();
    wrong[3] = "64";
    common::assert_one_line_error(&run(&ckpt, &wrong), "do not fit");
    // Without --learn_sigma the output convolution is smaller than the file's.
    let mut fixed: Vec<&str> = ID_FLAGS.to_vec();
    fixed[11] = "False";
    common::assert_one_line_error(&run(&ckpt, &fixed), "conv_out");
    common::assert_one_line_error(
        &run(&ckpt, &[ID_FLAGS, &["--class_cond", "True"]].concat()),
        "--class_cond",
    );
    let mut maybe: Vec<&str> = ID_FLAGS.to_vec();
    maybe[11] = "maybe";
    common::assert_one_line_error(&run(&ckpt, &maybe), "True or False");
    common::assert_one_line_error(
        &run(
            &ckpt,
            &[ID_FLAGS, &["--timestep_respacing", "ddim13"]].concat(),
        ),
        "--timestep_respacing",
    );
    // Flags for a checkpoint that is not one of theirs.
    common::assert_one_line_error(
        &run(&fixture(), &["--num_channels", "32"]),
        "--num_channels",
    );
    // A torch.save-shaped zip whose pickle calls os.system: nothing runs, no tensors, refused.
    let code = tmp.path().join("code.pt");
    {
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&code).unwrap());
        // Stored, as torch.save writes its entries.
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", opts).unwrap();
        use std::io::Write;
        zip.write_all(
            b"\x80\x02cos\nsystem\nq\x00X\x0b\x00\x00\x00touch pwnedq\x01\x85q\x02Rq\x03.",
        )
        .unwrap();
        zip.finish().unwrap();
    }
    common::assert_one_line_error(&run(&code, ID_FLAGS), "no tensors");
    assert!(!Path::new("pwned").exists());
    // PyTorch's legacy (pre-1.6) format: a bare pickle.
    let legacy = tmp.path().join("legacy.pt");
    std::fs::write(&legacy, b"\x80\x02\x8a\x0alz\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
    common::assert_one_line_error(&run(&legacy, ID_FLAGS), "legacy");
    // Not a checkpoint at all.
    let junk = tmp.path().join("junk.pt");
    std::fs::write(&junk, b"PK\x03\x04 but not a zip").unwrap();
    common::assert_one_line_error(&run(&junk, ID_FLAGS), "junk.pt");
}

/// `sample diffusion` runs the learned-variance model with its own variances (DDPM) and refuses
/// a fixed variance for it.
#[test]
fn sample_diffusion_takes_an_improved_diffusion_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("samples.png");
    let ckpt = fixtures().join("improved_diffusion_tiny.pt");
    let mut args = vec![
        "sample",
        "diffusion",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--sampler",
        "ddpm",
        "--n",
        "2",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(ID_FLAGS);
    let o = elbo(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(image::open(&out).is_ok());
    args.extend(["--variance", "fixed-large"]);
    common::assert_one_line_error(&elbo(&args), "learned its variances");
}

/// An elbo diffusion checkpoint of `net` (random weights, jittered), as training writes one.
fn elbo_checkpoint(
    dir: &Path,
    net: elbo::diffusion::nets::NetConfig,
    variance: Option<elbo::diffusion::VarianceType>,
) -> (PathBuf, elbo::diffusion::nets::Net) {
    use elbo::diffusion::nets::{Net, sorted_vars};
    let config = elbo::diffusion::model::DiffusionConfig {
        net,
        beta_schedule: elbo::diffusion::BetaSchedule::Cosine,
        num_train_timesteps: 50,
        prediction: elbo::diffusion::Prediction::Eps,
        image_shape: Some(elbo::data::ImageShape {
            channels: 3,
            height: 16,
            width: 16,
        }),
        betas: None,
        model_times: None,
        variance,
        continuous: None,
    };
    config.validate().unwrap();
    let dev = Device::Cpu;
    let (net, varmap) =
        Net::trainable(&config.net, &mut elbo::distributions::Noise::new(0), &dev).unwrap();
    let mut noise = elbo::distributions::Noise::new(3);
    for (_, var) in sorted_vars(&varmap) {
        let jitter = (noise.randn(var.shape(), &dev).unwrap() * 0.05).unwrap();
        var.set(&(var.as_tensor() + jitter).unwrap()).unwrap();
    }
    let tensors: Vec<(String, Tensor)> = sorted_vars(&varmap)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let meta = std::collections::HashMap::from([
        ("elbo.model".to_string(), "diffusion".to_string()),
        (
            "elbo.config".to_string(),
            serde_json::to_string(&config).unwrap(),
        ),
    ]);
    let path = dir.join("model.safetensors");
    elbo::checkpoint::save_atomic(&path, &tensors, meta).unwrap();
    (path, net)
}

/// `export diffusers`: diffusers folder -> elbo -> diffusers folder gives back the same tensors
/// under the same names and the same bound; an elbo checkpoint (scale-shift norm, two-head
/// attention, learned variances) -> diffusers folder -> elbo gives the same network output.
/// (diffusers itself loading and running an exported folder, output within 5.5e-6 of elbo's:
/// `bench/check_export_diffusers.py`.)
#[test]
fn export_diffusers_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("exported");
    let o = elbo(&[
        "export",
        "diffusers",
        fixture().to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let original = candle_core::safetensors::load(
        fixture().join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let exported = candle_core::safetensors::load(
        out.join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut a: Vec<&String> = original.keys().collect();
    let mut b: Vec<&String> = exported.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for (name, t) in &original {
        assert_eq!(max_abs(t, &exported[name]), 0.0, "{name}");
        assert_eq!(t.dims(), exported[name].dims(), "{name}");
    }
    let bound = |ckpt: &Path| {
        let images = fixtures().join("diffusers_ddpm_tiny_images");
        let o = elbo(&[
            "eval",
            "diffusion",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--data",
            images.to_str().unwrap(),
            "--limit",
            "2",
            "--t-samples",
            "4",
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["nll_bound_nats"].as_f64().unwrap()
    };
    assert_eq!(bound(&fixture()), bound(&out));

    // elbo -> diffusers -> elbo, with every option the export writes.
    let net = elbo::diffusion::nets::NetConfig::Unet {
        base: 32,
        channel_mult: vec![1, 2],
        groups: 8,
        attention: true,
        in_channels: 3,
        res_blocks: Some(1),
        attention_levels: vec![1],
        dropout: 0.0,
        options: elbo::diffusion::nets::UnetOptions {
            head_channels: 16,
            scale_shift: true,
            out_channels: 6,
            ..Default::default()
        },
    };
    let (ckpt, original) = elbo_checkpoint(
        tmp.path(),
        net,
        Some(elbo::diffusion::VarianceType::LearnedRange),
    );
    let out2 = tmp.path().join("exported2");
    let o = elbo(&[
        "export",
        "diffusers",
        tmp.path().to_str().unwrap(),
        out2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let back = diffusers::load(&out2, &Device::Cpu).unwrap();
    assert_eq!(
        back.process.variance,
        Some(elbo::diffusion::VarianceType::LearnedRange)
    );
    let mut noise = elbo::distributions::Noise::new(9);
    let x = noise.randn((2, 3, 16, 16), &Device::Cpu).unwrap();
    let t = Tensor::new(&[3f32, 40.0], &Device::Cpu).unwrap();
    let want = original.forward(&x, &t).unwrap();
    assert_eq!(want.dims(), &[2, 6, 16, 16]);
    assert!(max_abs(&back.net.forward(&x, &t).unwrap(), &want) < 1e-5);
    let _ = ckpt;

    // An existing OUT_DIR, elbo's compact layout: one line each.
    common::assert_one_line_error(
        &elbo(&[
            "export",
            "diffusers",
            fixture().to_str().unwrap(),
            out.to_str().unwrap(),
        ]),
        "exists",
    );
    let compact = tmp.path().join("compact");
    std::fs::create_dir(&compact).unwrap();
    let mut cfg = elbo::diffusion::nets::NetConfig::default_unet();
    if let elbo::diffusion::nets::NetConfig::Unet { in_channels, .. } = &mut cfg {
        *in_channels = 3;
    }
    elbo_checkpoint(&compact, cfg, None);
    common::assert_one_line_error(
        &elbo(&[
            "export",
            "diffusers",
            compact.to_str().unwrap(),
            tmp.path().join("c").to_str().unwrap(),
        ]),
        "compact",
    );
    assert!(!tmp.path().join("c").exists());
}

/// A loopback server in the Hugging Face hub's URL layout: `GET /api/models/ORG/NAME/revision/REV`
/// (the file list) and `GET /ORG/NAME/resolve/REV/FILE` (with `Range`, the `x-repo-commit` and
/// `etag` headers hf-hub reads; large files' etag their sha256), serving the fixture pipeline
/// as `test-org/ddpm-tiny` (revisions `main` and `v1`) and `test-org/corrupt` (its weights with
/// one byte changed under the true sha256).
struct HubServer {
    port: u16,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

impl HubServer {
    fn start() -> Self {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let files: Vec<(String, Vec<u8>)> = [
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json",
        ]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(fixture().join(f)).unwrap()))
        .collect();
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut range = None;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        let (a, b) = v.trim().split_once('-').unwrap();
                        range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().ok()));
                    }
                }
                let respond = |stream: &mut std::net::TcpStream,
                               status: &str,
                               headers: &[String],
                               body: &[u8]| {
                    let mut head = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                        body.len()
                    );
                    for h in headers {
                        head.push_str(h);
                        head.push_str("\r\n");
                    }
                    head.push_str("\r\n");
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.write_all(body);
                };
                let repos = ["test-org/ddpm-tiny", "test-org/corrupt"];
                if let Some(rest) = path.strip_prefix("/api/models/") {
                    let ok = repos.iter().any(|r| {
                        rest == format!("{r}/revision/main") || rest == format!("{r}/revision/v1")
                    });
                    if !ok {
                        respond(&mut stream, "404 Not Found", &[], b"{}");
                        continue;
                    }
                    let siblings: Vec<serde_json::Value> = files
                        .iter()
                        .map(|(f, _)| serde_json::json!({ "rfilename": f }))
                        .chain([serde_json::json!({ "rfilename": "README.md" })])
                        .collect();
                    let body =
                        serde_json::json!({ "sha": COMMIT, "siblings": siblings }).to_string();
                    respond(
                        &mut stream,
                        "200 OK",
                        &["Content-Type: application/json".into()],
                        body.as_bytes(),
                    );
                    continue;
                }
                let found = repos.iter().find_map(|r| {
                    ["main", "v1"].iter().find_map(|rev| {
                        let prefix = format!("/{r}/resolve/{rev}/");
                        path.strip_prefix(&prefix).map(|f| (*r, f.to_string()))
                    })
                });
                let Some((repo, file)) = found else {
                    respond(&mut stream, "404 Not Found", &[], b"");
                    continue;
                };
                let Some((_, bytes)) = files.iter().find(|(f, _)| *f == file) else {
                    respond(&mut stream, "404 Not Found", &[], b"");
                    continue;
                };
                let large = file.ends_with(".safetensors");
                let etag = if large {
                    use sha2::Digest;
                    sha2::Sha256::digest(bytes)
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                } else {
                    format!("{:040x}", bytes.len())
                };
                let mut body = bytes.clone();
                if large && repo == "test-org/corrupt" {
                    let mid = body.len() / 2;
                    body[mid] ^= 1;
                }
                let (a, b) = match range {
                    Some((a, b)) => (a, b.unwrap_or(body.len() - 1).min(body.len() - 1)),
                    None => (0, body.len() - 1),
                };
                let mut headers = vec![
                    format!("x-repo-commit: {COMMIT}"),
                    format!("etag: \"{etag}\""),
                    format!("Content-Range: bytes {a}-{b}/{}", body.len()),
                ];
                if large {
                    headers.push(format!("x-linked-etag: \"{etag}\""));
                }
                respond(&mut stream, "206 Partial Content", &headers, &body[a..=b]);
            }
        });
        Self { port, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// `--checkpoint ORG/NAME[@REV]` resolves through hf-hub into `$HF_HOME/hub` (diffusers' cache
/// layout) from `HF_ENDPOINT`; `HF_HUB_OFFLINE=1` reads the cache without a request; an uncached
/// id offline, and a download whose bytes do not hash to the hub's sha256, are one line each.
#[test]
fn hub_ids_resolve_into_the_shared_cache() {
    let server = HubServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf");
    let images = fixtures().join("diffusers_ddpm_tiny_images");
    let run = |id: &str, offline: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_elbo"));
        cmd.args([
            "eval",
            "diffusion",
            "--checkpoint",
            id,
            "--data",
            images.to_str().unwrap(),
            "--limit",
            "1",
            "--t-samples",
            "2",
            "--json",
        ])
        .env("HF_HOME", &home)
        .env("HF_ENDPOINT", format!("http://127.0.0.1:{}", server.port))
        .env_remove("HF_TOKEN")
        .current_dir(tmp.path());
        if offline {
            cmd.env("HF_HUB_OFFLINE", "1");
        } else {
            cmd.env_remove("HF_HUB_OFFLINE");
        }
        cmd.output().unwrap()
    };
    let bound = |o: &std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["nll_bound_nats"].as_f64().unwrap()
    };
    let local = elbo(&[
        "eval",
        "diffusion",
        "--checkpoint",
        fixture().to_str().unwrap(),
        "--data",
        images.to_str().unwrap(),
        "--limit",
        "1",
        "--t-samples",
        "2",
        "--json",
    ]);
    let want = bound(&local);
    assert_eq!(bound(&run("test-org/ddpm-tiny", false)), want);
    let snapshot = home
        .join("hub/models--test-org--ddpm-tiny/snapshots")
        .join(COMMIT);
    assert!(
        snapshot
            .join("unet/diffusion_pytorch_model.safetensors")
            .is_file()
    );
    assert!(
        !snapshot.join("README.md").exists(),
        "only the pipeline's files are fetched"
    );
    assert_eq!(
        std::fs::read_to_string(home.join("hub/models--test-org--ddpm-tiny/refs/main")).unwrap(),
        COMMIT
    );
    // Offline: the cache alone, not one request.
    let before = server.requests();
    assert_eq!(bound(&run("test-org/ddpm-tiny", true)), want);
    assert_eq!(server.requests(), before);
    common::assert_one_line_error(&run("test-org/not-cached", true), "not in the hub cache");
    // A revision.
    assert_eq!(bound(&run("test-org/ddpm-tiny@v1", false)), want);
    assert!(
        home.join("hub/models--test-org--ddpm-tiny/refs/v1")
            .is_file()
    );
    // Bytes that do not hash to the hub's sha256 are refused and dropped from the cache.
    common::assert_one_line_error(&run("test-org/corrupt", false), "sha256");
    let corrupt = home
        .join("hub/models--test-org--corrupt/snapshots")
        .join(COMMIT);
    assert!(
        !corrupt
            .join("unet/diffusion_pytorch_model.safetensors")
            .exists()
    );
    // An unknown repo online.
    common::assert_one_line_error(&run("test-org/missing", false), "test-org/missing");
}

/// A folder with `diffusion_pytorch_model.bin` (torch.save, as older diffusers wrote) instead of
/// safetensors is read through the pickle reader: here a state dict of other tensors, refused
/// naming the first that has no place.
#[test]
fn diffusers_bin_weights_go_through_the_pickle_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = edited(tmp.path(), "model_index.json", |_| {});
    std::fs::remove_file(folder.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::copy(
        fixtures().join("torch_state_dict_tiny.pt"),
        folder.join("unet/diffusion_pytorch_model.bin"),
    )
    .unwrap();
    let err = format!(
        "{:#}",
        diffusers::load(&folder, &Device::Cpu).err().unwrap()
    );
    assert!(
        err.contains("diffusion_pytorch_model.bin") && err.contains("has no place"),
        "{err}"
    );
}
