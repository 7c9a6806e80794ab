//! pipelines/ci-lora.toml (ci-tiny with LoRA): train writes a PEFT adapter directory on the
//! tiny random model and the merged full model; sample loads the adapter as base + adapter
//! and its greedy completions equal the merged model's; the judge scores them; a rerun
//! reruns nothing.

mod common;

use common::*;
use haloflow::manifest::Status;

fn completions(path: &std::path::Path) -> Vec<String> {
    let table = haloflow::io::read_table(path).unwrap();
    let mut out = Vec::new();
    for batch in &table.batches {
        let column = batch.column_by_name("completion").unwrap();
        let strings = column.as_any().downcast_ref::<arrow_array::StringArray>().unwrap();
        out.extend(strings.iter().map(|s| s.unwrap_or_default().to_string()));
    }
    out
}

/// Elements stored in a safetensors file (from its JSON header).
fn numel(path: &std::path::Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).product::<u64>())
        .sum()
}

#[test]
fn the_ci_lora_pipeline_trains_an_adapter_that_sample_and_judge_read() {
    let Some(data) = shared_data() else { return };
    let Some(tokenizer) = haloflow::shared::path("models/stories260K") else { return };
    for stage in ["halo-init", "halo-refcache", "halo-train", "halo-sample", "halo-judge"] {
        binary(stage);
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let pipeline = repo_root().join("pipelines/ci-lora.toml");
    let args: Vec<String> = vec![
        "run".into(),
        pipeline.to_string_lossy().into(),
        "--work-dir".into(),
        work.to_string_lossy().into(),
        "--set".into(),
        format!("data={}", data.display()),
        "--set".into(),
        format!("tokenizer={}", tokenizer.display()),
    ];
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    run_ok(&args);
    let all = ["import", "unpair", "resample", "init", "refcache", "train", "import_mt", "sample_policy", "sample_merged", "sample_init", "judge"];
    assert_eq!(stages_with(&work, "ci-lora", Status::Ran), set(&all));
    let m = manifest(&work, "ci-lora");
    let train = m.stage("train").unwrap();
    assert_eq!(train.outputs["metrics"].rows, Some(31), "step 0 evaluation + 30 steps");
    let policy = &train.outputs["policy"].path;
    assert!(policy.join("adapter_model.safetensors").is_file() && !policy.join("model.safetensors").exists(), "train.policy is an adapter");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(policy.join("adapter_config.json")).unwrap()).unwrap();
    let base = std::fs::canonicalize(&m.stage("init").unwrap().outputs["out"].path).unwrap();
    assert_eq!(config["base_model_name_or_path"].as_str(), base.to_str(), "the adapter names init.out as its base");
    assert_eq!((config["r"].as_i64(), config["lora_alpha"].as_f64()), (Some(8), Some(16.0)));
    assert!(train.outputs["merged"].path.join("model.safetensors").is_file());
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(&train.outputs["summary"].path).unwrap()).unwrap();
    let (adapter, full) = (numel(&policy.join("adapter_model.safetensors")), numel(&train.outputs["merged"].path.join("model.safetensors")));
    eprintln!("trained {adapter} adapter parameters of {full}");
    assert_eq!(summary["trainable_parameters"].as_u64(), Some(adapter));
    assert_eq!(summary["checkpoint_activations"], true, "ci-lora trains with activation checkpointing");
    assert_eq!(summary["memory_estimate"]["trainable"].as_u64(), Some(adapter), "the estimate counts the adapters as trained");
    assert!(adapter * 5 < full, "LoRA trains a small fraction");
    let (a, b) = (completions(&m.stage("sample_policy").unwrap().outputs["samples"].path), completions(&m.stage("sample_merged").unwrap().outputs["samples"].path));
    assert!(a.len() > 40, "most MT-Bench prompts fit the tiny model: {}", a.len());
    assert_eq!(a, b, "greedy completions: base + adapter = merged model");
    let judge: serde_json::Value = serde_json::from_slice(&std::fs::read(&m.stage("judge").unwrap().outputs["summary"].path).unwrap()).unwrap();
    assert_eq!(judge["n"].as_u64(), Some(a.len() as u64), "every sampled prompt judged");
    // A second run reruns nothing.
    run_ok(&args);
    assert_eq!(stages_with(&work, "ci-lora", Status::Ran), set(&[]));
}
