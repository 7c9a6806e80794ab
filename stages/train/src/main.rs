//! `halo-train`: align a model with a human-aware loss (KTO, DPO and family) on libtorch.
//! See `halo-train --help`.

mod checkpoint;
mod data;
mod estimate;
mod fused;
mod grads;
mod metrics;
mod microbatch;
mod optim;
mod parallel;
mod refs;
mod report;
mod train;
mod zero;

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser};
use haloflow_ml::prompt_format::PromptFormatArg;

const EXAMPLE: &str = "Example:
  halo-train --data plan.arrow --model ../shared/models/stories260K --ref-logps ref.parquet \\
      --loss kto --beta 0.1 --lr 1e-4 --warmup-steps 2 --max-steps 50 \\
      --policy out-model --metrics metrics.parquet --report report --summary summary.json

Losses: kto, apo_zero, ppo (binary data: a plan from halo-resample); dpo, cdpo, ipo, simpo,
slic, orpo (paired data); sft, csft (either). Reference log-probs come from --ref-logps
(halo-refcache; its fingerprint must match --model and --data) or, with --reference live,
from a second copy of --model. λ_D/λ_U default to the values resample recorded in the plan.
With --save-every N, checkpoints (weights, optimizer, step, metrics) go to --checkpoint-dir
(default $HALO_SCRATCH_DIR, else POLICY.checkpoints) and a killed run resumes from the last one.
--checkpoint-activations recomputes each decoder layer during backward instead of storing its
activations. `halo-train --estimate-memory --model DIR [--dtype bf16 --microbatch-size 8
--max-length 1024 --checkpoint-activations ...]` prints the run's memory estimate and exits; on
CUDA a run that the estimate says will not fit stops before loading the model.

With --lora, only LoRA adapters are trained (PEFT's initialisation, seeded by --seed) and
--policy is a PEFT adapter directory (adapter_config.json, adapter_model.safetensors) that
refcache, sample and judge load onto its base model, as Python's peft does; --merge-lora
--merged DIR also writes the merged full weights.

Data-parallel: launched as N processes (torchrun, srun, or halo run with `ranks`; the
environment's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), each optimizer step takes
grad_accum × N microbatches, rank r running microbatches r, r + N, …; gradients are summed
over the ranks, so N ranks equal one process with grad_accum × N. Rank 0 alone writes the
outputs and checkpoints. --shard-optimizer keeps each rank's slice of the AdamW state only.

`halo-train report --metrics metrics.parquet --report DIR` re-renders the report of a finished
run from its metrics (see `halo-train report --help`).";

/// Train a policy with a HALO.
#[derive(Parser, Debug, Clone)]
#[command(name = "halo-train", version, after_help = EXAMPLE, args_override_self = true)]
pub struct Args {
    /// Training data: a `plan` (binary feedback) or a `paired` table.
    #[arg(long)]
    pub data: PathBuf,
    /// Initial policy (and reference) model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Reference log-probs from halo-refcache.
    #[arg(long)]
    pub ref_logps: Option<PathBuf>,
    /// Output: the trained policy (Hugging Face directory).
    #[arg(long)]
    pub policy: PathBuf,
    /// Output: per-step metrics (Parquet).
    #[arg(long)]
    pub metrics: PathBuf,
    /// Output: report directory (report.md and SVG curves).
    #[arg(long)]
    pub report: PathBuf,
    /// Output: summary (JSON).
    #[arg(long)]
    pub summary: PathBuf,
    /// The loss.
    #[arg(long, default_value = "kto")]
    pub loss: String,
    /// β of the loss (its default when not given).
    #[arg(long)]
    pub beta: Option<f64>,
    /// KTO's λ_D (default: from the plan).
    #[arg(long)]
    pub lambda_d: Option<f64>,
    /// KTO's λ_U (default: from the plan).
    #[arg(long)]
    pub lambda_u: Option<f64>,
    /// Other loss params as a JSON object, e.g. '{"epsilon": 0.2}'.
    #[arg(long)]
    pub loss_params: Option<String>,
    /// Where reference log-probs come from: cache (--ref-logps) or live (a second model).
    #[arg(long, value_parser = ["cache", "live"])]
    pub reference: Option<String>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-6)]
    pub lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Decay after warmup.
    #[arg(long, value_enum, default_value = "linear")]
    pub decay: optim::Decay,
    /// Clip gradients to this global norm (0: no clipping).
    #[arg(long, default_value_t = 10.0)]
    pub max_grad_norm: f64,
    /// Microbatches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Pairs per microbatch (paired data; a plan brings its own batches).
    #[arg(long, default_value_t = 8)]
    pub microbatch_size: usize,
    /// Passes over the data.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Seed (epoch orders after the first).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompt tokens kept (from the end).
    #[arg(long, default_value_t = 256)]
    pub max_prompt_length: usize,
    #[command(flatten)]
    pub format: PromptFormatArg,
    /// Prompt + completion tokens kept.
    #[arg(long, default_value_t = 512)]
    pub max_length: usize,
    /// Microbatches at the end of the data held out for evaluation.
    #[arg(long, default_value_t = 0)]
    pub eval_batches: usize,
    /// Evaluate every N steps (and at the start and the end); 0: start and end only.
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Checkpoint every N steps (0: never).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Where checkpoints go (default: SCRATCH_DIR/checkpoints, else POLICY.checkpoints).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Scratch space that survives a killed run (the runner sets it per stage).
    #[arg(long, env = "HALO_SCRATCH_DIR")]
    pub scratch_dir: Option<PathBuf>,
    /// Streams every step's metrics here as they happen: metrics.jsonl and TensorBoard event
    /// files with the hyperparameters (`halo run` gives each stage WORK_DIR/tracking/...).
    #[arg(long, env = "HALO_TRACKING_DIR")]
    pub tracking_dir: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (bf16 on CUDA, f32 on CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Collective backend of a multi-process run: auto (nccl on CUDA, gloo on CPU), gloo or nccl.
    #[arg(long, default_value = "auto", value_parser = ["auto", "gloo", "nccl"])]
    pub dist_backend: String,
    /// Seconds a multi-process run waits for a rank (rendezvous and each collective).
    #[arg(long, default_value_t = 600.0)]
    pub dist_timeout_s: f64,
    /// Data-parallel runs: sum each bucket of gradients over the ranks as soon as the backward
    /// pass of the step's last microbatch finished it, while the backward goes on, as torch's
    /// DDP does (`--overlap-grad-sync=false`: all buckets after the backward pass). With
    /// --shard-optimizer the buckets are ZeRO-1's windows, reduce-scattered the same way.
    #[arg(long, num_args = 0..=1, default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub overlap_grad_sync: bool,
    /// Data-parallel runs: MiB of gradients per all-reduce (a bucket; torch's DDP's
    /// bucket_cap_mb), or of f32 gradients per window of ZeRO-1's reduce-scatters.
    #[arg(long, default_value_t = 25.0)]
    pub grad_bucket_mb: f64,
    /// ZeRO-1: shard the AdamW moments and f32 master weights over the ranks
    /// (`--shard-optimizer`, or `--shard-optimizer=true|false` as a pipeline param passes it).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub shard_optimizer: bool,
    /// ZeRO-2 (implies --shard-optimizer): shard the gradients too. Every microbatch's
    /// backward pass reduce-scatters each window of gradients as soon as it is final and drops
    /// it, so a rank holds the f32 sums of its shard instead of every gradient
    /// (`--shard-gradients`, or `--shard-gradients=true|false` as a pipeline param passes it).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub shard_gradients: bool,
    /// AdamW's update as libtorch's fused multi-tensor kernel (at::_fused_adamw_; on the CPU
    /// within an ulp of the unfused chain and faster, ci/bench-adamw.sh), or with
    /// `--fused-adamw=false` as the unfused chain of element-wise ops. Checkpoints are the same
    /// either way.
    #[arg(long, num_args = 0..=1, default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub fused_adamw: bool,
    /// LoRA: train low-rank adapters only, as a JSON object
    /// '{"r": 16, "alpha": 32, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}' (targets default
    /// to every projection). --policy then receives a PEFT adapter directory, and the live
    /// reference is the base model with the adapters switched off (no second copy).
    #[arg(long)]
    pub lora: Option<String>,
    /// With --lora: also write the full model with the adapters merged in (W + B·A·alpha/r) to
    /// --merged (`--merge-lora`, or `--merge-lora=true|false` as a pipeline param passes it).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub merge_lora: bool,
    /// Output of --merge-lora: the merged model (Hugging Face directory).
    #[arg(long)]
    pub merged: Option<PathBuf>,
    /// Run a prompt shared by a row's sequences once (KTO's completion and KL partner, a
    /// DPO-family pair) and continue each from its keys and values
    /// (`--share-prompts=false`: separate passes, for equality tests and debugging).
    #[arg(long, num_args = 0..=1, default_value_t = true, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub share_prompts: bool,
    /// Completion positions whose logits (LM head, log-softmax) are computed at once.
    #[arg(long, default_value_t = haloflow_ml::logprobs::LOGITS_CHUNK)]
    pub logits_chunk: usize,
    /// Activation checkpointing: keep only each decoder layer's input and recompute the layer
    /// during backward, trading a second forward for the layers' activations
    /// (`--checkpoint-activations`, or `--checkpoint-activations=true|false` as a pipeline
    /// param passes it).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub checkpoint_activations: bool,
    /// Print the training memory estimate (weights, gradients, optimizer state, master
    /// weights, activations in GiB) for --model's config.json, --dtype, --microbatch-size,
    /// --max-length, --checkpoint-activations, --reference, --shard-optimizer and WORLD_SIZE,
    /// and exit: nothing but config.json is read, and --data and the outputs may be left out.
    #[arg(long)]
    pub estimate_memory: bool,
    /// CPU threads for libtorch.
    #[arg(long)]
    pub threads: Option<i32>,
    /// EMA weight smoothing the report's training curves (TensorBoard's; 0: none), in [0, 1).
    #[arg(long, default_value_t = 0.6, value_parser = report::smoothing_weight)]
    pub smoothing: f64,
}

impl Args {
    /// Whether the optimizer state is sharded: ZeRO-1 (`--shard-optimizer`), or ZeRO-2
    /// (`--shard-gradients`), which implies it.
    pub fn shards_optimizer(&self) -> bool {
        self.shard_optimizer || self.shard_gradients
    }
}

/// `halo-train report`: re-render the training report of a finished run from its metrics.
#[derive(Parser, Debug, Clone)]
#[command(name = "halo-train report", version)]
pub struct ReportArgs {
    /// Input: the run's per-step metrics (Parquet).
    #[arg(long)]
    pub metrics: PathBuf,
    /// Output: report directory (report.md and SVG curves).
    #[arg(long)]
    pub report: PathBuf,
    /// The loss named in the report's title.
    #[arg(long, default_value = "kto")]
    pub loss: String,
    /// EMA weight smoothing the training curves (TensorBoard's; 0: none), in [0, 1).
    #[arg(long, default_value_t = 0.6, value_parser = report::smoothing_weight)]
    pub smoothing: f64,
}

fn main() {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "report") {
        argv.remove(1);
        haloflow::stage_cli::main(|| report::rerender(&ReportArgs::parse_from(argv)));
    } else if argv.iter().any(|a| a == "--estimate-memory") {
        haloflow::stage_cli::main(|| estimate::print(&estimate_args(argv)?));
    } else {
        haloflow::stage_cli::main(|| train::run(&Args::parse()));
    }
}

/// The arguments of `--estimate-memory`, which needs neither data nor outputs.
fn estimate_args(argv: Vec<std::ffi::OsString>) -> anyhow::Result<Args> {
    let mut command = Args::command();
    for name in ["data", "policy", "metrics", "report", "summary"] {
        command = command.mut_arg(name, |a| a.required(false).default_value("-"));
    }
    Ok(Args::from_arg_matches(&command.get_matches_from(argv))?)
}
