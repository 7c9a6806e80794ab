//! The `openai` backend against the fake OpenAI-compatible server of `common::server`: faults
//! and retries, the response cache, resuming a killed run, failures, templates and the secret.

#[allow(dead_code)]
mod common;

use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::fixtures::{assert_ok, write_samples, Run};
use common::server::{Config, FakeServer};

/// `(question, candidate, baseline)` rows written as the candidate's and baseline's samples.
fn write_inputs(run: &Run, rows: &[(String, String, String)]) {
    let side = |pick: fn(&(String, String, String)) -> &String| -> Vec<(String, String)> {
        rows.iter().map(|r| (r.0.clone(), pick(r).clone())).collect()
    };
    write_samples(&run.path("candidate.arrow"), "kto-model", &side(|r| &r.1));
    write_samples(&run.path("baseline.arrow"), "sft-model", &side(|r| &r.2));
}

fn row(question: &str, candidate: &str, baseline: &str) -> (String, String, String) {
    (question.to_string(), candidate.to_string(), baseline.to_string())
}

/// The arguments of an openai run against `server`.
fn openai_args(run: &Run, server: &FakeServer, out: &str, extra: &[&str]) -> Vec<String> {
    let mut args = run.io_args(out);
    for a in ["--backend", "openai", "--model", "fake-judge", "--base-url", &server.base_url()] {
        args.push(a.to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn count(summary: &serde_json::Value, field: &str) -> u64 {
    summary[field].as_u64().unwrap_or_else(|| panic!("summary.{field} missing: {summary}"))
}

fn total(server: &FakeServer) -> usize {
    server.stats.total()
}

#[test]
fn faults_are_retried_every_judgment_is_recorded_and_a_rerun_asks_nothing() {
    let server = FakeServer::start(Config { hang: Duration::from_secs(2), ..Config::default() });
    let run = Run::new();
    let mut rows: Vec<_> = (0..6)
        .map(|i| {
            let (c, b) = if i % 2 == 0 { ("GOOD", "BAD") } else { ("BAD", "GOOD") };
            row(&format!("Question {i}?"), &format!("{c} answer {i}"), &format!("{b} answer {i}"))
        })
        .collect();
    for fault in ["FAULT-429", "FAULT-500", "FAULT-HANG"] {
        rows.push(row(&format!("Question {fault}?"), "GOOD answer", "BAD answer"));
    }
    rows.push(row("Question BIASED?", "GOOD answer", "BAD answer"));
    rows.push(row("Question with two plain answers?", "an answer", "another answer"));
    rows.push(row("Question FAULT-GARBAGE?", "GOOD answer", "BAD answer"));
    rows.push(row("Question FAULT-BOTH?", "GOOD answer", "BAD answer"));
    write_inputs(&run, &rows);
    let extra = ["--template", "mt-bench", "--concurrency", "4", "--timeout-s", "0.5", "--max-retries", "3", "--backoff-s", "0.05"];

    let output = run.judge(&openai_args(&run, &server, "out1", &extra), &[]);
    assert_ok(&output);
    let s = run.summary("out1");
    let n = rows.len() as u64;
    assert_eq!(count(&s, "n"), n);
    assert_eq!(count(&s, "wins") + count(&s, "losses") + count(&s, "ties") + count(&s, "invalid"), n);
    // 3 plain wins + the 3 faulty ones (answered after retries); the biased judge and the plain
    // answers tie; garbage and an answer naming both outputs are invalid.
    assert_eq!((count(&s, "wins"), count(&s, "losses"), count(&s, "ties"), count(&s, "invalid")), (6, 3, 2, 2), "{s:#}");
    assert_eq!(s["judge"]["model"], "fake-judge");
    assert_eq!(s["candidate"], "kto-model");
    assert_eq!(s["baseline"], "sft-model");
    assert_eq!(s["judgments"]["n"], 2 * n);
    assert_eq!(s["judgments"]["failed"], 0);
    assert_eq!(s["judgments"]["invalid"], 4);

    let judgments = run.judgments("out1");
    assert_eq!(judgments.len(), 2 * rows.len(), "both orders of every pair are recorded");
    assert!(judgments.iter().all(|j| j.error.is_none()));
    let garbage: Vec<_> = judgments.iter().filter(|j| j.raw.contains("lorem ipsum")).collect();
    assert_eq!(garbage.len(), 2);
    assert!(garbage.iter().all(|j| j.verdict == "invalid" && j.pair_verdict == "invalid"));
    let biased: Vec<_> = judgments.iter().filter(|j| j.pair_verdict == "tie" && j.verdict != "tie").collect();
    assert_eq!(biased.len(), 2, "the biased pair's orders disagree: {biased:?}");
    assert_ne!(biased[0].verdict, biased[1].verdict);

    // Server side: every fault happened once per order and was retried.
    let st = &server.stats;
    assert_eq!(st.too_many.load(Ordering::SeqCst), 2);
    assert_eq!(st.server_errors.load(Ordering::SeqCst), 4);
    assert_eq!(st.hangs.load(Ordering::SeqCst), 2);
    assert_eq!(st.ok.load(Ordering::SeqCst), 2 * rows.len());
    assert_eq!(total(&server), 2 * rows.len() + 2 + 4 + 2);
    let gaps = st.retry_gaps_ms.lock().unwrap().clone();
    assert_eq!(gaps.len(), 2);
    assert!(gaps.iter().all(|g| *g >= 990.0), "Retry-After: 1 is honoured: {gaps:?}");

    // A second run asks nothing and writes the same bytes.
    let before = total(&server);
    let output = run.judge(&openai_args(&run, &server, "out2", &extra), &[]);
    assert_ok(&output);
    assert_eq!(total(&server), before, "the rerun made no request");
    for file in ["summary.json", "judgments.arrow", "report/report.md", "report/win_rate.svg"] {
        let read = |out: &str| std::fs::read(run.path(&format!("{out}/{file}"))).unwrap();
        assert!(read("out1") == read("out2"), "{file} differs between the runs");
    }
    let report = std::fs::read_to_string(run.path("out1/report/report.md")).unwrap();
    assert!(report.contains("| candidate wins | 6 |") && report.contains("lorem ipsum"), "{report}");
}

#[test]
fn a_killed_run_keeps_what_it_judged_and_the_rerun_asks_only_the_rest() {
    let server = FakeServer::start(Config { latency: Duration::from_millis(20), ..Config::default() });
    let run = Run::new();
    let rows: Vec<_> = (0..20).map(|i| row(&format!("Q{i}?"), &format!("GOOD {i}"), &format!("BAD {i}"))).collect();
    write_inputs(&run, &rows);
    let args = openai_args(&run, &server, "out", &["--concurrency", "2"]);

    let output = run.judge(&args, &[("HALO_FAULT_AFTER_JUDGMENTS", "7")]);
    assert_eq!(output.status.signal(), Some(9), "killed by the fault point: {output:?}");
    let cached = std::fs::read_to_string(run.path("cache/answers.jsonl")).unwrap();
    assert_eq!(cached.lines().count(), 7, "the 7 answers before the kill are in the cache");
    assert!(!run.path("out/summary.json").exists());
    let asked_before_kill = total(&server);
    assert!((7..=9).contains(&asked_before_kill), "{asked_before_kill}");

    let output = run.judge(&args, &[]);
    assert_ok(&output);
    assert_eq!(total(&server) - asked_before_kill, 40 - 7, "only the unanswered requests are asked again");
    assert_eq!(count(&run.summary("out"), "wins"), 20);
    assert_eq!(std::fs::read_to_string(run.path("cache/answers.jsonl")).unwrap().lines().count(), 40);
}

#[test]
fn the_api_key_is_used_but_never_written_or_logged() {
    const KEY: &str = "sk-test-SECRET123";
    let server = FakeServer::start(Config { expected_key: Some(KEY.into()), ..Config::default() });
    let run = Run::new();
    write_inputs(
        &run,
        &[
            row("Q1?", "GOOD", "BAD"),
            row("Q2 ECHO-KEY?", "GOOD", "BAD"),
            row("Q3 FAULT-ECHO?", "GOOD", "BAD"),
        ],
    );
    let args = openai_args(
        &run,
        &server,
        "out",
        &["--api-key-env", "HALO_TEST_KEY", "--max-retries", "1", "--backoff-s", "0.01", "--max-failed-fraction", "1"],
    );
    let output = run.judge(&args, &[("HALO_TEST_KEY", KEY), ("RUST_LOG", "trace")]);
    assert_ok(&output);
    assert_eq!(server.stats.authorized.load(Ordering::SeqCst), total(&server), "every request carried the key");
    assert_eq!(total(&server), 2 + 2 + 2 * 2);

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("DEBUG"), "verbose logging was on");
    let mut leaks = Vec::new();
    if stderr.contains("SECRET123") || String::from_utf8_lossy(&output.stdout).contains("SECRET123") {
        leaks.push("stdout/stderr".to_string());
    }
    let mut dirs = vec![run.dir.path().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if String::from_utf8_lossy(&std::fs::read(&path).unwrap()).contains("SECRET123") {
                leaks.push(path.display().to_string());
            }
        }
    }
    assert!(leaks.is_empty(), "the key was written to {leaks:?}");

    let judgments = run.judgments("out");
    let echoed = judgments.iter().find(|j| j.raw.contains("you sent")).unwrap();
    assert!(echoed.raw.contains("Bearer [REDACTED]"), "{echoed:?}");
    let failed = judgments.iter().find(|j| j.error.is_some()).unwrap();
    let error = failed.error.as_deref().unwrap();
    assert!(error.contains("HTTP 500") && error.contains("Bearer [REDACTED]"), "{error}");
}

#[test]
fn requests_that_keep_failing_are_invalid_with_their_reason_and_retried_next_run() {
    let server = FakeServer::start(Config::default());
    let run = Run::new();
    write_inputs(
        &run,
        &[row("Q1?", "GOOD", "BAD"), row("Q2?", "BAD", "GOOD"), row("Q3?", "GOOD", "BAD"), row("Q4 FAULT-DOWN?", "GOOD", "BAD")],
    );
    let extra = ["--template", "mt-bench", "--max-retries", "2", "--backoff-s", "0.01"];
    let mut args = openai_args(&run, &server, "out", &extra);
    args.extend(["--max-failed-fraction".to_string(), "0.5".to_string()]);
    assert_ok(&run.judge(&args, &[]));
    assert_eq!(server.stats.server_errors.load(Ordering::SeqCst), 2 * 3, "1 attempt + 2 retries per order");
    let s = run.summary("out");
    assert_eq!((count(&s, "wins"), count(&s, "losses"), count(&s, "invalid")), (2, 1, 1));
    assert_eq!(s["judgments"]["failed"], 2);
    let failed: Vec<_> = run.judgments("out").into_iter().filter(|j| j.error.is_some()).collect();
    assert_eq!(failed.len(), 2);
    for j in &failed {
        assert_eq!((j.verdict.as_str(), j.raw.as_str()), ("invalid", ""));
        let error = j.error.as_deref().unwrap();
        assert!(error.contains("HTTP 500") && error.contains("after 2 retries"), "{error}");
    }

    // With the default threshold (10%) the stage fails, after writing its outputs; only the
    // failed requests are asked again.
    let before = total(&server);
    let output = run.judge(&openai_args(&run, &server, "strict", &extra), &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("2 of 8 judge requests got no answer") && stderr.contains("HTTP 500"), "{stderr}");
    assert!(run.path("strict/summary.json").exists());
    assert_eq!(total(&server) - before, 2 * 3);
}

#[test]
fn every_template_parses_its_judge_and_random_order_is_seeded() {
    let server = FakeServer::start(Config::default());
    let run = Run::new();
    write_inputs(
        &run,
        &[row("Q1?", "GOOD 1", "BAD 1"), row("Q2?", "GOOD 2", "BAD 2"), row("Q3?", "BAD 3", "GOOD 3"), row("Q4?", "plain", "plain too")],
    );
    let counts = |out: &str| {
        let s = run.summary(out);
        (count(&s, "wins"), count(&s, "losses"), count(&s, "ties"), count(&s, "invalid"))
    };
    // HALOs and AlpacaEval have no tie label: the fake judge's "Neither" / "m or M" is invalid.
    for template in ["halos", "alpaca-eval", "mt-bench"] {
        assert_ok(&run.judge(&openai_args(&run, &server, template, &["--template", template]), &[]));
        let expected = if template == "mt-bench" { (2, 1, 1, 0) } else { (2, 1, 0, 1) };
        assert_eq!(counts(template), expected, "{template}");
        assert_eq!(run.summary(template)["judge"]["template"], template);
    }

    let file = run.path("mine.toml");
    std::fs::write(
        &file,
        "description = \"plain\"\nmax_tokens = 4\n[[messages]]\nrole = \"user\"\n\
         content = \"Question: {question}\\nFirst: {answer_a}\\nSecond: {answer_b}\\nSay A, B or tie.\"\n\
         [verdict]\na = \"A\"\nb = \"B\"\ntie = \"tie\"\nmatch = \"exact\"\ncase_sensitive = true\n",
    )
    .unwrap();
    let mine = ["--template-file", file.to_str().unwrap()];
    assert_ok(&run.judge(&openai_args(&run, &server, "mine", &mine), &[]));
    assert_eq!(counts("mine"), (2, 1, 1, 0));

    std::fs::write(&file, std::fs::read_to_string(&file).unwrap().replace("{answer_b}", "{answer_2}")).unwrap();
    let output = run.judge(&openai_args(&run, &server, "typo", &mine), &[]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown placeholder {answer_2}"));

    let random = |out: &str, seed: &str| {
        assert_ok(&run.judge(&openai_args(&run, &server, out, &["--template", "mt-bench", "--order", "random", "--seed", seed]), &[]));
        run.judgments(out).into_iter().map(|j| j.first).collect::<Vec<_>>()
    };
    let firsts = random("random1", "3");
    assert_eq!(firsts.len(), 4, "one judgment per pair");
    assert_eq!(firsts, random("random2", "3"));
    assert_eq!(counts("random1"), (2, 1, 1, 0), "a consistent judge gives the same verdicts in any order");
    assert_eq!(run.summary("random1")["judge"]["order"], "random");
}

/// Every 8-character piece of `key` found in `text`.
fn key_pieces_in(key: &str, text: &str) -> Vec<String> {
    let chars: Vec<char> = key.chars().collect();
    chars.windows(8).map(|w| w.iter().collect::<String>()).filter(|piece| text.contains(piece.as_str())).collect()
}

#[test]
fn a_key_cut_by_the_error_text_limit_is_still_redacted() {
    // The server's error message holds the key from character 188 on: a cut at 200 characters
    // keeps its first 12 characters.
    const KEY: &str = "sk-live-0123456789abcdefSECRETxyz";
    let server = FakeServer::start(Config::default());
    let run = Run::new();
    write_inputs(&run, &[row("Q1?", "GOOD", "BAD"), row("Q2 ECHO-CUT?", "GOOD", "BAD")]);
    let extra = ["--api-key-env", "HALO_TEST_KEY", "--max-retries", "1", "--backoff-s", "0.01", "--max-failed-fraction", "1"];
    let output = run.judge(&openai_args(&run, &server, "out", &extra), &[("HALO_TEST_KEY", KEY), ("RUST_LOG", "debug")]);
    assert_ok(&output);
    let failed: Vec<_> = run.judgments("out").into_iter().filter_map(|j| j.error).collect();
    assert_eq!(failed.len(), 2, "both orders of the ECHO-CUT pair failed");
    assert!(failed[0].contains("Authorization: Bearer [REDACTED]"), "{}", failed[0]);

    let mut leaks = Vec::new();
    for (what, text) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
        let pieces = key_pieces_in(KEY, &String::from_utf8_lossy(text));
        if !pieces.is_empty() {
            leaks.push(format!("{what}: {pieces:?}"));
        }
    }
    let mut dirs = vec![run.dir.path().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let pieces = key_pieces_in(KEY, &String::from_utf8_lossy(&std::fs::read(&path).unwrap()));
                if !pieces.is_empty() {
                    leaks.push(format!("{}: {pieces:?}", path.display()));
                }
            }
        }
    }
    assert!(leaks.is_empty(), "pieces of the key were written: {leaks:?}");
}
