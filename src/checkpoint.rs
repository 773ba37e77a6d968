//! safetensors checkpoints: serialised in memory, written atomically (`files::write_atomic`),
//! and read defensively: only regular files, reads bounded by
//! the file's size and the memory budget, float tensors only, every value finite.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

/// Tensors and string metadata of one safetensors file.
pub struct Loaded {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

/// The safetensors bytes of `tensors` (+ `metadata`).
pub fn serialize(
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    Ok(safetensors::serialize(
        contiguous.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
    )?)
}

/// Writes `tensors` (+ `metadata`) to `path` through [`crate::files::write_atomic`].
pub fn save_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    crate::files::write_atomic(path, &serialize(tensors, metadata)?)
}

/// Reads up to this size are not checked against the memory budget.
const SMALL_READ: u64 = 64 << 20;

/// Reads a whole file, refusing anything that is not a regular file (a pipe, a device such as
/// `/dev/zero`, a folder) and files larger than `max` bytes or (above 64 MiB) the memory
/// budget; the read is bounded by the size the file had when opened.
pub fn read_regular_file(path: &Path, max: u64) -> Result<Vec<u8>> {
    // Checked before opening too: opening a named pipe blocks until someone writes to it.
    let regular = |meta: &std::fs::Metadata| -> Result<()> {
        if !meta.is_file() {
            bail!(
                "{}: not a regular file (a folder, pipe or device); give a file",
                path.display()
            );
        }
        Ok(())
    };
    let cannot_read = || format!("{}: cannot read", path.display());
    regular(&std::fs::metadata(path).with_context(cannot_read)?)?;
    let file = std::fs::File::open(path).with_context(cannot_read)?;
    let meta = file.metadata().with_context(cannot_read)?;
    regular(&meta)?;
    let len = meta.len();
    if len > max {
        bail!(
            "{}: {} is larger than the {} allowed here",
            path.display(),
            crate::limits::human(len),
            crate::limits::human(max)
        );
    }
    // Small reads are never refused for memory, which keeps /proc/meminfo out of per-file
    // loops (an image folder reads 60,000 files).
    if len > SMALL_READ {
        crate::limits::check_bytes(&path.display().to_string(), "reading it", Some(len))?;
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(len)
        .read_to_end(&mut bytes)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(bytes)
}

/// Reads every tensor and the metadata of a checkpoint file (see [`decode`]).
pub fn load(path: &Path, device: &Device) -> Result<Loaded> {
    let bytes = read_regular_file(path, u64::MAX)
        .with_context(|| format!("{}: cannot read checkpoint", path.display()))?;
    decode(&bytes, path, device)
}

/// Decodes safetensors bytes: the metadata is empty when the file has none (as PyTorch's
/// `safetensors.torch.save_file` without `metadata=` writes). Refuses integer and boolean
/// tensors and any non-finite value, naming the tensor; f16, bf16 and f64 are read as they are
/// (models convert to f32). `path` names the file in errors.
pub fn decode(bytes: &[u8], path: &Path, device: &Device) -> Result<Loaded> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
    names.sort();
    let mut tensors = HashMap::new();
    for name in names {
        let view = st
            .tensor(&name)
            .map_err(|e| anyhow::anyhow!("{}: tensor {name}: {e}", path.display()))?;
        use safetensors::Dtype as S;
        if !matches!(view.dtype(), S::F16 | S::BF16 | S::F32 | S::F64) {
            bail!(
                "{}: tensor {name} has dtype {:?}; weights must be floats (F16, BF16, F32 or F64)",
                path.display(),
                view.dtype()
            );
        }
        let t = candle_core::safetensors::Load::load(&view, device)
            .with_context(|| format!("{}: cannot decode tensor {name}", path.display()))?;
        check_finite(&t).with_context(|| format!("{}: tensor {name}", path.display()))?;
        tensors.insert(name, t);
    }
    Ok(Loaded { tensors, metadata })
}

/// Fails naming the first non-finite value of a float tensor (as it will be used, in f32).
pub fn check_finite(t: &Tensor) -> Result<()> {
    let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        bail!("holds a non-finite value ({v}) at flat index {i}; refusing to load it");
    }
    Ok(())
}
