//! The `halo-import` binary as the pipeline runner calls it: `--name value` arguments, the
//! `data` table valid against its schema, the summary's counts, and errors that write nothing.

#[allow(dead_code)]
#[path = "../src/test_util.rs"]
mod test_util;

use std::path::Path;
use std::process::{Command, Output};

use haloflow::schema;
use serde_json::Value;
use test_util::{shared_file, temp_file, HH_HELPFUL, MT_BENCH, OASST};

fn import(source: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_halo-import"))
        .arg("--source")
        .arg(source)
        .arg("--data")
        .arg(out.join("data.arrow"))
        .arg("--summary")
        .arg(out.join("summary.json"))
        .args(extra)
        .output()
        .expect("running halo-import")
}

/// Checks the run succeeded and its table matches `kind`; returns the summary.
fn succeeded(output: &Output, out: &Path, kind: &str) -> Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let rows = schema::validate_file(&schema::by_name(kind).unwrap(), &out.join("data.arrow")).unwrap();
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["rows_written"].as_u64(), rows);
    assert!(stderr.contains("imported"), "the summary is logged: {stderr}");
    summary
}

/// Checks the run failed with `message` on stderr and left no file behind.
fn failed(output: &Output, out: &Path, message: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(message), "expected {message:?} in: {stderr}");
    assert_eq!(std::fs::read_dir(out).unwrap().count(), 0, "nothing is written");
}

#[test]
fn help_shows_a_usage_example() {
    let output = Command::new(env!("CARGO_BIN_EXE_halo-import")).arg("--help").output().unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success());
    assert!(help.contains("Examples:") && help.contains("halo-import --source"), "{help}");
    for option in ["--format", "--kind", "--limit", "hh-rlhf", "mt-bench"] {
        assert!(help.contains(option), "{option} in {help}");
    }
}

#[test]
fn real_hh_rlhf_end_to_end_with_detection() {
    let Some(source) = shared_file(HH_HELPFUL) else { return };
    let source = source.as_path();
    let out = tempfile::tempdir().unwrap();
    let summary = succeeded(&import(source, out.path(), &[]), out.path(), schema::PAIRED);
    assert_eq!(summary["format"], "hh-rlhf");
    assert_eq!(summary["format_detected"], true);
    assert_eq!(summary["rows_read"], 2354);
    assert_eq!(summary["rows_written"], 2333);
    assert_eq!(summary["skipped_total"], 21);
    assert_eq!(summary["skipped"]["non_alternating_turns"], 15);
}

#[test]
fn real_oasst_with_limit() {
    let Some(source) = shared_file(OASST) else { return };
    let source = source.as_path();
    let out = tempfile::tempdir().unwrap();
    let summary = succeeded(
        &import(source, out.path(), &["--format", "oasst", "--limit", "5"]),
        out.path(),
        schema::PAIRED,
    );
    assert_eq!((summary["rows_written"].as_u64(), summary["limit"].as_u64()), (Some(5), Some(5)));
    assert_eq!(summary["format_detected"], false);
}

#[test]
fn real_mt_bench_needs_kind_prompts() {
    let Some(source) = shared_file(MT_BENCH) else { return };
    let source = source.as_path();
    let out = tempfile::tempdir().unwrap();
    failed(
        &import(source, out.path(), &[]),
        out.path(),
        "detected format mt-bench cannot produce kind paired",
    );
    let summary = succeeded(&import(source, out.path(), &["--kind", "prompts"]), out.path(), schema::PROMPTS);
    assert_eq!(summary["rows_written"], 80);
}

#[test]
fn trl_binary_rows() {
    let (_dir, source) = temp_file(
        "kto.jsonl",
        "{\"prompt\": \"q\", \"completion\": \"a\", \"label\": true}\n{\"prompt\": \"q\", \"completion\": \"b\", \"label\": false, \"weight\": 2}\n",
    );
    let out = tempfile::tempdir().unwrap();
    let summary = succeeded(&import(&source, out.path(), &["--kind", "binary"]), out.path(), schema::BINARY);
    assert_eq!((summary["format"].as_str(), summary["rows_written"].as_u64()), (Some("trl"), Some(2)));
}

#[test]
fn bad_line_names_file_line_and_field_and_writes_nothing() {
    let (_dir, source) = temp_file(
        "data.jsonl",
        "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": 17}\n",
    );
    let out = tempfile::tempdir().unwrap();
    failed(
        &import(&source, out.path(), &["--format", "trl"]),
        out.path(),
        "data.jsonl:2: field \"rejected\": expected a string or a list of {role, content} messages, found number",
    );
}

#[test]
fn empty_result_is_an_error() {
    let (_dir, source) =
        temp_file("same.jsonl", "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"a\"}\n");
    let out = tempfile::tempdir().unwrap();
    let expected = format!(
        "no rows imported from {}: 1 records read, 1 skipped as identical_replies (1)",
        source.display()
    );
    failed(&import(&source, out.path(), &[]), out.path(), &expected);
}
