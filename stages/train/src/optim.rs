//! AdamW with decoupled weight decay, a warmup-then-decay learning-rate schedule and gradient
//! clipping by global norm. Written out (rather than libtorch's optimizer) so that its state
//! (moments and, for bf16/f16 weights, f32 master weights) is saved in checkpoints and a
//! resumed run continues bit-for-bit.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

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
    slots: BTreeMap<String, Slot>,
    /// Optimizer steps taken.
    pub steps: i64,
}

impl AdamW {
    /// Creates the optimizer for `params` (name → tensor requiring grad). Parameters stored in
    /// bf16/f16 get an f32 master copy that the update is applied to.
    pub fn new(params: BTreeMap<String, Tensor>, config: AdamWConfig) -> AdamW {
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
        AdamW { config, slots, steps: 0 }
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for slot in self.slots.values_mut() {
            let mut grad = slot.param.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
    }

    /// The global L2 norm of all gradients (f64).
    pub fn grad_norm(&self) -> f64 {
        let squares: Vec<Tensor> = self
            .slots
            .values()
            .map(|s| s.param.grad())
            .filter(|g| g.defined())
            .map(|g| g.to_kind(Kind::Float).pow_tensor_scalar(2).sum(Kind::Float))
            .collect();
        if squares.is_empty() {
            return 0.0;
        }
        Tensor::stack(&squares, 0).sum(Kind::Float).sqrt().double_value(&[])
    }

    /// Scales gradients so their global norm is at most `max_norm` (as torch's
    /// `clip_grad_norm_`); returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        let coef = max_norm / (norm + 1e-6);
        if max_norm > 0.0 && coef < 1.0 {
            for slot in self.slots.values_mut() {
                let mut grad = slot.param.grad();
                if grad.defined() {
                    let _ = grad.g_mul_scalar_(coef);
                }
            }
        }
        norm
    }

    /// One AdamW update with learning rate `lr` (as torch.optim.AdamW, `maximize=False`,
    /// `amsgrad=False`).
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let (c, t) = (self.config, self.steps);
        tch::no_grad(|| {
            for slot in self.slots.values_mut() {
                let grad = slot.param.grad();
                if !grad.defined() {
                    continue;
                }
                let mut target = slot.master.as_ref().unwrap_or(&slot.param).shallow_clone();
                update(&c, t, lr, &mut target, &mut slot.m, &mut slot.v, &grad.to_kind(Kind::Float));
                if let Some(master) = &slot.master {
                    let _ = slot.param.shallow_clone().copy_(master);
                }
            }
        });
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
mod tests {
    use super::*;

    fn config() -> AdamWConfig {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 }
    }

    #[test]
    fn one_step_matches_the_adamw_formula() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(BTreeMap::from([("p".to_string(), p.shallow_clone())]), config());
        (&p * &p).sum(Kind::Float).backward(); // grad = 2p
        opt.step(0.01);
        // Step 1: m̂ = g, v̂ = g², update = g/(|g|+eps) ≈ sign(g); decay first.
        let expected = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (i, e) in expected.iter().enumerate() {
            assert!((p.double_value(&[i as i64]) - e).abs() < 1e-6);
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let p = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        let mut opt = AdamW::new(BTreeMap::from([("p".to_string(), p.shallow_clone())]), config());
        (&p * 1.0).sum(Kind::Float).backward();
        (&p * &p).sum(Kind::Float).backward(); // grad = 1 + 2p = (7, 9)
        let norm = opt.clip_grad_norm(1.0);
        assert!((norm - (49.0f64 + 81.0).sqrt()).abs() < 1e-5);
        assert!((opt.grad_norm() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn state_round_trips_so_resumed_steps_match() {
        let run = |save_at: Option<usize>| -> Vec<f64> {
            let dir = tempfile::tempdir().unwrap();
            let p = Tensor::from_slice(&[1.0f32, -2.0, 0.5]).set_requires_grad(true);
            let mut opt = AdamW::new(BTreeMap::from([("p".to_string(), p.shallow_clone())]), config());
            for step in 0..6 {
                if Some(step) == save_at {
                    opt.save(dir.path()).unwrap();
                    let snapshot = p.detach().copy();
                    let q = snapshot.set_requires_grad(true);
                    opt = AdamW::new(BTreeMap::from([("p".to_string(), q.shallow_clone())]), config());
                    opt.load(dir.path()).unwrap();
                    return run_rest(q, opt, step);
                }
                opt.zero_grad();
                (&p * &p * &p).sum(Kind::Float).backward();
                opt.step(learning_rate(0.05, step, 2, 6, Decay::Cosine));
            }
            Vec::<f64>::try_from(&p.detach().to_kind(Kind::Double)).unwrap()
        };
        fn run_rest(p: Tensor, mut opt: AdamW, from: usize) -> Vec<f64> {
            for step in from..6 {
                opt.zero_grad();
                (&p * &p * &p).sum(Kind::Float).backward();
                opt.step(learning_rate(0.05, step, 2, 6, Decay::Cosine));
            }
            Vec::<f64>::try_from(&p.detach().to_kind(Kind::Double)).unwrap()
        }
        assert_eq!(run(None), run(Some(3)));
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
