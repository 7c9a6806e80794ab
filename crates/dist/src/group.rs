//! The process group behind [`crate::Dist`]: the C ABI of shim/c10d_shim.cpp when the crate was
//! built with it (cfg `halo_c10d`), else an uninhabited type, so nothing can be called.

/// A reduction a shim knows: SUM, MAX, MIN (average is a sum divided in Rust).
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Sum = 0,
    Max = 1,
    Min = 2,
}

#[cfg(halo_c10d)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void, CStr, CString};
    use std::ptr::NonNull;
    use std::time::Duration;

    use anyhow::{bail, Result};
    use tch::Tensor;

    use super::Op;
    use crate::env::Rendezvous;

    extern "C" {
        fn halo_dist_new(backend: *const c_char, host: *const c_char, port: u16, rank: c_int, world: c_int, serve: c_int, prefix: *const c_char, timeout_ms: i64, err: *mut *mut c_char) -> *mut c_void;
        fn halo_dist_free(g: *mut c_void);
        fn halo_dist_free_message(message: *mut c_char);
        fn halo_dist_all_reduce(g: *mut c_void, ts: *const *mut c_void, n: usize, op: c_int, coalesced: c_int, err: *mut *mut c_char) -> c_int;
        fn halo_dist_broadcast(g: *mut c_void, t: *mut c_void, root: c_int, err: *mut *mut c_char) -> c_int;
        fn halo_dist_all_gather(g: *mut c_void, outs: *const *mut c_void, n: usize, input: *mut c_void, err: *mut *mut c_char) -> c_int;
        fn halo_dist_reduce_scatter(g: *mut c_void, out: *mut c_void, ins: *const *mut c_void, n: usize, op: c_int, err: *mut *mut c_char) -> c_int;
        fn halo_dist_barrier(g: *mut c_void, err: *mut *mut c_char) -> c_int;
        fn halo_dist_probe(g: *mut c_void, timeout_ms: i64, lost: *mut c_int, cap: usize, n_lost: *mut usize, err: *mut *mut c_char) -> c_int;
        fn halo_dist_all_reduce_async(g: *mut c_void, ts: *const *mut c_void, n: usize, op: c_int, coalesced: c_int, err: *mut *mut c_char) -> *mut c_void;
        fn halo_dist_all_gather_into_async(g: *mut c_void, out: *mut c_void, input: *mut c_void, err: *mut *mut c_char) -> *mut c_void;
        fn halo_dist_work_wait(w: *mut c_void, err: *mut *mut c_char) -> c_int;
        fn halo_dist_work_free(w: *mut c_void);
        fn halo_dist_buckets_new(g: *mut c_void, ps: *const *mut c_void, n: usize, bucket_of: *const usize, err: *mut *mut c_char) -> *mut c_void;
        fn halo_dist_buckets_free(b: *mut c_void);
        fn halo_dist_buckets_arm(b: *mut c_void);
        fn halo_dist_buckets_finish(b: *mut c_void, counts: *mut usize, err: *mut *mut c_char) -> c_int;
        fn halo_dist_buckets_order(b: *mut c_void, out: *mut usize);
        fn halo_dist_buckets_assign(b: *mut c_void, order: *const usize, bucket_of: *const usize, err: *mut *mut c_char) -> c_int;
        fn halo_dist_buckets_new_slices(
            g: *mut c_void,
            ps: *const *mut c_void,
            n: usize,
            slices: i64,
            param: *const usize,
            offset: *const i64,
            len: *const i64,
            bucket: *const usize,
            n_pieces: usize,
            numel: *const i64,
            n_buckets: usize,
            dest: *mut c_void,
            shard_grads: c_int,
            err: *mut *mut c_char,
        ) -> *mut c_void;
    }

    /// A c10d process group (and its store), owned.
    pub struct Group(NonNull<c_void>);

    // SAFETY: c10d process groups are used from several threads by torch itself; the shim
    // holds no thread-local state.
    unsafe impl Send for Group {}
    unsafe impl Sync for Group {}

    impl Drop for Group {
        fn drop(&mut self) {
            // SAFETY: created by halo_dist_new, freed once.
            unsafe { halo_dist_free(self.0.as_ptr()) }
        }
    }

    /// Runs a shim call, turning its error message into an `Err`.
    fn call(f: impl FnOnce(*mut *mut c_char) -> c_int) -> Result<(), String> {
        let mut err: *mut c_char = std::ptr::null_mut();
        if f(&mut err) == 0 {
            return Ok(());
        }
        if err.is_null() {
            return Err("out of memory for the error message".into());
        }
        // SAFETY: a NUL-terminated string malloc'd by the shim, freed here once.
        let text = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
        unsafe { halo_dist_free_message(err) };
        Err(text)
    }

    /// Runs a shim call that returns a new object, null with its error message on failure.
    fn create(f: impl FnOnce(*mut *mut c_char) -> *mut c_void) -> Result<NonNull<c_void>, String> {
        let mut made = std::ptr::null_mut();
        call(|err| {
            made = f(err);
            c_int::from(made.is_null())
        })?;
        NonNull::new(made).ok_or_else(|| "the c10d shim returned nothing and no error".to_string())
    }

    /// A collective in flight (a c10d work handle), owned.
    pub struct Work(NonNull<c_void>);

    // SAFETY: a c10d work handle is waited for from any thread (torch's own futures do); the
    // shim's handle is used by one thread at a time (`wait` borrows, `drop` owns).
    unsafe impl Send for Work {}

    impl Work {
        /// Waits until the collective ended.
        pub fn wait(&self) -> Result<(), String> {
            // SAFETY: a live handle from halo_dist_all_reduce_async or _all_gather_into_async.
            call(|err| unsafe { halo_dist_work_wait(self.0.as_ptr(), err) })
        }
    }

    impl Drop for Work {
        fn drop(&mut self) {
            // SAFETY: created by halo_dist_all_reduce_async or _all_gather_into_async, freed once.
            unsafe { halo_dist_work_free(self.0.as_ptr()) }
        }
    }

    /// Gradient buckets with their hooks on the parameters (shim's `Buckets`), owned; dropping
    /// them removes the hooks.
    pub struct Buckets(NonNull<c_void>, usize);

    impl Buckets {
        /// The parameters by their last accumulation in the last armed step, then the others.
        pub fn order(&self) -> Vec<usize> {
            let mut out = vec![0usize; self.1];
            // SAFETY: a live handle and room for one index per parameter.
            unsafe { halo_dist_buckets_order(self.0.as_ptr(), out.as_mut_ptr()) };
            out
        }

        /// Rebuilds the buckets: parameter `order[j]` in bucket `bucket_of[j]`.
        pub fn assign(&self, order: &[usize], bucket_of: &[usize]) -> Result<(), String> {
            assert!(order.len() == self.1 && bucket_of.len() == self.1);
            // SAFETY: a live handle and one entry per parameter in each slice.
            call(|err| unsafe { halo_dist_buckets_assign(self.0.as_ptr(), order.as_ptr(), bucket_of.as_ptr(), err) })
        }

        /// Arms the hooks for the next backward passes.
        pub fn arm(&self) {
            // SAFETY: a live handle from halo_dist_buckets_new.
            unsafe { halo_dist_buckets_arm(self.0.as_ptr()) }
        }

        /// Starts the buckets the hooks did not, waits for all, redoes those a gradient grew
        /// in after they started: the numbers of buckets started while gradients were still
        /// to come, the others, and those redone.
        pub fn finish(&self) -> Result<[usize; 3], String> {
            let mut counts = [0usize; 3];
            // SAFETY: a live handle and room for the three counts.
            call(|err| unsafe { halo_dist_buckets_finish(self.0.as_ptr(), counts.as_mut_ptr(), err) })?;
            Ok(counts)
        }
    }

    impl Drop for Buckets {
        fn drop(&mut self) {
            // SAFETY: created by halo_dist_buckets_new, freed once.
            unsafe { halo_dist_buckets_free(self.0.as_ptr()) }
        }
    }

    fn ptrs(ts: &[Tensor]) -> Vec<*mut c_void> {
        ts.iter().map(|t| t.as_ptr() as *mut c_void).collect()
    }

    impl Group {
        pub fn new(backend: &str, rv: &Rendezvous, timeout: Duration) -> Result<Group> {
            let c = |s: &str| CString::new(s).map_err(|_| anyhow::anyhow!("NUL byte in {s:?}"));
            let (backend_c, host, prefix) = (c(backend)?, c(&rv.master_addr)?, c(&rv.prefix)?);
            // SAFETY: valid C strings for the call's duration.
            match create(|err| unsafe { halo_dist_new(backend_c.as_ptr(), host.as_ptr(), rv.master_port, rv.rank as c_int, rv.world_size as c_int, rv.serve_store as c_int, prefix.as_ptr(), timeout.as_millis() as i64, err) }) {
                Ok(g) => Ok(Group(g)),
                Err(e) => bail!("{e}"),
            }
        }

        /// Starts an all-reduce of `ts` (coalesced: one collective over all of them); the
        /// tensors must not change until the work ended.
        pub fn all_reduce_async(&self, ts: &[Tensor], op: Op, coalesced: bool) -> Result<Work, String> {
            let p = ptrs(ts);
            // SAFETY: live tensors; c10d keeps its own references to them while the work runs.
            create(|err| unsafe { halo_dist_all_reduce_async(self.0.as_ptr(), p.as_ptr(), p.len(), op as c_int, c_int::from(coalesced), err) }).map(Work)
        }

        /// Starts gathering every rank's `input` into `out` (rank r's at `r × input.numel()`);
        /// neither tensor may change until the work ended.
        pub fn all_gather_into_async(&self, out: &Tensor, input: &Tensor) -> Result<Work, String> {
            // SAFETY: live tensors; c10d keeps its own references to them while the work runs.
            create(|err| unsafe { halo_dist_all_gather_into_async(self.0.as_ptr(), out.as_ptr() as *mut c_void, input.as_ptr() as *mut c_void, err) }).map(Work)
        }

        /// Gradient buckets over `params`, parameter i in bucket `bucket_of[i]`; the group
        /// must outlive them.
        pub fn buckets(&self, params: &[Tensor], bucket_of: &[usize]) -> Result<Buckets, String> {
            assert_eq!(params.len(), bucket_of.len());
            let p = ptrs(params);
            // SAFETY: live tensors (the shim keeps references) and one bucket per tensor.
            create(|err| unsafe { halo_dist_buckets_new(self.0.as_ptr(), p.as_ptr(), p.len(), bucket_of.as_ptr(), err) }).map(|b| Buckets(b, params.len()))
        }

        /// Reduce-scatter buckets over `params` for `slices` ranks: each piece (parameter,
        /// offset, length, bucket) a range of a flattened parameter, in order; bucket k's flat
        /// buffer has `numel[k]` elements; the sums go into `dest` or the gradients. The group
        /// must outlive them.
        pub fn slice_buckets(&self, params: &[Tensor], slices: usize, pieces: &[(usize, i64, i64, usize)], numel: &[i64], dest: Option<&Tensor>, shard_grads: bool) -> Result<Buckets, String> {
            let p = ptrs(params);
            let param: Vec<usize> = pieces.iter().map(|x| x.0).collect();
            let offset: Vec<i64> = pieces.iter().map(|x| x.1).collect();
            let len: Vec<i64> = pieces.iter().map(|x| x.2).collect();
            let bucket: Vec<usize> = pieces.iter().map(|x| x.3).collect();
            // SAFETY: live tensors (the shim keeps references) and arrays of the lengths given.
            create(|err| unsafe {
                halo_dist_buckets_new_slices(self.0.as_ptr(), p.as_ptr(), p.len(), slices as i64, param.as_ptr(), offset.as_ptr(), len.as_ptr(), bucket.as_ptr(), pieces.len(), numel.as_ptr(), numel.len(), dest.map_or(std::ptr::null_mut(), |d| d.as_ptr() as *mut c_void), c_int::from(shard_grads), err)
            })
            .map(|b| Buckets(b, params.len()))
        }

        pub fn all_reduce(&self, ts: &[Tensor], op: Op, coalesced: bool) -> Result<(), String> {
            let p = ptrs(ts);
            // SAFETY: live tensors for the call's duration.
            call(|err| unsafe { halo_dist_all_reduce(self.0.as_ptr(), p.as_ptr(), p.len(), op as c_int, c_int::from(coalesced), err) })
        }

        pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<(), String> {
            call(|err| unsafe { halo_dist_broadcast(self.0.as_ptr(), t.as_ptr() as *mut c_void, root as c_int, err) })
        }

        pub fn all_gather(&self, outs: &[Tensor], input: &Tensor) -> Result<(), String> {
            let p = ptrs(outs);
            call(|err| unsafe { halo_dist_all_gather(self.0.as_ptr(), p.as_ptr(), p.len(), input.as_ptr() as *mut c_void, err) })
        }

        pub fn reduce_scatter(&self, out: &Tensor, inputs: &[Tensor], op: Op) -> Result<(), String> {
            let p = ptrs(inputs);
            call(|err| unsafe { halo_dist_reduce_scatter(self.0.as_ptr(), out.as_ptr() as *mut c_void, p.as_ptr(), p.len(), op as c_int, err) })
        }

        pub fn barrier(&self) -> Result<(), String> {
            call(|err| unsafe { halo_dist_barrier(self.0.as_ptr(), err) })
        }

        /// The ranks that do not answer within `timeout`.
        pub fn probe(&self, world: usize, timeout: Duration) -> Result<Vec<usize>, String> {
            let mut lost: Vec<c_int> = vec![0; world];
            let mut n = 0usize;
            call(|err| unsafe { halo_dist_probe(self.0.as_ptr(), timeout.as_millis() as i64, lost.as_mut_ptr(), world, &mut n, err) })?;
            Ok(lost[..n].iter().map(|&r| r as usize).collect())
        }
    }
}

#[cfg(not(halo_c10d))]
mod ffi {
    use std::time::Duration;

    use anyhow::{bail, Result};
    use tch::Tensor;

    use super::Op;
    use crate::env::Rendezvous;

    /// No process group can exist in a build without the shim.
    pub enum Group {}

    /// No collective can be in flight without a process group.
    pub enum Work {}

    impl Work {
        pub fn wait(&self) -> Result<(), String> {
            match *self {}
        }
    }

    /// No gradient buckets without a process group.
    pub enum Buckets {}

    impl Buckets {
        pub fn order(&self) -> Vec<usize> {
            match *self {}
        }
        pub fn assign(&self, _: &[usize], _: &[usize]) -> Result<(), String> {
            match *self {}
        }
        pub fn arm(&self) {
            match *self {}
        }
        pub fn finish(&self) -> Result<[usize; 3], String> {
            match *self {}
        }
    }

    impl Group {
        pub fn new(_backend: &str, rv: &Rendezvous, _timeout: Duration) -> Result<Group> {
            bail!(
                "this is a {}-process run, but haloflow was built without distributed support: install gloo's headers \
                 (`apt-get install libgloo-dev`, or run ci/bootstrap.sh) and rebuild with the default feature `distributed`",
                rv.world_size
            )
        }
        pub fn all_reduce(&self, _: &[Tensor], _: Op, _: bool) -> Result<(), String> {
            match *self {}
        }
        pub fn broadcast(&self, _: &Tensor, _: usize) -> Result<(), String> {
            match *self {}
        }
        pub fn all_gather(&self, _: &[Tensor], _: &Tensor) -> Result<(), String> {
            match *self {}
        }
        pub fn reduce_scatter(&self, _: &Tensor, _: &[Tensor], _: Op) -> Result<(), String> {
            match *self {}
        }
        pub fn barrier(&self) -> Result<(), String> {
            match *self {}
        }
        pub fn probe(&self, _: usize, _: Duration) -> Result<Vec<usize>, String> {
            match *self {}
        }
        pub fn all_reduce_async(&self, _: &[Tensor], _: Op, _: bool) -> Result<Work, String> {
            match *self {}
        }
        pub fn all_gather_into_async(&self, _: &Tensor, _: &Tensor) -> Result<Work, String> {
            match *self {}
        }
        pub fn buckets(&self, _: &[Tensor], _: &[usize]) -> Result<Buckets, String> {
            match *self {}
        }
        pub fn slice_buckets(&self, _: &[Tensor], _: usize, _: &[(usize, i64, i64, usize)], _: &[i64], _: Option<&Tensor>, _: bool) -> Result<Buckets, String> {
            match *self {}
        }
    }
}

pub use ffi::{Buckets, Group, Work};
