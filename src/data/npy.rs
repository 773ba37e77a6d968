//! NumPy `.npy` and `.npz` files of u8 images.
//!
//! `.npy` (format versions 1-3): the magic `\x93NUMPY`, a version, a header length, then a
//! Python dict literal `{'descr': '|u1', 'fortran_order': False, 'shape': (N, H, W, C), }`,
//! then the data in C order. Images are u8 (`|u1`), shaped `(N, H, W)` (grey), `(N, H, W, C)`
//! (NHWC, C = 1 or 3: what Keras and TensorFlow write) or `(N, C, H, W)` (NCHW, C = 1 or 3,
//! when the last axis is not 1 or 3: what PyTorch writes). Labels are a 1-D (or `(N, 1)`) array
//! of unsigned or signed integers in 0..=255.
//!
//! `.npz` (a zip of `.npy` files): the arrays `x_train`, `y_train`, `x_test`, `y_test` (Keras'
//! `mnist.npz`, `cifar10`), or `images` and `labels` (one split, served for both). A lone
//! `.npy` of images is likewise served for both splits.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::{Dataset, ImageShape, Split};

/// The `.npy` magic number.
pub const MAGIC: &[u8] = b"\x93NUMPY";

/// A parsed `.npy` array: element type, shape and the data bytes (C order).
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    /// numpy's `descr`, e.g. `|u1`, `<i8`.
    pub descr: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Bytes per element of the integer dtypes read (`None` for anything else).
fn int_size(descr: &str) -> Option<usize> {
    let (order, kind) = descr.split_at(1);
    if !matches!(order, "|" | "<") {
        return None; // big-endian multi-byte integers are not read
    }
    match kind {
        "u1" | "i1" | "b1" => Some(1),
        "u2" | "i2" => Some(2),
        "u4" | "i4" => Some(4),
        "u8" | "i8" => Some(8),
        _ => None,
    }
}

/// The value of `key` in numpy's header dict, as the text up to the next top-level comma.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    if let Some(inner) = rest.strip_prefix('(') {
        return Some(&inner[..inner.find(')')?]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

/// The most an `.npy` header may hold here (NumPy writes under 1 KiB).
const HEADER_MAX: usize = 1 << 20;

/// The header of `.npy` bytes (which need only reach the header's end): the dtype, the shape,
/// where the data starts and how many bytes of data the shape declares.
fn header(bytes: &[u8], what: &str) -> Result<(String, Vec<usize>, usize, u64)> {
    if !bytes.starts_with(MAGIC) || bytes.len() < 10 {
        bail!("{what}: not a NumPy .npy file (no \\x93NUMPY magic)");
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => bail!("{what}: .npy format version {v} is not read (1, 2 or 3)"),
    };
    if header_len > HEADER_MAX {
        bail!("{what}: .npy header of {header_len} bytes, more than the {HEADER_MAX} read");
    }
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .with_context(|| format!("{what}: truncated .npy header"))?;
    let header = std::str::from_utf8(&bytes[start..end])
        .with_context(|| format!("{what}: .npy header is not text"))?;
    let descr = dict_value(header, "descr")
        .map(|d| d.trim_matches(|c| c == '\'' || c == '"').to_string())
        .with_context(|| format!("{what}: .npy header has no descr"))?;
    if dict_value(header, "fortran_order") != Some("False") {
        bail!("{what}: Fortran-ordered arrays are not read (save with C order)");
    }
    let shape: Vec<usize> = dict_value(header, "shape")
        .with_context(|| format!("{what}: .npy header has no shape"))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{what}: .npy shape is not a tuple of sizes"))?;
    let size = int_size(&descr).with_context(|| {
        format!("{what}: dtype {descr} is not read; images must be uint8 (|u1), labels integers")
    })?;
    let len = shape
        .iter()
        .try_fold(size as u64, |acc, &d| acc.checked_mul(d as u64))
        .with_context(|| format!("{what}: shape {shape:?} overflows"))?;
    Ok((descr, shape, end, len))
}

/// Reads one `.npy` from a stream (an `.npz` member as it inflates): the header first, then
/// exactly the data it declares, checked against the memory budget before it is read, and
/// one byte more to tell a longer stream. A member that inflates beyond its header is refused
/// after that one byte, whatever its size.
pub fn read_bounded(mut r: impl Read, what: &str) -> Result<Array> {
    let cannot = || format!("{what}: cannot inflate");
    let mut bytes = Vec::new();
    (&mut r)
        .take(12)
        .read_to_end(&mut bytes)
        .with_context(cannot)?;
    let header_len = match bytes.get(6) {
        Some(1) if bytes.len() >= 10 => 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize,
        Some(2 | 3) if bytes.len() >= 12 => {
            12 + u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize
        }
        _ => bytes.len(),
    };
    let header_len = header_len.min(HEADER_MAX + 12);
    (&mut r)
        .take(header_len.saturating_sub(bytes.len()) as u64)
        .read_to_end(&mut bytes)
        .with_context(cannot)?;
    let (_, _, end, len) = header(&bytes, what)?;
    crate::limits::check_bytes(
        what,
        "its data",
        end.checked_add(len as usize).map(|b| b as u64),
    )?;
    (&mut r)
        .take(len.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(cannot)?;
    let body = (bytes.len() - end) as u64;
    if body > len {
        bail!("{what}: inflates to more than the {len} bytes of data its .npy header declares");
    }
    parse(&bytes, what)
}

/// Parses `.npy` bytes; `what` names the file (and member) in errors. The data length is
/// checked against the header's shape before it is copied.
pub fn parse(bytes: &[u8], what: &str) -> Result<Array> {
    let (descr, shape, end, len) = header(bytes, what)?;
    let body = (bytes.len() - end) as u64;
    if body != len {
        bail!(
            "{what}: shape {shape:?} of {descr} needs {len} bytes of data, the file holds {body}"
        );
    }
    Ok(Array {
        descr,
        shape,
        data: bytes[end..].to_vec(),
    })
}

/// Images from a u8 array: `(N, H, W)`, `(N, H, W, C)` or `(N, C, H, W)`, converted to planar.
pub fn images(a: &Array, what: &str) -> Result<(ImageShape, Vec<u8>)> {
    if !matches!(a.descr.as_str(), "|u1" | "<u1") {
        bail!("{what}: images must be uint8 (|u1), got {}", a.descr);
    }
    let (n, shape, nhwc) = match a.shape[..] {
        [n, h, w] => (n, (1, h, w), false),
        [n, h, w, c] if matches!(c, 1 | 3) => (n, (c, h, w), true),
        [n, c, h, w] if matches!(c, 1 | 3) => (n, (c, h, w), false),
        _ => bail!(
            "{what}: images of shape {:?}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3",
            a.shape
        ),
    };
    let shape = ImageShape {
        channels: shape.0,
        height: shape.1,
        width: shape.2,
    };
    shape.validate(what)?;
    if n == 0 {
        bail!("{what}: holds no images");
    }
    if !nhwc || shape.channels == 1 {
        return Ok((shape, a.data.clone()));
    }
    let (plane, c) = (shape.height * shape.width, shape.channels);
    let mut planar = vec![0u8; a.data.len()];
    for (img, out) in a
        .data
        .chunks_exact(shape.dim())
        .zip(planar.chunks_exact_mut(shape.dim()))
    {
        for p in 0..plane {
            for ch in 0..c {
                out[ch * plane + p] = img[p * c + ch];
            }
        }
    }
    Ok((shape, planar))
}

/// Labels from an integer array of `n` values (`(N,)` or `(N, 1)`), each in 0..=255.
pub fn labels(a: &Array, n: usize, what: &str) -> Result<Vec<u8>> {
    let size = int_size(&a.descr).with_context(|| format!("{what}: labels must be integers"))?;
    let count: usize = a.shape.iter().product();
    if count != n || a.shape.len() > 2 || (a.shape.len() == 2 && a.shape[1] != 1) {
        bail!("{what}: labels of shape {:?} for {n} images", a.shape);
    }
    let signed = a.descr.as_bytes()[1] == b'i';
    a.data
        .chunks_exact(size)
        .map(|b| {
            let mut le = [0u8; 8];
            le[..size].copy_from_slice(b);
            let mut v = u64::from_le_bytes(le) as i128;
            if signed && size < 8 && b[size - 1] & 0x80 != 0 {
                v -= 1i128 << (8 * size);
            } else if signed && size == 8 {
                v = i64::from_le_bytes(le) as i128;
            }
            u8::try_from(v).map_err(|_| anyhow::anyhow!("{what}: label {v} is outside 0..=255"))
        })
        .collect()
}

/// Loads a split from a `.npy` file of images (served for both splits, no labels).
pub fn load_npy(path: &Path) -> Result<Dataset> {
    let what = path.display().to_string();
    let bytes = crate::files::read_regular_file(path, u64::MAX)?;
    let (shape, images) = images(&parse(&bytes, &what)?, &what)?;
    Ok(Dataset {
        images,
        labels: None,
        shape,
    })
}

/// Loads a split from an `.npz` file (see the module doc for the array names read).
pub fn load_npz(path: &Path, split: Split) -> Result<Dataset> {
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .with_context(|| format!("{}: not a NumPy .npz (zip) file", path.display()))?;
    let names: Vec<String> = zip.file_names().map(String::from).collect();
    let has = |n: &str| names.iter().any(|m| m == &format!("{n}.npy"));
    let (x, y) = match split {
        _ if has("images") => ("images", "labels"),
        Split::Train if has("x_train") => ("x_train", "y_train"),
        Split::Test if has("x_test") => ("x_test", "y_test"),
        _ => bail!(
            "{}: no {} array (an .npz is read as x_train, y_train, x_test, y_test or images, labels); it holds {}",
            path.display(),
            match split {
                Split::Train => "x_train",
                Split::Test => "x_test",
            },
            names.join(", ")
        ),
    };
    let mut member = |name: &str| -> Result<Option<Array>> {
        let member = format!("{name}.npy");
        if !names.contains(&member) {
            return Ok(None);
        }
        let what = format!("{}: {member}", path.display());
        let mut entry = zip
            .by_name(&member)
            .with_context(|| format!("{what}: cannot read"))?;
        // Bounded by what the member's own .npy header declares, not by the zip's sizes.
        Ok(Some(read_bounded(&mut entry, &what)?))
    };
    let xs = member(x)?.context("member listed but unreadable")?;
    let what = format!("{}: {x}.npy", path.display());
    let (shape, images) = images(&xs, &what)?;
    let n = images.len() / shape.dim();
    let labels = match member(y)? {
        Some(a) => Some(labels(&a, n, &format!("{}: {y}.npy", path.display()))?),
        None => None,
    };
    Ok(Dataset {
        images,
        labels,
        shape,
    })
}

/// Serialises u8 images `(N, H, W)` or `(N, H, W, C)`, or integer labels, as `.npy` bytes
/// (version 1; the inverse of [`parse`]). Used for fixtures and tests.
pub fn encode(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nhwc_and_nchw_give_the_same_planar_images() {
        // 1 image, 2 x 2, RGB: pixel p has channels (10p, 10p + 1, 10p + 2).
        let nhwc: Vec<u8> = (0..4)
            .flat_map(|p| [10 * p, 10 * p + 1, 10 * p + 2])
            .collect();
        let a = parse(&encode("|u1", &[1, 2, 2, 3], &nhwc), "x").unwrap();
        let (shape, planar) = images(&a, "x").unwrap();
        assert_eq!((shape.channels, shape.height, shape.width), (3, 2, 2));
        assert_eq!(planar, vec![0, 10, 20, 30, 1, 11, 21, 31, 2, 12, 22, 32]);
        let b = parse(&encode("|u1", &[1, 3, 2, 2], &planar), "x").unwrap();
        assert_eq!(images(&b, "x").unwrap().1, planar);
    }

    #[test]
    fn labels_of_any_integer_width_and_bad_input() {
        let l: Vec<u8> = [3i64, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
        let a = parse(&encode("<i8", &[2], &l), "y").unwrap();
        assert_eq!(labels(&a, 2, "y").unwrap(), vec![3, 7]);
        let neg: Vec<u8> = (-1i16).to_le_bytes().to_vec();
        let a = parse(&encode("<i2", &[1], &neg), "y").unwrap();
        assert!(labels(&a, 1, "y").is_err());
        let f = parse(&encode("<f4", &[1], &[0; 4]), "y");
        assert!(f.unwrap_err().to_string().contains("<f4"));
        let short = encode("|u1", &[2, 2, 2], &[0; 7]);
        assert!(
            parse(&short, "z")
                .unwrap_err()
                .to_string()
                .contains("needs 8 bytes")
        );
    }
}
