//! glibc's heap in a training process. glibc serves blocks above its mmap threshold with
//! their own mappings, returned to the system when freed, and the rest from a heap that keeps
//! what is freed. The threshold starts at 128 KiB and rises to the size of each large block
//! freed (up to 32 MiB), so after the first step nearly every activation tensor of a small
//! model comes from the heap, which grows by fragmentation from step to step. Measured on
//! SmolLM2-135M with LoRA (ci/bench-memory.sh's 3 KTO steps, 1 thread): peak RSS 5833–5959 MiB
//! with glibc's rising threshold, 3924–3930 MiB with it fixed at 1 MiB (and 3597 MiB at
//! 128 KiB), for 8.4 M more page faults and 1.7% more CPU time (user + system) at 1 MiB, 15% at
//! 128 KiB. halo-train fixes it at 1 MiB ([`fix_mmap_threshold`]) unless told otherwise.

use anyhow::{ensure, Result};

/// glibc's environment variables that set the threshold (or switch off its rising) already.
const TUNABLES: [&str; 3] = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"];

/// Fixes glibc's mmap threshold at `kib` KiB (0: leaves glibc's rising threshold), unless one
/// of glibc's own tunables in the environment already decides it. Returns the threshold set.
pub fn fix_mmap_threshold(kib: usize) -> Result<Option<usize>> {
    if kib == 0 || TUNABLES.iter().any(|v| std::env::var_os(v).is_some()) {
        return Ok(None);
    }
    set_threshold(kib)?;
    tracing::debug!(kib, "glibc's mmap threshold fixed");
    Ok(Some(kib))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_threshold(kib: usize) -> Result<()> {
    let bytes = i32::try_from(kib * 1024).ok().filter(|&b| b <= 32 << 20);
    ensure!(bytes.is_some(), "--malloc-mmap-threshold-kib {kib}: glibc takes at most 32768 KiB");
    // SAFETY: mallopt only sets an allocator parameter; glibc serialises it with allocations.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes.expect("checked")) };
    ensure!(ok == 1, "glibc refused mmap threshold {kib} KiB");
    Ok(())
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_threshold(_kib: usize) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_beyond_glibcs_limit_are_refused_by_name() {
        if TUNABLES.iter().any(|v| std::env::var_os(v).is_some()) {
            eprintln!("SKIPPED: a glibc malloc tunable is set in the environment");
            return;
        }
        assert_eq!(fix_mmap_threshold(0).unwrap(), None);
        let err = fix_mmap_threshold(40_000).unwrap_err().to_string();
        assert!(err.contains("--malloc-mmap-threshold-kib 40000"), "{err}");
        assert_eq!(fix_mmap_threshold(1024).unwrap(), Some(1024));
    }
}
