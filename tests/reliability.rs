//! Nothing lost, nothing crashes (issue 9): a run stopped at any file-system step of a save
//! resumes to the same weights and metrics, bit for bit, as a run never stopped; a failed
//! write (ENOSPC) keeps the last commit; and one regression test per hostile input found.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{assert_one_line_error, elbo, mnist_dir, stderr};

fn elbo_env(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_elbo"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// A safetensors file as what it means: its metadata and each tensor's f32 bits, by name
/// (the header's metadata order is not fixed, so the bytes are not compared).
type Meaning = (
    std::collections::BTreeMap<String, String>,
    std::collections::BTreeMap<String, Vec<u32>>,
);

fn meaning(path: &Path) -> Meaning {
    let loaded = elbo::checkpoint::load(path, &candle_core::Device::Cpu).unwrap();
    let tensors = loaded
        .tensors
        .iter()
        .map(|(n, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (n.clone(), v.iter().map(|x| x.to_bits()).collect())
        })
        .collect();
    (loaded.metadata.into_iter().collect(), tensors)
}

/// What must be identical between two runs: the committed model, the training state and the
/// metrics with the wall-clock `seconds` removed.
fn committed(run: &Path) -> (Meaning, Meaning, Vec<serde_json::Value>) {
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect();
    (
        meaning(&run.join("model.safetensors")),
        meaning(&run.join("train_state.safetensors")),
        metrics,
    )
}

fn last_epoch(run: &Path) -> Option<usize> {
    let target = std::fs::read_link(run.join("latest")).ok()?;
    target.file_name()?.to_str()?.parse().ok()
}

/// The file-system steps an uninterrupted run takes, in order (from `ELBO_FAULT_TRACE`).
fn trace_steps(args: &[&str], out: &Path) -> Vec<String> {
    let o = elbo_env(
        &[args, &["--out", out.to_str().unwrap()]].concat(),
        &[("ELBO_FAULT_TRACE", "1".into())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    stderr(&o)
        .lines()
        .filter(|l| l.starts_with("fs step"))
        .map(String::from)
        .collect()
}

/// For every file-system step of an uninterrupted `args` run (`epochs` epochs): stop the run
/// there (`kind` = kill: abort, no clean-up; enospc: the step fails), then continue it as a
/// user would, and compare the result with the uninterrupted run's.
fn every_step_resumes_identically(args: &[&str], epochs: usize, kind: &str, stride: usize) {
    let root = tempfile::tempdir().unwrap();
    let reference = root.path().join("reference");
    let names = trace_steps(args, &reference);
    let steps = names.len();
    let want = committed(&reference);
    assert_eq!(want.2.len(), epochs);
    assert!(steps > 20, "only {steps} file-system steps traced");
    let mut stopped_in_each_epoch = vec![0; epochs + 1];
    for k in (1..=steps).step_by(stride) {
        let run: PathBuf = root.path().join(format!("{kind}-{k}"));
        let r = run.to_str().unwrap();
        let o = elbo_env(
            &[args, &["--out", r]].concat(),
            &[("ELBO_FAULT", format!("{kind}@{k}"))],
        );
        // The report is drawn after the last commit and is not the run's state: a failed
        // write of it is a warning, the run is whole.
        if kind == "enospc" && names[k - 1].contains("report.html") {
            assert!(o.status.success(), "step {k}: {}", stderr(&o));
            assert!(stderr(&o).contains("warning: no report"), "{}", stderr(&o));
            assert!(committed(&run) == want, "step {k}: final commit differs");
            continue;
        }
        assert!(
            !o.status.success(),
            "step {k}: the {kind} fault did not stop the run"
        );
        if kind == "enospc" {
            // Progress lines, then the error: one line naming the file or step.
            let err = stderr(&o);
            let last = err.trim_end().lines().last().unwrap_or("");
            assert_eq!(o.status.code(), Some(1), "step {k}: {err}");
            // A commit's step names the epoch; a picture's (written through the same
            // writer, so its steps count too) names the picture.
            assert!(
                (last.starts_with("error: epoch") || last.contains(".png: cannot "))
                    && last.contains("No space left on device"),
                "step {k}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
        // The folder holds the last commit only, whole; nothing half-written is visible.
        let at = last_epoch(&run);
        stopped_in_each_epoch[at.unwrap_or(0)] += 1;
        if let Some(e) = at {
            let c = committed(&run);
            assert_eq!(
                c.2.len(),
                e,
                "step {k}: metrics of epoch {e} not one commit"
            );
            assert_eq!(c.2[..], want.2[..e], "step {k}: metrics differ");
        }
        if at == Some(epochs) {
            assert!(committed(&run) == want, "step {k}: final commit differs");
            continue;
        }
        let o = elbo(&[args, &["--out", r, "--resume"]].concat());
        if at.is_none() {
            assert_one_line_error(&o, "holds no committed epoch");
            let o = elbo(&[args, &["--out", r]].concat());
            assert!(o.status.success(), "step {k}: restart: {}", stderr(&o));
        } else {
            assert!(o.status.success(), "step {k}: resume: {}", stderr(&o));
        }
        assert!(
            committed(&run) == want,
            "step {k} ({kind}): the resumed run differs from the uninterrupted one"
        );
        let leftovers: Vec<_> = std::fs::read_dir(run.join("commits"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "step {k}: leftovers {leftovers:?}");
    }
    assert!(
        stopped_in_each_epoch.iter().all(|&n| n > 0),
        "faults did not land in every epoch: {stopped_in_each_epoch:?}"
    );
}

fn vae_args(data: &Path) -> Vec<String> {
    [
        "train",
        "vae",
        "--data",
        data.to_str().unwrap(),
        "--hidden-dim",
        "16",
        "--latent-dim",
        "4",
        "--epochs",
        "2",
    ]
    .map(String::from)
    .to_vec()
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn vae_killed_at_every_file_system_step_resumes_bit_identically() {
    let data = mnist_dir(256, 32);
    every_step_resumes_identically(&as_strs(&vae_args(data.path())), 2, "kill", 1);
}

#[test]
fn vae_out_of_space_at_every_file_system_step_keeps_the_last_commit() {
    let data = mnist_dir(256, 32);
    every_step_resumes_identically(&as_strs(&vae_args(data.path())), 2, "enospc", 1);
}

const TOY_ARGS: [&str; 14] = [
    "train",
    "diffusion",
    "--dataset",
    "toy:moons",
    "--num-train-timesteps",
    "20",
    "--epochs",
    "2",
    "--toy-steps-per-epoch",
    "5",
    "--sample-steps",
    "2",
    "--channels",
    "16",
];

#[test]
fn diffusion_killed_at_every_file_system_step_resumes_bit_identically() {
    every_step_resumes_identically(&TOY_ARGS, 2, "kill", 1);
    every_step_resumes_identically(&TOY_ARGS, 2, "enospc", 1);
}

#[test]
fn image_diffusion_killed_mid_commit_resumes_bit_identically() {
    let data = mnist_dir(32, 8);
    let args = [
        "train",
        "diffusion",
        "--data",
        data.path().to_str().unwrap(),
        "--num-train-timesteps",
        "20",
        "--channels",
        "8",
        "--sample-steps",
        "2",
        "--batch-size",
        "16",
        "--epochs",
        "2",
    ];
    // Every other step: EMA and raw weights must come back from the same epoch.
    every_step_resumes_identically(&args, 2, "kill", 2);
}

/// Learned variances on L_vlb: the loss-aware sampler's history is part of the train state.
/// T = 4 and 64 images a pass, so every t has its 10 values after the first epoch and the
/// second draws its t from the history: a resume that lost it would draw uniformly again and
/// differ (planted once: it fails).
#[test]
fn vlb_diffusion_resumes_its_loss_aware_sampler_bit_identically() {
    let data = mnist_dir(64, 8);
    let args = [
        "train",
        "diffusion",
        "--data",
        data.path().to_str().unwrap(),
        "--num-train-timesteps",
        "4",
        "--channels",
        "8",
        "--sample-steps",
        "2",
        "--batch-size",
        "16",
        "--epochs",
        "2",
        "--variance",
        "learned-range",
        "--loss",
        "vlb",
    ];
    every_step_resumes_identically(&args, 2, "kill", 3);
}

/// A continuous-time run with a learned schedule: the schedule's raw parameters and their
/// Adam state are in the train state, so a run killed anywhere resumes bit-identically.
#[test]
fn continuous_time_resumes_its_learned_schedule_bit_identically() {
    let data = mnist_dir(64, 8);
    let args = [
        "train",
        "diffusion",
        "--data",
        data.path().to_str().unwrap(),
        "--channels",
        "8",
        "--sample-steps",
        "2",
        "--batch-size",
        "16",
        "--epochs",
        "2",
        "--time",
        "continuous",
        "--gamma",
        "learned",
    ];
    every_step_resumes_identically(&args, 2, "kill", 3);
}

#[test]
fn resume_refuses_a_commit_whose_files_are_out_of_step() {
    let data = mnist_dir(256, 32);
    let root = tempfile::tempdir().unwrap();
    let run = root.path().join("run");
    let args = vae_args(data.path());
    let r = run.to_str().unwrap();
    let o = elbo(&[as_strs(&args).as_slice(), &["--out", r]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    // Another epoch's training state copied over this commit's.
    let state = run.join("commits/000002/train_state.safetensors");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&state, &bytes).unwrap();
    let more = ["--out", r, "--resume", "--epochs", "3"];
    let o = elbo(&[&as_strs(&args)[..8], &more].concat());
    assert_one_line_error(&o, "out of step");
    assert!(
        stderr(&o).contains("train_state.safetensors"),
        "{}",
        stderr(&o)
    );
    // A metrics file missing a line.
    std::fs::write(&state, {
        bytes[last] ^= 1;
        &bytes
    })
    .unwrap();
    let metrics = run.join("commits/000002/metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).unwrap();
    std::fs::write(&metrics, text.lines().next().unwrap().to_string() + "\n").unwrap();
    let o = elbo(&[&as_strs(&args)[..8], &more].concat());
    assert_one_line_error(&o, "metrics.jsonl");
}

#[test]
fn an_existing_run_is_not_touched_without_resume() {
    let root = tempfile::tempdir().unwrap();
    for file in [
        "metrics.jsonl",
        "train_state.safetensors",
        "model.safetensors",
    ] {
        let run = root.path().join(file);
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join(file), b"precious").unwrap();
        let o = elbo(&[
            "train",
            "vae",
            "--epochs",
            "1",
            "--out",
            run.to_str().unwrap(),
        ]);
        assert_one_line_error(&o, "--resume");
        assert_eq!(std::fs::read(run.join(file)).unwrap(), b"precious");
        let o = elbo(&[
            "train",
            "vae",
            "--epochs",
            "1",
            "--resume",
            "--out",
            run.to_str().unwrap(),
        ]);
        assert_one_line_error(&o, "--resume");
        assert_eq!(std::fs::read(run.join(file)).unwrap(), b"precious");
    }
}

/// Runs each `(command line, flag)`: `{out}` in the line is a folder that must never be
/// created; the run must fail with exit code 1 or 2 and one line naming the flag.
fn each_names_its_flag(cases: &[(&str, &str)]) {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("never");
    for (line, flag) in cases {
        let line = line.replace("{out}", out.to_str().unwrap());
        let args: Vec<&str> = line.split_whitespace().collect();
        let o = elbo(&args);
        // 1: refused by elbo; 2: refused by the argument parser (clap's convention).
        assert!(
            matches!(o.status.code(), Some(1 | 2)),
            "{line}: {:?} {}",
            o.status,
            stderr(&o)
        );
        assert_one_line_error(&o, flag);
    }
    assert!(!out.exists(), "a refused run created its --out folder");
}

/// Every flag or file size that once panicked or aborted now gets one line naming it.
#[test]
fn sizes_are_checked_before_they_are_allocated() {
    each_names_its_flag(&[
        (
            "schedule --num-train-timesteps 18446744073709551615",
            "--num-train-timesteps",
        ),
        (
            "schedule --num-train-timesteps 1000000000",
            "--num-train-timesteps",
        ),
        (
            "train diffusion --num-train-timesteps 18446744073709551615 --out {out}",
            "--num-train-timesteps",
        ),
        (
            "train diffusion --num-train-timesteps 1000000000 --out {out}",
            "--num-train-timesteps",
        ),
        (
            "train diffusion --channels 1000000 --out {out}",
            "--channels",
        ),
        (
            "train vae --hidden-dim 9223372036854775808 --out {out}",
            "--hidden",
        ),
        ("train vae --hidden-dim 1000000000 --out {out}", "--hidden"),
        (
            "train vae --latent-dim 1000000000 --out {out}",
            "--latent-dim",
        ),
        (
            "train vae --mc-samples 1000000000 --out {out}",
            "--mc-samples",
        ),
        (
            "train vae --mc-samples 1000000000 --engine candle --out {out}",
            "--mc-samples",
        ),
    ]);
    // --n is checked against the model's image size, once the checkpoint is read.
    let data = mnist_dir(32, 8);
    let root = tempfile::tempdir().unwrap();
    let run = root.path().join("unet");
    let o = elbo(&[
        "train",
        "diffusion",
        "--data",
        data.path().to_str().unwrap(),
        "--num-train-timesteps",
        "20",
        "--channels",
        "8",
        "--epochs",
        "1",
        "--sample-steps",
        "1",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let unet = run.join("model.safetensors");
    let png = root.path().join("never.png");
    let (u, p) = (unet.to_str().unwrap(), png.to_str().unwrap());
    for model in ["vae", "diffusion"] {
        let ckpt = if model == "vae" { FIXTURE } else { u };
        let o = elbo(&[
            "sample",
            model,
            "--n",
            "10000000",
            "--checkpoint",
            ckpt,
            "--out",
            p,
        ]);
        assert_one_line_error(&o, "--n 10000000");
        assert!(!png.exists());
    }
}

const FIXTURE: &str = "tests/fixtures/simplevae_torch.safetensors";

#[test]
fn degenerate_and_negative_values_name_their_flag() {
    each_names_its_flag(&[
        ("train vae --epochs 0 --out {out}", "--epochs"),
        ("train vae --train-limit 0 --out {out}", "--train-limit"),
        ("train vae --test-limit 0 --out {out}", "--test-limit"),
        ("train diffusion --epochs 0 --out {out}", "--epochs"),
        (
            "train diffusion --train-limit 0 --out {out}",
            "--train-limit",
        ),
        ("train diffusion --test-limit 0 --out {out}", "--test-limit"),
        (
            "train diffusion --dataset toy:moons --toy-steps-per-epoch 0 --out {out}",
            "--toy-steps-per-epoch",
        ),
        ("train vae --epochs -1 --out {out}", "--epochs"),
        (
            "train diffusion --ema-decay -0.5 --out {out}",
            "--ema-decay",
        ),
        ("sample diffusion --eta -1 --checkpoint x", "--eta"),
        ("sample vae --n -3 --checkpoint x", "--n"),
        ("eval vae --iw-samples -5 --checkpoint x", "--iw-samples"),
    ]);
}

/// A VAE checkpoint of the text's model (small sizes), its tensors changed by `edit`.
fn vae_checkpoint(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, candle_core::Tensor)>),
) -> PathBuf {
    let config = elbo::vae::VaeConfig::mlp(784, 8, 2);
    let vae = elbo::vae::Vae::new(
        config,
        &mut elbo::distributions::Noise::new(0),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut tensors: Vec<(String, candle_core::Tensor)> = vae
        .params()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    edit(&mut tensors);
    let path = dir.join(name);
    std::fs::write(
        &path,
        elbo::checkpoint::serialize(&tensors, Default::default()).unwrap(),
    )
    .unwrap();
    path
}

fn set(
    tensors: &mut [(String, candle_core::Tensor)],
    name: &str,
    f: impl Fn(&candle_core::Tensor) -> candle_core::Tensor,
) {
    let t = tensors.iter_mut().find(|(n, _)| n == name).unwrap();
    t.1 = f(&t.1);
}

#[test]
fn non_finite_and_integer_weights_are_refused_naming_the_tensor() {
    use candle_core::{DType, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let nan_bias = vae_checkpoint(dir.path(), "nan.safetensors", |t| {
        set(t, "decoder.2.bias", |x| {
            let mut v = x.to_vec1::<f32>().unwrap();
            v[17] = f32::NAN;
            Tensor::new(v, x.device()).unwrap()
        })
    });
    let nan_encoder = vae_checkpoint(dir.path(), "nan-enc.safetensors", |t| {
        set(t, "encoder.0.weight", |x| (x * f64::NAN).unwrap())
    });
    let inf = vae_checkpoint(dir.path(), "inf.safetensors", |t| {
        set(t, "fc_mu.bias", |x| (x * f64::INFINITY).unwrap())
    });
    let f64_too_big = vae_checkpoint(dir.path(), "f64.safetensors", |t| {
        set(t, "fc_logvar.bias", |x| {
            x.to_dtype(DType::F64).unwrap().affine(0.0, 1e300).unwrap()
        })
    });
    for (path, tensor) in [
        (&nan_bias, "decoder.2.bias"),
        (&nan_encoder, "encoder.0.weight"),
        (&inf, "fc_mu.bias"),
        (&f64_too_big, "fc_logvar.bias"),
    ] {
        let o = elbo(&[
            "eval",
            "vae",
            "--checkpoint",
            path.to_str().unwrap(),
            "--limit",
            "2",
        ]);
        assert_one_line_error(&o, tensor);
        assert!(stderr(&o).contains("non-finite"), "{}", stderr(&o));
    }
    for dtype in [DType::I64, DType::U8, DType::U32] {
        let p = vae_checkpoint(dir.path(), &format!("{dtype:?}.safetensors"), |t| {
            set(t, "decoder.0.weight", |x| x.to_dtype(dtype).unwrap())
        });
        let o = elbo(&[
            "eval",
            "vae",
            "--checkpoint",
            p.to_str().unwrap(),
            "--limit",
            "2",
        ]);
        assert_one_line_error(&o, "decoder.0.weight");
        assert!(stderr(&o).contains("dtype"), "{}", stderr(&o));
    }
    // Half and double precision still load (converted to f32).
    for dtype in [DType::F16, DType::BF16, DType::F64] {
        let p = vae_checkpoint(dir.path(), &format!("{dtype:?}.safetensors"), |t| {
            for (_, x) in t.iter_mut() {
                *x = x.to_dtype(dtype).unwrap();
            }
        });
        let o = elbo(&[
            "eval",
            "vae",
            "--checkpoint",
            p.to_str().unwrap(),
            "--limit",
            "2",
            "--iw-samples",
            "5",
        ]);
        assert!(o.status.success(), "{dtype:?}: {}", stderr(&o));
    }
    // Finite but absurd weights: the evaluation's non-finite result is an error, not exit 0.
    let huge = vae_checkpoint(dir.path(), "huge.safetensors", |t| {
        set(t, "fc_mu.bias", |x| x.affine(0.0, 1e30).unwrap())
    });
    let o = elbo(&[
        "eval",
        "vae",
        "--checkpoint",
        huge.to_str().unwrap(),
        "--limit",
        "2",
    ]);
    assert_one_line_error(&o, "overflow");
}

/// A checkpoint whose metadata claims absurd or impossible sizes gets one line, no panic.
#[test]
fn crafted_checkpoint_metadata_is_refused() {
    use std::collections::HashMap;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, tensors: &[(String, candle_core::Tensor)], meta: &[(&str, String)]| {
        let path = dir.path().join(name);
        let meta: HashMap<String, String> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        std::fs::write(&path, elbo::checkpoint::serialize(tensors, meta).unwrap()).unwrap();
        path
    };
    let diffusion = |config: serde_json::Value| {
        vec![
            ("elbo.model", "diffusion".to_string()),
            ("elbo.config", config.to_string()),
        ]
    };
    let unet = |mult: serde_json::Value, t: u64| {
        serde_json::json!({
            "net": {"kind": "unet", "base": 8, "channel_mult": mult, "groups": 8, "attention": false},
            "beta_schedule": "linear", "num_train_timesteps": t, "prediction": "eps"
        })
    };
    let cases = [
        (
            write(
                "mult.safetensors",
                &[],
                &diffusion(unet(serde_json::json!([]), 20)),
            ),
            "channel_mult",
        ),
        (
            write(
                "t9.safetensors",
                &[],
                &diffusion(unet(serde_json::json!([1]), 1_000_000_000)),
            ),
            "1000000000",
        ),
        (
            write(
                "t12.safetensors",
                &[],
                &diffusion(unet(serde_json::json!([1]), 1_000_000_000_000)),
            ),
            "1000000000000",
        ),
    ];
    for (path, needle) in &cases {
        let p = path.to_str().unwrap();
        assert_one_line_error(&elbo(&["sample", "diffusion", "--checkpoint", p]), needle);
        assert_one_line_error(&elbo(&["eval", "diffusion", "--checkpoint", p]), needle);
    }
    // A VAE config with latent_dim 0 and the empty tensors that go with it.
    let config = serde_json::json!({
        "input_dim": 784, "hidden_dim": 8, "latent_dim": 0,
        "likelihood": "bernoulli", "obs_log_var": null
    });
    let zero = |shape: &[usize]| {
        candle_core::Tensor::zeros(shape, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap()
    };
    let tensors = vec![
        ("encoder.0.weight".to_string(), zero(&[8, 784])),
        ("encoder.0.bias".to_string(), zero(&[8])),
        ("fc_mu.weight".to_string(), zero(&[0, 8])),
        ("fc_mu.bias".to_string(), zero(&[0])),
        ("fc_logvar.weight".to_string(), zero(&[0, 8])),
        ("fc_logvar.bias".to_string(), zero(&[0])),
        ("decoder.0.weight".to_string(), zero(&[8, 0])),
        ("decoder.0.bias".to_string(), zero(&[8])),
        ("decoder.2.weight".to_string(), zero(&[784, 8])),
        ("decoder.2.bias".to_string(), zero(&[784])),
    ];
    let p = write(
        "latent0.safetensors",
        &tensors,
        &[
            ("elbo.model", "vae".into()),
            ("elbo.config", config.to_string()),
        ],
    );
    assert_one_line_error(
        &elbo(&["eval", "vae", "--checkpoint", p.to_str().unwrap()]),
        "--latent-dim: every stochastic layer needs at least 1 unit",
    );
    // The VAE family's crafted configs (no tensors needed: the config is refused first).
    let vae_config = |extra: serde_json::Value| {
        let mut c = serde_json::json!({
            "input_dim": 784, "latent_dims": [8], "hidden": [[16]], "activation": "tanh",
            "likelihood": "bernoulli", "obs_log_var": null
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let crafted = [
        (serde_json::json!({"latent_dims": []}), "--latent-dim"),
        (serde_json::json!({"hidden": [[16], [8]]}), "--hidden"),
        (serde_json::json!({"hidden": [[0]]}), "--hidden"),
        (
            serde_json::json!({"likelihood": "logistic", "mixtures": 0}),
            "--mixtures",
        ),
        (serde_json::json!({"mixtures": 3}), "--mixtures"),
        (
            serde_json::json!({"conv": {"channels": [1000000], "residual": false}}),
            "--conv",
        ),
        (
            serde_json::json!({"conv": {"channels": [8, 8, 8], "residual": false}}),
            "divisible by 8",
        ),
        (
            serde_json::json!({"hidden": [[4_611_686_018_427_387_904u64]], "latent_dims": [4_611_686_018_427_387_904u64]}),
            "--hidden",
        ),
    ];
    for (i, (extra, needle)) in crafted.iter().enumerate() {
        let p = write(
            &format!("crafted{i}.safetensors"),
            &[],
            &[
                ("elbo.model", "vae".into()),
                ("elbo.config", vae_config(extra.clone()).to_string()),
            ],
        );
        assert_one_line_error(
            &elbo(&["eval", "vae", "--checkpoint", p.to_str().unwrap()]),
            needle,
        );
        assert_one_line_error(
            &elbo(&["sample", "vae", "--checkpoint", p.to_str().unwrap()]),
            needle,
        );
    }
}

#[test]
fn pipes_devices_and_folders_are_refused_as_files() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.safetensors");
    let made = Command::new("mkfifo").arg(&fifo).status();
    let mut paths = vec![PathBuf::from("/dev/zero"), dir.path().to_path_buf()];
    if made.is_ok_and(|s| s.success()) {
        paths.push(fifo);
    }
    for p in &paths {
        let p = p.to_str().unwrap();
        assert_one_line_error(
            &elbo(&["eval", "vae", "--checkpoint", p]),
            "not a regular file",
        );
        assert_one_line_error(
            &elbo(&["sample", "diffusion", "--checkpoint", p]),
            "not a regular file",
        );
    }
    // IDX files too: a folder whose image file is a device.
    let data = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/zero", data.path().join("t10k-images-idx3-ubyte")).unwrap();
    let o = elbo(&[
        "eval",
        "vae",
        "--checkpoint",
        "tests/fixtures/simplevae_torch.safetensors",
        "--data",
        data.path().to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "not a regular file");
}

#[test]
fn errors_stay_one_line_with_rust_backtrace_set() {
    let dir = tempfile::tempdir().unwrap();
    let p = vae_checkpoint(dir.path(), "short.safetensors", |t| {
        set(t, "decoder.0.weight", |x| {
            x.narrow(1, 0, 1).unwrap().contiguous().unwrap()
        })
    });
    for env in ["1", "full"] {
        let o = elbo_env(
            &["eval", "vae", "--checkpoint", p.to_str().unwrap()],
            &[("RUST_BACKTRACE", env.into())],
        );
        assert_one_line_error(&o, "decoder.0.weight");
        assert!(stderr(&o).len() < 400, "{}", stderr(&o));
    }
}

#[test]
fn a_long_importance_sampled_evaluation_stops_on_ctrl_c() {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_elbo"));
    cmd.args([
        "eval",
        "vae",
        "--checkpoint",
        "tests/fixtures/simplevae_torch.safetensors",
        "--iw-samples",
        "10000000",
        "--limit",
        "10",
    ])
    .stderr(std::process::Stdio::piped());
    // A shell without job control starts its background jobs with SIGINT ignored, and an
    // ignored signal stays ignored across exec: give the child the action a terminal's Ctrl-C
    // meets, whatever this test process inherited.
    // SAFETY: between fork and exec only the async-signal-safe signal(2) runs.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        pipe.read_to_string(&mut text).map(|_| text)
    });
    std::thread::sleep(Duration::from_millis(1500));
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    // Poll rather than wait, so that an evaluation that ignores the signal fails the test
    // instead of hanging it for the hundred million samples.
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("did not stop within 10 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = reader.join().unwrap().unwrap();
    assert!(!status.success());
    assert!(!err.contains("panicked"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Issue 33: nothing written where it must not be, nothing read without a bound, no NaN run
// called a success.

/// A small VAE run and a small diffusion run, trained once for the tests below.
fn small_runs(root: &Path) -> (PathBuf, PathBuf) {
    let vae = root.join("vae-run");
    let o = elbo(&[
        "train",
        "vae",
        "--epochs",
        "1",
        "--train-limit",
        "256",
        "--test-limit",
        "32",
        "--hidden-dim",
        "16",
        "--latent-dim",
        "2",
        "--out",
        vae.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let diffusion = root.join("diffusion-run");
    let o = elbo(&[
        "train",
        "diffusion",
        "--train-limit",
        "32",
        "--test-limit",
        "8",
        "--num-train-timesteps",
        "10",
        "--channels",
        "8",
        "--epochs",
        "1",
        "--sample-steps",
        "2",
        "--out",
        diffusion.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    (vae, diffusion)
}

/// `true` when `path` is a symbolic link.
fn is_link(path: &Path) -> bool {
    path.symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
}

#[test]
fn every_output_path_refuses_a_planted_link_and_keeps_what_is_behind_it() {
    let root = tempfile::tempdir().unwrap();
    let (vae, diffusion) = small_runs(root.path());
    let (vae_ckpt, diffusion_ckpt) = (
        vae.join("model.safetensors"),
        diffusion.join("model.safetensors"),
    );
    let (v, d) = (vae_ckpt.to_str().unwrap(), diffusion_ckpt.to_str().unwrap());
    let out = root.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let victim = root.path().join("victim.txt");
    let o = |name: &str| out.join(name).to_str().unwrap().to_string();
    // Each command and the file it writes.
    let cases: Vec<(Vec<String>, PathBuf)> = vec![
        (
            [
                "sample",
                "vae",
                "--checkpoint",
                v,
                "--n",
                "4",
                "--out",
                &o("grid.png"),
            ]
            .map(String::from)
            .to_vec(),
            out.join("grid.png"),
        ),
        (
            [
                "reconstruct",
                "vae",
                "--checkpoint",
                v,
                "--n",
                "4",
                "--out",
                &o("rec.png"),
            ]
            .map(String::from)
            .to_vec(),
            out.join("rec.png"),
        ),
        (
            [
                "sample",
                "diffusion",
                "--checkpoint",
                d,
                "--n",
                "2",
                "--steps",
                "2",
                "--out",
                &o("d.png"),
            ]
            .map(String::from)
            .to_vec(),
            out.join("d.png"),
        ),
        (
            ["report", vae.to_str().unwrap(), "--out", &o("r.html")]
                .map(String::from)
                .to_vec(),
            out.join("r.html"),
        ),
        (
            [
                "eval",
                "vae",
                "--checkpoint",
                v,
                "--iw-samples",
                "2",
                "--limit",
                "8",
                "--report",
                vae.to_str().unwrap(),
            ]
            .map(String::from)
            .to_vec(),
            vae.join("eval.json"),
        ),
        (
            [
                "eval",
                "diffusion",
                "--checkpoint",
                d,
                "--limit",
                "2",
                "--plot",
                &o("lt.svg"),
            ]
            .map(String::from)
            .to_vec(),
            out.join("lt.svg"),
        ),
    ];
    for (args, target) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let tmp_name = |suffix: &str| {
            let mut s = target.clone().into_os_string();
            s.push(suffix);
            PathBuf::from(s)
        };
        // The old predictable temporary name as a link to the victim, and a file of the
        // user's under it: the write succeeds and touches neither.
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, tmp_name(".tmp")).unwrap();
        let o = elbo(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "{args:?}");
        assert!(!is_link(target), "{args:?} left its output a link");
        std::fs::remove_file(tmp_name(".tmp")).unwrap();
        // The target itself a link to the victim: refused in one line, the victim kept.
        std::fs::remove_file(target).unwrap();
        std::os::unix::fs::symlink(&victim, target).unwrap();
        let o = elbo(&args);
        assert_one_line_error(&o, "symbolic link");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "{args:?}");
        std::fs::remove_file(target).unwrap();
    }
}

#[test]
fn a_new_run_refuses_an_out_folder_holding_any_file_a_run_writes() {
    let root = tempfile::tempdir().unwrap();
    for name in [
        "samples.png",
        "reconstructions.png",
        "report.html",
        "eval.json",
    ] {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(name), b"mine").unwrap();
        let o = elbo(&[
            "train",
            "vae",
            "--epochs",
            "1",
            "--out",
            dir.to_str().unwrap(),
        ]);
        assert_one_line_error(&o, name);
        assert_eq!(std::fs::read(dir.join(name)).unwrap(), b"mine");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "{name}");
    }
    let dir = root.path().join("pictures-run");
    std::fs::create_dir_all(dir.join("pictures")).unwrap();
    std::fs::write(dir.join("pictures/samples-000001.png"), b"mine").unwrap();
    let o = elbo(&[
        "train",
        "vae",
        "--epochs",
        "1",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "pictures");
    assert_eq!(
        std::fs::read(dir.join("pictures/samples-000001.png")).unwrap(),
        b"mine"
    );
}

#[test]
fn resume_never_follows_a_run_folders_links_outside_it() {
    let data = mnist_dir(256, 32);
    let root = tempfile::tempdir().unwrap();
    let args = vae_args(data.path());
    let mut runs = Vec::new();
    for name in ["run", "other"] {
        let run = root.path().join(name);
        let o = elbo(&[as_strs(&args).as_slice(), &["--out", run.to_str().unwrap()]].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        runs.push(run);
    }
    let (run, other) = (&runs[0], &runs[1]);
    let r = run.to_str().unwrap();
    let resume = || {
        elbo(
            &[
                &as_strs(&args)[..8],
                &["--out", r, "--resume", "--epochs", "3"],
            ]
            .concat(),
        )
    };
    let latest = run.join("latest");
    let original = std::fs::read_link(&latest).unwrap();
    for target in [
        PathBuf::from("/"),
        PathBuf::from("/etc"),
        other.join("commits/000002"),
        PathBuf::from("../other/commits/000002"),
        PathBuf::from("commits/../../other/commits/000002"),
    ] {
        std::fs::remove_file(&latest).unwrap();
        std::os::unix::fs::symlink(&target, &latest).unwrap();
        let o = resume();
        assert_one_line_error(&o, "refusing to follow");
    }
    // `latest` as written, but the commits folder a link to another run's.
    std::fs::remove_file(&latest).unwrap();
    std::os::unix::fs::symlink(&original, &latest).unwrap();
    std::fs::rename(run.join("commits"), root.path().join("moved")).unwrap();
    std::os::unix::fs::symlink(other.join("commits"), run.join("commits")).unwrap();
    assert_one_line_error(&resume(), "refusing to follow");
    // A committed file replaced by a link (to the same bytes elsewhere) is refused too.
    std::fs::remove_file(run.join("commits")).unwrap();
    std::fs::rename(root.path().join("moved"), run.join("commits")).unwrap();
    let state = run.join("commits/000002/train_state.safetensors");
    std::fs::rename(&state, root.path().join("state")).unwrap();
    std::os::unix::fs::symlink(root.path().join("state"), &state).unwrap();
    assert_one_line_error(&resume(), "not a regular file");
}

#[test]
fn a_non_finite_run_stops_without_a_commit_and_says_so() {
    let root = tempfile::tempdir().unwrap();
    for (kind, extra) in [
        (
            "diffusion",
            &[
                "--train-limit",
                "32",
                "--test-limit",
                "8",
                "--num-train-timesteps",
                "10",
                "--channels",
                "8",
                "--sample-steps",
                "2",
            ][..],
        ),
        ("vae", &["--train-limit", "256", "--test-limit", "32"][..]),
    ] {
        for lr in ["1e30", "1e6"] {
            let out = root.path().join(format!("{kind}-{lr}"));
            let o = elbo(
                &[
                    &[
                        "train",
                        kind,
                        "--lr",
                        lr,
                        "--epochs",
                        "2",
                        "--out",
                        out.to_str().unwrap(),
                    ],
                    extra,
                ]
                .concat(),
            );
            // The run's banner lines, then one error line.
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{err}");
            let last = err.trim_end().lines().last().unwrap_or("");
            assert!(last.starts_with("error: training stopped"), "{err}");
            assert!(last.contains("try a smaller --lr"), "{err}");
            assert!(!out.join("latest").exists(), "{kind} --lr {lr} committed");
            assert!(
                !out.join("samples.png").exists(),
                "{kind} --lr {lr} drew samples"
            );
        }
    }
}

#[test]
fn oversized_metrics_and_inflating_members_are_refused_without_reading_them() {
    let root = tempfile::tempdir().unwrap();
    let (vae, _) = small_runs(root.path());
    // The report: a 1 GB metrics file (sparse) is refused by its size.
    let copy = root.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(vae.join("config.json"), copy.join("config.json")).unwrap();
    let metrics = std::fs::File::create(copy.join("metrics.jsonl")).unwrap();
    metrics.set_len(1 << 30).unwrap();
    let o = elbo(&[
        "report",
        copy.to_str().unwrap(),
        "--out",
        root.path().join("r.html").to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "metrics.jsonl");
    // --resume: a committed metrics file grown to 1 GB is refused before it is read.
    let committed = vae.join("commits/000001/metrics.jsonl");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&committed)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let o = elbo(&[
        "train",
        "vae",
        "--resume",
        "--epochs",
        "2",
        "--out",
        vae.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "metrics.jsonl");
    // An .npz member whose .npy header declares 100 x 28 x 28 but inflates to 256 MB.
    use std::io::Write;
    let npz = root.path().join("bomb.npz");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&npz).unwrap());
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    zip.start_file("images.npy", options).unwrap();
    let header = elbo::data::npy::encode("|u1", &[100, 28, 28], &[0; 78_400]);
    zip.write_all(&header[..header.len() - 78_400]).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..256 {
        zip.write_all(&zeros).unwrap();
    }
    zip.finish().unwrap();
    let o = elbo(&[
        "train",
        "vae",
        "--data",
        npz.to_str().unwrap(),
        "--out",
        root.path().join("n").to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "inflates to more than the 78400 bytes");
}

#[test]
fn count_flags_have_ceilings_and_too_much_work_is_refused_up_front() {
    let ckpt = "tests/fixtures/simplevae_torch.safetensors";
    for (args, flag) in [
        (
            vec![
                "eval",
                "vae",
                "--checkpoint",
                ckpt,
                "--iw-samples",
                "18446744073709551615",
            ],
            "--iw-samples",
        ),
        // Under the flag's ceiling, but 10,000 examples x 10^7 samples is too much work.
        (
            vec![
                "eval",
                "vae",
                "--checkpoint",
                ckpt,
                "--iw-samples",
                "10000000",
            ],
            "--iw-samples",
        ),
        (
            vec![
                "eval",
                "vae",
                "--checkpoint",
                ckpt,
                "--batch-size",
                "18446744073709551615",
            ],
            "--batch-size",
        ),
        (
            vec![
                "eval",
                "vae",
                "--checkpoint",
                ckpt,
                "--limit",
                "18446744073709551615",
            ],
            "--limit",
        ),
        (
            vec![
                "sample",
                "vae",
                "--checkpoint",
                ckpt,
                "--n",
                "18446744073709551615",
            ],
            "--n",
        ),
        (
            vec![
                "reconstruct",
                "vae",
                "--checkpoint",
                ckpt,
                "--n",
                "18446744073709551615",
            ],
            "--n",
        ),
        (
            vec![
                "sample",
                "diffusion",
                "--checkpoint",
                ckpt,
                "--steps",
                "18446744073709551615",
            ],
            "--steps",
        ),
        (
            vec!["train", "vae", "--epochs", "18446744073709551615"],
            "--epochs",
        ),
        (
            vec!["train", "vae", "--eval-every", "18446744073709551615"],
            "--eval-every",
        ),
        (
            vec![
                "train",
                "diffusion",
                "--sample-steps",
                "18446744073709551615",
            ],
            "--sample-steps",
        ),
    ] {
        let started = std::time::Instant::now();
        assert_one_line_error(&elbo(&args), flag);
        assert!(
            started.elapsed().as_secs() < 20,
            "{args:?} was not refused up front"
        );
    }
    // The ceiling is the one stated: a tiny one refuses a tiny evaluation.
    let args = [
        "eval",
        "vae",
        "--checkpoint",
        ckpt,
        "--iw-samples",
        "2",
        "--limit",
        "2",
    ];
    assert!(elbo(&args).status.success());
    let o = elbo_env(&args, &[("ELBO_WORK_CEILING", "1000".into())]);
    assert_one_line_error(&o, "more than the 1e3 one command may do");
}

#[test]
fn eval_report_refuses_a_run_of_the_other_kind_before_evaluating() {
    let root = tempfile::tempdir().unwrap();
    let (vae, diffusion) = small_runs(root.path());
    let (v, d) = (vae.to_str().unwrap(), diffusion.to_str().unwrap());
    let vae_ckpt = vae.join("model.safetensors");
    let diffusion_ckpt = diffusion.join("model.safetensors");
    let o = elbo(&[
        "eval",
        "diffusion",
        "--checkpoint",
        diffusion_ckpt.to_str().unwrap(),
        "--limit",
        "2",
        "--report",
        v,
    ]);
    assert_one_line_error(&o, "holds a vae run");
    let o = elbo(&[
        "eval",
        "vae",
        "--checkpoint",
        vae_ckpt.to_str().unwrap(),
        "--iw-samples",
        "2",
        "--limit",
        "4",
        "--report",
        d,
    ]);
    assert_one_line_error(&o, "holds a diffusion run");
    assert!(!vae.join("eval.json").exists() && !diffusion.join("eval.json").exists());
}

#[test]
fn messages_name_the_flag_or_file_and_what_is_wrong() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("never").to_str().unwrap().to_string();
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "train",
                "vae",
                "--likelihood",
                "gaussian",
                "--obs-log-var",
                "-1000",
            ],
            "--obs-log-var -1000",
        ),
        (
            &["train", "diffusion", "--channels", "7"],
            "--channels 7: the U-Net's base width must be divisible by 2",
        ),
        (
            &["train", "diffusion", "--res-blocks", "0"],
            "--res-blocks 0:",
        ),
    ];
    for (args, needle) in cases {
        let o = elbo(&[args, &["--out", &out]].concat());
        assert_one_line_error(&o, needle);
        assert!(!stderr(&o).contains("Some("), "{}", stderr(&o));
    }
    // Corrupt gzip: a bad CRC and bad deflate data, each said in words.
    use std::io::Write;
    let mut idx = vec![0, 0, 8, 3, 0, 0, 0, 10, 0, 0, 0, 28, 0, 0, 0, 28];
    idx.extend(std::iter::repeat_n(0u8, 10 * 784));
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&idx).unwrap();
    let gz = e.finish().unwrap();
    let n = gz.len();
    for (flip, needle) in [(n - 6, "CRC mismatch"), (n / 2, "deflate data")] {
        let dir = root.path().join(format!("gz-{flip}"));
        std::fs::create_dir(&dir).unwrap();
        let mut bad = gz.clone();
        bad[flip] ^= 0xff;
        bad[flip + 1] ^= 0x55;
        std::fs::write(dir.join("t10k-images-idx3-ubyte.gz"), &bad).unwrap();
        let o = elbo(&[
            "eval",
            "vae",
            "--checkpoint",
            "tests/fixtures/simplevae_torch.safetensors",
            "--data",
            dir.to_str().unwrap(),
        ]);
        assert_one_line_error(&o, needle);
    }
    // A file named .tar.gz that is not one (not gzip; gzip but not tar): said in words, none
    // of its bytes echoed.
    let fake = root.path().join("cifar.tar.gz");
    let junk = b"\x07\x08\x1b[31mnot an archive at all".repeat(40);
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&junk).unwrap();
    for (bytes, needle) in [
        (junk.clone(), "not a data file elbo reads"),
        (e.finish().unwrap(), "corrupt tar.gz archive"),
    ] {
        std::fs::write(&fake, bytes).unwrap();
        let o = elbo(&[
            "eval",
            "vae",
            "--checkpoint",
            "tests/fixtures/simplevae_torch.safetensors",
            "--data",
            fake.to_str().unwrap(),
        ]);
        assert_one_line_error(&o, needle);
        assert!(!stderr(&o).contains('\u{1b}') && !stderr(&o).contains("not an archive"));
    }
    // A bad line 3 of metrics.jsonl is called line 3.
    let (vae, _) = small_runs(root.path());
    let copy = root.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(vae.join("config.json"), copy.join("config.json")).unwrap();
    let line = std::fs::read_to_string(vae.join("metrics.jsonl")).unwrap();
    std::fs::write(copy.join("metrics.jsonl"), format!("{line}{line}{{bad\n")).unwrap();
    let o = elbo(&[
        "report",
        copy.to_str().unwrap(),
        "--out",
        root.path().join("r.html").to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "line 3 is not JSON");
    // A 10 MB string in a checkpoint's metadata is not echoed.
    let ckpt = root.path().join("meta.safetensors");
    let loaded =
        elbo::checkpoint::load(&vae.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let tensors: Vec<(String, candle_core::Tensor)> = loaded.tensors.into_iter().collect();
    let metadata = std::collections::HashMap::from([(
        "elbo.config".to_string(),
        format!("{{\"kind\": \"{}\"}}", "x".repeat(10 << 20)),
    )]);
    std::fs::write(
        &ckpt,
        elbo::checkpoint::serialize(&tensors, metadata).unwrap(),
    )
    .unwrap();
    let o = elbo(&[
        "sample",
        "vae",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        &out,
    ]);
    assert_one_line_error(&o, "elbo.config");
    assert!(
        stderr(&o).len() < 1000,
        "{} bytes of error",
        stderr(&o).len()
    );
}

/// The memory budget is the least of what the machine, the address-space limit (`ulimit -v`)
/// and the cgroup leave: 10^6 samples' grid (about 8.6 GB) fits this machine's memory but not
/// a 4 GB address space, and is refused up front naming --n.
#[test]
fn the_memory_budget_honours_the_address_space_limit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid.png");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 4000000 && exec {} sample vae --checkpoint tests/fixtures/simplevae_torch.safetensors --n 1000000 --out {}",
            env!("CARGO_BIN_EXE_elbo"),
            out.display()
        ))
        .output()
        .unwrap();
    assert_one_line_error(&o, "--n 1000000");
    assert!(stderr(&o).contains("of memory available"), "{}", stderr(&o));
    assert!(!out.exists());
}
