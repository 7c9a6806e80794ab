//! `halo-sample`: completions for a `prompts` table from a local Hugging Face model, batched
//! with a KV cache and reproducible from a seed, or from an OpenAI-compatible server. See
//! `halo-sample --help`.

mod api;
mod sample;
mod shard;

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use haloflow_ml::prompt_format::PromptFormatArg;
use haloflow_openai::client::ClientArgs;

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
samples (Gloo) and alone writes the outputs, which equal a single process's.

Example (a model served by vLLM, `vllm serve Qwen/Qwen2.5-0.5B-Instruct --port 8000`):
  halo-sample --backend openai --base-url http://127.0.0.1:8000/v1 \
      --api-model Qwen/Qwen2.5-0.5B-Instruct --api-endpoint chat \
      --prompts prompts.arrow --samples samples.arrow --summary summary.json --n 2

With --backend openai every sample is one request (n = 1) to --base-url: /completions with the
prompt rendered in --prompt-format (the default endpoint: the text a local run would continue,
so a base model gets the HH transcript and stops at "\n\nHuman:"; --model DIR renders with
that directory's chat template), or /chat/completions with the messages (the server applies its
own chat template). temperature, top_p, max_tokens (--max-new-tokens), stop and a seed drawn
from --seed, the prompt_id and the sample index are sent; prompt_tokens, completion_tokens
come from the answer's `usage`. Answers are cached in --cache-dir as they arrive, so a rerun
after a kill asks only what is missing. The API key is read from the variable --api-key-env
names and never written anywhere."#;

/// Where the samples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// In-process generation with libtorch (--model).
    Local,
    /// An OpenAI-compatible server (vLLM, llama.cpp's llama-server, TGI, OpenAI).
    Openai,
}

/// Which OpenAI-compatible endpoint the `openai` backend asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Endpoint {
    /// `/completions` with the prompt rendered by --prompt-format (the same text a local run
    /// continues).
    Completions,
    /// `/chat/completions` with the prompt's messages (the server's chat template).
    Chat,
}

/// Sample completions for prompts with a local model or an OpenAI-compatible server.
#[derive(Parser, Debug, Clone)]
#[command(name = "halo-sample", version, after_help = EXAMPLE)]
pub struct Args {
    /// Input `prompts` table (Arrow IPC or Parquet).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Model: a Hugging Face directory (config.json, safetensors, tokenizer.json). Required by
    /// the local backend; with --backend openai optional (its tokenizer's chat template renders
    /// prompts for --api-endpoint completions).
    #[arg(long)]
    pub model: Option<PathBuf>,
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
    /// Name written in the `model` column (default: the model directory's name, or with
    /// --backend openai the --api-model).
    #[arg(long)]
    pub model_id: Option<String>,
    /// CPU threads for libtorch (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Seconds a rank of a multi-process run (WORLD_SIZE > 1) waits for the others, e.g. for
    /// the slowest rank's last rows, before giving up.
    #[arg(long, default_value_t = 1800.0)]
    pub dist_timeout_s: f64,
    /// Where samples come from: local (in-process, the default) or openai (a server).
    #[arg(long, value_enum, default_value_t = Backend::Local)]
    pub backend: Backend,
    /// Openai backend: the served model's name, as the server's /v1/models lists it.
    #[arg(long)]
    pub api_model: Option<String>,
    /// Openai backend: completions (the default: the prompt as a local run renders it) or chat.
    #[arg(long, value_enum, default_value_t = Endpoint::Completions)]
    pub api_endpoint: Endpoint,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Openai backend: directory of the answer cache (created if missing). Default:
    /// $HALO_STAGE_CACHE_DIR/sample when the runner sets HALO_STAGE_CACHE_DIR (inside its work
    /// dir), else .halo/sample-cache in the working directory.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

fn main() {
    haloflow::stage_cli::main(|| sample::run(&Args::parse()));
}
