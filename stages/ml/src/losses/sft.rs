//! SFT and CSFT, binary feedback or pairs, reference-free; per completion the mean token
//! negative log-likelihood
//!
//! ```text
//! nll = −S_pol / n      (n clamped ≥ 1)
//! ```
//!
//! SFT averages it over the desirable rows (binary data) or the chosen completions (pairs).
//! CSFT (conditional SFT) averages it over every row, or over both completions of each pair,
//! after the data has put a control token before each completion: [`with_control_token`]
//! is that transformation, for the trainer to apply before tokenizing, and for sampling,
//! which then conditions on [`GOOD`].

use anyhow::Result;

use super::{finish, DataNeed, Examples, Halo, LossInputs, LossOutput, Metrics};

/// CSFT's control token of desirable completions.
pub const GOOD: &str = "<|good|>";
/// CSFT's control token of undesirable completions.
pub const BAD: &str = "<|bad|>";

/// CSFT's data transformation: `completion` prefixed with its control token, [`GOOD`] when
/// desirable (the chosen side of a pair), [`BAD`] otherwise. Sampling prefixes the empty
/// completion, `with_control_token("", true)`. The tokenizer should know both tokens as added
/// special tokens, so that each is one token.
pub fn with_control_token(completion: &str, desirable: bool) -> String {
    let token = if desirable { GOOD } else { BAD };
    format!("{token}{completion}")
}

/// SFT, or CSFT when `control` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sft {
    /// CSFT: learn from both classes (with control tokens in the data).
    pub control: bool,
}

impl Halo for Sft {
    fn name(&self) -> &'static str {
        if self.control {
            "csft"
        } else {
            "sft"
        }
    }

    fn data(&self) -> DataNeed {
        DataNeed::Either
    }

    fn needs_reference(&self) -> bool {
        false
    }

    fn rewrite_completion(&self, completion: &str, desirable: bool) -> Option<String> {
        self.control.then(|| with_control_token(completion, desirable))
    }

    fn loss(&self, inputs: &LossInputs) -> Result<LossOutput> {
        let name = self.name();
        match &inputs.examples {
            Examples::Binary { .. } => {
                let (rows, desirable) = inputs.binary_rows(name)?;
                let counted = (!self.control).then_some(desirable);
                finish(name, -rows.mean_logp(), counted, inputs, Metrics::default())
            }
            Examples::Paired { .. } => {
                let (chosen, rejected) = inputs.pairs(name)?;
                let per_pair = if self.control { (chosen.mean_logp() + rejected.mean_logp()) * -0.5 } else { -chosen.mean_logp() };
                finish(name, per_pair, None, inputs, Metrics::default())
            }
        }
    }
}
