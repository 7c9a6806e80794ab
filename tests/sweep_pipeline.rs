//! pipelines/ci-sweep.toml with the real binaries: a matrix expands into instances that run
//! in parallel under `-j 2`, `halo runs` tabulates them, changing one value reruns only that
//! point's stages, and a named run keeps its cache entries through `halo gc`.

mod common;

use common::*;
use haloflow::manifest::Status;

#[test]
fn a_sweep_runs_every_point_and_reruns_only_the_changed_one() {
    let Some(data) = shared_data() else { return };
    for stage in ["halo-init", "halo-refcache", "halo-train", "halo-sample", "halo-judge"] {
        binary(stage);
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let tokenizer = data.join("../models/stories260K");
    let text_of = std::fs::read_to_string(repo_root().join("pipelines/ci-sweep.toml")).unwrap();
    let pipeline = tmp.path().join("ci-sweep.toml");
    std::fs::write(&pipeline, &text_of).unwrap();
    let (p, w) = (pipeline.to_str().unwrap().to_string(), work.to_str().unwrap().to_string());
    let sets = ["--set".to_string(), format!("data={}", data.display()), "--set".into(), format!("tokenizer={}", tokenizer.display())];
    let halo_with = |cmd: &str, extra: &[&str]| -> std::process::Output {
        let mut a: Vec<&str> = vec![cmd, &p, "--work-dir", &w];
        a.extend(sets.iter().map(String::as_str));
        a.extend(extra);
        run(&a)
    };

    assert!(halo_with("run", &["-j", "2", "--name", "first"]).status.success());
    let points = ["[beta=0.05]", "[beta=0.1]"];
    let mut swept = Vec::new();
    for base in ["train_kto", "sample_kto", "judge_kto", "train_dpo", "sample_dpo", "judge_dpo"] {
        swept.extend(points.iter().map(|pt| format!("{base}{pt}")));
    }
    // Every instance ran, or found its result already cached by an instance with the same key
    // (content addressing: two policies that sample the same text share one judge entry).
    let ran = stages_with(&work, "ci-sweep", Status::Ran);
    let done: std::collections::BTreeSet<String> = ran.union(&stages_with(&work, "ci-sweep", Status::Cached)).cloned().collect();
    for name in &swept {
        assert!(done.contains(name), "{name} ran or was cached: {ran:?}");
    }
    for train in ["train_kto[beta=0.05]", "train_kto[beta=0.1]", "train_dpo[beta=0.05]", "train_dpo[beta=0.1]"] {
        assert!(ran.contains(train), "{train}: each point trains");
    }
    assert!(!done.contains("train_kto") && ran.contains("sample_init"), "the swept stage exists only as instances; unswept stages once");
    let m = manifest(&work, "ci-sweep");
    let beta = |name: &str| m.stage(name).unwrap().parts.as_ref().unwrap().params["beta"].clone();
    assert_eq!((beta("train_kto[beta=0.05]"), beta("train_dpo[beta=0.1]")), (serde_json::json!(0.05), serde_json::json!(0.1)));

    // One row per point, with numbers read from the instances' summaries.
    let table = text(&halo_with("runs", &["--csv", tmp.path().join("runs.csv").to_str().unwrap(), "--plot", tmp.path().join("runs.svg").to_str().unwrap()]));
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| train_") && l.contains('[')).collect();
    assert_eq!(rows.len(), 4, "{table}");
    assert!(table.contains("| train_dpo | beta | train_dpo loss | train_dpo eval/loss | judge_dpo win rate (95% CI) |"), "each sweep has its own columns: {table}");
    assert!(rows.iter().all(|r| !r.contains('—')), "every point has its loss and win rate: {table}");
    assert!(table.contains("| train_kto | beta | train_kto loss | train_kto eval/loss | judge_kto win rate (95% CI) |"), "{table}");
    assert_eq!(std::fs::read_to_string(tmp.path().join("runs.csv")).unwrap().lines().count(), 6, "two headers + 4 rows");
    assert!(std::fs::read_to_string(tmp.path().join("runs.svg")).unwrap().contains("<svg"));

    // The gathering stage compared all four points in one table, named by their points.
    let compare = |m: &haloflow::manifest::Manifest| std::fs::read_to_string(m.stage("compare").unwrap().outputs["report"].path.join("compare.md")).unwrap();
    let md = compare(&m);
    for name in ["kto beta=0.05", "kto beta=0.1", "dpo beta=0.05", "dpo beta=0.1"] {
        assert_eq!(md.lines().filter(|l| l.starts_with(&format!("| {name} |"))).count(), 1, "{name} in: {md}");
    }

    // Changing one value reruns exactly that point's stages.
    let changed = text_of.replacen("matrix = { beta = [0.05, 0.1] }", "matrix = { beta = [0.05, 0.2] }", 1);
    assert_ne!(changed, text_of);
    std::fs::write(&pipeline, changed).unwrap();
    assert!(halo_with("run", &[]).status.success());
    let ran = stages_with(&work, "ci-sweep", Status::Ran);
    let point: std::collections::BTreeSet<String> = set(&["train_kto[beta=0.2]", "sample_kto[beta=0.2]", "judge_kto[beta=0.2]", "compare"]);
    assert!(ran.is_subset(&point) && ran.contains("train_kto[beta=0.2]") && ran.contains("sample_kto[beta=0.2]"), "only the new point's stages (and the comparison) ran: {ran:?}");
    let md = compare(&manifest(&work, "ci-sweep"));
    assert!(md.contains("| kto beta=0.2 |") && !md.contains("| kto beta=0.1 |"), "the comparison follows the sweep: {md}");
    assert!(manifest(&work, "ci-sweep").stage("judge_kto[beta=0.2]").unwrap().key.is_some(), "the new point is judged (or its verdicts found cached)");

    // The named first run keeps its entries (train_kto[beta=0.1] and its chain) through gc.
    let gc = text(&halo_with("gc", &[]));
    assert!(gc.contains("removed 0 cache entries"), "{gc}");
    assert!(work.join("ci-sweep@first.lock.json").is_file());
}
