//! IPO (Azar et al., 2023), preference pairs, with length-normalised rewards:
//!
//! ```text
//! ipo = ((r_c/n_c − r_r/n_r) − 1/(2τ))²      (n clamped ≥ 1)
//! ```
//!
//! averaged over the pairs. Reported rewards are `τ·r` (TRL's convention, τ playing β's role).

use anyhow::Result;

use super::params::{Bound, Params};
use super::{finish, DataNeed, Halo, LossInputs, LossOutput, Metrics};

/// The IPO loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ipo {
    /// τ (default 0.1).
    pub tau: f64,
}

impl Ipo {
    pub(crate) fn from_params(p: &Params) -> Result<Ipo> {
        Ok(Ipo { tau: p.number("tau", 0.1, Bound::Positive)? })
    }
}

impl Halo for Ipo {
    fn name(&self) -> &'static str {
        "ipo"
    }

    fn data(&self) -> DataNeed {
        DataNeed::Paired
    }

    fn needs_reference(&self) -> bool {
        true
    }

    fn loss(&self, inputs: &LossInputs) -> Result<LossOutput> {
        let (chosen, rejected) = inputs.pairs(self.name())?;
        let r_c = chosen.reward(self.name(), "chosen completions")?;
        let r_r = rejected.reward(self.name(), "rejected completions")?;
        let h = &r_c / chosen.n_clamped() - &r_r / rejected.n_clamped();
        let per_pair = (h - 1.0 / (2.0 * self.tau)).square();
        finish(self.name(), per_pair, None, inputs, Metrics::paired(&(r_c * self.tau), &(r_r * self.tau), self.tau))
    }
}
