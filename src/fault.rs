//! Fault injection for the file-system steps of a save, so that tests can stop a run at
//! every step of a commit deterministically instead of by timing luck.
//!
//! `ELBO_FAULT=kill@N` aborts the process (no clean-up, as SIGKILL) just before the N-th
//! file-system step (counted from 1 over the whole process); `ELBO_FAULT=enospc@N` makes that
//! step fail with "No space left on device". `ELBO_FAULT_TRACE=1` prints each step to stderr.
//! Unset (the normal case), [`step`] only counts.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Kill,
    NoSpace,
}

fn plan() -> Option<(Kind, u64)> {
    static PLAN: OnceLock<Option<(Kind, u64)>> = OnceLock::new();
    *PLAN.get_or_init(|| {
        let v = std::env::var("ELBO_FAULT").ok()?;
        let (kind, at) = v.split_once('@')?;
        let kind = match kind {
            "kill" => Kind::Kill,
            "enospc" => Kind::NoSpace,
            _ => return None,
        };
        Some((kind, at.parse().ok()?))
    })
}

static STEPS: AtomicU64 = AtomicU64::new(0);

/// Counts one file-system step named `what`; injects the planned fault when its turn comes.
pub fn step(what: &str) -> std::io::Result<()> {
    let n = STEPS.fetch_add(1, Ordering::SeqCst) + 1;
    if std::env::var_os("ELBO_FAULT_TRACE").is_some() {
        eprintln!("fs step {n}: {what}");
    }
    match plan() {
        Some((Kind::Kill, at)) if at == n => std::process::abort(),
        Some((Kind::NoSpace, at)) if at == n => Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!("{what}: {}", std::io::Error::from_raw_os_error(28)),
        )),
        _ => Ok(()),
    }
}

/// `ELBO_FAULT_RANK=R@N`: the process of rank R dies (aborts, as a crash would: no MPI
/// clean-up) at its N-th training step, counted from 1; for the data-parallel tests, where
/// the other ranks must then end with a message instead of waiting forever.
pub fn training_step(rank: usize) {
    static PLAN: OnceLock<Option<(usize, u64)>> = OnceLock::new();
    static TRAINING_STEPS: AtomicU64 = AtomicU64::new(0);
    let plan = PLAN.get_or_init(|| {
        let v = std::env::var("ELBO_FAULT_RANK").ok()?;
        let (r, at) = v.split_once('@')?;
        Some((r.parse().ok()?, at.parse().ok()?))
    });
    let n = TRAINING_STEPS.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some((r, at)) = *plan
        && r == rank
        && at == n
    {
        eprintln!("ELBO_FAULT_RANK: rank {rank} dies at training step {n}");
        std::process::abort();
    }
}
