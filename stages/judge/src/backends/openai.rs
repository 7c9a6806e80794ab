//! The `openai` backend: any OpenAI-compatible `POST {base_url}/chat/completions` endpoint
//! (OpenAI, vLLM, llama.cpp's server, ...), with retries.
//!
//! Retried: 408, 429, 5xx, timeouts, connection errors and unreadable 200 bodies, up to
//! `max_retries` times. The delay before retry k (0-based) is the server's `Retry-After` (in
//! seconds) when it sends one, else `backoff_s * 2^k` (at most 60 s) scaled by a random factor
//! in [0.5, 1) ("equal jitter"). Other statuses (401, 404, ...) fail at once.
//!
//! The API key travels only in the `Authorization` header. Every text that leaves this module
//! (answers, error reasons) passes through [`OpenAi::redact`], so a server that echoes the key
//! cannot get it written into judgments, caches or logs.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::{Backend, JudgeAnswer, JudgeRequest};
use crate::cli::JudgeArgs;
use crate::templates::Template;

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
    url: String,
    model: String,
    temperature: f64,
    max_tokens: u32,
    seed: u64,
    api_key: Option<String>,
    concurrency: usize,
    max_retries: u32,
    backoff_s: f64,
}

/// Why one attempt failed.
struct Failure {
    reason: String,
    retryable: bool,
    retry_after_s: Option<f64>,
}

impl Failure {
    fn retry(reason: String) -> Self {
        Failure { reason, retryable: true, retry_after_s: None }
    }
}

/// A successful attempt's content.
struct Completion {
    raw: String,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
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
        Ok(OpenAi {
            agent: config.into(),
            url: format!("{}/chat/completions", args.base_url.trim_end_matches('/')),
            model,
            temperature: args.temperature,
            max_tokens: args.max_tokens.or(template.max_tokens).unwrap_or(DEFAULT_MAX_TOKENS),
            seed: args.seed,
            api_key,
            concurrency,
            max_retries: args.max_retries,
            backoff_s: args.backoff_s,
        })
    }

    /// `text` with every occurrence of the API key replaced by `[REDACTED]`.
    pub fn redact(&self, text: &str) -> String {
        match &self.api_key {
            Some(key) => text.replace(key.as_str(), "[REDACTED]"),
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
                reason: format!("HTTP {status}: {}", error_text(&text)),
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
            "openai model={} temperature={} max_tokens={} seed={}",
            self.model, self.temperature, self.max_tokens, self.seed
        )
    }

    fn model(&self) -> Option<String> {
        Some(self.model.clone())
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }

    fn judge(&self, request: &JudgeRequest) -> Result<JudgeAnswer> {
        let body = serde_json::to_vec(&json!({
            "model": self.model,
            "messages": request.messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }))?;
        let mut k = 0;
        loop {
            let started = Instant::now();
            match self.attempt(&body) {
                Ok(completion) => {
                    let raw = self.redact(&completion.raw);
                    return Ok(JudgeAnswer {
                        verdict: request.template.verdict.parse(&raw),
                        raw,
                        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
                        prompt_tokens: completion.prompt_tokens,
                        completion_tokens: completion.completion_tokens,
                        preference_first: None,
                    });
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
    Failure { reason, retryable, retry_after_s: None }
}

/// The `error.message` of an error body, or the body itself, shortened.
fn error_text(body: &str) -> String {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string());
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
    Ok(Completion { raw, prompt_tokens: usage("prompt_tokens"), completion_tokens: usage("completion_tokens") })
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
        assert!(backend("HALO_JUDGE_UNIT_UNSET").api_key.is_none());
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
        assert_eq!(error_text(r#"{"error":{"message":"Rate limit reached"}}"#), "Rate limit reached");
        assert_eq!(error_text(&"x".repeat(500)).chars().count(), ERROR_TEXT_CHARS + 1);
    }
}
