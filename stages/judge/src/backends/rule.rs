//! The `rule` backend: a verifier for prompts with a checkable `reference` answer.
//!
//! Each output is checked on its own: with `--rule exact` the whole output must equal the
//! reference, with `--rule regex` the last match of `--answer-regex` in the output (its first
//! capture group, if any) must equal the reference's own match (or the whole reference when the
//! regex does not match it). Both sides are normalized first: whitespace runs become one space,
//! case is folded, surrounding whitespace and a final period are dropped. The side that is
//! correct wins; both or neither correct is a tie. A prompt without a reference is invalid.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use regex::Regex;

use super::{Backend, JudgeAnswer, JudgeRequest};
use crate::cli::{JudgeArgs, RuleMode};
use crate::verdict::Shown;

/// The reference-answer verifier.
pub struct Rule {
    regex: Option<Regex>,
}

/// `text` with whitespace collapsed, case folded and a final period dropped.
pub fn normalize(text: &str) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    joined.strip_suffix('.').unwrap_or(&joined).trim_end().to_string()
}

impl Rule {
    /// The verifier configured by the command line.
    pub fn from_args(args: &JudgeArgs) -> Result<Self> {
        let regex = match (args.rule, &args.answer_regex) {
            (RuleMode::Exact, None) => None,
            (RuleMode::Exact, Some(_)) => bail!("--answer-regex is only used with --rule regex"),
            (RuleMode::Regex, None) => bail!("--rule regex needs --answer-regex"),
            (RuleMode::Regex, Some(pattern)) => {
                Some(Regex::new(pattern).with_context(|| format!("--answer-regex {pattern:?} is not a valid regex"))?)
            }
        };
        Ok(Rule { regex })
    }

    /// The normalized answer found in `text`, if any.
    fn answer(&self, text: &str) -> Option<String> {
        match &self.regex {
            None => Some(normalize(text)),
            Some(re) => re.captures_iter(text).last().map(|c| normalize(c.get(1).or(c.get(0)).map_or("", |m| m.as_str()))),
        }
    }
}

impl Backend for Rule {
    fn fingerprint(&self) -> String {
        match &self.regex {
            None => "rule exact".to_string(),
            Some(re) => format!("rule regex={}", re.as_str()),
        }
    }

    fn model(&self) -> Option<String> {
        None
    }

    fn concurrency(&self) -> usize {
        1
    }

    fn position_sensitive(&self) -> bool {
        false
    }

    fn uses_template(&self) -> bool {
        false
    }

    fn judge(&self, request: &JudgeRequest) -> Result<JudgeAnswer> {
        let started = Instant::now();
        let (raw, verdict) = match request.reference {
            None => ("no reference answer for this prompt".to_string(), Shown::Invalid),
            Some(reference) => {
                let expected = self.answer(reference).unwrap_or_else(|| normalize(reference));
                let check = |output: &str| {
                    let found = self.answer(output);
                    let ok = found.as_deref() == Some(expected.as_str());
                    let shown = found.map_or("no answer".to_string(), |f| format!("{f:?}"));
                    (ok, format!("{} ({shown})", if ok { "correct" } else { "wrong" }))
                };
                let ((a_ok, a), (b_ok, b)) = (check(request.answer_a), check(request.answer_b));
                let verdict = match (a_ok, b_ok) {
                    (true, false) => Shown::A,
                    (false, true) => Shown::B,
                    _ => Shown::Tie,
                };
                (format!("A: {a}; B: {b}; reference {expected:?}"), verdict)
            }
        };
        Ok(JudgeAnswer {
            raw,
            verdict,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            prompt_tokens: None,
            completion_tokens: None,
            preference_first: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::Template;
    use clap::Parser;

    fn rule(extra: &[&str]) -> Result<Rule> {
        let mut argv = vec!["halo-judge", "--candidate", "c", "--baseline", "b", "--judgments", "j", "--summary", "s", "--report", "r"];
        argv.extend_from_slice(extra);
        Rule::from_args(&crate::cli::JudgeArgs::parse_from(argv))
    }

    fn verdict(rule: &Rule, a: &str, b: &str, reference: Option<&str>) -> Shown {
        let template = Template::builtin("mt-bench").unwrap();
        let request = JudgeRequest { messages: &[], template: &template, answer_a: a, answer_b: b, reference };
        rule.judge(&request).unwrap().verdict
    }

    #[test]
    fn exact_match_normalizes_whitespace_case_and_final_period() {
        let r = rule(&[]).unwrap();
        assert_eq!(normalize("  The   Answer\nis 42. "), "the answer is 42");
        assert_eq!(verdict(&r, "paris.", "Lyon", Some("Paris")), Shown::A);
        assert_eq!(verdict(&r, "Lyon", " PARIS ", Some("Paris")), Shown::B);
        assert_eq!(verdict(&r, "Paris", "paris", Some("Paris")), Shown::Tie);
        assert_eq!(verdict(&r, "Lyon", "Nice", Some("Paris")), Shown::Tie);
        assert_eq!(verdict(&r, "Paris", "Lyon", None), Shown::Invalid);
    }

    #[test]
    fn regex_extracts_the_last_match_from_outputs_and_reference() {
        let r = rule(&["--rule", "regex", "--answer-regex", r"(-?\d+(?:\.\d+)?)"]).unwrap();
        let reference = Some("The area of the triangle is 3.");
        assert_eq!(verdict(&r, "Using the formula, 1/2*2*3 = 3", "It is 4 square units", reference), Shown::A);
        assert_eq!(verdict(&r, "no idea", "so the answer is 3", reference), Shown::B);
        assert_eq!(verdict(&r, "no idea", "maybe", reference), Shown::Tie);
        assert!(rule(&["--rule", "regex"]).is_err());
        assert!(rule(&["--rule", "regex", "--answer-regex", "("]).is_err());
        assert!(rule(&["--answer-regex", "x"]).is_err());
    }

    #[test]
    fn the_rule_is_order_free_and_fingerprinted() {
        let r = rule(&["--rule", "regex", "--answer-regex", r"\d+"]).unwrap();
        assert!(!r.position_sensitive() && !r.uses_template());
        assert_eq!(r.fingerprint(), r"rule regex=\d+");
        assert_eq!(rule(&[]).unwrap().fingerprint(), "rule exact");
    }
}
