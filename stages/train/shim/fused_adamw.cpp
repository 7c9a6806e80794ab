// libtorch's fused multi-tensor AdamW (at::_fused_adamw_, CPU and CUDA kernels), which tch
// does not bind, over tch tensors (a tch tensor handle is an `at::Tensor*`). Every C++
// exception is caught here and returned as a malloc'd message; nothing throws across the ABI.

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>

namespace {

char* copy_message(const std::string& text) {
  char* out = static_cast<char*>(std::malloc(text.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, text.c_str(), text.size() + 1);
  }
  return out;
}

std::vector<at::Tensor> tensors(at::Tensor** ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*ts[i]);
  }
  return out;
}

}  // namespace

extern "C" {

// One AdamW step (torch.optim.AdamW with fused=True, amsgrad and maximize off) of the n
// tensors `params` in place, with gradients `grads` and moments `exp_avgs`, `exp_avg_sqs`,
// at optimizer step `step` (1-based; the bias corrections' count). All tensors share one
// device and dtype. Returns 0, or 1 with *err set.
int halo_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs, size_t n,
                     double step, double lr, double beta1, double beta2, double weight_decay, double eps, char** err) {
  try {
    if (n == 0) {
      return 0;
    }
    auto ps = tensors(params, n);
    // The step count as the kernel reads it: an f32 scalar on the tensors' device, one per tensor.
    auto count = at::full({}, step, at::TensorOptions().dtype(at::kFloat).device(ps[0].device()));
    std::vector<at::Tensor> steps(n, count);
    at::_fused_adamw_(ps, tensors(grads, n), tensors(exp_avgs, n), tensors(exp_avg_sqs, n), {}, steps, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const c10::Error& e) {
    *err = copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = copy_message(e.what());
  } catch (...) {
    *err = copy_message("unknown C++ exception");
  }
  return 1;
}

void halo_fused_adamw_free_message(char* message) {
  std::free(message);
}

}  // extern "C"
