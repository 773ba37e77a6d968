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
