// Dropping gradients, which tch cannot: torch's zero_grad(set_to_none=True) (see
// stages/ml/shim/ffi_guard.h for the boundary's rules).

#include <ATen/core/Tensor.h>

extern "C" {

// Drops the gradients of the n tensors `params`: their memory goes back to the allocator, and
// the next backward pass makes them anew (its first accumulation takes the incoming gradient
// as it is). Cannot fail.
void halo_release_grads(at::Tensor** params, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    params[i]->mutable_grad().reset();
  }
}

}  // extern "C"
