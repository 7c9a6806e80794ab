//! The response cache: its key holds the endpoint (another server is asked again), and under
//! `halo run` it lives in the work dir, where `halo gc` sees it.

#[allow(dead_code)]
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures::{assert_ok, write_samples, Run};
use common::server::{Config, FakeServer};

/// Writes `n` pairs where the candidate's output says GOOD and the baseline's BAD.
fn write_inputs(dir: &Path, n: usize) {
    let side = |word: &str| -> Vec<(String, String)> { (0..n).map(|i| (format!("Q{i}?"), format!("{word} {i}"))).collect() };
    write_samples(&dir.join("candidate.arrow"), "kto", &side("GOOD"));
    write_samples(&dir.join("baseline.arrow"), "base", &side("BAD"));
}

fn judge_args(run: &Run, server: &FakeServer, out: &str) -> Vec<String> {
    let mut args = run.io_args(out);
    args.extend(["--model", "fake-judge", "--template", "mt-bench", "--base-url", &server.base_url()].map(String::from));
    args
}

#[test]
fn another_endpoint_is_asked_again_not_served_from_the_cache() {
    let (first, second) = (FakeServer::start(Config::default()), FakeServer::start(Config { invert: true, ..Config::default() }));
    let run = Run::new();
    write_inputs(run.dir.path(), 4);
    assert_ok(&run.judge(&judge_args(&run, &first, "first"), &[]));
    assert_eq!(first.stats.total(), 8);
    assert_eq!(run.summary("first")["wins"], 4);

    // Same cache dir, same model name, same everything but the URL: the other judge must be
    // asked, and its (opposite) verdicts reported.
    assert_ok(&run.judge(&judge_args(&run, &second, "second"), &[]));
    assert_eq!(second.stats.total(), 8, "the second server was asked every request");
    let s = run.summary("second");
    assert_eq!((s["wins"].as_u64(), s["losses"].as_u64()), (Some(0), Some(4)), "{s:#}");

    // Back to the first server: all its answers are still cached.
    assert_ok(&run.judge(&judge_args(&run, &first, "again"), &[]));
    assert_eq!(first.stats.total(), 8, "no new request");
    assert_eq!(run.summary("again")["wins"], 4);
}

/// The `halo` runner binary built beside `halo-judge`.
fn halo() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_halo-judge")).with_file_name("halo");
    assert!(path.is_file(), "{} is not built: run `cargo build --release -p haloflow` first", path.display());
    path
}

/// Every file under `dir`, relative to it.
fn files(dir: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                found.insert(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    found
}

#[test]
fn under_halo_run_the_answers_live_in_the_work_dir_and_gc_removes_them() {
    let server = FakeServer::start(Config::default());
    let (pipeline_dir, work_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_inputs(pipeline_dir.path(), 3);
    let toml = format!(
        "[stages.judge]\nuses = \"judge\"\ninputs = {{ candidate = \"candidate.arrow\", baseline = \"baseline.arrow\" }}\n\
         params = {{ backend = \"openai\", model = \"fake-judge\", base_url = \"{}\", template = \"mt-bench\" }}\n",
        server.base_url()
    );
    std::fs::write(pipeline_dir.path().join("p.toml"), toml).unwrap();
    let before = files(pipeline_dir.path());
    let halo = |command: &str| {
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_halo-judge")).parent().unwrap();
        let output = Command::new(halo())
            .args([command, "p.toml", "--work-dir"])
            .arg(work_dir.path())
            .current_dir(pipeline_dir.path())
            .env("HALO_BIN_DIR", bin_dir)
            .env_remove("OPENAI_API_KEY")
            .output()
            .unwrap();
        assert_ok(&output);
        output
    };
    halo("run");
    assert_eq!(server.stats.total(), 6);
    assert_eq!(files(pipeline_dir.path()), before, "nothing was written beside the pipeline file");
    let answers = work_dir.path().join("stage-cache/judge/answers.jsonl");
    assert_eq!(std::fs::read_to_string(&answers).unwrap().lines().count(), 6, "the answers are in the work dir");

    let output = halo("gc");
    assert!(!answers.exists(), "gc removes the judge's answers");
    assert!(String::from_utf8_lossy(&output.stdout).contains("stage-cache"), "gc says so");
    assert!(work_dir.path().join("p.lock.json").exists());
}
