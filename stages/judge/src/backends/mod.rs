//! Judge backends: what answers one judge request.
//!
//! A backend implements [`Backend`]; the engine (`crate::judge`) calls [`Backend::judge`] from up
//! to [`Backend::concurrency`] threads at once, caches every answer under a key that includes
//! [`Backend::fingerprint`], and records an `Err` as an invalid judgment that is not cached (a
//! rerun asks again). A new backend (the in-process `local` one, say) needs a type implementing
//! the trait and a branch in [`build`].

pub mod local;
pub mod openai;
pub mod rule;

use anyhow::Result;
use haloflow::records::Message;
use serde::{Deserialize, Serialize};

use crate::cli::{BackendKind, JudgeArgs};
use crate::templates::Template;
use crate::verdict::Shown;

/// One judge request: the two outputs in the order shown, and the rendered judge prompt.
#[derive(Debug, Clone, Copy)]
pub struct JudgeRequest<'a> {
    /// The template's messages, rendered for this pair and order (empty for a backend that
    /// does not use templates).
    pub messages: &'a [Message],
    /// The template (its [`crate::verdict::VerdictSpec`] reads text answers).
    pub template: &'a Template,
    /// The output shown first (A).
    pub answer_a: &'a str,
    /// The output shown second (B).
    pub answer_b: &'a str,
    /// The prompt's reference answer, if any.
    pub reference: Option<&'a str>,
}

/// A judge's answer to one request: what is cached and written to the judgments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeAnswer {
    /// The judge's raw answer (free of secrets).
    pub raw: String,
    /// The verdict read from it, in positions.
    pub verdict: Shown,
    /// Time the judge took to answer, in milliseconds (the successful attempt only).
    pub latency_ms: f64,
    /// Tokens of the judge prompt, if the backend reports them.
    pub prompt_tokens: Option<i64>,
    /// Tokens of the judge's answer, if the backend reports them.
    pub completion_tokens: Option<i64>,
    /// The judge's probability that the output shown first is better (ties counted half), for
    /// answers that come with label probabilities (`local`; `openai` when the server returns
    /// `top_logprobs` holding a label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference_first: Option<f64>,
}

/// Probabilities from log-probs (stable softmax); a log-prob of -inf gets probability 0.
pub fn softmax(logps: &[f64]) -> Vec<f64> {
    let max = logps.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = logps.iter().map(|l| (l - max).exp()).collect();
    let total: f64 = exp.iter().sum();
    exp.iter().map(|e| e / total).collect()
}

/// The probability that the output shown first is better, from the probabilities of the
/// template's labels (in [`crate::verdict::VerdictSpec::labels`] order): its label's probability
/// plus half the tie label's.
pub fn preference_first(labels: &[(&str, Shown)], probs: &[f64]) -> f64 {
    labels
        .iter()
        .zip(probs)
        .map(|((_, shown), p)| match shown {
            Shown::A => *p,
            Shown::Tie => p / 2.0,
            _ => 0.0,
        })
        .sum()
}

/// A judge.
pub trait Backend: Sync {
    /// Identifies the judge and every setting that changes its answers (model, sampling); part
    /// of the cache key. Never contains secrets.
    fn fingerprint(&self) -> String;

    /// The judge model's name for the summary, if the backend has one.
    fn model(&self) -> Option<String>;

    /// How many requests may be in flight at once.
    fn concurrency(&self) -> usize;

    /// Whether the verdict can depend on the order of the outputs; a backend that cannot (a
    /// rule) is asked once per pair, with the candidate first.
    fn position_sensitive(&self) -> bool {
        true
    }

    /// Whether the backend reads the rendered template; one that does not (a rule) gets no
    /// messages, and the template is left out of its cache keys and summary.
    fn uses_template(&self) -> bool {
        true
    }

    /// Judges one request. `Err` means no answer was obtained (after any retries); its message
    /// is recorded with the judgment and must not contain secrets.
    fn judge(&self, request: &JudgeRequest) -> Result<JudgeAnswer>;
}

/// The backend chosen by the command line.
pub fn build(args: &JudgeArgs, template: &Template) -> Result<Box<dyn Backend>> {
    Ok(match args.backend {
        BackendKind::Openai => Box::new(openai::OpenAi::from_args(args, template)?),
        BackendKind::Rule => Box::new(rule::Rule::from_args(args)?),
        BackendKind::Local => Box::new(local::Local::from_args(args)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_keeps_order_and_zeroes_minus_infinity() {
        let p = softmax(&[-3.0, -1.0, -2.0]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p[1] > p[2] && p[2] > p[0]);
        assert_eq!(softmax(&[0.0, f64::NEG_INFINITY]), [1.0, 0.0]);
    }

    #[test]
    fn the_first_output_gets_its_label_and_half_the_tie() {
        let labels = [("[[A]]", Shown::A), ("[[B]]", Shown::B), ("[[C]]", Shown::Tie)];
        assert!((preference_first(&labels, &[0.5, 0.3, 0.2]) - 0.6).abs() < 1e-12);
        assert_eq!(preference_first(&labels[..2], &[0.25, 0.75]), 0.25);
    }
}
