//! Sharded inference through the runner: `refcache` and `sample` on 2 ranks write exactly what
//! one process writes, and a 2-rank refcache killed halfway resumes, on one rank, to the same
//! file.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use haloflow::manifest::{Manifest, Status};

const PIPELINE: &str = r#"
[vars]
data = "DATA"
model = "MODEL"
ranks = 2

[stages.import]
uses = "import"
inputs = { source = "{vars.data}/hh-rlhf/helpful-base-test.jsonl.gz" }
params = { format = "hh-rlhf", limit = 60 }

[stages.unpair]
uses = "unpair"
inputs = { pairs = "import.data" }

[stages.resample]
uses = "resample"
inputs = { data = "unpair.binary" }
params = { microbatch_size = 4, seed = 1 }

[stages.refcache]
uses = "refcache"
ranks = "{vars.ranks}"
inputs = { data = "resample.plan", model = "{vars.model}" }
params = { max_prompt_length = 64, max_length = 128, chunk_size = 8, token_budget = 512, per_token = true, device = "cpu", threads = 1 }

[stages.prompts]
uses = "import"
inputs = { source = "{vars.data}/prompts/mt_bench_question.jsonl" }
params = { format = "mt-bench", kind = "prompts", limit = 13 }

[stages.sample]
uses = "sample"
ranks = "{vars.ranks}"
inputs = { prompts = "prompts.data", model = "{vars.model}" }
params = { max_new_tokens = 12, temperature = 0.8, top_p = 0.9, n = 2, seed = 3, batch_size = 4, device = "cpu", threads = 1 }

[stages.greedy]
uses = "sample"
ranks = "{vars.ranks}"
inputs = { prompts = "prompts.data", model = "{vars.model}" }
params = { max_new_tokens = 12, temperature = 0, batch_size = 4, device = "cpu", threads = 1 }
"#;

/// Writes the pipeline into `dir` (None when ../shared is missing); returns its path.
fn setup(dir: &Path) -> Option<String> {
    let (data, model) = (shared_data()?, haloflow::shared::path("models/stories260K")?);
    let text = PIPELINE.replace("DATA", data.to_str().unwrap()).replace("MODEL", model.to_str().unwrap());
    let path = dir.join("p.toml");
    std::fs::write(&path, text).unwrap();
    Some(path.to_string_lossy().into_owned())
}

fn output(m: &Manifest, stage: &str, name: &str) -> (String, PathBuf) {
    let o = &m.stage(stage).unwrap().outputs[name];
    (o.hash.clone(), o.path.clone())
}

fn summary(m: &Manifest, stage: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(output(m, stage, "summary").1).unwrap()).unwrap()
}

#[test]
fn two_ranks_write_what_one_process_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(p) = setup(tmp.path()) else { return };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    run_ok(&["run", &p, "--work-dir", one.to_str().unwrap(), "--set", "ranks=1"]);
    run_ok(&["run", &p, "--work-dir", two.to_str().unwrap()]);
    let (m1, m2) = (manifest(&one, "p"), manifest(&two, "p"));
    for (stage, name) in [("refcache", "logps"), ("sample", "samples"), ("greedy", "samples")] {
        assert_eq!(summary(&m1, stage)["ranks"], 1);
        assert_eq!(summary(&m2, stage)["ranks"], 2, "{stage} ran on 2 ranks");
        let entry = output(&m2, stage, name).1.parent().unwrap().to_path_buf();
        assert!(entry.join("stage.rank1.log").is_file(), "{stage}: rank 1 kept its log");
        assert_eq!(output(&m1, stage, name).0, output(&m2, stage, name).0, "{stage}.{name}: 2 ranks wrote other bytes than 1");
    }
    assert_eq!(summary(&m2, "refcache")["tokens_computed"], summary(&m1, "refcache")["tokens_computed"], "every token scored once");
    let rows = m2.stage("sample").unwrap().outputs["samples"].rows;
    assert_eq!(rows, Some(26), "13 prompts × 2 samples");

    // The rank count is not part of these stages' keys: their outputs do not depend on it.
    run_ok(&["run", &p, "--work-dir", two.to_str().unwrap(), "--set", "ranks=1"]);
    assert_eq!(stages_with(&two, "p", Status::Ran), set(&[]));
}

#[test]
fn a_killed_two_rank_refcache_resumes_on_one_rank_to_the_same_file() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(p) = setup(tmp.path()) else { return };
    let (whole, killed) = (tmp.path().join("whole"), tmp.path().join("killed"));
    let only = ["--only", "import", "--only", "unpair", "--only", "resample", "--only", "refcache"];
    let w = whole.to_str().unwrap();
    run_ok(&[&["run", &p, "--work-dir", w, "--set", "ranks=1"][..], &only].concat());

    let k = killed.to_str().unwrap();
    let out = halo(&[&["run", &p, "--work-dir", k][..], &only].concat()).env("HALO_FAULT_AFTER_CHUNKS", "2").output().unwrap();
    let msg = text(&out);
    assert!(!out.status.success(), "{msg}");
    assert!(msg.contains("stage `refcache` failed (rank") && msg.contains("killed by signal 9 (SIGKILL)"), "{msg}");
    assert!(!cached_stages(&killed).contains("refcache"), "no entry for the killed stage");

    run_ok(&[&["run", &p, "--work-dir", k, "--set", "ranks=1"][..], &only].concat());
    let (m1, m2) = (manifest(&whole, "p"), manifest(&killed, "p"));
    let resumed = summary(&m2, "refcache")["chunks_resumed"].as_u64().unwrap();
    assert!(resumed >= 2, "the chunks the 2 ranks finished are reused: {resumed}");
    assert_eq!(output(&m1, "refcache", "logps").0, output(&m2, "refcache", "logps").0, "the resumed output equals an uninterrupted run's");
}
