//! DPO (Rafailov et al., 2023) and conservative DPO, preference pairs; `Δ = r_chosen − r_rejected`:
//!
//! ```text
//! dpo  = −log σ(β·Δ)
//! cdpo = (1−ε)·(−log σ(β·Δ)) + ε·(−log σ(−β·Δ))
//! ```
//!
//! averaged over the pairs; cDPO assumes each label is flipped with probability ε.

use anyhow::Result;

use super::params::{Bound, Params};
use super::{finish, neg_log_sigmoid, DataNeed, Halo, LossInputs, LossOutput, Metrics};

/// DPO, or cDPO when `epsilon` is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dpo {
    /// β (default 0.1).
    pub beta: f64,
    /// cDPO's label-noise rate ε (default 0.2); `None` for plain DPO.
    pub epsilon: Option<f64>,
}

impl Dpo {
    pub(crate) fn from_params(p: &Params, conservative: bool) -> Result<Dpo> {
        let beta = p.number("beta", 0.1, Bound::Positive)?;
        let epsilon = if conservative { Some(p.number("epsilon", 0.2, Bound::Unit)?) } else { None };
        Ok(Dpo { beta, epsilon })
    }
}

impl Halo for Dpo {
    fn name(&self) -> &'static str {
        if self.epsilon.is_some() {
            "cdpo"
        } else {
            "dpo"
        }
    }

    fn data(&self) -> DataNeed {
        DataNeed::Paired
    }

    fn needs_reference(&self) -> bool {
        true
    }

    fn loss(&self, inputs: &LossInputs) -> Result<LossOutput> {
        let name = self.name();
        let (chosen, rejected) = inputs.pairs(name)?;
        let beta_c = chosen.reward(name, "chosen completions")? * self.beta;
        let beta_r = rejected.reward(name, "rejected completions")? * self.beta;
        let logits = &beta_c - &beta_r;
        let per_pair = match self.epsilon {
            None => neg_log_sigmoid(&logits),
            Some(eps) => neg_log_sigmoid(&logits) * (1.0 - eps) + neg_log_sigmoid(&-&logits) * eps,
        };
        finish(name, per_pair, None, inputs, Metrics::paired(&beta_c, &beta_r, self.beta))
    }
}
