//! Helpers of the halo-train tests: synthetic plans and pairs with a verifiable preference
//! (stories260K from ../shared), running halo-train, reading its metrics and policy.

#![allow(dead_code)] // each test file uses a part

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use haloflow::records::{paired_batch, plan_batch, prompt_id, BinaryRow, Message, PairedRow, PlanRow};

pub fn model_dir() -> Option<PathBuf> {
    haloflow::shared::path("models/stories260K")
}

pub const ANIMALS: [&str; 12] = ["cat", "dog", "bird", "fish", "frog", "bear", "duck", "cow", "pig", "fox", "owl", "bee"];
pub const NAMES: [&str; 8] = ["Lily", "Tom", "Sue", "Ben", "Amy", "Max", "Mia", "Sam"];

/// Prompt i, and its desirable ("happy") and undesirable ("sad") completions.
pub fn example(i: usize) -> (Vec<Message>, String, String) {
    let (animal, name) = (ANIMALS[i % ANIMALS.len()], NAMES[(i / ANIMALS.len()) % NAMES.len()]);
    let prompt = vec![Message::new("user", format!("{name} had a {animal}."))];
    (prompt, format!(" The {animal} was happy and they played."), format!(" The {animal} was sad and it cried."))
}

/// A plan of `batches` microbatches of 8 rows (4 desirable, 4 undesirable, distinct prompts).
pub fn write_plan(path: &Path, batches: usize, singleton_batch: bool) {
    write_plan_batches(path, &(0..batches).collect::<Vec<_>>(), singleton_batch);
}

/// A plan of the microbatches `batches` of [`write_plan`]'s plan, in that order (the first
/// of one row with `singleton_batch`).
pub fn write_plan_batches(path: &Path, batches: &[usize], singleton_batch: bool) {
    let mut rows = Vec::new();
    for (position, &b) in batches.iter().enumerate() {
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
            .take(if singleton_batch && position == 0 { 1 } else { 8 })
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

pub fn write_pairs(path: &Path, n: usize) {
    let rows: Vec<PairedRow> = (0..n)
        .map(|i| {
            let (prompt, good, bad) = example(i);
            PairedRow { prompt_id: prompt_id(&prompt), pair_id: format!("p{i}"), prompt, chosen: good, rejected: bad, score_chosen: None, score_rejected: None, source: None }
        })
        .collect();
    let batch = paired_batch(&rows).unwrap();
    haloflow::io::write_arrow(path, &batch.schema(), &[batch], Default::default()).unwrap();
}

pub struct Run {
    pub dir: PathBuf,
}

impl Run {
    pub fn metrics(&self) -> BTreeMap<String, Vec<Option<f64>>> {
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

    pub fn first_and_last(&self, name: &str) -> (f64, f64) {
        let values: Vec<f64> = self.metrics()[name].iter().flatten().copied().collect();
        (values[0], *values.last().unwrap())
    }
}

/// The halo-train command of run `name` under `dir` (outputs in `dir/name`).
pub fn command(dir: &Path, name: &str, data: &Path, model: &Path, extra: &[&str]) -> (Command, Run) {
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
    (cmd, Run { dir: out })
}

/// Runs halo-train (one process) with `env` added.
pub fn train(dir: &Path, name: &str, data: &Path, model: &Path, extra: &[&str], env: &[(&str, &str)]) -> (Output, Run) {
    let (mut cmd, run) = command(dir, name, data, model, extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().unwrap();
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    (output, run)
}

/// Reference log-probs of `plan` under `model` (halo-refcache on the CPU, prompt ≤ 32 and
/// sequence ≤ 64 tokens, as the tests train with, plus `extra` flags), written to
/// `dir/NAME.parquet`.
pub fn refcache(dir: &Path, name: &str, plan: &Path, model: &Path, extra: &[&str]) -> PathBuf {
    let refcache = Path::new(env!("CARGO_BIN_EXE_halo-train")).with_file_name("halo-refcache");
    assert!(refcache.is_file(), "build the workspace first: {} is missing", refcache.display());
    let out = dir.join(format!("{name}.parquet"));
    let status = Command::new(&refcache)
        .args(["--data", plan.to_str().unwrap(), "--model", model.to_str().unwrap(), "--logps", out.to_str().unwrap()])
        .args(["--summary", dir.join(format!("{name}.json")).to_str().unwrap(), "--max-prompt-length", "32", "--max-length", "64", "--device", "cpu"])
        .args(["--scratch", dir.join(format!("scratch-{name}")).to_str().unwrap()])
        .args(extra)
        .status()
        .unwrap();
    assert!(status.success(), "halo-refcache on {name} failed");
    out
}

/// Trains `args` on `plan` whole, then again killed by SIGKILL after 4 steps (`inspect` looks
/// at the work dir while killed) and resumed; asserts the rerun resumed and that every metric
/// but timing equals the whole run's, over step 0 and 10 steps. Returns (whole, resumed).
pub fn assert_resume_is_exact(dir: &Path, plan: &Path, model: &Path, args: &[&str], inspect: impl FnOnce()) -> (Run, Run) {
    let (whole, reference) = train(dir, "whole", plan, model, args, &[]);
    assert!(whole.status.success(), "{}", String::from_utf8_lossy(&whole.stderr));
    let (killed, _) = train(dir, "resumed", plan, model, args, &[("HALO_FAULT_AFTER_STEPS", "4")]);
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&killed.status), Some(9), "killed by SIGKILL");
    inspect();
    let (resumed, run) = train(dir, "resumed", plan, model, args, &[]);
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
    (reference, run)
}
