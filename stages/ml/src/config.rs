//! `config.json` of a Hugging Face causal LM, as a plain struct (candle-transformers style).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

/// The architectures haloflow implements, one file each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3 (with llama3 rope scaling), Mistral, TinyLlama, SmolLM: `llama.rs`.
    Llama,
    /// Qwen2 / Qwen2.5 (q/k/v projections with bias): `qwen2.rs`.
    Qwen2,
    /// Qwen3 (RMSNorm of q and k per head, no q/k/v bias): `qwen3.rs`.
    Qwen3,
    /// Gemma 2 (GeGLU, (1 + w) RMSNorm before and after attention and MLP, scaled embeddings,
    /// soft-capped attention and final logits, alternating sliding/global layers): `gemma2.rs`.
    Gemma2,
    /// Gemma 3's text model (Gemma 2 with q/k norms and local/global RoPE bases): `gemma3.rs`.
    Gemma3,
}

impl Architecture {
    /// Whether the architecture is Gemma's (2 or 3): `gemma2.rs`'s decoder block.
    pub fn is_gemma(self) -> bool {
        matches!(self, Architecture::Gemma2 | Architecture::Gemma3)
    }
}

/// Names accepted in `model_type`, shown when a model is refused.
pub const SUPPORTED: &str = "llama (LlamaForCausalLM: Llama 2/3, TinyLlama, SmolLM), mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM: Qwen2, Qwen2.5), qwen3 (Qwen3ForCausalLM), gemma2 (Gemma2ForCausalLM), gemma3_text (Gemma3ForCausalLM: Gemma 3's text model)";

/// RoPE scaling (`rope_scaling` in config.json): `llama3` and `linear` change frequencies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `llama3` or `linear` (others are refused).
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
    /// `llama`, `mistral`, `qwen2`, `qwen3`, `gemma2` or `gemma3_text`.
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
    /// Per-head width; defaults to hidden_size / heads (Qwen3: 128, Gemma: 256).
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (absent: 10000, or Gemma 3's 1e6 for its global layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// RoPE scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Bias on q/k/v/o projections (Qwen2 always has q/k/v bias and never an o bias).
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on MLP projections (Llama only; the others' transformers code ignores it).
    #[serde(default)]
    pub mlp_bias: bool,
    /// Whether the LM head shares the embedding matrix (absent: [`Config::tied`]'s default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    pub pad_token_id: Option<TokenIds>,
    /// The sliding window (keys a query sees, itself included): every layer of a Mistral
    /// model; Qwen2/Qwen3's layers from `max_window_layers` on when `use_sliding_window` is set
    /// (or those its `layer_types` name); Gemma's sliding layers (`layer_types`, or every
    /// other layer for Gemma 2 and five of six for Gemma 3); ignored for `llama`, as
    /// transformers ignores it.
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
            "qwen3" => Architecture::Qwen3,
            "gemma2" => Architecture::Gemma2,
            "gemma3_text" => Architecture::Gemma3,
            other => bail!("unsupported architecture `{other}` ({:?}); supported: {SUPPORTED}", self.architectures),
        };
        self.refuse_unimplemented(arch)?;
        self.sliding_window_layers()?;
        Ok(arch)
    }

    /// Refuses fields of config.json that change the model's math in transformers and that
    /// haloflow does not implement, naming them (rather than computing something else).
    fn refuse_unimplemented(&self, arch: Architecture) -> Result<()> {
        let extra = |k: &str| self.extra.get(k).filter(|v| !v.is_null());
        if arch.is_gemma() {
            // Gemma reads `hidden_activation` (transformers ignores `hidden_act` there).
            if let Some(act) = extra("hidden_activation").and_then(|v| v.as_str()).filter(|a| *a != "gelu_pytorch_tanh") {
                bail!("unsupported hidden_activation `{act}` (supported: gelu_pytorch_tanh)");
            }
            if extra("use_bidirectional_attention").and_then(|v| v.as_bool()) == Some(true) {
                bail!("unsupported use_bidirectional_attention = true (haloflow implements causal attention)");
            }
            ensure!(self.sliding_window.is_some(), "{} config without sliding_window (transformers would use 4096): set it", self.model_type);
        } else if let Some(act) = extra("hidden_act").and_then(|v| v.as_str()).filter(|a| *a != "silu") {
            bail!("unsupported hidden_act `{act}` (supported: silu)");
        }
        self.rope()?;
        self.local_rope()?;
        if let Some(f) = extra("partial_rotary_factor").and_then(|v| v.as_f64()).filter(|f| *f != 1.0) {
            bail!("unsupported partial_rotary_factor {f} (haloflow rotates the whole head)");
        }
        if let Some(tp) = extra("pretraining_tp").and_then(|v| v.as_i64()).filter(|tp| *tp != 1) {
            bail!("unsupported pretraining_tp {tp} (haloflow implements pretraining_tp = 1)");
        }
        Ok(())
    }

    /// RoPE's base θ and scaling (of the global layers, for Gemma 3): from `rope_parameters`
    /// (transformers 5 writes them there; Gemma 3 nests them per layer type) when present,
    /// else from `rope_theta` and `rope_scaling`. Scaling types other than `default`, `linear`
    /// and `llama3` are refused.
    pub fn rope(&self) -> Result<(f64, Option<RopeScaling>)> {
        let global_theta = if self.model_type == "gemma3_text" { 1e6 } else { 10000.0 };
        self.rope_of("full_attention", self.rope_theta.unwrap_or(global_theta), self.rope_scaling.clone())
    }

    /// Gemma 3's RoPE for its sliding-window layers (`rope_parameters.sliding_attention`, or
    /// `rope_local_base_freq`, default 10000, without scaling); `None` for the others, whose
    /// layers all use [`Config::rope`].
    pub fn local_rope(&self) -> Result<Option<(f64, Option<RopeScaling>)>> {
        if self.model_type != "gemma3_text" {
            return Ok(None);
        }
        let theta = self.extra.get("rope_local_base_freq").and_then(|v| v.as_f64()).unwrap_or(10000.0);
        self.rope_of("sliding_attention", theta, None).map(Some)
    }

    /// θ and scaling from `rope_parameters` (its `layer_type` entry for Gemma 3), else the
    /// given legacy values.
    fn rope_of(&self, layer_type: &str, theta: f64, scaling: Option<RopeScaling>) -> Result<(f64, Option<RopeScaling>)> {
        let params = self.extra.get("rope_parameters").filter(|v| !v.is_null());
        let params = match params {
            Some(p) if self.model_type == "gemma3_text" => p.get(layer_type).filter(|v| !v.is_null()),
            p => p,
        };
        let (theta, scaling) = match params {
            Some(p) => {
                let theta = p.get("rope_theta").and_then(|v| v.as_f64()).unwrap_or(theta);
                let kind = p.get("rope_type").or(p.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
                let scaling = match kind {
                    "default" => None,
                    _ => Some(serde_json::from_value::<RopeScaling>(p.clone()).with_context(|| format!("rope_parameters {p}: not a rope scaling"))?),
                };
                (theta, scaling)
            }
            None => (theta, scaling.filter(|s| s.rope_type != "default")),
        };
        if let Some(s) = &scaling {
            ensure!(s.rope_type == "llama3" || s.rope_type == "linear", "unsupported rope scaling type `{}` (supported: linear, llama3)", s.rope_type);
        }
        Ok((theta, scaling))
    }

    /// The sliding window and, per layer, whether it applies, as transformers 5 decides:
    /// `mistral`: every layer when `sliding_window` is set; `qwen2`/`qwen3`: when
    /// `use_sliding_window` is true, the layers `layer_types` marks `sliding_attention`, or else
    /// those from `max_window_layers` (default 28) on; `gemma2`/`gemma3_text`: the layers
    /// `layer_types` marks, or else every other one from the first (Gemma 2) or all but every
    /// `sliding_window_pattern`-th (default 6; Gemma 3); `llama`: none. A window of 0 or an
    /// unknown layer type is refused.
    pub fn sliding_window_layers(&self) -> Result<(Option<usize>, Vec<bool>)> {
        let n = self.num_hidden_layers;
        let window = match self.model_type.as_str() {
            "mistral" | "gemma2" | "gemma3_text" => self.sliding_window,
            "qwen2" | "qwen3" if self.extra.get("use_sliding_window").and_then(|v| v.as_bool()).unwrap_or(false) => self.sliding_window,
            _ => None,
        };
        let Some(window) = window else { return Ok((None, vec![false; n])) };
        ensure!(window >= 1, "sliding_window must be at least 1, got {window}");
        let layers = match (self.model_type.as_str(), self.extra.get("layer_types").filter(|v| !v.is_null())) {
            ("mistral", _) => vec![true; n],
            (_, Some(types)) => {
                let types: Vec<String> = serde_json::from_value(types.clone()).context("layer_types: not a list of strings")?;
                ensure!(types.len() == n, "layer_types has {} entries for {n} layers", types.len());
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => bail!("unsupported layer type `{other}` in layer_types (supported: sliding_attention, full_attention)"),
                    })
                    .collect::<Result<_>>()?
            }
            ("gemma2", None) => (0..n).map(|i| (i + 1) % 2 != 0).collect(),
            ("gemma3_text", None) => {
                let pattern = self.extra.get("sliding_window_pattern").and_then(|v| v.as_u64()).unwrap_or(6) as usize;
                ensure!(pattern >= 1, "sliding_window_pattern must be at least 1");
                (0..n).map(|i| (i + 1) % pattern != 0).collect()
            }
            _ => {
                let first = self.extra.get("max_window_layers").and_then(|v| v.as_u64()).unwrap_or(28) as usize;
                (0..n).map(|i| i >= first).collect()
            }
        };
        Ok((layers.iter().any(|&l| l).then_some(window), layers))
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width: `head_dim`, or transformers' default for the architecture.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(match self.model_type.as_str() {
            "qwen3" => 128,
            "gemma2" | "gemma3_text" => 256,
            _ => self.hidden_size / self.num_attention_heads,
        })
    }

    /// Whether q/k/v projections carry a bias.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }

    /// Whether the output projection carries a bias (`attention_bias`, except for Qwen2).
    pub fn o_bias(&self) -> bool {
        self.attention_bias && self.model_type != "qwen2"
    }

    /// Whether the LM head is the embedding matrix: `tie_word_embeddings`, by default true
    /// for Gemma (as transformers' Gemma configs) and false otherwise.
    pub fn tied(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(matches!(self.model_type.as_str(), "gemma2" | "gemma3_text"))
    }

    /// Whether the MLP projections carry a bias (`mlp_bias`, read by Llama/Mistral only).
    pub fn mlp_bias(&self) -> bool {
        self.mlp_bias && matches!(self.model_type.as_str(), "llama" | "mistral")
    }

    /// Gemma's attention scale `query_pre_attn_scalar^-½` (default 256); `None` elsewhere
    /// (`head_dim^-½`).
    pub fn attention_scale(&self) -> Option<f64> {
        let arch = self.architecture().ok()?;
        arch.is_gemma().then(|| self.extra.get("query_pre_attn_scalar").and_then(|v| v.as_f64()).unwrap_or(256.0).powf(-0.5))
    }

    /// A soft-capping value `key` (`attn_logit_softcapping`, `final_logit_softcapping`):
    /// Gemma 2's defaults 50 and 30 when absent, Gemma 3's none; never for other architectures.
    pub fn softcap(&self, key: &str) -> Option<f64> {
        let default = match (self.model_type.as_str(), key) {
            ("gemma2", "attn_logit_softcapping") => Some(50.0),
            ("gemma2", "final_logit_softcapping") => Some(30.0),
            ("gemma2" | "gemma3_text", _) => None,
            _ => return None,
        };
        match self.extra.get(key) {
            Some(v) if v.is_null() => None,
            Some(v) => v.as_f64(),
            None => default,
        }
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

    fn config(extra: serde_json::Value) -> Config {
        let mut json = serde_json::json!({"model_type": "mistral", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 4, "num_attention_heads": 2, "max_position_embeddings": 16});
        json.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn sliding_windows_follow_transformers() {
        assert_eq!(config(serde_json::json!({"sliding_window": 5})).sliding_window_layers().unwrap(), (Some(5), vec![true; 4]));
        assert_eq!(config(serde_json::json!({"sliding_window": null})).sliding_window_layers().unwrap(), (None, vec![false; 4]));
        let llama = config(serde_json::json!({"model_type": "llama", "sliding_window": 5}));
        assert_eq!(llama.sliding_window_layers().unwrap(), (None, vec![false; 4]));
        let qwen = |extra: serde_json::Value| config(serde_json::json!({"model_type": "qwen2", "sliding_window": 3})).with(extra);
        assert_eq!(qwen(serde_json::json!({})).sliding_window_layers().unwrap(), (None, vec![false; 4]), "use_sliding_window defaults to false");
        let mixed = qwen(serde_json::json!({"use_sliding_window": true, "max_window_layers": 2}));
        assert_eq!(mixed.sliding_window_layers().unwrap(), (Some(3), vec![false, false, true, true]));
        let all_full = qwen(serde_json::json!({"use_sliding_window": true}));
        assert_eq!(all_full.sliding_window_layers().unwrap(), (None, vec![false; 4]), "max_window_layers defaults to 28");
        let typed = qwen(serde_json::json!({"use_sliding_window": true, "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]}));
        assert_eq!(typed.sliding_window_layers().unwrap(), (Some(3), vec![true, false, true, false]));
        let odd = qwen(serde_json::json!({"use_sliding_window": true, "layer_types": ["chunked_attention", "full_attention", "full_attention", "full_attention"]}));
        assert!(odd.architecture().unwrap_err().to_string().contains("chunked_attention"));
        assert!(config(serde_json::json!({"sliding_window": 0})).architecture().unwrap_err().to_string().contains("sliding_window"));
    }

    #[test]
    fn math_changing_fields_are_refused_by_name() {
        for (extra, name) in [
            (serde_json::json!({"hidden_act": "gelu"}), "hidden_act"),
            (serde_json::json!({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}), "rope scaling type `yarn`"),
            (serde_json::json!({"partial_rotary_factor": 0.5}), "partial_rotary_factor"),
            (serde_json::json!({"pretraining_tp": 2}), "pretraining_tp"),
            (serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}), "rope scaling type `yarn`"),
        ] {
            let err = config(extra).architecture().unwrap_err().to_string();
            assert!(err.contains(name), "{name}: {err}");
        }
        assert!(config(serde_json::json!({"hidden_act": "silu", "pretraining_tp": 1})).architecture().is_ok());
        let v5 = config(serde_json::json!({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}));
        assert_eq!(v5.rope().unwrap(), (5e5, None), "transformers 5 keeps θ in rope_parameters");
    }

    impl Config {
        fn with(mut self, extra: serde_json::Value) -> Config {
            self.extra.extend(extra.as_object().unwrap().clone());
            self
        }
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
