//! SLiC-HF (Zhao et al., 2023), preference pairs, sequence level, reference-free:
//!
//! ```text
//! slic = max(0, δ − S_c + S_r) + λ·(−S_c)
//! ```
//!
//! a hinge on the log-likelihood margin plus a likelihood regulariser on the chosen
//! completion, averaged over the pairs. Reported rewards are the log-likelihoods `S` the
//! hinge compares.

use anyhow::Result;

use super::params::{Bound, Params};
use super::{finish, DataNeed, Halo, LossInputs, LossOutput, Metrics};

/// The SLiC loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slic {
    /// The margin δ (default 1.0).
    pub delta: f64,
    /// The regulariser's weight λ (default 0.1).
    pub lambda: f64,
}

impl Slic {
    pub(crate) fn from_params(p: &Params) -> Result<Slic> {
        Ok(Slic { delta: p.number("delta", 1.0, Bound::NonNegative)?, lambda: p.number("lambda", 0.1, Bound::NonNegative)? })
    }
}

impl Halo for Slic {
    fn name(&self) -> &'static str {
        "slic"
    }

    fn data(&self) -> DataNeed {
        DataNeed::Paired
    }

    fn needs_reference(&self) -> bool {
        false
    }

    fn loss(&self, inputs: &LossInputs) -> Result<LossOutput> {
        let (chosen, rejected) = inputs.pairs(self.name())?;
        let (s_c, s_r) = (&chosen.policy, &rejected.policy);
        let per_pair = (-s_c + s_r + self.delta).relu() - s_c * self.lambda;
        finish(self.name(), per_pair, None, inputs, Metrics::paired(s_c, s_r, 1.0))
    }
}
