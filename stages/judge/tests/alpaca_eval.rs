//! Parity with alpaca_eval: the weighted win rate from a server's `top_logprobs` (and the
//! fallback to verdict counts), `model_outputs.json` to and from `samples`, and
//! `annotations.json` from a judged run.

#[allow(dead_code)]
mod common;

use std::sync::atomic::Ordering;

use arrow_array::Array;
use common::fixtures::{assert_ok, write_samples, Run};
use common::server::{Config, FakeServer};
use serde_json::Value;

/// 3 pairs the candidate wins, 1 it loses, 1 plain pair (the fake judge answers `m or M`:
/// invalid with the alpaca-eval template, and no label among its top_logprobs).
fn write_inputs(run: &Run) -> usize {
    let rows = [("Q1?", "GOOD 1", "BAD 1"), ("Q2?", "GOOD 2", "BAD 2"), ("Q3?", "GOOD 3", "BAD 3"), ("Q4?", "BAD 4", "GOOD 4"), ("Q5?", "plain", "plain too")];
    let side = |pick: usize| -> Vec<(String, String)> {
        rows.iter().map(|r| (r.0.to_string(), [r.1, r.2][pick].to_string())).collect()
    };
    write_samples(&run.path("candidate.arrow"), "policy", &side(0));
    write_samples(&run.path("baseline.arrow"), "out", &side(1));
    rows.len()
}

fn args(run: &Run, server: &FakeServer, out: &str, extra: &[&str]) -> Vec<String> {
    let mut args = run.io_args(out);
    args.extend(["--model", "fake-judge", "--template", "alpaca-eval", "--base-url", &server.base_url()].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn read_json(run: &Run, file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run.path(file)).unwrap()).unwrap()
}

#[test]
fn the_weighted_win_rate_comes_from_the_servers_top_logprobs() {
    let server = FakeServer::start(Config { logprobs: true, ..Config::default() });
    let run = Run::new();
    let n = write_inputs(&run);
    let names = ["--candidate-name", "kto", "--baseline-name", "base"];
    assert_ok(&run.judge(&args(&run, &server, "out", &names), &[]));
    assert_eq!(server.logprobs.asked.load(Ordering::SeqCst), 2 * n, "every request asked for logprobs");

    // By hand: the fake judge gives the label it answers 0.7, the other label 0.2 and `The`
    // 0.1; normalised over the two labels the answered one has 0.7 / 0.9. A pair the candidate
    // wins gives it 7/9 in both orders, the lost pair 2/9 in both; the plain pair's answers
    // carry no label probability and are left out.
    let win = 0.7 / (0.7 + 0.2);
    let expected = (3.0 * 2.0 * win + 2.0 * (1.0 - win)) / 8.0;
    let s = run.summary("out");
    let weighted = s["weighted_win_rate"].as_f64().unwrap();
    assert!((weighted - expected).abs() < 1e-12, "{weighted} vs {expected} by hand");
    assert_eq!((s["weighted_from"].as_str(), s["weighted_requests"].as_u64()), (Some("label_probabilities"), Some(8)));
    assert_eq!((s["wins"].as_u64(), s["losses"].as_u64(), s["invalid"].as_u64()), (Some(3), Some(1), Some(1)));
    // 3 wins, 1 loss: 2 * P(X <= 1), X ~ Bin(4, 1/2) = 2 * 5/16.
    assert_eq!(s["sign_test_p_value"].as_f64(), Some(0.625));
    assert_eq!((s["candidate"].as_str(), s["baseline"].as_str()), (Some("kto"), Some("base")));
    let report = std::fs::read_to_string(run.path("out/report/report.md")).unwrap();
    assert!(report.starts_with("# Judge report: `kto` vs `base`"), "{report}");
    assert!(report.contains(&format!("over 8 requests with label probabilities): {expected:.3}")), "{report}");
    assert!(report.contains("3 wins vs 1 losses, ties left out): p = 0.6250"), "{report}");

    // alpaca_eval's annotations: the baseline is output_1, the candidate output_2; preference
    // 1 + the candidate's probability (2 - P(output_1) in alpaca_eval's terms), null when the
    // pair has no verdict and no probability.
    let annotations = read_json(&run, "out/report/annotations.json");
    let annotations = annotations.as_array().unwrap();
    assert_eq!(annotations.len(), n);
    let first = &annotations[0];
    for field in ["instruction", "output_1", "generator_1", "output_2", "generator_2", "annotator", "preference"] {
        assert!(first.get(field).is_some(), "annotations carry `{field}`: {first}");
    }
    assert_eq!((first["instruction"].as_str(), first["output_1"].as_str(), first["output_2"].as_str()), (Some("Q1?"), Some("BAD 1"), Some("GOOD 1")));
    assert_eq!((first["generator_1"].as_str(), first["generator_2"].as_str()), (Some("base"), Some("kto")));
    assert_eq!(first["annotator"], "halo-judge openai fake-judge (alpaca-eval)");
    let preferences: Vec<Option<f64>> = annotations.iter().map(|a| a["preference"].as_f64()).collect();
    for (got, want) in preferences.iter().zip([Some(1.0 + win), Some(1.0 + win), Some(1.0 + win), Some(2.0 - win), None]) {
        assert!(match (got, want) { (Some(g), Some(w)) => (g - w).abs() < 1e-12, (None, None) => true, _ => false }, "{preferences:?}");
    }
    let mean: f64 = preferences.iter().flatten().map(|p| p - 1.0).sum::<f64>() / 4.0;
    assert!((mean - expected).abs() < 1e-12, "mean(preference - 1) is the weighted win rate");
}

#[test]
fn without_logprobs_the_summary_says_it_counts_verdicts_and_annotations_are_1_1_5_2() {
    // A server that ignores the parameter.
    let server = FakeServer::start(Config::default());
    let run = Run::new();
    let n = write_inputs(&run);
    assert_ok(&run.judge(&args(&run, &server, "ignored", &[]), &[]));
    let s = run.summary("ignored");
    assert!(s["weighted_win_rate"].is_null(), "{s:#}");
    assert_eq!((s["weighted_from"].as_str(), s["weighted_requests"].as_u64()), (Some("verdicts"), Some(0)));
    let report = std::fs::read_to_string(run.path("ignored/report/report.md")).unwrap();
    assert!(report.contains("**Weighted win rate**: n/a"), "{report}");
    let annotations = read_json(&run, "ignored/report/annotations.json");
    let preferences: Vec<Value> = annotations.as_array().unwrap().iter().map(|a| a["preference"].clone()).collect();
    assert_eq!(preferences, [2.0.into(), 2.0.into(), 2.0.into(), 1.0.into(), Value::Null]);

    // A server that refuses it with 400: asked once more without, then never again.
    let refusing = FakeServer::start(Config { reject_logprobs: true, ..Config::default() });
    assert_ok(&run.judge(&args(&run, &refusing, "refused", &["--concurrency", "1"]), &[]));
    let lp = &refusing.logprobs;
    assert_eq!((lp.rejected.load(Ordering::SeqCst), lp.asked.load(Ordering::SeqCst)), (1, 1));
    assert_eq!(refusing.stats.total(), 2 * n + 1);
    let s = run.summary("refused");
    assert_eq!((s["wins"].as_u64(), s["losses"].as_u64(), s["weighted_from"].as_str()), (Some(3), Some(1), Some("verdicts")));

    // --top-logprobs 0 never asks.
    let plain = FakeServer::start(Config { logprobs: true, ..Config::default() });
    assert_ok(&run.judge(&args(&run, &plain, "zero", &["--top-logprobs", "0"]), &[]));
    assert_eq!(plain.logprobs.asked.load(Ordering::SeqCst), 0);
    assert!(run.summary("zero")["weighted_win_rate"].is_null());
}

#[test]
fn samples_round_trip_through_model_outputs_json() {
    let run = Run::new();
    let rows: Vec<(String, String)> =
        (0..4).map(|i| (format!("Question {i}?"), format!("Answer {i}, with \"quotes\" and ünïcode"))).collect();
    write_samples(&run.path("samples.arrow"), "kto", &rows);
    let export = ["alpaca-eval", "export", "--samples", "samples.arrow", "--out", "model_outputs.json", "--dataset", "mine"];
    assert_ok(&run.judge(&export.map(String::from), &[]));
    let outputs = read_json(&run, "model_outputs.json");
    let first = &outputs[0];
    assert_eq!((first["instruction"].as_str(), first["generator"].as_str(), first["dataset"].as_str()), (Some("Question 0?"), Some("kto"), Some("mine")));
    assert_eq!(first["output"], rows[0].1.as_str());

    let import = ["alpaca-eval", "import", "--model-outputs", "model_outputs.json", "--out", "back.arrow"];
    assert_ok(&run.judge(&import.map(String::from), &[]));
    let read = |file: &str| haloflow::io::read_arrow(&run.path(file)).unwrap().batches;
    let (before, after) = (read("samples.arrow"), read("back.arrow"));
    assert_eq!((before.len(), after.len()), (1, 1));
    assert_eq!(before[0].num_rows(), after[0].num_rows());
    for (i, field) in before[0].schema().fields().iter().enumerate() {
        assert_eq!(before[0].column(i).to_data(), after[0].column(i).to_data(), "column `{}` differs", field.name());
    }
}

#[test]
fn alpaca_eval_outputs_are_judged_with_unknown_token_counts() {
    let server = FakeServer::start(Config::default());
    let run = Run::new();
    let file = |name: &str, generator: &str, word: &str| {
        let outputs: Vec<Value> = (0..3)
            .map(|i| serde_json::json!({"instruction": format!("Q{i}?"), "output": format!("{word} {i}"), "generator": generator, "dataset": "x"}))
            .collect();
        std::fs::write(run.path(name), serde_json::to_string(&outputs).unwrap()).unwrap();
        let import = ["alpaca-eval", "import", "--model-outputs", name, "--out", &name.replace(".json", ".arrow")];
        let output = run.judge(&import.map(String::from), &[]);
        assert_ok(&output);
        assert!(String::from_utf8_lossy(&output.stderr).contains("3 of 3 outputs carry no token counts"));
    };
    file("candidate.json", "model-a", "GOOD");
    file("baseline.json", "model-b", "BAD");
    assert_ok(&run.judge(&args(&run, &server, "out", &[]), &[]));
    let s = run.summary("out");
    assert_eq!((s["candidate"].as_str(), s["wins"].as_u64()), (Some("model-a"), Some(3)));
    assert!(s["lengths"]["candidate_tokens"].is_null(), "unknown token counts are not averaged as 0: {s:#}");
    let bad = run.judge(&["alpaca-eval", "import", "--model-outputs", "nothing.json", "--out", "x.arrow"].map(String::from), &[]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("nothing.json"));
}
