//! `halo-init`: a randomly initialised model of a given shape, in Hugging Face layout, for
//! pipelines that run in CI on a tiny model. See `halo-init --help`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use haloflow_ml::config::Config;
use haloflow_ml::model::CausalLm;
use serde_json::json;
use tch::{Device, Kind};

const EXAMPLE: &str = "Example:
  halo-init --arch llama --hidden 64 --layers 2 --heads 4 --kv-heads 2 \\
      --tokenizer ../shared/models/stories260K --out tiny-model

The vocabulary size, BOS/EOS/pad ids and tokenizer files come from --tokenizer; weights are
drawn from N(0, --init-std²) (default 0.02) with the given --seed (norms 1, biases 0; Gemma's
(1 + w) norms draw w from the same distribution, so that they matter). The output loads in haloflow
and in transformers (config.json + model.safetensors + tokenizer files).";

/// Architectures halo-init can create.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Arch {
    /// Llama (no attention bias).
    Llama,
    /// Qwen2 (q/k/v bias).
    Qwen2,
    /// Mistral (Llama layers; every layer attends within --sliding-window when given).
    Mistral,
    /// Qwen3 (per-head q/k RMSNorm, no bias).
    Qwen3,
    /// Gemma 2 (GeGLU, sandwich norms, soft-capping, alternating sliding/global layers).
    Gemma2,
    /// Gemma 3's text model (Gemma 2 with q/k norms and local/global RoPE bases, no soft-capping).
    Gemma3,
}

/// Create a randomly initialised model directory.
#[derive(Parser, Debug)]
#[command(name = "halo-init", version, after_help = EXAMPLE)]
struct Args {
    /// Architecture.
    #[arg(long, value_enum, default_value = "llama")]
    arch: Arch,
    /// Width of the residual stream.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// MLP width (default: about 8/3 of hidden, rounded up to a multiple of 8).
    #[arg(long)]
    intermediate: Option<usize>,
    /// Decoder blocks.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Query heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Key/value heads (GQA).
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    /// Longest context.
    #[arg(long, default_value_t = 512)]
    max_positions: usize,
    /// Sliding-window attention: each query sees this many keys, itself included (mistral:
    /// every layer; qwen2/qwen3: the layers from --max-window-layers on; gemma2/gemma3: all
    /// but every --global-every-th layer; default 4096 for Gemma, none otherwise).
    #[arg(long)]
    sliding_window: Option<usize>,
    /// Qwen2/Qwen3: the first layer that uses the sliding window.
    #[arg(long, default_value_t = 0)]
    max_window_layers: usize,
    /// Gemma: every N-th layer attends globally, the others within the window (default: 2 for
    /// gemma2, 6 for gemma3, as transformers).
    #[arg(long)]
    global_every: Option<usize>,
    /// Gemma: `query_pre_attn_scalar` (the attention scale is its inverse square root;
    /// default: the head width).
    #[arg(long)]
    query_pre_attn_scalar: Option<usize>,
    /// Gemma 2: soft-capping of the attention logits (transformers' default 50).
    #[arg(long, default_value_t = 50.0)]
    attn_softcap: f64,
    /// Gemma 2: soft-capping of the final logits (transformers' default 30).
    #[arg(long, default_value_t = 30.0)]
    final_softcap: f64,
    /// Tie the LM head to the embeddings.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    tie_embeddings: bool,
    /// Standard deviation of the weights (config's initializer_range).
    #[arg(long, default_value_t = 0.02)]
    init_std: f64,
    /// Seed of the initialisation.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Directory with tokenizer.json (and tokenizer_config.json, ...) to copy.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output model directory.
    #[arg(long)]
    out: PathBuf,
}

fn main() {
    haloflow::stage_cli::main(|| run(&Args::parse()));
}

fn vocab_size(tokenizer_dir: &Path) -> Result<usize> {
    let path = tokenizer_dir.join("tokenizer.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)
        .with_context(|| format!("{}: not JSON", path.display()))?;
    let vocab = json["model"]["vocab"].as_object().map(|v| v.len()).unwrap_or(0);
    let added = json["added_tokens"].as_array().map(|a| a.iter().filter_map(|t| t["id"].as_u64()).max().unwrap_or(0) as usize + 1).unwrap_or(0);
    anyhow::ensure!(vocab.max(added) > 0, "{}: no vocabulary found", path.display());
    Ok(vocab.max(added))
}

fn token_ids(tokenizer_dir: &Path) -> serde_json::Value {
    // Prefer the ids of an existing config.json beside the tokenizer.
    let config = std::fs::read(tokenizer_dir.join("config.json")).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let get = |k: &str| config.as_ref().and_then(|c| c.get(k).cloned()).unwrap_or(serde_json::Value::Null);
    json!({ "bos_token_id": get("bos_token_id"), "eos_token_id": get("eos_token_id"), "pad_token_id": get("pad_token_id") })
}

fn run(args: &Args) -> Result<()> {
    anyhow::ensure!(args.heads % args.kv_heads == 0, "--heads ({}) must be a multiple of --kv-heads ({})", args.heads, args.kv_heads);
    anyhow::ensure!(args.hidden % args.heads == 0, "--hidden ({}) must be a multiple of --heads ({})", args.hidden, args.heads);
    let intermediate = args.intermediate.unwrap_or((args.hidden * 8 / 3).div_ceil(8) * 8);
    let (model_type, architecture) = match args.arch {
        Arch::Llama => ("llama", "LlamaForCausalLM"),
        Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        Arch::Mistral => ("mistral", "MistralForCausalLM"),
        Arch::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        Arch::Gemma2 => ("gemma2", "Gemma2ForCausalLM"),
        Arch::Gemma3 => ("gemma3_text", "Gemma3ForCausalLM"),
    };
    let gemma = matches!(args.arch, Arch::Gemma2 | Arch::Gemma3);
    anyhow::ensure!(gemma || (args.global_every.is_none() && args.query_pre_attn_scalar.is_none()), "--global-every and --query-pre-attn-scalar need --arch gemma2 or gemma3");
    anyhow::ensure!(args.sliding_window.is_none() || !matches!(args.arch, Arch::Llama), "--sliding-window needs an --arch other than llama (transformers' Llama has none)");
    let mut config = json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab_size(&args.tokenizer)?,
        "hidden_size": args.hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.hidden / args.heads,
        "max_position_embeddings": args.max_positions,
        "rms_norm_eps": if gemma { 1e-6 } else { 1e-5 },
        "tie_word_embeddings": args.tie_embeddings,
        "initializer_range": args.init_std,
        "torch_dtype": "float32",
    });
    let head_dim = args.hidden / args.heads;
    match args.arch {
        Arch::Gemma2 | Arch::Gemma3 => {
            config["hidden_activation"] = json!("gelu_pytorch_tanh");
            config["query_pre_attn_scalar"] = json!(args.query_pre_attn_scalar.unwrap_or(head_dim));
            let every = args.global_every.unwrap_or(if matches!(args.arch, Arch::Gemma2) { 2 } else { 6 });
            anyhow::ensure!(every >= 1, "--global-every must be at least 1");
            let types: Vec<&str> = (0..args.layers).map(|i| if (i + 1) % every != 0 { "sliding_attention" } else { "full_attention" }).collect();
            config["layer_types"] = json!(types);
        }
        _ => config["hidden_act"] = json!("silu"),
    }
    match args.arch {
        Arch::Gemma2 => {
            config["rope_theta"] = json!(10000.0);
            config["attn_logit_softcapping"] = json!(args.attn_softcap);
            config["final_logit_softcapping"] = json!(args.final_softcap);
        }
        Arch::Gemma3 => {
            config["rope_parameters"] = json!({
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            });
        }
        _ => config["rope_theta"] = json!(10000.0),
    }
    match (args.arch, args.sliding_window) {
        (Arch::Mistral, window) => config["sliding_window"] = json!(window),
        (Arch::Gemma2 | Arch::Gemma3, window) => config["sliding_window"] = json!(window.unwrap_or(4096)),
        (Arch::Qwen2 | Arch::Qwen3, Some(window)) => {
            config["use_sliding_window"] = json!(true);
            config["sliding_window"] = json!(window);
            config["max_window_layers"] = json!(args.max_window_layers);
        }
        _ => {}
    }
    for (k, v) in token_ids(&args.tokenizer).as_object().expect("object") {
        if !v.is_null() {
            config[k] = v.clone();
        }
    }
    let config: Config = serde_json::from_value(config)?;
    tch::manual_seed(args.seed);
    let model = CausalLm::random(config, &args.tokenizer, Device::Cpu, Kind::Float)?;
    model.save(&args.out)?;
    let params: i64 = model.vs.variables().values().map(|t| t.numel() as i64).sum();
    tracing::info!(out = %args.out.display(), params, "random model written");
    Ok(())
}
