//! ZeRO-1 (`--shard-optimizer`): the parameters are seen as one flat f32 vector cut into one
//! slice per rank; each rank keeps the AdamW moments of its slice only, and f32 master weights
//! of it when the weights are stored in a narrower type (f32 weights are their own master, as
//! in [`crate::optim::AdamW`]). A step reduce-scatters the gradients (each rank gets its slice,
//! summed), clips by the global norm (the slices' squared norms summed), updates the slice and
//! all-gathers the weights. Both collectives run window by window (about
//! [`BUCKET_ELEMENTS`] elements over all ranks at a time) between the parameters' own tensors
//! and the state, so no flat copy of all gradients or weights ever exists: a rank holds the
//! weights, their gradients and its slice of the state, less than a data-parallel rank
//! holding the whole state. Checkpoints hold one shard file per rank with its offset; a
//! resume with another number of ranks re-slices them.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::optim::{self, l2_norm, AdamWConfig};
use crate::parallel::{defined_grads, Ranks, BUCKET_ELEMENTS};

/// Where a shard sits in the flat parameter vector (its `.json` beside the tensors).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShardMeta {
    start: i64,
    len: i64,
    total: i64,
    steps: i64,
    config: AdamWConfig,
}

/// Tensors seen as one flat vector (each flattened, in order), copied in and out range by range.
struct Flat {
    /// Each tensor's first element in the flat vector.
    offsets: Vec<i64>,
    /// Elements of all tensors.
    total: i64,
}

impl Flat {
    fn new(tensors: &[Tensor]) -> Flat {
        let mut offsets = Vec::with_capacity(tensors.len());
        let mut total = 0;
        for t in tensors {
            offsets.push(total);
            total += t.numel() as i64;
        }
        Flat { offsets, total }
    }

    /// The pieces of the range `[at, at + n)`: (tensor, offset in the tensor, offset in the
    /// range, length). Elements past the last tensor (padding) belong to none.
    fn pieces(&self, at: i64, n: i64) -> impl Iterator<Item = (usize, i64, i64, i64)> + '_ {
        let end = at + n;
        let ends = self.offsets.iter().skip(1).copied().chain([self.total]);
        self.offsets.iter().zip(ends).enumerate().filter_map(move |(i, (&lo, hi))| {
            let (a, b) = (lo.max(at), hi.min(end));
            (a < b).then_some((i, a - lo, a - at, b - a))
        })
    }

    /// Copies the range `[at, at + out.numel())` of `tensors` into `out` (f32), zeros past the end.
    fn read(&self, tensors: &[Tensor], at: i64, out: &mut Tensor) {
        let n = out.numel() as i64;
        if at + n > self.total {
            let _ = out.zero_();
        }
        for (i, from, to, len) in self.pieces(at, n) {
            out.narrow(0, to, len).copy_(&tensors[i].view([-1]).narrow(0, from, len));
        }
    }

    /// Copies `src` into the range `[at, at + src.numel())` of `tensors` (padding dropped).
    fn write(&self, tensors: &[Tensor], at: i64, src: &Tensor) {
        for (i, from, to, len) in self.pieces(at, src.numel() as i64) {
            tensors[i].view([-1]).narrow(0, from, len).copy_(&src.narrow(0, to, len));
        }
    }
}

fn shard_file(dir: &Path, rank: usize, ext: &str) -> std::path::PathBuf {
    dir.join(format!("optimizer-shard-{rank}.{ext}"))
}

/// AdamW over this rank's slice of the flattened parameters.
pub struct ShardedAdamW {
    config: AdamWConfig,
    /// Whether the update runs libtorch's fused kernel ([`optim::update_all`]).
    fused: bool,
    params: Vec<Tensor>,
    flat: Flat,
    /// This rank's offset and slice length; the flat vector is padded to world × len.
    start: i64,
    len: i64,
    world: i64,
    /// Elements per rank of one collective's window.
    window: i64,
    m: Tensor,
    v: Tensor,
    /// f32 master weights and reduced gradients of the slice when the weights are not f32
    /// (f32 weights and gradients hold them in place).
    master: Option<(Tensor, Tensor)>,
    /// The clipping factor of the step in progress (set by [`ShardedAdamW::sync_and_clip`]).
    clip: Option<f64>,
    /// Optimizer steps taken.
    steps: i64,
}

impl ShardedAdamW {
    /// The optimizer of rank `ranks.rank()` over `params` (name → tensor, in name order),
    /// updating with the fused kernel when `fused`.
    pub fn new(params: BTreeMap<String, Tensor>, config: AdamWConfig, fused: bool, ranks: &Ranks) -> ShardedAdamW {
        let params: Vec<Tensor> = params.into_values().collect();
        let flat = Flat::new(&params);
        let world = ranks.world() as i64;
        let len = (flat.total + world - 1) / world;
        let start = ranks.rank() as i64 * len;
        let device = params[0].device();
        let zeros = || Tensor::zeros([len], (Kind::Float, device));
        let master = params.iter().any(|p| p.kind() != Kind::Float).then(|| {
            let mut weights = zeros();
            tch::no_grad(|| flat.read(&params, start, &mut weights));
            (weights, zeros())
        });
        let window = (BUCKET_ELEMENTS / world).max(1);
        ShardedAdamW { config, fused, params, flat, start, len, world, window, m: zeros(), v: zeros(), master, clip: None, steps: 0 }
    }

    /// The windows `(offset in the slice, length)` the collectives go through.
    fn windows(&self) -> impl Iterator<Item = (i64, i64)> {
        let (len, window) = (self.len, self.window);
        (0..len).step_by(window as usize).map(move |o| (o, window.min(len - o)))
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        optim::zero_grads(self.params.iter());
    }

    /// Reduce-scatters the gradients, multiplies them by `scale` (the accumulator's
    /// 1/examples) and clips them to the global norm `max_norm` (0: no clipping); returns the
    /// norm before clipping.
    pub fn sync_and_clip(&mut self, ranks: &Ranks, scale: Option<f64>, max_norm: f64) -> Result<f64> {
        ensure!(ranks.world() as i64 == self.world, "ShardedAdamW made for {} ranks, used with {}", self.world, ranks.world());
        let grads = defined_grads(&self.params);
        let device = self.m.device();
        let mut squares = Tensor::zeros([1], (Kind::Float, device));
        for (o, n) in self.windows() {
            // Rank r's part of this window: its slice's elements [o, o + n).
            let input = Tensor::zeros([self.world * n], (Kind::Float, device));
            tch::no_grad(|| {
                for (r, mut chunk) in input.chunk(self.world, 0).into_iter().enumerate() {
                    self.flat.read(&grads, r as i64 * self.len + o, &mut chunk);
                }
            });
            let mut mine = ranks.reduce_scatter(&input)?;
            drop(input);
            tch::no_grad(|| {
                if let Some(s) = scale {
                    mine *= s;
                }
                squares += l2_norm(&mine).square();
                match &self.master {
                    Some((_, reduced)) => reduced.narrow(0, o, n).copy_(&mine),
                    None => self.flat.write(&grads, self.start + o, &mine),
                }
            });
        }
        let norm = ranks.sum(&squares)?.sqrt().double_value(&[0]);
        let coef = max_norm / (norm + 1e-6);
        self.clip = Some(if max_norm > 0.0 && coef < 1.0 { coef } else { 1.0 });
        Ok(norm)
    }

    /// Updates this rank's slice with the gradient of [`ShardedAdamW::sync_and_clip`] and
    /// all-gathers the weights into the parameters.
    pub fn update(&mut self, ranks: &Ranks, lr: f64) -> Result<()> {
        let clip = self.clip.take().context("ShardedAdamW::update before sync_and_clip")?;
        self.steps += 1;
        let grads: Vec<Tensor> = self.params.iter().map(Tensor::grad).collect();
        let device = self.m.device();
        for (o, n) in self.windows() {
            let (weights, mut grad) = match &self.master {
                Some((master, reduced)) => (master.narrow(0, o, n), reduced.narrow(0, o, n)),
                None => {
                    let (mut w, mut g) = (Tensor::zeros([n], (Kind::Float, device)), Tensor::zeros([n], (Kind::Float, device)));
                    tch::no_grad(|| {
                        self.flat.read(&self.params, self.start + o, &mut w);
                        self.flat.read(&grads, self.start + o, &mut g);
                    });
                    (w, g)
                }
            };
            tch::no_grad(|| {
                if clip < 1.0 {
                    grad *= clip;
                }
                optim::update_all(&self.config, self.steps, lr, self.fused, &[weights.shallow_clone()], &[self.m.narrow(0, o, n)], &[self.v.narrow(0, o, n)], &[grad.shallow_clone()])
            })?;
            drop(grad);
            let all = ranks.all_gather(&weights)?;
            tch::no_grad(|| {
                for (r, part) in all.chunk(self.world, 0).iter().enumerate() {
                    self.flat.write(&self.params, r as i64 * self.len + o, part);
                }
            });
        }
        Ok(())
    }

    /// Writes this rank's shard (moments, master weights, offset) into `dir`; f32 weights are
    /// their own master, copied out of the parameters.
    pub fn save(&self, dir: &Path, rank: usize) -> Result<()> {
        let path = shard_file(dir, rank, "safetensors");
        let master = match &self.master {
            Some((master, _)) => master.shallow_clone(),
            None => {
                let mut weights = self.m.zeros_like();
                tch::no_grad(|| self.flat.read(&self.params, self.start, &mut weights));
                weights
            }
        };
        let tensors = [("m", self.m.shallow_clone()), ("v", self.v.shallow_clone()), ("master", master)].map(|(k, t)| (k.to_string(), t));
        Tensor::write_safetensors(&tensors, &path).with_context(|| format!("writing {}", path.display()))?;
        let meta = ShardMeta { start: self.start, len: self.len, total: self.flat.total, steps: self.steps, config: self.config };
        haloflow::io::write_json(&shard_file(dir, rank, "json"), &meta)
    }

    /// Restores this rank's slice from the shards in `dir`, written by any number of ranks
    /// (the master weights only where they are not the f32 parameters, loaded from the
    /// checkpoint's model).
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let total = self.flat.total;
        let (from, to) = (self.start, (self.start + self.len).min(total));
        let mut covered = 0;
        for rank in 0.. {
            let meta_path = shard_file(dir, rank, "json");
            if !meta_path.exists() {
                ensure!(rank > 0, "{}: no optimizer shard in this checkpoint (it was written without --shard-optimizer?)", dir.display());
                break;
            }
            let meta: ShardMeta = serde_json::from_slice(&std::fs::read(&meta_path).with_context(|| format!("reading {}", meta_path.display()))?)
                .with_context(|| format!("{}: unreadable", meta_path.display()))?;
            ensure!(meta.total == total, "{}: the checkpoint's parameters have {} elements, this model {total}", meta_path.display(), meta.total);
            self.steps = meta.steps;
            let (lo, hi) = (from.max(meta.start), to.min(meta.start + meta.len).min(total));
            if lo >= hi {
                continue;
            }
            let path = shard_file(dir, rank, "safetensors");
            let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path).with_context(|| format!("reading {}", path.display()))?.into_iter().collect();
            tch::no_grad(|| -> Result<()> {
                let master = self.master.as_ref().map(|(master, _)| master);
                for (name, mine) in [("m", Some(&self.m)), ("v", Some(&self.v)), ("master", master)] {
                    let saved = tensors.get(name).with_context(|| format!("{}: no tensor {name}", path.display()))?;
                    if let Some(mine) = mine {
                        mine.narrow(0, lo - from, hi - lo).copy_(&saved.narrow(0, lo - meta.start, hi - lo));
                    }
                }
                Ok(())
            })?;
            covered += hi - lo;
        }
        ensure!(covered == to - from, "{}: the optimizer shards cover {covered} of this rank's {} elements (a shard file is missing)", dir.display(), to - from);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamW;

    #[test]
    fn flat_ranges_cross_tensors_and_pad_with_zeros() {
        let ts = [Tensor::from_slice(&[1.0f32, 2.0, 3.0]), Tensor::from_slice(&[4.0f32, 5.0]).view([1, 2])];
        let flat = Flat::new(&ts);
        assert_eq!(flat.pieces(2, 3).collect::<Vec<_>>(), [(0, 2, 0, 1), (1, 0, 1, 2)]);
        let mut out = Tensor::full([4], 9.0, (Kind::Float, tch::Device::Cpu));
        flat.read(&ts, 3, &mut out);
        assert_eq!(Vec::<f32>::try_from(&out).unwrap(), [4.0, 5.0, 0.0, 0.0]);
        flat.write(&ts, 1, &Tensor::from_slice(&[-2.0f32, -3.0, -4.0, -5.0, -6.0]));
        assert_eq!(Vec::<f32>::try_from(&ts[0]).unwrap(), [1.0, -2.0, -3.0]);
        assert_eq!(Vec::<f32>::try_from(&ts[1].view([-1])).unwrap(), [-4.0, -5.0]);
    }

    /// Window by window, with weights in f32 (their own master) and in bf16 (an f32 master),
    /// ZeRO-1 on one process takes the steps plain AdamW takes, with the unfused update and
    /// with the fused kernel.
    #[test]
    fn windowed_steps_equal_plain_adamw() {
        let config = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
        for (kind, fused) in [(Kind::Float, false), (Kind::BFloat16, false), (Kind::Float, true), (Kind::BFloat16, true)] {
            let make = || -> BTreeMap<String, Tensor> {
                [("a", vec![5, 3]), ("b", vec![7]), ("c", vec![2, 2])]
                    .into_iter()
                    .enumerate()
                    .map(|(i, (n, shape))| (n.to_string(), (crate::optim::tests::spread(&shape, i as f64) * 1.5).to_kind(kind).set_requires_grad(true)))
                    .collect()
            };
            let (plain, sharded) = (make(), make());
            let copy = |ps: &BTreeMap<String, Tensor>| ps.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
            let mut adamw = AdamW::new(copy(&plain), config, fused);
            let ranks = Ranks::single();
            let mut zero = ShardedAdamW::new(copy(&sharded), config, fused, &ranks);
            // bf16 gradients clipped in place would round: clip the f32 case only.
            let max_norm = if kind == Kind::Float { 2.0 } else { 0.0 };
            zero.window = 4; // 26 elements: 7 windows, the last one short
            let loss = |ps: &BTreeMap<String, Tensor>| ps.values().map(|p| (p.to_kind(Kind::Float) * p.to_kind(Kind::Float) * p.to_kind(Kind::Float)).sum(Kind::Float)).fold(Tensor::from(0.0f32), |a, b| a + b);
            for step in 0..4 {
                adamw.zero_grad();
                zero.zero_grad();
                loss(&plain).backward();
                loss(&sharded).backward();
                let a = adamw.scale_and_clip(Some(0.5), max_norm);
                let z = zero.sync_and_clip(&ranks, Some(0.5), max_norm).unwrap();
                assert!((a - z).abs() < 1e-5 * a.max(1.0), "{kind:?} step {step}: norm {a} vs {z}");
                adamw.step(0.01).unwrap();
                zero.update(&ranks, 0.01).unwrap();
                for (name, p) in &plain {
                    let diff = (p.to_kind(Kind::Double) - sharded[name].to_kind(Kind::Double)).abs().max().double_value(&[]);
                    assert!(diff < 1e-6, "{kind:?} (fused: {fused}) step {step}: {name} differs by {diff}");
                }
            }
        }
    }
}
