//! Sizes checked before they are allocated.
//!
//! Every count that comes from a flag or a file (steps, widths, samples, image counts, file
//! lengths) is turned into the bytes it implies with checked arithmetic and compared with the
//! memory this machine can give, before anything of that size is allocated. The answer is one
//! line naming the flag or file, what it asked for and the limit.

use anyhow::{Result, bail};

/// Bytes of memory a single allocation plan may use: `ELBO_MEMORY_LIMIT` (bytes) when set,
/// else the smallest of what the machine has (`MemAvailable` in `/proc/meminfo`), what the
/// process's address-space limit leaves (`RLIMIT_AS`, as `ulimit -v` sets it, less the
/// current `VmSize`) and what its cgroup leaves (`memory.max - memory.current`, or cgroup v1's
/// `limit_in_bytes - usage_in_bytes`); 16 GiB when none of them can be read.
pub fn memory_budget() -> u64 {
    if let Some(v) = std::env::var("ELBO_MEMORY_LIMIT")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        return v;
    }
    [mem_available(), address_space_left(), cgroup_left()]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(16 << 30)
}

/// A `Key:   123 kB` line of a `/proc` file, in bytes.
fn proc_kib(path: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok().and_then(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib.saturating_mul(1024))
    })
}

fn mem_available() -> Option<u64> {
    proc_kib("/proc/meminfo", "MemAvailable:")
}

/// `RLIMIT_AS` less the address space already mapped; `None` when unlimited.
fn address_space_left() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    let used = proc_kib("/proc/self/status", "VmSize:").unwrap_or(0);
    Some(limit.rlim_cur.saturating_sub(used))
}

/// What the process's cgroup may still use; `None` when it has no limit.
fn cgroup_left() -> Option<u64> {
    let number =
        |path: &str| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    // The process's own cgroup (v2: one line "0::/path").
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|p| p.trim().to_string())
        });
    if let Some(own) = own {
        let dir = format!("/sys/fs/cgroup{}", own.trim_end_matches('/'));
        if let Some(max) = number(&format!("{dir}/memory.max")) {
            let current = number(&format!("{dir}/memory.current")).unwrap_or(0);
            return Some(max.saturating_sub(current));
        }
    }
    if let Some(max) = number("/sys/fs/cgroup/memory.max") {
        return Some(max.saturating_sub(number("/sys/fs/cgroup/memory.current").unwrap_or(0)));
    }
    // cgroup v1 reports "no limit" as a huge number; anything above 2^60 is that.
    let max = number("/sys/fs/cgroup/memory/memory.limit_in_bytes").filter(|&m| m < 1 << 60)?;
    Some(max.saturating_sub(number("/sys/fs/cgroup/memory/memory.usage_in_bytes").unwrap_or(0)))
}

/// `a * b * ...` in u64, `None` on overflow.
pub fn product(factors: &[u64]) -> Option<u64> {
    factors.iter().try_fold(1u64, |acc, &f| acc.checked_mul(f))
}

/// Human-readable bytes: `1.5 GB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e12 {
        format!("{:.1} TB", b / 1e12)
    } else if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{bytes} bytes")
    }
}

/// Fails with one line unless `bytes` (None = overflowed u64) fits the memory budget.
/// `what` names the flag or file and the value, e.g. `"--steps 1000000000"`.
pub fn check_bytes(what: &str, purpose: &str, bytes: Option<u64>) -> Result<()> {
    let budget = memory_budget();
    match bytes {
        Some(b) if b <= budget => Ok(()),
        Some(b) => bail!(
            "{what}: {purpose} would need {}, more than the {} of memory available",
            human(b),
            human(budget)
        ),
        None => bail!(
            "{what}: {purpose} would need more than 2^64 bytes, more than the {} of memory available",
            human(budget)
        ),
    }
}

/// Fails with one line unless `1 <= value`: `"--epochs must be at least 1"`.
pub fn at_least_one(flag: &str, value: usize) -> Result<()> {
    if value == 0 {
        bail!("{flag} must be at least 1");
    }
    Ok(())
}

/// The ceiling of every count flag: far above any published protocol (the IWAE paper's 3,280
/// passes and k = 5000, DDPM's T = 1000, improved-diffusion's T = 4000), far below what would
/// run for ever or overflow a size. Each flag's own ceiling, where it has one, is below this.
pub const COUNT_CEILING: usize = 100_000_000;

/// Fails with one line unless `1 <= value <= max`, naming the flag and its ceiling:
/// `"--iw-samples 18446744073709551615: at most 10000000"`.
pub fn count(flag: &str, value: usize, max: usize) -> Result<()> {
    at_least_one(flag, value)?;
    if value > max {
        bail!("{flag} {value}: at most {max} (this flag's ceiling)");
    }
    Ok(())
}

/// The most work one command may be asked for, in multiply-adds: 10^15, about three days of
/// a 2-core machine at 4 GFLOP/s (the IWAE paper's whole test evaluation, 10,000 digits x
/// k = 5000 x 0.5 M weights, is 2.6 x 10^13). `ELBO_WORK_CEILING` (a number) sets another,
/// for a faster machine.
pub const WORK_CEILING: f64 = 1e15;

/// [`WORK_CEILING`], or `ELBO_WORK_CEILING` when it is set to a positive number.
pub fn work_ceiling() -> f64 {
    std::env::var("ELBO_WORK_CEILING")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(WORK_CEILING)
}

/// Fails with one line when `units` (network evaluations; `None` = overflowed) times
/// `cost` (multiply-adds of one) exceeds [`work_ceiling`]. `what` names the flags that set it,
/// with their values.
pub fn check_work(what: &str, units: Option<u64>, cost: u64) -> Result<()> {
    let work = units.map_or(f64::INFINITY, |u| u as f64 * cost.max(1) as f64);
    let ceiling = work_ceiling();
    if work > ceiling {
        bail!(
            "{what}: about {work:.1e} multiply-adds, more than the {ceiling:.0e} one command may do (ELBO_WORK_CEILING raises it); lower them"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_and_budget_are_refused_with_the_flag() {
        assert_eq!(product(&[u64::MAX, 2]), None);
        assert_eq!(product(&[3, 4]), Some(12));
        let e = check_bytes("--steps 18446744073709551615", "the schedule", None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--steps 18446744073709551615"), "{e}");
        let e = check_bytes("--n 9", "x", Some(u64::MAX))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than"), "{e}");
        assert!(check_bytes("--n 9", "x", Some(1)).is_ok());
        assert!(memory_budget() > 1 << 20);
    }

    #[test]
    fn counts_and_work_have_ceilings_that_name_the_flag() {
        let e = count("--iw-samples", usize::MAX, 10)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--iw-samples 18446744073709551615: at most 10"),
            "{e}"
        );
        assert!(
            count("--n", 0, 10)
                .unwrap_err()
                .to_string()
                .contains("at least 1")
        );
        assert!(count("--n", 10, 10).is_ok());
        let e = check_work(
            "--iw-samples 1000000000 x 10000 examples",
            Some(10_000_000_000_000),
            500_000,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("--iw-samples 1000000000 x 10000 examples: about 5.0e18"),
            "{e}"
        );
        assert!(check_work("x", None, 1).is_err());
        assert!(check_work("x", Some(10_000 * 5000), 521_084).is_ok());
    }
}
