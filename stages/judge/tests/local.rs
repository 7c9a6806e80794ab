//! The `local` backend on ../shared/models/stories260K: a poor judge, so this checks the
//! mechanics: label probabilities sum to one, both orders are asked with the outputs swapped,
//! verdicts follow the most probable label, and a rerun comes from the cache.

#[allow(dead_code)]
mod common;

use common::fixtures::{assert_ok, write_prompts, write_samples, Run};

#[test]
fn local_judge_reads_label_probabilities_in_both_orders() {
    let Some(model) = haloflow::shared::path("models/stories260K") else { return };
    let run = Run::new();
    let items = [("Tell me a story.", "Once upon a time there was a cat.", "The end."), ("Who is Lily?", "Lily is a girl.", "A dog.")];
    let cand: Vec<(String, String)> = items.iter().map(|i| (i.0.to_string(), i.1.to_string())).collect();
    let base: Vec<(String, String)> = items.iter().map(|i| (i.0.to_string(), i.2.to_string())).collect();
    write_samples(&run.path("candidate.arrow"), "cand", &cand);
    write_samples(&run.path("baseline.arrow"), "base", &base);
    write_prompts(&run.path("prompts.arrow"), &items.iter().map(|i| (i.0, None, None)).collect::<Vec<_>>());
    let mut args = run.io_args("out");
    args.extend(["--prompts".into(), run.path("prompts.arrow").display().to_string()]);
    args.extend(["--backend", "local", "--template", "mt-bench", "--device", "cpu", "--threads", "1"].map(String::from));
    args.extend(["--judge-model".into(), model.display().to_string()]);
    assert_ok(&run.judge(&args, &[]));
    let judgments = run.judgments("out");
    assert_eq!(judgments.len(), 4, "two pairs in both orders");
    for j in &judgments {
        let probs: Vec<(String, f64)> = j
            .raw
            .split_whitespace()
            .map(|p| {
                let (label, value) = p.trim_start_matches("p(").split_once(")=").unwrap();
                (label.to_string(), value.parse().unwrap())
            })
            .collect();
        assert_eq!(probs.len(), 3, "[[A]], [[B]] and the tie [[C]]: {}", j.raw);
        assert!((probs.iter().map(|p| p.1).sum::<f64>() - 1.0).abs() < 2e-4, "{}", j.raw);
        let best = probs.iter().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
        let expected = match (best.0.as_str(), j.first.as_str()) {
            ("[[C]]", _) => "tie",
            ("[[A]]", first) => first,
            (_, "candidate") => "baseline",
            _ => "candidate",
        };
        assert_eq!(j.verdict, expected, "verdict follows the most probable label: {}", j.raw);
    }
    for prompt in ["candidate", "baseline"] {
        assert_eq!(judgments.iter().filter(|j| j.first == prompt).count(), 2, "each pair asked with {prompt} first");
    }
    let summary = run.summary("out");
    assert_eq!(summary["n"], 2);
    // The weighted win rate is the mean probability of the candidate's label (+ half the tie's).
    let expected: f64 = judgments
        .iter()
        .map(|j| {
            let p = |label: &str| j.raw.split_whitespace().find_map(|x| x.strip_prefix(&format!("p({label})="))).unwrap().parse::<f64>().unwrap();
            let first = p("[[A]]") + p("[[C]]") / 2.0;
            if j.first == "candidate" { first } else { 1.0 - first }
        })
        .sum::<f64>()
        / judgments.len() as f64;
    let weighted = summary["weighted_win_rate"].as_f64().unwrap();
    assert!((weighted - expected).abs() < 1e-3, "weighted win rate {weighted} vs {expected}");
    // A rerun answers from the cache with identical results.
    assert_ok(&run.judge(&args, &[]));
    assert_eq!(run.summary("out"), summary);
}
