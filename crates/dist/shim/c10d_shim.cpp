// haloflow's C ABI over libtorch's c10d: a TCPStore rendezvous and a Gloo (or NCCL) process
// group, collectives on tch tensors (see stages/ml/shim/ffi_guard.h for the boundary's rules).

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

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

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
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
  return guarded(err, [&] {
    auto group = static_cast<Group*>(g);
    auto list = tensors(ts, n);
    if (coalesced != 0) {
      c10d::AllreduceCoalescedOptions opts;
      opts.reduceOp = reduce_op(op);
      wait(group->backend->allreduce_coalesced(list, opts));
    } else {
      c10d::AllreduceOptions opts;
      opts.reduceOp = reduce_op(op);
      wait(group->backend->allreduce(list, opts));
    }
  });
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
