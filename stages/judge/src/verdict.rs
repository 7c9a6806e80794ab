//! Verdicts: parsing a judge's answer strictly, mapping positions (A/B) to the compared outputs,
//! and combining the two orders of a pair.
//!
//! Parsing never guesses: an answer that names no label, or more than one, is [`Shown::Invalid`]
//! and is kept with its raw text.

use serde::{Deserialize, Serialize};

/// A verdict in terms of the positions shown to the judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shown {
    /// The first output shown is better.
    A,
    /// The second output shown is better.
    B,
    /// The judge declared a tie.
    Tie,
    /// The answer could not be read as a verdict (refusal, garbage, several labels).
    Invalid,
}

/// One of the two compared outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The model being evaluated.
    Candidate,
    /// The reference it is compared with.
    Baseline,
}

impl Side {
    /// The name used in the `first` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Candidate => "candidate",
            Side::Baseline => "baseline",
        }
    }
}

/// A verdict in terms of the compared outputs (the `verdict` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The candidate's output is better.
    Candidate,
    /// The baseline's output is better.
    Baseline,
    /// Neither is better (a judged tie, or two orders that disagree).
    Tie,
    /// No usable verdict.
    Invalid,
}

impl Verdict {
    /// The name used in the `verdict` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Candidate => "candidate",
            Verdict::Baseline => "baseline",
            Verdict::Tie => "tie",
            Verdict::Invalid => "invalid",
        }
    }
}

impl Shown {
    /// The verdict about the outputs when `first` was shown as A.
    pub fn resolve(self, first: Side) -> Verdict {
        match (self, first) {
            (Shown::A, Side::Candidate) | (Shown::B, Side::Baseline) => Verdict::Candidate,
            (Shown::B, Side::Candidate) | (Shown::A, Side::Baseline) => Verdict::Baseline,
            (Shown::Tie, _) => Verdict::Tie,
            (Shown::Invalid, _) => Verdict::Invalid,
        }
    }
}

/// The verdict of a pair from the verdicts of its orders: any invalid order makes the pair
/// invalid (half a verdict is not guessed into a whole one); orders that disagree make a tie,
/// as in MT-Bench's "inconsistent" rule; agreeing orders give their verdict.
pub fn combine(orders: &[Verdict]) -> Verdict {
    match orders {
        [] => Verdict::Invalid,
        _ if orders.contains(&Verdict::Invalid) => Verdict::Invalid,
        [first, rest @ ..] if rest.iter().all(|v| v == first) => *first,
        _ => Verdict::Tie,
    }
}

/// How a template's labels are found in an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Match {
    /// The answer, trimmed of surrounding whitespace, equals one label.
    Exact,
    /// Exactly one of the labels occurs somewhere in the answer (after an explanation, say).
    Contains,
}

/// The verdict labels of a template (`[verdict]` table of a template file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerdictSpec {
    /// Label meaning "the first output (A) is better".
    pub a: String,
    /// Label meaning "the second output (B) is better".
    pub b: String,
    /// Label meaning "tie", if the template offers one.
    #[serde(default)]
    pub tie: Option<String>,
    /// How labels are found.
    #[serde(rename = "match")]
    pub mode: Match,
    /// Whether labels are compared case-sensitively.
    pub case_sensitive: bool,
}

impl VerdictSpec {
    /// The labels with the verdict each one means.
    pub fn labels(&self) -> Vec<(&str, Shown)> {
        let mut labels = vec![(self.a.as_str(), Shown::A), (self.b.as_str(), Shown::B)];
        labels.extend(self.tie.as_deref().map(|t| (t, Shown::Tie)));
        labels
    }

    /// Reads `answer` strictly: exactly one label must match, anything else is invalid.
    pub fn parse(&self, answer: &str) -> Shown {
        let fold = |s: &str| if self.case_sensitive { s.to_string() } else { s.to_lowercase() };
        let answer = fold(answer);
        let found: Vec<Shown> = self
            .labels()
            .into_iter()
            .filter(|(label, _)| {
                let label = fold(label);
                match self.mode {
                    Match::Exact => answer.trim() == label,
                    Match::Contains => answer.contains(&label),
                }
            })
            .map(|(_, verdict)| verdict)
            .collect();
        match found.as_slice() {
            [one] => *one,
            _ => Shown::Invalid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::Template;

    fn parse(template: &str, answer: &str) -> Shown {
        Template::builtin(template).unwrap().verdict.parse(answer)
    }

    #[test]
    fn mt_bench_reads_exactly_one_bracketed_label() {
        assert_eq!(parse("mt-bench", "A is more detailed.\n\n[[A]]"), Shown::A);
        assert_eq!(parse("mt-bench", "Final verdict: [[B]]"), Shown::B);
        assert_eq!(parse("mt-bench", "Both are equally good. [[C]]"), Shown::Tie);
        assert_eq!(parse("mt-bench", "[[A]] or maybe [[B]]"), Shown::Invalid);
        assert_eq!(parse("mt-bench", "Assistant A is better."), Shown::Invalid);
        assert_eq!(parse("mt-bench", "[[a]]"), Shown::Invalid, "labels are case-sensitive");
        assert_eq!(parse("mt-bench", "I cannot help with that."), Shown::Invalid);
        assert_eq!(parse("mt-bench", ""), Shown::Invalid);
    }

    #[test]
    fn halos_reads_response_labels_case_insensitively() {
        assert_eq!(parse("halos", "Response 1"), Shown::A);
        assert_eq!(parse("halos", "response 2."), Shown::B);
        assert_eq!(parse("halos", "RESPONSE 2 is more concise"), Shown::B);
        assert_eq!(parse("halos", "Response 1 is better than Response 2"), Shown::Invalid);
        assert_eq!(parse("halos", "They are equally good."), Shown::Invalid, "no tie label");
        assert_eq!(parse("halos", "1"), Shown::Invalid);
    }

    #[test]
    fn alpaca_eval_wants_the_bare_identifier() {
        assert_eq!(parse("alpaca-eval", "m"), Shown::A);
        assert_eq!(parse("alpaca-eval", " M\n"), Shown::B);
        assert_eq!(parse("alpaca-eval", "m or M"), Shown::Invalid);
        assert_eq!(parse("alpaca-eval", "Model M"), Shown::Invalid);
        assert_eq!(parse("alpaca-eval", "\"m\""), Shown::Invalid);
    }

    #[test]
    fn positions_resolve_to_sides() {
        assert_eq!(Shown::A.resolve(Side::Candidate), Verdict::Candidate);
        assert_eq!(Shown::A.resolve(Side::Baseline), Verdict::Baseline);
        assert_eq!(Shown::B.resolve(Side::Candidate), Verdict::Baseline);
        assert_eq!(Shown::B.resolve(Side::Baseline), Verdict::Candidate);
        assert_eq!(Shown::Tie.resolve(Side::Baseline), Verdict::Tie);
        assert_eq!(Shown::Invalid.resolve(Side::Candidate), Verdict::Invalid);
    }

    #[test]
    fn both_orders_combine_with_disagreement_as_tie() {
        use Verdict::*;
        // A judge that always picks the first position disagrees with itself across orders.
        let always_a = [Shown::A.resolve(Side::Candidate), Shown::A.resolve(Side::Baseline)];
        assert_eq!(combine(&always_a), Tie);
        assert_eq!(combine(&[Candidate, Candidate]), Candidate);
        assert_eq!(combine(&[Baseline, Baseline]), Baseline);
        assert_eq!(combine(&[Candidate, Tie]), Tie);
        assert_eq!(combine(&[Tie, Tie]), Tie);
        assert_eq!(combine(&[Candidate, Invalid]), Invalid);
        assert_eq!(combine(&[Invalid, Invalid]), Invalid);
        assert_eq!(combine(&[Baseline]), Baseline, "a single (random) order is its own verdict");
        assert_eq!(combine(&[]), Invalid);
    }
}
