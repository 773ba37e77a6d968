//! The XLA engine: each step of a model traced once per shape as an array program
//! ([`graph`]), differentiated there, printed as StableHLO and compiled by XLA through a PJRT
//! plugin ([`pjrt`]) — the compiler and runtime under JAX, on whatever device the plugin
//! drives (the CPU plugin here; `xla_cuda_plugin.so` on a GPU). One compiled program per step
//! instead of one kernel per tensor operation.
//!
//! The plugin is found at `$ELBO_PJRT_PLUGIN`, else at [`default_plugin_path`], where
//! `scripts/xla-plugin` installs the CPU plugin from PyPI.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::{Result, anyhow};

use self::graph::{Graph, T};

pub mod graph;
pub mod pjrt;
pub mod unet;
pub mod vae;

pub use pjrt::Runtime;

/// Where `scripts/xla-plugin` puts the CPU plugin: `$XDG_CACHE_HOME/elbo-xla` or
/// `~/.cache/elbo-xla`.
pub fn default_plugin_path() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("elbo-xla").join("pjrt_c_api_cpu_plugin.so")
}

/// The plugin this process uses: `$ELBO_PJRT_PLUGIN`, else [`default_plugin_path`].
pub fn plugin_path() -> PathBuf {
    std::env::var_os("ELBO_PJRT_PLUGIN")
        .map(PathBuf::from)
        .unwrap_or_else(default_plugin_path)
}

/// The process's one PJRT runtime, loaded on first use (a plugin is initialised once per
/// process).
pub fn runtime() -> Result<Arc<Runtime>> {
    static RUNTIME: OnceLock<std::result::Result<Arc<Runtime>, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| Runtime::load(&plugin_path()).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("{e}"))
}

/// One Adam update of the flat parameters `params` from their gradient `grad` (nodes of `g`),
/// as [`crate::optim::Adam`] makes it; appends the inputs `m`, `v` `[P]` and the scalars
/// `[beta1, beta2, lr/(1 - beta1^t), 1/(1 - beta2^t), eps]` (in that order) and returns the
/// updated parameters, `m` and `v`:
///
/// `m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,  p -= (lr/bc1) m / (sqrt(v/bc2) + eps)`
pub(crate) fn adam_update(g: &mut Graph, params: T, grad: T) -> Result<(T, T, T)> {
    let len = g.shape(params)[0];
    let m = g.input(&[len]);
    let v = g.input(&[len]);
    let adam = g.input(&[5]);
    let scalar = |g: &mut Graph, i: usize| -> Result<T> {
        let s = g.slice(adam, i, 1)?;
        let s = g.reshape(s, &[])?;
        g.broadcast(s, &[], &[len])
    };
    let (b1, b2, lr_bc1, inv_bc2, eps) = (
        scalar(g, 0)?,
        scalar(g, 1)?,
        scalar(g, 2)?,
        scalar(g, 3)?,
        scalar(g, 4)?,
    );
    let one = g.constant(1.0, &[len]);
    let c1 = g.sub(one, b1)?;
    let t1 = g.mul(b1, m)?;
    let t2 = g.mul(c1, grad)?;
    let m2 = g.add(t1, t2)?;
    let c2 = g.sub(one, b2)?;
    let g2 = g.mul(grad, grad)?;
    let t3 = g.mul(b2, v)?;
    let t4 = g.mul(c2, g2)?;
    let v2 = g.add(t3, t4)?;
    let vh = g.mul(v2, inv_bc2)?;
    let sq = g.sqrt(vh);
    let den = g.add(sq, eps)?;
    let num = g.mul(lr_bc1, m2)?;
    let upd = g.div(num, den)?;
    let p2 = g.sub(params, upd)?;
    Ok((p2, m2, v2))
}

/// Adam's scalars as [`adam_update`]'s last input takes them.
pub(crate) fn adam_scalars(a: &crate::optim::AdamScalars) -> [f32; 5] {
    [a.beta1, a.beta2, a.lr_bc1, a.inv_bc2, a.eps]
}
