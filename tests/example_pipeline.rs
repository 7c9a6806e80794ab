//! The example pipeline over ../shared/data, run with the real binaries: caching, reruns of
//! exactly the affected stages, the Python plug-in stage, dry-run reasons, corruption.

mod common;

use common::*;
use haloflow::manifest::Status;

const ALL: &[&str] = &["import_hh", "import_oasst", "filter", "unpair", "unpair_oasst", "resample"];

fn example_args<'a>(cmd: &'a str, work: &'a str, data: &'a str, extra: &[&'a str]) -> Vec<String> {
    let pipeline = repo_root().join("pipelines/example.toml");
    let mut args = vec![cmd.to_string(), pipeline.to_string_lossy().into_owned(), "--work-dir".into(), work.into()];
    args.extend(["--set".to_string(), format!("data={data}")]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn halo_example(cmd: &str, work: &std::path::Path, data: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let args = example_args(cmd, work.to_str().unwrap(), data.to_str().unwrap(), extra);
    run(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>())
}

#[test]
fn caching_reruns_exactly_the_affected_stages() {
    let Some(data) = shared_data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");

    // First run executes every stage.
    let out = halo_example("run", &work, &data, &[]);
    assert!(out.status.success());
    assert_eq!(stages_with(&work, "example", Status::Ran), set(ALL));
    let first = manifest(&work, "example");
    assert!(text(&out).contains("stage") && text(&out).contains("rows"), "final table printed");

    // The plug-in stage really filtered, and its output passed the `paired` contract.
    let kept = &first.stage("filter").unwrap().outputs["kept"];
    let imported = first.stage("import_hh").unwrap().outputs["data"].rows.unwrap();
    assert!(kept.rows.unwrap() < imported, "filter dropped short pairs");
    let rows = haloflow::records::read_paired(&kept.path).unwrap();
    assert!(rows.iter().all(|r| r.chosen.chars().count() >= 20 && r.rejected.chars().count() >= 20 && r.chosen != r.rejected));

    // Second run executes nothing.
    assert!(halo_example("run", &work, &data, &[]).status.success());
    assert_eq!(stages_with(&work, "example", Status::Ran), set(&[]));
    assert_eq!(stages_with(&work, "example", Status::Cached), set(ALL));

    // Dry run explains a param change without running anything.
    let dry = text(&halo_example("run", &work, &data, &["--set", "min_chars=60", "--dry-run"]));
    assert!(dry.contains("would run  filter: params.min_chars 20 → 60"), "{dry}");
    assert!(dry.contains("cached     import_hh") && dry.contains("cached     unpair_oasst"), "{dry}");
    assert_eq!(stages_with(&work, "example", Status::Cached), set(ALL), "dry run changed nothing");

    // Changing one stage's param reruns exactly that stage and its descendants.
    assert!(halo_example("run", &work, &data, &["--set", "min_chars=60"]).status.success());
    assert_eq!(stages_with(&work, "example", Status::Ran), set(&["filter", "unpair", "resample"]));
    let second = manifest(&work, "example");
    assert_eq!(second.stage("unpair").unwrap().reason.as_deref(), Some("input pairs changed"));

    // status without --set takes the last run's overrides, so it agrees with what ran.
    let pipeline = repo_root().join("pipelines/example.toml");
    let status = text(&run(&["status", pipeline.to_str().unwrap(), "--work-dir", work.to_str().unwrap()]));
    assert!(status.contains(&format!("with the last run's overrides: --set data={} --set min_chars=60", data.display())), "{status}");
    assert!(status.contains("fresh  filter") && status.contains("fresh  resample") && !status.contains("stale"), "{status}");

    // Going back is a cache hit (content-addressed), and --force reruns one stage only: its
    // output is identical, so nothing downstream reruns.
    assert!(halo_example("run", &work, &data, &["--force", "unpair_oasst"]).status.success());
    assert_eq!(stages_with(&work, "example", Status::Ran), set(&["unpair_oasst"]));

    // --only runs a single stage; --from reruns a stage and its descendants.
    assert!(halo_example("run", &work, &data, &["--only", "resample", "--force", "resample"]).status.success());
    assert_eq!(stages_with(&work, "example", Status::Ran), set(&["resample"]));
    assert_eq!(stages_with(&work, "example", Status::NotRun).len(), ALL.len() - 1);
    assert!(halo_example("run", &work, &data, &["--from", "filter"]).status.success());
    assert_eq!(stages_with(&work, "example", Status::Ran), set(&["filter", "unpair", "resample"]));

    // status reports everything fresh; a new seed makes resample (only) stale.
    let status = text(&halo_example("status", &work, &data, &["--set", "seed=5"]));
    assert!(status.contains("stale  resample: params.seed 0 → 5"), "{status}");
    assert!(status.contains("fresh  unpair"), "{status}");
}

#[test]
fn a_corrupted_entry_is_detected_and_rebuilt() {
    let Some(data) = shared_data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    assert!(halo_example("run", &work, &data, &[]).status.success());
    let plan = manifest(&work, "example").stage("resample").unwrap().outputs["plan"].path.clone();

    // Same size, different content: found by hash before use, and rebuilt.
    let mut bytes = std::fs::read(&plan).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&plan, &bytes).unwrap();
    assert!(halo_example("run", &work, &data, &[]).status.success());
    let m = manifest(&work, "example");
    assert_eq!(stages_with(&work, "example", Status::Ran), set(&["resample"]));
    assert!(m.stage("resample").unwrap().reason.as_deref().unwrap().contains("corrupt"));

    // Truncation: `halo verify` reports it, removes the entry, exits 1; the next run rebuilds.
    let unpaired = m.stage("unpair").unwrap().outputs["binary"].path.clone();
    let len = std::fs::metadata(&unpaired).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&unpaired).unwrap().set_len(len / 2).unwrap();
    let verify = halo_example("verify", &work, &data, &[]);
    assert!(!verify.status.success());
    assert!(text(&verify).contains("1 corrupt"), "{}", text(&verify));
    assert!(halo_example("run", &work, &data, &[]).status.success());
    assert_eq!(stages_with(&work, "example", Status::Ran), set(&["unpair"]), "identical output: resample stays cached");
    assert!(halo_example("verify", &work, &data, &[]).status.success());

    // gc drops entries no lock file references (the corrupted-then-rebuilt ones are gone
    // already; an older min_chars run leaves some).
    assert!(halo_example("run", &work, &data, &["--set", "min_chars=60"]).status.success());
    let gc = text(&halo_example("gc", &work, &data, &[]));
    assert!(gc.contains("removed 3 cache entries"), "{gc}");
}

#[test]
fn the_ci_tiny_pipeline_trains_kto_and_judges_end_to_end() {
    let Some(data) = shared_data() else { return };
    for stage in ["halo-init", "halo-refcache", "halo-train", "halo-sample", "halo-judge"] {
        binary(stage);
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let pipeline = repo_root().join("pipelines/ci-tiny.toml");
    let tokenizer = data.join("../models/stories260K");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = vec!["run".into(), pipeline.to_string_lossy().into(), "--work-dir".into(), work.to_string_lossy().into()];
        a.extend(["--set".into(), format!("data={}", data.display()), "--set".into(), format!("tokenizer={}", tokenizer.display())]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run_args = args(&[]);
    run_ok(&run_args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let all = ["import", "unpair", "resample", "init", "refcache", "train", "import_mt", "sample_policy", "sample_init", "judge"];
    assert_eq!(stages_with(&work, "ci-tiny", Status::Ran), set(&all));
    let m = manifest(&work, "ci-tiny");
    let train = m.stage("train").unwrap();
    assert_eq!(train.outputs["metrics"].rows, Some(31), "step 0 evaluation + 30 steps");
    assert!(train.outputs["report"].path.join("report.md").is_file());
    assert!(train.outputs["policy"].path.join("model.safetensors").is_file());
    let judge: serde_json::Value = serde_json::from_slice(&std::fs::read(&m.stage("judge").unwrap().outputs["summary"].path).unwrap()).unwrap();
    eprintln!("judge summary: {judge}");
    let sampled = m.stage("sample_policy").unwrap().outputs["samples"].rows;
    assert!(sampled.unwrap_or(0) > 40, "most MT-Bench prompts fit the tiny model: {sampled:?}");
    assert_eq!(judge["n"].as_u64(), sampled, "every sampled prompt judged");
    let counts: u64 = ["wins", "losses", "ties", "invalid"].iter().map(|k| judge[k].as_u64().unwrap()).sum();
    assert_eq!(Some(counts), sampled, "the verdicts add up");
    // Every step streamed to the tracking dir: JSON lines, and TensorBoard event files that
    // TensorBoard's own reader reads back (step 0 evaluation + 30 steps).
    let tracking = work.join("tracking/ci-tiny").join(format!("train-{}", &train.key.as_ref().unwrap()[..8]));
    let lines = std::fs::read_to_string(tracking.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 31, "{}", tracking.display());
    let read = std::process::Command::new(repo_root().join(".venv/bin/python")).arg(repo_root().join("ci/read_tensorboard.py")).arg(&tracking).output().unwrap();
    assert!(read.status.success(), "reading the event files with TensorBoard (run ci/bootstrap.sh): {}", String::from_utf8_lossy(&read.stderr));
    let board: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    let losses: Vec<u64> = board["scalars"]["loss"].as_array().unwrap().iter().map(|p| p[0].as_u64().unwrap()).collect();
    assert_eq!(losses, (1..=30).collect::<Vec<u64>>(), "every step's loss");
    assert_eq!(board["scalars"]["eval/loss"].as_array().unwrap().len(), 4, "evaluations at steps 0, 10, 20, 30");
    assert_eq!((board["hparams"]["loss"].as_str(), board["hparams"]["beta"].as_f64()), (Some("kto"), Some(0.1)), "{board}");
    let metrics = haloflow::io::read_parquet(&train.outputs["metrics"].path).unwrap();
    let hparams: serde_json::Value = serde_json::from_str(&metrics.schema.metadata()["haloflow.hparams"]).unwrap();
    assert_eq!((hparams["loss"].as_str(), hparams["beta"].as_f64(), hparams["max_steps"].as_u64()), (Some("kto"), Some(0.1), Some(30)));
    let judge_board = work.join("tracking/ci-tiny").join(format!("judge-{}", &m.stage("judge").unwrap().key.as_ref().unwrap()[..8]));
    assert!(judge_board.join("metrics.jsonl").is_file());

    // Results out of the cache: the policy with its model card, the judgments as Parquet,
    // JSON lines and (flat columns only) CSV.
    let out = tmp.path().join("out");
    let export = |what: &str, dest: &str, extra: &[&str]| {
        let mut a = vec!["export".to_string(), pipeline.to_string_lossy().into(), what.into(), out.join(dest).to_string_lossy().into(), "--work-dir".into(), work.to_string_lossy().into()];
        a.extend(extra.iter().map(|s| s.to_string()));
        run(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>())
    };
    assert!(export("train.policy", "policy", &[]).status.success());
    assert!(out.join("policy/model.safetensors").is_file());
    let card = std::fs::read_to_string(out.join("policy/README.md")).unwrap();
    for needle in ["- kto", "| base model | `init.out` (pipeline stage) |", "| steps | 30 |", "| judge | trained vs base | rule"] {
        assert!(card.contains(needle), "model card lacks {needle:?}:\n{card}");
    }
    assert!(!export("train.policy", "policy", &[]).status.success(), "an existing destination needs --force");
    assert!(export("train.policy", "policy", &["--force"]).status.success());
    assert!(export("judge.judgments", "j.parquet", &[]).status.success());
    assert_eq!(haloflow::io::read_parquet(&out.join("j.parquet")).unwrap().num_rows(), haloflow::io::read_arrow(&m.stage("judge").unwrap().outputs["judgments"].path).unwrap().num_rows());
    assert!(export("judge.judgments", "j.jsonl", &[]).status.success());
    let rows = std::fs::read_to_string(out.join("j.jsonl")).unwrap();
    assert_eq!(rows.lines().count() as u64, m.stage("judge").unwrap().outputs["judgments"].rows.unwrap());
    let nested = text(&export("sample_policy.samples", "s.csv", &[]));
    assert!(nested.contains("column `prompt` is nested"), "{nested}");
    assert!(export("train.metrics", "metrics.csv", &[]).status.success());
    assert_eq!(std::fs::read_to_string(out.join("metrics.csv")).unwrap().lines().count(), 32, "header + 31 rows");

    // A second run reruns nothing.
    run_ok(&run_args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_eq!(stages_with(&work, "ci-tiny", Status::Ran), set(&[]));
    let dry = text(&run(&args(&["--dry-run"]).iter().map(|s| s.as_str()).collect::<Vec<_>>()));
    assert!(dry.contains("cached     train"), "{dry}");
}

/// The GGUF of the embedded default model (fetched by ci/fetch-smollm2.sh), or a visible skip;
/// `HALO_REQUIRE_SMOLLM2=1` (as in CI) makes its absence a failure.
fn smollm2_gguf() -> Option<std::path::PathBuf> {
    let path = repo_root().join(".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("HALO_REQUIRE_SMOLLM2").as_deref() == Ok("1") {
        panic!("{} is missing: run ci/fetch-smollm2.sh", path.display());
    }
    eprintln!("SKIPPED: {} missing (run ci/fetch-smollm2.sh)", path.display());
    None
}

#[test]
fn the_quickstart_pipeline_runs_on_a_small_slice() {
    let Some(_) = smollm2_gguf() else { return };
    for stage in ["halo-import-gguf", "halo-refcache", "halo-train", "halo-sample", "halo-judge"] {
        binary(stage);
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let pipeline = repo_root().join("pipelines/quickstart.toml");
    let args = [
        "run", pipeline.to_str().unwrap(), "--work-dir", work.to_str().unwrap(),
        "--set", "pairs_limit=120", "--set", "steps=2", "--set", "prompts_limit=40", "--set", "local_judge_limit=8",
    ];
    run_ok(&args);
    let all = ["model", "pairs", "unpair", "resample", "refcache", "train", "prompts", "prompts_local", "sample_base", "sample_kto",
        "sample_kto_local", "judge", "judge_local"];
    assert_eq!(stages_with(&work, "quickstart", Status::Ran), set(&all));
    let m = manifest(&work, "quickstart");
    assert_eq!(m.stage("train").unwrap().outputs["metrics"].rows, Some(3), "step 0 evaluation + 2 steps");
    let judge: serde_json::Value = serde_json::from_slice(&std::fs::read(&m.stage("judge").unwrap().outputs["summary"].path).unwrap()).unwrap();
    assert_eq!(judge["n"].as_u64(), Some(40), "every sampled held-out question judged");
    let local: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&m.stage("judge_local").unwrap().outputs["summary"].path).unwrap()).unwrap();
    assert_eq!(local["n"].as_u64(), Some(8), "the local judge judges the first local_judge_limit questions");
    run_ok(&args);
    assert_eq!(stages_with(&work, "quickstart", Status::Ran), set(&[]), "a rerun is instant");
}
