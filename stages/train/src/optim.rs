//! AdamW with decoupled weight decay, a warmup-then-decay learning-rate schedule and gradient
//! clipping by global norm. Written out (rather than libtorch's optimizer) so that its state
//! (moments and, for bf16/f16 weights, f32 master weights) is saved in checkpoints and a
//! resumed run continues bit-for-bit. [`Optimizer`] chooses it or ZeRO-1 ([`ShardedAdamW`]).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use haloflow_dist::GradBuckets;
use haloflow_ml::losses::Accumulator;
use tch::{Kind, Tensor};

use crate::checkpoint::OptimizerState;
use crate::parallel::Ranks;
use crate::zero::ShardedAdamW;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// Per-parameter state.
struct Slot {
    param: Tensor,
    master: Option<Tensor>,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named parameters.
pub struct AdamW {
    config: AdamWConfig,
    /// Whether the update runs libtorch's fused multi-tensor kernel ([`update_all`]).
    fused: bool,
    slots: BTreeMap<String, Slot>,
    /// Optimizer steps taken.
    pub steps: i64,
}

impl AdamW {
    /// Creates the optimizer for `params` (name → tensor requiring grad), updating them with
    /// the fused kernel when `fused`. Parameters stored in bf16/f16 get an f32 master copy that
    /// the update is applied to.
    pub fn new(params: BTreeMap<String, Tensor>, config: AdamWConfig, fused: bool) -> AdamW {
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                let master = (param.kind() != Kind::Float).then(|| param.detach().to_kind(Kind::Float));
                let shape_like = master.as_ref().unwrap_or(&param);
                let m = shape_like.zeros_like().to_kind(Kind::Float);
                let v = shape_like.zeros_like().to_kind(Kind::Float);
                (name, Slot { param, master, m, v })
            })
            .collect();
        AdamW { config, fused, slots, steps: 0 }
    }

    /// Clears every gradient: drops it, its memory free until the next backward pass (as
    /// torch's `zero_grad()`), or with `in_place` zeroes it where it is (DDP's gradients, views
    /// into its buckets).
    pub fn clear_grads(&mut self, in_place: bool) {
        let params = self.slots.values().map(|s| &s.param);
        if !in_place {
            return crate::grads::release(params);
        }
        for p in params {
            let mut grad = p.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
    }

    /// The global L2 norm of all gradients (f64), as torch's `clip_grad_norm_` computes it: each
    /// gradient's norm in one pass (no squared copy), then the norm of those norms.
    pub fn grad_norm(&self) -> f64 {
        let norms: Vec<Tensor> = self.slots.values().map(|s| s.param.grad()).filter(|g| g.defined()).map(|g| l2_norm(&g)).collect();
        if norms.is_empty() {
            return 0.0;
        }
        l2_norm(&Tensor::stack(&norms, 0)).double_value(&[])
    }

    /// Multiplies the gradients by `scale` (the accumulator's 1/examples; `None`: leaves them)
    /// and scales them so that their global norm is at most `max_norm` (as torch's
    /// `clip_grad_norm_`; 0: no clipping), in one multiplication; returns the norm of the
    /// scaled gradients before clipping.
    pub fn scale_and_clip(&mut self, scale: Option<f64>, max_norm: f64) -> f64 {
        let (norm, factor) = scaled_norm_and_factor(self.grad_norm(), scale, max_norm);
        if factor != 1.0 {
            tch::no_grad(|| {
                for slot in self.slots.values_mut() {
                    let mut grad = slot.param.grad();
                    if grad.defined() {
                        let _ = grad.g_mul_scalar_(factor);
                    }
                }
            });
        }
        norm
    }

    /// One AdamW update with learning rate `lr` (as torch.optim.AdamW, `maximize=False`,
    /// `amsgrad=False`) of every parameter with a gradient.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.steps += 1;
        let slots: Vec<&Slot> = self.slots.values().filter(|s| s.param.grad().defined()).collect();
        let targets: Vec<Tensor> = slots.iter().map(|s| s.master.as_ref().unwrap_or(&s.param).shallow_clone()).collect();
        let grads: Vec<Tensor> = slots.iter().map(|s| s.param.grad().to_kind(Kind::Float)).collect();
        let (m, v): (Vec<Tensor>, Vec<Tensor>) = slots.iter().map(|s| (s.m.shallow_clone(), s.v.shallow_clone())).unzip();
        tch::no_grad(|| -> Result<()> {
            update_all(&self.config, self.steps, lr, self.fused, &targets, &m, &v, &grads)?;
            for slot in &slots {
                if let Some(master) = &slot.master {
                    let _ = slot.param.shallow_clone().copy_(master);
                }
            }
            Ok(())
        })
    }

    /// Saves moments and master weights as safetensors plus the step count.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (name, s) in &self.slots {
            tensors.push((format!("m.{name}"), s.m.shallow_clone()));
            tensors.push((format!("v.{name}"), s.v.shallow_clone()));
            if let Some(master) = &s.master {
                tensors.push((format!("master.{name}"), master.shallow_clone()));
            }
        }
        let path = dir.join("optimizer.safetensors");
        Tensor::write_safetensors(&tensors, &path).with_context(|| format!("writing {}", path.display()))?;
        haloflow::io::write_json(&dir.join("optimizer.json"), &serde_json::json!({ "steps": self.steps, "config": self.config }))
    }

    /// Restores the state written by [`AdamW::save`].
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("optimizer.safetensors");
        let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .into_iter()
            .collect();
        for (name, s) in self.slots.iter_mut() {
            let get = |k: String| tensors.get(&k).with_context(|| format!("{}: no tensor {k}", path.display()));
            tch::no_grad(|| -> Result<()> {
                s.m.copy_(get(format!("m.{name}"))?);
                s.v.copy_(get(format!("v.{name}"))?);
                if let Some(master) = &mut s.master {
                    master.copy_(get(format!("master.{name}"))?);
                }
                Ok(())
            })?;
        }
        let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("optimizer.json"))?)?;
        self.steps = meta["steps"].as_i64().context("optimizer.json: steps")?;
        Ok(())
    }
}

/// One AdamW update of the f32 weights `targets[i]` with moments `m[i]`, `v[i]` and f32
/// gradients `grads[i]`, in place, at optimizer step `t` (1-based): libtorch's fused
/// multi-tensor kernel when `fused` (one kernel for all; on CPU within an ulp of the unfused
/// chain, `tests::fused_steps_match_the_unfused_chain`, and faster, ci/bench-adamw.sh), else
/// [`update`] per tensor. All
/// tensors share one device. Call under no-grad.
#[allow(clippy::too_many_arguments)]
pub fn update_all(c: &AdamWConfig, t: i64, lr: f64, fused: bool, targets: &[Tensor], m: &[Tensor], v: &[Tensor], grads: &[Tensor]) -> Result<()> {
    if fused {
        return crate::fused::adamw(c, t, lr, targets, m, v, grads);
    }
    for (((target, m), v), grad) in targets.iter().zip(m).zip(v).zip(grads) {
        update(c, t, lr, &mut target.shallow_clone(), &mut m.shallow_clone(), &mut v.shallow_clone(), grad);
    }
    Ok(())
}

/// One AdamW update, in place, of the f32 weights `target` with moments `m`, `v` and the f32
/// gradient `grad`, at optimizer step `t` (1-based); element-wise, so it serves whole
/// parameters and ZeRO-1 slices alike. Call under no-grad.
pub fn update(c: &AdamWConfig, t: i64, lr: f64, target: &mut Tensor, m: &mut Tensor, v: &mut Tensor, grad: &Tensor) {
    let bias1 = 1.0 - c.beta1.powi(t as i32);
    let bias2 = 1.0 - c.beta2.powi(t as i32);
    if c.weight_decay != 0.0 {
        let _ = target.g_mul_scalar_(1.0 - lr * c.weight_decay);
    }
    // m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²  (fewest kernels: lerp, addcmul)
    let _ = m.lerp_(grad, 1.0 - c.beta1);
    let _ = v.g_mul_scalar_(c.beta2).addcmul_(grad, &(grad * (1.0 - c.beta2)));
    // θ ← θ − lr·m̂/(√v̂ + ε), with m̂ = m/bias1 and v̂ = v/bias2.
    let mut denom = v.sqrt();
    let _ = denom.g_mul_scalar_(1.0 / bias2.sqrt()).g_add_scalar_(c.eps);
    let _ = target.addcdiv_(&(&*m * (-lr / bias1)), &denom);
}

/// The optimizer: plain AdamW (its state on every rank) or ZeRO-1.
pub enum Optimizer {
    /// AdamW with its whole state.
    Full(AdamW),
    /// ZeRO-1: this rank's slice of the state.
    Sharded(ShardedAdamW),
}

impl Optimizer {
    /// Clears every gradient after a step: drops it (the forward passes run without its
    /// memory), unless it is a view into DDP's gradient `buckets`, which keep their memory and
    /// are zeroed in place.
    pub fn clear_grads(&mut self, buckets: Option<&GradBuckets>) {
        match self {
            Optimizer::Full(opt) => opt.clear_grads(buckets.is_some()),
            Optimizer::Sharded(opt) => opt.clear_grads(),
        }
    }

    /// Whether the gradients are sharded (ZeRO-2): every microbatch's backward pass
    /// reduce-scatters them.
    pub fn shards_gradients(&self) -> bool {
        matches!(self, Optimizer::Sharded(opt) if opt.shards_gradients())
    }

    /// Sums the step's gradients over the ranks (or takes the sums of `buckets`, whose
    /// collectives overlapped the backward pass), divides them by its example count and clips
    /// them by global norm; returns the step's loss and the norm before clipping.
    pub fn sync_and_clip(&mut self, ranks: &Ranks, params: &[Tensor], acc: Accumulator, max_norm: f64, buckets: Option<&GradBuckets>) -> Result<(f64, f64)> {
        match self {
            Optimizer::Full(opt) => {
                if buckets.is_none() {
                    ranks.sum_gradients(params)?;
                }
                let (loss, scale) = acc.totals();
                Ok((loss, opt.scale_and_clip(scale, max_norm)))
            }
            Optimizer::Sharded(opt) => {
                let (loss, scale) = acc.totals();
                Ok((loss, opt.sync_and_clip(ranks, scale, max_norm, buckets)?))
            }
        }
    }

    /// Updates the weights with learning rate `lr` (ZeRO-1: the shard, all-gathered window by
    /// window as it goes, see [`ShardedAdamW::update`]).
    pub fn update(&mut self, ranks: &Ranks, lr: f64) -> Result<()> {
        match self {
            Optimizer::Full(opt) => opt.step(lr),
            Optimizer::Sharded(opt) => opt.update(ranks, lr),
        }
    }

    /// Waits until the last update's weights are all in the parameters (ZeRO-1's all-gathers
    /// run on into the next forward pass): before they are read outside one.
    pub fn ready(&self) -> Result<()> {
        match self {
            Optimizer::Full(_) => Ok(()),
            Optimizer::Sharded(opt) => opt.ready(),
        }
    }

    /// Restores the state of a checkpoint.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        match self {
            Optimizer::Full(opt) => opt.load(dir),
            Optimizer::Sharded(opt) => opt.load(dir),
        }
    }

    /// The state to checkpoint.
    pub fn state(&self) -> OptimizerState<'_> {
        match self {
            Optimizer::Full(opt) => OptimizerState::Full(opt),
            Optimizer::Sharded(opt) => OptimizerState::Sharded(opt),
        }
    }
}

/// The norm of the gradients once multiplied by `scale` (the accumulator's 1/examples;
/// `None`: 1), from the norm `raw` of the summed gradients, and the one factor that scales and
/// clips them to `max_norm` (as torch's `clip_grad_norm_`; 0: no clipping).
pub fn scaled_norm_and_factor(raw: f64, scale: Option<f64>, max_norm: f64) -> (f64, f64) {
    let scale = scale.unwrap_or(1.0);
    let norm = raw * scale;
    let coef = max_norm / (norm + 1e-6);
    (norm, if max_norm > 0.0 && coef < 1.0 { scale * coef } else { scale })
}

/// The L2 norm of `t` in f32, in one pass.
pub fn l2_norm(t: &Tensor) -> Tensor {
    t.norm_scalaropt_dtype(2.0, Kind::Float)
}

/// How the learning rate decays after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Stay at the peak.
    Constant,
    /// Linear to zero at the last step.
    Linear,
    /// Half a cosine to zero at the last step.
    Cosine,
}

/// The learning rate at optimizer step `step` (0-based): linear warmup over `warmup` steps,
/// then `decay` to zero at `total` steps.
pub fn learning_rate(peak: f64, step: usize, warmup: usize, total: usize, decay: Decay) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match decay {
        Decay::Constant => peak,
        Decay::Linear => peak * (1.0 - progress),
        Decay::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// Checks hyper-parameters, naming the bad one.
pub fn validate(lr: f64, config: &AdamWConfig) -> Result<()> {
    for (name, value, ok) in [
        ("lr", lr, lr > 0.0),
        ("beta1", config.beta1, (0.0..1.0).contains(&config.beta1)),
        ("beta2", config.beta2, (0.0..1.0).contains(&config.beta2)),
        ("eps", config.eps, config.eps > 0.0),
        ("weight_decay", config.weight_decay, config.weight_decay >= 0.0),
    ] {
        if !ok || !value.is_finite() {
            bail!("optimizer param `{name}` = {value} is out of range");
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tch::Device;

    fn config() -> AdamWConfig {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 }
    }

    #[test]
    fn one_step_matches_the_adamw_formula() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(BTreeMap::from([("p".to_string(), p.shallow_clone())]), config(), false);
        (&p * &p).sum(Kind::Float).backward(); // grad = 2p
        opt.step(0.01).unwrap();
        // Step 1: m̂ = g, v̂ = g², update = g/(|g|+eps) ≈ sign(g); decay first.
        let expected = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (i, e) in expected.iter().enumerate() {
            assert!((p.double_value(&[i as i64]) - e).abs() < 1e-6);
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let p = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        let mut opt = AdamW::new(BTreeMap::from([("p".to_string(), p.shallow_clone())]), config(), false);
        (&p * 1.0).sum(Kind::Float).backward();
        (&p * &p).sum(Kind::Float).backward(); // grad = 1 + 2p = (7, 9)
        let norm = opt.scale_and_clip(None, 1.0);
        assert!((norm - (49.0f64 + 81.0).sqrt()).abs() < 1e-5);
        assert!((opt.grad_norm() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn the_example_scale_comes_before_the_norm_and_the_clip() {
        let p = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        let mut opt = AdamW::new(BTreeMap::from([("p".to_string(), p.shallow_clone())]), config(), false);
        (&p * &p).sum(Kind::Float).backward(); // grad = 2p = (6, 8), norm 10
        // Divided by 4 examples: norm 2.5, under max_norm 3 (no clip): grad (1.5, 2).
        assert!((opt.scale_and_clip(Some(0.25), 3.0) - 2.5).abs() < 1e-6);
        assert_eq!(Vec::<f32>::try_from(p.grad()).unwrap(), [1.5, 2.0]);
        // Divided by 2 more: norm 1.25, clipped to 1: grad (0.6, 0.8).
        assert!((opt.scale_and_clip(Some(0.5), 1.0) - 1.25).abs() < 1e-6);
        let g = Vec::<f32>::try_from(p.grad()).unwrap();
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6, "{g:?}");
        // No examples: the gradients stay as they are.
        assert!((opt.scale_and_clip(None, 0.0) - 1.0).abs() < 1e-6);
        assert!((opt.grad_norm() - 1.0).abs() < 1e-6);
    }

    /// Between steps the gradients are dropped (their memory free for the forward passes),
    /// unless they are views into DDP's buckets, which are zeroed where they are.
    #[test]
    fn cleared_gradients_are_dropped_unless_they_live_in_buckets() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(BTreeMap::from([("p".to_string(), p.shallow_clone())]), config(), false);
        (&p * &p).sum(Kind::Float).backward();
        let storage = p.grad().data_ptr();
        opt.clear_grads(true);
        assert_eq!((p.grad().data_ptr(), Vec::<f32>::try_from(&p.grad()).unwrap()), (storage, vec![0.0, 0.0]));
        opt.clear_grads(false);
        assert!(!p.grad().defined());
    }

    #[test]
    fn state_round_trips_so_resumed_steps_match() {
        let run = |save_at: Option<usize>| -> Vec<f64> {
            let dir = tempfile::tempdir().unwrap();
            let p = Tensor::from_slice(&[1.0f32, -2.0, 0.5]).set_requires_grad(true);
            let mut opt = AdamW::new(BTreeMap::from([("p".to_string(), p.shallow_clone())]), config(), false);
            for step in 0..6 {
                if Some(step) == save_at {
                    opt.save(dir.path()).unwrap();
                    let snapshot = p.detach().copy();
                    let q = snapshot.set_requires_grad(true);
                    opt = AdamW::new(BTreeMap::from([("p".to_string(), q.shallow_clone())]), config(), false);
                    opt.load(dir.path()).unwrap();
                    return run_rest(q, opt, step);
                }
                opt.clear_grads(false);
                (&p * &p * &p).sum(Kind::Float).backward();
                opt.step(learning_rate(0.05, step, 2, 6, Decay::Cosine)).unwrap();
            }
            Vec::<f64>::try_from(&p.detach().to_kind(Kind::Double)).unwrap()
        };
        fn run_rest(p: Tensor, mut opt: AdamW, from: usize) -> Vec<f64> {
            for step in from..6 {
                opt.clear_grads(false);
                (&p * &p * &p).sum(Kind::Float).backward();
                opt.step(learning_rate(0.05, step, 2, 6, Decay::Cosine)).unwrap();
            }
            Vec::<f64>::try_from(&p.detach().to_kind(Kind::Double)).unwrap()
        }
        assert_eq!(run(None), run(Some(3)));
    }

    /// Values of `shape` spread over [-1, 1], the same for the same `salt` without the global
    /// RNG (tests run in parallel threads, and another test seeding or drawing between two
    /// seeded draws made "identical" tensors differ).
    pub(crate) fn spread(shape: &[i64], salt: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.618 + salt).sin().view(shape)
    }

    /// Parameters (f32, and bf16 with an f32 master) and their gradients at `step`.
    fn params(kind: Kind) -> BTreeMap<String, Tensor> {
        [("a", vec![33, 17]), ("b", vec![1000]), ("c", vec![3])]
            .into_iter()
            .enumerate()
            .map(|(i, (n, shape))| (n.to_string(), (spread(&shape, i as f64) * 1.5).to_kind(kind).set_requires_grad(true)))
            .collect()
    }

    fn set_grads(ps: &BTreeMap<String, Tensor>, step: usize) {
        for (i, p) in ps.values().enumerate() {
            let mut g = p.grad();
            if !g.defined() {
                (p.sum(Kind::Float) * 0.0).backward();
                g = p.grad();
            }
            let _ = g.copy_(&(spread(&p.size(), 10.0 * step as f64 + i as f64 + 0.5) * 0.1));
        }
    }

    fn values(ps: &BTreeMap<String, Tensor>) -> Vec<f64> {
        ps.values().flat_map(|p| Vec::<f64>::try_from(&p.detach().to_kind(Kind::Double).view([-1])).unwrap()).collect()
    }

    /// libtorch's fused kernel (CPU) against the unfused chain over 8 steps with weight decay
    /// and a warmup-cosine schedule (so the bias corrections' step count matters): weights and
    /// moments within 1e-6, f32 and bf16 (f32 masters); and a fused run resumed from a
    /// checkpoint the unfused run wrote continues as the uninterrupted fused run, bit for bit.
    #[test]
    fn fused_steps_match_the_unfused_chain() {
        let lr = |step| learning_rate(1e-2, step, 2, 8, Decay::Cosine);
        for kind in [Kind::Float, Kind::BFloat16] {
            let (plain, fused) = (params(kind), params(kind));
            let copy = |ps: &BTreeMap<String, Tensor>| ps.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
            let mut a = AdamW::new(copy(&plain), config(), false);
            let mut b = AdamW::new(copy(&fused), config(), true);
            for step in 0..8 {
                set_grads(&plain, step);
                set_grads(&fused, step);
                a.step(lr(step)).unwrap();
                b.step(lr(step)).unwrap();
                let worst = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
                let masters = |o: &AdamW| o.slots.values().flat_map(|s| Vec::<f64>::try_from(&s.master.as_ref().unwrap_or(&s.param).detach().to_kind(Kind::Double).view([-1])).unwrap()).collect::<Vec<_>>();
                let moments = |o: &AdamW| o.slots.values().flat_map(|s| [&s.m, &s.v]).flat_map(|t| Vec::<f64>::try_from(&t.to_kind(Kind::Double).view([-1])).unwrap()).collect::<Vec<_>>();
                let (dw, dm) = (worst(&masters(&a), &masters(&b)), worst(&moments(&a), &moments(&b)));
                assert!(dw <= 1e-6 && dm <= 1e-6, "{kind:?} step {}: weights differ by {dw:e}, moments by {dm:e}", step + 1);
                if step == 7 {
                    eprintln!("{kind:?}, 8 steps: fused vs unfused max |Δ weight| {dw:e}, max |Δ moment| {dm:e}");
                }
            }
        }
        // Resume: 3 unfused steps saved, 5 fused ones after the load, against 3 + 5 fused
        // steps after the same 3 unfused ones without a checkpoint in between.
        let dir = tempfile::tempdir().unwrap();
        let run = |resume: bool| -> Vec<f64> {
            let ps = params(Kind::Float);
            let mut opt = AdamW::new(ps.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect(), config(), false);
            for step in 0..3 {
                set_grads(&ps, step);
                opt.step(lr(step)).unwrap();
            }
            let mut opt = if resume {
                opt.save(dir.path()).unwrap();
                let mut loaded = AdamW::new(ps.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect(), config(), true);
                loaded.load(dir.path()).unwrap();
                assert_eq!(loaded.steps, 3);
                loaded
            } else {
                AdamW { fused: true, ..opt }
            };
            for step in 3..8 {
                set_grads(&ps, step);
                opt.step(lr(step)).unwrap();
            }
            values(&ps)
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn schedules() {
        assert_eq!(learning_rate(1.0, 0, 4, 10, Decay::Constant), 0.25);
        assert_eq!(learning_rate(1.0, 3, 4, 10, Decay::Linear), 1.0);
        assert!((learning_rate(1.0, 7, 4, 10, Decay::Linear) - 0.5).abs() < 1e-12);
        assert!((learning_rate(1.0, 7, 4, 10, Decay::Cosine) - 0.5).abs() < 1e-12);
        assert_eq!(learning_rate(1.0, 9, 0, 10, Decay::Constant), 1.0);
        assert!(validate(0.0, &config()).unwrap_err().to_string().contains("`lr`"));
    }
}
