//! POSTing JSON to an OpenAI-compatible API, with retries.
//!
//! Retried: 408, 429, 5xx, timeouts, connection errors and 200 answers the caller cannot read,
//! up to `max_retries` times. The delay before retry k (0-based) is the server's `Retry-After`
//! (in seconds, at most [`MAX_RETRY_AFTER_S`]) when it sends one, else `backoff_s * 2^k` (at
//! most [`MAX_BACKOFF_S`]) scaled by a random factor in [0.5, 1) ("equal jitter"). Other
//! statuses (400, 401, 404, ...) fail at once.
//!
//! The API key is read from the environment variable the command line names and travels only in
//! the `Authorization` header; creating a client caps the `log` records (ureq's) at DEBUG, since
//! ureq's TRACE level dumps whole requests, headers included. Every text the client returns (answers it reads, error reasons)
//! passes through [`Client::redact`] before anything cuts it, so a server that echoes the key,
//! whole or in part, cannot get it written into outputs, caches or logs.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;

use crate::redact::{error_text, redact};

/// Longest delay between retries computed from `backoff_s`, in seconds.
pub const MAX_BACKOFF_S: f64 = 60.0;
/// Longest `Retry-After` honoured, in seconds.
pub const MAX_RETRY_AFTER_S: f64 = 600.0;

/// The flags of a stage that talks to an OpenAI-compatible API.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// OpenAI-compatible API: its base URL (e.g. http://127.0.0.1:8000/v1 for `vllm serve`,
    /// http://127.0.0.1:8080/v1 for llama.cpp's `llama-server`).
    #[arg(long, default_value = "https://api.openai.com/v1")]
    pub base_url: String,
    /// OpenAI-compatible API: the environment variable holding the API key, sent as
    /// `Authorization: Bearer` and never written anywhere. Unset or empty: no Authorization
    /// header (local servers need none).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    /// OpenAI-compatible API: most requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// OpenAI-compatible API: timeout of one request attempt, in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout_s: f64,
    /// OpenAI-compatible API: retries of a request after a 408, 429 or 5xx, a timeout, a
    /// connection error or an unreadable answer.
    #[arg(long, default_value_t = 5)]
    pub max_retries: u32,
    /// OpenAI-compatible API: first retry delay in seconds; doubles with each retry (with
    /// jitter), unless the server sends Retry-After.
    #[arg(long, default_value_t = 1.0)]
    pub backoff_s: f64,
}

/// A client of one OpenAI-compatible API.
pub struct Client {
    agent: ureq::Agent,
    base_url: String,
    api_key: Option<String>,
    concurrency: usize,
    max_retries: u32,
    backoff_s: f64,
}

/// A successful request.
#[derive(Debug)]
pub struct Reply<T> {
    /// What the caller's `read` made of the answer.
    pub value: T,
    /// Retries before it succeeded.
    pub retries: u32,
    /// Time of the successful attempt.
    pub latency: Duration,
}

/// A request that got no answer (after any retries).
#[derive(Debug, Clone)]
pub struct Failed {
    /// Why, free of the key: e.g. `HTTP 500: <the server's message> (after 5 retries)`.
    pub reason: String,
    /// The last attempt's HTTP status, if it got one.
    pub status: Option<u16>,
    /// Retries made.
    pub retries: u32,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Failed {}

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

impl Client {
    /// The client the flags describe; reads the API key from the environment. `agent_name`
    /// goes into the User-Agent (e.g. `haloflow-judge/0.1.0`).
    pub fn new(args: &ClientArgs, agent_name: &str) -> Result<Client> {
        // ureq logs whole requests, headers (the key) included, at TRACE: never let them reach
        // the log, whatever RUST_LOG says.
        log::set_max_level(log::max_level().min(log::LevelFilter::Debug));
        let api_key = std::env::var(&args.api_key_env).ok().filter(|k| !k.is_empty());
        if api_key.is_none() {
            tracing::info!("${} is not set: sending requests without an Authorization header", args.api_key_env);
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
            .user_agent(agent_name)
            .build();
        Ok(Client {
            agent: config.into(),
            base_url: args.base_url.trim_end_matches('/').to_string(),
            api_key,
            concurrency,
            max_retries: args.max_retries,
            backoff_s: args.backoff_s,
        })
    }

    /// The base URL, without a trailing slash (never holds the key: keys travel in a header).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// How many requests may be in flight at once (at least 1).
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Whether a key was found (requests carry an Authorization header).
    pub fn has_key(&self) -> bool {
        self.api_key.is_some()
    }

    /// `text` with every piece of the API key replaced by `[REDACTED]` (see [`redact`]).
    pub fn redact(&self, text: &str) -> String {
        match &self.api_key {
            Some(key) => redact(text, key),
            None => text.to_string(),
        }
    }

    /// POSTs `body` to `BASE_URL/path` (e.g. `chat/completions`) until an attempt answers 200
    /// with a body that `read` accepts, retrying as the module says. `read` gets the body's text
    /// and this client's [`Client::redact`]; its error makes the answer "unreadable" (retried).
    pub fn post<T>(
        &self,
        path: &str,
        body: &Value,
        read: impl Fn(&str, &dyn Fn(&str) -> String) -> Result<T>,
    ) -> std::result::Result<Reply<T>, Failed> {
        let url = format!("{}/{}", self.base_url, path.trim_start_matches('/'));
        let bytes = serde_json::to_vec(body).map_err(|e| Failed { reason: format!("encoding the request: {e}"), status: None, retries: 0 })?;
        let redact = |text: &str| self.redact(text);
        let mut k = 0;
        loop {
            let started = Instant::now();
            let failure = match self.attempt(&url, &bytes) {
                Ok(text) => match read(&text, &redact) {
                    Ok(value) => return Ok(Reply { value, retries: k, latency: started.elapsed() }),
                    Err(e) => Failure::retry(format!("HTTP 200 with an unreadable body: {}", self.redact(&format!("{e:#}")))),
                },
                Err(failure) => failure,
            };
            if failure.retryable && k < self.max_retries {
                let delay = self.delay(k, failure.retry_after_s);
                tracing::debug!(attempt = k + 1, delay_s = delay.as_secs_f64(), reason = %failure.reason, "retrying");
                std::thread::sleep(delay);
                k += 1;
                continue;
            }
            let tries = if failure.retryable { format!(" (after {k} retries)") } else { String::new() };
            return Err(Failed { reason: format!("{}{tries}", failure.reason), status: failure.status, retries: k });
        }
    }

    /// One HTTP attempt: the body of a 200 answer.
    fn attempt(&self, url: &str, body: &[u8]) -> std::result::Result<String, Failure> {
        let mut request = self.agent.post(url).header("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let mut response = request.send(body).map_err(|e| self.transport_failure(e))?;
        let status = response.status().as_u16();
        let retry_after_s = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| s.min(MAX_RETRY_AFTER_S));
        let text = response.body_mut().read_to_string().map_err(|e| {
            Failure::retry(format!("HTTP {status}: reading the body: {}", self.transport_failure(e).reason))
        })?;
        if status != 200 {
            return Err(Failure {
                reason: format!("HTTP {status}: {}", error_text(&text, |message| self.redact(message))),
                status: Some(status),
                retryable: status == 408 || status == 429 || (500..600).contains(&status),
                retry_after_s,
            });
        }
        Ok(text)
    }

    /// The delay before retry `k` (0-based).
    fn delay(&self, k: u32, retry_after_s: Option<f64>) -> Duration {
        let seconds = retry_after_s.unwrap_or_else(|| {
            let backoff = (self.backoff_s * 2f64.powi(k.min(30) as i32)).min(MAX_BACKOFF_S);
            backoff * (0.5 + 0.5 * unit_random())
        });
        Duration::from_secs_f64(seconds)
    }

    /// A failure of the transport (no HTTP status): timeouts and connection errors are
    /// retried, configuration errors (bad URL, unknown host) are not.
    fn transport_failure(&self, error: ureq::Error) -> Failure {
        let retryable = matches!(
            error,
            ureq::Error::Timeout(_) | ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::Protocol(_)
        );
        let reason = match &error {
            ureq::Error::Timeout(_) => "timed out".to_string(),
            other => format!("{} ({other})", self.base_url),
        };
        Failure { reason: self.redact(&reason), status: None, retryable, retry_after_s: None }
    }
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

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        client: ClientArgs,
    }

    fn client(key_var: &str) -> Client {
        let cli = Cli::parse_from(["t", "--api-key-env", key_var, "--backoff-s", "0.5", "--base-url", "http://127.0.0.1:9/v1/"]);
        Client::new(&cli.client, "haloflow-test").unwrap()
    }

    #[test]
    fn the_key_comes_from_the_named_variable_and_is_redacted() {
        std::env::set_var("HALO_OPENAI_UNIT_KEY", "sk-test-SECRET123");
        let c = client("HALO_OPENAI_UNIT_KEY");
        assert!(c.has_key());
        assert_eq!(c.redact("Bearer sk-test-SECRET123 was refused"), "Bearer [REDACTED] was refused");
        assert_eq!(c.base_url(), "http://127.0.0.1:9/v1", "the trailing slash is dropped");
        assert!(!client("HALO_OPENAI_UNIT_UNSET").has_key());
    }

    #[test]
    fn delays_double_with_jitter_or_follow_retry_after() {
        let c = client("HALO_OPENAI_UNIT_UNSET");
        for k in 0..4 {
            let d = c.delay(k, None).as_secs_f64();
            let full = 0.5 * 2f64.powi(k as i32);
            assert!(d >= full * 0.5 && d < full, "retry {k}: {d}");
        }
        assert!(c.delay(40, None).as_secs_f64() <= MAX_BACKOFF_S);
        assert_eq!(c.delay(0, Some(1.0)), Duration::from_secs(1));
    }

    #[test]
    fn an_unreachable_server_fails_after_the_retries_naming_the_url() {
        // Port 9 (discard) on 127.0.0.1: nothing listens in the test environment.
        let cli = Cli::parse_from(["t", "--api-key-env", "HALO_OPENAI_UNIT_UNSET", "--base-url", "http://127.0.0.1:9/v1", "--max-retries", "1", "--backoff-s", "0"]);
        let c = Client::new(&cli.client, "haloflow-test").unwrap();
        let failed = c.post("completions", &serde_json::json!({}), |t, _| Ok(t.to_string())).unwrap_err();
        assert_eq!((failed.status, failed.retries), (None, 1));
        assert!(failed.reason.contains("http://127.0.0.1:9/v1") && failed.reason.ends_with("(after 1 retries)"), "{}", failed.reason);
    }
}
