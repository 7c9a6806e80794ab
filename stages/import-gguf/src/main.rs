//! `halo-import-gguf`: a GGUF file as a Hugging Face model directory. See
//! `halo-import-gguf --help` and the library documentation.

use std::path::PathBuf;

use clap::Parser;

const EXAMPLE: &str = "Example:
  bash ci/fetch-smollm2.sh
  halo-import-gguf --gguf .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --model smollm2

Reads GGUF v2/v3 files of the llama architecture with tensors in F32, F16, BF16, Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K and a byte-level BPE vocabulary; writes model.safetensors
(f32), config.json, generation_config.json, tokenizer.json and tokenizer_config.json (with the
chat template). The output loads in haloflow and in transformers.";

/// Convert a GGUF file (llama.cpp) into a Hugging Face model directory, dequantized to f32.
#[derive(Parser, Debug)]
#[command(name = "halo-import-gguf", version, after_help = EXAMPLE)]
struct Args {
    /// The GGUF file.
    #[arg(long)]
    gguf: PathBuf,
    /// Output model directory (replaced if it exists).
    #[arg(long)]
    model: PathBuf,
}

fn main() {
    haloflow::stage_cli::main(|| {
        let args = Args::parse();
        halo_import_gguf::import(&args.gguf, &args.model).map(|_| ())
    });
}
