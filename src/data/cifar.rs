//! CIFAR-10 and CIFAR-100 in their binary versions (Krizhevsky 2009), read in place from the
//! published `cifar-10-binary.tar.gz` / `cifar-100-binary.tar.gz`: nothing is extracted, no
//! path is taken from the archive, and each wanted member is checked by name and size.
//!
//! A record is 1 label byte (CIFAR-10), or 2 (CIFAR-100: coarse, then fine; the fine label is
//! used), then 3072 pixel bytes: the 1024 red values, then green, then blue, each row-major
//! 32 x 32, which is the planar C x H x W layout of [`super::Dataset`].

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::{Dataset, ImageShape, Split};

/// Which CIFAR archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Cifar10,
    Cifar100,
}

const PIXELS: usize = 3 * 32 * 32;
const SHAPE: ImageShape = ImageShape {
    channels: 3,
    height: 32,
    width: 32,
};

impl Variant {
    /// Classes of the label this reader keeps: CIFAR-10's 10, CIFAR-100's 100 fine labels.
    fn classes(self) -> usize {
        match self {
            Variant::Cifar10 => 10,
            Variant::Cifar100 => 100,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Cifar10 => "CIFAR-10",
            Variant::Cifar100 => "CIFAR-100",
        }
    }

    fn label_bytes(self) -> usize {
        match self {
            Variant::Cifar10 => 1,
            Variant::Cifar100 => 2,
        }
    }

    /// The members of a split, in order, with their record counts.
    pub fn members(self, split: Split) -> Vec<(String, usize)> {
        match (self, split) {
            (Variant::Cifar10, Split::Train) => (1..=5)
                .map(|i| (format!("cifar-10-batches-bin/data_batch_{i}.bin"), 10_000))
                .collect(),
            (Variant::Cifar10, Split::Test) => {
                vec![("cifar-10-batches-bin/test_batch.bin".into(), 10_000)]
            }
            (Variant::Cifar100, Split::Train) => {
                vec![("cifar-100-binary/train.bin".into(), 50_000)]
            }
            (Variant::Cifar100, Split::Test) => vec![("cifar-100-binary/test.bin".into(), 10_000)],
        }
    }
}

/// One line for a read error inside the archive: the gzip layer's problem in words, else tar's
/// message up to its first colon (after which it quotes bytes of the file), escaped and cut.
fn corrupt_archive(path: &Path, e: &std::io::Error) -> anyhow::Error {
    let text = e.to_string();
    let what =
        if text.contains("checksum") || text.contains("deflate") || text.contains("incomplete") {
            crate::data::idx::gzip_problem(e)
        } else {
            crate::files::excerpt(text.split(':').next().unwrap_or(""), 80)
        };
    anyhow::anyhow!("{}: corrupt tar.gz archive ({what})", path.display())
}

/// `true` when the file name says tar.gz.
pub fn is_tar_gz(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

/// Reads a split of a CIFAR binary archive; the variant is recognised by its member names.
pub fn load(path: &Path, split: Split) -> Result<Dataset> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    let mut file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut magic = [0u8; 2];
    if file.read_exact(&mut magic).is_err() || magic != [0x1f, 0x8b] {
        bail!(
            "{}: not a gzip file (a .tar.gz starts with the bytes 1f 8b); give the CIFAR binary archive as published",
            path.display()
        );
    }
    std::io::Seek::rewind(&mut file).with_context(|| format!("{}: cannot read", path.display()))?;
    let gz = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file));
    let mut archive = tar::Archive::new(gz);
    let mut variant: Option<Variant> = None;
    let mut parts: Vec<Option<Vec<u8>>> = Vec::new();
    let mut wanted: Vec<(String, usize)> = Vec::new();
    let entries = archive
        .entries()
        .with_context(|| format!("{}: not a tar.gz archive", path.display()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt_archive(path, &e))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .ok()
            .and_then(|p| p.to_str().map(|s| s.trim_start_matches("./").to_string()))
            .unwrap_or_default();
        if variant.is_none() {
            variant = if name.starts_with("cifar-10-batches-bin/") {
                Some(Variant::Cifar10)
            } else if name.starts_with("cifar-100-binary/") {
                Some(Variant::Cifar100)
            } else {
                None
            };
            if let Some(v) = variant {
                wanted = v.members(split);
                parts = vec![None; wanted.len()];
            }
        }
        let Some(v) = variant else { continue };
        let Some(i) = wanted.iter().position(|(m, _)| *m == name) else {
            continue;
        };
        let expected = (wanted[i].1 * (v.label_bytes() + PIXELS)) as u64;
        let size = entry.header().size().unwrap_or(u64::MAX);
        if size != expected {
            bail!(
                "{}: member {name} holds {size} bytes, expected {expected} ({} records of {} bytes)",
                path.display(),
                wanted[i].1,
                v.label_bytes() + PIXELS
            );
        }
        let mut bytes = Vec::with_capacity(expected as usize);
        (&mut entry)
            .take(expected)
            .read_to_end(&mut bytes)
            .map_err(|e| corrupt_archive(path, &e))?;
        if bytes.len() as u64 != expected {
            bail!("{}: member {name} is truncated", path.display());
        }
        parts[i] = Some(bytes);
        if parts.iter().all(Option::is_some) {
            break;
        }
    }
    let Some(v) = variant else {
        bail!(
            "{}: not a CIFAR binary archive (no cifar-10-batches-bin/ or cifar-100-binary/ members)",
            path.display()
        );
    };
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for ((name, _), part) in wanted.iter().zip(parts) {
        let bytes = part.with_context(|| format!("{}: has no member {name}", path.display()))?;
        let record = v.label_bytes() + PIXELS;
        for (i, r) in bytes.chunks_exact(record).enumerate() {
            let label = r[v.label_bytes() - 1];
            if label as usize >= v.classes() {
                bail!(
                    "{}: member {name}, record {}: label {label}, but {} has labels 0 to {}",
                    path.display(),
                    i + 1,
                    v.name(),
                    v.classes() - 1
                );
            }
            labels.push(label);
            images.extend_from_slice(&r[v.label_bytes()..]);
        }
    }
    Ok(Dataset {
        images,
        labels: Some(labels),
        shape: SHAPE,
    })
}
