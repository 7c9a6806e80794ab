//! halo-sample on the real stories260K model: a valid `samples` table in input order, a
//! summary that adds up, skipped prompts counted, and the same samples for any batch size.

#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::write_prompts;
use haloflow::records::{messages_at, Columns, Message};
use haloflow::schema;
use serde_json::Value;

fn model_dir() -> Option<PathBuf> {
    haloflow::shared::path("models/stories260K")
}

fn sample(dir: &Path, prompts: &Path, model: &Path, out: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_halo-sample"))
        .args(["--prompts", prompts.to_str().unwrap(), "--model", model.to_str().unwrap()])
        .args(["--samples", dir.join(format!("{out}.arrow")).to_str().unwrap()])
        .args(["--summary", dir.join(format!("{out}.json")).to_str().unwrap()])
        .args(["--device", "cpu", "--threads", "1", "--max-new-tokens", "24", "--temperature", "0.8", "--n", "2", "--seed", "5"])
        .args(["--stop", r#"["\n\n", "Lily"]"#, "--stop", "park"])
        .args(extra)
        .output()
        .unwrap()
}

fn succeeded(output: &Output) {
    assert!(output.status.success(), "halo-sample failed:\n{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn samples_are_valid_ordered_and_independent_of_the_batch_size() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.arrow");
    let too_long = "the dog ran and ".repeat(200);
    write_prompts(
        &prompts,
        &[("p-once", "Once upon a time".into()), ("p-long", too_long), ("p-tom", "Tom had a red ball and".into())],
    );
    succeeded(&sample(dir.path(), &prompts, &model, "batched", &["--batch-size", "3"]));

    let rows = schema::validate_file(&schema::by_name(schema::SAMPLES).unwrap(), &dir.path().join("batched.arrow")).unwrap();
    assert_eq!(rows, Some(4), "2 prompts × 2 samples; the long prompt is skipped");
    let table = haloflow::io::read_arrow(&dir.path().join("batched.arrow")).unwrap();
    let cols = Columns::new(&table.batches[0]);
    let ids: Vec<&str> = cols.str("prompt_id").unwrap().iter().map(|v| v.unwrap()).collect();
    assert_eq!(ids, ["p-once", "p-once", "p-tom", "p-tom"]);
    assert_eq!(cols.i64("sample_index").unwrap().values().to_vec(), [0, 1, 0, 1]);
    assert_eq!(cols.str("model").unwrap().value(0), "stories260K");
    assert_eq!(messages_at(cols.messages("prompt").unwrap(), 2).unwrap(), [Message::new("user", "Tom had a red ball and")]);
    let completions = cols.str("completion").unwrap();
    let reasons = cols.str("finish_reason").unwrap();
    for i in 0..4 {
        let text = completions.value(i);
        assert!(!["\n\n", "Lily", "park"].iter().any(|s| text.contains(s)), "stop strings are cut: {text:?}");
        assert!(["eos", "stop", "length"].contains(&reasons.value(i)));
    }
    // stories260K has no chat template: prompts are HH transcripts by default.
    assert_eq!(cols.i64("prompt_tokens").unwrap().value(0), 23, "BOS + \"\\n\\nHuman: Once upon a time\\n\\nAssistant:\"");
    assert!((0..4).all(|i| !completions.value(i).starts_with(' ')), "the space after `Assistant:` is not part of a reply");

    let summary_path = dir.path().join("batched.json");
    schema::validate_file(&schema::by_name(schema::JSON).unwrap(), &summary_path).unwrap();
    let summary: Value = serde_json::from_slice(&std::fs::read(&summary_path).unwrap()).unwrap();
    assert_eq!((summary["prompts"].as_u64(), summary["samples"].as_u64(), summary["skipped"].as_u64()), (Some(3), Some(4), Some(1)));
    assert_eq!(summary["skipped_examples"][0]["prompt_id"], "p-long");
    assert_eq!(summary["skipped_examples"][0]["reason"]["reason"], "too_long");
    let generated: i64 = cols.i64("completion_tokens").unwrap().values().iter().sum();
    assert_eq!(summary["tokens_generated"].as_i64(), Some(generated));
    let reasons_total: u64 = summary["finish_reasons"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(reasons_total, 4);
    assert!(summary["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(summary["options"]["stop"], serde_json::json!(["\n\n", "Lily", "park"]));
    assert_eq!(summary["device"], "cpu");

    succeeded(&sample(dir.path(), &prompts, &model, "single", &["--batch-size", "1", "--model-id", "stories260K"]));
    let single = haloflow::io::read_arrow(&dir.path().join("single.arrow")).unwrap();
    assert_eq!(single.batches, table.batches, "the same samples whatever the batch size");

    succeeded(&sample(dir.path(), &prompts, &model, "plain", &["--prompt-format", "plain"]));
    let plain = haloflow::io::read_arrow(&dir.path().join("plain.arrow")).unwrap();
    assert_eq!(Columns::new(&plain.batches[0]).i64("prompt_tokens").unwrap().value(0), 5, "plain: BOS + 4 tokens");
}

#[test]
fn bad_arguments_are_refused_and_help_has_an_example() {
    let help = Command::new(env!("CARGO_BIN_EXE_halo-sample")).arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("Example:") && text.contains("--max-new-tokens"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.arrow");
    write_prompts(&prompts, &[("p", "Once upon a time".into())]);
    let out = sample(dir.path(), &prompts, dir.path(), "bad", &["--top-p", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.path().join("bad.arrow").exists());
}
