//! safetensors checkpoints, written atomically (temporary file, fsync, rename) so that a
//! crash or a kill never leaves a half-written file where a good one was.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

/// Tensors and string metadata of one safetensors file.
pub struct Loaded {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

/// Writes `tensors` (+ `metadata`) to `path` through `path.tmp` and a rename.
pub fn save_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create folder", dir.display()))?;
    }
    let tmp = tmp_path(path);
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    safetensors::serialize_to_file(
        contiguous.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
        &tmp,
    )
    .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("{}: cannot sync", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

/// `model.safetensors` -> `model.safetensors.tmp`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Reads every tensor and the metadata (empty when the file has none, as PyTorch's
/// `safetensors.torch.save_file` without `metadata=` writes).
pub fn load(path: &Path, device: &Device) -> Result<Loaded> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("{}: cannot read checkpoint", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .with_context(|| format!("{}: cannot decode tensors", path.display()))?;
    Ok(Loaded { tensors, metadata })
}

/// Writes `text` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

/// Appends one JSON line (a metrics record) to `path`.
pub fn append_json_line(path: &Path, record: &impl serde::Serialize) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("{}: cannot append", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(record)?)
        .with_context(|| format!("{}: cannot append", path.display()))?;
    Ok(())
}
