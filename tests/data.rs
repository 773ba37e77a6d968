//! The data readers on small fixtures built here (image folders, NumPy files, CIFAR archives,
//! IDX of any size), their one-line refusals, `--data PATH` recognition, models on colour
//! images end to end, and the real data sets of `../shared/data/` when they are present.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::{assert_one_line_error, elbo, stderr};
use elbo::data::{ImageShape, Split, load_path, npy};

/// A pattern pixel value for image `i`, channel `c`, row `y`, column `x`.
fn px(i: usize, c: usize, y: usize, x: usize) -> u8 {
    (i * 37 + c * 71 + y * 13 + x * 5) as u8
}

/// Writes `n` images of `shape` as PNG files `DIR/<split>/<class>/<k>.png`, classes `a`, `b`
/// alternating; returns the folder.
fn image_folder(n: usize, shape: ImageShape) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for split in ["train", "test"] {
        for i in 0..n {
            let class = if i % 2 == 0 { "a" } else { "b" };
            let folder = dir.path().join(split).join(class);
            std::fs::create_dir_all(&folder).unwrap();
            let (w, h) = (shape.width as u32, shape.height as u32);
            let path = folder.join(format!("{i:04}.png"));
            if shape.channels == 1 {
                image::GrayImage::from_fn(w, h, |x, y| {
                    image::Luma([px(i, 0, y as usize, x as usize)])
                })
                .save(&path)
                .unwrap();
            } else {
                image::RgbImage::from_fn(w, h, |x, y| {
                    image::Rgb([0, 1, 2].map(|c| px(i, c, y as usize, x as usize)))
                })
                .save(&path)
                .unwrap();
            }
        }
    }
    dir
}

/// The planar pixels the pattern gives for image `i`.
fn planar(i: usize, shape: ImageShape) -> Vec<u8> {
    let mut v = Vec::new();
    for c in 0..shape.channels {
        for y in 0..shape.height {
            for x in 0..shape.width {
                v.push(px(i, c, y, x));
            }
        }
    }
    v
}

const RGB8: ImageShape = ImageShape {
    channels: 3,
    height: 8,
    width: 8,
};

#[test]
fn image_folder_gives_planar_pixels_and_sorted_class_labels() {
    let dir = image_folder(6, RGB8);
    let d = load_path(dir.path(), Split::Train).unwrap();
    assert_eq!(d.shape, RGB8);
    assert_eq!(d.len(), 6);
    // Sorted by class, then by file name: a = images 0, 2, 4; b = 1, 3, 5.
    assert_eq!(d.labels.as_deref(), Some(&[0, 0, 0, 1, 1, 1][..]));
    let order = [0, 2, 4, 1, 3, 5];
    for (k, &i) in order.iter().enumerate() {
        assert_eq!(
            &d.images[k * 192..(k + 1) * 192],
            planar(i, RGB8).as_slice(),
            "image {i}"
        );
    }
    let grey = ImageShape {
        channels: 1,
        height: 5,
        width: 7,
    };
    let g = load_path(image_folder(2, grey).path(), Split::Test).unwrap();
    assert_eq!(g.shape, grey);
    assert_eq!(&g.images[..35], planar(0, grey).as_slice());
}

#[test]
fn image_folder_refuses_an_odd_image_naming_it() {
    let dir = image_folder(6, RGB8);
    let odd = dir.path().join("train/b/0003.png");
    image::RgbImage::new(9, 8).save(&odd).unwrap();
    let e = load_path(dir.path(), Split::Train).unwrap_err().to_string();
    assert!(e.contains("0003.png") && e.contains("3 x 8 x 9"), "{e}");
    image::GrayImage::new(8, 8).save(&odd).unwrap();
    let e = load_path(dir.path(), Split::Train).unwrap_err().to_string();
    assert!(e.contains("0003.png") && e.contains("1 x 8 x 8"), "{e}");
    std::fs::write(&odd, b"not a png").unwrap();
    let e = load_path(dir.path(), Split::Train).unwrap_err().to_string();
    assert!(e.contains("0003.png"), "{e}");
    // The first of several bad files is named.
    std::fs::write(dir.path().join("train/a/0002.png"), b"bad").unwrap();
    let e = load_path(dir.path(), Split::Train).unwrap_err().to_string();
    assert!(e.contains("0002.png"), "{e}");
}

fn npz(members: &[(&str, Vec<u8>)]) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".npz").tempfile().unwrap();
    let mut zip = zip::ZipWriter::new(std::fs::File::create(file.path()).unwrap());
    for (name, bytes) in members {
        zip.start_file(
            format!("{name}.npy"),
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
    file
}

#[test]
fn npz_and_npy_in_nhwc_and_nchw() {
    let n = 3;
    let nchw: Vec<u8> = (0..n).flat_map(|i| planar(i, RGB8)).collect();
    let mut nhwc = vec![0u8; nchw.len()];
    for i in 0..n {
        for c in 0..3 {
            for p in 0..64 {
                nhwc[i * 192 + p * 3 + c] = nchw[i * 192 + c * 64 + p];
            }
        }
    }
    let labels: Vec<u8> = [4i64, 1, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
    let f = npz(&[
        ("x_train", npy::encode("|u1", &[n, 8, 8, 3], &nhwc)),
        ("y_train", npy::encode("<i8", &[n], &labels)),
        ("x_test", npy::encode("|u1", &[n, 3, 8, 8], &nchw)),
    ]);
    let train = load_path(f.path(), Split::Train).unwrap();
    let test = load_path(f.path(), Split::Test).unwrap();
    assert_eq!((train.shape, test.shape), (RGB8, RGB8));
    assert_eq!(train.images, nchw);
    assert_eq!(test.images, nchw);
    assert_eq!(train.labels.as_deref(), Some(&[4, 1, 9][..]));
    assert_eq!(test.labels, None);
    // A lone .npy serves both splits; a float array is refused naming its dtype.
    let lone = tempfile::Builder::new().suffix(".npy").tempfile().unwrap();
    std::fs::write(lone.path(), npy::encode("|u1", &[n, 8, 8, 3], &nhwc)).unwrap();
    assert_eq!(load_path(lone.path(), Split::Test).unwrap().images, nchw);
    std::fs::write(lone.path(), npy::encode("<f4", &[1, 2, 2], &[0; 16])).unwrap();
    let e = load_path(lone.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("<f4"), "{e}");
    let f = npz(&[("images", npy::encode("|u1", &[2, 4, 4], &[7; 32]))]);
    assert_eq!(load_path(f.path(), Split::Test).unwrap().len(), 2);
    let f = npz(&[("other", npy::encode("|u1", &[2, 4, 4], &[7; 32]))]);
    let e = load_path(f.path(), Split::Train).unwrap_err().to_string();
    assert!(e.contains("x_train") && e.contains("other.npy"), "{e}");
}

/// A CIFAR-10 binary archive whose records carry the pattern; `short` shortens test_batch.bin.
fn cifar_archive(dir: &Path, short: bool) -> PathBuf {
    let path = dir.join("cifar-10-binary.tar.gz");
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    let shape = ImageShape {
        channels: 3,
        height: 32,
        width: 32,
    };
    let members = (1..=5)
        .map(|i| format!("data_batch_{i}.bin"))
        .chain(["test_batch.bin".to_string()]);
    for (m, name) in members.enumerate() {
        let mut bytes = Vec::with_capacity(10_000 * 3073);
        for r in 0..10_000 {
            bytes.push(((m * 10_000 + r) % 10) as u8);
            // Only the first record of a member carries the pattern; the rest are zeros.
            if r == 0 {
                bytes.extend(planar(m, shape));
            } else {
                bytes.extend(std::iter::repeat_n(0u8, 3072));
            }
        }
        if short && name == "test_batch.bin" {
            bytes.truncate(bytes.len() - 3073);
        }
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(
            &mut header,
            format!("cifar-10-batches-bin/{name}"),
            bytes.as_slice(),
        )
        .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    path
}

#[test]
fn cifar_binary_archive_is_read_in_place_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = cifar_archive(dir.path(), false);
    let shape = ImageShape {
        channels: 3,
        height: 32,
        width: 32,
    };
    let train = load_path(&path, Split::Train).unwrap();
    assert_eq!((train.len(), train.shape), (50_000, shape));
    for m in 0..5 {
        let k = m * 10_000;
        assert_eq!(
            &train.images[k * 3072..(k + 1) * 3072],
            planar(m, shape).as_slice()
        );
    }
    assert_eq!(&train.labels.as_ref().unwrap()[..3], &[0, 1, 2]);
    let test = load_path(&path, Split::Test).unwrap();
    assert_eq!(test.len(), 10_000);
    assert_eq!(&test.images[..3072], planar(5, shape).as_slice());
    let bad = tempfile::tempdir().unwrap();
    let path = cifar_archive(bad.path(), true);
    let e = load_path(&path, Split::Test).unwrap_err().to_string();
    assert!(
        e.contains("test_batch.bin") && e.contains("30726927"),
        "{e}"
    );
    assert!(
        !bad.path().join("cifar-10-batches-bin").exists(),
        "extracted to disk"
    );
}

#[test]
fn idx_of_any_image_size() {
    let dir = tempfile::tempdir().unwrap();
    let images = elbo::data::idx::encode_images(3, 5, 7, &[9u8; 105]);
    std::fs::write(dir.path().join("t10k-images-idx3-ubyte"), images).unwrap();
    let d = load_path(dir.path(), Split::Test).unwrap();
    assert_eq!(
        d.shape,
        ImageShape {
            channels: 1,
            height: 5,
            width: 7
        }
    );
    let e = load_path(Path::new("/"), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(e.contains("neither the MNIST layout"), "{e}");
}

/// A VAE and a diffusion model train, sample and evaluate on colour images of a new size, and
/// their pictures are colour PNGs of that size.
#[test]
fn colour_images_end_to_end() {
    let data = image_folder(16, RGB8);
    let out = tempfile::tempdir().unwrap();
    let (d, vae, unet) = (
        data.path().to_str().unwrap(),
        out.path().join("vae"),
        out.path().join("unet"),
    );
    let o = elbo(&[
        "train",
        "vae",
        "--data",
        d,
        "--epochs",
        "2",
        "--hidden-dim",
        "16",
        "--latent-dim",
        "2",
        "--out",
        vae.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let samples = image::open(vae.join("samples.png")).unwrap();
    assert!(samples.color().has_color());
    assert_eq!(samples.width(), 8 * (8 + 2) + 2);
    let ckpt = vae.join("model.safetensors");
    let o = elbo(&[
        "eval",
        "vae",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--data",
        d,
        "--iw-samples",
        "10",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The MNIST digits do not fit this model: one line saying why.
    assert_one_line_error(
        &elbo(&["eval", "vae", "--checkpoint", ckpt.to_str().unwrap()]),
        "1 x 28 x 28",
    );
    let o = elbo(&[
        "train",
        "diffusion",
        "--data",
        d,
        "--num-train-timesteps",
        "20",
        "--channels",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--sample-steps",
        "2",
        "--out",
        unet.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let samples = image::open(unet.join("samples.png")).unwrap();
    assert!(samples.color().has_color());
    let uc = unet.join("model.safetensors");
    let o = elbo(&[
        "eval",
        "diffusion",
        "--checkpoint",
        uc.to_str().unwrap(),
        "--data",
        d,
        "--limit",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // bits/dim = nats / (3 * 8 * 8 * ln 2).
    let (bpd, nats) = (
        v["bpd"].as_f64().unwrap(),
        v["nll_bound_nats"].as_f64().unwrap(),
    );
    assert!((bpd - nats / (192.0 * std::f64::consts::LN_2)).abs() < 1e-9);
    let png = out.path().join("s.png");
    let o = elbo(&[
        "sample",
        "diffusion",
        "--checkpoint",
        uc.to_str().unwrap(),
        "--n",
        "4",
        "--steps",
        "2",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(image::open(&png).unwrap().color().has_color());
    // A U-Net whose levels do not divide the image size says so.
    let odd = image_folder(
        4,
        ImageShape {
            channels: 1,
            height: 6,
            width: 6,
        },
    );
    assert_one_line_error(
        &elbo(&[
            "train",
            "diffusion",
            "--data",
            odd.path().to_str().unwrap(),
            "--out",
            out.path().join("never").to_str().unwrap(),
        ]),
        "divisible by 4",
    );
}

/// The real data sets, when `../shared/data/` holds them.
#[test]
fn shared_full_mnist_and_cifar10_jpeg() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    let mnist = shared.join("mnist");
    if mnist.is_dir() {
        let started = std::time::Instant::now();
        let train = load_path(&mnist, Split::Train).unwrap();
        let test = load_path(&mnist, Split::Test).unwrap();
        assert_eq!((train.len(), test.len()), (60_000, 10_000));
        assert_eq!(train.shape, ImageShape::MNIST);
        eprintln!(
            "full MNIST loaded in {:.2}s",
            started.elapsed().as_secs_f64()
        );
    } else {
        eprintln!("skipped: {} is absent", mnist.display());
    }
    let tarball = shared.join("cifar10-jpeg.tar.gz");
    if tarball.is_file() {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("tar")
            .args([
                "xzf",
                tarball.to_str().unwrap(),
                "-C",
                dir.path().to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(ok.success());
        let started = std::time::Instant::now();
        let train = load_path(dir.path(), Split::Train).unwrap();
        let test = load_path(dir.path(), Split::Test).unwrap();
        assert_eq!((train.len(), test.len()), (50_000, 10_000));
        assert_eq!(
            train.shape,
            ImageShape {
                channels: 3,
                height: 32,
                width: 32
            }
        );
        assert_eq!(train.labels.as_ref().unwrap().iter().max(), Some(&9));
        eprintln!(
            "CIFAR-10 JPEG folder (60,000 files) loaded in {:.2}s",
            started.elapsed().as_secs_f64()
        );
    } else {
        eprintln!("skipped: {} is absent", tarball.display());
    }
}

/// A CIFAR-10 label is 0..9 (CIFAR-100's fine label 0..99): a record labelled 200 is refused,
/// naming the member and the record.
#[test]
fn cifar_labels_out_of_range_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cifar-10-binary.tar.gz");
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    let mut bytes = vec![0u8; 10_000 * 3073];
    bytes[4 * 3073] = 200; // the label of record 5
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(
        &mut header,
        "cifar-10-batches-bin/test_batch.bin",
        bytes.as_slice(),
    )
    .unwrap();
    tar.into_inner().unwrap().finish().unwrap();
    let e = load_path(&path, Split::Test).unwrap_err().to_string();
    assert!(
        e.contains("test_batch.bin, record 5: label 200") && e.contains("labels 0 to 9"),
        "{e}"
    );
}
