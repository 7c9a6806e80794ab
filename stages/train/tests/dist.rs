//! Data-parallel halo-train: two ranks over Gloo on CPU (the halo-train binary spawned twice
//! with torchrun's variables) against one process accumulating the same microbatches, on
//! stories260K from ../shared.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use common::{command, model_dir, train, write_pairs, write_plan, write_plan_batches, Run};
use tch::{Kind, Tensor};

/// Metrics that measure time or how the forward passes were batched (a rank with one
/// microbatch shares prompts with its KL partners), not training.
const TIMING: [&str; 8] = [
    "seconds",
    "tokens_per_s",
    "examples_per_s",
    "tokens_computed",
    "forward_tokens_computed",
    "padded_tokens_computed",
    "prefix_sharing_saving",
    "padding_waste",
];

/// Runs `name` as two ranks; `env_of(rank)` adds variables to a rank. Returns both outputs
/// (rank 0 first), the run, and the seconds until the last rank exited.
fn train_2_ranks(dir: &Path, name: &str, data: &Path, model: &Path, extra: &[&str], env_of: impl Fn(usize) -> Vec<(&'static str, String)>) -> (Vec<Output>, Run, f64) {
    train_ranks_with(2, dir, name, data, model, extra, env_of, |_| Vec::new())
}

/// [`train_2_ranks`] on `world` ranks, with `args_of(rank)` appended to a rank's arguments.
#[allow(clippy::too_many_arguments)]
fn train_ranks_with(
    world: usize,
    dir: &Path,
    name: &str,
    data: &Path,
    model: &Path,
    extra: &[&str],
    env_of: impl Fn(usize) -> Vec<(&'static str, String)>,
    args_of: impl Fn(usize) -> Vec<String>,
) -> (Vec<Output>, Run, f64) {
    let port = haloflow::runner::free_port().unwrap().to_string();
    let started = Instant::now();
    let mut children = Vec::new();
    let mut run = None;
    for rank in 0..world {
        let (mut cmd, r) = command(dir, name, data, model, extra);
        cmd.env("WORLD_SIZE", world.to_string()).env("RANK", rank.to_string()).env("LOCAL_RANK", rank.to_string());
        cmd.env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", &port);
        for (k, v) in env_of(rank) {
            cmd.env(k, v);
        }
        cmd.args(args_of(rank));
        children.push(cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap());
        run = Some(r);
    }
    let outputs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let seconds = started.elapsed().as_secs_f64();
    for (rank, o) in outputs.iter().enumerate() {
        eprintln!("--- rank {rank} ({}):\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    }
    (outputs, run.unwrap(), seconds)
}

fn no_env(_: usize) -> Vec<(&'static str, String)> {
    Vec::new()
}

/// The trained tensors of a run's policy: its full weights, or its LoRA adapter.
fn policy(run: &Run) -> BTreeMap<String, Tensor> {
    let full = run.dir.join("policy/model.safetensors");
    let file = if full.is_file() { full } else { run.dir.join("policy/adapter_model.safetensors") };
    Tensor::read_safetensors(file).unwrap().into_iter().collect()
}

/// The largest absolute difference between two policies' weights.
fn max_weight_diff(a: &Run, b: &Run) -> f64 {
    let (a, b) = (policy(a), policy(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter().map(|(k, t)| (t.to_kind(Kind::Double) - b[k].to_kind(Kind::Double)).abs().max().double_value(&[])).fold(0.0, f64::max)
}

/// The largest difference between two runs' metrics (timing left out), relative to the
/// metric's size where it exceeds 1 (summed log-probs of ~-100 carry f32 rounding of ~1e-5);
/// both must have the same metrics and steps.
fn max_metric_diff(a: &Run, b: &Run) -> f64 {
    let (a, b) = (a.metrics(), b.metrics());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst = 0.0f64;
    for (name, xs) in a.iter().filter(|(n, _)| !TIMING.contains(&n.as_str())) {
        assert_eq!(xs.len(), b[name].len(), "{name}: step counts differ");
        for (x, y) in xs.iter().zip(&b[name]) {
            match (x, y) {
                (Some(x), Some(y)) => worst = worst.max((x - y).abs() / x.abs().max(1.0)),
                (None, None) => {}
                _ => panic!("{name}: {x:?} vs {y:?}"),
            }
        }
    }
    worst
}

fn seconds_per_step(run: &Run) -> f64 {
    let s: Vec<f64> = run.metrics()["seconds"].iter().flatten().copied().collect();
    s.iter().sum::<f64>() / s.len() as f64
}

/// 2 ranks (DDP, ZeRO-1 and ZeRO-2) against 1 process with grad_accum 2 on the same data.
fn two_ranks_equal_one_process(data: &Path, args: &[&str], what: &str) {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (one, single) = train(dir.path(), "one", data, &model, &[args, &["--grad-accum", "2"]].concat(), &[]);
    assert!(one.status.success());
    let (outs, ddp, _) = train_2_ranks(dir.path(), "ddp", data, &model, args, no_env);
    assert!(outs.iter().all(|o| o.status.success()));
    // ZeRO-1 in windows of 4 KiB (dozens on stories260K), reduce-scattered during the backward
    // pass, and after it.
    let zero_args = [args, &["--shard-optimizer", "--grad-bucket-mb", "0.004"]].concat();
    let (outs, zero, _) = train_2_ranks(dir.path(), "zero", data, &model, &zero_args, no_env);
    assert!(outs.iter().all(|o| o.status.success()));
    let (outs, zero_after, _) = train_2_ranks(dir.path(), "zero-after", data, &model, &[&zero_args[..], &["--overlap-grad-sync=false"]].concat(), no_env);
    assert!(outs.iter().all(|o| o.status.success()));
    let (outs, zero2, _) = train_2_ranks(dir.path(), "zero2", data, &model, &[args, &["--shard-gradients", "--grad-bucket-mb", "0.004"]].concat(), no_env);
    assert!(outs.iter().all(|o| o.status.success()));
    let steps = single.metrics()["loss"].len();
    assert!(steps >= 3, "{steps} steps");
    let (dm, dw) = (max_metric_diff(&single, &ddp), max_weight_diff(&single, &ddp));
    let (zm, zw) = (max_metric_diff(&ddp, &zero), max_weight_diff(&ddp, &zero));
    let (am, aw) = (max_metric_diff(&zero_after, &zero), max_weight_diff(&zero_after, &zero));
    let (gm, gw) = (max_metric_diff(&ddp, &zero2), max_weight_diff(&ddp, &zero2));
    let sync = grad_sync(&zero);
    eprintln!(
        "{what}, {steps} steps: 2 ranks vs 1 process with grad_accum 2: max |Δ metric| {dm:.3e}, max |Δ weight| {dw:.3e}; ZeRO-1 vs DDP: {zm:.3e}, {zw:.3e}; ZeRO-1 overlapped vs after backward: {am:.3e}, {aw:.3e} (windows {sync}); ZeRO-2 vs DDP: {gm:.3e}, {gw:.3e}; s/step 1 process {:.3}, DDP {:.3}, ZeRO-1 {:.3}",
        seconds_per_step(&single),
        seconds_per_step(&ddp),
        seconds_per_step(&zero)
    );
    assert!(dm < 1e-5 && dw < 1e-5, "DDP differs from one process: metrics {dm}, weights {dw}");
    assert!(zm < 1e-5 && zw < 1e-5, "ZeRO-1 differs from DDP: metrics {zm}, weights {zw}");
    assert!(am < 1e-5 && aw < 1e-5, "ZeRO-1 overlapped differs from ZeRO-1 after backward: metrics {am}, weights {aw}");
    assert!(gm < 1e-5 && gw < 1e-5, "ZeRO-2 differs from DDP: metrics {gm}, weights {gw}");
    // ZeRO-2 dropped every gradient once its windows were copied; ZeRO-1 keeps them all.
    assert_eq!(grad_sync(&zero2)["gradients_held_after_sync"].as_u64(), Some(0), "{}", grad_sync(&zero2));
    assert!(sync["gradients_held_after_sync"].as_u64().unwrap() > 0, "{sync}");
    gathers_run_into_the_next_forward(&zero2);
    assert!(sync["buckets_during_backward"].as_u64().unwrap() > 0, "no ZeRO-1 window was reduce-scattered during backward: {sync}");
    assert_eq!(grad_sync(&zero_after)["buckets_during_backward"].as_u64(), Some(0));
    gathers_run_into_the_next_forward(&zero);
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(ddp.dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!((summary["ranks"].as_u64(), summary["microbatches_per_step"].as_u64()), (Some(2), Some(2)));
}

#[test]
fn ddp_and_zero1_kto_equal_one_process_accumulating_the_same_microbatches() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 8, false);
    two_ranks_equal_one_process(&plan, &["--loss", "kto", "--reference", "live", "--lr", "2e-3", "--max-steps", "3", "--eval-batches", "2"], "KTO");
}

#[test]
fn ddp_and_zero1_dpo_equal_one_process_accumulating_the_same_microbatches() {
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.arrow");
    write_pairs(&pairs, 32);
    two_ranks_equal_one_process(&pairs, &["--loss", "dpo", "--reference", "live", "--lr", "2e-3", "--microbatch-size", "4", "--max-steps", "3"], "DPO");
}

#[test]
fn ddp_and_zero1_lora_equal_one_process_accumulating_the_same_microbatches() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 8, false);
    let lora = r#"{"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]}"#;
    two_ranks_equal_one_process(&plan, &["--loss", "kto", "--reference", "live", "--lr", "1e-2", "--max-steps", "3", "--eval-batches", "2", "--lora", lora], "KTO + LoRA");
}

/// ZeRO-1 on 3 ranks, whose windows of 4 KiB do not split evenly (341 elements per rank, the
/// last window padded), equals one process accumulating the same 3 microbatches a step.
#[test]
fn zero1_on_three_ranks_equals_one_process() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 9, false);
    let args = ["--loss", "kto", "--reference", "live", "--lr", "2e-3", "--max-steps", "3", "--eval-batches", "0"];
    let (one, single) = train(dir.path(), "one", &plan, &model, &[&args[..], &["--grad-accum", "3"]].concat(), &[]);
    assert!(one.status.success());
    let zero_args = [&args[..], &["--shard-optimizer", "--grad-bucket-mb", "0.004"]].concat();
    let (outs, zero, _) = train_ranks_with(3, dir.path(), "zero", &plan, &model, &zero_args, no_env, |_| Vec::new());
    assert!(outs.iter().all(|o| o.status.success()));
    assert_eq!(single.metrics()["loss"].len(), 3);
    let (zm, zw) = (max_metric_diff(&single, &zero), max_weight_diff(&single, &zero));
    eprintln!("ZeRO-1 on 3 ranks vs 1 process with grad_accum 3: max |Δ metric| {zm:.3e}, max |Δ weight| {zw:.3e} (windows {})", grad_sync(&zero));
    assert!(zm < 1e-5 && zw < 1e-5, "metrics {zm}, weights {zw}");
}

/// Without gradient sync each rank would train on its own share alone: the 2-rank policy
/// must differ from one process trained on rank 0's share (microbatches 0, 2, 4) as much as
/// it equals the one trained on both shares.
#[test]
fn two_ranks_learn_from_both_shares() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (plan, share0) = (dir.path().join("plan.arrow"), dir.path().join("share0.arrow"));
    write_plan(&plan, 6, false);
    write_plan_batches(&share0, &[0, 2, 4], false);
    let args = ["--loss", "kto", "--reference", "live", "--lr", "2e-3", "--max-steps", "3"];
    let (outs, ddp, _) = train_2_ranks(dir.path(), "ddp", &plan, &model, &args, no_env);
    assert!(outs.iter().all(|o| o.status.success()));
    let (one, rank0_alone) = train(dir.path(), "share0", &share0, &model, &args, &[]);
    assert!(one.status.success());
    let (both, accumulated) = train(dir.path(), "both", &plan, &model, &[&args[..], &["--grad-accum", "2"]].concat(), &[]);
    assert!(both.status.success());
    let (apart, together) = (max_weight_diff(&ddp, &rank0_alone), max_weight_diff(&ddp, &accumulated));
    eprintln!("2-rank policy vs rank 0's share alone: max |Δ weight| {apart:.3e}; vs both shares accumulated: {together:.3e}");
    assert!(apart > 1e-3 && together < 1e-5, "apart {apart}, together {together}");
}

/// Rank 1 is SIGKILLed after step 2: rank 0 fails within the timeout naming it and writes no
/// output; the rerun resumes from the step-2 checkpoint and ends as an uninterrupted run,
/// although it sums the gradients after the backward pass (`--overlap-grad-sync=false`: not
/// part of the run's id).
#[test]
fn a_killed_rank_stops_the_run_and_the_rerun_resumes() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 8, false);
    let args = ["--loss", "kto", "--reference", "live", "--lr", "2e-3", "--max-steps", "4", "--save-every", "1", "--dist-timeout-s", "60"];
    let (outs, whole, _) = train_2_ranks(dir.path(), "whole", &plan, &model, &args, no_env);
    assert!(outs.iter().all(|o| o.status.success()));
    let fault = |rank: usize| if rank == 1 { vec![("HALO_FAULT_AFTER_STEPS", "2".to_string())] } else { Vec::new() };
    let (outs, run, seconds) = train_2_ranks(dir.path(), "resumed", &plan, &model, &args, fault);
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&outs[1].status), Some(9), "rank 1 killed by SIGKILL");
    let err = String::from_utf8_lossy(&outs[0].stderr);
    eprintln!("rank 0 exited {seconds:.1} s after the start");
    assert!(!outs[0].status.success() && err.contains("lost rank(s) 1") && err.contains("on rank 0 of 2"), "{err}");
    assert!(seconds < 60.0);
    assert!(!run.dir.join("policy").exists() && !run.dir.join("metrics.parquet").exists(), "no output after a failure");
    // Rank 1 looking into another checkpoint directory would start over: refused.
    let elsewhere = dir.path().join("elsewhere").to_str().unwrap().to_string();
    let other_dir = |rank: usize| if rank == 1 { vec!["--checkpoint-dir".to_string(), elsewhere.clone()] } else { Vec::new() };
    let (outs, _, _) = train_ranks_with(2, dir.path(), "resumed", &plan, &model, &args, no_env, other_dir);
    for o in &outs {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("the ranks disagree on the checkpoint step to resume from: from 0 to 2"), "{err}");
    }
    let (outs, run, _) = train_2_ranks(dir.path(), "resumed", &plan, &model, &[&args[..], &["--overlap-grad-sync=false"]].concat(), no_env);
    assert!(outs.iter().all(|o| o.status.success()));
    assert!(String::from_utf8_lossy(&outs[0].stderr).contains("resuming"));
    let (dm, dw) = (max_metric_diff(&whole, &run), max_weight_diff(&whole, &run));
    eprintln!("resumed vs uninterrupted 2-rank run: max |Δ metric| {dm:.3e}, max |Δ weight| {dw:.3e}");
    assert!(dm < 1e-12 && dw == 0.0, "resumed run differs: metrics {dm}, weights {dw}");
}

/// With ZeRO-1, rank 1 is SIGKILLed before its update of step 2 starts the all-gathers that
/// rank 0's next forward waits for (DPO: no collective comes between that forward and the
/// step's backward): rank 0's forward finds the lost rank while it waits, and rank 0 fails
/// within the timeout with that error (not with what its stale weights computed), writing no
/// output.
#[test]
fn a_rank_killed_while_zero1_gathers_stops_the_run() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pairs = dir.path().join("pairs.arrow");
    write_pairs(&pairs, 32);
    let args = ["--loss", "dpo", "--reference", "live", "--lr", "2e-3", "--max-steps", "4", "--microbatch-size", "4", "--dist-timeout-s", "60", "--shard-optimizer", "--grad-bucket-mb", "0.004"];
    let fault = |rank: usize| if rank == 1 { vec![("HALO_FAULT_BEFORE_UPDATE", "2".to_string())] } else { Vec::new() };
    let (outs, run, seconds) = train_2_ranks(dir.path(), "killed", &pairs, &model, &args, fault);
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&outs[1].status), Some(9), "rank 1 killed by SIGKILL");
    let err = String::from_utf8_lossy(&outs[0].stderr);
    eprintln!("rank 0 exited {seconds:.1} s after the start: {}", err.lines().filter(|l| l.contains("lost rank")).collect::<Vec<_>>().join(" | "));
    assert!(!outs[0].status.success() && err.contains("lost rank(s) 1") && err.contains("on rank 0 of 2"), "{err}");
    assert!(err.contains("all-gathering the updated weights during the forward pass") && err.contains("`all_gather_into` failed"), "{err}");
    assert!(seconds < 60.0);
    assert!(!run.dir.join("policy").exists() && !run.dir.join("metrics.parquet").exists(), "no output after a failure");
}

/// A ZeRO-1 checkpoint written by 2 ranks is re-sliced by a single process with the same
/// global batch (grad_accum 2), which ends as the uninterrupted 2-rank run.
#[test]
fn zero1_checkpoints_resume_on_another_number_of_ranks() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 8, false);
    let args = ["--loss", "kto", "--reference", "live", "--lr", "2e-3", "--max-steps", "4", "--save-every", "1", "--shard-optimizer"];
    let (outs, whole, _) = train_2_ranks(dir.path(), "whole", &plan, &model, &args, no_env);
    assert!(outs.iter().all(|o| o.status.success()));
    let fault = |_: usize| vec![("HALO_FAULT_AFTER_STEPS", "2".to_string())];
    let (outs, _, _) = train_2_ranks(dir.path(), "resumed", &plan, &model, &args, fault);
    assert!(outs.iter().all(|o| !o.status.success()));
    let (one, run) = train(dir.path(), "resumed", &plan, &model, &[&args[..], &["--grad-accum", "2"]].concat(), &[]);
    assert!(one.status.success() && String::from_utf8_lossy(&one.stderr).contains("resuming"));
    let (dm, dw) = (max_metric_diff(&whole, &run), max_weight_diff(&whole, &run));
    eprintln!("ZeRO-1 2 ranks → resumed on 1: max |Δ metric| {dm:.3e}, max |Δ weight| {dw:.3e}");
    assert!(dm < 1e-5 && dw < 1e-5, "metrics {dm}, weights {dw}");
}

#[test]
fn more_ranks_than_microbatches_is_refused() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 3, false);
    let (outs, _, _) = train_2_ranks(dir.path(), "few", &plan, &model, &["--loss", "kto", "--reference", "live", "--grad-accum", "2", "--eval-batches", "0"], no_env);
    for o in &outs {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("fewer than grad_accum × WORLD_SIZE = 2 × 2"), "{err}");
    }
}

/// Every loss trains on 2 ranks and equals one process accumulating the same microbatches.
#[test]
fn every_loss_trains_on_two_ranks() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (plan, pairs) = (dir.path().join("plan.arrow"), dir.path().join("pairs.arrow"));
    write_plan(&plan, 4, false);
    write_pairs(&pairs, 16);
    let binary = ["kto", "apo_zero", "ppo", "sft", "csft"];
    let paired = ["dpo", "cdpo", "ipo", "simpo", "slic", "orpo"];
    for loss in binary.iter().chain(&paired) {
        let data = if binary.contains(loss) { &plan } else { &pairs };
        let args = ["--loss", loss, "--reference", "live", "--lr", "2e-3", "--max-steps", "2", "--microbatch-size", "4"];
        let (outs, ddp, _) = train_2_ranks(dir.path(), &format!("{loss}-ddp"), data, &model, &args, no_env);
        assert!(outs.iter().all(|o| o.status.success()), "{loss} failed on 2 ranks");
        let (one, single) = train(dir.path(), &format!("{loss}-one"), data, &model, &[&args[..], &["--grad-accum", "2"]].concat(), &[]);
        assert!(one.status.success());
        let (dm, dw) = (max_metric_diff(&single, &ddp), max_weight_diff(&single, &ddp));
        eprintln!("{loss}: 2 ranks vs 1 process: max |Δ metric| {dm:.3e}, max |Δ weight| {dw:.3e}");
        assert!(dm < 1e-5 && dw < 1e-5, "{loss}: metrics {dm}, weights {dw}");
    }
}

#[test]
fn nccl_without_cuda_is_refused() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 4, false);
    let env = [("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")];
    let (out, run) = train(dir.path(), "nccl", &plan, &model, &["--loss", "kto", "--reference", "live", "--dist-backend", "nccl"], &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("the nccl backend needs a CUDA device"), "{err}");
    assert!(!run.dir.join("policy").exists());
}

/// Activation checkpointing under DDP: the layers' gradients, recomputed after the loss's
/// backward, are all-reduced after the walk-back, so 2 checkpointing ranks equal one plain
/// process accumulating the same microbatches.
#[test]
fn ddp_with_activation_checkpointing_equals_one_plain_process() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 6, false);
    let args = ["--loss", "kto", "--reference", "live", "--lr", "2e-3", "--max-steps", "3"];
    let (one, single) = train(dir.path(), "one", &plan, &model, &[&args[..], &["--grad-accum", "2"]].concat(), &[]);
    assert!(one.status.success());
    let (outs, ddp, _) = train_2_ranks(dir.path(), "ddp-ckpt", &plan, &model, &[&args[..], &["--checkpoint-activations=true"]].concat(), no_env);
    assert!(outs.iter().all(|o| o.status.success()));
    let (dm, dw) = (max_metric_diff(&single, &ddp), max_weight_diff(&single, &ddp));
    eprintln!("2 checkpointing ranks vs 1 plain process with grad_accum 2: max |Δ metric| {dm:.3e}, max |Δ weight| {dw:.3e}");
    assert!(dm < 1e-5 && dw < 1e-5, "checkpointed DDP differs: metrics {dm}, weights {dw}");
}

/// Evaluation split over the ranks: of 3 held-out microbatches rank 0 evaluates 2 and rank 1
/// one, and their sums make the eval metrics of one process evaluating all 3 (KTO: each
/// microbatch's own reference point, not one pooled over the ranks' microbatches).
#[test]
fn evaluation_split_over_two_ranks_equals_one_process() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 7, false);
    let args = ["--loss", "kto", "--reference", "live", "--lr", "2e-3", "--max-steps", "2", "--eval-batches", "3", "--eval-every", "1"];
    let (one, single) = train(dir.path(), "one", &plan, &model, &[&args[..], &["--grad-accum", "2"]].concat(), &[]);
    assert!(one.status.success());
    let debug = |_| vec![("RUST_LOG", "halo_train=debug".to_string())];
    let (outs, two, _) = train_2_ranks(dir.path(), "two", &plan, &model, &args, debug);
    assert!(outs.iter().all(|o| o.status.success()));
    for (rank, out) in outs.iter().enumerate() {
        let err = String::from_utf8_lossy(&out.stderr);
        let share = format!("rank={rank} microbatches={} of=3", 2 - rank);
        assert_eq!(err.matches(&share).count(), 3, "rank {rank} should evaluate {share} at steps 0, 1 and 2:\n{err}");
    }
    let (a, b) = (single.metrics(), two.metrics());
    let eval: Vec<&String> = a.keys().filter(|k| k.starts_with("eval/")).collect();
    assert!(eval.len() >= 4 && eval.iter().any(|k| *k == "eval/loss"), "{eval:?}");
    let mut worst = 0.0f64;
    for name in eval {
        let (xs, ys) = (&a[name], &b[name]);
        assert_eq!(xs.iter().flatten().count(), 3, "{name}: an evaluation at steps 0, 1 and 2");
        for (x, y) in xs.iter().zip(ys) {
            match (x, y) {
                (Some(x), Some(y)) => worst = worst.max((x - y).abs() / x.abs().max(1.0)),
                (None, None) => {}
                _ => panic!("{name}: {x:?} vs {y:?}"),
            }
        }
    }
    eprintln!("eval metrics, 2 ranks splitting 3 held-out microbatches vs 1 process: max |Δ| {worst:.3e}");
    assert!(worst < 1e-9, "the split evaluation differs from one process by {worst}");
}

/// ZeRO-1's all-gathers of a run (its windows reduce-scattered in buckets) were waited for by
/// the next forward pass, all but perhaps the last step's (when no evaluation follows it).
fn gathers_run_into_the_next_forward(run: &Run) {
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.dir.join("summary.json")).unwrap()).unwrap();
    let (sync, gathers, steps) = (&summary["grad_sync"], &summary["weight_gathers"], summary["steps"].as_u64().unwrap());
    let windows = (sync["buckets_during_backward"].as_u64().unwrap() + sync["buckets_after_backward"].as_u64().unwrap()) / steps;
    let (in_forward, at_once) = (gathers["in_forward"].as_u64().unwrap(), gathers["at_once"].as_u64().unwrap());
    assert_eq!(in_forward + at_once, windows * steps, "{gathers} for {windows} windows, {steps} steps");
    assert!(in_forward >= windows * (steps - 1), "the all-gathers ended before the next forward: {gathers} for {windows} windows, {steps} steps");
}

/// Rank 0's `grad_sync` record of a run (summary.json).
fn grad_sync(run: &Run) -> serde_json::Value {
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.dir.join("summary.json")).unwrap()).unwrap();
    summary["grad_sync"].clone()
}

/// 2 ranks with `grad_accum` microbatches each, gradients summed in buckets of 4 KiB (dozens
/// on stories260K, a dozen for its LoRA adapters) overlapping the backward pass, against the same ranks summing after the
/// backward (`--overlap-grad-sync=false`) and one process accumulating 2 × `grad_accum`
/// microbatches (`plain`: its extra arguments). Returns the overlapped run's `grad_sync`.
fn overlapped_equals_synchronous(data: &Path, args: &[&str], ranks_only: &[&str], plain: &[&str], grad_accum: usize, what: &str) -> serde_json::Value {
    let model = model_dir().expect("stories260K");
    let dir = tempfile::tempdir().unwrap();
    let (ga, ga2) = (grad_accum.to_string(), (2 * grad_accum).to_string());
    let (one, single) = train(dir.path(), "one", data, &model, &[args, plain, &["--grad-accum", &ga2]].concat(), &[]);
    assert!(one.status.success());
    let ranks_args = [args, ranks_only, &["--grad-accum", &ga, "--grad-bucket-mb", "0.004"]].concat();
    let (outs, overlapped, _) = train_2_ranks(dir.path(), "overlapped", data, &model, &ranks_args, no_env);
    assert!(outs.iter().all(|o| o.status.success()), "{what}: the overlapped run failed");
    let (outs, synchronous, _) = train_2_ranks(dir.path(), "synchronous", data, &model, &[&ranks_args[..], &["--overlap-grad-sync=false"]].concat(), no_env);
    assert!(outs.iter().all(|o| o.status.success()), "{what}: the synchronous run failed");
    let steps = single.metrics()["loss"].len();
    assert!(steps >= 2, "{steps} steps");
    let (om, ow) = (max_metric_diff(&single, &overlapped), max_weight_diff(&single, &overlapped));
    let (sm, sw) = (max_metric_diff(&synchronous, &overlapped), max_weight_diff(&synchronous, &overlapped));
    let sync = grad_sync(&overlapped);
    eprintln!("{what}, {steps} steps: overlapped 2 ranks vs 1 process: max |Δ metric| {om:.3e}, max |Δ weight| {ow:.3e}; vs synchronous 2 ranks: {sm:.3e}, {sw:.3e}; buckets {sync}");
    assert!(om < 1e-5 && ow < 1e-5, "{what}: overlapped DDP differs from one process: metrics {om}, weights {ow}");
    assert!(sm < 1e-5 && sw < 1e-5, "{what}: overlapped DDP differs from synchronous DDP: metrics {sm}, weights {sw}");
    let off = grad_sync(&synchronous);
    assert_eq!((off["overlap"].as_bool(), off["buckets_during_backward"].as_u64(), off["buckets_after_backward"].as_u64()), (Some(false), Some(0), Some(0)), "{off}");
    assert_eq!(sync["overlap"].as_bool(), Some(true));
    let (during, after) = (sync["buckets_during_backward"].as_u64().unwrap(), sync["buckets_after_backward"].as_u64().unwrap());
    // DDP's first step starts every bucket after its backward pass.
    let first = if ranks_only.iter().any(|a| ["--shard-optimizer", "--shard-gradients"].contains(a)) { 0 } else { (during + after) / steps as u64 };
    assert!(during > 2 * (steps as u64 - 1) && during > 3 * (after - first), "{what}: too few buckets started while the backward pass went on: {sync}");
    sync
}

/// KTO's and DPO's arguments of the overlap tests.
const OVERLAP_KTO: [&str; 8] = ["--loss", "kto", "--reference", "live", "--lr", "2e-3", "--max-steps", "3"];
const OVERLAP_DPO: [&str; 10] = ["--loss", "dpo", "--reference", "live", "--lr", "2e-3", "--microbatch-size", "4", "--max-steps", "3"];

/// A plan of `rows` rows and 32 pairs, under a temporary directory.
fn plan_and_pairs(rows: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (plan, pairs) = (dir.path().join("plan.arrow"), dir.path().join("pairs.arrow"));
    write_plan(&plan, rows, false);
    write_pairs(&pairs, 32);
    (dir, plan, pairs)
}

#[test]
fn overlapped_gradient_sync_equals_synchronous_and_one_process_kto_dpo() {
    let (_dir, plan, pairs) = plan_and_pairs(8);
    let (kto, dpo) = (OVERLAP_KTO, OVERLAP_DPO);
    let sync = overlapped_equals_synchronous(&plan, &kto, &[], &[], 1, "KTO");
    // Without checkpointing every gradient is final after one accumulation: nothing redone,
    // in the last 2 steps only the last bucket waits for the last gradient,
    // and the first step, whose counts are not known yet, starts every bucket after it.
    let per_step = (sync["buckets_during_backward"].as_u64().unwrap() + sync["buckets_after_backward"].as_u64().unwrap()) / 3;
    assert_eq!((sync["buckets_after_backward"].as_u64(), sync["buckets_redone"].as_u64()), (Some(per_step + 2), Some(0)), "{sync}");
    overlapped_equals_synchronous(&pairs, &dpo, &[], &[], 2, "DPO, grad_accum 2 per rank");
}

/// Activation checkpointing: the walk-back accumulates a layer's gradient once per
/// checkpointed forward. DDP's first step starts its buckets after the backward pass and
/// later steps wait for the count seen then: nothing is redone. ZeRO-1's first step starts
/// windows early and redoes those that started too early.
#[test]
fn overlapped_gradient_sync_with_activation_checkpointing_equals_one_plain_process() {
    let (_dir, plan, pairs) = plan_and_pairs(12);
    let (kto, dpo) = (OVERLAP_KTO, OVERLAP_DPO);
    let ckpt = ["--checkpoint-activations=true"];
    // Against a plain process (prompts shared, as the checkpointed ranks share them).
    for (data, args, plain, grad_accum, what) in [(&plan, &kto[..], &[][..], 2, "KTO, checkpointing, grad_accum 2 per rank"), (&pairs, &dpo[..], &[][..], 1, "DPO, checkpointing")] {
        let sync = overlapped_equals_synchronous(data, args, &ckpt, plain, grad_accum, what);
        assert_eq!(sync["buckets_redone"].as_u64(), Some(0), "{what}: {sync}");
    }
    // ZeRO-1's windows the same way: a window redone reduce-scatters the local gradients again.
    let sync = overlapped_equals_synchronous(&pairs, &dpo, &[ckpt[0], "--shard-optimizer"], &[], 1, "DPO, checkpointing, ZeRO-1");
    let (during, redone) = (sync["buckets_during_backward"].as_u64().unwrap(), sync["buckets_redone"].as_u64().unwrap());
    assert!(redone > 0 && redone < during / 2, "ZeRO-1 with checkpointing: {sync}");
    // ZeRO-2's too, whose gradients left each window as it started: a window redone
    // reduce-scatters what came after alone and adds it. With 2 microbatches per rank, each
    // one's windows (the step's sums adding up).
    for (data, args, grad_accum, what) in [(&pairs, &dpo[..], 1, "DPO, checkpointing, ZeRO-2"), (&plan, &kto[..], 2, "KTO, checkpointing, ZeRO-2, grad_accum 2 per rank")] {
        let sync = overlapped_equals_synchronous(data, args, &[ckpt[0], "--shard-gradients"], &[], grad_accum, what);
        assert!(grad_accum > 1 || sync["buckets_redone"].as_u64().unwrap() > 0, "{what}: {sync}");
        assert_eq!(sync["gradients_held_after_sync"].as_u64(), Some(0), "{what}: {sync}");
    }
}

#[test]
fn overlapped_gradient_sync_with_lora_equals_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 8, false);
    let lora = r#"{"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]}"#;
    overlapped_equals_synchronous(&plan, &["--loss", "kto", "--reference", "live", "--lr", "1e-2", "--max-steps", "3", "--lora", lora], &[], &[], 1, "KTO + LoRA");
}

/// stories260K with an LM head of its own (the embedding copied, untied), made in `dir`.
fn untied_model(model: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("untied-model");
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(model).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, out.join(path.file_name().unwrap())).unwrap();
    }
    let mut tensors = Tensor::read_safetensors(model.join("model.safetensors")).unwrap();
    let embed = tensors.iter().find(|(name, _)| name == "model.embed_tokens.weight").unwrap().1.copy();
    tensors.push(("lm_head.weight".to_string(), embed));
    Tensor::write_safetensors(&tensors, out.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    config["tie_word_embeddings"] = false.into();
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    out
}

/// An untied LM head gets its gradient first in the backward pass, and its ZeRO-1 windows
/// come first: they are reduce-scattered while the backward pass goes on, and only the
/// windows holding the embedding (whose gradient is final last) wait for its end. ZeRO-1
/// equals DDP on such a model.
#[test]
fn zero1_reduce_scatters_an_untied_lm_head_during_backward() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let model = untied_model(&model, dir.path());
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 8, false);
    let args = ["--loss", "kto", "--reference", "live", "--lr", "2e-3", "--max-steps", "3"];
    let (outs, ddp, _) = train_2_ranks(dir.path(), "ddp", &plan, &model, &args, no_env);
    assert!(outs.iter().all(|o| o.status.success()));
    let (outs, zero, _) = train_2_ranks(dir.path(), "zero", &plan, &model, &[&args[..], &["--shard-optimizer", "--grad-bucket-mb", "0.004"]].concat(), no_env);
    assert!(outs.iter().all(|o| o.status.success()));
    assert!(policy(&zero).contains_key("lm_head.weight"), "the untied head was not trained");
    let (m, w) = (max_metric_diff(&ddp, &zero), max_weight_diff(&ddp, &zero));
    let sync = grad_sync(&zero);
    // Windows of 2 × 524 f32 (4 KiB of --grad-bucket-mb over 2 ranks); the embedding's
    // 512 × 64 elements lie in at most 33 of them, 32 more would hold the head.
    let span = (0.004f64 * 1024.0 * 1024.0) as u64 / 4 / 2 * 2;
    let embedding_windows = (512 * 64u64).div_ceil(span) + 1;
    let (during, after) = (sync["buckets_during_backward"].as_u64().unwrap(), sync["buckets_after_backward"].as_u64().unwrap());
    eprintln!("untied ZeRO-1 vs DDP: max |Δ metric| {m:.3e}, max |Δ weight| {w:.3e}; windows per step: {} during the backward pass, {} after (the embedding's: at most {embedding_windows})", during / 3, after / 3);
    assert!(m < 1e-5 && w < 1e-5, "untied ZeRO-1 differs from DDP: metrics {m}, weights {w}");
    assert!(after <= 3 * embedding_windows, "more windows than the embedding's waited for the end of the backward pass: {sync}");
}

/// ZeRO-1 with bf16 weights (f32 master weights and reduced gradients, weights all-gathered
/// in bf16): the windows reduce-scattered during the backward pass, straight into the reduced
/// shard, give what the windows after it give, and DDP's weights up to a sum's rounding; so
/// does ZeRO-2, whose sums are added to the zeroed shard.
#[test]
fn zero1_bf16_overlapped_equals_after_backward() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 8, false);
    let args = ["--loss", "kto", "--reference", "live", "--lr", "2e-3", "--max-steps", "3", "--dtype", "bf16", "--shard-optimizer", "--grad-bucket-mb", "0.004"];
    let (outs, overlapped, _) = train_2_ranks(dir.path(), "overlapped", &plan, &model, &args, no_env);
    assert!(outs.iter().all(|o| o.status.success()), "{}", String::from_utf8_lossy(&outs[0].stderr));
    let (outs, after, _) = train_2_ranks(dir.path(), "after", &plan, &model, &[&args[..], &["--overlap-grad-sync=false"]].concat(), no_env);
    assert!(outs.iter().all(|o| o.status.success()));
    let (m, w) = (max_metric_diff(&after, &overlapped), max_weight_diff(&after, &overlapped));
    let sync = grad_sync(&overlapped);
    // DDP sums bf16 gradients in bf16, ZeRO-1 in f32: the weights (all-gathered in bf16) may
    // differ by the rounding of a sum, not by a misplaced window.
    let ddp_args: Vec<&str> = args.iter().copied().filter(|a| !["--shard-optimizer", "--grad-bucket-mb", "0.004"].contains(a)).collect();
    let (outs, ddp, _) = train_2_ranks(dir.path(), "ddp", &plan, &model, &ddp_args, no_env);
    assert!(outs.iter().all(|o| o.status.success()));
    let (dm, dw) = (max_metric_diff(&ddp, &overlapped), max_weight_diff(&ddp, &overlapped));
    eprintln!("ZeRO-1 bf16, overlapped vs after backward: max |Δ metric| {m:.3e}, max |Δ weight| {w:.3e}; windows {sync}; vs DDP bf16: {dm:.3e}, {dw:.3e}");
    assert!(dw < 1e-2, "ZeRO-1 bf16 weights differ from DDP's by {dw}: more than the rounding of a sum");
    assert!(m < 1e-6 && w < 1e-6, "metrics {m}, weights {w}");
    assert!(sync["buckets_during_backward"].as_u64().unwrap() > 0, "{sync}");
    gathers_run_into_the_next_forward(&overlapped);
    let (outs, zero2, _) = train_2_ranks(dir.path(), "zero2", &plan, &model, &[&args[..], &["--shard-gradients"]].concat(), no_env);
    assert!(outs.iter().all(|o| o.status.success()));
    let (m2, w2) = (max_metric_diff(&zero2, &overlapped), max_weight_diff(&zero2, &overlapped));
    eprintln!("ZeRO-2 bf16 vs ZeRO-1 bf16: max |Δ metric| {m2:.3e}, max |Δ weight| {w2:.3e}; windows {}", grad_sync(&zero2));
    assert!(m2 < 1e-6 && w2 < 1e-6, "ZeRO-2 bf16: metrics {m2}, weights {w2}");
    assert_eq!(grad_sync(&zero2)["gradients_held_after_sync"].as_u64(), Some(0));
}

/// PPO in bf16 trains a value head in f32 beside bf16 weights: ZeRO-1 cannot hold both in one
/// flat buffer, so it gathers each window through a buffer and copies it in before the update
/// returns (none waited for in a forward), and gives DDP's weights up to a bf16 sum's rounding;
/// ZeRO-2 the same as ZeRO-1.
#[test]
fn zero1_gathers_ppo_weights_of_two_types_through_buffers() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 4, false);
    let args = ["--loss", "ppo", "--reference", "live", "--lr", "2e-3", "--max-steps", "2", "--microbatch-size", "4", "--dtype", "bf16"];
    let (outs, ddp, _) = train_2_ranks(dir.path(), "ddp", &plan, &model, &args, no_env);
    assert!(outs.iter().all(|o| o.status.success()), "{}", String::from_utf8_lossy(&outs[0].stderr));
    let (outs, zero, _) = train_2_ranks(dir.path(), "zero", &plan, &model, &[&args[..], &["--shard-optimizer", "--grad-bucket-mb", "0.004"]].concat(), no_env);
    assert!(outs.iter().all(|o| o.status.success()), "{}", String::from_utf8_lossy(&outs[0].stderr));
    let (m, w) = (max_metric_diff(&ddp, &zero), max_weight_diff(&ddp, &zero));
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(zero.dir.join("summary.json")).unwrap()).unwrap();
    eprintln!("PPO bf16, ZeRO-1 vs DDP: max |Δ metric| {m:.3e}, max |Δ weight| {w:.3e}; gathers {}", summary["weight_gathers"]);
    assert_eq!(summary["weight_gathers"]["in_forward"].as_u64(), Some(0));
    assert!(w < 1e-2 && m < 1e-2, "metrics {m}, weights {w}");
    let (outs, zero2, _) = train_2_ranks(dir.path(), "zero2", &plan, &model, &[&args[..], &["--shard-gradients", "--grad-bucket-mb", "0.004"]].concat(), no_env);
    assert!(outs.iter().all(|o| o.status.success()), "{}", String::from_utf8_lossy(&outs[0].stderr));
    let (m2, w2) = (max_metric_diff(&zero, &zero2), max_weight_diff(&zero, &zero2));
    eprintln!("PPO bf16, ZeRO-2 vs ZeRO-1: max |Δ metric| {m2:.3e}, max |Δ weight| {w2:.3e}");
    assert!(m2 < 1e-6 && w2 < 1e-6, "metrics {m2}, weights {w2}");
}
