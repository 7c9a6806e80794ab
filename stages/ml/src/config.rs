//! `config.json` of a Hugging Face causal LM, as a plain struct (candle-transformers style).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The architectures haloflow implements, one file each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3 (with llama3 rope scaling), Mistral, TinyLlama, SmolLM: `llama.rs`.
    Llama,
    /// Qwen2 / Qwen2.5 (q/k/v projections with bias): `qwen2.rs`.
    Qwen2,
}

/// Names accepted in `model_type`, shown when a model is refused.
pub const SUPPORTED: &str = "llama (LlamaForCausalLM: Llama 2/3, TinyLlama, SmolLM), mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM: Qwen2, Qwen2.5)";

/// RoPE scaling (`rope_scaling` in config.json); only the `llama3` type changes frequencies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `llama3` (others are refused).
    #[serde(alias = "type")]
    pub rope_type: String,
    /// Scaling factor.
    pub factor: f64,
    /// Low-frequency factor (llama3).
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    /// High-frequency factor (llama3).
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    /// Context length the model was pretrained with (llama3).
    #[serde(default = "default_original_max")]
    pub original_max_position_embeddings: usize,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}
fn default_original_max() -> usize {
    8192
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}

/// A token id or a list of them (`eos_token_id` may be either).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(i64),
    /// Several ids.
    Many(Vec<i64>),
}

impl TokenIds {
    /// All ids.
    pub fn ids(&self) -> Vec<i64> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The fields of `config.json` that the model code reads. Unknown fields are kept in `extra`
/// so a saved checkpoint writes them back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to the query heads.
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to hidden_size / heads.
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Bias on q/k/v/o projections (Llama option; Qwen2 always has q/k/v bias).
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Whether the LM head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    pub pad_token_id: Option<TokenIds>,
    /// Mistral's sliding window (refused if shorter than a sequence, see `llama.rs`).
    pub sliding_window: Option<usize>,
    /// Everything else in config.json, written back unchanged on save.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Config {
    /// Reads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Config> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let config: Config = serde_json::from_str(&text).with_context(|| format!("{}: not a model config", path.display()))?;
        config.architecture().with_context(|| path.display().to_string())?;
        Ok(config)
    }

    /// The architecture, or an error listing the supported ones.
    pub fn architecture(&self) -> Result<Architecture> {
        let arch = match self.model_type.as_str() {
            "llama" | "mistral" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => bail!("unsupported architecture `{other}` ({:?}); supported: {SUPPORTED}", self.architectures),
        };
        if let Some(scaling) = &self.rope_scaling {
            if scaling.rope_type != "llama3" && scaling.rope_type != "default" {
                bail!("unsupported rope_scaling type `{}` (supported: llama3)", scaling.rope_type);
            }
        }
        Ok(arch)
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.architecture().ok() == Some(Architecture::Qwen2)
    }

    /// Whether the output projection carries a bias.
    pub fn o_bias(&self) -> bool {
        self.attention_bias && self.architecture().ok() == Some(Architecture::Llama)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_architectures_are_refused_with_the_list() {
        let json = r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16}"#;
        let config: Config = serde_json::from_str(json).unwrap();
        let err = config.architecture().unwrap_err().to_string();
        assert!(err.contains("gpt2") && err.contains("qwen2") && err.contains("llama"), "{err}");
    }

    #[test]
    fn defaults_and_eos_lists() {
        let json = r#"{"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
            "eos_token_id": [3, 4], "use_sliding_window": false}"#;
        let config: Config = serde_json::from_str(json).unwrap();
        assert_eq!((config.kv_heads(), config.head_dim()), (2, 4));
        assert!(config.qkv_bias() && !config.o_bias());
        assert_eq!(config.eos_token_id.unwrap().ids(), [3, 4]);
        assert!(config.extra.contains_key("use_sliding_window"));
    }
}
