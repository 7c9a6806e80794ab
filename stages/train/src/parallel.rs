//! The processes of a data-parallel run as the trainer sees them: one process without a
//! launcher, else a [`Dist`] process group. Each rank runs its share of every optimizer step's
//! microbatches; gradients, example counts, metrics and KTO's reference point are summed
//! over the ranks so that N ranks equal one process accumulating the same microbatches.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use haloflow_dist::{bucket_of, Dist, GradBuckets, ReduceOp, Work};
use haloflow_ml::device::parse_device;
use haloflow_ml::losses::AllReduce;
use tch::{Device, Kind, Tensor};

use crate::Args;

/// This process's place in the run.
pub struct Ranks {
    dist: Option<Arc<Dist>>,
    /// Bytes per bucket of gradients summed in one all-reduce (`--grad-bucket-mb`).
    bucket_bytes: usize,
}

/// [`AllReduce`] for the losses' batch statistics over a process group.
struct DistSum(Arc<Dist>);

impl AllReduce for DistSum {
    fn sum(&self, stats: &Tensor) -> Result<Tensor> {
        let mut out = stats.to_device(self.0.device()).copy();
        self.0.all_reduce(&mut out, ReduceOp::Sum)?;
        Ok(out.to_device(stats.device()))
    }
}

impl Ranks {
    /// Joins the run the environment describes (torchrun's or Slurm's variables) and picks the
    /// device: with several ranks, `--device auto` or `cuda` means CUDA device LOCAL_RANK.
    pub fn join(args: &Args) -> Result<(Ranks, Device)> {
        ensure!(args.grad_bucket_mb > 0.0, "--grad-bucket-mb must be positive, got {}", args.grad_bucket_mb);
        let bucket_bytes = ((args.grad_bucket_mb * 1024.0 * 1024.0) as usize).max(1);
        let requested = parse_device(&args.device)?;
        let backend = haloflow_dist::backend_for(&args.dist_backend, requested)?;
        let dist = Dist::from_env(backend, Duration::from_secs_f64(args.dist_timeout_s))?;
        let device = match (&dist, requested) {
            (Some(d), Device::Cuda(_)) if !args.device.starts_with("cuda:") => d.rank_device(requested),
            _ => requested,
        };
        if let Some(d) = &dist {
            tracing::info!(rank = d.rank(), world = d.world_size(), backend = d.backend(), device = ?device, "data-parallel run");
        }
        Ok((Ranks { dist: dist.map(Arc::new), bucket_bytes }, device))
    }

    /// One process, no launcher.
    #[cfg(test)]
    pub fn single() -> Ranks {
        Ranks { dist: None, bucket_bytes: 25 * 1024 * 1024 }
    }

    /// f32 elements per bucket of `--grad-bucket-mb` (ZeRO-1's windows over all ranks).
    pub fn bucket_elements(&self) -> i64 {
        (self.bucket_bytes / 4).max(1) as i64
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.dist.as_ref().map_or(0, |d| d.rank())
    }

    /// The number of processes.
    pub fn world(&self) -> usize {
        self.dist.as_ref().map_or(1, |d| d.world_size())
    }

    /// Whether this is rank 0, which alone writes outputs, checkpoints and the progress bar.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// The sum the losses reduce their batch statistics with (`None` for one process).
    pub fn loss_reduce(&self) -> Option<Arc<dyn AllReduce>> {
        self.dist.as_ref().map(|d| Arc::new(DistSum(d.clone())) as Arc<dyn AllReduce>)
    }

    /// Sums `t` (any device, f64 or f32) over the ranks.
    pub fn sum(&self, t: &Tensor) -> Result<Tensor> {
        match &self.dist {
            Some(d) => DistSum(d.clone()).sum(t),
            None => Ok(t.shallow_clone()),
        }
    }

    /// This rank's share of a step's microbatches: positions rank, rank + world, …
    pub fn share<'a, T>(&self, step: &'a [T]) -> impl Iterator<Item = &'a T> + 'a {
        let (rank, world) = (self.rank(), self.world());
        step.iter().skip(rank).step_by(world)
    }

    /// Sums the gradients of `params` over the ranks after the backward pass, in buckets of
    /// coalesced all-reduces. Gradients a rank never produced (no example in its share)
    /// count as zeros.
    pub fn sum_gradients(&self, params: &[Tensor]) -> Result<()> {
        let Some(dist) = &self.dist else { return Ok(()) };
        let mut grads = defined_grads(params);
        let bucket_of = bucket_of(&grads, self.bucket_bytes);
        let mut start = 0;
        while start < grads.len() {
            let end = (start..grads.len()).find(|&i| bucket_of[i] != bucket_of[start]).unwrap_or(grads.len());
            dist.all_reduce_coalesced(&mut grads[start..end], ReduceOp::Sum)?;
            start = end;
        }
        Ok(())
    }

    /// The gradient buckets of `params` (named `names`) whose all-reduces overlap the backward
    /// pass (`None` for one process), as large as [`Ranks::sum_gradients`]'s: at first the
    /// parameters in [`backward_order`], after the first step in the order the backward pass
    /// showed.
    pub fn grad_buckets(&self, params: &[Tensor], names: &[String]) -> Result<Option<GradBuckets>> {
        let Some(dist) = &self.dist else { return Ok(None) };
        let ordered: Vec<Tensor> = backward_order(names).iter().map(|&i| params[i].shallow_clone()).collect();
        GradBuckets::new(dist.clone(), &ordered, self.bucket_bytes).map(Some)
    }

    /// ZeRO-1's windows as gradient buckets ([`GradBuckets::slices`]: pieces `(parameter,
    /// offset, length, bucket)`, bucket k of `numel[k]` elements, the sums into `dest` or the
    /// gradients; ZeRO-2's with `shard_grads`) whose reduce-scatters overlap the backward pass
    /// (`None` for one process).
    pub fn slice_buckets(&self, params: &[Tensor], pieces: &[(usize, i64, i64, usize)], numel: &[i64], dest: Option<&Tensor>, shard_grads: bool) -> Result<Option<GradBuckets>> {
        let Some(dist) = &self.dist else { return Ok(None) };
        GradBuckets::slices(dist.clone(), params, pieces, numel, dest, shard_grads).map(Some)
    }

    /// Reduce-scatters `flat` (length world × shard): this rank gets the sum of every rank's
    /// slice `rank`.
    pub fn reduce_scatter(&self, flat: &Tensor) -> Result<Tensor> {
        let chunks = flat.chunk(self.world() as i64, 0);
        match &self.dist {
            Some(d) => {
                let mut out = chunks[0].zeros_like();
                d.reduce_scatter(&mut out, &chunks, ReduceOp::Sum)?;
                Ok(out)
            }
            None => Ok(chunks[0].copy()),
        }
    }

    /// Starts gathering every rank's `slice` into `out` (world × its elements, in rank order);
    /// `None` for one process, whose `out` is then `slice` copied.
    pub fn all_gather_into_async(&self, out: &mut Tensor, slice: &Tensor) -> Result<Option<Work>> {
        match &self.dist {
            Some(d) => d.all_gather_into_async(out, slice).map(Some),
            None => {
                tch::no_grad(|| out.copy_(slice));
                Ok(None)
            }
        }
    }

    /// Adds up the ranks' pending metric sums (name → (weighted sum, weight)), in rank order.
    pub fn merge_sums(&self, mine: &BTreeMap<String, (f64, f64)>) -> Result<BTreeMap<String, (f64, f64)>> {
        let Some(dist) = &self.dist else { return Ok(mine.clone()) };
        let mut merged: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for bytes in dist.all_gather_bytes(&serde_json::to_vec(mine)?)? {
            let theirs: BTreeMap<String, (f64, f64)> = serde_json::from_slice(&bytes).context("metrics from another rank")?;
            for (name, (sum, weight)) in theirs {
                let slot = merged.entry(name).or_default();
                slot.0 += sum;
                slot.1 += weight;
            }
        }
        Ok(merged)
    }

    /// Checks that every rank holds the same `value` (e.g. the checkpoint step it resumes
    /// from), naming `what` when they differ.
    pub fn check_same(&self, value: i64, what: &str) -> Result<()> {
        let Some(dist) = &self.dist else { return Ok(()) };
        let mine = Tensor::from_slice(&[value]).to_device(dist.device());
        let (mut max, mut min) = (mine.copy(), mine.copy());
        dist.all_reduce(&mut max, ReduceOp::Max)?;
        dist.all_reduce(&mut min, ReduceOp::Min)?;
        let (max, min) = (max.int64_value(&[0]), min.int64_value(&[0]));
        ensure!(max == min, "the ranks disagree on {what}: from {min} to {max} (rank {} has {value})", dist.rank());
        Ok(())
    }

    /// Waits for every rank.
    pub fn barrier(&self) -> Result<()> {
        self.dist.as_ref().map_or(Ok(()), |d| d.barrier())
    }

    /// Checks that each rank gets at least one microbatch per step.
    pub fn check_microbatches(&self, train_microbatches: usize, grad_accum: usize) -> Result<()> {
        let world = self.world();
        ensure!(
            train_microbatches >= grad_accum * world,
            "{train_microbatches} training microbatches are fewer than grad_accum × WORLD_SIZE = {grad_accum} × {world}: lower --grad-accum or the number of ranks"
        );
        Ok(())
    }
}

/// Indices of `names` in the order in which the backward pass finishes their gradients, as
/// far as the names tell it: first the heads outside the `model.` trunk (`lm_head`,
/// `value_head`: applied last in the forward pass, so their gradients come first), then the
/// trunk in the reverse of its names' natural order (numbers compared as numbers, so
/// `layers.10` after `layers.9`), from its final norm and last layer to the embedding.
pub fn backward_order(names: &[String]) -> Vec<usize> {
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum Part<'a> {
        Number(u64),
        Text(&'a str),
    }
    fn key(name: &str) -> (bool, Vec<Part<'_>>) {
        (!name.starts_with("model."), name.split('.').map(|p| p.parse().map_or(Part::Text(p), Part::Number)).collect())
    }
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by(|&a, &b| key(&names[b]).cmp(&key(&names[a])));
    order
}

/// The gradients of `params`, zeros where a parameter has none yet (so that every rank
/// reduces the same tensors).
pub fn defined_grads(params: &[Tensor]) -> Vec<Tensor> {
    params
        .iter()
        .map(|p| {
            if !p.grad().defined() {
                (p.sum(Kind::Float) * 0.0).backward();
            }
            p.grad()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backward_order_goes_from_the_heads_and_last_layer_to_the_first() {
        let names: Vec<String> = ["lm_head.weight", "model.embed_tokens.weight", "model.layers.10.mlp.weight", "model.layers.2.mlp.weight", "model.layers.9.attn.weight", "model.norm.weight", "value_head.w"].map(String::from).to_vec();
        let ordered: Vec<&str> = backward_order(&names).into_iter().map(|i| names[i].as_str()).collect();
        assert_eq!(ordered, ["value_head.w", "lm_head.weight", "model.norm.weight", "model.layers.10.mlp.weight", "model.layers.9.attn.weight", "model.layers.2.mlp.weight", "model.embed_tokens.weight"]);
    }
}
