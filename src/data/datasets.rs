//! Named data sets, fetched on first use and verified, as torchvision's `MNIST(root,
//! download=True)` does: each file comes from its publisher's address (or `ELBO_DATA_MIRROR`)
//! into the cache folder (`ELBO_DATA_DIR`, default `~/.cache/elbo`), is checked against a
//! SHA-256 pinned here, is written atomically (a `.partial` file, then a rename), and is never
//! fetched again once valid.
//!
//! The gzip-compressed IDX files are pinned by the SHA-256 of their decompressed bytes, so a
//! mirror that re-compressed them verifies too; archives by the SHA-256 of the archive.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// What a pinned digest covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digested {
    /// The bytes after gunzipping (MNIST-family `.gz` files).
    Inflated,
    /// The file as published (archives).
    Raw,
}

/// One published file.
#[derive(Debug, Clone, Copy)]
pub struct RemoteFile {
    /// The file name as published (and in the cache and under a mirror).
    pub name: &'static str,
    pub sha256: &'static str,
    pub digested: Digested,
}

/// A named data set: its cache and mirror folder name, the publisher's base addresses (tried
/// in order) and its files.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub name: &'static str,
    pub urls: &'static [&'static str],
    pub files: &'static [RemoteFile],
}

const fn inflated(name: &'static str, sha256: &'static str) -> RemoteFile {
    RemoteFile {
        name,
        sha256,
        digested: Digested::Inflated,
    }
}

/// MNIST (LeCun et al. 1998), 60,000 + 10,000 digits; torchvision's addresses.
pub const MNIST: Spec = Spec {
    name: "mnist",
    urls: &[
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    files: &[
        inflated(
            "train-images-idx3-ubyte.gz",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ),
        inflated(
            "train-labels-idx1-ubyte.gz",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ),
        inflated(
            "t10k-images-idx3-ubyte.gz",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        ),
        inflated(
            "t10k-labels-idx1-ubyte.gz",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        ),
    ],
};

/// Fashion-MNIST (Xiao et al. 2017), 60,000 + 10,000; Zalando's address.
pub const FASHION_MNIST: Spec = Spec {
    name: "fashion-mnist",
    urls: &["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    files: &[
        inflated(
            "train-images-idx3-ubyte.gz",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        inflated(
            "train-labels-idx1-ubyte.gz",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
        inflated(
            "t10k-images-idx3-ubyte.gz",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        inflated(
            "t10k-labels-idx1-ubyte.gz",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    ],
};

/// CIFAR-10, binary version (Krizhevsky 2009): 170,052,171 bytes.
pub const CIFAR10: Spec = Spec {
    name: "cifar10",
    urls: &["https://www.cs.toronto.edu/~kriz/"],
    files: &[RemoteFile {
        name: "cifar-10-binary.tar.gz",
        sha256: "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
        digested: Digested::Raw,
    }],
};

/// CIFAR-100, binary version (Krizhevsky 2009).
pub const CIFAR100: Spec = Spec {
    name: "cifar100",
    urls: &["https://www.cs.toronto.edu/~kriz/"],
    files: &[RemoteFile {
        name: "cifar-100-binary.tar.gz",
        sha256: "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
        digested: Digested::Raw,
    }],
};

static OFFLINE: AtomicBool = AtomicBool::new(false);

/// `--offline`: never fetch; a missing file is an error naming where to put it.
pub fn set_offline(offline: bool) {
    OFFLINE.store(offline, Ordering::Relaxed);
}

/// Whether `--offline` or `ELBO_OFFLINE` forbid downloads (data sets and hub checkpoints).
pub fn offline() -> bool {
    OFFLINE.load(Ordering::Relaxed) || std::env::var_os("ELBO_OFFLINE").is_some_and(|v| v != "0")
}

/// The cache folder: `ELBO_DATA_DIR`, else `$XDG_CACHE_HOME/elbo`, else `~/.cache/elbo`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ELBO_DATA_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("elbo");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("elbo")
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 a pinned digest covers, of the file at `path`.
fn digest_of(path: &Path, digested: Digested) -> Result<String> {
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut reader: Box<dyn Read> = match digested {
        Digested::Raw => Box::new(std::io::BufReader::new(file)),
        Digested::Inflated => Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
            file,
        ))),
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("{}: cannot read (not gzip?)", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// The marker written beside a verified file: its digest and size, so that later runs trust
/// it without reading it again.
fn marker(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

fn verified(path: &Path, file: &RemoteFile) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    std::fs::read_to_string(marker(path))
        .is_ok_and(|m| m.trim() == format!("{} {}", file.sha256, meta.len()))
}

/// The folder holding every file of `spec`, verified; fetches what is missing.
pub fn ensure(spec: &Spec) -> Result<PathBuf> {
    let dir = cache_dir().join(spec.name);
    for file in spec.files {
        let path = dir.join(file.name);
        if verified(&path, file) {
            continue;
        }
        if path.is_file() {
            // A file put there by hand (or a marker lost): verified once.
            let got = digest_of(&path, file.digested)?;
            if got != file.sha256 {
                bail!(
                    "--dataset {}: {} has sha256 {got}, expected {}; delete it to fetch it again",
                    spec.name,
                    path.display(),
                    file.sha256
                );
            }
        } else {
            fetch(spec, file, &dir)?;
        }
        let len = std::fs::metadata(&path)?.len();
        crate::files::write_atomic(
            &marker(&path),
            format!("{} {len}\n", file.sha256).as_bytes(),
        )?;
    }
    Ok(dir)
}

/// The addresses `file` is fetched from: the mirror's alone when `ELBO_DATA_MIRROR` is set.
pub fn urls(spec: &Spec, file: &RemoteFile) -> Vec<String> {
    match std::env::var("ELBO_DATA_MIRROR") {
        Ok(m) if !m.is_empty() => vec![format!(
            "{}/{}/{}",
            m.trim_end_matches('/'),
            spec.name,
            file.name
        )],
        _ => spec
            .urls
            .iter()
            .map(|u| format!("{u}{}", file.name))
            .collect(),
    }
}

/// Downloads `file` into `dir` through an exclusive temporary file; verifies it; renames it into
/// place.
fn fetch(spec: &Spec, file: &RemoteFile, dir: &Path) -> Result<()> {
    let path = dir.join(file.name);
    let addresses = urls(spec, file);
    if offline() {
        bail!(
            "--dataset {}: {} is not in {} and --offline forbids fetching it; put it there by hand (from {})",
            spec.name,
            file.name,
            dir.display(),
            addresses[0]
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create folder", dir.display()))?;
    let mut errors = Vec::new();
    for url in &addresses {
        // An exclusive, unpredictably named file beside the target (removed when dropped).
        let mut partial = tempfile::Builder::new()
            .prefix(&format!(".{}.", file.name))
            .suffix(".partial")
            .tempfile_in(dir)
            .with_context(|| format!("{}: cannot write", dir.display()))?;
        match download(url, partial.as_file_mut(), &path) {
            Ok(()) => {
                let got = digest_of(partial.path(), file.digested);
                match got {
                    Ok(got) if got == file.sha256 => {
                        crate::files::check_target(&path)?;
                        partial
                            .persist(&path)
                            .map_err(|e| e.error)
                            .with_context(|| {
                                format!("{}: cannot rename into place", path.display())
                            })?;
                        return Ok(());
                    }
                    Ok(got) => {
                        bail!(
                            "--dataset {}: {url} gave a file with sha256 {got}, expected {}; nothing was kept, the next run fetches it again",
                            spec.name,
                            file.sha256
                        );
                    }
                    Err(e) => {
                        let raw = digest_of(partial.path(), Digested::Raw).unwrap_or_default();
                        bail!(
                            "--dataset {}: {url} gave a corrupt or truncated file (sha256 {raw}, {e:#}); expected its decompressed bytes to have sha256 {}; nothing was kept, the next run fetches it again",
                            spec.name,
                            file.sha256
                        );
                    }
                }
            }
            Err(e) => {
                errors.push(format!("{url}: {e:#}"));
            }
        }
    }
    bail!(
        "--dataset {}: cannot fetch {} ({}); put it in {} by hand, or set ELBO_DATA_MIRROR",
        spec.name,
        file.name,
        errors.join("; "),
        dir.display()
    )
}

/// One HTTP(S) GET into `out` (the temporary file of `to`), with a progress bar; fails on a
/// status other than 200 and on a body shorter than the Content-Length the server announced.
fn download(url: &str, out: &mut std::fs::File, to: &Path) -> Result<()> {
    let response = ureq::get(url).call().context("request failed")?;
    let expected: Option<u64> = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let bar = indicatif::ProgressBar::new(expected.unwrap_or(0));
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{} {{bar:30}} {{bytes}}/{{total_bytes}} [{{elapsed}}<{{eta}}]",
            url.rsplit('/').next().unwrap_or(url)
        ))
        .expect("valid template"),
    );
    let mut body = response.into_body();
    let mut reader = body.with_config().limit(u64::MAX).reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("truncated: the connection broke off after {total} bytes"))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .with_context(|| format!("{}: cannot write", to.display()))?;
        total += n as u64;
        bar.set_position(total);
    }
    bar.finish_and_clear();
    if let Some(e) = expected
        && total != e
    {
        bail!("truncated: {total} of {e} bytes");
    }
    out.sync_all()
        .with_context(|| format!("{}: cannot sync", to.display()))?;
    Ok(())
}
