//! halo-sample --backend openai against a fake OpenAI-compatible server on 127.0.0.1: what the
//! requests carry, retries after 429/500, a killed run resumed from the cache, errors that name
//! the prompt row and write nothing, the key kept out of every file, and a pipeline stage.

#[allow(dead_code)]
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;

use common::{server, write_conversations, write_prompts};
use haloflow::records::{Columns, Message};
use haloflow::schema;
use haloflow_openai::fake::{Config, FakeServer};
use serde_json::{json, Value};

const KEY_ENV: &str = "HALO_SAMPLE_TEST_KEY";
const KEY: &str = "sk-fake-0123456789abcdef";

/// Runs halo-sample with the openai backend on `server_url`, writing OUT.arrow and OUT.json in
/// `dir` and caching in `dir/cache`; `key` puts the API key in the environment.
fn sample(dir: &Path, server_url: &str, out: &str, extra: &[&str], key: bool, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_halo-sample"));
    command
        .args(["--prompts", dir.join("prompts.arrow").to_str().unwrap()])
        .args(["--samples", dir.join(format!("{out}.arrow")).to_str().unwrap()])
        .args(["--summary", dir.join(format!("{out}.json")).to_str().unwrap()])
        .args(["--cache-dir", dir.join("cache").to_str().unwrap(), "--base-url", server_url, "--api-key-env", KEY_ENV])
        .args(extra);
    // Defaults for the flags `extra` does not set.
    let defaults = [("--backend", "openai"), ("--api-model", "served-model"), ("--max-new-tokens", "16"), ("--temperature", "0.7"), ("--top-p", "0.9"), ("--n", "2"), ("--seed", "5"), ("--backoff-s", "0")];
    for (flag, value) in defaults.into_iter().filter(|(flag, _)| !extra.contains(flag)) {
        command.args([flag, value]);
    }
    command
        .env_remove(KEY_ENV)
        .env_remove("HALO_STAGE_CACHE_DIR")
        .envs(env.iter().copied());
    if key {
        command.env(KEY_ENV, KEY);
    }
    command.output().unwrap()
}

fn succeeded(output: &Output) {
    assert!(output.status.success(), "halo-sample failed:\n{}", String::from_utf8_lossy(&output.stderr));
}

fn failed(output: &Output) -> String {
    assert!(!output.status.success(), "halo-sample succeeded where it should fail");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn summary(dir: &Path, out: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join(format!("{out}.json"))).unwrap()).unwrap()
}

/// Every file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let (mut found, mut todo) = (Vec::new(), vec![dir.to_path_buf()]);
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

/// Asserts that neither the key nor a 12-character piece of it is in any file under `dir`.
fn key_in_no_file(dir: &Path) {
    for path in files(dir) {
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(&KEY[..12]) && !text.contains(&KEY[12..]), "the key is in {}", path.display());
    }
}

/// The requests the server received (path, body, Authorization header), in arrival order.
fn received(server: &FakeServer) -> Vec<(String, Value, Option<String>)> {
    server.stats.received.lock().unwrap().iter().map(|r| (r.path.clone(), r.body.clone(), r.authorization.clone())).collect()
}

fn strings(batch: &arrow_array::RecordBatch, column: &str) -> Vec<String> {
    Columns::new(batch).str(column).unwrap().iter().map(|v| v.unwrap().to_string()).collect()
}

fn ints(batch: &arrow_array::RecordBatch, column: &str) -> Vec<i64> {
    Columns::new(batch).i64(column).unwrap().values().to_vec()
}

#[test]
fn requests_carry_the_rendered_prompt_and_settings_and_the_samples_follow_the_schema() {
    let server = server::start(Config { expected_key: Some(KEY.into()), ..Config::default() });
    let dir = tempfile::tempdir().unwrap();
    write_conversations(
        &dir.path().join("prompts.arrow"),
        &[
            ("p-hello", vec![Message::new("user", "Hello there")]),
            ("p-brief", vec![Message::new("system", "Be brief."), Message::new("user", "Tell me STOPS")]),
            ("p-long", vec![Message::new("user", "A LONG story ECHO-KEY")]),
        ],
    );
    // RUST_LOG=trace: ureq's TRACE records (whole requests, headers included) must not show.
    let out = sample(dir.path(), &server.base_url(), "completions", &["--stop", "###"], true, &[("RUST_LOG", "trace")]);
    succeeded(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("sampling") && !log.contains(&KEY[..12]) && !log.contains(&KEY[12..]), "the key is not logged");

    // The requests: one per sample, the HH transcript (the model has no template: no --model),
    // its stop string after ours, the sampling settings, the key in the header only.
    let requests = received(&server);
    assert_eq!(requests.len(), 6);
    assert_eq!(server.stats.authorized.load(Ordering::SeqCst), 6, "every request carries `Authorization: Bearer KEY`");
    let mut prompts: Vec<&str> = Vec::new();
    for (path, body, _) in &requests {
        assert_eq!(path, "/v1/completions");
        assert_eq!((body["model"].as_str(), body["max_tokens"].as_u64(), body["n"].as_u64()), (Some("served-model"), Some(16), Some(1)));
        assert_eq!((body["temperature"].as_f64(), body["top_p"].as_f64()), (Some(0.7), Some(0.9)));
        assert_eq!(body["stop"], json!(["###", "\n\nHuman:"]));
        assert!(!body.to_string().contains(&KEY[..12]), "the key is not in a body");
        prompts.push(body["prompt"].as_str().unwrap());
    }
    prompts.sort();
    assert_eq!(
        prompts,
        [
            "\n\nHuman: A LONG story ECHO-KEY\n\nAssistant:",
            "\n\nHuman: A LONG story ECHO-KEY\n\nAssistant:",
            "\n\nHuman: Hello there\n\nAssistant:",
            "\n\nHuman: Hello there\n\nAssistant:",
            "Be brief.\n\nHuman: Tell me STOPS\n\nAssistant:",
            "Be brief.\n\nHuman: Tell me STOPS\n\nAssistant:",
        ]
    );
    let seeds = |prompt: &str| -> BTreeSet<String> {
        requests.iter().filter(|(_, b, _)| b["prompt"].as_str().unwrap().contains(prompt)).map(|(_, b, _)| server::reply(&b["seed"])).collect()
    };
    assert_eq!(seeds("Hello").len(), 2, "the two samples of a prompt have different seeds");

    // The samples: the `samples` schema, input order, the served model's name, the space after
    // `Assistant:` removed, finish reasons and token counts from the answers.
    let path = dir.path().join("completions.arrow");
    assert_eq!(schema::validate_file(&schema::by_name(schema::SAMPLES).unwrap(), &path).unwrap(), Some(6));
    let table = haloflow::io::read_arrow(&path).unwrap();
    let batch = &table.batches[0];
    assert_eq!(strings(batch, "prompt_id"), ["p-hello", "p-hello", "p-brief", "p-brief", "p-long", "p-long"]);
    assert_eq!(ints(batch, "sample_index"), [0, 1, 0, 1, 0, 1]);
    assert!(strings(batch, "model").iter().all(|m| m == "served-model"));
    assert_eq!(strings(batch, "finish_reason"), ["eos", "eos", "stop", "stop", "length", "length"]);
    let completions = strings(batch, "completion");
    assert_eq!(completions[..2].iter().cloned().collect::<BTreeSet<_>>(), seeds("Hello"));
    assert!(completions[4].ends_with("(you sent Bearer [REDACTED])"), "an echoed key is redacted: {}", completions[4]);
    assert_eq!(ints(batch, "completion_tokens")[..4], [4, 4, 4, 4], "usage.completion_tokens");
    assert_eq!(ints(batch, "prompt_tokens")[..4], [4, 4, 7, 7], "usage.prompt_tokens");

    let s = summary(dir.path(), "completions");
    schema::validate_file(&schema::by_name(schema::JSON).unwrap(), &dir.path().join("completions.json")).unwrap();
    assert_eq!((s["backend"].as_str(), s["base_url"].as_str()), (Some("openai"), Some(server.base_url().as_str())));
    assert_eq!((s["api_model"].as_str(), s["api_endpoint"].as_str(), s["prompt_format"].as_str()), (Some("served-model"), Some("completions"), Some("transcript")));
    assert_eq!((s["requests"].as_u64(), s["cache_hits"].as_u64(), s["retries"].as_u64(), s["samples"].as_u64()), (Some(6), Some(0), Some(0), Some(6)));
    assert_eq!(s["tokens_generated"].as_i64(), Some(ints(batch, "completion_tokens").iter().sum()));
    assert_eq!(s["tokens_generated_by_requests"], s["tokens_generated"]);
    assert_eq!(s["prompt_tokens"].as_i64(), Some(ints(batch, "prompt_tokens").iter().sum()));
    assert!(s["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(s["finish_reasons"], json!({"eos": 2, "stop": 2, "length": 2}));

    // The chat endpoint: the messages as they are, our stop strings only, no key: no header.
    let out = sample(dir.path(), &server.base_url(), "chat", &["--api-endpoint", "chat", "--stop", "###"], false, &[]);
    succeeded(&out);
    let chat: Vec<_> = received(&server).into_iter().skip(6).collect();
    assert_eq!(chat.len(), 6, "another endpoint is not answered from the cache");
    for (path, body, authorization) in &chat {
        assert_eq!((path.as_str(), authorization), ("/v1/chat/completions", &None));
        assert_eq!(body["stop"], json!(["###"]));
        assert!(body.get("prompt").is_none());
    }
    assert!(chat.iter().any(|(_, b, _)| b["messages"] == json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me STOPS"}])));
    let chat_batch = &haloflow::io::read_arrow(&dir.path().join("chat.arrow")).unwrap().batches[0];
    assert_eq!(strings(chat_batch, "completion")[4], completions[4].replace(" (you sent Bearer [REDACTED])", " (you sent nothing)"));
    assert!(summary(dir.path(), "chat")["prompt_format"].is_null());

    // --prompt-format plain: the contents joined by blank lines, no transcript stop string.
    succeeded(&sample(dir.path(), &server.base_url(), "plain", &["--prompt-format", "plain"], true, &[]));
    let plain: Vec<_> = received(&server).into_iter().skip(12).collect();
    assert!(plain.iter().any(|(_, b, _)| b["prompt"] == "Be brief.\n\nTell me STOPS" && b.get("stop").is_none()));
    key_in_no_file(dir.path());
}

#[test]
fn a_429_with_retry_after_and_500s_are_retried_and_counted() {
    let server = server::start(Config::default());
    let dir = tempfile::tempdir().unwrap();
    write_prompts(&dir.path().join("prompts.arrow"), &[("p-429", "FAULT-429 please".into()), ("p-500", "FAULT-500 please".into())]);
    succeeded(&sample(dir.path(), &server.base_url(), "out", &["--n", "1"], false, &[]));
    assert_eq!(server.stats.too_many.load(Ordering::SeqCst), 1);
    assert_eq!(server.stats.server_errors.load(Ordering::SeqCst), 2);
    let gaps = server.stats.retry_gaps_ms.lock().unwrap().clone();
    assert!(gaps.len() == 1 && gaps[0] >= 950.0, "Retry-After: 1 is honoured (--backoff-s 0): {gaps:?}");
    let s = summary(dir.path(), "out");
    assert_eq!((s["requests"].as_u64(), s["retries"].as_u64(), s["samples"].as_u64()), (Some(2), Some(3), Some(2)));
    assert_eq!(server.stats.total(), 5);
}

#[test]
fn a_killed_run_resumes_asking_only_what_is_missing() {
    let server = server::start(Config::default());
    let dir = tempfile::tempdir().unwrap();
    let prompts: Vec<(String, String)> = (0..5).map(|i| (format!("p{i}"), format!("Question {i}?"))).collect();
    let prompts: Vec<(&str, String)> = prompts.iter().map(|(id, text)| (id.as_str(), text.clone())).collect();
    write_prompts(&dir.path().join("prompts.arrow"), &prompts);
    let args = ["--n", "1", "--concurrency", "1"];

    // Killed (SIGKILL, as from outside) right after the second answer reached the cache.
    let out = sample(dir.path(), &server.base_url(), "out", &args, true, &[("HALO_FAULT_AFTER_SAMPLES", "2")]);
    failed(&out);
    assert!(!dir.path().join("out.arrow").exists() && !dir.path().join("out.json").exists(), "nothing written");
    let cached = std::fs::read_to_string(dir.path().join("cache/answers.jsonl")).unwrap().lines().count();
    assert_eq!(cached, 2);

    let before = server.stats.total();
    succeeded(&sample(dir.path(), &server.base_url(), "out", &args, true, &[]));
    assert_eq!(server.stats.total() - before, 3, "only the 3 missing samples are asked");
    let s = summary(dir.path(), "out");
    assert_eq!((s["requests"].as_u64(), s["cache_hits"].as_u64(), s["samples"].as_u64()), (Some(3), Some(2), Some(5)));
    let first = haloflow::io::read_arrow(&dir.path().join("out.arrow")).unwrap();

    // A rerun is answered from the cache alone, with the same samples.
    let before = server.stats.total();
    succeeded(&sample(dir.path(), &server.base_url(), "again", &args, true, &[]));
    assert_eq!(server.stats.total(), before, "no request");
    let s = summary(dir.path(), "again");
    assert_eq!((s["requests"].as_u64(), s["cache_hits"].as_u64()), (Some(0), Some(5)));
    assert!(s["tokens_per_s"].is_null(), "no tokens generated in this run");
    assert_eq!(haloflow::io::read_arrow(&dir.path().join("again.arrow")).unwrap().batches, first.batches);

    // Everything that changes a request changes its key: another temperature, seed or model.
    for (extra, name) in [(["--temperature", "0.5"], "temperature"), (["--seed", "6"], "seed"), (["--api-model", "other"], "model")] {
        let before = server.stats.total();
        succeeded(&sample(dir.path(), &server.base_url(), name, &[&args[..], &extra[..]].concat(), true, &[]));
        assert_eq!(server.stats.total() - before, 5, "another {name}: every sample is asked");
    }
    key_in_no_file(dir.path());
}

#[test]
fn errors_name_the_prompt_row_keep_the_key_out_and_write_nothing() {
    let server = server::start(Config::default());
    let dir = tempfile::tempdir().unwrap();
    let no_outputs = |out: &str| {
        assert!(!dir.path().join(format!("{out}.arrow")).exists() && !dir.path().join(format!("{out}.json")).exists(), "{out}: nothing written");
    };
    let args = ["--n", "1", "--max-retries", "1", "--concurrency", "1"];
    for (marker, expected) in [
        ("FAULT-DOWN", "HTTP 500: The server had an error while processing your request. (after 1 retries)"),
        ("NO-TEXT", "HTTP 200 with an unreadable body: choices[0] has no text (`text`) (after 1 retries)"),
        ("GARBAGE", "HTTP 200 with an unreadable body: not JSON"),
        ("FAULT-ECHO", "HTTP 500: invalid header: Authorization: Bearer [REDACTED] (after 1 retries)"),
    ] {
        write_prompts(&dir.path().join("prompts.arrow"), &[("p-fine", "Hi".into()), ("p-bad", format!("{marker} here"))]);
        let error = failed(&sample(dir.path(), &server.base_url(), marker, &args, true, &[]));
        assert!(error.contains("prompt row 1 (prompt_id `p-bad`), sample 0"), "{marker}: {error}");
        assert!(error.contains(expected), "{marker}: {error}");
        assert!(error.contains("answer(s) received in this run are cached"), "{marker}: {error}");
        assert!(!error.contains(&KEY[..12]), "{marker}: the key is not in the error");
        no_outputs(marker);
    }

    // An unreachable server: the URL, the prompt row and the retries.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let error = failed(&sample(dir.path(), &url, "down", &args, true, &[]));
    assert!(error.contains("prompt row 0 (prompt_id `p-fine`), sample 0") && error.contains(&url) && error.contains("(after 1 retries)"), "{error}");
    no_outputs("down");

    // Several ranks: the server does the parallel work, one process asks it.
    let ranks = [("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1")];
    let error = failed(&sample(dir.path(), &server.base_url(), "ranks", &[], true, &ranks));
    assert!(error.contains("--backend openai runs as one process (this is rank 0 of 2)"), "{error}");
    no_outputs("ranks");

    // Missing settings.
    let error = failed(&sample(dir.path(), &server.base_url(), "nomodel", &["--backend", "local"], true, &[]));
    assert!(error.contains("--backend local needs --model"), "{error}");
    let template = failed(&sample(dir.path(), &server.base_url(), "template", &["--prompt-format", "template"], true, &[]));
    assert!(template.contains("needs --model DIR"), "{template}");
    key_in_no_file(dir.path());
}

/// The `halo` binary beside this crate's (built by `cargo build --release -p haloflow`).
fn halo() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_halo-sample")).with_file_name("halo");
    assert!(path.is_file(), "{} is not built: run `cargo build --release -p haloflow` first", path.display());
    path
}

#[test]
fn a_pipeline_stage_samples_from_the_server_and_no_file_holds_the_key() {
    let server = server::start(Config { expected_key: Some(KEY.into()), ..Config::default() });
    let (pipeline_dir, work_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_prompts(&pipeline_dir.path().join("prompts.arrow"), &[("a", "Hi".into()), ("b", "Yo".into())]);
    let stage = |params: &str| {
        format!(
            "[vars]\nserver = \"{}\"\nkey = \"{KEY}\"\n\n[stages.sample]\nuses = \"sample\"\ninputs = {{ prompts = \"prompts.arrow\" }}\n\
             params = {{ backend = \"openai\", base_url = \"{{vars.server}}\", api_model = \"served-model\", n = 2, max_new_tokens = 8, {params} }}\n",
            server.base_url()
        )
    };
    let halo = |toml: &str| {
        std::fs::write(pipeline_dir.path().join("p.toml"), toml).unwrap();
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_halo-sample")).parent().unwrap();
        Command::new(halo())
            .args(["run", "p.toml", "--work-dir"])
            .arg(work_dir.path())
            .current_dir(pipeline_dir.path())
            .env("HALO_BIN_DIR", bin_dir)
            .env(KEY_ENV, KEY)
            .output()
            .unwrap()
    };
    // The key reaches the stage only through the environment variable the params name.
    let out = halo(&stage(&format!("api_key_env = \"{KEY_ENV}\"")));
    assert!(out.status.success(), "halo run failed:\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!((server.stats.total(), server.stats.authorized.load(Ordering::SeqCst)), (4, 4));
    let lock = std::fs::read_to_string(work_dir.path().join("p.lock.json")).unwrap();
    assert!(lock.contains(KEY_ENV) && lock.contains("served-model"), "the lock records the variable's name");
    assert_eq!(std::fs::read_to_string(work_dir.path().join("stage-cache/sample/answers.jsonl")).unwrap().lines().count(), 4);
    key_in_no_file(work_dir.path());

    // A key written into the params (from a var) is refused before anything runs or is written.
    std::fs::remove_dir_all(work_dir.path()).unwrap();
    let out = halo(&stage("api_key = \"{vars.key}\""));
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && error.contains("param `api_key` is not a flag of halo-sample"), "{error}");
    assert!(!error.contains(&KEY[..12]), "{error}");
    if work_dir.path().exists() {
        key_in_no_file(work_dir.path());
    }
    assert_eq!(server.stats.total(), 4, "nothing was asked");
}
