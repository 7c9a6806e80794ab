//! Data-parallel collectives for haloflow on libtorch's own c10d: a TCPStore rendezvous and a
//! Gloo (CPU) or NCCL (GPU) process group, driven from Rust on `tch` tensors through a small
//! C++ shim (shim/c10d_shim.cpp). [`Dist::from_env`] reads torchrun's or Slurm's environment.
//! Every failure of a collective is an error naming the collective, this rank and, where Gloo
//! can tell, the rank that no longer answers.
//!
//! Built without the `distributed` feature or without gloo's headers, the crate still builds;
//! a single-process run works and a multi-process one fails saying how to enable it.

mod env;
mod group;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

pub use env::{first_host, read as read_rendezvous, Rendezvous};
use group::{Buckets, Group, Op};

/// Whether this build has the NCCL backend (compiled in when the CUDA headers it needs were
/// found beside torch; see build.rs).
pub const NCCL: bool = cfg!(halo_nccl);

/// How a collective combines the processes' tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise mean (a sum divided by the world size; floating-point tensors only).
    Avg,
    /// Element-wise maximum.
    Max,
    /// Element-wise minimum.
    Min,
}

impl ReduceOp {
    fn shim(self) -> Op {
        match self {
            ReduceOp::Sum | ReduceOp::Avg => Op::Sum,
            ReduceOp::Max => Op::Max,
            ReduceOp::Min => Op::Min,
        }
    }
}

/// The backend for a requested name and the training device: `auto` is NCCL on CUDA and
/// Gloo on CPU; NCCL without a CUDA device is an error.
pub fn backend_for(requested: &str, device: Device) -> Result<&'static str> {
    match (requested, device.is_cuda()) {
        ("gloo", _) => Ok("gloo"),
        ("nccl", true) | ("auto", true) => Ok("nccl"),
        ("auto", false) => Ok("gloo"),
        ("nccl", false) => bail!("the nccl backend needs a CUDA device, and this process has none (use --dist-backend gloo on CPU)"),
        (other, _) => bail!("unknown distributed backend `{other}` (auto, gloo or nccl)"),
    }
}

/// This process's membership of a distributed run: the rendezvous store and process group.
pub struct Dist {
    group: Group,
    rv: Rendezvous,
    backend: &'static str,
    timeout: Duration,
}

impl Dist {
    /// Joins the run described by the environment: torchrun's (RANK, WORLD_SIZE, LOCAL_RANK,
    /// MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE with TORCHELASTIC_RESTART_COUNT)
    /// or Slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host of
    /// SLURM_JOB_NODELIST, MASTER_PORT). `None` when WORLD_SIZE is unset or 1. `backend` is
    /// `gloo`, `nccl` or `auto` (NCCL when CUDA is available). Collectives and the rendezvous
    /// give up after `timeout`.
    pub fn from_env(backend: &str, timeout: Duration) -> Result<Option<Dist>> {
        let Some(rv) = env::read(|k| std::env::var(k).ok())? else { return Ok(None) };
        // `auto` follows the machine; `gloo` and `nccl` are taken as asked, NCCL checked below.
        let device = if backend == "auto" { Device::cuda_if_available() } else { Device::Cuda(rv.local_rank) };
        let backend = backend_for(backend, device)?;
        if backend == "nccl" {
            ensure!(tch::Cuda::is_available(), "the nccl backend needs CUDA, and this machine has none (use --dist-backend gloo)");
        }
        Dist::connect(backend, rv, timeout).map(Some)
    }

    /// Joins the run `rv` with `backend` (`gloo` or `nccl`).
    pub fn connect(backend: &'static str, rv: Rendezvous, timeout: Duration) -> Result<Dist> {
        let group = Group::new(backend, &rv, timeout).with_context(|| {
            format!("rank {} of {}: cannot join the {backend} process group through the store at {}:{} (timeout {:?})", rv.rank, rv.world_size, rv.master_addr, rv.master_port, timeout)
        })?;
        tracing::debug!(rank = rv.rank, world = rv.world_size, backend, "joined the process group");
        Ok(Dist { group, rv, backend, timeout })
    }

    /// This process's rank, `0..world_size()`.
    pub fn rank(&self) -> usize {
        self.rv.rank
    }

    /// The number of processes.
    pub fn world_size(&self) -> usize {
        self.rv.world_size
    }

    /// This process's rank on its node: its GPU.
    pub fn local_rank(&self) -> usize {
        self.rv.local_rank
    }

    /// Where this rank computes when `requested` is asked for: a CUDA request means this rank's
    /// own GPU, CUDA `local_rank`; any other device stays as it is.
    pub fn rank_device(&self, requested: Device) -> Device {
        match requested {
            Device::Cuda(_) => Device::Cuda(self.rv.local_rank),
            other => other,
        }
    }

    /// `gloo` or `nccl`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The device collectives' tensors live on: CUDA `local_rank` under NCCL, else the CPU.
    pub fn device(&self) -> Device {
        if self.backend == "nccl" {
            Device::Cuda(self.rv.local_rank)
        } else {
            Device::Cpu
        }
    }

    /// The error of a failed collective: its name, this rank and which rank no longer answers.
    fn failed(&self, what: &str, cause: String) -> anyhow::Error {
        let (rank, world) = (self.rv.rank, self.rv.world_size);
        let lost = match self.group.probe(world, self.timeout.min(Duration::from_secs(5))) {
            Ok(lost) if lost.is_empty() => "; every other rank still answers".to_string(),
            Ok(lost) => {
                let ranks: Vec<String> = lost.iter().map(|r| r.to_string()).collect();
                format!("; lost rank(s) {} (no answer: killed, crashed or hung)", ranks.join(", "))
            }
            Err(e) => format!("; could not tell which rank is lost: {e}"),
        };
        anyhow!("`{what}` failed on rank {rank} of {world} ({}): {cause}{lost}", self.backend)
    }

    fn average(&self, ts: &mut [Tensor], op: ReduceOp) -> Result<()> {
        if op == ReduceOp::Avg {
            for t in ts.iter_mut() {
                ensure!(t.is_floating_point(), "ReduceOp::Avg needs floating-point tensors, got {:?}", t.kind());
                let _ = t.g_div_scalar_(self.rv.world_size as f64);
            }
        }
        Ok(())
    }

    /// Reduces `t` in place over all processes.
    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.group.all_reduce(std::slice::from_ref(t), op.shim(), false).map_err(|e| self.failed("all_reduce", e))?;
        self.average(std::slice::from_mut(t), op)
    }

    /// Reduces several tensors in place in one collective (Gloo: one flattened buffer).
    pub fn all_reduce_coalesced(&self, ts: &mut [Tensor], op: ReduceOp) -> Result<()> {
        if ts.is_empty() {
            return Ok(());
        }
        self.group.all_reduce(ts, op.shim(), true).map_err(|e| self.failed("all_reduce_coalesced", e))?;
        self.average(ts, op)
    }

    /// Starts reducing several tensors in one collective, as [`Dist::all_reduce_coalesced`],
    /// and returns at once; the tensors must not change before [`Work::wait`] returned.
    pub fn all_reduce_coalesced_async(self: &Arc<Self>, ts: &[Tensor], op: ReduceOp) -> Result<Work> {
        let work = self.group.all_reduce_async(ts, op.shim(), true).map_err(|e| self.failed("all_reduce_coalesced (starting)", e))?;
        Ok(Work { dist: self.clone(), work, collective: "all_reduce_coalesced", tensors: ts.iter().map(Tensor::shallow_clone).collect(), op: Some(op) })
    }

    /// Starts gathering every rank's `input` into `out`, rank r's at `r × input.numel()`
    /// (`out` holds world × as many elements, of the same type), and returns at once; neither
    /// tensor may change before [`Work::wait`] returned. `input` may be its own place in `out`
    /// (in place, as FSDP2 gathers).
    pub fn all_gather_into_async(self: &Arc<Self>, out: &Tensor, input: &Tensor) -> Result<Work> {
        let world = self.rv.world_size as i64;
        ensure!(
            out.numel() as i64 == world * input.numel() as i64 && out.kind() == input.kind() && out.is_contiguous() && input.is_contiguous(),
            "all_gather_into needs a contiguous output of {world} × {} elements of {:?}, got {} of {:?}",
            input.numel(),
            input.kind(),
            out.numel(),
            out.kind()
        );
        let work = self.group.all_gather_into_async(out, input).map_err(|e| self.failed("all_gather_into (starting)", e))?;
        Ok(Work { dist: self.clone(), work, collective: "all_gather_into", tensors: vec![out.shallow_clone(), input.shallow_clone()], op: None })
    }

    /// Copies rank `root`'s `t` into every other rank's `t`.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        ensure!(root < self.rv.world_size, "broadcast from rank {root} in a world of {}", self.rv.world_size);
        self.group.broadcast(t, root).map_err(|e| self.failed("broadcast", e))
    }

    /// Fills `out[r]` with rank r's `input` (one output per rank, each shaped like `input`).
    pub fn all_gather(&self, out: &mut [Tensor], input: &Tensor) -> Result<()> {
        ensure!(out.len() == self.rv.world_size, "all_gather needs {} outputs, got {}", self.rv.world_size, out.len());
        self.group.all_gather(out, input).map_err(|e| self.failed("all_gather", e))
    }

    /// Reduces `inputs[r]` over all processes into rank r's `out` (one input per rank).
    pub fn reduce_scatter(&self, out: &mut Tensor, inputs: &[Tensor], op: ReduceOp) -> Result<()> {
        ensure!(inputs.len() == self.rv.world_size, "reduce_scatter needs {} inputs, got {}", self.rv.world_size, inputs.len());
        self.group.reduce_scatter(out, inputs, op.shim()).map_err(|e| self.failed("reduce_scatter", e))?;
        self.average(std::slice::from_mut(out), op)
    }

    /// Waits until every process arrives.
    pub fn barrier(&self) -> Result<()> {
        self.group.barrier().map_err(|e| self.failed("barrier", e))
    }

    /// Every rank's `bytes`, in rank order (for small records such as metrics).
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let device = self.device();
        let mut len = Tensor::from_slice(&[bytes.len() as i64]).to_device(device);
        self.all_reduce(&mut len, ReduceOp::Max)?;
        let max = len.int64_value(&[0]) as usize;
        let mut padded = bytes.to_vec();
        padded.resize(max + 8, 0);
        padded[max..].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        let input = Tensor::from_slice(&padded).to_device(device);
        let mut out: Vec<Tensor> = (0..self.rv.world_size).map(|_| Tensor::zeros([(max + 8) as i64], (Kind::Uint8, device))).collect();
        self.all_gather(&mut out, &input)?;
        out.iter()
            .map(|t| {
                let all = Vec::<u8>::try_from(&t.to_device(Device::Cpu))?;
                let n = u64::from_le_bytes(all[max..].try_into()?) as usize;
                Ok(all[..n].to_vec())
            })
            .collect()
    }
}

/// A collective started by [`Dist::all_reduce_coalesced_async`] or
/// [`Dist::all_gather_into_async`], running while this process goes on.
pub struct Work {
    // Dropped first: the handle goes before the process group can.
    work: group::Work,
    dist: Arc<Dist>,
    /// The collective, as errors name it.
    collective: &'static str,
    /// Its tensors, kept alive until it ended.
    tensors: Vec<Tensor>,
    /// An all-reduce's operation (its tensors averaged after an `Avg`).
    op: Option<ReduceOp>,
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Work({} on rank {})", self.collective, self.dist.rank())
    }
}

impl Work {
    /// Waits until the collective ended; its output then holds the result. Errors as the
    /// synchronous collectives' (the collective, this rank, the lost ranks).
    pub fn wait(mut self) -> Result<()> {
        self.work.wait().map_err(|e| self.dist.failed(self.collective, e))?;
        match self.op {
            Some(op) => self.dist.average(&mut self.tensors, op),
            None => Ok(()),
        }
    }
}

/// How a step's gradient buckets were all-reduced (see [`GradBuckets::finish`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BucketCounts {
    /// Started by a gradient hook while gradients were still to come (before the armed
    /// passes' last accumulation): overlapping the rest of the backward pass.
    pub during_backward: usize,
    /// Started by the hook of the armed passes' last accumulation, or after the backward
    /// pass: a bucket with a gradient this rank did not produce in the armed passes, or
    /// behind such a bucket (buckets start in order).
    pub after_backward: usize,
    /// All-reduced a second time because a gradient grew after its bucket had started.
    pub redone: usize,
}

/// Gradient buckets whose sums over the ranks overlap the backward pass, as torch's DDP
/// does: a hook on every parameter sees its gradient accumulated, and once every gradient
/// of a bucket is final the bucket's all-reduce starts asynchronously. A parameter counts as
/// final when its gradient was accumulated as often as in the previous armed step:
/// activation checkpointing accumulates a layer's gradient once per checkpointed forward.
/// The first step, whose counts are not known yet, starts every bucket after its backward
/// pass. Buckets start in their order on every rank; as DDP's, they are rebuilt once, after
/// the first step, in the order in which rank 0's gradients became final.
///
/// The gradients are views into their bucket's memory (DDP's `gradient_as_bucket_view`), so
/// each all-reduce runs in place, with neither a flat copy nor a copy back. A gradient
/// accumulated again after its all-reduce started (a count that changed) is caught before
/// the accumulation and summed in a second all-reduce. ZeRO-1's buckets
/// ([`GradBuckets::slices`]) reduce-scatter copies of ranges of the parameters instead, and
/// start during the first step's backward pass as well (a copy can be redone).
pub struct GradBuckets {
    // Dropped first: the hooks go before the process group can.
    buckets: Buckets,
    dist: Arc<Dist>,
    params: Vec<Tensor>,
    bucket_bytes: usize,
    rebuilt: bool,
    /// The buckets' collective, as errors name it.
    collective: &'static str,
}

impl GradBuckets {
    /// Hooks `params`, in buckets of at most `bucket_bytes` (see [`bucket_of`]) in this order
    /// until the first step shows the order of the backward pass (start with the parameters
    /// whose gradients should come first: the last layers'). Their gradients are summed, not
    /// averaged; from here on each is a view into its bucket's memory (zeros where it had
    /// none), which zeroing in place keeps (one replaced between steps is copied back into
    /// its view when armed; one replaced during the armed backward pass is an error).
    pub fn new(dist: Arc<Dist>, params: &[Tensor], bucket_bytes: usize) -> Result<GradBuckets> {
        let params: Vec<Tensor> = params.iter().map(Tensor::shallow_clone).collect();
        let buckets = dist.group.buckets(&params, &bucket_of(&params, bucket_bytes)).map_err(|e| anyhow!("rank {}: cannot hook the parameters for the gradient buckets: {e}", dist.rank()))?;
        Ok(GradBuckets { buckets, dist, params, bucket_bytes, rebuilt: false, collective: "all_reduce" })
    }

    /// Reduce-scatter buckets (ZeRO-1) over `params`: each piece `(parameter, offset, length,
    /// bucket)` a range of a flattened parameter, pieces in order; bucket k's flat buffer (in
    /// f32) has `numel[k]` elements, the pieces then zeros, a multiple of the ranks. After
    /// [`GradBuckets::finish`] rank r holds the sums of every buffer's r-th slice: in `dest`
    /// (f32, the buckets' slices one after another), or without it in its own part of the
    /// (f32) gradients, the rest of which are left as they were. With `shard_grads` (ZeRO-2,
    /// `dest` needed) each bucket's gradients leave once copied (a parameter's gradient is
    /// dropped with its last bucket) and every armed pass adds its sums to `dest`, which the
    /// caller clears for a step. These buckets are never rebuilt: their layout is that of the
    /// optimizer state.
    pub fn slices(dist: Arc<Dist>, params: &[Tensor], pieces: &[(usize, i64, i64, usize)], numel: &[i64], dest: Option<&Tensor>, shard_grads: bool) -> Result<GradBuckets> {
        let params: Vec<Tensor> = params.iter().map(Tensor::shallow_clone).collect();
        let buckets = dist.group.slice_buckets(&params, dist.world_size(), pieces, numel, dest, shard_grads).map_err(|e| anyhow!("rank {}: cannot hook the parameters for the gradient buckets: {e}", dist.rank()))?;
        Ok(GradBuckets { buckets, dist, params, bucket_bytes: 0, rebuilt: true, collective: "reduce_scatter" })
    }

    /// Arms the hooks for the backward passes that follow (a step's last microbatch).
    pub fn arm(&self) {
        self.buckets.arm();
    }

    /// After the armed backward passes: starts, in order, the buckets the hooks did not (with
    /// zeros for gradients this rank has none of), waits for every bucket, puts the sums in
    /// place (all-reduce buckets: the gradients; reduce-scatter buckets: see
    /// [`GradBuckets::slices`]), and reduces again on every rank any bucket whose gradient
    /// grew after its start on some rank (one small all-reduce of flags tells the ranks
    /// which). After the first step, rebuilds all-reduce buckets in the order in which rank
    /// 0's gradients became final (a broadcast).
    pub fn finish(&mut self) -> Result<BucketCounts> {
        let what = format!("{} of the gradient buckets", self.collective);
        let [during_backward, after_backward, redone] = self.buckets.finish().map_err(|e| self.dist.failed(&what, e))?;
        if !self.rebuilt {
            self.rebuild()?;
        }
        Ok(BucketCounts { during_backward, after_backward, redone })
    }

    /// Rebuilds the buckets in the order in which rank 0's gradients became final in the
    /// armed step (their last accumulation; one broadcast).
    fn rebuild(&mut self) -> Result<()> {
        let observed: Vec<i64> = self.buckets.order().into_iter().map(|i| i as i64).collect();
        let mut order = Tensor::from_slice(&observed).to_device(self.dist.device());
        self.dist.broadcast(&mut order, 0)?;
        let order: Vec<usize> = Vec::<i64>::try_from(&order.to_device(Device::Cpu))?.into_iter().map(|i| i as usize).collect();
        let ordered: Vec<Tensor> = order.iter().map(|&i| self.params[i].shallow_clone()).collect();
        let bucket_of = bucket_of(&ordered, self.bucket_bytes);
        self.buckets.assign(&order, &bucket_of).map_err(|e| anyhow!("rank {}: cannot rebuild the gradient buckets: {e}", self.dist.rank()))?;
        self.rebuilt = true;
        tracing::debug!(rank = self.dist.rank(), buckets = bucket_of.last().map_or(0, |b| b + 1), "gradient buckets rebuilt in the order of rank 0's backward pass");
        Ok(())
    }
}

/// The bucket of each of `ts`, numbered from 0: consecutive tensors of one dtype, at most
/// `max_bytes` a bucket (a larger tensor alone in its own).
pub fn bucket_of(ts: &[Tensor], max_bytes: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(ts.len());
    let (mut bucket, mut bytes) = (0, 0);
    for (i, t) in ts.iter().enumerate() {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        if i > 0 && (bytes + size > max_bytes || t.kind() != ts[i - 1].kind()) {
            bucket += 1;
            bytes = 0;
        }
        bytes += size;
        out.push(bucket);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_one_dtype_and_at_most_the_bytes_asked() {
        let t = |n: i64, kind: Kind| Tensor::zeros([n], (kind, Device::Cpu));
        let ts = [t(3, Kind::Float), t(2, Kind::Float), t(1, Kind::Float), t(2, Kind::BFloat16), t(10, Kind::BFloat16), t(1, Kind::BFloat16)];
        // 20 bytes: 12 + 8 fit, 4 more do not; bf16 starts its own; 20 bytes fill one.
        assert_eq!(bucket_of(&ts, 20), [0, 0, 1, 2, 3, 4]);
        assert_eq!(bucket_of(&ts, 1 << 20), [0, 0, 0, 1, 1, 1]);
        assert!(bucket_of(&[], 20).is_empty());
    }

    #[test]
    fn backends() {
        assert_eq!(backend_for("auto", Device::Cpu).unwrap(), "gloo");
        assert_eq!(backend_for("auto", Device::Cuda(0)).unwrap(), "nccl");
        assert_eq!(backend_for("gloo", Device::Cuda(0)).unwrap(), "gloo");
        assert!(backend_for("nccl", Device::Cpu).unwrap_err().to_string().contains("needs a CUDA device"));
        assert!(backend_for("mpi", Device::Cpu).unwrap_err().to_string().contains("unknown distributed backend `mpi`"));
    }

    /// Built without the shim (`--no-default-features`), a multi-process run says how to get it.
    #[cfg(not(halo_c10d))]
    #[test]
    fn without_the_shim_a_multi_process_run_says_how_to_enable_it() {
        let rv = env::read(|k| [("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1")].iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())).unwrap().unwrap();
        let err = format!("{:#}", Dist::connect("gloo", rv, Duration::from_secs(1)).err().unwrap());
        assert!(err.contains("libgloo-dev") && err.contains("distributed"), "{err}");
    }
}
