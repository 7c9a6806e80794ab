// libtorch's fused multi-tensor AdamW (at::_fused_adamw_, CPU and CUDA kernels), which tch
// does not bind, over tch tensors (see stages/ml/shim/ffi_guard.h for the boundary's rules).

#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/full.h>

#include "ffi_guard.h"

using halo_ffi::tensors;

extern "C" {

// One AdamW step (torch.optim.AdamW with fused=True, amsgrad and maximize off) of the n
// tensors `params` in place, with gradients `grads` and moments `exp_avgs`, `exp_avg_sqs`,
// at optimizer step `step` (1-based; the bias corrections' count). All tensors share one
// device and dtype. Returns 0, or 1 with *err set.
int halo_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs, size_t n,
                     double step, double lr, double beta1, double beta2, double weight_decay, double eps, char** err) {
  return halo_ffi::guarded(err, [&] {
    if (n == 0) {
      return;
    }
    auto ps = tensors(params, n);
    // The step count as the kernel reads it: an f32 scalar on the tensors' device, one per tensor.
    auto count = at::full({}, step, at::TensorOptions().dtype(at::kFloat).device(ps[0].device()));
    std::vector<at::Tensor> steps(n, count);
    at::_fused_adamw_(ps, tensors(grads, n), tensors(exp_avgs, n), tensors(exp_avg_sqs, n), {}, steps, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
  });
}

void halo_fused_adamw_free_message(char* message) {
  std::free(message);
}

}  // extern "C"
