//! The `rule` backend on MT-Bench-like prompts with reference answers (no model, no network),
//! a `paired` baseline, categories, and `halo-judge compare`.

#[allow(dead_code)]
mod common;

use common::fixtures::{assert_ok, write_paired, write_prompts, write_samples, Run};

/// MT-Bench-like prompts: (question, reference, category, candidate, baseline).
const ITEMS: &[(&str, Option<&str>, &str, &str, &str)] = &[
    ("What is 7 * 6?", Some("42"), "math", "7 * 6 = 42", "It is 41"),
    ("What is the capital of France?", Some("Paris"), "knowledge", "paris", "Paris."),
    ("What is 2^10?", Some("1024"), "math", "About 1000", "1024"),
    ("Name the largest planet.", Some("Jupiter"), "knowledge", "Jupiter", "Saturn"),
    ("Write a poem about the sea.", None, "writing", "Waves...", "The sea..."),
];

fn setup() -> Run {
    let run = Run::new();
    let samples: Vec<(String, String)> = ITEMS.iter().map(|i| (i.0.to_string(), i.3.to_string())).collect();
    write_samples(&run.path("candidate.arrow"), "kto-model", &samples);
    let pairs: Vec<(&str, &str, &str)> = ITEMS.iter().map(|i| (i.0, i.4, "a rejected reply")).collect();
    write_paired(&run.path("baseline.arrow"), &pairs);
    let prompts: Vec<_> = ITEMS.iter().map(|i| (i.0, i.1, Some(i.2))).collect();
    write_prompts(&run.path("prompts.arrow"), &prompts);
    run
}

fn rule_args(run: &Run, out: &str, extra: &[&str]) -> Vec<String> {
    let mut args = run.io_args(out);
    args.extend(["--prompts".to_string(), run.path("prompts.arrow").display().to_string()]);
    args.extend(["--backend", "rule"].iter().chain(extra).map(|s| s.to_string()));
    args
}

fn counts(s: &serde_json::Value) -> [u64; 5] {
    ["n", "wins", "losses", "ties", "invalid"].map(|f| s[f].as_u64().unwrap())
}

#[test]
fn rule_backend_checks_outputs_against_references() {
    let run = setup();
    assert_ok(&run.judge(&rule_args(&run, "exact", &[]), &[]));
    let s = run.summary("exact");
    // Exact: "7 * 6 = 42" is not "42" (tie: neither exact), France (tie: both), 2^10 (loss),
    // planet (win), the poem has no reference (invalid).
    assert_eq!(counts(&s), [5, 1, 1, 2, 1], "{s:#}");
    assert_eq!(s["baseline"], "chosen");
    assert_eq!(s["judge"]["backend"], "rule");
    assert!(s["judge"]["model"].is_null() && s["judge"]["template"].is_null(), "a rule uses no model or template");
    assert_eq!(s["by_category"]["math"]["n"], 2);
    assert_eq!(s["by_category"]["knowledge"]["wins"], 1);
    assert_eq!(s["by_category"]["writing"]["invalid"], 1);
    let judgments = run.judgments("exact");
    assert_eq!(judgments.len(), 5, "a rule is order-free: one judgment per pair");
    assert!(judgments.iter().all(|j| j.first == "candidate"));
    assert!(judgments[4].raw.contains("no reference"), "{:?}", judgments[4]);

    let regex = [r"--rule", "regex", "--answer-regex", r"(\w+)\W*$"];
    assert_ok(&run.judge(&rule_args(&run, "regex", &regex), &[]));
    let s = run.summary("regex");
    // The last word: 42 beats 41, paris = paris, 1000 loses to 1024, jupiter beats saturn.
    assert_eq!(counts(&s), [5, 2, 1, 1, 1], "{s:#}");
    assert_eq!(s["win_rate"].as_f64().unwrap(), 2.5 / 4.0);
    let ci = s["win_rate_ci95"].as_array().unwrap();
    assert!(ci[0].as_f64().unwrap() < 0.625 && ci[1].as_f64().unwrap() > 0.625);
    let report = std::fs::read_to_string(run.path("regex/report/report.md")).unwrap();
    assert!(report.contains("## By category") && report.contains("| math | 2 | 1 | 1 |"), "{report}");
    let svg = std::fs::read_to_string(run.path("regex/report/win_rate.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("length-controlled") && svg.contains("knowledge"));
}

#[test]
fn rule_backend_refuses_a_missing_regex() {
    let run = setup();
    let output = run.judge(&rule_args(&run, "bad", &["--rule", "regex"]), &[]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--rule regex needs --answer-regex"));
}

#[test]
fn compare_puts_several_candidates_side_by_side() {
    let run = setup();
    assert_ok(&run.judge(&rule_args(&run, "a", &[]), &[]));
    assert_ok(&run.judge(&rule_args(&run, "b", &["--rule", "regex", "--answer-regex", r"(\w+)\W*$"]), &[]));
    let compare = |names: &[&str]| {
        let mut args = vec!["compare".to_string()];
        for out in ["a", "b"] {
            args.extend(["--summary".to_string(), run.path(&format!("{out}/summary.json")).display().to_string()]);
        }
        for name in names {
            args.extend(["--name".to_string(), name.to_string()]);
        }
        args.extend(["--out".to_string(), run.path("compare").display().to_string()]);
        run.judge(&args, &[])
    };
    assert_ok(&compare(&["KTO", "DPO"]));
    let md = std::fs::read_to_string(run.path("compare/compare.md")).unwrap();
    assert!(md.starts_with("# Win rates against `chosen`"), "{md}");
    assert!(md.contains("| KTO | 5 | 1 | 1 | 2 | 1 | 0.500 [") && md.contains("| DPO | 5 | 2 | 1 | 1 | 1 | 0.625 ["), "{md}");
    // Sign tests: 1 vs 1 gives p = 1; 2 vs 1 gives 2 * P(X <= 1 | n = 3) = 2 * 4/8, capped at 1.
    assert!(md.contains("0.500 [0.") && md.matches("| 1.0000 |").count() == 2, "{md}");
    assert!(!md.contains("Warning"));
    let svg = std::fs::read_to_string(run.path("compare/win_rates.svg")).unwrap();
    assert!(svg.contains("KTO") && svg.contains("DPO"));

    assert_ok(&compare(&[]));
    assert!(std::fs::read_to_string(run.path("compare/compare.md")).unwrap().contains("| kto-model | 5 |"));
    let output = compare(&["only one"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("1 --name given for 2 --summary"));
}
