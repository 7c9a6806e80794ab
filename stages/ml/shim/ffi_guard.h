// What haloflow's C++ shims (crates/dist's c10d shim, halo-train's fused AdamW) share at the
// Rust boundary: a tch tensor handle is an `at::Tensor*`, and every C++ exception is caught and
// returned as a malloc'd message, so nothing throws across the ABI.
#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace halo_ffi {

// A malloc'd copy of `text` (freed by the shim's *_free_message).
inline char* copy_message(const std::string& text) {
  char* out = static_cast<char*>(std::malloc(text.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, text.c_str(), text.size() + 1);
  }
  return out;
}

// An exception's message without the C++ backtrace c10 appends.
inline std::string first_lines(const std::exception& e) {
  std::string text = e.what();
  if (auto c10 = dynamic_cast<const c10::Error*>(&e)) {
    text = c10->what_without_backtrace();
  }
  return text;
}

// Runs `body`: 0, or 1 with *err set to the exception's message.
template <typename F>
int guarded(char** err, F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    *err = copy_message(first_lines(e));
  } catch (...) {
    *err = copy_message("unknown C++ exception");
  }
  return 1;
}

// The tensors behind n tch handles.
inline std::vector<at::Tensor> tensors(at::Tensor** ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*ts[i]);
  }
  return out;
}

}  // namespace halo_ffi
