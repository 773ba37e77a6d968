//! Hugging Face hub ids in `--checkpoint`, as diffusers users type them
//! (`google/ddpm-cifar10-32`, a revision with `@rev`), resolved by the `hf-hub` crate into the
//! cache diffusers shares (`$HF_HOME/hub`, by default `~/.cache/huggingface/hub`):
//! `models--ORG--NAME/blobs/ETAG`, `snapshots/COMMIT/FILE` links to the blobs, `refs/REV`.
//! `HF_ENDPOINT` names a mirror; `HF_HUB_OFFLINE=1` (or elbo's `--offline`) never fetches and
//! reads the cache alone.
//!
//! Only the files a diffusion pipeline needs are fetched: `model_index.json`, `unet/config.json`,
//! the UNet's weights (`diffusion_pytorch_model.safetensors`, else `.bin`) and
//! `scheduler/scheduler_config.json`, or a bare `UNet2DModel`'s `config.json` and weights.
//! hf-hub downloads each into a temporary file and renames it into place (atomic); elbo then
//! checks every large-file (LFS) blob against its name, the sha256 the hub gave as its etag, and
//! removes one that does not match. Network failures are one line naming the id.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use hf_hub::{Repo, RepoType};

/// Whether `text` has the shape of a hub id (`ORG/NAME` or `NAME`, optionally `@REV`) and is
/// not a path that exists.
pub fn looks_like_id(text: &str) -> bool {
    if Path::new(text).exists() {
        return false;
    }
    let (id, rev) = split_revision(text);
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| name_ok(p))
        && rev.is_none_or(|r| {
            !r.is_empty()
                && !r.contains("..")
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        })
}

/// `ORG/NAME@REV` as (`ORG/NAME`, `Some(REV)`).
fn split_revision(text: &str) -> (&str, Option<&str>) {
    match text.split_once('@') {
        Some((id, rev)) => (id, Some(rev)),
        None => (text, None),
    }
}

/// Whether `HF_HUB_OFFLINE` asks for the cache alone (as huggingface_hub reads it).
pub fn offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// The local snapshot folder of hub id `text` (a pipeline or `UNet2DModel` folder diffusers
/// would read), fetching what the cache lacks unless `offline`.
pub fn resolve(text: &str, offline: bool) -> Result<PathBuf> {
    let (id, rev) = split_revision(text);
    let rev = rev.unwrap_or("main");
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, rev.to_string());
    if offline || offline_from_env() {
        return from_cache(text, repo);
    }
    // hf-hub can panic on a malformed response (an unwrap on a status code or a URL): caught
    // and reported as one line, the default panic message silenced meanwhile.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| fetch(text, repo));
    std::panic::set_hook(hook);
    match result {
        Ok(r) => r,
        Err(_) => bail!("{text}: the hub's answer could not be read (a malformed response)"),
    }
}

/// The files of the pipeline or model that `siblings` (the repo's file names) hold.
fn needed(text: &str, has: &dyn Fn(&str) -> bool) -> Result<Vec<String>> {
    let weights = |dir: &str| -> Result<String> {
        for w in [
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.bin",
        ] {
            let f = format!("{dir}{w}");
            if has(&f) {
                return Ok(f);
            }
        }
        bail!("{text}: no {dir}diffusion_pytorch_model.safetensors (or .bin) in the repo")
    };
    if has("model_index.json") {
        Ok(vec![
            "model_index.json".into(),
            "unet/config.json".into(),
            weights("unet/")?,
            "scheduler/scheduler_config.json".into(),
        ])
    } else if has("config.json") {
        Ok(vec!["config.json".into(), weights("")?])
    } else {
        bail!(
            "{text}: neither a diffusers pipeline (model_index.json) nor a UNet2DModel (config.json)"
        )
    }
}

fn fetch(text: &str, repo: Repo) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .build()
        .map_err(|e| anyhow::anyhow!("{text}: the hub client: {e}"))?;
    let remote = api.repo(repo);
    let info = remote.info().map_err(|e| {
        anyhow::anyhow!(
            "{text}: cannot reach the hub or the repo ({e}); HF_HUB_OFFLINE=1 reads the cache alone"
        )
    })?;
    let names: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let files = needed(text, &|f| names.contains(&f))?;
    let mut folder = None;
    for file in &files {
        let path = remote
            .get(file)
            .map_err(|e| anyhow::anyhow!("{text}: cannot fetch {file}: {e}"))?;
        verify(&path).with_context(|| format!("{text}: {file}"))?;
        if folder.is_none() {
            folder = path.parent().map(Path::to_path_buf);
        }
    }
    folder.with_context(|| format!("{text}: no files"))
}

fn from_cache(text: &str, repo: Repo) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let root = cache.path().clone();
    let local = cache.repo(repo);
    let missing = || {
        anyhow::anyhow!(
            "{text}: offline (HF_HUB_OFFLINE or --offline) and not in the hub cache {}; run once online",
            root.display()
        )
    };
    let has = |f: &str| local.get(f).is_some();
    let files = needed(text, &has).map_err(|_| missing())?;
    let first = local.get(&files[0]).ok_or_else(missing)?;
    for f in &files {
        verify(&local.get(f).ok_or_else(missing)?).with_context(|| format!("{text}: {f}"))?;
    }
    first.parent().map(Path::to_path_buf).ok_or_else(missing)
}

/// A snapshot file whose blob is named by a sha256 (the hub's etag of large files) must hash to
/// it; a blob that does not is removed with its link, so the next run fetches it again.
fn verify(pointer: &Path) -> Result<()> {
    let blob = std::fs::canonicalize(pointer)
        .with_context(|| format!("{}: a broken cache link", pointer.display()))?;
    let Some(name) = blob.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(()); // a small file's git etag: not a content hash elbo checks
    }
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut f =
        std::fs::File::open(&blob).with_context(|| format!("{}: cannot read", blob.display()))?;
    std::io::copy(&mut f, &mut hasher)
        .with_context(|| format!("{}: cannot read", blob.display()))?;
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != name.to_ascii_lowercase() {
        let _ = std::fs::remove_file(&blob);
        let _ = std::fs::remove_file(pointer);
        bail!(
            "the download's sha256 {got} is not the hub's {name}; removed from the cache, run again to fetch it anew"
        );
    }
    Ok(())
}
