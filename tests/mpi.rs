//! Data parallelism over MPI processes (`--features mpi`; `scripts/test` installs OpenMPI and
//! runs these): N ranks compute what one process computes. Each test runs the `elbo` binary once
//! alone and once under `mpirun -np 2 --oversubscribe` (two ranks on this 2-core machine,
//! one rayon thread each).
//!
//! Tolerances, from the order of the sums: the gradients of two ranks are added in a
//! different order than one process adds its examples (rounding ~1e-7 relative), and Adam
//! turns each gradient into a step of about lr = 1e-3 that depends on it smoothly, so after 5
//! steps the parameters agree to 1e-5. Where a parameter's true gradient is zero (a bias
//! or time projection added per channel right before a GroupNorm, which removes the group's
//! mean), Adam turns the rounding noise itself into steps of about lr, in one process as in two:
//! those parameters are left out of the U-Net's comparison and named.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use elbo::checkpoint;

/// `mpirun -np N elbo ARGS` (as root where needed, one rayon thread per rank), killed after
/// `limit`; the second value says whether it finished in time.
fn mpirun(np: usize, args: &[&str], env: &[(&str, &str)], limit: Duration) -> (Output, bool) {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "-np", &np.to_string()])
        .arg(env!("CARGO_BIN_EXE_elbo"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .expect("mpirun (OpenMPI: apt-get install openmpi-bin libopenmpi-dev)");
    let started = Instant::now();
    let in_time = loop {
        if child.try_wait().expect("wait for mpirun").is_some() {
            break true;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (child.wait_with_output().expect("mpirun's output"), in_time)
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn alone(args: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_elbo"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    o
}

fn two_ranks(args: &[&str]) -> Output {
    let (o, in_time) = mpirun(2, args, &[], Duration::from_secs(300));
    assert!(in_time && o.status.success(), "{}", common::stderr(&o));
    o
}

/// The tensors of a checkpoint, flattened, by name.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let loaded = checkpoint::load(path, &Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = loaded
        .tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The largest |a - b| over the tensors `keep` accepts, and the tensor where it is.
fn max_diff(a: &Path, b: &Path, keep: impl Fn(&str) -> bool) -> (f32, String) {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(a.len(), b.len());
    let mut worst = (0f32, String::new());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        if !keep(na) {
            continue;
        }
        let d = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        if d > worst.0 {
            worst = (d, na.clone());
        }
    }
    worst
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const VAE: &[&str] = &[
    "train",
    "vae",
    "--train-limit",
    "100",
    "--test-limit",
    "50",
    "--batch-size",
    "20",
];

/// 5 steps of the VAE (100 digits, global batch 20) on two ranks give the parameters and
/// the train -ELBO one process gives; and a run of two ranks continues in one process
/// (`--resume` with another number of ranks) to what one process gives throughout.
#[test]
fn vae_on_two_ranks_trains_as_one_process() {
    let root = tempfile::tempdir().unwrap();
    let dir = |n: &str| root.path().join(n);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (one, two) = (dir("one"), dir("two"));
    let args = |epochs: &str, out: &Path, resume: bool| -> Vec<String> {
        let mut v: Vec<String> = VAE.iter().map(|s| s.to_string()).collect();
        v.extend(["--epochs".into(), epochs.into(), "--out".into(), s(out)]);
        if resume {
            v.push("--resume".into());
        }
        v
    };
    alone(&refs(&args("1", &one, false)));
    two_ranks(&refs(&args("1", &two, false)));
    let model = "model.safetensors";
    let (d, name) = max_diff(&one.join(model), &two.join(model), |_| true);
    assert!(
        d < 1e-5,
        "{name}: two ranks differ from one process by {d:e}"
    );
    let (m1, m2) = (metrics(&one), metrics(&two));
    let elbo = |m: &serde_json::Value| m["train"]["neg_elbo"].as_f64().unwrap();
    assert!(
        (elbo(&m1[0]) - elbo(&m2[0])).abs() < 1e-6 * elbo(&m1[0]),
        "train -ELBO {} vs {}",
        elbo(&m1[0]),
        elbo(&m2[0])
    );
    // The test -ELBO, sharded over the ranks (evaluate_elbo), agrees to the parameters'
    // rounding.
    let test = |m: &serde_json::Value| m["test"]["neg_elbo"].as_f64().unwrap();
    assert!(
        (test(&m1[0]) - test(&m2[0])).abs() < 1e-5 * test(&m1[0]),
        "test -ELBO {} vs {}",
        test(&m1[0]),
        test(&m2[0])
    );
    // Only rank 0 wrote: one line per epoch.
    assert_eq!(m2.len(), 1);

    // Two ranks for epoch 1, then one process for epoch 2, against one process for both.
    alone(&refs(&args("2", &one, true)));
    alone(&refs(&args("2", &two, true)));
    let (d, name) = max_diff(&one.join(model), &two.join(model), |_| true);
    assert!(
        d < 1e-5,
        "{name}: resumed with another rank count, off by {d:e}"
    );
    // And one process resumed on two ranks.
    alone(&refs(&args("3", &one, true)));
    two_ranks(&refs(&args("3", &two, true)));
    let (d, name) = max_diff(&one.join(model), &two.join(model), |_| true);
    assert!(d < 1e-5, "{name}: resumed on two ranks, off by {d:e}");
}

/// The same on candle's engine (tensors and autodiff; the path of the Gaussian and logistic
/// likelihoods and of other devices): every rank's gradients, flattened, all-reduced.
#[test]
fn vae_on_candles_engine_on_two_ranks_trains_as_one_process() {
    let root = tempfile::tempdir().unwrap();
    let (one, two) = (root.path().join("one"), root.path().join("two"));
    let args = |out: &Path| -> Vec<String> {
        let mut v: Vec<String> = VAE.iter().map(|s| s.to_string()).collect();
        v.extend(["--epochs", "1", "--engine", "candle", "--out"].map(String::from));
        v.push(out.to_str().unwrap().to_string());
        v
    };
    alone(&refs(&args(&one)));
    two_ranks(&refs(&args(&two)));
    let model = "model.safetensors";
    let (d, name) = max_diff(&one.join(model), &two.join(model), |_| true);
    assert!(
        d < 1e-5,
        "{name}: two ranks differ from one process by {d:e}"
    );
}

/// The XLA engine on two ranks (each its rows, gradients all-reduced on the host, the loop's
/// Adam) against one process (parameters and Adam resident on the device): the same model.
#[test]
fn vae_on_the_xla_engine_on_two_ranks_trains_as_one_process() {
    if elbo::engine::xla::runtime().is_err() {
        assert!(
            std::env::var_os("ELBO_REQUIRE_XLA").is_none(),
            "ELBO_REQUIRE_XLA is set but no PJRT plugin loads (scripts/xla-plugin)"
        );
        eprintln!("skipped: no PJRT plugin (scripts/xla-plugin)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (one, two) = (root.path().join("one"), root.path().join("two"));
    let args = |out: &Path| -> Vec<String> {
        let mut v: Vec<String> = VAE.iter().map(|s| s.to_string()).collect();
        v.extend(["--epochs", "1", "--engine", "xla", "--out"].map(String::from));
        v.push(out.to_str().unwrap().to_string());
        v
    };
    alone(&refs(&args(&one)));
    two_ranks(&refs(&args(&two)));
    let model = "model.safetensors";
    let (d, name) = max_diff(&one.join(model), &two.join(model), |_| true);
    assert!(
        d < 1e-5,
        "{name}: two ranks differ from one process by {d:e}"
    );
}

/// `train diffusion` of a DDPM-layout U-Net with attention and dropout: 5 steps (100 digits,
/// global batch 20), then `extra` flags.
fn unet_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "diffusion",
        "--epochs",
        "1",
        "--train-limit",
        "100",
        "--test-limit",
        "300",
        "--batch-size",
        "20",
        "--channels",
        "16",
        "--res-blocks",
        "1",
        "--attention-levels",
        "1",
        "--dropout",
        "0.1",
        "--sample-steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Convolution weights of the U-Net's training state: every one has a true gradient (see the
/// module comment).
fn conv_weight(n: &str) -> bool {
    n.starts_with("raw.")
        && n.ends_with(".weight")
        && !n.contains("time_emb")
        && !n.contains("norm")
}

/// One process and two ranks train the U-Net of [`unet_args`] to the same train loss (the
/// masks are drawn per example of the global batch, so both drop the same values) and the
/// same test loss (of the EMA weights, sharded over the ranks); returns the two training
/// states, and the folder that holds them.
fn unet_two_ranks_as_one(extra: &[&str]) -> (PathBuf, PathBuf, tempfile::TempDir) {
    let root = tempfile::tempdir().unwrap();
    let (one, two) = (root.path().join("one"), root.path().join("two"));
    alone(&refs(&unet_args(&one, extra)));
    two_ranks(&refs(&unet_args(&two, extra)));
    let loss = |dir: &Path| metrics(dir)[0]["train_loss"].as_f64().unwrap();
    let (l1, l2) = (loss(&one), loss(&two));
    assert!((l1 - l2).abs() < 1e-6 * l1, "train loss {l1} vs {l2}");
    let test = |dir: &Path| metrics(dir)[0]["test_loss"].as_f64().unwrap();
    let (t1, t2) = (test(&one), test(&two));
    assert!((t1 - t2).abs() < 1e-5 * t1, "test loss {t1} vs {t2}");
    let state = "train_state.safetensors";
    (one.join(state), two.join(state), root)
}

/// On the fused U-Net engine (the CPU's, whatever ELBO_DEVICE says), whose arithmetic per
/// example does not depend on the rows beside it: the same convolution weights to 1e-5.
#[test]
fn unet_on_two_ranks_trains_as_one_process() {
    let (one, two, _root) = unet_two_ranks_as_one(&["--device", "cpu"]);
    let (d, name) = max_diff(&one, &two, conv_weight);
    assert!(
        d < 1e-5,
        "{name}: two ranks differ from one process by {d:e}"
    );
}

/// On candle's engine (autodiff; the path of other devices): each rank differentiates its
/// rows of the batch, with its examples' dropout masks, and the gradients are all-reduced.
/// candle's convolutions of 10 rows and of 20 round differently (about 1e-7), and Adam's
/// normalised first steps blow that up in the few weights whose gradients are near zero, so
/// the weights are compared by quantiles (measured: median 6e-8, 99th percentile 3e-6, the
/// largest 3e-4 of a step of lr = 1e-3): a rank that ran the wrong rows or drew the wrong
/// masks moves most weights by about lr.
#[test]
fn unet_on_candles_engine_on_two_ranks_trains_as_one_process() {
    let (one, two, _root) = unet_two_ranks_as_one(&["--engine", "candle"]);
    let (a, b) = (tensors(&one), tensors(&two));
    let mut d: Vec<f32> = a
        .iter()
        .zip(&b)
        .filter(|((name, _), _)| conv_weight(name))
        .flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(x, y)| (x - y).abs()))
        .collect();
    d.sort_by(f32::total_cmp);
    let q = |p: f64| d[((d.len() - 1) as f64 * p) as usize];
    assert!(d.len() > 100_000, "{} convolution weights", d.len());
    assert!(
        q(0.5) < 1e-6 && q(0.99) < 1e-4 && q(1.0) < 1e-3,
        "two ranks differ from one process: median {:e}, 99th percentile {:e}, largest {:e}",
        q(0.5),
        q(0.99),
        q(1.0)
    );
}

/// Continuous time with a learned schedule on the fused engine: each rank's rows give their
/// share of the bound, of the network's gradient and of the schedule's (the endpoints' from
/// the bound, the shape's from the second moment), so two ranks train as one process: the
/// same losses (checked by the helper) and the same schedule parameters and convolution
/// weights to 1e-5.
#[test]
fn continuous_time_on_two_ranks_trains_as_one_process() {
    let (one, two, _root) = unet_two_ranks_as_one(&[
        "--device",
        "cpu",
        "--time",
        "continuous",
        "--gamma",
        "learned",
    ]);
    let (d, name) = max_diff(&one, &two, |n| {
        conv_weight(n) || n.starts_with("raw.gamma.")
    });
    assert!(
        d < 1e-5,
        "{name}: two ranks differ from one process by {d:e}"
    );
}

/// `eval vae` (importance-sampled NLL) and `eval diffusion` (the bound) shard the test set
/// over two ranks and report what one process reports.
#[test]
fn evaluation_on_two_ranks_reports_what_one_process_reports() {
    let root = tempfile::tempdir().unwrap();
    let run = root.path().join("vae");
    alone(&[VAE, &["--epochs", "1", "--out", run.to_str().unwrap()]].concat());
    let ckpt = run.join("model.safetensors");
    let eval = [
        "eval",
        "vae",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--limit",
        "50",
        "--iw-samples",
        "20",
        "--batch-size",
        "10",
        "--json",
    ];
    let json = |o: &Output| -> serde_json::Value {
        let text = String::from_utf8_lossy(&o.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "one report, from rank 0: {text}");
        serde_json::from_str(lines[0]).unwrap()
    };
    let (a, b) = (json(&alone(&eval)), json(&two_ranks(&eval)));
    for key in ["nll", "nll_stderr", "neg_elbo", "kl", "gap"] {
        let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-9 * x.abs(), "{key}: {x} vs {y}");
    }
    assert_eq!(a["active_units"], b["active_units"]);
    assert_eq!(b["n"], 50);

    let diff = root.path().join("unet");
    alone(&[
        "train",
        "diffusion",
        "--epochs",
        "1",
        "--train-limit",
        "40",
        "--test-limit",
        "8",
        "--channels",
        "8",
        "--sample-steps",
        "2",
        "--out",
        diff.to_str().unwrap(),
    ]);
    let ckpt = diff.join("model.safetensors");
    let eval = [
        "eval",
        "diffusion",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--limit",
        "6",
        "--batch-size",
        "2",
        "--json",
    ];
    let (a, b) = (json(&alone(&eval)), json(&two_ranks(&eval)));
    for key in ["bpd", "l0", "lt_sum", "lT"] {
        let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-9 * x.abs(), "{key}: {x} vs {y}");
    }
}

/// A rank that dies in the middle of training (ELBO_FAULT_RANK: rank 1 aborts at its third
/// step, as a crash would) ends the job within seconds, with mpirun naming the rank, instead
/// of leaving rank 0 waiting in its all-reduce.
#[test]
fn a_rank_that_dies_ends_the_job_with_a_message() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("run");
    let args = [VAE, &["--epochs", "1", "--out", out.to_str().unwrap()]].concat();
    let (o, in_time) = mpirun(
        2,
        &args,
        &[("ELBO_FAULT_RANK", "1@3")],
        Duration::from_secs(60),
    );
    let err = common::stderr(&o);
    assert!(in_time, "the job hung after rank 1 died: {err}");
    assert!(!o.status.success(), "the job succeeded without rank 1");
    assert!(
        err.contains("rank 1 dies") && err.contains("rank 1"),
        "no word of rank 1: {err}"
    );
    assert!(
        err.contains("process rank 1") || err.contains("rank 1 of 2"),
        "mpirun did not name the rank that died: {err}"
    );
}
