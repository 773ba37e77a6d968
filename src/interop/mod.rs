//! Checkpoints of other projects, each format in one file with its tests: [`diffusers`]
//! (`save_pretrained` folders of `UNet2DModel` and the DDPM pipelines) and
//! [`improved_diffusion`] (improved-diffusion's and guided-diffusion's `torch.save` state
//! dicts with their scripts' flags). They build elbo's own networks (the U-Net family of
//! [`crate::diffusion::nets`], extended where a format's field needs it) and are reached
//! through the commands' loading code only.

pub mod diffusers;
pub mod hub;
pub mod improved_diffusion;
pub mod pickle;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::diffusion::nets::{Net, NetConfig};

/// Builds `config`'s network from tensors already renamed to elbo's names. Every tensor must
/// be one the network reads, so none is silently left out; `weights` names the file and
/// `described_by` the network ("the network FILE's config describes") in errors.
pub(crate) fn build_net(
    config: &NetConfig,
    tensors: HashMap<String, Tensor>,
    device: &Device,
    weights: &Path,
    described_by: &str,
) -> Result<Net> {
    let names: Vec<String> = tensors.keys().cloned().collect();
    let used = Arc::new(Mutex::new(HashSet::new()));
    let backend = Recording {
        tensors,
        used: used.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
    let net = Net::build(config, vb).map_err(|e| {
        // candle's message, without the backtrace it may carry.
        let e = e.to_string();
        anyhow::anyhow!(
            "{}: the tensors do not fit {described_by}: {}",
            weights.display(),
            e.lines().next().unwrap_or("")
        )
    })?;
    let used = used
        .lock()
        .map_err(|_| anyhow::anyhow!("a poisoned lock"))?;
    let mut unused: Vec<&String> = names.iter().filter(|n| !used.contains(*n)).collect();
    unused.sort();
    if let Some(unused) = unused.first() {
        bail!(
            "{}: tensor {unused} (elbo's name) is not read by {described_by}",
            weights.display()
        );
    }
    Ok(net)
}

/// Renamed tensors as a `VarBuilder` backend that records which ones the network reads.
struct Recording {
    tensors: HashMap<String, Tensor>,
    used: Arc<Mutex<HashSet<String>>>,
}

impl candle_nn::var_builder::SimpleBackend for Recording {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "shape mismatch for {name}, expected: {:?}, got: {:?}",
                s.dims(),
                t.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(t) = self.tensors.get(name) else {
            candle_core::bail!("no tensor {name} in the file");
        };
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_string());
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
