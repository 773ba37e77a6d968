//! Image folders in torchvision's `ImageFolder` layout: `DIR/train/<class>/*.png|jpg|jpeg`
//! and `DIR/test/<class>/...`. The sorted class folder names give the labels 0, 1, ...; every
//! image must have the size and the channel count (grey or colour) of the first, else one line
//! names the first file that differs. Files are decoded in parallel (rayon); alpha is dropped.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rayon::prelude::*;

use super::{Dataset, ImageShape, Split};

/// The extensions read (lower case).
pub const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// `true` when `dir` looks like an image folder: it holds `train/` or `test/` with class folders.
pub fn is_image_folder(dir: &Path) -> bool {
    ["train", "test"].iter().any(|s| dir.join(s).is_dir())
}

fn split_dir(dir: &Path, split: Split) -> PathBuf {
    dir.join(match split {
        Split::Train => "train",
        Split::Test => "test",
    })
}

/// The sorted class folders of a split and their image files (sorted by name).
fn list(root: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let mut classes: Vec<(String, PathBuf)> = std::fs::read_dir(root)
        .with_context(|| format!("{}: cannot list", root.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    classes.sort();
    if classes.is_empty() {
        bail!(
            "{}: holds no class folders (expected {}/<class>/*.png)",
            root.display(),
            root.display()
        );
    }
    if classes.len() > 256 {
        bail!(
            "{}: {} class folders, at most 256",
            root.display(),
            classes.len()
        );
    }
    classes
        .into_iter()
        .map(|(name, path)| {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&path)
                .with_context(|| format!("{}: cannot list", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
                })
                .collect();
            files.sort();
            Ok((name, files))
        })
        .collect()
}

/// One decoded image: its shape and planar pixels. The decoder is limited to 32768 pixels a
/// side and 512 MB, so a crafted header cannot make it allocate more.
fn decode(path: &Path) -> Result<(ImageShape, Vec<u8>)> {
    let bytes = crate::files::read_regular_file(path, 256 << 20)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(1 << 15);
    limits.max_image_height = Some(1 << 15);
    limits.max_alloc = Some(512 << 20);
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", path.display()))?;
    reader.limits(limits);
    let img = reader
        .decode()
        .with_context(|| format!("{}: not a readable PNG or JPEG", path.display()))?;
    let grey = !img.color().has_color();
    let (w, h) = (img.width() as usize, img.height() as usize);
    Ok(if grey {
        let shape = ImageShape {
            channels: 1,
            height: h,
            width: w,
        };
        (shape, img.into_luma8().into_raw())
    } else {
        let shape = ImageShape {
            channels: 3,
            height: h,
            width: w,
        };
        let rgb = img.into_rgb8().into_raw();
        let plane = h * w;
        let mut planar = vec![0u8; 3 * plane];
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                planar[c * plane + i] = px[c];
            }
        }
        (shape, planar)
    })
}

/// Loads a split of an image folder (see the module doc).
pub fn load(dir: &Path, split: Split) -> Result<Dataset> {
    let root = split_dir(dir, split);
    if !root.is_dir() {
        bail!(
            "--data {}: no {} folder for --split {}",
            dir.display(),
            root.display(),
            match split {
                Split::Train => "train",
                Split::Test => "test",
            }
        );
    }
    let classes = list(&root)?;
    let files: Vec<(u8, &PathBuf)> = classes
        .iter()
        .enumerate()
        .flat_map(|(label, (_, fs))| fs.iter().map(move |f| (label as u8, f)))
        .collect();
    let Some((_, first)) = files.first() else {
        bail!("{}: holds no .png, .jpg or .jpeg files", root.display());
    };
    let (shape, _) = decode(first)?;
    crate::limits::check_bytes(
        &format!("--data {}", dir.display()),
        "its images",
        crate::limits::product(&[files.len() as u64, shape.dim() as u64]),
    )?;
    // Decoded in parallel; of the files that fail, the first in order is named.
    let d = shape.dim();
    let mut images = vec![0u8; files.len() * d];
    let results: Vec<Result<()>> = images
        .par_chunks_mut(d)
        .zip(files.par_iter())
        .map(|(out, (_, path))| -> Result<()> {
            let (s, px) = decode(path)?;
            if s != shape {
                bail!(
                    "{}: image is {s}, but {} is {shape}; all images must be the same size and kind",
                    path.display(),
                    first.display()
                );
            }
            out.copy_from_slice(&px);
            Ok(())
        })
        .collect();
    results.into_iter().collect::<Result<()>>()?;
    Ok(Dataset {
        images,
        labels: Some(files.iter().map(|(l, _)| *l).collect()),
        shape,
    })
}
