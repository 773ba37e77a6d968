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
    #[error("{path}: not a regular file (a folder, pipe or device)")]
    NotAFile { path: PathBuf },
    #[error(
        "{path}: corrupt gzip file ({}); fetch or copy it again",
        gzip_problem(error)
    )]
    Gzip {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: bytes after the end of the gzip stream that are not a gzip member")]
    AfterGzip { path: PathBuf },
    #[error(
        "{path}: header declares {declared} bytes of data, more than the {budget} bytes of memory available"
    )]
    TooLarge {
        path: PathBuf,
        declared: u64,
        budget: u64,
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
    #[error("{path}: images are {rows}x{cols}, expected 1 to 32768 pixels a side")]
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

/// The gzip magic number.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Reads into `buf` until it is full or the stream ends; returns the bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Parses an IDX stream whose magic must be `magic`: the header is read and checked first,
/// then exactly the data it declares (never more than the memory budget, and for a raw file
/// of `raw_len` bytes only when the lengths agree), then the end of the stream. `gz` says
/// whether `r` inflates a gzip file (its errors are then gzip errors). Returns the dimensions
/// and the data bytes; `path` is only used in errors.
fn parse_stream(
    mut r: impl Read,
    magic: u32,
    what: &'static str,
    path: &Path,
    gz: bool,
    raw_len: Option<u64>,
) -> Result<(Vec<usize>, Vec<u8>), IdxError> {
    let path_buf = || path.to_path_buf();
    let io = |source: std::io::Error| {
        if gz {
            IdxError::Gzip {
                path: path.to_path_buf(),
                error: source,
            }
        } else {
            IdxError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    let mut head = [0u8; 4];
    if read_up_to(&mut r, &mut head).map_err(io)? < 4 {
        return Err(IdxError::TooShort { path: path_buf() });
    }
    let found = u32::from_be_bytes(head);
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
    let mut dim_bytes = vec![0u8; 4 * ndim];
    let got = read_up_to(&mut r, &mut dim_bytes).map_err(io)?;
    if got < dim_bytes.len() {
        return Err(IdxError::Truncated {
            path: path_buf(),
            expected: header,
            found: 4 + got,
        });
    }
    let dims: Vec<usize> = dim_bytes
        .chunks(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let len = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .unwrap_or(u64::MAX);
    if let Some(file_len) = raw_len {
        let body = file_len.saturating_sub(header as u64);
        if body < len {
            return Err(IdxError::Truncated {
                path: path_buf(),
                expected: len.min(usize::MAX as u64) as usize,
                found: body as usize,
            });
        }
        if body > len {
            return Err(IdxError::TrailingBytes {
                path: path_buf(),
                found: (body - len) as usize,
            });
        }
    }
    let budget = crate::limits::memory_budget();
    if len > budget {
        return Err(IdxError::TooLarge {
            path: path_buf(),
            declared: len,
            budget,
        });
    }
    // Grows only as data arrives: a header that lies costs no more than the data there is.
    let mut data = Vec::with_capacity(raw_len.map_or(0, |_| len as usize));
    (&mut r).take(len).read_to_end(&mut data).map_err(io)?;
    if (data.len() as u64) < len {
        return Err(IdxError::Truncated {
            path: path_buf(),
            expected: len as usize,
            found: data.len(),
        });
    }
    let mut probe = [0u8; 1];
    match read_up_to(&mut r, &mut probe) {
        Ok(0) => {}
        Ok(_) => {
            // Count what follows, up to 16 MiB (a bomb may go on for ever); a gzip stream
            // that fails on the way (a bad checksum, invalid deflate data) is corrupt.
            let rest = match std::io::copy(&mut (&mut r).take(16 << 20), &mut std::io::sink()) {
                Ok(rest) => rest,
                Err(e) if gz && !is_after_gzip(&e) => return Err(io(e)),
                Err(_) if gz => return Err(IdxError::AfterGzip { path: path_buf() }),
                Err(e) => return Err(io(e)),
            };
            return Err(IdxError::TrailingBytes {
                path: path_buf(),
                found: 1 + rest as usize,
            });
        }
        Err(e) if gz && !is_after_gzip(&e) => return Err(io(e)),
        Err(_) if gz => return Err(IdxError::AfterGzip { path: path_buf() }),
        Err(e) => return Err(io(e)),
    }
    Ok((dims, data))
}

/// What a gzip read error means, in words: flate2 reports a bad CRC-32 or length trailer as
/// "corrupt gzip stream does not have a matching checksum" and bad deflate data as
/// "corrupt deflate stream".
pub fn gzip_problem(e: &std::io::Error) -> String {
    let text = e.to_string();
    if text.contains("checksum") {
        "CRC mismatch: the data does not match the checksum stored in the file".into()
    } else if text.contains("incomplete") {
        "invalid or truncated deflate data: the stream ends before its end marker".into()
    } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "truncated: the compressed stream ends early".into()
    } else if text.contains("deflate") {
        "invalid deflate data".into()
    } else {
        text
    }
}

/// `true` for an error after all the declared data was read that is not a checksum or deflate
/// error: bytes after the last member that do not start another member.
fn is_after_gzip(e: &std::io::Error) -> bool {
    let text = e.to_string();
    !(text.contains("checksum") || text.contains("deflate"))
}

/// Parses IDX bytes (raw, or gzip with one or more members) whose magic must be `magic`.
fn parse(
    bytes: &[u8],
    magic: u32,
    what: &'static str,
    path: &Path,
) -> Result<(Vec<usize>, Vec<u8>), IdxError> {
    if bytes.starts_with(&GZIP_MAGIC) {
        let gz = flate2::read::MultiGzDecoder::new(bytes);
        parse_stream(gz, magic, what, path, true, None)
    } else {
        parse_stream(bytes, magic, what, path, false, Some(bytes.len() as u64))
    }
}

/// Reads an IDX file (raw or gzip) from disk without reading it whole first: regular files
/// only, header checked before any data is read.
fn read_file(
    path: &Path,
    magic: u32,
    what: &'static str,
) -> Result<(Vec<usize>, Vec<u8>), IdxError> {
    use std::io::Seek;
    let io = |source| IdxError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Checked before opening too: opening a named pipe blocks until someone writes to it.
    if !std::fs::metadata(path).map_err(io)?.is_file() {
        return Err(IdxError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mut file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(IdxError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mut first = [0u8; 2];
    let n = read_up_to(&mut file, &mut first).map_err(io)?;
    file.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
    let reader = std::io::BufReader::new(file.take(meta.len()));
    if n == 2 && first == GZIP_MAGIC {
        let gz = flate2::read::MultiGzDecoder::new(reader);
        parse_stream(gz, magic, what, path, true, None)
    } else {
        parse_stream(reader, magic, what, path, false, Some(meta.len()))
    }
}

/// A decoded IDX image file: `n` images of `rows x cols` u8 pixels, row-major.
#[derive(Debug, Clone)]
pub struct IdxImages {
    pub n: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

/// Parses an IDX image buffer (raw or gzip): `n` images of `rows x cols` grey pixels.
pub fn parse_images(bytes: &[u8], path: &Path) -> Result<IdxImages, IdxError> {
    images_from(parse(bytes, IMAGES_MAGIC, IMAGES_WHAT, path)?, path)
}

const IMAGES_WHAT: &str = "u8 images [n, rows, cols]";
const LABELS_WHAT: &str = "u8 labels [n]";

fn images_from((dims, pixels): (Vec<usize>, Vec<u8>), path: &Path) -> Result<IdxImages, IdxError> {
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 || rows > 1 << 15 || cols > 1 << 15 {
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

/// Parses an IDX label buffer (raw or gzip).
pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<Vec<u8>, IdxError> {
    Ok(parse(bytes, LABELS_MAGIC, LABELS_WHAT, path)?.1)
}

/// Reads an image file from disk (raw or gzip, one or more members).
pub fn read_images(path: &Path) -> Result<IdxImages, IdxError> {
    images_from(read_file(path, IMAGES_MAGIC, IMAGES_WHAT)?, path)
}

/// Reads a label file from disk (raw or gzip, one or more members).
pub fn read_labels(path: &Path) -> Result<Vec<u8>, IdxError> {
    Ok(read_file(path, LABELS_MAGIC, LABELS_WHAT)?.1)
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
            parse_images(&encode_images(1, 0, 32, &[]), p()),
            Err(IdxError::BadDims {
                rows: 0,
                cols: 32,
                ..
            })
        ));
        // Any image size is read: 2 images of 5 x 3.
        let img = parse_images(&encode_images(2, 5, 3, &[9u8; 30]), p()).unwrap();
        assert_eq!((img.n, img.rows, img.cols), (2, 5, 3));
        let msg = parse_images(&good[..2], Path::new("dir/bad-file"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("dir/bad-file"), "{msg}");
    }
}
