//! The `openai` backend: any OpenAI-compatible `POST {base_url}/chat/completions` endpoint
//! (OpenAI, vLLM, llama.cpp's server, ...), with retries.
//!
//! Retried: 408, 429, 5xx, timeouts, connection errors and unreadable 200 bodies, up to
//! `max_retries` times. The delay before retry k (0-based) is the server's `Retry-After` (in
//! seconds) when it sends one, else `backoff_s * 2^k` (at most 60 s) scaled by a random factor
//! in [0.5, 1) ("equal jitter"). Other statuses (401, 404, ...) fail at once.
//!
//! With `top_logprobs` > 0 a request also asks for `logprobs: true, top_logprobs: K`. When the
//! answer's first token comes with `top_logprobs` holding one or more of the template's verdict
//! labels, the labels' probabilities are read from them (see [`label_probabilities`]) and the
//! answer carries [`JudgeAnswer::preference_first`], as alpaca_eval's weighted annotators do. A
//! server that answers such a request with HTTP 400 is asked again without the parameters, and
//! no later request names them.
//!
//! The API key travels only in the `Authorization` header. Every text that leaves this module
//! (answers, error reasons) passes through [`OpenAi::redact`] before anything cuts it, so a server
//! that echoes the key, whole or in part, cannot get it written into judgments, caches or logs.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::{preference_first, Backend, JudgeAnswer, JudgeRequest};
use crate::cli::JudgeArgs;
use crate::templates::Template;
use crate::verdict::VerdictSpec;

/// Longest server error text kept in an error reason, in characters.
const ERROR_TEXT_CHARS: usize = 200;
/// Longest delay between retries computed from `backoff_s`, in seconds.
const MAX_BACKOFF_S: f64 = 60.0;
/// Longest `Retry-After` honoured, in seconds.
const MAX_RETRY_AFTER_S: f64 = 600.0;
/// Answer budget when neither --max-tokens nor the template gives one.
const DEFAULT_MAX_TOKENS: u32 = 1024;

/// An OpenAI-compatible chat-completions judge.
pub struct OpenAi {
    agent: ureq::Agent,
    base_url: String,
    url: String,
    model: String,
    temperature: f64,
    max_tokens: u32,
    seed: u64,
    api_key: Option<String>,
    concurrency: usize,
    max_retries: u32,
    backoff_s: f64,
    top_logprobs: u32,
    /// Set once the server refused `logprobs` with HTTP 400: later requests leave it out.
    logprobs_refused: AtomicBool,
}

/// Why one attempt failed.
struct Failure {
    reason: String,
    status: Option<u16>,
    retryable: bool,
    retry_after_s: Option<f64>,
}

impl Failure {
    fn retry(reason: String) -> Self {
        Failure { reason, status: None, retryable: true, retry_after_s: None }
    }
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
        let api_key = std::env::var(&args.api_key_env).ok().filter(|k| !k.is_empty());
        if api_key.is_none() {
            tracing::warn!("${} is not set: sending requests without an Authorization header", args.api_key_env);
        }
        if !(args.timeout_s > 0.0 && args.timeout_s.is_finite()) {
            bail!("--timeout-s must be a positive number of seconds, found {}", args.timeout_s);
        }
        if !(args.backoff_s >= 0.0 && args.backoff_s.is_finite()) {
            bail!("--backoff-s must be a non-negative number of seconds, found {}", args.backoff_s);
        }
        let concurrency = args.concurrency.max(1);
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs_f64(args.timeout_s)))
            .max_idle_connections(concurrency)
            .max_idle_connections_per_host(concurrency)
            .user_agent(concat!("haloflow-judge/", env!("CARGO_PKG_VERSION")))
            .build();
        let base_url = args.base_url.trim_end_matches('/').to_string();
        Ok(OpenAi {
            agent: config.into(),
            url: format!("{base_url}/chat/completions"),
            base_url,
            model,
            temperature: args.temperature,
            max_tokens: args.max_tokens.or(template.max_tokens).unwrap_or(DEFAULT_MAX_TOKENS),
            seed: args.seed,
            api_key,
            concurrency,
            max_retries: args.max_retries,
            backoff_s: args.backoff_s,
            top_logprobs: args.top_logprobs,
            logprobs_refused: AtomicBool::new(false),
        })
    }

    /// The request body; with `logprobs` it asks for the first tokens' `top_logprobs`.
    fn body(&self, request: &JudgeRequest, logprobs: bool) -> Result<Vec<u8>> {
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
        Ok(serde_json::to_vec(&body)?)
    }

    /// Whether requests ask for `logprobs` now.
    fn asks_logprobs(&self) -> bool {
        self.top_logprobs > 0 && !self.logprobs_refused.load(Ordering::Relaxed)
    }

    /// `text` with every piece of the API key replaced by `[REDACTED]` (see [`redact`]).
    pub fn redact(&self, text: &str) -> String {
        match &self.api_key {
            Some(key) => redact(text, key),
            None => text.to_string(),
        }
    }

    /// One HTTP attempt.
    fn attempt(&self, body: &[u8]) -> std::result::Result<Completion, Failure> {
        let mut request = self.agent.post(&self.url).header("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let mut response = request.send(body).map_err(transport_failure)?;
        let status = response.status().as_u16();
        let retry_after_s = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| s.min(MAX_RETRY_AFTER_S));
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| Failure::retry(format!("HTTP {status}: reading the body: {}", transport_failure(e).reason)))?;
        if status != 200 {
            return Err(Failure {
                reason: format!("HTTP {status}: {}", error_text(&text, |message| self.redact(message))),
                status: Some(status),
                retryable: status == 408 || status == 429 || (500..600).contains(&status),
                retry_after_s,
            });
        }
        parse_completion(&text).map_err(|e| Failure::retry(format!("HTTP 200 with an unreadable body: {e}")))
    }

    /// The delay before retry `k` (0-based).
    fn delay(&self, k: u32, retry_after_s: Option<f64>) -> Duration {
        let seconds = retry_after_s.unwrap_or_else(|| {
            let backoff = (self.backoff_s * 2f64.powi(k.min(30) as i32)).min(MAX_BACKOFF_S);
            backoff * (0.5 + 0.5 * unit_random())
        });
        Duration::from_secs_f64(seconds)
    }
}

impl Backend for OpenAi {
    fn fingerprint(&self) -> String {
        format!(
            "openai base_url={} model={} temperature={} max_tokens={} seed={} top_logprobs={}",
            self.base_url, self.model, self.temperature, self.max_tokens, self.seed, self.top_logprobs
        )
    }

    fn model(&self) -> Option<String> {
        Some(self.model.clone())
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }

    fn judge(&self, request: &JudgeRequest) -> Result<JudgeAnswer> {
        let mut logprobs = self.asks_logprobs();
        let mut body = self.body(request, logprobs)?;
        let mut k = 0;
        loop {
            let started = Instant::now();
            match self.attempt(&body) {
                Ok(completion) => {
                    let raw = self.redact(&completion.raw);
                    let spec = &request.template.verdict;
                    let probs = completion.top_logprobs.as_deref().and_then(|top| label_probabilities(spec, top));
                    return Ok(JudgeAnswer {
                        verdict: spec.parse(&raw),
                        raw,
                        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                        prompt_tokens: completion.prompt_tokens,
                        completion_tokens: completion.completion_tokens,
                        preference_first: probs.map(|p| preference_first(&spec.labels(), &p)),
                    });
                }
                Err(failure) if logprobs && failure.status == Some(400) => {
                    // Asked once more without the parameter; if that works, never again.
                    if !self.logprobs_refused.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            reason = %self.redact(&failure.reason),
                            "the server refused `logprobs`: asking without it (verdict counts only, no weighted win rate)"
                        );
                    }
                    logprobs = false;
                    body = self.body(request, false)?;
                }
                Err(failure) if failure.retryable && k < self.max_retries => {
                    let delay = self.delay(k, failure.retry_after_s);
                    tracing::debug!(attempt = k + 1, delay_s = delay.as_secs_f64(), reason = %self.redact(&failure.reason), "retrying");
                    std::thread::sleep(delay);
                    k += 1;
                }
                Err(failure) => {
                    let tries = if failure.retryable { format!(" (after {} retries)", k) } else { String::new() };
                    return Err(anyhow!("{}{tries}", self.redact(&failure.reason)));
                }
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

/// Shortest piece of a key that [`redact`] recognises on its own.
const MIN_KEY_PIECE_CHARS: usize = 8;

/// `text` with the key, and every piece of it of [`MIN_KEY_PIECE_CHARS`] or more characters
/// (a prefix left by a cut, a suffix, any part), replaced by `[REDACTED]`.
pub fn redact(text: &str, key: &str) -> String {
    let text: Vec<char> = text.chars().collect();
    let key: Vec<char> = key.chars().collect();
    // hidden[i]: character i of the text belongs to a piece of the key.
    let mut hidden = vec![false; text.len()];
    if key.len() >= MIN_KEY_PIECE_CHARS {
        for start in 0..text.len() {
            for from in 0..key.len() {
                let len = text[start..].iter().zip(&key[from..]).take_while(|(a, b)| a == b).count();
                if len >= MIN_KEY_PIECE_CHARS {
                    hidden[start..start + len].iter_mut().for_each(|h| *h = true);
                }
            }
        }
    } else if !key.is_empty() {
        for start in 0..text.len().saturating_sub(key.len() - 1) {
            if text[start..start + key.len()] == key[..] {
                hidden[start..start + key.len()].iter_mut().for_each(|h| *h = true);
            }
        }
    }
    let mut out = String::with_capacity(text.len());
    for (i, c) in text.iter().enumerate() {
        if !hidden[i] {
            out.push(*c);
        } else if i == 0 || !hidden[i - 1] {
            out.push_str("[REDACTED]");
        }
    }
    out
}

/// A failure of the transport (no HTTP status): timeouts and connection errors are retried,
/// configuration errors (bad URL, unknown host) are not.
fn transport_failure(error: ureq::Error) -> Failure {
    let retryable = matches!(
        error,
        ureq::Error::Timeout(_) | ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::Protocol(_)
    );
    let reason = match &error {
        ureq::Error::Timeout(_) => "timed out".to_string(),
        other => other.to_string(),
    };
    Failure { reason, status: None, retryable, retry_after_s: None }
}

/// The `error.message` of an error body, or the body itself, passed through `redact` and then
/// shortened: redacted before the cut, so a key straddling the cut is still recognised.
fn error_text(body: &str, redact: impl Fn(&str) -> String) -> String {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string());
    let message = redact(&message);
    let mut short: String = message.chars().take(ERROR_TEXT_CHARS).collect();
    if short.len() < message.len() {
        short.push('…');
    }
    short
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

/// A random number in [0, 1) for jitter, from the standard library's randomly keyed hasher.
fn unit_random() -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
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
        assert_eq!(b.redact("Bearer sk-test-SECRET123 was refused"), "Bearer [REDACTED] was refused");
        assert!(!b.fingerprint().contains("SECRET123"));
        assert!(b.fingerprint().contains("judge-1") && b.fingerprint().contains("max_tokens=2048"));
        assert!(b.fingerprint().contains("base_url=https://api.openai.com/v1 ") && b.fingerprint().contains("top_logprobs=5"));
        assert!(backend("HALO_JUDGE_UNIT_UNSET").api_key.is_none());
    }

    #[test]
    fn pieces_of_the_key_are_redacted_wherever_they_are() {
        const KEY: &str = "sk-live-0123456789abcdef";
        assert_eq!(redact("key sk-live-0123456789abcdef!", KEY), "key [REDACTED]!");
        assert_eq!(redact("cut at sk-live-0123…", KEY), "cut at [REDACTED]…", "a prefix left by a cut");
        assert_eq!(redact("tail 456789abcdef.", KEY), "tail [REDACTED].", "a suffix");
        assert_eq!(redact("sk-live-012 and sk-live", KEY), "[REDACTED] and sk-live", "8 characters or more");
        assert_eq!(redact("no secret here", KEY), "no secret here");
        assert_eq!(redact("short key abc, abc", "abc"), "short key [REDACTED], [REDACTED]", "a short key is matched whole");
        assert_eq!(redact("é sk-live-01234 ü", KEY), "é [REDACTED] ü", "characters, not bytes");
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
    fn delays_double_with_jitter_or_follow_retry_after() {
        let b = backend("HALO_JUDGE_UNIT_UNSET");
        for k in 0..4 {
            let d = b.delay(k, None).as_secs_f64();
            let full = 0.5 * 2f64.powi(k as i32);
            assert!(d >= full * 0.5 && d < full, "retry {k}: {d}");
        }
        assert!(b.delay(40, None).as_secs_f64() <= MAX_BACKOFF_S);
        assert_eq!(b.delay(0, Some(1.0)), Duration::from_secs(1));
    }

    #[test]
    fn completions_and_error_bodies_are_read() {
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
        let keep = |m: &str| m.to_string();
        assert_eq!(error_text(r#"{"error":{"message":"Rate limit reached"}}"#, keep), "Rate limit reached");
        assert_eq!(error_text(&"x".repeat(500), keep).chars().count(), ERROR_TEXT_CHARS + 1);
        // A key escaped in the JSON body is redacted once decoded, before the cut.
        let key = "sk-live-0123456789abcdef";
        let body = format!(r#"{{"error":{{"message":"{}sk-live-0123456789abcdef"}}}}"#, "y".repeat(190));
        let text = error_text(&body, |m| redact(m, key));
        assert!(text.ends_with("[REDACTED]") && !text.contains("sk-live"), "{text}");
    }
}
