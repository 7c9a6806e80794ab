//! The fake judge: haloflow-openai's fake OpenAI-compatible server (its HTTP, counters and fault
//! markers: `FAULT-429`, `FAULT-500`, `FAULT-HANG`, `FAULT-DOWN`, `FAULT-ECHO`, `ECHO-CUT`)
//! answering chat completions like a judge.
//!
//! It prefers the output containing `GOOD` over the one containing `BAD` (a tie when neither is
//! there), answering in the style of the template it recognizes (MT-Bench `[[A]]`, HALOs
//! `Response 1`, AlpacaEval `m`, else `A`/`B`/`tie`). More markers in the judged texts:
//!
//! | marker | behaviour |
//! |---|---|
//! | `BIASED` | always prefers the first output |
//! | `FAULT-GARBAGE` | a garbage answer |
//! | `FAULT-BOTH` | an answer naming both outputs |
//! | `ECHO-KEY` | a correct answer that also echoes the `Authorization` header |
//!
//! [`Config::invert`] makes it prefer `BAD` instead (a different judge behind another URL).
//! With [`Config::logprobs`] it answers a request asking for `logprobs` with the first answer
//! token's `top_logprobs`: the label given gets probability 0.7, the other position's label 0.2
//! and an unrelated token (`The`) 0.1 (see [`top_logprobs`]). With [`Config::reject_logprobs`]
//! a request naming `logprobs` gets a 400, as from a server that does not support them.

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use haloflow_openai::fake::{self, Answer, Received};
use serde_json::{json, Value};

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Delay before every answer.
    pub latency: Duration,
    /// How long a `FAULT-HANG` request hangs.
    pub hang: Duration,
    /// The API key a request should carry (counted in `stats.authorized`).
    pub expected_key: Option<String>,
    /// Prefer the output containing `BAD` (a different judge).
    pub invert: bool,
    /// Return `top_logprobs` when a request asks for `logprobs`.
    pub logprobs: bool,
    /// Answer 400 to a request that names `logprobs`.
    pub reject_logprobs: bool,
}

impl Default for Config {
    fn default() -> Self {
        let base = fake::Config::default();
        Config { latency: base.latency, hang: base.hang, expected_key: None, invert: false, logprobs: false, reject_logprobs: false }
    }
}

/// Counters of `logprobs` requests.
#[derive(Debug, Default)]
pub struct Logprobs {
    /// Requests that asked for `logprobs`.
    pub asked: AtomicUsize,
    /// 400 answers sent to requests naming `logprobs` ([`Config::reject_logprobs`]).
    pub rejected: AtomicUsize,
}

/// A running fake judge (derefs to the shared server: `addr`, `stats`, `base_url()`).
pub struct FakeServer {
    server: fake::FakeServer,
    /// Its `logprobs` counters.
    pub logprobs: Arc<Logprobs>,
}

impl Deref for FakeServer {
    type Target = fake::FakeServer;
    fn deref(&self) -> &fake::FakeServer {
        &self.server
    }
}

impl FakeServer {
    /// Starts a fake judge on a free port of 127.0.0.1.
    pub fn start(config: Config) -> FakeServer {
        let logprobs = Arc::new(Logprobs::default());
        let base = fake::Config { latency: config.latency, hang: config.hang, expected_key: config.expected_key.clone() };
        let counters = logprobs.clone();
        let server = fake::FakeServer::start(base, move |request| answer(request, &config, &counters));
        FakeServer { server, logprobs }
    }
}

/// The judge's answer to a request no fault marker caught.
fn answer(request: &Received, config: &Config, logprobs: &Logprobs) -> Answer {
    let parsed = &request.body;
    if !request.path.ends_with("/chat/completions") {
        return Answer::Error(400, "bad request".into());
    }
    if parsed.get("logprobs").is_some() {
        logprobs.asked.fetch_add(1, Ordering::SeqCst);
        if config.reject_logprobs {
            logprobs.rejected.fetch_add(1, Ordering::SeqCst);
            return Answer::Error(400, "logprobs is not supported by this model".into());
        }
    }
    let text = &request.text;
    let (mut content, labels) = judge(text, config.invert);
    if text.contains("ECHO-KEY") {
        content = format!("{content} (you sent {})", request.authorization.as_deref().unwrap_or_default());
    }
    let mut choice = json!({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"});
    if config.logprobs && parsed["logprobs"] == json!(true) {
        let top = top_logprobs(labels);
        choice["logprobs"] = json!({"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]});
    }
    Answer::Ok(json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": parsed["model"],
        "choices": [choice],
        "usage": {"prompt_tokens": text.len() / 4, "completion_tokens": 5, "total_tokens": text.len() / 4 + 5},
    }))
}
/// The first token's `top_logprobs` for an answer: with `labels` = `[given, other]` (the label
/// answered and the other position's label), `given` 0.7, `other` 0.2 and `The` 0.1; without
/// labels (a tie or garbage), `The` alone with probability 1 (no label among them).
pub fn top_logprobs(labels: Option<[String; 2]>) -> Vec<Value> {
    let entry = |token: &str, p: f64| json!({"token": token, "logprob": p.ln(), "bytes": token.as_bytes()});
    match labels {
        Some([given, other]) => vec![entry(&given, 0.7), entry(&other, 0.2), entry("The", 0.1)],
        None => vec![entry("The", 1.0)],
    }
}

/// The fake judge's answer to a rendered prompt, and for an answer naming one position's label,
/// that label and the other position's.
fn judge(text: &str, invert: bool) -> (String, Option<[String; 2]>) {
    if text.contains("FAULT-GARBAGE") {
        return ("¯\\_(ツ)_/¯ lorem ipsum".to_string(), None);
    }
    let (good, bad) = if invert { ("BAD", "GOOD") } else { ("GOOD", "BAD") };
    let winner = if text.contains("BIASED") {
        Some(0)
    } else {
        match (text.find(good), text.find(bad)) {
            (Some(g), Some(b)) => Some(if g < b { 0 } else { 1 }),
            (Some(_), None) => Some(0),
            (None, Some(_)) => Some(1),
            (None, None) => None,
        }
    };
    let labels: [&str; 3] = if text.contains("[[A]]") {
        ["Assistant A is more helpful. [[A]]", "Assistant B is more helpful. [[B]]", "Both are equally good. [[C]]"]
    } else if text.contains("END OF RESPONSE 1") {
        ["Response 1", "Response 2", "Neither"]
    } else if text.contains("model_identifier") {
        ["m", "M", "m or M"]
    } else {
        ["A", "B", "tie"]
    };
    if text.contains("FAULT-BOTH") {
        return (format!("{} or {}", labels[0], labels[1]), None);
    }
    match winner {
        Some(w) => (labels[w].to_string(), Some([labels[w].to_string(), labels[1 - w].to_string()])),
        None => (labels[2].to_string(), None),
    }
}
