//! SimPO (Meng et al., 2024), preference pairs, reference-free:
//!
//! ```text
//! simpo = −log σ(β·(S_c/n_c − S_r/n_r) − γ)      (n clamped ≥ 1)
//! ```
//!
//! averaged over the pairs. Reported rewards are SimPO's own, `β·S/n`.

use anyhow::Result;

use super::params::{Bound, Params};
use super::{finish, neg_log_sigmoid, DataNeed, Halo, LossInputs, LossOutput, Metrics};

/// The SimPO loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Simpo {
    /// β (default 2.0).
    pub beta: f64,
    /// The target margin γ (default 1.0).
    pub gamma: f64,
}

impl Simpo {
    pub(crate) fn from_params(p: &Params) -> Result<Simpo> {
        Ok(Simpo { beta: p.number("beta", 2.0, Bound::Positive)?, gamma: p.number("gamma", 1.0, Bound::NonNegative)? })
    }
}

impl Halo for Simpo {
    fn name(&self) -> &'static str {
        "simpo"
    }

    fn data(&self) -> DataNeed {
        DataNeed::Paired
    }

    fn needs_reference(&self) -> bool {
        false
    }

    fn loss(&self, inputs: &LossInputs) -> Result<LossOutput> {
        let (chosen, rejected) = inputs.pairs(self.name())?;
        let beta_c = chosen.mean_logp() * self.beta;
        let beta_r = rejected.mean_logp() * self.beta;
        let per_pair = neg_log_sigmoid(&(&beta_c - &beta_r - self.gamma));
        finish(self.name(), per_pair, None, inputs, Metrics::paired(&beta_c, &beta_r, self.beta))
    }
}
