//! Helpers shared by the CLI test files: running the binary, one-line error checks, and
//! folders in the MNIST layout made from the built-in digits.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Output};

use elbo::data::idx::{encode_images, encode_labels};
use elbo::data::{Named, Source, Split};

const PIXELS: usize = 784;

pub fn elbo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_elbo"))
        .args(args)
        .output()
        .unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails unless the command failed with exactly one line on stderr that contains `needle`.
pub fn assert_one_line_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "expected one line, got:\n{err}"
    );
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A folder in the MNIST layout with the first `n_train` / `n_test` built-in digits
/// (images gzipped, labels raw), or without the train files when `n_train == 0`.
pub fn mnist_dir(n_train: usize, n_test: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: Vec<u8>, gz: bool| {
        let path = dir.path().join(if gz {
            format!("{name}.gz")
        } else {
            name.to_string()
        });
        let mut f = std::fs::File::create(path).unwrap();
        if gz {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&bytes).unwrap();
            f.write_all(&e.finish().unwrap()).unwrap();
        } else {
            f.write_all(&bytes).unwrap();
        }
    };
    let all = Source::Named(Named::Mnist10k).load(Split::Train).unwrap();
    let labels = all.labels.clone().unwrap();
    if n_train > 0 {
        write(
            "train-images-idx3-ubyte",
            encode_images(n_train, 28, 28, &all.images[..n_train * PIXELS]),
            true,
        );
        write(
            "train-labels-idx1-ubyte",
            encode_labels(&labels[..n_train]),
            false,
        );
    }
    let test = &all.images[n_train * PIXELS..(n_train + n_test) * PIXELS];
    write(
        "t10k-images-idx3-ubyte",
        encode_images(n_test, 28, 28, test),
        false,
    );
    write(
        "t10k-labels-idx1-ubyte",
        encode_labels(&labels[n_train..n_train + n_test]),
        true,
    );
    dir
}

/// Largest |a - b| over the largest |b|: a scale-free distance between two gradients.
pub fn relative_distance(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().map(|v| v.abs() as f64).fold(1e-12, f64::max);
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    diff / scale
}
