//! `halo-sample`: completions for a `prompts` table from a local Hugging Face model, batched
//! with a KV cache and reproducible from a seed. See `halo-sample --help`.

mod sample;
mod shard;

use std::path::PathBuf;

use clap::Parser;
use haloflow_ml::prompt_format::PromptFormatArg;

const EXAMPLE: &str = r#"Example:
  halo-sample --prompts prompts.arrow --model ../shared/models/stories260K \
      --samples samples.arrow --summary summary.json \
      --max-new-tokens 64 --temperature 0.7 --top-p 0.9 --n 2 --seed 0 --stop '["\n\n", "User:"]'

Every prompt is rendered with the model's chat template (or, without one, its messages'
contents) and continued --n times. Prompts are left-padded into batches of --batch-size
samples; each sample draws its tokens from its own random stream, seeded by --seed, the
prompt_id and the sample index, so the output does not depend on --batch-size, --device or the
other prompts. --temperature 0 decodes greedily. A sample ends at an EOS token ("eos"), at a
stop string, which is cut from its text ("stop"), or after --max-new-tokens tokens ("length").
A prompt longer than the model's max_position_embeddings minus --max-new-tokens is skipped and
counted in the summary.

Under a launcher that sets WORLD_SIZE > 1 (`ranks = N` in a pipeline, torchrun, srun), prompt i
is sampled by rank i % WORLD_SIZE (on CUDA, on GPU LOCAL_RANK) and rank 0 gathers every rank's
samples (Gloo) and alone writes the outputs, which equal a single process's."#;

/// Sample completions for prompts with a local model.
#[derive(Parser, Debug, Clone)]
#[command(name = "halo-sample", version, after_help = EXAMPLE)]
pub struct Args {
    /// Input `prompts` table (Arrow IPC or Parquet).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Model: a Hugging Face directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Output `samples` table (Arrow IPC), rows in input order, written atomically.
    #[arg(long)]
    pub samples: PathBuf,
    /// Output summary (JSON): counts, finish reasons, skipped prompts, tokens/s.
    #[arg(long)]
    pub summary: PathBuf,
    /// Most tokens generated per sample.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 decodes greedily.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// Nucleus sampling: draw from the most likely tokens whose probabilities reach top_p.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    /// Samples per prompt.
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// Seed of the samples' random streams.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A string that ends a sample (cut from its text). Repeatable; a JSON array of strings
    /// (`'["\n\n", "User:"]'`, as the pipeline runner passes a list) gives several.
    #[arg(long)]
    pub stop: Vec<String>,
    #[command(flatten)]
    pub format: PromptFormatArg,
    /// Samples decoded together.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (bf16 on CUDA, f32 on CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Name written in the `model` column (default: the model directory's name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// CPU threads for libtorch (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Seconds a rank of a multi-process run (WORLD_SIZE > 1) waits for the others, e.g. for
    /// the slowest rank's last rows, before giving up.
    #[arg(long, default_value_t = 1800.0)]
    pub dist_timeout_s: f64,
}

fn main() {
    haloflow::stage_cli::main(|| sample::run(&Args::parse()));
}
