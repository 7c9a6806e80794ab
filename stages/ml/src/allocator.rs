//! The allocator of every binary that links this crate: mimalloc, for Rust and libtorch.
//! mimalloc's `override` feature makes it the process's `malloc`, `free` and `posix_memalign`,
//! which both Rust's system allocator and libtorch's CPU allocator call, so a training step's
//! activations come from it. The stages that run models apply haloflow's settings with
//! [`configure`] (through `device::init_process`).
//!
//! Why not glibc: its heap either keeps the freed blocks of one step's activations in a heap
//! that grows by fragmentation from step to step (its default, rising mmap threshold) or maps
//! and faults every large block in afresh (a fixed threshold). Measured on SmolLM2-135M
//! (ci/bench-memory.sh's 3 KTO steps, microbatch 8, 1 thread; full training / LoRA): glibc's
//! default peaked at 6300 / 5712 MiB in 37.5 / 32.3 s, glibc with a 1 MiB threshold at
//! 5588 / 3942 MiB in 42.1 / 40.8 s (11–14 s of it in the kernel, faulting pages in), mimalloc
//! as configured here at 5499 / 3681 MiB in 39.5 / 30.4 s.
//!
//! Three settings matter. Transparent huge pages stay off for mimalloc's memory (the `no_thp`
//! feature: mimalloc does not ask for them; with them, the kernel's compaction at page faults
//! took 17–26 s of system time in those 3 steps). Freed memory is purged after
//! [`PURGE_DELAY_MS`] instead of mimalloc's 10 ms, so that the next microbatch reuses more of
//! it instead of faulting it in again; a longer delay ran slightly faster (1 s: 36.2 / 31.0 s)
//! but kept freed blocks of other sizes resident beside new ones (5604 / 3836 MiB, and up to
//! 37% more than the tensors in the LM head's backward of a 262k vocabulary). And a purge
//! hands the pages back lazily ([`PURGE_DECOMMITS`] off: `MADV_FREE`, not mimalloc's default
//! `MADV_DONTNEED`): the kernel takes them only when it needs memory, so the next microbatch
//! usually finds its activations' pages still mapped instead of faulting in zeroed ones (about
//! 700 k page faults per step of bench-scaling's KTO step on SmolLM2, 2.9 GB, the whole
//! activation memory once per microbatch). Until the kernel takes them, those pages count in
//! the process's RSS (`LazyFree` in /proc/PID/smaps_rollup).

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

/// mimalloc 2's `mi_option_purge_decommits` and `mi_option_purge_delay` (its `mimalloc.h`),
/// which the Rust bindings do not export.
const MI_OPTION_PURGE_DECOMMITS: mi_option_t = 5;
const MI_OPTION_PURGE_DELAY: mi_option_t = 15;

/// How long freed memory stays with the process before mimalloc purges it.
pub const PURGE_DELAY_MS: i64 = 100;

/// Whether a purge decommits the pages (they fault in zeroed when used again) rather than
/// marking them free for the kernel to take when it needs them.
pub const PURGE_DECOMMITS: bool = false;

/// The settings applied, each with mimalloc's environment variables for it, which take
/// precedence when set (`MIMALLOC_RESET_*` are mimalloc's older names).
const SETTINGS: [(mi_option_t, i64, &[&str]); 2] = [
    (MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS, &["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]),
    (MI_OPTION_PURGE_DECOMMITS, PURGE_DECOMMITS as i64, &["MIMALLOC_PURGE_DECOMMITS", "MIMALLOC_RESET_DECOMMITS"]),
];

/// The allocator settings in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Milliseconds before freed memory is purged (-1: never).
    pub purge_delay_ms: i64,
    /// Whether a purge decommits (see [`PURGE_DECOMMITS`]).
    pub purge_decommits: bool,
}

/// Applies haloflow's allocator settings (call once, early in `main`); returns those in force.
pub fn configure() -> Settings {
    for (option, value, vars) in SETTINGS {
        if vars.iter().all(|v| std::env::var_os(v).is_none()) {
            // SAFETY: sets one of mimalloc's option values; mimalloc reads options atomically.
            unsafe { mi_option_set(option, value as _) };
        }
    }
    // SAFETY: reads option values.
    let settings = unsafe {
        Settings { purge_delay_ms: mi_option_get(MI_OPTION_PURGE_DELAY) as i64, purge_decommits: mi_option_get(MI_OPTION_PURGE_DECOMMITS) != 0 }
    };
    tracing::debug!(?settings, "allocator: mimalloc");
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libc_allocations_come_from_mimalloc() {
        // What libtorch gets: C's malloc and posix_memalign, resolved to mimalloc.
        // SAFETY: plain allocations, checked and freed here.
        unsafe {
            let p = libc::malloc(4 << 20);
            let mut q = std::ptr::null_mut();
            assert_eq!(libc::posix_memalign(&mut q, 64, 4 << 20), 0);
            assert!(!p.is_null() && !q.is_null());
            let owned = libmimalloc_sys::mi_is_in_heap_region(p) && libmimalloc_sys::mi_is_in_heap_region(q);
            libc::free(p);
            libc::free(q);
            assert!(owned, "malloc is not mimalloc's: the override is not linked");
        }
    }

    /// This thread's minor page faults so far.
    fn minor_faults() -> i64 {
        // SAFETY: getrusage fills the struct it is given.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
            usage.ru_minflt
        }
    }

    #[test]
    fn purged_memory_comes_back_without_page_faults() {
        let settings = configure();
        const BYTES: usize = 64 << 20;
        let pages = (BYTES / 4096) as i64;
        // One block's life: allocated, written (every page faults in once), freed.
        let touch = || {
            // SAFETY: a plain allocation, written within its size and freed.
            unsafe {
                let p = libc::malloc(BYTES).cast::<u8>();
                assert!(!p.is_null());
                std::ptr::write_bytes(p, 1, BYTES);
                // Kept from the optimizer, which may drop a block that is never read.
                libc::free(std::hint::black_box(p).cast());
            }
        };
        touch();
        // SAFETY: runs the purges the free scheduled now, whatever their delay.
        unsafe { libmimalloc_sys::mi_collect(true) };
        let before = minor_faults();
        touch();
        let faults = minor_faults() - before;
        if settings.purge_decommits {
            assert!(faults > pages / 2, "decommitted pages came back with only {faults} faults of {pages} pages");
        } else {
            assert!(faults < pages / 10, "a block reused after a purge faulted {faults} of its {pages} pages in again");
        }
    }

    #[test]
    fn the_settings_are_applied_unless_the_environment_sets_them() {
        let settings = configure();
        let from_env = |vars: &[&str]| vars.iter().find_map(|v| std::env::var(v).ok());
        match from_env(SETTINGS[0].2) {
            Some(v) => assert_eq!(settings.purge_delay_ms.to_string(), v),
            None => assert_eq!(settings.purge_delay_ms, PURGE_DELAY_MS),
        }
        if from_env(SETTINGS[1].2).is_none() {
            assert_eq!(settings.purge_decommits, PURGE_DECOMMITS);
        }
    }
}
