//! safetensors checkpoints: serialised in memory, written atomically (`files::write_atomic`),
//! and read defensively: only regular files, reads bounded by
//! the file's size and the memory budget, float tensors only, every value finite.

use std::collections::HashMap;
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

/// Reads every tensor and the metadata of a checkpoint file (see [`decode`]).
pub fn load(path: &Path, device: &Device) -> Result<Loaded> {
    let bytes = crate::files::read_regular_file(path, u64::MAX)
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
