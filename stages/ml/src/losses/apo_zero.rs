//! APO-zero (unpaired), binary feedback:
//!
//! ```text
//! desirable   = 1 − σ(β·r)
//! undesirable = σ(β·r)
//! ```
//!
//! with `r = S_pol − S_ref` and no reference point; averaged over the rows.

use anyhow::Result;

use super::params::{Bound, Params};
use super::{finish, DataNeed, Halo, LossInputs, LossOutput, Metrics};

/// The APO-zero loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApoZero {
    /// β (default 0.1).
    pub beta: f64,
}

impl ApoZero {
    pub(crate) fn from_params(p: &Params) -> Result<ApoZero> {
        Ok(ApoZero { beta: p.number("beta", 0.1, Bound::Positive)? })
    }
}

impl Halo for ApoZero {
    fn name(&self) -> &'static str {
        "apo_zero"
    }

    fn data(&self) -> DataNeed {
        DataNeed::Binary
    }

    fn needs_reference(&self) -> bool {
        true
    }

    fn loss(&self, inputs: &LossInputs) -> Result<LossOutput> {
        let (rows, desirable) = inputs.binary_rows(self.name())?;
        let beta_r = rows.reward(self.name(), "rows")? * self.beta;
        // 1 − σ(x) = σ(−x).
        let per_row = (-&beta_r).sigmoid().where_self(desirable, &beta_r.sigmoid());
        finish(self.name(), per_row, None, inputs, Metrics::binary(&beta_r, desirable))
    }
}
