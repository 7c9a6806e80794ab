//! halo-refcache on the real stories260K model: a run killed halfway resumes and writes exactly
//! what an uninterrupted run writes; padding waste stays small.

use std::path::{Path, PathBuf};
use std::process::Command;

use haloflow::records::{plan_batch, BinaryRow, Message, PlanRow};

fn model_dir() -> Option<PathBuf> {
    haloflow::shared::path("models/stories260K")
}

fn write_plan(path: &Path, n: usize) {
    let stories = ["Once upon a time", "Lily saw a big dog", "Tom liked to run in the park", "The sun was hot"];
    let rows: Vec<PlanRow> = (0..n)
        .map(|i| {
            let completion = format!(" and then {} {}", stories[(i + 1) % 4].to_lowercase(), "!".repeat(i % 7));
            PlanRow {
                example: BinaryRow {
                    example_id: format!("e{i}"),
                    prompt_id: format!("p{}", i / 2),
                    prompt: vec![Message::new("user", stories[i % 4])],
                    completion: completion.clone(),
                    label: i % 2 == 0,
                    weight: 1.0,
                    source: None,
                },
                batch: (i / 4) as i64,
                kl_example_id: format!("e{}", (i + 1) % n),
                kl_completion: format!("{completion} the end"),
            }
        })
        .collect();
    let batch = plan_batch(&rows).unwrap();
    haloflow::io::write_arrow(path, &batch.schema(), &[batch], Default::default()).unwrap();
}

fn refcache(dir: &Path, data: &Path, model: &Path, out: &str, fault: Option<usize>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_halo-refcache"));
    cmd.args(["--data", data.to_str().unwrap(), "--model", model.to_str().unwrap()])
        .args(["--logps", dir.join(format!("{out}.parquet")).to_str().unwrap()])
        .args(["--summary", dir.join(format!("{out}.json")).to_str().unwrap()])
        .args(["--chunk-size", "8", "--token-budget", "256", "--per-token", "true", "--device", "cpu"])
        .env_remove("HALO_SCRATCH_DIR");
    if let Some(n) = fault {
        cmd.env("HALO_FAULT_AFTER_CHUNKS", n.to_string());
    }
    cmd.output().unwrap()
}

#[test]
fn a_killed_run_resumes_to_the_identical_result() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("plan.arrow");
    write_plan(&data, 40); // 80 sequences = 10 chunks of 8
    assert!(refcache(dir.path(), &data, &model, "whole", None).status.success());

    let killed = refcache(dir.path(), &data, &model, "resumed", Some(4));
    assert!(!killed.status.success(), "the fault hook kills the run");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&killed.status), Some(9), "killed by SIGKILL");
    assert!(!dir.path().join("resumed.parquet").exists(), "no output from a killed run");
    assert!(dir.path().join("resumed.partial").is_dir(), "finished chunks are kept");
    let out = refcache(dir.path(), &data, &model, "resumed", None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.path().join("resumed.partial").exists(), "scratch removed when complete");

    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("resumed.json")).unwrap()).unwrap();
    assert_eq!(summary["chunks_resumed"], 4);
    let whole = haloflow::io::read_parquet(&dir.path().join("whole.parquet")).unwrap();
    let resumed = haloflow::io::read_parquet(&dir.path().join("resumed.parquet")).unwrap();
    assert_eq!(whole.batches, resumed.batches, "resumed output equals the uninterrupted one");
    assert_eq!(whole.schema.metadata(), resumed.schema.metadata());
    assert_eq!(whole.num_rows(), 40);

    let whole_summary: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("whole.json")).unwrap()).unwrap();
    let waste = whole_summary["padding_waste"].as_f64().unwrap();
    assert!(waste < 0.2, "length bucketing keeps padding small: {waste}");
    assert_eq!((&whole_summary["device"], &whole_summary["dtype"]), (&serde_json::json!("cpu"), &serde_json::json!("f32")), "names --device/--dtype read");
    haloflow::schema::validate_file(&haloflow::schema::by_name("ref_logps").unwrap(), &dir.path().join("whole.parquet")).unwrap();
}
