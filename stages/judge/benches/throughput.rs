//! Benchmark (not a test): judgments per second of `halo-judge --backend openai` against the
//! fake OpenAI-compatible server of the tests, with 16 requests in flight and 20 ms of simulated
//! latency per answer. The ideal is 16 / 0.020 s = 800 judgments/s; the target is 80% of it.
//! Run it with `bash ci/bench-judge.sh` (`PAIRS=N` sets the size; each pair is judged twice).

#[path = "../tests/common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use common::fixtures::{assert_ok, write_samples, Run};
use common::server::{Config, FakeServer};

const CONCURRENCY: usize = 16;
const LATENCY_MS: u64 = 20;

fn main() {
    let pairs: usize = std::env::var("PAIRS").ok().and_then(|v| v.parse().ok()).unwrap_or(1600);
    let server = FakeServer::start(Config { latency: Duration::from_millis(LATENCY_MS), ..Config::default() });
    let run = Run::new();
    let side = |word: &str| -> Vec<(String, String)> {
        (0..pairs).map(|i| (format!("Question {i}: explain item {i}."), format!("{word} answer number {i}."))).collect()
    };
    write_samples(&run.path("candidate.arrow"), "candidate", &side("GOOD"));
    write_samples(&run.path("baseline.arrow"), "baseline", &side("BAD"));
    let mut args = run.io_args("out");
    let concurrency = CONCURRENCY.to_string();
    let base_url = server.base_url();
    let judge = ["--backend", "openai", "--model", "fake-judge", "--base-url", &base_url, "--template", "mt-bench"];
    args.extend(judge.iter().chain(&["--concurrency", &concurrency]).map(|a| a.to_string()));

    let started = Instant::now();
    let output = run.judge(&args, &[]);
    let seconds = started.elapsed().as_secs_f64();
    assert_ok(&output);
    let requests = server.stats.total();
    assert_eq!(requests, 2 * pairs, "every request answered once, no retries");
    let ideal = CONCURRENCY as f64 * 1000.0 / LATENCY_MS as f64;
    let rate = requests as f64 / seconds;
    let stage_rate = strip_ansi(&String::from_utf8_lossy(&output.stderr))
        .lines()
        .find(|l| l.contains(" judged"))
        .and_then(|l| l.split("per_s=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .map(str::to_string)
        .unwrap_or_else(|| "?".into());
    println!("halo-judge openai backend vs local fake server: {pairs} pairs x 2 orders = {requests} judgments");
    println!("concurrency {CONCURRENCY}, simulated latency {LATENCY_MS} ms, ideal {ideal:.0} judgments/s");
    println!("end to end (process start to exit): {seconds:.2} s, {rate:.0} judgments/s");
    println!("judging phase only (the stage's log): {stage_rate} judgments/s");
    println!("ratio to the ideal {ideal:.0}/s: {:.3} (target >= 0.8)", rate / ideal);
}

/// `text` without ANSI escape sequences (the log may be coloured).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}
