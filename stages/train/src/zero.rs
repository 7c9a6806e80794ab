//! ZeRO-1 (`--shard-optimizer`): the parameters are seen as one flat f32 vector cut into one
//! slice per rank; each rank keeps the AdamW moments and the f32 master weights of its slice
//! only. A step reduce-scatters the gradients (each rank gets its slice, summed), clips by the
//! global norm (the slices' squared norms summed), updates the slice and all-gathers the
//! weights. Checkpoints hold one shard file per rank with its offset; a resume with another
//! number of ranks re-slices them.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::optim::{self, AdamWConfig};
use crate::parallel::{defined_grads, Ranks};

/// Where a shard sits in the flat parameter vector (its `.json` beside the tensors).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShardMeta {
    start: i64,
    len: i64,
    total: i64,
    steps: i64,
    config: AdamWConfig,
}

/// AdamW over this rank's slice of the flattened parameters.
pub struct ShardedAdamW {
    config: AdamWConfig,
    params: Vec<Tensor>,
    /// Elements of all parameters.
    total: i64,
    /// This rank's offset and slice length; the flat vector is padded to world × len.
    start: i64,
    len: i64,
    world: i64,
    master: Tensor,
    m: Tensor,
    v: Tensor,
    /// The reduced, scaled and clipped gradient slice of the step in progress.
    grad: Option<Tensor>,
    /// Optimizer steps taken.
    pub steps: i64,
}

/// The tensors as one f32 vector, zero-padded to `padded` elements.
fn flatten(tensors: &[Tensor], padded: i64) -> Tensor {
    let mut pieces: Vec<Tensor> = tensors.iter().map(|t| t.to_kind(Kind::Float).reshape([-1])).collect();
    let total: i64 = pieces.iter().map(|p| p.numel() as i64).sum();
    if padded > total {
        pieces.push(Tensor::zeros([padded - total], (Kind::Float, tensors[0].device())));
    }
    Tensor::cat(&pieces, 0)
}

fn shard_file(dir: &Path, rank: usize, ext: &str) -> std::path::PathBuf {
    dir.join(format!("optimizer-shard-{rank}.{ext}"))
}

impl ShardedAdamW {
    /// The optimizer of rank `ranks.rank()` over `params` (name → tensor, in name order).
    pub fn new(params: BTreeMap<String, Tensor>, config: AdamWConfig, ranks: &Ranks) -> ShardedAdamW {
        let params: Vec<Tensor> = params.into_values().collect();
        let total: i64 = params.iter().map(|p| p.numel() as i64).sum();
        let world = ranks.world() as i64;
        let len = (total + world - 1) / world;
        let start = ranks.rank() as i64 * len;
        let detached: Vec<Tensor> = params.iter().map(|p| p.detach()).collect();
        let flat = tch::no_grad(|| flatten(&detached, world * len));
        let master = flat.narrow(0, start, len).copy();
        let (m, v) = (master.zeros_like(), master.zeros_like());
        ShardedAdamW { config, params, total, start, len, world, master, m, v, grad: None, steps: 0 }
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Reduce-scatters the gradients, multiplies them by `scale` (the accumulator's
    /// 1/examples) and clips them to the global norm `max_norm` (0: no clipping); returns the
    /// norm before clipping.
    pub fn sync_and_clip(&mut self, ranks: &Ranks, scale: Option<f64>, max_norm: f64) -> Result<f64> {
        ensure!(ranks.world() as i64 == self.world, "ShardedAdamW made for {} ranks, used with {}", self.world, ranks.world());
        let grads = defined_grads(&self.params);
        let flat = tch::no_grad(|| flatten(&grads, self.world * self.len));
        let mut slice = ranks.reduce_scatter(&flat)?;
        if let Some(s) = scale {
            slice *= s;
        }
        let norm = ranks.sum(&slice.square().sum(Kind::Float).unsqueeze(0))?.sqrt().double_value(&[0]);
        let coef = max_norm / (norm + 1e-6);
        if max_norm > 0.0 && coef < 1.0 {
            slice *= coef;
        }
        self.grad = Some(slice);
        Ok(norm)
    }

    /// Updates this rank's slice with the gradient of [`ShardedAdamW::sync_and_clip`] and
    /// all-gathers the weights into the parameters.
    pub fn update(&mut self, ranks: &Ranks, lr: f64) -> Result<()> {
        let grad = self.grad.take().context("ShardedAdamW::update before sync_and_clip")?;
        self.steps += 1;
        tch::no_grad(|| optim::update(&self.config, self.steps, lr, &mut self.master, &mut self.m, &mut self.v, &grad));
        let full = ranks.all_gather(&self.master)?;
        tch::no_grad(|| {
            let mut at = 0;
            for p in &self.params {
                let n = p.numel() as i64;
                let _ = p.shallow_clone().copy_(&full.narrow(0, at, n).view(p.size().as_slice()).to_kind(p.kind()));
                at += n;
            }
        });
        Ok(())
    }

    /// Writes this rank's shard (moments, master weights, offset) into `dir`.
    pub fn save(&self, dir: &Path, rank: usize) -> Result<()> {
        let path = shard_file(dir, rank, "safetensors");
        let tensors = [("m", &self.m), ("v", &self.v), ("master", &self.master)].map(|(k, t)| (k.to_string(), t.shallow_clone()));
        Tensor::write_safetensors(&tensors, &path).with_context(|| format!("writing {}", path.display()))?;
        let meta = ShardMeta { start: self.start, len: self.len, total: self.total, steps: self.steps, config: self.config };
        haloflow::io::write_json(&shard_file(dir, rank, "json"), &meta)
    }

    /// Restores this rank's slice from the shards in `dir`, written by any number of ranks.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let (from, to) = (self.start, (self.start + self.len).min(self.total));
        let mut covered = 0;
        for rank in 0.. {
            let meta_path = shard_file(dir, rank, "json");
            if !meta_path.exists() {
                ensure!(rank > 0, "{}: no optimizer shard in this checkpoint (it was written without --shard-optimizer?)", dir.display());
                break;
            }
            let meta: ShardMeta = serde_json::from_slice(&std::fs::read(&meta_path).with_context(|| format!("reading {}", meta_path.display()))?)
                .with_context(|| format!("{}: unreadable", meta_path.display()))?;
            ensure!(meta.total == self.total, "{}: the checkpoint's parameters have {} elements, this model {}", meta_path.display(), meta.total, self.total);
            self.steps = meta.steps;
            let (lo, hi) = (from.max(meta.start), to.min(meta.start + meta.len).min(self.total));
            if lo >= hi {
                continue;
            }
            let path = shard_file(dir, rank, "safetensors");
            let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path).with_context(|| format!("reading {}", path.display()))?.into_iter().collect();
            tch::no_grad(|| -> Result<()> {
                for (name, mine) in [("m", &mut self.m), ("v", &mut self.v), ("master", &mut self.master)] {
                    let saved = tensors.get(name).with_context(|| format!("{}: no tensor {name}", path.display()))?;
                    mine.narrow(0, lo - from, hi - lo).copy_(&saved.narrow(0, lo - meta.start, hi - lo));
                }
                Ok(())
            })?;
            covered += hi - lo;
        }
        ensure!(covered == to - from, "{}: the optimizer shards cover {covered} of this rank's {} elements (a shard file is missing)", dir.display(), to - from);
        Ok(())
    }
}
