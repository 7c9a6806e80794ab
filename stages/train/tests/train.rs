//! halo-train on the real stories260K model with a verifiable synthetic preference: learning
//! shows on held-out prompts, the refcache and live references agree, a killed run resumes
//! with identical metrics, and bad input is refused clearly.

mod common;

use std::path::Path;
use std::process::Command;

use common::{model_dir, train, write_pairs, write_plan};

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
    let (out, run) = train(dir.path(), "nan", &plan, &model, &["--loss", "kto", "--reference", "live", "--lr", "1e30", "--save-every", "1", "--max-grad-norm", "0"], &[]);
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

/// Largest absolute difference between the weights of two saved policies.
fn max_weight_difference(a: &Path, b: &Path) -> f64 {
    use haloflow_ml::model::CausalLm;
    let (a, b) = (CausalLm::load(a, tch::Device::Cpu, tch::Kind::Float).unwrap(), CausalLm::load(b, tch::Device::Cpu, tch::Kind::Float).unwrap());
    let vb = b.vs.variables();
    a.vs.variables().iter().map(|(name, t)| (t - &vb[name]).abs().max().double_value(&[])).fold(0.0, f64::max)
}

/// Every loss reads the policy only through log-probs of forwards the tape records (KTO's KL
/// partners and the reference run without gradient; PPO's value head reads detached hidden
/// states), so every loss trains with checkpointing to the same weights.
#[test]
fn activation_checkpointing_trains_to_the_same_weights_with_every_loss() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 4, false);
    let pairs = dir.path().join("pairs.arrow");
    write_pairs(&pairs, 16);
    let binary = ["kto", "apo_zero", "ppo", "sft", "csft"].map(|l| (l, &plan));
    let paired = ["dpo", "cdpo", "ipo", "simpo", "slic", "orpo"].map(|l| (l, &pairs));
    for (loss, data) in binary.into_iter().chain(paired) {
        let steps = ["--loss", loss, "--lr", "3e-3", "--max-steps", "2", "--grad-accum", "2", "--microbatch-size", "4", "--reference", "live"];
        let (a, plain) = train(dir.path(), &format!("{loss}-plain"), data, &model, &steps, &[]);
        let (b, ckpt) = train(dir.path(), &format!("{loss}-ckpt"), data, &model, &[&steps[..], &["--checkpoint-activations=true"]].concat(), &[]);
        assert!(a.status.success() && b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
        let moved = max_weight_difference(&model, &plain.dir.join("policy"));
        let diff = max_weight_difference(&plain.dir.join("policy"), &ckpt.dir.join("policy"));
        eprintln!("{loss}: 2 steps moved the weights by up to {moved:.3e}; checkpointed vs plain differ by {diff:.3e}");
        assert!(moved > 1e-4, "{loss}: training did not move the weights, the comparison would prove nothing");
        assert!(diff <= 1e-5, "{loss}: checkpointed training differs by {diff}");
        let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(ckpt.dir.join("summary.json")).unwrap()).unwrap();
        assert_eq!(summary["checkpoint_activations"], true);
    }
}
