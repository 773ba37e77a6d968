//! The IDX file format of the MNIST distribution (LeCun et al.), raw or gzip-compressed.
//!
//! Layout: a big-endian header `[0, 0, dtype, ndim]`, then `ndim` big-endian `u32`
//! dimensions, then the data in row-major order. MNIST images use magic `0x00000803`
//! (= 2051: u8, 3 dims `[n, rows, cols]`), labels `0x00000801` (= 2049: u8, 1 dim `[n]`).

use std::io::Read;
use std::path::{Path, PathBuf};

/// Everything that can be wrong with an IDX file. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: file is shorter than the 4-byte IDX magic number")]
    TooShort { path: PathBuf },
    #[error("{path}: wrong magic number {found:#010x} (expected {expected:#010x}: {what})")]
    BadMagic {
        path: PathBuf,
        found: u32,
        expected: u32,
        what: &'static str,
    },
    #[error("{path}: truncated: header says {expected} bytes of data, file holds {found}")]
    Truncated {
        path: PathBuf,
        expected: usize,
        found: usize,
    },
    #[error("{path}: {found} trailing bytes after the data the header describes")]
    TrailingBytes { path: PathBuf, found: usize },
    #[error("{path}: images are {rows}x{cols}, expected 28x28 (784 pixels)")]
    BadDims {
        path: PathBuf,
        rows: usize,
        cols: usize,
    },
    #[error("{images}: holds {n_images} images but labels file {labels} holds {n_labels} labels")]
    CountMismatch {
        images: PathBuf,
        labels: PathBuf,
        n_images: usize,
        n_labels: usize,
    },
}

/// Magic number of an IDX file of unsigned bytes with 3 dimensions (MNIST images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with 1 dimension (MNIST labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Reads the whole file, gunzipping when it starts with the gzip magic `1f 8b`.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, IdxError> {
    let io = |source| IdxError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    decode_maybe_gz(&raw).map_err(io)
}

/// Gunzips `raw` when it starts with the gzip magic, else returns it as is.
pub fn decode_maybe_gz(raw: &[u8]) -> std::io::Result<Vec<u8>> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::GzDecoder::new(raw).read_to_end(&mut out)?;
        Ok(out)
    } else {
        Ok(raw.to_vec())
    }
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Parses an IDX buffer whose magic must be `magic` (so `2 + magic & 0xff` header words);
/// returns the dimensions and the data bytes. `path` is only used in errors.
fn parse(
    bytes: &[u8],
    magic: u32,
    what: &'static str,
    path: &Path,
) -> Result<(Vec<usize>, Vec<u8>), IdxError> {
    let path_buf = || path.to_path_buf();
    if bytes.len() < 4 {
        return Err(IdxError::TooShort { path: path_buf() });
    }
    let found = be_u32(bytes, 0);
    if found != magic {
        return Err(IdxError::BadMagic {
            path: path_buf(),
            found,
            expected: magic,
            what,
        });
    }
    let ndim = (magic & 0xff) as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(IdxError::Truncated {
            path: path_buf(),
            expected: header,
            found: bytes.len(),
        });
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| be_u32(bytes, 4 + 4 * i) as usize)
        .collect();
    let len = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .unwrap_or(usize::MAX);
    let body = bytes.len() - header;
    if body < len {
        return Err(IdxError::Truncated {
            path: path_buf(),
            expected: len,
            found: body,
        });
    }
    if body > len {
        return Err(IdxError::TrailingBytes {
            path: path_buf(),
            found: body - len,
        });
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// A decoded IDX image file: `n` images of `rows x cols` u8 pixels, row-major.
#[derive(Debug, Clone)]
pub struct IdxImages {
    pub n: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

/// Parses an IDX image buffer (already gunzipped) and checks the images are 28x28.
pub fn parse_images(bytes: &[u8], path: &Path) -> Result<IdxImages, IdxError> {
    let (dims, pixels) = parse(bytes, IMAGES_MAGIC, "u8 images [n, rows, cols]", path)?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows != 28 || cols != 28 {
        return Err(IdxError::BadDims {
            path: path.to_path_buf(),
            rows,
            cols,
        });
    }
    Ok(IdxImages {
        n,
        rows,
        cols,
        pixels,
    })
}

/// Parses an IDX label buffer (already gunzipped).
pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<Vec<u8>, IdxError> {
    Ok(parse(bytes, LABELS_MAGIC, "u8 labels [n]", path)?.1)
}

/// Reads an image file from disk (raw or `.gz`).
pub fn read_images(path: &Path) -> Result<IdxImages, IdxError> {
    parse_images(&read_maybe_gz(path)?, path)
}

/// Reads a label file from disk (raw or `.gz`).
pub fn read_labels(path: &Path) -> Result<Vec<u8>, IdxError> {
    parse_labels(&read_maybe_gz(path)?, path)
}

/// Serialises u8 images as an (uncompressed) IDX buffer; the inverse of [`parse_images`].
pub fn encode_images(n: usize, rows: usize, cols: usize, pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + pixels.len());
    for word in [IMAGES_MAGIC, n as u32, rows as u32, cols as u32] {
        out.extend_from_slice(&word.to_be_bytes());
    }
    out.extend_from_slice(pixels);
    out
}

/// Serialises labels as an (uncompressed) IDX buffer; the inverse of [`parse_labels`].
pub fn encode_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + labels.len());
    out.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    out.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    out.extend_from_slice(labels);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("x.idx")
    }

    #[test]
    fn round_trip() {
        let px: Vec<u8> = (0..2 * 784).map(|i| (i % 256) as u8).collect();
        let img = parse_images(&encode_images(2, 28, 28, &px), p()).unwrap();
        assert_eq!((img.n, img.rows, img.cols), (2, 28, 28));
        assert_eq!(img.pixels, px);
        assert_eq!(
            parse_labels(&encode_labels(&[3, 7]), p()).unwrap(),
            vec![3, 7]
        );
    }

    #[test]
    fn rejects_each_kind_of_bad_file() {
        let good = encode_images(2, 28, 28, &[0u8; 2 * 784]);
        assert!(matches!(
            parse_images(&good[..2], p()),
            Err(IdxError::TooShort { .. })
        ));
        assert!(matches!(
            parse_images(&encode_labels(&[1, 2]), p()),
            Err(IdxError::BadMagic {
                found: LABELS_MAGIC,
                ..
            })
        ));
        assert!(matches!(
            parse_images(&good[..good.len() - 1], p()),
            Err(IdxError::Truncated { .. })
        ));
        assert!(matches!(
            parse_images(&good[..10], p()),
            Err(IdxError::Truncated { .. })
        ));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            parse_images(&long, p()),
            Err(IdxError::TrailingBytes { found: 1, .. })
        ));
        assert!(matches!(
            parse_images(&encode_images(1, 32, 32, &[0u8; 1024]), p()),
            Err(IdxError::BadDims {
                rows: 32,
                cols: 32,
                ..
            })
        ));
        let msg = parse_images(&good[..2], Path::new("dir/bad-file"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("dir/bad-file"), "{msg}");
    }
}
