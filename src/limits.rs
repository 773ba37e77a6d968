//! Sizes checked before they are allocated.
//!
//! Every count that comes from a flag or a file (steps, widths, samples, image counts, file
//! lengths) is turned into the bytes it implies with checked arithmetic and compared with the
//! memory this machine can give, before anything of that size is allocated. The answer is one
//! line naming the flag or file, what it asked for and the limit.

use anyhow::{Result, bail};

/// Bytes of memory a single allocation plan may use: `ELBO_MEMORY_LIMIT` (bytes) when set,
/// else `MemAvailable` from `/proc/meminfo`, else 16 GiB.
pub fn memory_budget() -> u64 {
    if let Some(v) = std::env::var("ELBO_MEMORY_LIMIT")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        return v;
    }
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map(|kib| kib.saturating_mul(1024))
        .unwrap_or(16 << 30)
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
}
