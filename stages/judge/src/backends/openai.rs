//! The `openai` backend: any OpenAI-compatible `POST {base_url}/chat/completions` endpoint
//! (OpenAI, vLLM, llama.cpp's server, ...), through haloflow-openai's [`Client`] (retries with
//! `Retry-After`, key redaction: see [`haloflow_openai::client`]).
//!
//! With `top_logprobs` > 0 a request also asks for `logprobs: true, top_logprobs: K`. When the
//! answer's first token comes with `top_logprobs` holding one or more of the template's verdict
//! labels, the labels' probabilities are read from them (see [`label_probabilities`]) and the
//! answer carries [`JudgeAnswer::preference_first`], as alpaca_eval's weighted annotators do. A
//! server that answers such a request with HTTP 400 is asked again without the parameters, and
//! no later request names them.
//!
//! Answers and error reasons leave this module redacted by the client, so a server that echoes
//! the key, whole or in part, cannot get it written into judgments, caches or logs.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, Context, Result};
use haloflow_openai::client::Client;
use serde_json::{json, Value};

use super::{preference_first, Backend, JudgeAnswer, JudgeRequest};
use crate::cli::JudgeArgs;
use crate::templates::Template;
use crate::verdict::VerdictSpec;

/// Answer budget when neither --max-tokens nor the template gives one.
const DEFAULT_MAX_TOKENS: u32 = 1024;

/// An OpenAI-compatible chat-completions judge.
pub struct OpenAi {
    client: Client,
    model: String,
    temperature: f64,
    max_tokens: u32,
    seed: u64,
    top_logprobs: u32,
    /// Set once the server refused `logprobs` with HTTP 400: later requests leave it out.
    logprobs_refused: AtomicBool,
}

/// A successful attempt's content.
struct Completion {
    raw: String,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    /// The first answer token's `top_logprobs` (token, log-prob), when the server sent them.
    top_logprobs: Option<Vec<(String, f64)>>,
}

impl OpenAi {
    /// The backend configured by the command line; reads the API key from the environment.
    pub fn from_args(args: &JudgeArgs, template: &Template) -> Result<Self> {
        let model = args.model.clone().context("--backend openai needs --model (the judge model's name)")?;
        Ok(OpenAi {
            client: Client::new(&args.client, concat!("haloflow-judge/", env!("CARGO_PKG_VERSION")))?,
            model,
            temperature: args.temperature,
            max_tokens: args.max_tokens.or(template.max_tokens).unwrap_or(DEFAULT_MAX_TOKENS),
            seed: args.seed,
            top_logprobs: args.top_logprobs,
            logprobs_refused: AtomicBool::new(false),
        })
    }

    /// The request body; with `logprobs` it asks for the first tokens' `top_logprobs`.
    fn body(&self, request: &JudgeRequest, logprobs: bool) -> Value {
        let mut body = json!({
            "model": self.model,
            "messages": request.messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        });
        if logprobs {
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(self.top_logprobs);
        }
        body
    }

    /// Whether requests ask for `logprobs` now.
    fn asks_logprobs(&self) -> bool {
        self.top_logprobs > 0 && !self.logprobs_refused.load(Ordering::Relaxed)
    }
}

impl Backend for OpenAi {
    fn fingerprint(&self) -> String {
        format!(
            "openai base_url={} model={} temperature={} max_tokens={} seed={} top_logprobs={}",
            self.client.base_url(),
            self.model,
            self.temperature,
            self.max_tokens,
            self.seed,
            self.top_logprobs
        )
    }

    fn model(&self) -> Option<String> {
        Some(self.model.clone())
    }

    fn concurrency(&self) -> usize {
        self.client.concurrency()
    }

    fn judge(&self, request: &JudgeRequest) -> Result<JudgeAnswer> {
        let mut logprobs = self.asks_logprobs();
        loop {
            let read = |text: &str, redact: &dyn Fn(&str) -> String| {
                let mut completion = parse_completion(text)?;
                completion.raw = redact(&completion.raw);
                Ok(completion)
            };
            match self.client.post("chat/completions", &self.body(request, logprobs), read) {
                Ok(reply) => {
                    let completion = reply.value;
                    let spec = &request.template.verdict;
                    let probs = completion.top_logprobs.as_deref().and_then(|top| label_probabilities(spec, top));
                    return Ok(JudgeAnswer {
                        verdict: spec.parse(&completion.raw),
                        raw: completion.raw,
                        latency_ms: reply.latency.as_secs_f64() * 1000.0,
                        prompt_tokens: completion.prompt_tokens,
                        completion_tokens: completion.completion_tokens,
                        preference_first: probs.map(|p| preference_first(&spec.labels(), &p)),
                    });
                }
                Err(failed) if logprobs && failed.status == Some(400) => {
                    // Asked once more without the parameter; if that works, never again.
                    if !self.logprobs_refused.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            reason = %failed.reason,
                            "the server refused `logprobs`: asking without it (verdict counts only, no weighted win rate)"
                        );
                    }
                    logprobs = false;
                }
                Err(failed) => return Err(anyhow!(failed.reason)),
            }
        }
    }
}

/// The probabilities of the template's labels (in [`VerdictSpec::labels`] order) from the first
/// answer token's `top_logprobs`, as alpaca_eval's `logprob_parser`: a label's mass is the
/// probability of the tokens equal to it (surrounding whitespace trimmed, case folded when the
/// template's labels are case-insensitive), and the masses are normalised over the labels. A
/// label absent from `top_logprobs` gets probability 0; `None` when no label is among them (a
/// multi-token label such as `[[A]]` never is, nor a label after a preamble).
pub fn label_probabilities(spec: &VerdictSpec, top: &[(String, f64)]) -> Option<Vec<f64>> {
    let fold = |s: &str| if spec.case_sensitive { s.trim().to_string() } else { s.trim().to_lowercase() };
    let mass: Vec<f64> = spec
        .labels()
        .iter()
        .map(|(label, _)| top.iter().filter(|(token, _)| fold(token) == fold(label)).map(|(_, lp)| lp.exp()).sum())
        .collect();
    let total: f64 = mass.iter().sum();
    (total > 0.0 && total.is_finite()).then(|| mass.iter().map(|m| m / total).collect())
}

/// Reads a chat-completions response: the first choice's content (or its refusal) and usage.
fn parse_completion(body: &str) -> Result<Completion> {
    let v: Value = serde_json::from_str(body).context("not JSON")?;
    let message = v.pointer("/choices/0/message").context("no choices[0].message")?;
    let raw = match (message.get("content").and_then(Value::as_str), message.get("refusal").and_then(Value::as_str)) {
        (Some(content), _) => content.to_string(),
        (None, Some(refusal)) => refusal.to_string(),
        (None, None) => String::new(),
    };
    let usage = |field: &str| v.pointer(&format!("/usage/{field}")).and_then(Value::as_i64);
    let top_logprobs = v.pointer("/choices/0/logprobs/content/0/top_logprobs").and_then(Value::as_array).map(|top| {
        top.iter()
            .filter_map(|t| Some((t.get("token")?.as_str()?.to_string(), t.get("logprob")?.as_f64()?)))
            .collect()
    });
    Ok(Completion { raw, prompt_tokens: usage("prompt_tokens"), completion_tokens: usage("completion_tokens"), top_logprobs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn backend(key_var: &str) -> OpenAi {
        let args = crate::cli::JudgeArgs::parse_from([
            "halo-judge", "--candidate", "c", "--baseline", "b", "--judgments", "j", "--summary", "s", "--report", "r",
            "--model", "judge-1", "--api-key-env", key_var, "--backoff-s", "0.5",
        ]);
        OpenAi::from_args(&args, &Template::builtin("mt-bench").unwrap()).unwrap()
    }

    #[test]
    fn the_key_is_redacted_and_absent_from_the_fingerprint() {
        std::env::set_var("HALO_JUDGE_UNIT_KEY", "sk-test-SECRET123");
        let b = backend("HALO_JUDGE_UNIT_KEY");
        assert_eq!(b.client.redact("Bearer sk-test-SECRET123 was refused"), "Bearer [REDACTED] was refused");
        assert!(!b.fingerprint().contains("SECRET123"));
        assert!(b.fingerprint().contains("judge-1") && b.fingerprint().contains("max_tokens=2048"));
        assert!(b.fingerprint().contains("base_url=https://api.openai.com/v1 ") && b.fingerprint().contains("top_logprobs=5"));
        assert!(!backend("HALO_JUDGE_UNIT_UNSET").client.has_key());
    }

    #[test]
    fn label_probabilities_are_normalised_over_the_labels_present() {
        let top = |pairs: &[(&str, f64)]| pairs.iter().map(|(t, p)| (t.to_string(), p.ln())).collect::<Vec<_>>();
        let alpaca = Template::builtin("alpaca-eval").unwrap().verdict;
        let p = label_probabilities(&alpaca, &top(&[("M", 0.6), ("m", 0.3), ("The", 0.1)])).unwrap();
        assert!((p[0] - 1.0 / 3.0).abs() < 1e-12 && (p[1] - 2.0 / 3.0).abs() < 1e-12, "{p:?}");
        assert_eq!(label_probabilities(&alpaca, &top(&[(" m", 0.5), ("Both", 0.5)])), Some(vec![1.0, 0.0]), "an absent label has 0");
        assert_eq!(label_probabilities(&alpaca, &top(&[("The", 0.9)])), None, "no label at all");
        let halos = Template::builtin("halos").unwrap().verdict;
        assert_eq!(label_probabilities(&halos, &top(&[("Response", 0.9)])), None, "a multi-token label is never a first token");
        let mt = Template::builtin("mt-bench").unwrap().verdict;
        let mut spec = mt.clone();
        (spec.a, spec.b, spec.tie, spec.case_sensitive) = ("A".into(), "B".into(), Some("tie".into()), false);
        let p = label_probabilities(&spec, &top(&[("A", 0.2), ("a", 0.2), ("B", 0.4), ("Tie", 0.2)])).unwrap();
        assert!((p[0] - 0.4).abs() < 1e-12 && (p[2] - 0.2).abs() < 1e-12, "case folded: {p:?}");
    }

    #[test]
    fn completions_are_read() {
        let ok = r#"{"choices":[{"message":{"role":"assistant","content":"[[A]]"}}],"usage":{"prompt_tokens":12,"completion_tokens":3}}"#;
        let c = parse_completion(ok).unwrap();
        assert_eq!((c.raw.as_str(), c.prompt_tokens, c.completion_tokens), ("[[A]]", Some(12), Some(3)));
        let refusal = r#"{"choices":[{"message":{"content":null,"refusal":"I can't judge this."}}]}"#;
        assert_eq!(parse_completion(refusal).unwrap().raw, "I can't judge this.");
        assert!(parse_completion("<html>bad gateway</html>").is_err());
        assert!(c.top_logprobs.is_none());
        let with = r#"{"choices":[{"message":{"content":"m"},"logprobs":{"content":[{"token":"m","logprob":-0.1,
            "top_logprobs":[{"token":"m","logprob":-0.1},{"token":"M","logprob":-2.5}]}]}}]}"#;
        assert_eq!(parse_completion(with).unwrap().top_logprobs, Some(vec![("m".into(), -0.1), ("M".into(), -2.5)]));
    }
}
