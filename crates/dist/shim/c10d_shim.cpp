// haloflow's C ABI over libtorch's c10d: a TCPStore rendezvous and a Gloo (or NCCL) process
// group, collectives on tch tensors (see stages/ml/shim/ffi_guard.h for the boundary's rules).

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/variable.h>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef HALO_DIST_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "ffi_guard.h"

using halo_ffi::guarded;
using halo_ffi::tensors;

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  bool gloo;
  std::chrono::milliseconds timeout;
};

c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 0: return c10d::ReduceOp::SUM;
    case 1: return c10d::ReduceOp::MAX;
    case 2: return c10d::ReduceOp::MIN;
    default: throw std::invalid_argument("unknown reduce op " + std::to_string(op));
  }
}


void wait(const c10::intrusive_ptr<c10d::Work>& work) {
  work->wait();
}

// Starts an all-reduce of `list` (coalesced: one collective over all of them).
c10::intrusive_ptr<c10d::Work> start_all_reduce(Group* group, std::vector<at::Tensor> list, int op, bool coalesced) {
  if (coalesced) {
    c10d::AllreduceCoalescedOptions opts;
    opts.reduceOp = reduce_op(op);
    return group->backend->allreduce_coalesced(list, opts);
  }
  c10d::AllreduceOptions opts;
  opts.reduceOp = reduce_op(op);
  return group->backend->allreduce(list, opts);
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

// The gradient buckets of a data-parallel step whose collectives overlap the backward pass,
// as torch's DDP reducer does: a post-accumulate-grad hook on every parameter counts its
// gradient's accumulations, and once each parameter of a bucket reached the count it had in
// the previous armed step (1 at first), the bucket's gradients are copied into one flat
// buffer and its collective starts asynchronously. Buckets start strictly in order, so every
// rank issues the same collectives in the same order whatever its hooks saw; `finish` starts
// the buckets the hooks did not, waits for all, and redoes (on every rank) a bucket one of
// whose gradients grew after its collective started (activation checkpointing accumulates a
// layer's gradient once per checkpointed forward, a tied embedding twice).
//
// A bucket holds pieces of parameters (a range of one flattened parameter each) and its flat
// buffer may end in zeros. Two kinds:
// - all-reduce (DDP): whole parameters, whose gradients are views into the bucket's storage
//   (as DDP's gradient_as_bucket_view): the backward pass accumulates into it and the
//   all-reduce runs in place on it, with no copy either way. The first armed step, whose
//   counts are not known yet, starts every bucket after its backward pass. A gradient that
//   grows after its all-reduce started (a count changed) is caught before the accumulation:
//   the sums are kept aside once the all-reduce ends and the storage cleared, so that the
//   redo sums only what came after. As DDP, the Rust side rebuilds these buckets once, after
//   the first step, in the order in which rank 0's gradients became final.
// - reduce-scatter (ZeRO-1, `slices` = the ranks): any ranges, the flat buffer in f32; rank r
//   gets the sums of the buffer's r-th slice, in `dest` (the buckets' slices one after
//   another) or, without it, in its own part of the (f32) gradients after the backward pass
//   (a window started too early is redone from the local gradients). A window's collective is
//   released as soon as it ends (Gloo's work holds copies of its input until then).
//   With `shard_grads` (ZeRO-2; needs `dest`) a window's gradients leave as soon as it is
//   copied: a parameter whose last window it is loses its gradient (its memory free while the
//   backward pass goes on), one that reaches into later windows has its piece zeroed, and the
//   sums are added to `dest` (every armed pass of a step adds its own; `dest` may be empty
//   between steps, and is allocated and zeroed when a step's first window lands). A gradient that grows
//   after its window started then holds only what came later, so the window is redone from
//   that alone and added too (the reduce-scatter is linear).
struct Buckets {
  // Reduce-scatter buckets whose inputs may be held at once (2 × --grad-bucket-mb of f32).
  static constexpr size_t kMaxInFlight = 2;

  struct Piece {
    size_t param;
    int64_t offset, len;
  };
  struct Bucket {
    std::vector<Piece> pieces;  // at most one per parameter
    int64_t numel = 0;          // elements of the flat buffer: the pieces, then zeros
    int64_t dest_offset = 0;    // where its slice of the sums goes in `dest`
    size_t pending = 0;         // parameters not at their expected count yet
    at::Tensor flat, out;       // reduce-scatter: the gradients' copy, this rank's sums
    at::Tensor storage;         // all-reduce: the gradients' memory (each a view into it)
    at::Tensor saved;           // what the gradients held with the sums, when one grew after them
    c10::intrusive_ptr<c10d::Work> work;  // released once a reduce-scatter ended
    bool dirty = false;
    size_t started_at = 0;  // the accumulation whose hook started it (0: none)
  };

  Group* group;  // outlives the buckets (the Rust side holds the process group)
  int64_t slices = 0;  // 0: all-reduce buckets; else reduce-scatter over this many ranks
  at::Tensor dest;     // reduce-scatter: where the slices of the sums go (undefined: the gradients)
  bool shard_grads = false;  // reduce-scatter into `dest`: drop each window's gradients once copied
  int64_t dest_numel = 0;    // the sums' elements (`dest` may be empty until a window lands)
  std::vector<at::Tensor> params;
  std::vector<std::vector<size_t>> buckets_of;  // each parameter's buckets
  std::vector<int64_t> fired, expected;
  std::vector<size_t> last_seen;  // each parameter's last accumulation in the armed step (0: none)
  std::vector<Bucket> buckets;
  size_t next = 0;      // the first bucket not started
  size_t seen = 0;      // accumulations in the armed step
  bool armed = false;
  bool counted = false; // an armed step ended: each parameter's accumulation count is known
  std::vector<unsigned> pre_hooks;  // all-reduce: each parameter's hook before an accumulation
  std::string error;    // the first failure to start a bucket inside a hook
  std::mutex mu;        // hooks run on the autograd engine's device threads on CUDA

  // Reduce-scatter bucket b's pieces of the gradients, flattened in f32 (zeros where a
  // parameter has no gradient on this rank, and after the pieces).
  at::Tensor flatten(const Bucket& b) {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> parts;
    int64_t filled = 0;
    for (const auto& piece : b.pieces) {
      const auto& p = params[piece.param];
      const auto& grad = p.grad();
      parts.push_back(grad.defined() ? grad.reshape({-1}).narrow(0, piece.offset, piece.len).to(at::kFloat) : at::zeros({piece.len}, p.options().dtype(at::kFloat)));
      filled += piece.len;
    }
    if (b.numel > filled || parts.empty()) {
      parts.push_back(at::zeros({b.numel - filled}, params[0].options().dtype(at::kFloat)));
    }
    return at::cat(parts);
  }

  // All-reduce buckets: points each parameter's gradient at its piece of its bucket's
  // storage (made on first use), keeping the gradient's values, unless it already is.
  void attach() {
    at::NoGradGuard no_grad;
    for (auto& b : buckets) {
      if (!b.storage.defined()) b.storage = at::zeros({b.numel}, params[b.pieces.at(0).param].options());
      int64_t at = 0;
      for (const auto& piece : b.pieces) {
        auto& p = params[piece.param];
        if (!aliases(b, piece, at)) {
          auto view = b.storage.narrow(0, at, piece.len).view(p.sizes());
          auto& grad = p.mutable_grad();
          if (grad.defined()) view.copy_(grad);
          grad = view;
        }
        at += piece.len;
      }
    }
  }

  // Whether the gradient of bucket b's (whole-parameter) piece is its view into the storage,
  // `at` elements in.
  bool aliases(const Bucket& b, const Piece& piece, int64_t at) {
    const auto& grad = params[piece.param].grad();
    const auto* view = static_cast<const char*>(b.storage.data_ptr()) + at * b.storage.element_size();
    return grad.defined() && grad.is_contiguous() && grad.data_ptr() == view;
  }

  // Checks that all-reduce bucket b's gradients are still its views (`attach` made them so
  // when armed; only a backward pass that builds a graph, create_graph, replaces them).
  void check_attached(size_t k) {
    const auto& b = buckets[k];
    int64_t at = 0;
    for (const auto& piece : b.pieces) {
      if (!aliases(b, piece, at)) {
        throw std::logic_error("the gradient of parameter " + std::to_string(piece.param) + " (bucket " + std::to_string(k) + ") was replaced during the backward pass, not accumulated in place");
      }
      at += piece.len;
    }
  }

  // Starts bucket k's collective: an all-reduce in place on its storage, or a reduce-scatter
  // of a flat copy.
  void start(size_t k) {
    if (slices > 0) {
      // A reduce-scatter that ended needs its input (and its work) no more: free them before
      // making another, and with kMaxInFlight inputs held, wait for the oldest (the backward
      // pass pauses while the collectives catch up, so a slow network cannot pile up a copy
      // of every gradient; the other ranks started those windows before this one, so they
      // end).
      std::vector<size_t> in_flight;
      for (size_t j = 0; j < k; ++j) {
        auto& b = buckets[j];
        if (!b.flat.defined() || !b.work) continue;
        if (b.work->isCompleted()) {
          release(j);
        } else {
          in_flight.push_back(j);
        }
      }
      for (size_t i = 0; i + kMaxInFlight <= in_flight.size(); ++i) {
        release(in_flight[i]);
      }
    }
    auto& b = buckets[k];
    if (slices == 0) {
      check_attached(k);
      std::vector<at::Tensor> list{b.storage};
      b.work = group->backend->allreduce(list, c10d::AllreduceOptions());
    } else {
      b.flat = flatten(b);
      if (shard_grads) drop_grads(k);
      b.out = dest.defined() && !shard_grads ? dest.narrow(0, b.dest_offset, b.numel / slices) : at::empty({b.numel / slices}, b.flat.options());
      b.work = group->backend->_reduce_scatter_base(b.out, b.flat, c10d::ReduceScatterOptions());
    }
  }

  // Starts, in order, the buckets whose gradients are all final (called by the hooks); for
  // all-reduce buckets (in place: no redo from a copy), once an armed step showed how often
  // each gradient is accumulated.
  void start_ready() {
    while ((counted || slices > 0) && next < buckets.size() && buckets[next].pending == 0) {
      buckets[next].started_at = seen;
      start(next++);
    }
  }

  // Before an accumulation into parameter i's gradient (a hook): an all-reduce bucket of it
  // that started got the gradient too early, and its sums are in the gradients. They are
  // kept aside once the all-reduce ends (see `keep`), to sum only what comes after (`redo`).
  void before_accumulate(size_t i) {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed || !error.empty()) return;
    for (size_t k : buckets_of[i]) {
      auto& b = buckets[k];
      if (k >= next || b.saved.defined()) continue;
      try {
        if (b.work) wait(b.work);
        keep(k);
      } catch (const std::exception& e) {
        error = "gradient bucket " + std::to_string(k) + " (a gradient grew during its collective): " + halo_ffi::first_lines(e);
        return;
      }
    }
  }

  // Keeps aside the sums all-reduce bucket k's storage holds and clears it, to gather what
  // comes after.
  void keep(size_t k) {
    at::NoGradGuard no_grad;
    auto& b = buckets[k];
    b.saved = b.storage.clone();
    b.storage.zero_();
  }

  // With `shard_grads`, once reduce-scatter bucket k copied its pieces: drops the gradient
  // of each parameter whose last bucket it is and zeroes the piece of any other, so that
  // only what a later accumulation adds is there.
  void drop_grads(size_t k) {
    at::NoGradGuard no_grad;
    for (const auto& piece : buckets[k].pieces) {
      auto& grad = params[piece.param].mutable_grad();
      if (!grad.defined()) continue;
      if (buckets_of[piece.param].back() == k) {
        grad.reset();
      } else {
        grad.view({-1}).narrow(0, piece.offset, piece.len).zero_();
      }
    }
  }

  // Reduce-scatter bucket k, once its collective ends: frees its input and the collective
  // (whose Gloo work holds its own copies of the input until released); with `shard_grads`
  // adds its sums to `dest` first.
  void release(size_t k) {
    auto& b = buckets[k];
    if (b.work) {
      wait(b.work);
      b.work.reset();
      if (shard_grads) {
        at::NoGradGuard no_grad;
        // Allocated, zeroed, when a step's first window lands (the optimizer frees it between
        // steps, so the forward passes run without it).
        if (dest.numel() != dest_numel) dest.resize_({dest_numel}).zero_();
        dest.narrow(0, b.dest_offset, b.numel / slices).add_(b.out);
        b.out = at::Tensor();
      }
    }
    b.flat = at::Tensor();
  }

  // Reduces bucket k again, with all of this rank's gradients: a reduce-scatter restarts from
  // a copy of the local gradients (with `shard_grads`, what came after its start, added to
  // the sums); an all-reduce, whose sums are in the gradients, sums what was accumulated
  // after them (the storage `keep` cleared, or nothing on a rank that kept them only now)
  // and adds it to them.
  void redo(size_t k) {
    auto& b = buckets[k];
    if (slices > 0) {
      start(k);
      release(k);
      return;
    }
    if (!b.saved.defined()) keep(k);
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> list{b.storage};
    wait(group->backend->allreduce(list, c10d::AllreduceOptions()));
    b.storage.add_(b.saved);
    b.saved = at::Tensor();
  }

  void ready(size_t i) {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed) return;
    last_seen[i] = ++seen;
    if (++fired[i] == expected[i]) {
      for (size_t k : buckets_of[i]) --buckets[k].pending;
      if (error.empty()) {
        try {
          start_ready();
        } catch (const std::exception& e) {
          error = "starting gradient bucket " + std::to_string(next) + " during backward: " + halo_ffi::first_lines(e);
        }
      }
    } else if (fired[i] > expected[i]) {
      for (size_t k : buckets_of[i]) {
        if (k < next) buckets[k].dirty = true;
      }
    }
  }

  void arm() {
    std::lock_guard<std::mutex> lock(mu);
    std::fill(fired.begin(), fired.end(), 0);
    std::fill(last_seen.begin(), last_seen.end(), 0);
    for (auto& b : buckets) {
      b.pending = b.pieces.size();
      b.flat = at::Tensor();
      b.out = at::Tensor();
      b.saved = at::Tensor();
      b.work.reset();
      b.dirty = false;
      b.started_at = 0;
    }
    if (slices == 0) attach();
    next = 0;
    seen = 0;
    error.clear();
    armed = true;
  }

  // Sets the buckets (not while armed), checking that each parameter has at most one piece
  // per bucket, within its elements, and each bucket at least its pieces' elements.
  void set(std::vector<Bucket> made) {
    const size_t n = params.size();
    std::vector<std::vector<size_t>> of(n);
    for (size_t k = 0; k < made.size(); ++k) {
      int64_t filled = 0;
      for (const auto& piece : made[k].pieces) {
        if (piece.param >= n) throw std::invalid_argument("gradient bucket " + std::to_string(k) + " names parameter " + std::to_string(piece.param) + " of " + std::to_string(n));
        if (!of[piece.param].empty() && of[piece.param].back() == k) throw std::invalid_argument("parameter " + std::to_string(piece.param) + " has two pieces in gradient bucket " + std::to_string(k));
        if (piece.offset < 0 || piece.len <= 0 || piece.offset + piece.len > params[piece.param].numel()) {
          throw std::invalid_argument("a piece of parameter " + std::to_string(piece.param) + " lies outside its " + std::to_string(params[piece.param].numel()) + " elements");
        }
        of[piece.param].push_back(k);
        filled += piece.len;
      }
      if (made[k].numel < filled || (slices > 0 && made[k].numel % slices != 0)) {
        throw std::invalid_argument("gradient bucket " + std::to_string(k) + " of " + std::to_string(made[k].numel) + " elements for pieces of " + std::to_string(filled));
      }
      if (slices > 0) {
        made[k].dest_offset = k == 0 ? 0 : made[k - 1].dest_offset + made[k - 1].numel / slices;
      }
    }
    if (slices > 0) dest_numel = made.empty() ? 0 : made.back().dest_offset + made.back().numel / slices;
    if (dest.defined() && !shard_grads && dest_numel > dest.numel()) {
      throw std::invalid_argument("the gradient buckets' slices do not fit the " + std::to_string(dest.numel()) + " elements of their destination");
    }
    std::lock_guard<std::mutex> lock(mu);
    if (armed) throw std::logic_error("gradient buckets rebuilt while armed");
    buckets = std::move(made);
    buckets_of = std::move(of);
    if (slices == 0) attach();
  }

  // All-reduce buckets of whole parameters: parameter order[j] in bucket bucket_of[j]
  // (numbered from 0 in order), keeping each parameter's expected accumulation count.
  void assign(const size_t* order, const size_t* bucket_of_ordered) {
    if (slices != 0) throw std::logic_error("reduce-scatter buckets are not rebuilt");
    const size_t n = params.size();
    std::vector<bool> placed(n, false);
    std::vector<Bucket> rebuilt;
    for (size_t j = 0; j < n; ++j) {
      size_t i = order[j], k = bucket_of_ordered[j], previous = j == 0 ? 0 : bucket_of_ordered[j - 1];
      if (i >= n || placed[i]) throw std::invalid_argument("the gradient buckets' order is not a permutation of the " + std::to_string(n) + " parameters");
      if (k != previous && (j == 0 || k != previous + 1)) {
        throw std::invalid_argument("gradient buckets must be numbered in order from 0, parameter " + std::to_string(i) + " is in bucket " + std::to_string(k));
      }
      placed[i] = true;
      if (rebuilt.size() <= k) rebuilt.resize(k + 1);
      rebuilt[k].pieces.push_back({i, 0, params[i].numel()});
      rebuilt[k].numel += params[i].numel();
    }
    set(std::move(rebuilt));
  }

  // The parameters in the order in which their gradients became final (their last
  // accumulation) in the last armed step, then those not accumulated in it in their buckets'
  // order (each once).
  void order(size_t* out) {
    std::lock_guard<std::mutex> lock(mu);
    std::vector<size_t> seen_order, rest;
    std::vector<bool> listed(params.size(), false);
    for (const auto& b : buckets) {
      for (const auto& piece : b.pieces) {
        if (listed[piece.param]) continue;
        listed[piece.param] = true;
        (last_seen[piece.param] > 0 ? seen_order : rest).push_back(piece.param);
      }
    }
    std::sort(seen_order.begin(), seen_order.end(), [&](size_t x, size_t y) { return last_seen[x] < last_seen[y]; });
    seen_order.insert(seen_order.end(), rest.begin(), rest.end());
    std::copy(seen_order.begin(), seen_order.end(), out);
  }

  // Copies reduce-scatter bucket k's slice of the sums into this rank's part of the gradients.
  void scatter_own(size_t k) {
    at::NoGradGuard no_grad;
    auto& b = buckets[k];
    const int64_t size = b.numel / slices, lo = group->backend->getRank() * size, hi = lo + size;
    int64_t at = 0;
    for (const auto& piece : b.pieces) {
      const int64_t from = std::max(at, lo), to = std::min(at + piece.len, hi);
      if (from < to) {
        auto& p = params[piece.param];
        auto& grad = p.mutable_grad();
        if (!grad.defined()) grad = at::zeros_like(p);
        grad.view({-1}).narrow(0, piece.offset + from - at, to - from).copy_(b.out.narrow(0, from - lo, to - from));
      }
      at += piece.len;
    }
  }

  // See the struct; counts[0..3]: buckets started while gradients were still to come (by a
  // hook before the armed passes' last accumulation), the others (by that last hook or
  // after the backward pass), and those redone.
  void finish(size_t* counts) {
    std::unique_lock<std::mutex> lock(mu);
    armed = false;
    if (!error.empty()) throw std::runtime_error(error);
    counts[0] = 0;
    for (const auto& b : buckets) {
      if (b.started_at > 0 && b.started_at < seen) ++counts[0];
    }
    counts[1] = buckets.size() - counts[0];
    for (size_t k = next; k < buckets.size(); ++k) {
      try {
        start(k);
      } catch (const std::exception& e) {
        throw std::runtime_error("starting gradient bucket " + std::to_string(k) + " after backward: " + halo_ffi::first_lines(e));
      }
    }
    next = buckets.size();
    // Which buckets some rank must redo: the flags' maximum over the ranks, exchanged before
    // the buckets are waited for, so that each bucket's sums go into the gradients as soon as
    // its all-reduce ends while the later ones still run.
    std::vector<int32_t> mine(buckets.size());
    for (size_t k = 0; k < buckets.size(); ++k) mine[k] = buckets[k].dirty ? 1 : 0;
    auto device = group->gloo || params.empty() ? at::Device(at::kCPU) : params[0].device();
    auto flags = at::tensor(mine, at::kInt).to(device);
    std::vector<at::Tensor> list{flags};
    c10d::AllreduceOptions max;
    max.reduceOp = c10d::ReduceOp::MAX;
    try {
      wait(group->backend->allreduce(list, max));
    } catch (const std::exception& e) {
      throw std::runtime_error("exchanging which gradient buckets to redo: " + halo_ffi::first_lines(e));
    }
    auto again = flags.cpu();
    counts[2] = 0;
    for (size_t k = 0; k < buckets.size(); ++k) {
      try {
        release(k);
      } catch (const std::exception& e) {
        throw std::runtime_error("gradient bucket " + std::to_string(k) + ": " + halo_ffi::first_lines(e));
      }
      if (again[k].item<int32_t>() != 0) {
        ++counts[2];
        try {
          redo(k);
        } catch (const std::exception& e) {
          throw std::runtime_error("gradient bucket " + std::to_string(k) + " (again: a gradient grew after its collective started): " + halo_ffi::first_lines(e));
        }
      }
      if (slices > 0 && !dest.defined()) scatter_own(k);
      buckets[k].out = at::Tensor();
      buckets[k].flat = at::Tensor();
      buckets[k].work.reset();
    }
    for (size_t i = 0; i < params.size(); ++i) {
      if (fired[i] > 0) expected[i] = fired[i];
    }
    counted = true;
  }
};

// The hook on parameter `index`: tells its buckets that an accumulation into its gradient ended.
struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  std::weak_ptr<Buckets> buckets;
  size_t index;
  ReadyHook(std::weak_ptr<Buckets> b, size_t i) : buckets(std::move(b)), index(i) {}
  void operator()(const torch::autograd::Variable&) override {
    if (auto b = buckets.lock()) b->ready(index);
  }
};

}  // namespace

namespace {

// Buckets over the `n` parameters `ps` (see Buckets), made by `fill`, with a hook on each
// parameter; null with *err set on failure.
template <typename Fill>
void* new_buckets(void* g, at::Tensor** ps, size_t n, int64_t slices, char** err, Fill fill) {
  std::shared_ptr<Buckets>* out = nullptr;
  guarded(err, [&] {
    auto b = std::make_shared<Buckets>();
    b->group = static_cast<Group*>(g);
    b->slices = slices;
    b->params = tensors(ps, n);
    b->fired.assign(n, 0);
    b->expected.assign(n, 1);
    b->last_seen.assign(n, 0);
    for (size_t i = 0; i < n; ++i) {
      if (!b->params[i].requires_grad()) {
        throw std::invalid_argument("parameter " + std::to_string(i) + " of the gradient buckets does not require grad");
      }
    }
    fill(*b);
    std::weak_ptr<Buckets> weak = b;
    for (size_t i = 0; i < n; ++i) {
      torch::autograd::impl::set_post_acc_grad_hooks(b->params[i], std::make_unique<ReadyHook>(b, i));
      if (slices > 0) continue;  // a reduce-scatter is redone from the local gradients
      b->pre_hooks.push_back(b->params[i].register_hook([weak, i](const at::Tensor&) {
        if (auto bs = weak.lock()) bs->before_accumulate(i);
      }));
    }
    out = new std::shared_ptr<Buckets>(std::move(b));
  });
  return out;
}

}  // namespace

extern "C" {

// Connects to (rank 0 without an agent store: serves) the TCPStore at host:port, under
// `prefix`, and creates the process group. Returns null and sets *err on failure.
void* halo_dist_new(const char* backend, const char* host, uint16_t port, int rank, int world,
                    int serve, const char* prefix, int64_t timeout_ms, char** err) {
  Group* group = nullptr;
  guarded(err, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = serve != 0;
    // As torch.distributed: every client counts itself in, the server waits for all.
    opts.numWorkers = world;
    opts.waitWorkers = true;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    std::string name(backend);
    auto g = std::make_unique<Group>();
    g->store = store;
    g->timeout = timeout;
    if (name == "gloo") {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      const char* iface = std::getenv("GLOO_SOCKET_IFNAME");
      if (iface != nullptr && *iface != '\0') {
        options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
      } else if (is_loopback(host)) {
        options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else {
        options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
      g->gloo = true;
    } else if (name == "nccl") {
#ifdef HALO_DIST_NCCL
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
      g->gloo = false;
#else
      throw std::runtime_error(
          "this build has no NCCL: haloflow-dist was compiled without the CUDA headers "
          "(pip install nvidia-cuda-crt nvidia-cuda-cccl matching CUDA 13.0 into the venv, then rebuild)");
#endif
    } else {
      throw std::invalid_argument("unknown backend `" + name + "` (gloo or nccl)");
    }
    group = g.release();
  });
  return group;
}

void halo_dist_free(void* g) {
  delete static_cast<Group*>(g);
}

void halo_dist_free_message(char* message) {
  std::free(message);
}

int halo_dist_all_reduce(void* g, at::Tensor** ts, size_t n, int op, int coalesced, char** err) {
  return guarded(err, [&] { wait(start_all_reduce(static_cast<Group*>(g), tensors(ts, n), op, coalesced != 0)); });
}

// Starts an all-reduce (coalesced: one collective over all of `ts`) and returns its work
// handle, freed by halo_dist_work_free; null with *err set when it cannot start.
void* halo_dist_all_reduce_async(void* g, at::Tensor** ts, size_t n, int op, int coalesced, char** err) {
  c10::intrusive_ptr<c10d::Work>* work = nullptr;
  guarded(err, [&] {
    work = new c10::intrusive_ptr<c10d::Work>(start_all_reduce(static_cast<Group*>(g), tensors(ts, n), op, coalesced != 0));
  });
  return work;
}

// Starts gathering every rank's `input` into `out` (the ranks' inputs one after another, in
// rank order: world × input's elements), as halo_dist_all_reduce_async starts its all-reduce.
void* halo_dist_all_gather_into_async(void* g, at::Tensor* out, at::Tensor* input, char** err) {
  c10::intrusive_ptr<c10d::Work>* work = nullptr;
  guarded(err, [&] {
    work = new c10::intrusive_ptr<c10d::Work>(static_cast<Group*>(g)->backend->_allgather_base(*out, *input));
  });
  return work;
}

// Waits for a started collective to end.
int halo_dist_work_wait(void* w, char** err) {
  return guarded(err, [&] { wait(*static_cast<c10::intrusive_ptr<c10d::Work>*>(w)); });
}

void halo_dist_work_free(void* w) {
  delete static_cast<c10::intrusive_ptr<c10d::Work>*>(w);
}

// All-reduce buckets over `n` parameters, parameter i in bucket bucket_of[i] (buckets
// numbered from 0 in the order their all-reduces start, the same on every rank).
void* halo_dist_buckets_new(void* g, at::Tensor** ps, size_t n, const size_t* bucket_of, char** err) {
  return new_buckets(g, ps, n, 0, err, [&](Buckets& b) {
    std::vector<size_t> identity(n);
    for (size_t i = 0; i < n; ++i) identity[i] = i;
    b.assign(identity.data(), bucket_of);
  });
}

// Reduce-scatter buckets over `n` parameters for `slices` ranks: piece j is elements
// [offset[j], offset[j] + len[j]) of parameter param[j], in bucket bucket[j] (pieces in
// order, buckets numbered from 0 in order), and bucket k's flat buffer has numel[k] elements
// (the pieces, then zeros; a multiple of `slices`). The sums go into `dest` (f32, the
// buckets' slices one after another) or, when it is null, into the gradients. With
// `shard_grads` (needs `dest`) the gradients are dropped as their windows are copied and the
// sums added to `dest` (see Buckets).
void* halo_dist_buckets_new_slices(void* g, at::Tensor** ps, size_t n, int64_t slices, const size_t* param, const int64_t* offset, const int64_t* len, const size_t* bucket, size_t n_pieces, const int64_t* numel, size_t n_buckets, at::Tensor* dest, int shard_grads, char** err) {
  return new_buckets(g, ps, n, slices, err, [&](Buckets& b) {
    if (slices < 1) throw std::invalid_argument("reduce-scatter buckets need at least 1 rank, got " + std::to_string(slices));
    if (shard_grads != 0 && dest == nullptr) throw std::invalid_argument("sharded gradients need a destination for the sums");
    if (dest != nullptr) b.dest = *dest;
    b.shard_grads = shard_grads != 0;
    std::vector<Buckets::Bucket> made(n_buckets);
    for (size_t j = 0; j < n_pieces; ++j) {
      if (bucket[j] >= n_buckets || (j > 0 && bucket[j] < bucket[j - 1])) throw std::invalid_argument("piece " + std::to_string(j) + " is in bucket " + std::to_string(bucket[j]) + " (buckets in order, " + std::to_string(n_buckets) + " of them)");
      made[bucket[j]].pieces.push_back({param[j], offset[j], len[j]});
    }
    for (size_t k = 0; k < n_buckets; ++k) made[k].numel = numel[k];
    b.set(std::move(made));
  });
}

// Removes the hooks and frees the buckets.
void halo_dist_buckets_free(void* bs) {
  auto b = static_cast<std::shared_ptr<Buckets>*>(bs);
  for (size_t i = 0; i < (*b)->params.size(); ++i) {
    torch::autograd::impl::set_post_acc_grad_hooks((*b)->params[i], nullptr);
    if (i < (*b)->pre_hooks.size()) (*b)->params[i].remove_hook((*b)->pre_hooks[i]);
  }
  delete b;
}

// Arms the hooks for the backward passes of a step's last microbatch.
void halo_dist_buckets_arm(void* bs) {
  (*static_cast<std::shared_ptr<Buckets>*>(bs))->arm();
}

// The parameters (n) in the order their gradients became final in the last armed step.
void halo_dist_buckets_order(void* bs, size_t* out) {
  (*static_cast<std::shared_ptr<Buckets>*>(bs))->order(out);
}

// Rebuilds the buckets: parameter order[j] in bucket bucket_of[j].
int halo_dist_buckets_assign(void* bs, const size_t* order, const size_t* bucket_of, char** err) {
  return guarded(err, [&] { (*static_cast<std::shared_ptr<Buckets>*>(bs))->assign(order, bucket_of); });
}

// After those backward passes: see Buckets::finish.
int halo_dist_buckets_finish(void* bs, size_t* counts, char** err) {
  return guarded(err, [&] { (*static_cast<std::shared_ptr<Buckets>*>(bs))->finish(counts); });
}

int halo_dist_broadcast(void* g, at::Tensor* t, int root, char** err) {
  return guarded(err, [&] {
    auto list = std::vector<at::Tensor>{*t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    wait(static_cast<Group*>(g)->backend->broadcast(list, opts));
  });
}

int halo_dist_all_gather(void* g, at::Tensor** outs, size_t n, at::Tensor* input, char** err) {
  return guarded(err, [&] {
    std::vector<std::vector<at::Tensor>> outputs{tensors(outs, n)};
    std::vector<at::Tensor> inputs{*input};
    wait(static_cast<Group*>(g)->backend->allgather(outputs, inputs));
  });
}

int halo_dist_reduce_scatter(void* g, at::Tensor* out, at::Tensor** ins, size_t n, int op, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> outputs{*out};
    std::vector<std::vector<at::Tensor>> inputs{tensors(ins, n)};
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = reduce_op(op);
    wait(static_cast<Group*>(g)->backend->reduce_scatter(outputs, inputs, opts));
  });
}

int halo_dist_barrier(void* g, char** err) {
  return guarded(err, [&] { wait(static_cast<Group*>(g)->backend->barrier()); });
}

// After a failed collective: which ranks no longer answer. Sends and receives one value
// to and from every other rank, waiting at most timeout_ms; a peer whose connection fails
// (a killed process) or that does not answer in time is written to lost[] (at most `cap`),
// their count to *n_lost. Returns 1 with *err set only when the probe itself cannot run.
int halo_dist_probe(void* g, int64_t timeout_ms, int* lost, size_t cap, size_t* n_lost, char** err) {
  return guarded(err, [&] {
    auto group = static_cast<Group*>(g);
    auto& backend = group->backend;
    const int rank = backend->getRank();
    const int world = backend->getSize();
    const int tag = 0x4a10;
    auto timeout = std::chrono::milliseconds(timeout_ms);
    std::vector<at::Tensor> out{at::zeros({1})}, in{at::zeros({1})};
    std::vector<std::vector<at::Tensor>> sends(world, out), recvs(world);
    std::vector<c10::intrusive_ptr<c10d::Work>> works(2 * world);
    std::vector<bool> failed(world, false);
    for (int peer = 0; peer < world; ++peer) {
      if (peer == rank) continue;
      recvs[peer] = {at::zeros({1})};
      try {
        works[2 * peer] = backend->send(sends[peer], peer, tag);
        works[2 * peer + 1] = backend->recv(recvs[peer], peer, tag);
      } catch (...) {
        failed[peer] = true;
      }
    }
    for (int peer = 0; peer < world; ++peer) {
      if (peer == rank || failed[peer]) continue;
      try {
        bool done = works[2 * peer]->wait(timeout) && works[2 * peer + 1]->wait(timeout);
        failed[peer] = !done;
      } catch (...) {
        failed[peer] = true;
      }
    }
    *n_lost = 0;
    for (int peer = 0; peer < world; ++peer) {
      if (failed[peer] && *n_lost < cap) {
        lost[(*n_lost)++] = peer;
      }
    }
  });
}

}  // extern "C"
