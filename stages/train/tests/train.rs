//! halo-train on the real stories260K model with a verifiable synthetic preference: learning
//! shows on held-out prompts, the refcache and live references agree, a killed run resumes
//! with identical metrics, and bad input is refused clearly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use haloflow::records::{paired_batch, plan_batch, prompt_id, BinaryRow, Message, PairedRow, PlanRow};

fn model_dir() -> Option<PathBuf> {
    haloflow::shared::path("models/stories260K")
}

const ANIMALS: [&str; 12] = ["cat", "dog", "bird", "fish", "frog", "bear", "duck", "cow", "pig", "fox", "owl", "bee"];
const NAMES: [&str; 8] = ["Lily", "Tom", "Sue", "Ben", "Amy", "Max", "Mia", "Sam"];

/// Prompt i, and its desirable ("happy") and undesirable ("sad") completions.
fn example(i: usize) -> (Vec<Message>, String, String) {
    let (animal, name) = (ANIMALS[i % ANIMALS.len()], NAMES[(i / ANIMALS.len()) % NAMES.len()]);
    let prompt = vec![Message::new("user", format!("{name} had a {animal}."))];
    (prompt, format!(" The {animal} was happy and they played."), format!(" The {animal} was sad and it cried."))
}

/// A plan of `batches` microbatches of 8 rows (4 desirable, 4 undesirable, distinct prompts).
fn write_plan(path: &Path, batches: usize, singleton_batch: bool) {
    let mut rows = Vec::new();
    for b in 0..batches {
        let members: Vec<BinaryRow> = (0..8)
            .map(|j| {
                let i = b * 8 + j;
                let (prompt, good, bad) = example(i);
                BinaryRow {
                    example_id: format!("e{i}"),
                    prompt_id: prompt_id(&prompt),
                    prompt,
                    completion: if j % 2 == 0 { good } else { bad },
                    label: j % 2 == 0,
                    weight: 1.0,
                    source: None,
                }
            })
            .take(if singleton_batch && b == 0 { 1 } else { 8 })
            .collect();
        let m = members.len();
        for k in 0..m {
            let partner = &members[(k + 1) % m];
            rows.push(PlanRow {
                example: members[k].clone(),
                batch: b as i64,
                kl_example_id: partner.example_id.clone(),
                kl_completion: partner.completion.clone(),
            });
        }
    }
    let batch = plan_batch(&rows).unwrap();
    let meta = BTreeMap::from([("haloflow.lambda_d", "1"), ("haloflow.lambda_u", "1")]);
    haloflow::io::write_arrow(path, &batch.schema(), &[batch], meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap();
}

fn write_pairs(path: &Path, n: usize) {
    let rows: Vec<PairedRow> = (0..n)
        .map(|i| {
            let (prompt, good, bad) = example(i);
            PairedRow { prompt_id: prompt_id(&prompt), pair_id: format!("p{i}"), prompt, chosen: good, rejected: bad, score_chosen: None, score_rejected: None, source: None }
        })
        .collect();
    let batch = paired_batch(&rows).unwrap();
    haloflow::io::write_arrow(path, &batch.schema(), &[batch], Default::default()).unwrap();
}

struct Run {
    dir: PathBuf,
}

impl Run {
    fn metrics(&self) -> BTreeMap<String, Vec<Option<f64>>> {
        let table = haloflow::io::read_parquet(&self.dir.join("metrics.parquet")).unwrap();
        let mut out = BTreeMap::new();
        for batch in &table.batches {
            for (field, column) in table.schema.fields().iter().zip(batch.columns()) {
                let values: Vec<Option<f64>> = match column.as_any().downcast_ref::<arrow_array::Float64Array>() {
                    Some(f) => f.iter().collect(),
                    None => {
                        let i = column.as_any().downcast_ref::<arrow_array::Int64Array>().unwrap();
                        i.iter().map(|v| v.map(|v| v as f64)).collect()
                    }
                };
                out.entry(field.name().clone()).or_insert_with(Vec::new).extend(values);
            }
        }
        out
    }

    fn first_and_last(&self, name: &str) -> (f64, f64) {
        let values: Vec<f64> = self.metrics()[name].iter().flatten().copied().collect();
        (values[0], *values.last().unwrap())
    }
}

fn train(dir: &Path, name: &str, data: &Path, model: &Path, extra: &[&str], env: &[(&str, &str)]) -> (Output, Run) {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_halo-train"));
    cmd.args(["--data", data.to_str().unwrap(), "--model", model.to_str().unwrap()])
        .args(["--policy", out.join("policy").to_str().unwrap(), "--metrics", out.join("metrics.parquet").to_str().unwrap()])
        .args(["--report", out.join("report").to_str().unwrap(), "--summary", out.join("summary.json").to_str().unwrap()])
        .args(["--device", "cpu", "--threads", "1", "--max-prompt-length", "32", "--max-length", "64"])
        .args(["--checkpoint-dir", out.join("ckpt").to_str().unwrap()])
        .args(extra)
        .env_remove("HALO_SCRATCH_DIR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    (output, Run { dir: out })
}

#[test]
fn kto_learns_the_preference_on_held_out_prompts() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 12, false);
    let (out, run) = train(dir.path(), "kto", &plan, &model, &["--loss", "kto", "--lr", "3e-3", "--epochs", "4", "--eval-batches", "2", "--eval-every", "10"], &[]);
    assert!(out.status.success());
    let (before, after) = run.first_and_last("eval/rewards/margins");
    eprintln!("held-out desirable − undesirable reward margin: {before:.4} → {after:.4}");
    assert!(after > before + 0.5, "held-out margin did not improve: {before} → {after}");
    assert!(run.dir.join("report/report.md").is_file() && run.dir.join("report/loss.svg").is_file());
    assert!(run.dir.join("policy/model.safetensors").is_file());
}

#[test]
fn dpo_learns_on_held_out_pairs() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.arrow");
    write_pairs(&pairs, 96);
    let (out, run) = train(dir.path(), "dpo", &pairs, &model, &["--loss", "dpo", "--lr", "3e-3", "--epochs", "3", "--eval-batches", "2"], &[]);
    assert!(out.status.success());
    let (acc_before, acc_after) = run.first_and_last("eval/rewards/accuracies");
    let (m_before, m_after) = run.first_and_last("eval/rewards/margins");
    eprintln!("held-out accuracy {acc_before:.3} → {acc_after:.3}, margin {m_before:.4} → {m_after:.4}");
    assert!(acc_after >= 0.9 && m_after > m_before + 0.5, "DPO did not learn");
}

#[test]
fn refcache_and_live_reference_agree_on_the_first_step() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 4, false);
    let refcache = Path::new(env!("CARGO_BIN_EXE_halo-train")).with_file_name("halo-refcache");
    assert!(refcache.is_file(), "build the workspace first: {} is missing", refcache.display());
    let ref_logps = dir.path().join("ref.parquet");
    let status = Command::new(&refcache)
        .args(["--data", plan.to_str().unwrap(), "--model", model.to_str().unwrap(), "--logps", ref_logps.to_str().unwrap()])
        .args(["--summary", dir.path().join("ref.json").to_str().unwrap(), "--max-prompt-length", "32", "--max-length", "64", "--device", "cpu"])
        .args(["--scratch", dir.path().join("scratch").to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let steps = ["--loss", "kto", "--lr", "1e-3", "--max-steps", "2"];
    let (a, cached) = train(dir.path(), "cache", &plan, &model, &[&steps[..], &["--ref-logps", ref_logps.to_str().unwrap()]].concat(), &[]);
    let (b, live) = train(dir.path(), "live", &plan, &model, &[&steps[..], &["--reference", "live"]].concat(), &[]);
    assert!(a.status.success() && b.status.success());
    let (x, y) = (cached.metrics()["loss"][0].unwrap(), live.metrics()["loss"][0].unwrap());
    assert!((x - y).abs() < 1e-5, "first-step loss: cache {x} vs live {y}");
    // A cache computed with other lengths is refused.
    let (c, _) = train(dir.path(), "mismatch", &plan, &model, &[&steps[..], &["--ref-logps", ref_logps.to_str().unwrap(), "--max-length", "48"]].concat(), &[]);
    let err = String::from_utf8_lossy(&c.stderr);
    assert!(!c.status.success() && err.contains("does not match") && err.contains("lengths differ"), "{err}");
}

#[test]
fn a_killed_run_resumes_with_identical_metrics() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 6, false);
    let args = ["--loss", "kto", "--lr", "2e-3", "--epochs", "2", "--save-every", "1", "--warmup-steps", "2", "--decay", "cosine", "--eval-batches", "1", "--eval-every", "3"];
    let (whole, reference) = train(dir.path(), "whole", &plan, &model, &args, &[]);
    assert!(whole.status.success());
    let (killed, _) = train(dir.path(), "resumed", &plan, &model, &args, &[("HALO_FAULT_AFTER_STEPS", "4")]);
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&killed.status), Some(9), "killed by SIGKILL");
    let (resumed, run) = train(dir.path(), "resumed", &plan, &model, &args, &[]);
    assert!(resumed.status.success());
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("resuming"));
    let (a, b) = (reference.metrics(), run.metrics());
    for (name, values) in &a {
        if ["seconds", "tokens_per_s", "examples_per_s"].contains(&name.as_str()) {
            continue;
        }
        assert_eq!(values, &b[name], "metric {name} differs after resuming");
    }
    assert_eq!(a["step"].len(), 11, "step 0 (eval) and 10 steps");
}

#[test]
fn bad_training_input_is_refused_clearly() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 3, true);
    let (out, _) = train(dir.path(), "one", &plan, &model, &["--loss", "kto", "--reference", "live"], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 2 rows"));
    let (out, _) = train(dir.path(), "dpo-on-plan", &plan, &model, &["--loss", "dpo"], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("learns from preference pairs"));
    // A learning rate that blows the model up stops the run at the step, naming its examples,
    // and keeps the last good checkpoint.
    write_plan(&plan, 4, false);
    let (out, run) = train(dir.path(), "nan", &plan, &model, &["--loss", "kto", "--reference", "live", "--lr", "1e6", "--save-every", "1", "--max-grad-norm", "0"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("at step") && err.contains("examples e"), "{err}");
    let kept: Vec<_> = std::fs::read_dir(run.dir.join("ckpt")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(kept.iter().any(|n| n.starts_with("step-")), "last good checkpoint kept: {kept:?}");
}

#[test]
fn ppo_trains_with_per_token_references_from_the_cache_or_live() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 4, false);
    let refcache = Path::new(env!("CARGO_BIN_EXE_halo-train")).with_file_name("halo-refcache");
    let ref_logps = dir.path().join("ref.parquet");
    let status = Command::new(&refcache)
        .args(["--data", plan.to_str().unwrap(), "--model", model.to_str().unwrap(), "--logps", ref_logps.to_str().unwrap()])
        .args(["--summary", dir.path().join("ref.json").to_str().unwrap(), "--max-prompt-length", "32", "--max-length", "64"])
        .args(["--device", "cpu", "--per-token", "true", "--scratch", dir.path().join("scratch").to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let steps = ["--loss", "ppo", "--lr", "1e-3", "--max-steps", "3", "--save-every", "1"];
    let (a, cached) = train(dir.path(), "cache", &plan, &model, &[&steps[..], &["--ref-logps", ref_logps.to_str().unwrap()]].concat(), &[]);
    let (b, live) = train(dir.path(), "live", &plan, &model, &[&steps[..], &["--reference", "live"]].concat(), &[]);
    assert!(a.status.success() && b.status.success());
    let (x, y) = (cached.metrics()["loss"][0].unwrap(), live.metrics()["loss"][0].unwrap());
    assert!((x - y).abs() < 1e-5, "first-step PPO loss: cache {x} vs live {y}");
    assert!(cached.metrics().contains_key("ppo/critic"));
    // A cache without per-token values is refused for PPO.
    let sums_only = dir.path().join("sums.parquet");
    assert!(Command::new(&refcache)
        .args(["--data", plan.to_str().unwrap(), "--model", model.to_str().unwrap(), "--logps", sums_only.to_str().unwrap()])
        .args(["--summary", dir.path().join("s.json").to_str().unwrap(), "--max-prompt-length", "32", "--max-length", "64", "--device", "cpu"])
        .args(["--scratch", dir.path().join("scratch2").to_str().unwrap()])
        .status()
        .unwrap()
        .success());
    let (c, _) = train(dir.path(), "no-tokens", &plan, &model, &[&steps[..], &["--ref-logps", sums_only.to_str().unwrap()]].concat(), &[]);
    assert!(String::from_utf8_lossy(&c.stderr).contains("per_token = true"));
}
