//! A small OpenAI-compatible server on 127.0.0.1 for the stages' tests and benchmarks
//! (feature `fake-server`): minimal HTTP/1.1 with keep-alive, one thread per connection.
//!
//! It accepts `POST …/completions` and `POST …/chat/completions`, records every request
//! ([`Stats::received`]) and answers with what the stage's [`Responder`] makes of it, except
//! where a marker in the request's text (the `prompt`, or the messages' contents joined by
//! newlines) injects a fault. Attempts are counted per distinct request body:
//!
//! | marker | behaviour |
//! |---|---|
//! | `FAULT-429` | first attempt: 429 with `Retry-After: 1` |
//! | `FAULT-500` | first two attempts: 500 |
//! | `FAULT-HANG` | first attempt: no answer for [`Config::hang`], then the connection closes |
//! | `FAULT-DOWN` | always 500 |
//! | `FAULT-ECHO` | always 500, echoing the request's `Authorization` header |
//! | `ECHO-CUT` | always 500, echoing the `Authorization` header so that the key straddles character 200 of the error message |

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
    /// Delay before every answer the responder gives.
    pub latency: Duration,
    /// How long a `FAULT-HANG` request hangs.
    pub hang: Duration,
    /// The API key a request should carry (counted in [`Stats::authorized`]).
    pub expected_key: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config { latency: Duration::ZERO, hang: Duration::from_secs(3), expected_key: None }
    }
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The request path (e.g. `/v1/completions`).
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The JSON body.
    pub body: Value,
    /// The text markers are looked for in: the `prompt`, or the messages' contents joined by
    /// newlines.
    pub text: String,
}

/// What a [`Responder`] answers.
pub enum Answer {
    /// 200 with this JSON body.
    Ok(Value),
    /// This status with `{"error": {"message": ...}}`.
    Error(u16, String),
    /// 200 with this body as it is (for answers that are not JSON).
    Raw(String),
}

/// Makes the answer to a request that no fault marker caught.
pub type Responder = dyn Fn(&Received) -> Answer + Send + Sync;

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
    /// Requests left hanging.
    pub hangs: AtomicUsize,
    /// Requests carrying `Authorization: Bearer <expected_key>`.
    pub authorized: AtomicUsize,
    /// Milliseconds between a 429 and the next attempt of the same request.
    pub retry_gaps_ms: Mutex<Vec<f64>>,
    /// Every request, in arrival order.
    pub received: Mutex<Vec<Received>>,
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
    /// Starts a server on a free port of 127.0.0.1 answering with `responder`.
    pub fn start(config: Config, responder: impl Fn(&Received) -> Answer + Send + Sync + 'static) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let responder: Arc<Responder> = Arc::new(responder);
        let (s, st, config) = (stats.clone(), stop.clone(), Arc::new(config));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (s, config, responder) = (s.clone(), config.clone(), responder.clone());
                std::thread::spawn(move || serve(stream, &s, &config, responder.as_ref()));
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

/// One parsed HTTP request.
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

fn respond(stream: &mut TcpStream, status: u16, extra_headers: &str, body: &str) -> bool {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        _ => "Error",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).and_then(|_| stream.flush()).is_ok()
}

fn serve(stream: TcpStream, stats: &Stats, config: &Config, responder: &Responder) {
    let _ = stream.set_nodelay(true);
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader) {
        if !answer(&mut writer, &request, stats, config, responder) || request.close {
            return;
        }
    }
}

/// The text fault markers are looked for in.
fn marker_text(body: &Value) -> String {
    match (body["prompt"].as_str(), body["messages"].as_array()) {
        (Some(prompt), _) => prompt.to_string(),
        (None, Some(ms)) => ms.iter().filter_map(|m| m["content"].as_str()).collect::<Vec<_>>().join("\n"),
        (None, None) => String::new(),
    }
}

/// Handles one request; false when the connection must close.
fn answer(stream: &mut TcpStream, request: &Request, stats: &Stats, config: &Config, responder: &Responder) -> bool {
    stats.requests.fetch_add(1, Ordering::SeqCst);
    let auth = request.authorization.clone().unwrap_or_default();
    if config.expected_key.as_ref().is_some_and(|k| auth == format!("Bearer {k}")) {
        stats.authorized.fetch_add(1, Ordering::SeqCst);
    }
    let error = |stream: &mut TcpStream, status: u16, headers: &str, message: &str| {
        respond(stream, status, headers, &json!({"error": {"message": message}}).to_string())
    };
    let body: Value = match serde_json::from_slice(&request.body) {
        Ok(v) if request.path.ends_with("/completions") => v,
        _ => return error(stream, 400, "", "bad request"),
    };
    let received = Received { path: request.path.clone(), authorization: request.authorization.clone(), text: marker_text(&body), body };
    stats.received.lock().unwrap().push(received.clone());
    let text = &received.text;
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
    let server_error = |stream: &mut TcpStream, message: &str| {
        stats.server_errors.fetch_add(1, Ordering::SeqCst);
        error(stream, 500, "", message)
    };
    if text.contains("FAULT-429") && attempt == 1 {
        stats.too_many.fetch_add(1, Ordering::SeqCst);
        stats.attempts.lock().unwrap().get_mut(&key).unwrap().1 = Some(Instant::now());
        return error(stream, 429, "Retry-After: 1\r\n", "Rate limit reached");
    }
    if text.contains("FAULT-DOWN") || (text.contains("FAULT-500") && attempt <= 2) {
        return server_error(stream, "The server had an error while processing your request.");
    }
    if text.contains("FAULT-ECHO") {
        return server_error(stream, &format!("invalid header: Authorization: {auth}"));
    }
    if text.contains("ECHO-CUT") {
        // The key starts 12 characters before the 200th character of the message.
        let message = format!("{}invalid header: Authorization: {auth}", "x".repeat(200 - 12 - "invalid header: Authorization: Bearer ".len()));
        return server_error(stream, &message);
    }
    if text.contains("FAULT-HANG") && attempt == 1 {
        stats.hangs.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(config.hang);
        return false;
    }
    std::thread::sleep(config.latency);
    match responder(&received) {
        Answer::Ok(body) => {
            stats.ok.fetch_add(1, Ordering::SeqCst);
            respond(stream, 200, "", &body.to_string())
        }
        Answer::Raw(body) => {
            stats.ok.fetch_add(1, Ordering::SeqCst);
            respond(stream, 200, "", &body)
        }
        Answer::Error(status, message) => {
            if status >= 500 {
                stats.server_errors.fetch_add(1, Ordering::SeqCst);
            }
            error(stream, status, "", &message)
        }
    }
}
