//! A small OpenAI-compatible chat-completions server on 127.0.0.1, for the tests and the
//! benchmark: minimal HTTP/1.1 with keep-alive, one thread per connection.
//!
//! It judges like a judge that prefers the output containing `GOOD` over the one containing
//! `BAD` (a tie when neither is there), answering in the style of the template it recognizes
//! (MT-Bench `[[A]]`, HALOs `Response 1`, AlpacaEval `m`, else `A`/`B`/`tie`). Markers in the
//! judged texts inject faults; attempts are counted per distinct request body:
//!
//! | marker | behaviour |
//! |---|---|
//! | `BIASED` | always prefers the first output |
//! | `FAULT-429` | first attempt: 429 with `Retry-After: 1` |
//! | `FAULT-500` | first two attempts: 500 |
//! | `FAULT-HANG` | first attempt: no answer for `Config::hang`, then the connection closes |
//! | `FAULT-GARBAGE` | a garbage answer |
//! | `FAULT-BOTH` | an answer naming both outputs |
//! | `FAULT-DOWN` | always 500 |
//! | `FAULT-ECHO` | always 500, echoing the request's `Authorization` header |
//! | `ECHO-KEY` | a correct answer that also echoes the `Authorization` header |
//! | `ECHO-CUT` | always 500, echoing the `Authorization` header so that the key straddles character 200 of the error message |
//!
//! [`Config::invert`] makes it prefer `BAD` instead (a different judge behind another URL).
//! With [`Config::logprobs`] it answers a request asking for `logprobs` with the first answer
//! token's `top_logprobs`: the label given gets probability 0.7, the other position's label 0.2
//! and an unrelated token (`The`) 0.1 (see [`top_logprobs`]). With [`Config::reject_logprobs`]
//! a request naming `logprobs` gets a 400, as from a server that does not support them.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Delay before every answer.
    pub latency: Duration,
    /// How long a `FAULT-HANG` request hangs.
    pub hang: Duration,
    /// The API key a request should carry (counted in [`Stats::authorized`]).
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
        Config {
            latency: Duration::ZERO,
            hang: Duration::from_secs(3),
            expected_key: None,
            invert: false,
            logprobs: false,
            reject_logprobs: false,
        }
    }
}

/// Server-side counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests received.
    pub requests: AtomicUsize,
    /// 200 answers sent.
    pub ok: AtomicUsize,
    /// 429 answers sent.
    pub too_many: AtomicUsize,
    /// 500 answers sent.
    pub server_errors: AtomicUsize,
    /// 400 answers sent to requests naming `logprobs` ([`Config::reject_logprobs`]).
    pub rejected_logprobs: AtomicUsize,
    /// Requests that asked for `logprobs`.
    pub asked_logprobs: AtomicUsize,
    /// Requests left hanging.
    pub hangs: AtomicUsize,
    /// Requests carrying `Authorization: Bearer <expected_key>`.
    pub authorized: AtomicUsize,
    /// Milliseconds between a 429 and the next attempt of the same request.
    pub retry_gaps_ms: Mutex<Vec<f64>>,
    /// Per request body: attempts so far and when the last 429 was sent.
    attempts: Mutex<HashMap<u64, (u32, Option<Instant>)>>,
}

impl Stats {
    /// Requests received so far.
    pub fn total(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A running server; stops accepting when dropped.
pub struct FakeServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its counters.
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
}

impl FakeServer {
    /// Starts a server on a free port of 127.0.0.1.
    pub fn start(config: Config) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, config) = (stats.clone(), stop.clone(), Arc::new(config));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (s, config) = (s.clone(), config.clone());
                std::thread::spawn(move || serve(stream, &s, &config));
            }
        });
        FakeServer { addr, stats, stop }
    }

    /// The `--base-url` for this server.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// One parsed request.
struct Request {
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
    close: bool,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let path = line.split_whitespace().nth(1)?.to_string();
    let (mut length, mut authorization, mut close) = (0usize, None, false);
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "authorization" => authorization = Some(value.trim().to_string()),
            "connection" => close = value.trim().eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request { path, authorization, body, close })
}

fn respond(stream: &mut TcpStream, status: &str, extra_headers: &str, body: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

fn serve(stream: TcpStream, stats: &Stats, config: &Config) {
    let _ = stream.set_nodelay(true);
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader) {
        if !answer(&mut writer, &request, stats, config) || request.close {
            return;
        }
    }
}

/// Handles one request; false when the connection must close.
fn answer(stream: &mut TcpStream, request: &Request, stats: &Stats, config: &Config) -> bool {
    stats.requests.fetch_add(1, Ordering::SeqCst);
    let auth = request.authorization.clone().unwrap_or_default();
    if config.expected_key.as_ref().is_some_and(|k| auth == format!("Bearer {k}")) {
        stats.authorized.fetch_add(1, Ordering::SeqCst);
    }
    let parsed: Value = match serde_json::from_slice(&request.body) {
        Ok(v) if request.path.ends_with("/chat/completions") => v,
        _ => return respond(stream, "400 Bad Request", "", r#"{"error":{"message":"bad request"}}"#).is_ok(),
    };
    if parsed.get("logprobs").is_some() {
        stats.asked_logprobs.fetch_add(1, Ordering::SeqCst);
        if config.reject_logprobs {
            stats.rejected_logprobs.fetch_add(1, Ordering::SeqCst);
            let message = r#"{"error":{"message":"logprobs is not supported by this model"}}"#;
            return respond(stream, "400 Bad Request", "", message).is_ok();
        }
    }
    let text: String = parsed["messages"]
        .as_array()
        .map(|ms| ms.iter().filter_map(|m| m["content"].as_str()).collect::<Vec<_>>().join("\n"))
        .unwrap_or_default();
    let mut hasher = DefaultHasher::new();
    request.body.hash(&mut hasher);
    let key = hasher.finish();
    let (attempt, last_429) = {
        let mut attempts = stats.attempts.lock().unwrap();
        let entry = attempts.entry(key).or_insert((0, None));
        entry.0 += 1;
        (entry.0, entry.1.take())
    };
    if let Some(at) = last_429 {
        stats.retry_gaps_ms.lock().unwrap().push(at.elapsed().as_secs_f64() * 1000.0);
    }
    let error = |stats: &Stats, stream: &mut TcpStream, message: &str| {
        stats.server_errors.fetch_add(1, Ordering::SeqCst);
        respond(stream, "500 Internal Server Error", "", &json!({"error": {"message": message}}).to_string()).is_ok()
    };
    if text.contains("FAULT-429") && attempt == 1 {
        stats.too_many.fetch_add(1, Ordering::SeqCst);
        stats.attempts.lock().unwrap().get_mut(&key).unwrap().1 = Some(Instant::now());
        return respond(stream, "429 Too Many Requests", "Retry-After: 1\r\n", r#"{"error":{"message":"Rate limit reached"}}"#).is_ok();
    }
    if text.contains("FAULT-DOWN") || (text.contains("FAULT-500") && attempt <= 2) {
        return error(stats, stream, "The server had an error while processing your request.");
    }
    if text.contains("FAULT-ECHO") {
        return error(stats, stream, &format!("invalid header: Authorization: {auth}"));
    }
    if text.contains("ECHO-CUT") {
        // The key starts 12 characters before the 200th character of the message.
        let message = format!("{}invalid header: Authorization: {auth}", "x".repeat(200 - 12 - "invalid header: Authorization: Bearer ".len()));
        return error(stats, stream, &message);
    }
    if text.contains("FAULT-HANG") && attempt == 1 {
        stats.hangs.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(config.hang);
        return false;
    }
    std::thread::sleep(config.latency);
    let (mut content, labels) = judge(&text, config.invert);
    if text.contains("ECHO-KEY") {
        content = format!("{content} (you sent {auth})");
    }
    stats.ok.fetch_add(1, Ordering::SeqCst);
    let mut choice = json!({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"});
    if config.logprobs && parsed["logprobs"] == json!(true) {
        let top = top_logprobs(labels);
        choice["logprobs"] = json!({"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]});
    }
    let body = json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": parsed["model"],
        "choices": [choice],
        "usage": {"prompt_tokens": text.len() / 4, "completion_tokens": 5, "total_tokens": text.len() / 4 + 5},
    });
    respond(stream, "200 OK", "", &body.to_string()).is_ok()
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
