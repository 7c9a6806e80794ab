//! libtorch's fused multi-tensor AdamW (`at::_fused_adamw_`), through shim/fused_adamw.cpp.

use std::ffi::{c_char, c_int, c_void, CStr};

use anyhow::{bail, ensure, Result};
use tch::Tensor;

use crate::optim::AdamWConfig;

extern "C" {
    fn halo_fused_adamw(
        params: *const *mut c_void,
        grads: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        n: usize,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut *mut c_char,
    ) -> c_int;
    fn halo_fused_adamw_free_message(message: *mut c_char);
}

/// One AdamW step of `targets` in place (as torch.optim.AdamW with `fused=True`), with
/// gradients `grads` and moments `m`, `v`, at optimizer step `t` (1-based): one kernel over
/// all tensors, which share a device and dtype.
pub fn adamw(c: &AdamWConfig, t: i64, lr: f64, targets: &[Tensor], m: &[Tensor], v: &[Tensor], grads: &[Tensor]) -> Result<()> {
    let n = targets.len();
    ensure!(m.len() == n && v.len() == n && grads.len() == n, "fused AdamW: {n} tensors but {} moments, {} second moments, {} gradients", m.len(), v.len(), grads.len());
    let ptrs = |ts: &[Tensor]| ts.iter().map(|t| t.as_ptr() as *mut c_void).collect::<Vec<_>>();
    let (p, g, a, b) = (ptrs(targets), ptrs(grads), ptrs(m), ptrs(v));
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: live tensors for the call's duration; the shim catches every C++ exception.
    let failed = unsafe { halo_fused_adamw(p.as_ptr(), g.as_ptr(), a.as_ptr(), b.as_ptr(), n, t as f64, lr, c.beta1, c.beta2, c.weight_decay, c.eps, &mut err) };
    if failed == 0 {
        return Ok(());
    }
    if err.is_null() {
        bail!("fused AdamW failed (no message: out of memory)");
    }
    // SAFETY: a NUL-terminated string malloc'd by the shim, freed here once.
    let text = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { halo_fused_adamw_free_message(err) };
    bail!("fused AdamW (at::_fused_adamw_) failed: {text}")
}
