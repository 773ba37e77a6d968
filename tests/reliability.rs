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

/// The number of file-system steps an uninterrupted run takes (from `ELBO_FAULT_TRACE`).
fn count_steps(args: &[&str], out: &Path) -> usize {
    let o = elbo_env(
        &[args, &["--out", out.to_str().unwrap()]].concat(),
        &[("ELBO_FAULT_TRACE", "1".into())],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    stderr(&o)
        .lines()
        .filter(|l| l.starts_with("fs step"))
        .count()
}

/// For every file-system step of an uninterrupted `args` run (`epochs` epochs): stop the run
/// there (`kind` = kill: abort, no clean-up; enospc: the step fails), then continue it as a
/// user would, and compare the result with the uninterrupted run's.
fn every_step_resumes_identically(args: &[&str], epochs: usize, kind: &str, stride: usize) {
    let root = tempfile::tempdir().unwrap();
    let reference = root.path().join("reference");
    let steps = count_steps(args, &reference);
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
        assert!(
            !o.status.success(),
            "step {k}: the {kind} fault did not stop the run"
        );
        if kind == "enospc" {
            // Progress lines, then the error: one line naming the file or step.
            let err = stderr(&o);
            let last = err.trim_end().lines().last().unwrap_or("");
            assert_eq!(o.status.code(), Some(1), "step {k}: {err}");
            assert!(
                last.starts_with("error: epoch") && last.contains("No space left on device"),
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
        "1000000000",
        "--limit",
        "1",
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
    // instead of hanging it for the billion samples.
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
