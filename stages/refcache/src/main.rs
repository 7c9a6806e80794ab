//! `halo-refcache`: the reference model's completion log-probs, precomputed to Parquet so that
//! training never holds the reference model. See `halo-refcache --help`.

mod buckets;
mod refcache;
mod scratch;

use std::path::PathBuf;

use clap::Parser;
use haloflow_ml::prompt_format::PromptFormatArg;

const EXAMPLE: &str = "Example:
  halo-refcache --data plan.arrow --model ../shared/models/stories260K \\
      --logps ref.parquet --summary summary.json --max-prompt-length 128 --max-length 256

For a `plan` (from halo-resample) each row gets the summed log-prob and token count of its
completion and of its KL partner completion; for a `paired` table, of the chosen and the
rejected reply. Sequences are sorted by length and batched by a token budget so padding stays
small. Progress is kept in --scratch (default $HALO_SCRATCH_DIR, else OUT.partial): a killed run
continues where it stopped and writes the same file as an uninterrupted run.

Under a launcher that sets WORLD_SIZE > 1 (`ranks = N` in a pipeline, torchrun, srun), chunk c
is scored by rank c % WORLD_SIZE (on CUDA, on GPU LOCAL_RANK) into the shared scratch
directory; rank 0 then reads every chunk and alone writes the outputs, which equal a single
process's (batches never cross chunks). A killed multi-rank run resumes on any rank count.
The scratch directory must be one that every rank sees (one machine, or a shared file system).";

/// Precompute reference log-probs to Parquet.
#[derive(Parser, Debug, Clone)]
#[command(name = "halo-refcache", version, after_help = EXAMPLE)]
pub struct Args {
    /// Input `plan` or `paired` table.
    #[arg(long)]
    pub data: PathBuf,
    /// Reference model: a Hugging Face directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Output `ref_logps` Parquet file.
    #[arg(long)]
    pub logps: PathBuf,
    /// Output summary (JSON).
    #[arg(long)]
    pub summary: PathBuf,
    /// Prompt tokens kept (from the end).
    #[arg(long, default_value_t = 256)]
    pub max_prompt_length: usize,
    #[command(flatten)]
    pub format: PromptFormatArg,
    /// Prompt + completion tokens kept (the completion loses its end).
    #[arg(long, default_value_t = 512)]
    pub max_length: usize,
    /// Padded tokens per forward batch.
    #[arg(long, default_value_t = 8192)]
    pub token_budget: usize,
    /// Rows (two sequences each) per resumable chunk.
    #[arg(long, default_value_t = 256)]
    pub chunk_size: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (bf16 on CUDA, f32 on CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Also store per-token log-probs (needed by offline PPO).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub per_token: bool,
    /// CPU threads for libtorch (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Where finished chunks are kept until the output is complete (default: OUT.partial).
    #[arg(long, env = "HALO_SCRATCH_DIR")]
    pub scratch: Option<PathBuf>,
    /// Seconds a rank of a multi-process run (WORLD_SIZE > 1) waits for the others, e.g. for
    /// the slowest rank's last rows, before giving up.
    #[arg(long, default_value_t = 1800.0)]
    pub dist_timeout_s: f64,
}

fn main() {
    haloflow::stage_cli::main(|| refcache::run(&Args::parse()));
}
