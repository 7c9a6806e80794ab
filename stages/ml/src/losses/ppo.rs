//! Offline PPO with dummy rewards (the "dummy RLHF" baseline of the KTO paper), binary feedback,
//! per token t of each row's completion:
//!
//! ```text
//! reward    = +1 (desirable) or −1 (undesirable) on the last completion token, 0 elsewhere
//! A_t, R_t  = GAE(γ = 0.99, λ = 0.95) of the rewards and the detached values V, A whitened
//!             over the batch's tokens, R_t = A_t + V_t (before whitening)
//! ρ_t       = exp(logπ_θ − logπ_ref)             (πold = the frozen reference)
//! policy    = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−c, 1+c)),  c = 0.5
//! critic    = ½·(V_t − R_t)²
//! loss      = policy + 0.01·critic + 0.1·(logπ_θ − logπ_ref)
//! ```
//!
//! each term a mean over the row's completion tokens, then averaged over the rows. The values
//! come from a [`ValueHead`] on the detached last hidden state.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::params::{Bound, Params};
use super::{finish, AllReduce, DataNeed, Halo, LossInputs, LossOutput, Metrics, SingleProcess};

/// The weight of the critic loss in the total.
pub const CRITIC_COEF: f64 = 0.01;
/// The weight of the mean log-ratio (a KL estimate) in the total.
pub const KL_COEF: f64 = 0.1;

/// Per-token inputs of PPO, all `(B, T)`, aligned: position t holds the log-prob of a target
/// token (as [`crate::logprobs::token_logps`] gives) and the value predicted at the position
/// that predicts it.
#[derive(Debug)]
pub struct TokenLogps {
    /// Policy log-probs, carrying the gradient.
    pub policy: Tensor,
    /// Reference log-probs (never differentiated).
    pub reference: Tensor,
    /// 1 (or true) on completion tokens, 0 elsewhere; one contiguous span per row.
    pub mask: Tensor,
    /// Value predictions, carrying the value head's gradient.
    pub values: Tensor,
}

/// The offline PPO loss.
pub struct Ppo {
    /// The clip range c (default 0.5).
    pub clip: f64,
    /// GAE's discount γ (default 0.99).
    pub gamma: f64,
    /// GAE's λ (default 0.95).
    pub lambda: f64,
    reduce: Arc<dyn AllReduce>,
}

impl Default for Ppo {
    fn default() -> Ppo {
        Ppo { clip: 0.5, gamma: 0.99, lambda: 0.95, reduce: Arc::new(SingleProcess) }
    }
}

impl Ppo {
    pub(crate) fn from_params(p: &Params) -> Result<Ppo> {
        Ok(Ppo {
            clip: p.number("clip", 0.5, Bound::OpenUnit)?,
            gamma: p.number("gamma", 0.99, Bound::Unit)?,
            lambda: p.number("lambda", 0.95, Bound::Unit)?,
            ..Ppo::default()
        })
    }
}

/// The reward tensor `(B, T)`: each row's `score` on its last masked token, 0 elsewhere.
pub fn last_token_rewards(scores: &Tensor, mask: &Tensor) -> Tensor {
    let t = mask.size()[1];
    let next = Tensor::cat(&[mask.narrow(1, 1, t - 1), mask.narrow(1, 0, 1).zeros_like()], 1);
    mask * (1.0 - next) * scores.unsqueeze(1)
}

/// Generalised advantage estimation over the masked tokens of each row, `(B, T)` inputs:
/// `δ_t = r_t + γ·V_{t+1} − V_t`, `A_t = δ_t + γλ·A_{t+1}`, with `V` and `A` zero past the last
/// masked token. Returns the advantages and the returns `A + V`, zero outside the mask.
pub fn gae(rewards: &Tensor, values: &Tensor, mask: &Tensor, gamma: f64, lambda: f64) -> (Tensor, Tensor) {
    let values = values * mask;
    let mut next_value = values.select(1, 0).zeros_like();
    let mut next_advantage = next_value.zeros_like();
    let mut advantages = Vec::new();
    for t in (0..rewards.size()[1]).rev() {
        let value = values.select(1, t);
        let delta = rewards.select(1, t) + &next_value * gamma - &value;
        let advantage = (delta + &next_advantage * (gamma * lambda)) * mask.select(1, t);
        next_value = value;
        next_advantage = advantage.shallow_clone();
        advantages.push(advantage);
    }
    advantages.reverse();
    let advantages = Tensor::stack(&advantages, 1);
    let returns = &advantages + values;
    (advantages, returns)
}

/// `x` whitened over its masked elements: `(x − mean) / sqrt(var + 1e-8)` with the population
/// mean and variance, both all-reduced over processes; zero outside the mask.
pub fn whiten(x: &Tensor, mask: &Tensor, reduce: &dyn AllReduce) -> Result<Tensor> {
    let valid = mask.to_kind(Kind::Bool);
    let zeros = x.zeros_like();
    let stats = Tensor::stack(&[valid.sum(Kind::Double), x.where_self(&valid, &zeros).sum(Kind::Double)], 0);
    let stats = reduce.sum(&stats)?;
    let count = stats.get(0).clamp_min(1.0);
    let centered = (x - stats.get(1) / &count).where_self(&valid, &zeros);
    let var = reduce.sum(&centered.square().sum(Kind::Double).unsqueeze(0))?.get(0) / count;
    Ok(centered * (var + 1e-8).rsqrt())
}

/// PPO's clipped surrogate per token, `max(−A·ρ, −A·clip(ρ, 1−c, 1+c))` with `ρ = exp(log_ratio)`:
/// where the clip binds, the token gives no gradient.
pub fn clipped_policy_loss(log_ratio: &Tensor, advantages: &Tensor, clip: f64) -> Tensor {
    let ratio = log_ratio.exp();
    let unclipped = -advantages * &ratio;
    let clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip);
    unclipped.maximum(&clipped)
}

/// The mean of `x` over each row's masked tokens, `(B,)`.
fn row_mean(x: &Tensor, valid: &Tensor) -> Tensor {
    let count = valid.sum_dim_intlist([1].as_slice(), false, x.kind()).clamp_min(1.0);
    x.where_self(valid, &x.zeros_like()).sum_dim_intlist([1].as_slice(), false, x.kind()) / count
}

impl Halo for Ppo {
    fn name(&self) -> &'static str {
        "ppo"
    }

    fn data(&self) -> DataNeed {
        DataNeed::Binary
    }

    fn needs_reference(&self) -> bool {
        true
    }

    fn loss(&self, inputs: &LossInputs) -> Result<LossOutput> {
        let (_, desirable) = inputs.binary_rows(self.name())?;
        let tokens =
            inputs.tokens.as_ref().context("`ppo` needs per-token policy and reference log-probs, a mask and values; none were given")?;
        let shape = tokens.policy.size();
        ensure!(
            shape.len() == 2 && shape[0] == desirable.numel() as i64 && shape[1] >= 1,
            "`ppo`: the per-token policy log-probs must have shape [{}, T], got {shape:?}",
            desirable.numel()
        );
        for (t, what) in [(&tokens.reference, "reference log-probs"), (&tokens.mask, "mask"), (&tokens.values, "values")] {
            ensure!(t.size() == shape, "`ppo`: the per-token {what} must have shape {shape:?}, got {:?}", t.size());
        }
        let kind = tokens.policy.kind();
        let valid = tokens.mask.to_kind(Kind::Bool);
        let mask = valid.to_kind(kind);
        let (advantages, returns) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
            let scores = desirable.to_kind(kind) * 2.0 - 1.0;
            let (advantages, returns) = gae(&last_token_rewards(&scores, &mask), &tokens.values.detach(), &mask, self.gamma, self.lambda);
            Ok((whiten(&advantages, &mask, &*self.reduce)?, returns))
        })?;
        let log_ratio = &tokens.policy - tokens.reference.detach();
        let policy = row_mean(&clipped_policy_loss(&log_ratio, &advantages, self.clip), &valid);
        let critic = row_mean(&((&tokens.values - returns).square() * 0.5), &valid);
        let kl = row_mean(&log_ratio, &valid);
        let per_row = &policy + &critic * CRITIC_COEF + &kl * KL_COEF;
        let extra = [("ppo/policy", &policy), ("ppo/critic", &critic), ("ppo/kl", &kl)]
            .into_iter()
            .map(|(k, v)| (k, v.detach().mean(Kind::Double).double_value(&[])))
            .collect();
        finish(self.name(), per_row, None, inputs, Metrics { extra, ..Metrics::default() })
    }

    fn needs_value_head(&self) -> bool {
        true
    }

    fn set_all_reduce(&mut self, reduce: Arc<dyn AllReduce>) {
        self.reduce = reduce;
    }
}

/// PPO's critic: a small MLP `hidden → inner → 1` (ReLU) on the language model's last hidden
/// state, detached so that the critic loss trains only the head.
#[derive(Debug)]
pub struct ValueHead {
    hidden: nn::Linear,
    out: nn::Linear,
}

impl ValueHead {
    /// A value head with its parameters under `path` (`hidden`, `out`).
    pub fn new(path: &nn::Path, hidden_size: i64, inner: i64) -> ValueHead {
        ValueHead {
            hidden: nn::linear(path / "hidden", hidden_size, inner, Default::default()),
            out: nn::linear(path / "out", inner, 1, Default::default()),
        }
    }

    /// Values `(B, T)` of hidden states `(B, T, hidden_size)`; pass the states at the positions
    /// that predict the tokens of [`TokenLogps`] (position p predicts token p + 1).
    pub fn forward(&self, hidden_states: &Tensor) -> Tensor {
        self.out.forward(&self.hidden.forward(&hidden_states.detach()).relu()).squeeze_dim(-1)
    }
}
