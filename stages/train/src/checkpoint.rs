//! Checkpoints: the policy in Hugging Face format, the optimizer state, the step and the
//! metrics so far, written atomically into `ROOT/step-N/`; only the newest is kept.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use haloflow_ml::model::CausalLm;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::nn::VarStore;

use crate::metrics::Row;
use crate::optim::AdamW;
use crate::parallel::Ranks;
use crate::zero::ShardedAdamW;
use crate::Args;

/// The file of PPO's value head in a checkpoint.
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";

/// Where training stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Identifies the run a checkpoint belongs to (data, model and every setting).
    pub run_id: String,
    /// Optimizer steps done.
    pub step: usize,
    /// Metrics of the steps done (the data position and RNG follow from `step` and the seed).
    pub metrics: Vec<Row>,
}

/// The id of a run: what its results depend on (not the output paths, not how the
/// `microbatches_per_step` of a step are spread over ranks, not the collectives' timeout), so
/// that a run resumes on another number of ranks with the same global batch.
pub fn run_id(args: &Args, microbatches_per_step: usize, model: &Path, data: &Path) -> Result<String> {
    // How gradients are summed over the ranks does not change the training.
    let normalized = Args { grad_accum: microbatches_per_step, dist_backend: String::new(), dist_timeout_s: 0.0, overlap_grad_sync: true, grad_bucket_mb: 0.0, ..args.clone() };
    let mut settings = format!("{normalized:?}");
    for path in [&args.policy, &args.metrics, &args.report, &args.summary] {
        settings = settings.replace(&path.display().to_string(), "");
    }
    if let Some(dir) = &args.checkpoint_dir {
        settings = settings.replace(&dir.display().to_string(), "");
    }
    let weights: Vec<String> = haloflow_ml::weights::weight_files(model)?
        .iter()
        .map(|f| haloflow::hashing::hash_path(f))
        .collect::<Result<_>>()?;
    Ok(haloflow::hashing::hash_json(&json!({
        "settings": settings, "weights": weights, "data": haloflow::hashing::hash_path(data)?,
    })))
}

/// The newest complete checkpoint of run `run_id` under `root`, if any.
pub fn latest(root: &Path, run_id: &str) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(root) else { return Ok(None) };
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in entries {
        let path = entry?.path();
        let Some(step) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("step-")).and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(state) = read_state(&path) else { continue };
        if state.run_id == run_id && best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, path));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Reads `state.json` of a checkpoint.
pub fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join("state.json");
    serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)
        .with_context(|| format!("{}: unreadable", path.display()))
}

/// The optimizer state a checkpoint holds: all of it (written by rank 0), or one shard per rank.
pub enum OptimizerState<'a> {
    /// Plain AdamW, identical on every rank.
    Full(&'a AdamW),
    /// ZeRO-1: this rank's shard.
    Sharded(&'a ShardedAdamW),
}

/// Writes a checkpoint atomically (a temporary directory renamed into place, `state.json`
/// last) and deletes older ones. Rank 0 writes the model and state; with a sharded optimizer
/// every rank writes its shard into the temporary directory first (a collective).
pub fn save(root: &Path, ranks: &Ranks, policy: &CausalLm, value_head: Option<&VarStore>, opt: OptimizerState, state: &TrainState) -> Result<()> {
    let target = root.join(format!("step-{}", state.step));
    let tmp = root.join(format!(".step-{}.tmp", state.step));
    if ranks.is_main() {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    }
    match opt {
        OptimizerState::Sharded(sharded) => {
            ranks.barrier()?;
            sharded.save(&tmp, ranks.rank())?;
            ranks.barrier()?;
        }
        OptimizerState::Full(full) if ranks.is_main() => full.save(&tmp)?,
        OptimizerState::Full(_) => {}
    }
    if !ranks.is_main() {
        return Ok(());
    }
    policy.save(&tmp.join("model"))?;
    if let Some(vs) = value_head {
        haloflow_ml::weights::save_file(vs, &tmp.join(VALUE_HEAD_FILE))?;
    }
    haloflow::io::write_json(&tmp.join("state.json"), state)?;
    std::fs::rename(&tmp, &target).with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
    for entry in std::fs::read_dir(root)? {
        let path = entry?.path();
        if path != target && path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")) {
            std::fs::remove_dir_all(&path).with_context(|| format!("removing old checkpoint {}", path.display()))?;
        }
    }
    Ok(())
}
