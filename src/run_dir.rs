//! The run folder of `elbo train`, and its one-commit-per-epoch checkpoints.
//!
//! Each epoch's model, training state (optimizer, EMA, epoch, step), the metrics so far and the
//! run config become visible together or not at all:
//!
//! ```text
//! D/commits/000007/        model.safetensors, train_state.safetensors, metrics.jsonl,
//!                          config.json, commit.json (epoch, step, bytes and SHA-256 of each)
//! D/latest -> commits/000007                       the commit: one atomic rename switches it
//! D/model.safetensors -> latest/model.safetensors  and likewise the other three files
//! D/samples.png, ...                               pictures, written at the end of a run
//! ```
//!
//! A commit writes a fresh folder `commits/000007.partial`, fsyncs every file and the folder,
//! renames it to `commits/000007`, and then renames a new symbolic link over `latest`: that
//! rename is the commit. A reader that opens `D/model.safetensors` and `D/train_state.safetensors`
//! always gets the same epoch. Older commits and any leftovers of an interrupted commit
//! (`*.partial`, `latest.tmp`) are removed afterwards, or on the next start.
//!
//! `--resume` reads the commit `latest` names and checks every file against `commit.json`
//! (size and digest) and the metrics (one line per epoch, numbered 1..epoch) before it loads
//! anything, and refuses with one line naming what is out of step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::fault;

pub const MODEL: &str = "model.safetensors";
pub const STATE: &str = "train_state.safetensors";
pub const METRICS: &str = "metrics.jsonl";
pub const CONFIG: &str = "config.json";
pub const MANIFEST: &str = "commit.json";
const LATEST: &str = "latest";
const COMMITS: &str = "commits";
/// The files every commit holds, linked from the run folder under the same names.
const LINKED: [&str; 4] = [MODEL, STATE, METRICS, CONFIG];
/// What else a run writes into its folder (pictures at the end and every epoch, the report,
/// `eval --report`'s results, the commits): a new run refuses a folder holding any of them.
pub const OUTPUTS: [&str; 7] = [
    "samples.png",
    "reconstructions.png",
    "manifold.png",
    "report.html",
    "eval.json",
    "pictures",
    COMMITS,
];
/// The most a commit's manifest may hold (it lists five files).
const MANIFEST_MAX: u64 = 1 << 20;
/// The most a run's `metrics.jsonl` may hold: about 400 bytes an epoch, so 160,000 epochs.
pub const METRICS_MAX: u64 = 64 << 20;

/// One file of a commit: its length and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub sha256: String,
}

/// `commit.json`: what one commit holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub epoch: usize,
    pub step: u64,
    pub files: BTreeMap<String, FileDigest>,
}

/// The last commit of a run, checked.
#[derive(Debug, Clone)]
pub struct Committed {
    pub epoch: usize,
    pub step: u64,
    /// The commit's folder (`D/commits/000007`): read every file from here.
    pub dir: PathBuf,
    /// The metrics lines of epochs 1..=epoch.
    pub metrics: String,
}

impl Committed {
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A run folder open for training.
pub struct RunDir {
    pub dir: PathBuf,
    /// The metrics of the last commit (empty before the first).
    metrics: String,
    last_epoch: usize,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn commit_name(epoch: usize) -> String {
    format!("{epoch:06}")
}

/// `true` when `path` exists as anything, a dangling link included.
fn present(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

/// `true` when `dir/name` exists and is not one of the run folder's own links into
/// `latest` (those are left dangling by a first commit that did not finish: not a run).
fn foreign(dir: &Path, name: &str) -> bool {
    present(&dir.join(name))
        && std::fs::read_link(dir.join(name)).ok() != Some(Path::new(LATEST).join(name))
}

/// fsyncs a folder, so that the names created in it survive a power cut.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fault::step(&format!("fsync folder {}", dir.display()))?;
    std::fs::File::open(dir)?.sync_all()
}

fn io_context(path: &Path, what: &str) -> impl FnOnce() -> String {
    let p = path.display().to_string();
    let w = what.to_string();
    move || format!("{p}: cannot {w}")
}

impl RunDir {
    /// A new run in `dir`. Refuses a folder that already holds a run (a commit, or any of the
    /// run's files), so that nothing of an existing run is touched without `--resume`.
    pub fn create(dir: &Path) -> Result<Self> {
        if present(&dir.join(LATEST)) {
            bail!(
                "--out {}: already holds a run; pass --resume to continue it, or choose another --out",
                dir.display()
            );
        }
        if let Some(name) = LINKED[..3].iter().find(|n| foreign(dir, n)) {
            bail!(
                "--out {}: already holds {name} of an earlier run; pass --resume to continue it, or choose another --out",
                dir.display()
            );
        }
        // `commits/` holding only elbo's own names is what a first commit that did not finish
        // leaves (removed below); anything else there is not elbo's to remove.
        let ours = |name: &&str| *name == COMMITS && only_commit_names(&dir.join(COMMITS));
        if let Some(name) = OUTPUTS.iter().find(|n| present(&dir.join(n)) && !ours(n)) {
            bail!(
                "--out {}: already holds {name}, which a run writes; elbo does not overwrite it: choose another --out (or --resume the run it belongs to)",
                dir.display()
            );
        }
        if present(dir) && !dir.is_dir() {
            bail!("--out {}: exists and is not a folder", dir.display());
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--out {}: cannot create folder", dir.display()))?;
        let run = Self {
            dir: dir.to_path_buf(),
            metrics: String::new(),
            last_epoch: 0,
        };
        run.remove_leftovers(None)?;
        Ok(run)
    }

    /// The run in `dir` and its last commit, checked file by file.
    pub fn resume(dir: &Path) -> Result<(Self, Committed)> {
        let latest = dir.join(LATEST);
        if !dir.is_dir() {
            bail!("--resume: --out {} is not a folder", dir.display());
        }
        if !present(&latest) {
            if foreign(dir, MODEL) || foreign(dir, STATE) {
                bail!(
                    "--resume: {} was written by an older elbo without epoch commits (no {LATEST}), so its files cannot be checked to be one epoch; start a new --out",
                    dir.display()
                );
            }
            bail!(
                "--resume: {} holds no committed epoch to continue from; start it without --resume",
                dir.display()
            );
        }
        let target = std::fs::read_link(&latest)
            .with_context(|| format!("{}: not a link to a commit", latest.display()))?;
        // Nothing behind a link is opened before the link is known to stay inside the folder:
        // `latest` must read `commits/NNNNNN`, and both folders must be real folders.
        let epoch_named = commit_epoch(&target).with_context(|| {
            format!(
                "{}: points to {}, not to one of the run's commits (commits/NNNNNN); refusing to follow it",
                latest.display(),
                target.display()
            )
        })?;
        for d in [dir.join(COMMITS), dir.join(&target)] {
            let real = d.symlink_metadata().map(|m| m.is_dir()).unwrap_or(false);
            if !real {
                bail!(
                    "{}: is not a folder of the run (missing, or a link); refusing to follow it",
                    d.display()
                );
            }
        }
        let commit_dir = dir.join(&target);
        let manifest_path = commit_dir.join(MANIFEST);
        let text = read_small(&manifest_path, MANIFEST_MAX)?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a commit manifest", manifest_path.display()))?;
        if epoch_named != manifest.epoch {
            bail!(
                "{}: points to {} but the commit there is epoch {}: the run is out of step",
                latest.display(),
                target.display(),
                manifest.epoch
            );
        }
        for name in LINKED {
            let entry = manifest
                .files
                .get(name)
                .with_context(|| format!("{}: does not list {name}", manifest_path.display()))?;
            let path = commit_dir.join(name);
            // The size is compared before anything is read: a file grown (or replaced by a
            // link or a device) since the commit is refused without reading it.
            let meta = path.symlink_metadata().with_context(|| {
                format!(
                    "{}: missing from the commit of epoch {}",
                    path.display(),
                    manifest.epoch
                )
            })?;
            if !meta.is_file() || meta.len() != entry.bytes {
                bail!(
                    "{}: is not the file committed at epoch {} ({}, {} bytes expected by {}): the run is out of step",
                    path.display(),
                    manifest.epoch,
                    if meta.is_file() {
                        format!("{} bytes", meta.len())
                    } else {
                        "not a regular file".to_string()
                    },
                    entry.bytes,
                    manifest_path.display()
                );
            }
            let bytes = crate::files::read_regular_file(&path, entry.bytes)?;
            if bytes.len() as u64 != entry.bytes || sha256_hex(&bytes) != entry.sha256 {
                bail!(
                    "{}: is not the file committed at epoch {} ({} bytes, digest differs from {}): the run is out of step",
                    path.display(),
                    manifest.epoch,
                    bytes.len(),
                    manifest_path.display()
                );
            }
        }
        let metrics = read_small(&commit_dir.join(METRICS), METRICS_MAX)?;
        check_metrics(&metrics, manifest.epoch, &commit_dir.join(METRICS))?;
        let run = Self {
            dir: dir.to_path_buf(),
            metrics: metrics.clone(),
            last_epoch: manifest.epoch,
        };
        run.remove_leftovers(Some(&commit_name(manifest.epoch)))?;
        run.link_files()?;
        Ok((
            run,
            Committed {
                epoch: manifest.epoch,
                step: manifest.step,
                dir: commit_dir,
                metrics,
            },
        ))
    }

    /// The epoch of the last commit (0 before the first).
    pub fn last_epoch(&self) -> usize {
        self.last_epoch
    }

    /// Commits `epoch`: `files` (name, bytes) must be the model, the training state and the
    /// config; `metrics_line` (one JSON object, no newline) is appended to the committed
    /// metrics. Either all of it becomes the run's state, or (on any error, or a kill at any
    /// step) the previous commit stays.
    pub fn commit(
        &mut self,
        epoch: usize,
        step: u64,
        files: &[(&str, &[u8])],
        metrics_line: &str,
    ) -> Result<()> {
        if epoch <= self.last_epoch {
            bail!(
                "{}: epoch {epoch} is not after the last commit (epoch {})",
                self.dir.display(),
                self.last_epoch
            );
        }
        let metrics = format!("{}{metrics_line}\n", self.metrics);
        let result = self.write_commit(epoch, step, files, &metrics);
        if result.is_err() {
            // Best effort: the partial folder is garbage; the next start removes it otherwise.
            let _ = std::fs::remove_dir_all(
                self.dir
                    .join(COMMITS)
                    .join(format!("{}.partial", commit_name(epoch))),
            );
        }
        result.with_context(|| {
            format!(
                "epoch {epoch} was not committed; the run stays at {}",
                if self.last_epoch == 0 {
                    "no commit (start it again)".to_string()
                } else {
                    format!(
                        "its last commit, epoch {} (--resume continues it)",
                        self.last_epoch
                    )
                }
            )
        })?;
        self.metrics = metrics;
        self.last_epoch = epoch;
        Ok(())
    }

    fn write_commit(
        &self,
        epoch: usize,
        step: u64,
        files: &[(&str, &[u8])],
        metrics: &str,
    ) -> Result<()> {
        let commits = self.dir.join(COMMITS);
        let name = commit_name(epoch);
        let partial = commits.join(format!("{name}.partial"));
        let finished = commits.join(&name);
        fault::step("create commits folder")?;
        std::fs::create_dir_all(&commits).with_context(io_context(&commits, "create folder"))?;
        if present(&partial) {
            fault::step("remove stale partial commit")?;
            std::fs::remove_dir_all(&partial).with_context(io_context(&partial, "remove"))?;
        }
        fault::step("create partial commit folder")?;
        std::fs::create_dir(&partial).with_context(io_context(&partial, "create folder"))?;

        let mut manifest = Manifest {
            epoch,
            step,
            files: BTreeMap::new(),
        };
        let mut all: Vec<(&str, &[u8])> = files.to_vec();
        all.push((METRICS, metrics.as_bytes()));
        for name in LINKED {
            if !all.iter().any(|(n, _)| *n == name) {
                bail!("internal: a commit needs {name}");
            }
        }
        for (file, bytes) in &all {
            crate::files::write_new(&partial.join(file), bytes)?;
            manifest.files.insert(
                file.to_string(),
                FileDigest {
                    bytes: bytes.len() as u64,
                    sha256: sha256_hex(bytes),
                },
            );
        }
        crate::files::write_new(
            &partial.join(MANIFEST),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )?;
        sync_dir(&partial).with_context(io_context(&partial, "sync"))?;
        if present(&finished) {
            // A finished folder that `latest` does not name: left by a kill before the switch.
            fault::step("remove unlinked commit")?;
            std::fs::remove_dir_all(&finished).with_context(io_context(&finished, "remove"))?;
        }
        fault::step("rename partial commit into place")?;
        std::fs::rename(&partial, &finished).with_context(io_context(&finished, "rename"))?;
        sync_dir(&commits).with_context(io_context(&commits, "sync"))?;

        // `D/model.safetensors` etc. point into `latest` (dangling until the first commit).
        self.link_files()?;
        // The commit: one rename of a fresh link over `latest`.
        let link_tmp = self.dir.join(format!("{LATEST}.tmp"));
        if present(&link_tmp) {
            fault::step("remove stale latest.tmp")?;
            std::fs::remove_file(&link_tmp).with_context(io_context(&link_tmp, "remove"))?;
        }
        fault::step("create latest.tmp link")?;
        symlink(&Path::new(COMMITS).join(&name), &link_tmp)
            .with_context(io_context(&link_tmp, "create link"))?;
        fault::step("rename latest.tmp over latest (the commit)")?;
        std::fs::rename(&link_tmp, self.dir.join(LATEST))
            .with_context(io_context(&self.dir.join(LATEST), "rename"))?;
        sync_dir(&self.dir).with_context(io_context(&self.dir, "sync"))?;
        self.remove_leftovers(Some(&name))?;
        Ok(())
    }

    /// Makes `D/model.safetensors` etc. links to `latest/...` (once per run folder).
    fn link_files(&self) -> Result<()> {
        for name in LINKED {
            let path = self.dir.join(name);
            let target = Path::new(LATEST).join(name);
            if std::fs::read_link(&path).ok().as_deref() == Some(target.as_path()) {
                continue;
            }
            let tmp = self.dir.join(format!("{name}.link.tmp"));
            if present(&tmp) {
                fault::step("remove stale link")?;
                std::fs::remove_file(&tmp).with_context(io_context(&tmp, "remove"))?;
            }
            fault::step("create file link")?;
            symlink(&target, &tmp).with_context(io_context(&tmp, "create link"))?;
            fault::step("rename file link into place")?;
            std::fs::rename(&tmp, &path).with_context(io_context(&path, "rename"))?;
        }
        sync_dir(&self.dir).with_context(io_context(&self.dir, "sync"))?;
        Ok(())
    }

    /// Removes every commit folder but `keep`, partial commits and stale temporary links.
    fn remove_leftovers(&self, keep: Option<&str>) -> Result<()> {
        let commits = self.dir.join(COMMITS);
        if let Ok(entries) = std::fs::read_dir(&commits) {
            let mut names: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            names.sort();
            for path in names {
                if path.file_name().and_then(|n| n.to_str()) == keep {
                    continue;
                }
                fault::step("remove old commit")?;
                std::fs::remove_dir_all(&path).with_context(io_context(&path, "remove"))?;
            }
        }
        for name in LINKED
            .iter()
            .map(|n| format!("{n}.link.tmp"))
            .chain([format!("{LATEST}.tmp")])
        {
            let path = self.dir.join(name);
            if present(&path) {
                fault::step("remove stale temporary link")?;
                std::fs::remove_file(&path).with_context(io_context(&path, "remove"))?;
            }
        }
        Ok(())
    }
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(_target: &Path, _link: &Path) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "run folders need symbolic links (a Unix file system)",
    ))
}

/// `true` when `dir` is a real folder whose entries all have the names of commits
/// (`000007`, `000007.partial`).
fn only_commit_names(dir: &Path) -> bool {
    if !dir.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.filter_map(|e| e.ok()).all(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let base = name.strip_suffix(".partial").unwrap_or(&name);
        commit_epoch(&Path::new(COMMITS).join(base)).is_some()
    })
}

/// `commits/000007` -> 7; `None` for anything else (absolute paths, `..`, other folders).
fn commit_epoch(target: &Path) -> Option<usize> {
    let mut parts = target.components();
    let (Some(std::path::Component::Normal(first)), Some(std::path::Component::Normal(name))) =
        (parts.next(), parts.next())
    else {
        return None;
    };
    let name = name.to_str()?;
    if first != COMMITS || parts.next().is_some() || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let epoch: usize = name.parse().ok()?;
    (commit_name(epoch) == name).then_some(epoch)
}

/// Reads a small text file of a run (at most `max` bytes), refusing anything but a regular
/// file, a link included.
fn read_small(path: &Path, max: u64) -> Result<String> {
    if path
        .symlink_metadata()
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false)
    {
        bail!(
            "{}: is a link, not a file of the run; refusing to follow it",
            path.display()
        );
    }
    let bytes = crate::files::read_regular_file(path, max)?;
    String::from_utf8(bytes).with_context(|| format!("{}: not UTF-8 text", path.display()))
}

/// The metrics of a commit at `epoch` hold one JSON line per epoch, numbered 1..=epoch.
fn check_metrics(text: &str, epoch: usize, path: &Path) -> Result<()> {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() != epoch {
        bail!(
            "{}: holds {} lines but the commit is epoch {epoch}: the run is out of step",
            path.display(),
            lines.len()
        );
    }
    for (i, line) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))?;
        if v.get("epoch").and_then(|e| e.as_u64()) != Some(i as u64 + 1) {
            bail!(
                "{}: line {} is not epoch {}: the run is out of step",
                path.display(),
                i + 1,
                i + 1
            );
        }
    }
    Ok(())
}
