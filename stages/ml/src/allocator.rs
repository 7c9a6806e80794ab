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
//! Two settings matter. Transparent huge pages stay off for mimalloc's memory (the `no_thp`
//! feature: mimalloc does not ask for them; with them, the kernel's compaction at page faults
//! took 17–26 s of system time in those 3 steps). And freed memory goes back to the system
//! after [`PURGE_DELAY_MS`] instead of mimalloc's 10 ms, so that the next microbatch reuses
//! more of it instead of faulting it in again; a longer delay ran slightly faster (1 s:
//! 36.2 / 31.0 s) but kept freed blocks of other sizes resident beside new ones (5604 /
//! 3836 MiB, and up to 37% more than the tensors in the LM head's backward of a 262k
//! vocabulary).

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

/// mimalloc 2's `mi_option_purge_delay` (its `mimalloc.h`), which the Rust bindings do not
/// export.
const MI_OPTION_PURGE_DELAY: mi_option_t = 15;

/// How long freed memory stays with the process before mimalloc returns it to the system.
pub const PURGE_DELAY_MS: i64 = 100;

/// mimalloc's environment variable for the purge delay, which takes precedence when set.
const PURGE_DELAY_VAR: &str = "MIMALLOC_PURGE_DELAY";

/// Applies haloflow's allocator settings (call once, early in `main`); returns the purge delay
/// in force, in milliseconds.
pub fn configure() -> i64 {
    if std::env::var_os(PURGE_DELAY_VAR).is_none() {
        // SAFETY: sets one of mimalloc's option values; mimalloc reads options atomically.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as _) };
    }
    // SAFETY: reads one option value.
    let delay = unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) } as i64;
    tracing::debug!(purge_delay_ms = delay, "allocator: mimalloc");
    delay
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

    #[test]
    fn the_purge_delay_is_set_unless_the_environment_sets_it() {
        let delay = configure();
        match std::env::var(PURGE_DELAY_VAR) {
            Ok(v) => assert_eq!(delay.to_string(), v),
            Err(_) => assert_eq!(delay, PURGE_DELAY_MS),
        }
    }
}
