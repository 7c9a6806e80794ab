//! Dropping gradients (torch's `zero_grad(set_to_none=True)`) through shim/grads.cpp: tch can
//! only zero them in place, which keeps their memory through the next forward pass.

use std::ffi::c_void;

use tch::Tensor;

extern "C" {
    fn halo_release_grads(params: *const *mut c_void, n: usize);
}

/// Drops the gradients of `params`: their memory is free until the next backward pass makes
/// them anew, so the forward passes (whose activations make the peak) run without it. The
/// first accumulation then takes the incoming gradient as it is, the same values as adding it
/// to zeros.
pub fn release<'a>(params: impl Iterator<Item = &'a Tensor>) {
    let ptrs: Vec<*mut c_void> = params.map(|p| p.as_ptr() as *mut c_void).collect();
    // SAFETY: live tensors for the call's duration; resetting a gradient cannot throw.
    unsafe { halo_release_grads(ptrs.as_ptr(), ptrs.len()) }
}

#[cfg(test)]
mod tests {
    use tch::{Kind, Tensor};

    /// A dropped gradient is undefined (its memory freed), and the next backward pass makes
    /// it equal to the one into zeroed memory.
    #[test]
    fn released_gradients_come_back_equal() {
        let p = Tensor::from_slice(&[1.0f32, -2.0, 0.5]).set_requires_grad(true);
        let loss = |p: &Tensor| (p * p * p).sum(Kind::Float);
        loss(&p).backward();
        let first = p.grad().copy();
        super::release(std::iter::once(&p));
        assert!(!p.grad().defined());
        loss(&p).backward();
        assert_eq!(Vec::<f32>::try_from(&p.grad()).unwrap(), Vec::<f32>::try_from(&first).unwrap());
    }
}
