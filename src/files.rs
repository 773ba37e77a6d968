//! The one way elbo writes a file, the one way it reads a whole file, and the checks on paths
//! it is given.
//!
//! Every writer (checkpoints, pictures, reports, `eval.json`, the L_t plot, fetched data's
//! markers) goes through [`write_atomic`]: the bytes go to a new temporary file beside the target,
//! created exclusively (`O_CREAT | O_EXCL`, so a planted link or file of that name is never
//! opened) under an unpredictable name, fsynced, then renamed over the target, and the folder is
//! fsynced. A reader sees the old file or the new one, whole; a crash leaves at most a stray
//! `.NAME.XXXXXX.tmp`. A target that exists as a symbolic link, a folder, a pipe or a device is
//! refused with one line: elbo never writes through a link.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::fault;

/// Fails with one line, naming `path`, when it exists as anything but a regular file (a
/// symbolic link, dangling or not, included).
pub fn check_target(path: &Path) -> Result<()> {
    match path.symlink_metadata() {
        Ok(meta) if meta.file_type().is_symlink() => bail!(
            "{}: is a symbolic link; elbo does not write through links (remove it or choose another path)",
            path.display()
        ),
        Ok(meta) if !meta.is_file() => bail!(
            "{}: exists and is not a regular file (a folder, pipe or device); choose another path",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// Writes `bytes` to `path` atomically (see the module doc). The file gets mode 0644.
/// Fault steps, in order: "write temporary file of PATH", "fsync temporary file of PATH",
/// "rename temporary file into place: PATH".
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    check_target(path)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create folder", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let cannot_write = || format!("{}: cannot write", path.display());
    let shown = path.display();
    fault::step(&format!("write temporary file of {shown}")).with_context(cannot_write)?;
    // The temporary file is removed when `tmp` is dropped on any error below.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(cannot_write)?;
    tmp.write_all(bytes).with_context(cannot_write)?;
    fault::step(&format!("fsync temporary file of {shown}")).with_context(cannot_write)?;
    tmp.as_file().sync_all().with_context(cannot_write)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(cannot_write)?;
    }
    // Checked again right before the rename (a rename replaces a link, never writes through
    // it, so a link planted in between is replaced, not followed).
    check_target(path)?;
    fault::step(&format!("rename temporary file into place: {shown}"))
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Creates `path` as a new regular file holding `bytes` and fsyncs it; refuses (without
/// touching it) anything already at `path`, a link included. For files inside a folder elbo has
/// just created itself (an epoch commit's `*.partial` folder). Fault steps "write PATH",
/// "fsync PATH".
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let cannot_write = || format!("{}: cannot write", path.display());
    fault::step(&format!("write {}", path.display())).with_context(cannot_write)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(cannot_write)?;
    f.write_all(bytes).with_context(cannot_write)?;
    fault::step(&format!("fsync {}", path.display()))
        .with_context(|| format!("{}: cannot sync", path.display()))?;
    f.sync_all()
        .with_context(|| format!("{}: cannot sync", path.display()))?;
    Ok(())
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

/// Shortens text from a file for an error message: at most `max` characters, with the count
/// of what was left out.
pub fn excerpt(text: &str, max: usize) -> String {
    let count = text.chars().count();
    if count <= max {
        return text.escape_debug().to_string();
    }
    let head: String = text.chars().take(max).collect();
    format!(
        "{}... ({} more characters)",
        head.escape_debug(),
        count - max
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_at_the_target_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, b"precious").unwrap();
        let out = dir.path().join("grid.png");
        std::os::unix::fs::symlink(&victim, &out).unwrap();
        let err = write_atomic(&out, b"png").unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn a_planted_temporary_name_is_neither_followed_nor_destroyed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, b"precious").unwrap();
        let out = dir.path().join("grid.png");
        std::os::unix::fs::symlink(&victim, dir.path().join("grid.png.tmp")).unwrap();
        std::fs::write(dir.path().join(".grid.png.tmp"), b"mine").unwrap();
        write_atomic(&out, b"png").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"png");
        assert!(!out.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(
            std::fs::read(dir.path().join(".grid.png.tmp")).unwrap(),
            b"mine"
        );
        // Nothing else is left beside the target.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 4);
    }

    #[test]
    fn write_new_refuses_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        write_new(&path, b"1").unwrap();
        assert!(write_new(&path, b"2").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"1");
    }

    #[test]
    fn excerpts_are_bounded() {
        let long = "x".repeat(10_000_000);
        let e = excerpt(&long, 80);
        assert!(e.len() < 200, "{}", e.len());
        assert!(e.ends_with("(9999920 more characters)"));
        assert_eq!(excerpt("ab\n", 80), "ab\\n");
    }
}
