//! The readers of untrusted bytes, fuzzed for a bounded number of cases on every `cargo test`:
//! IDX (raw and gzip, images and labels), safetensors checkpoints with their metadata configs
//! (VAE and diffusion), diffusers folders' JSON configs, a run folder's commit (`commit.json`,
//! `metrics.jsonl`), NumPy `.npy` and `.npz`, CIFAR binary `.tar.gz` archives, and PNG files in
//! an image folder.
//!
//! Each case is a deterministic mutation of a valid input (bit flips, byte overwrites with
//! boundary values, truncation, insertion, extension, and for configs numbers replaced by
//! boundary values). Every case must return (Ok or Err) without a panic, without an abort, and
//! with its peak heap use bounded: a counting allocator measures it, and refuses any single
//! allocation above 1 GiB, so a reader that trusts a size it was given aborts the test.
//! `ELBO_MEMORY_LIMIT` is 64 MiB here, so every size check is exercised. A failing case is
//! written to `target/fuzz-failures/` to be replayed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
const MAX_ALLOCATION: usize = 1 << 30;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = CURRENT.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size
                    - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One fuzz target at a time: the peak is measured per case.
static SERIAL: Mutex<()> = Mutex::new(());
const BUDGET: usize = 64 << 20;

/// Runs `cases` mutations of `seed` through `read`; fails on a panic or on a case whose peak
/// heap use exceeds twice the memory budget plus 16 bytes per input byte.
fn fuzz(
    name: &str,
    seed: &[u8],
    cases: usize,
    mutate: fn(&mut StdRng, &[u8]) -> Vec<u8>,
    read: &dyn Fn(&[u8]),
) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: every test of this binary holds SERIAL while it reads the environment.
    unsafe { std::env::set_var("ELBO_MEMORY_LIMIT", BUDGET.to_string()) };
    let mut rng = StdRng::seed_from_u64(0xf022 ^ name.len() as u64);
    // The unmutated input first: it must be read without a panic too.
    let mut inputs = vec![seed.to_vec()];
    for _ in 0..cases {
        inputs.push(mutate(&mut rng, seed));
    }
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for (i, input) in inputs.iter().enumerate() {
        let base = CURRENT.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(input)));
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        let bound = 2 * BUDGET + 16 * input.len();
        if result.is_err() || peak > bound {
            std::panic::set_hook(hook);
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("{name}-{i}.bin"));
            let _ = std::fs::write(&file, input);
            panic!(
                "{name} case {i}: {} (peak {peak} bytes, bound {bound}); input in {}",
                if result.is_err() {
                    "panicked"
                } else {
                    "used too much memory"
                },
                file.display()
            );
        }
    }
    std::panic::set_hook(hook);
}

const BOUNDARY: [u8; 8] = [0x00, 0x01, 0x07, 0x7f, 0x80, 0xfe, 0xff, 0x1c];

/// Byte-level mutations, 1 to 8 per case; the first 32 bytes (headers) are hit most.
fn mutate_bytes(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..rng.random_range(1..=8) {
        let at = |rng: &mut StdRng, len: usize| {
            if len == 0 {
                0
            } else if rng.random_bool(0.6) {
                rng.random_range(0..len.min(32))
            } else {
                rng.random_range(0..len)
            }
        };
        match rng.random_range(0..6) {
            0 if !v.is_empty() => {
                let i = at(rng, v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !v.is_empty() => {
                let i = at(rng, v.len());
                v[i] = BOUNDARY[rng.random_range(0..BOUNDARY.len())];
            }
            2 => {
                let n = rng.random_range(0..=v.len());
                v.truncate(n);
            }
            3 => {
                let i = at(rng, v.len());
                let n = rng.random_range(1..16);
                for _ in 0..n {
                    v.insert(i.min(v.len()), rng.random());
                }
            }
            4 => {
                let n = rng.random_range(1..64);
                v.extend((0..n).map(|_| rng.random::<u8>()));
            }
            _ if v.len() >= 4 => {
                // A big-endian or little-endian u32 field set to a boundary value.
                let i = at(rng, v.len() - 3);
                let x: u32 = [0, 1, 28, 0x7fff_ffff, 0x8000_0000, u32::MAX][rng.random_range(0..6)];
                let b = if rng.random_bool(0.5) {
                    x.to_be_bytes()
                } else {
                    x.to_le_bytes()
                };
                v[i..i + 4].copy_from_slice(&b);
            }
            _ => {}
        }
    }
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Gzip inputs: mutate the compressed bytes, or compress a mutated IDX file, or split it into
/// several members.
fn mutate_gz(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let raw = elbo::data::idx::encode_images(2, 28, 28, &[7u8; 2 * 784]);
    match rng.random_range(0..3) {
        0 => mutate_bytes(rng, seed),
        1 => gzip(&mutate_bytes(rng, &raw)),
        _ => {
            let cut = rng.random_range(0..raw.len());
            let mut v = gzip(&raw[..cut]);
            v.extend(gzip(&raw[cut..]));
            mutate_bytes(rng, &v)
        }
    }
}

fn idx_images() -> Vec<u8> {
    let px: Vec<u8> = (0..3 * 784).map(|i| (i * 7 % 256) as u8).collect();
    elbo::data::idx::encode_images(3, 28, 28, &px)
}

#[test]
fn idx_images_and_labels_raw() {
    let p = Path::new("fuzz.idx");
    fuzz("idx-images", &idx_images(), 3000, mutate_bytes, &|b| {
        let _ = elbo::data::idx::parse_images(b, p);
    });
    fuzz(
        "idx-labels",
        &elbo::data::idx::encode_labels(&[1, 2, 3, 4]),
        1000,
        mutate_bytes,
        &|b| {
            let _ = elbo::data::idx::parse_labels(b, p);
        },
    );
}

#[test]
fn idx_gzip() {
    let p = Path::new("fuzz.idx.gz");
    fuzz("idx-gz", &gzip(&idx_images()), 1500, mutate_gz, &|b| {
        let _ = elbo::data::idx::parse_images(b, p);
    });
}

/// A file on disk read through the same path the CLI uses (raw or gzip).
#[test]
fn idx_files_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t10k-images-idx3-ubyte");
    fuzz("idx-file", &gzip(&idx_images()), 300, mutate_gz, &|b| {
        std::fs::write(&path, b).unwrap();
        let _ = elbo::data::idx::read_images(&path);
    });
}

fn vae_checkpoint() -> Vec<u8> {
    let config = elbo::vae::VaeConfig::mlp(784, 4, 2);
    let vae = elbo::vae::Vae::new(
        config,
        &mut elbo::distributions::Noise::new(0),
        &Device::Cpu,
    )
    .unwrap();
    vae.to_safetensors().unwrap()
}

#[test]
fn vae_checkpoints() {
    let p = Path::new("fuzz.safetensors");
    fuzz(
        "vae-safetensors",
        &vae_checkpoint(),
        1500,
        mutate_bytes,
        &|b| {
            if let Ok(loaded) = elbo::checkpoint::decode(b, p, &Device::Cpu) {
                let _ = elbo::vae::Vae::from_loaded(loaded, p);
            }
        },
    );
}

/// A diffusion checkpoint (toy MLP) whose `elbo.config` JSON has one or more numbers or arrays
/// replaced by boundary values, or whose bytes are mutated.
fn mutate_config(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    if rng.random_bool(0.3) {
        return mutate_bytes(rng, seed);
    }
    let loaded = elbo::checkpoint::decode(seed, Path::new("seed"), &Device::Cpu).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&loaded.metadata["elbo.config"]).unwrap();
    let values = [
        serde_json::json!(0),
        serde_json::json!(1),
        serde_json::json!(3),
        serde_json::json!(4294967296u64),
        serde_json::json!(18446744073709551615u64),
        serde_json::json!(1000000000000u64),
        serde_json::json!(-1),
        serde_json::json!(1.5),
        serde_json::json!([]),
        serde_json::json!([0]),
        serde_json::json!([1, 2, 2, 2, 2]),
        serde_json::json!("unet"),
        serde_json::json!(null),
    ];
    fn leaves(v: &mut serde_json::Value, out: &mut Vec<*mut serde_json::Value>) {
        out.push(v as *mut _);
        match v {
            serde_json::Value::Object(m) => m.values_mut().for_each(|c| leaves(c, out)),
            serde_json::Value::Array(a) => a.iter_mut().for_each(|c| leaves(c, out)),
            _ => {}
        }
    }
    for _ in 0..rng.random_range(1..=3) {
        let mut all = Vec::new();
        // The network's sizes most of the time, anything else otherwise.
        if rng.random_bool(0.7) {
            leaves(&mut config["net"], &mut all);
            all.insert(0, std::ptr::null_mut()); // index 0 is never picked: keep "net" itself
        } else {
            leaves(&mut config, &mut all);
        }
        let pick = all[rng.random_range(1..all.len())];
        // SAFETY: `pick` points into `config`, which is not otherwise borrowed here.
        unsafe { *pick = values[rng.random_range(0..values.len())].clone() };
    }
    let mut metadata = loaded.metadata.clone();
    metadata.insert("elbo.config".into(), config.to_string());
    let tensors: Vec<(String, candle_core::Tensor)> = loaded.tensors.into_iter().collect();
    elbo::checkpoint::serialize(&tensors, metadata).unwrap()
}

fn diffusion_checkpoint(net: elbo::diffusion::nets::NetConfig) -> Vec<u8> {
    use elbo::diffusion::nets::Net;
    let (_, varmap) =
        Net::trainable(&net, &mut elbo::distributions::Noise::new(0), &Device::Cpu).unwrap();
    let config = elbo::diffusion::model::DiffusionConfig {
        net,
        beta_schedule: elbo::diffusion::BetaSchedule::Linear,
        num_train_timesteps: 10,
        prediction: elbo::diffusion::Prediction::Eps,
        image_shape: None,
        betas: None,
        model_times: None,
        variance: None,
        continuous: None,
    };
    let tensors: Vec<(String, candle_core::Tensor)> = elbo::diffusion::nets::sorted_vars(&varmap)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let metadata = std::collections::HashMap::from([
        ("elbo.model".to_string(), "diffusion".to_string()),
        (
            "elbo.config".to_string(),
            serde_json::to_string(&config).unwrap(),
        ),
    ]);
    elbo::checkpoint::serialize(&tensors, metadata).unwrap()
}

#[test]
fn diffusion_checkpoints_and_their_configs() {
    use elbo::diffusion::nets::NetConfig;
    let p = Path::new("fuzz.safetensors");
    let read = |b: &[u8]| {
        if let Ok(loaded) = elbo::checkpoint::decode(b, p, &Device::Cpu) {
            let _ = elbo::diffusion::model::LoadedDiffusion::from_loaded(loaded, p, &Device::Cpu);
        }
    };
    let mlp = NetConfig::Mlp {
        dim: 2,
        hidden: 8,
        layers: 2,
        time_dim: 4,
    };
    fuzz(
        "diffusion-mlp",
        &diffusion_checkpoint(mlp),
        1000,
        mutate_config,
        &read,
    );
    let unet = NetConfig::Unet {
        base: 4,
        channel_mult: vec![1, 2],
        groups: 2,
        attention: true,
        in_channels: 1,
        res_blocks: Some(1),
        attention_levels: vec![1],
        dropout: 0.1,
        options: elbo::diffusion::nets::UnetOptions::default(),
    };
    fuzz(
        "diffusion-unet",
        &diffusion_checkpoint(unet),
        2000,
        mutate_config,
        &read,
    );
}

/// A committed run folder whose `commit.json` or `metrics.jsonl` is mutated: `--resume`
/// either accepts it (the digests still match) or refuses it, never panics.
#[test]
fn run_folder_commits() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut r = elbo::run_dir::RunDir::create(&run).unwrap();
    let metrics = |e: usize| format!("{{\"epoch\":{e},\"loss\":1.5}}");
    r.commit(
        1,
        10,
        &[
            ("model.safetensors", b"m1"),
            ("train_state.safetensors", b"s1"),
            ("config.json", b"{}"),
        ],
        &metrics(1),
    )
    .unwrap();
    r.commit(
        2,
        20,
        &[
            ("model.safetensors", b"m2"),
            ("train_state.safetensors", b"s2"),
            ("config.json", b"{}"),
        ],
        &metrics(2),
    )
    .unwrap();
    let commit = run.join("commits/000002");
    let manifest = std::fs::read(commit.join("commit.json")).unwrap();
    let lines = std::fs::read(commit.join("metrics.jsonl")).unwrap();
    assert!(elbo::run_dir::RunDir::resume(&run).is_ok());
    fuzz("commit-json", &manifest, 400, mutate_bytes, &|b| {
        std::fs::write(commit.join("commit.json"), b).unwrap();
        let _ = elbo::run_dir::RunDir::resume(&run);
    });
    std::fs::write(commit.join("commit.json"), &manifest).unwrap();
    fuzz("metrics-jsonl", &lines, 400, mutate_bytes, &|b| {
        std::fs::write(commit.join("metrics.jsonl"), b).unwrap();
        let _ = elbo::run_dir::RunDir::resume(&run);
    });
}

/// Findings of issue 9 on gzip, kept fixed: the header is checked before the data is inflated;
/// multi-member files are read whole; bytes after the gzip stream are refused.
#[test]
fn gzip_header_first_multi_member_and_trailing_bytes() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let p = Path::new("x.gz");
    let raw = idx_images();
    // A wrong magic number in front of 256 MiB of zeros (a 260 KB file): refused after
    // inflating 4 bytes, not 256 MiB.
    let mut bomb = vec![0x00, 0x00, 0x08, 0x04];
    bomb.resize(256 << 20, 0);
    let bomb = gzip(&bomb);
    drop(std::mem::take(&mut Vec::<u8>::new()));
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let e = elbo::data::idx::parse_images(&bomb, p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("wrong magic number"), "{e}");
    let peak = PEAK.load(Ordering::Relaxed) - base;
    assert!(
        peak < 4 << 20,
        "inflated {peak} bytes to check a 4-byte magic number"
    );
    // A header declaring 3 images followed by 256 MiB more: refused as trailing bytes with the
    // data bounded by the header (3 x 784) plus the counting buffer.
    let mut long = raw.clone();
    long.resize(raw.len() + (256 << 20), 0);
    let long = gzip(&long);
    PEAK.store(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed);
    let base = CURRENT.load(Ordering::Relaxed);
    let e = elbo::data::idx::parse_images(&long, p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("trailing bytes"), "{e}");
    assert!(PEAK.load(Ordering::Relaxed) - base < 4 << 20);
    // Two members (what `cat a.gz b.gz` makes; `gzip -t` accepts it) read as one file.
    let mut two = gzip(&raw[..1000]);
    two.extend(gzip(&raw[1000..]));
    let img = elbo::data::idx::parse_images(&two, p).unwrap();
    assert_eq!(img.pixels, &raw[16..]);
    // Garbage after the gzip stream.
    let mut trailing = gzip(&raw);
    trailing.extend_from_slice(b"garbage");
    let e = elbo::data::idx::parse_images(&trailing, p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("after the end of the gzip stream"), "{e}");
    let mut zeros = gzip(&raw);
    zeros.extend_from_slice(&[0; 8]);
    assert!(elbo::data::idx::parse_images(&zeros, p).is_err());
    // A header that claims more than the memory budget, in a small gzip file.
    let mut claim = elbo::data::idx::encode_images(1, 28, 28, &[0; 784]);
    claim[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    let e = elbo::data::idx::parse_images(&gzip(&claim), p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than the"), "{e}");
}

#[test]
fn npy_and_npz() {
    let images = elbo::data::npy::encode("|u1", &[2, 4, 4, 3], &[5u8; 96]);
    fuzz("npy", &images, 1500, mutate_bytes, &|b| {
        if let Ok(a) = elbo::data::npy::parse(b, "fuzz.npy") {
            let _ = elbo::data::npy::images(&a, "fuzz.npy");
            let _ = elbo::data::npy::labels(&a, 2, "fuzz.npy");
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.npz");
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, bytes) in [
        ("x_train.npy", images.clone()),
        (
            "y_train.npy",
            elbo::data::npy::encode("<i8", &[2], &[1u8; 16]),
        ),
    ] {
        zip.start_file(name, zip::write::SimpleFileOptions::default())
            .unwrap();
        std::io::Write::write_all(&mut zip, &bytes).unwrap();
    }
    let seed = zip.finish().unwrap().into_inner();
    fuzz("npz", &seed, 500, mutate_bytes, &|b| {
        std::fs::write(&path, b).unwrap();
        let _ = elbo::data::load_path(&path, elbo::data::Split::Train);
    });
    // The streaming reader of an .npz member (issue 33): bounded by the header it reads.
    fuzz("npy-stream", &images, 1000, mutate_bytes, &|b| {
        let _ = elbo::data::npy::read_bounded(std::io::Cursor::new(b), "fuzz.npy");
    });
}

/// The report's readers of a run folder (issue 33): `metrics.jsonl` streamed line by line and
/// `config.json`, mutated; a page or one error, never a panic, memory bounded.
#[test]
fn report_metrics_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let config = br#"{"model":{"input_dim":784,"latent_dims":[2]},"train":{"epochs":2},"data":{}}"#;
    let metrics = concat!(
        r#"{"epoch":1,"train":{"neg_elbo":200.5,"reconstruction":190.1,"kl":10.4,"kl_layers":[10.4]},"test":null,"lr":0.001,"seconds":0.5}"#,
        "\n",
        r#"{"epoch":2,"train":{"neg_elbo":150.5,"reconstruction":140.1,"kl":10.4,"kl_layers":[10.4]},"test":{"neg_elbo":151.0,"reconstruction":141.0,"kl":10.0,"kl_layers":[10.0]},"lr":0.001,"seconds":0.5}"#,
        "\n"
    );
    std::fs::write(run.join("config.json"), config).unwrap();
    std::fs::write(run.join("metrics.jsonl"), metrics).unwrap();
    let page = elbo::report::build(run).unwrap();
    assert!(page.contains("<svg"), "the unmutated run draws its curves");
    fuzz(
        "report-metrics",
        metrics.as_bytes(),
        300,
        mutate_bytes,
        &|b| {
            std::fs::write(run.join("metrics.jsonl"), b).unwrap();
            let _ = elbo::report::build(run);
        },
    );
    std::fs::write(run.join("metrics.jsonl"), metrics).unwrap();
    fuzz("report-config", config, 300, mutate_bytes, &|b| {
        std::fs::write(run.join("config.json"), b).unwrap();
        let _ = elbo::report::build(run);
    });
}

/// A CIFAR-10 archive whose member sizes are wrong (so no 30 MB members are needed): the
/// reader must refuse every mutation of it without a panic.
#[test]
fn cifar_tar_gz() {
    let mut tar = tar::Builder::new(Vec::new());
    for name in [
        "cifar-10-batches-bin/batches.meta.txt",
        "cifar-10-batches-bin/test_batch.bin",
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, &[3u8; 64][..]).unwrap();
    }
    let seed = gzip(&tar.into_inner().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cifar-10-binary.tar.gz");
    fuzz("cifar", &seed, 400, mutate_gz_or_bytes, &|b| {
        std::fs::write(&path, b).unwrap();
        let _ = elbo::data::load_path(&path, elbo::data::Split::Test);
    });
}

/// Mutations of a gzip file's bytes, or of what it holds.
fn mutate_gz_or_bytes(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    if rng.random_bool(0.5) {
        return mutate_bytes(rng, seed);
    }
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(seed), &mut raw).unwrap();
    gzip(&mutate_bytes(rng, &raw))
}

/// Image files in an image folder: mutated PNGs, decoded under the reader's limits.
#[test]
fn image_folder_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("train/a");
    std::fs::create_dir_all(&class).unwrap();
    let mut png = Vec::new();
    image::RgbImage::from_fn(6, 5, |x, y| image::Rgb([x as u8, y as u8, 7]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let path = class.join("0.png");
    fuzz("png", &png, 400, mutate_bytes, &|b| {
        std::fs::write(&path, b).unwrap();
        let _ = elbo::data::load_path(dir.path(), elbo::data::Split::Train);
    });
}

/// JSON-level mutations of a JSON file (1 to 3 values replaced by boundary values, lists and
/// strings), or byte-level ones a third of the time.
fn mutate_json(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    if rng.random_bool(0.3) {
        return mutate_bytes(rng, seed);
    }
    let mut v: serde_json::Value = serde_json::from_slice(seed).unwrap();
    let values = [
        serde_json::json!(0),
        serde_json::json!(1),
        serde_json::json!(3),
        serde_json::json!(16777216),
        serde_json::json!(18446744073709551615u64),
        serde_json::json!(-1),
        serde_json::json!(1e300),
        serde_json::json!(0.5),
        serde_json::json!([]),
        serde_json::json!([0]),
        serde_json::json!([1, 2, 2, 2, 2, 2, 2]),
        serde_json::json!("AttnUpBlock2D"),
        serde_json::json!(true),
        serde_json::json!(null),
    ];
    fn leaves(v: &mut serde_json::Value, out: &mut Vec<*mut serde_json::Value>) {
        out.push(v as *mut _);
        match v {
            serde_json::Value::Object(m) => m.values_mut().for_each(|c| leaves(c, out)),
            serde_json::Value::Array(a) => a.iter_mut().for_each(|c| leaves(c, out)),
            _ => {}
        }
    }
    for _ in 0..rng.random_range(1..=3) {
        let mut all = Vec::new();
        leaves(&mut v, &mut all);
        let pick = all[rng.random_range(1..all.len())];
        // SAFETY: `pick` points into `v`, which is not otherwise borrowed here.
        unsafe { *pick = values[rng.random_range(0..values.len())].clone() };
    }
    v.to_string().into_bytes()
}

/// A diffusers pipeline folder (`tests/fixtures/diffusers_ddpm_tiny`) whose `model_index.json`,
/// `unet/config.json` or `scheduler/scheduler_config.json` is mutated: the loader accepts it
/// or refuses it, never panics.
#[test]
fn diffusers_folder_configs() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers_ddpm_tiny");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pipe");
    for sub in ["unet", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let files = [
        ("model_index.json", 100),
        ("unet/config.json", 400),
        ("scheduler/scheduler_config.json", 200),
    ];
    for f in files
        .iter()
        .map(|(f, _)| *f)
        .chain(["unet/diffusion_pytorch_model.safetensors"])
    {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    for (file, cases) in files {
        let seed = std::fs::read(fixture.join(file)).unwrap();
        let path = dir.join(file);
        let read = |b: &[u8]| {
            std::fs::write(&path, b).unwrap();
            let _ = elbo::interop::diffusers::load(&dir, &Device::Cpu);
        };
        let name = format!("diffusers-{}", file.replace('/', "-"));
        fuzz(&name, &seed, cases, mutate_json, &read);
        std::fs::write(&path, &seed).unwrap();
    }
}

/// A `torch.save` zip with its `data.pkl` mutated (the other entries as they were), written
/// back with stored entries as torch.save writes them.
fn mutate_pickle(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(seed)).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).unwrap();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        if entry.name().ends_with("data.pkl") {
            bytes = mutate_bytes(rng, &bytes);
        }
        out.start_file(entry.name(), opts).unwrap();
        out.write_all(&bytes).unwrap();
    }
    out.finish().unwrap().into_inner()
}

/// improved-diffusion checkpoints: the `torch.save` reader (candle's pickle interpreter behind
/// elbo's size checks) on mutated archives and mutated pickles inside intact archives.
#[test]
fn torch_save_state_dicts() {
    let seed = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_state_dict_tiny.pt"),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.pt");
    std::fs::write(&path, &seed).unwrap();
    let tensors = elbo::interop::pickle::read_state_dict(&path).unwrap();
    assert_eq!(tensors.len(), 4);
    // The transposed tensor reads as PyTorch shows it: arange(6).reshape(2, 3).t().
    let t = tensors["c.t"].to_dtype(candle_core::DType::F32).unwrap();
    assert_eq!(
        t.to_vec2::<f32>().unwrap(),
        vec![vec![0.0, 3.0], vec![1.0, 4.0], vec![2.0, 5.0]]
    );
    let read = |b: &[u8]| {
        std::fs::write(&path, b).unwrap();
        let _ = elbo::interop::pickle::read_state_dict(&path);
    };
    fuzz("torch-save-zip", &seed, 200, mutate_bytes, &read);
    fuzz("torch-save-pickle", &seed, 600, mutate_pickle, &read);
}
