//! ORPO (Hong et al., 2024), preference pairs, reference-free; with `a = S/n` (n clamped ≥ 1)
//! and the log-odds `lo(a) = a − log(1 − e^a)`:
//!
//! ```text
//! orpo = −a_c + λ·(−log σ(lo(a_c) − lo(a_r)))
//! ```
//!
//! the chosen completion's mean token NLL plus an odds-ratio term, averaged over the pairs.
//! Reported rewards are `λ·a` (TRL's convention).

use anyhow::Result;
use tch::Tensor;

use super::params::{Bound, Params};
use super::{finish, neg_log_sigmoid, DataNeed, Halo, LossInputs, LossOutput, Metrics};

/// The ORPO loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Orpo {
    /// The odds-ratio term's weight λ (default 0.25).
    pub lambda: f64,
}

impl Orpo {
    pub(crate) fn from_params(p: &Params) -> Result<Orpo> {
        Ok(Orpo { lambda: p.number("lambda", 0.25, Bound::NonNegative)? })
    }
}

/// `lo(a) = a − log(1 − e^a)`, the log-odds of a mean token probability `e^a` (a < 0).
fn log_odds(a: &Tensor) -> Tensor {
    a - (-a.expm1()).log()
}

impl Halo for Orpo {
    fn name(&self) -> &'static str {
        "orpo"
    }

    fn data(&self) -> DataNeed {
        DataNeed::Paired
    }

    fn needs_reference(&self) -> bool {
        false
    }

    fn loss(&self, inputs: &LossInputs) -> Result<LossOutput> {
        let (chosen, rejected) = inputs.pairs(self.name())?;
        let (a_c, a_r) = (chosen.mean_logp(), rejected.mean_logp());
        let per_pair = -&a_c + neg_log_sigmoid(&(log_odds(&a_c) - log_odds(&a_r))) * self.lambda;
        finish(self.name(), per_pair, None, inputs, Metrics::paired(&(&a_c * self.lambda), &(&a_r * self.lambda), self.lambda))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_odds_of_a_probability() {
        let p = [0.25f64, 0.5, 0.9];
        let lo = Vec::<f64>::try_from(log_odds(&Tensor::from_slice(&p.map(f64::ln)))).unwrap();
        for (p, lo) in p.iter().zip(lo) {
            assert!((lo - (p / (1.0 - p)).ln()).abs() < 1e-12);
        }
    }
}
