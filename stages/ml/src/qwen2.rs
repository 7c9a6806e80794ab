//! Qwen2 / Qwen2.5: the Llama decoder of `llama.rs` with a bias on the q, k and v projections
//! (and none on o), RMSNorm ε and RoPE θ from the config. `Config::qkv_bias` encodes the
//! difference, so the Qwen2 model is built by the same code; this module names the variant and
//! holds its tests.

use tch::nn;

use crate::config::Config;
use crate::llama::Llama;

/// Builds a Qwen2 model under `vs`.
pub fn new(vs: &nn::Path, config: &Config) -> Llama {
    debug_assert!(config.qkv_bias() && !config.o_bias());
    Llama::new(vs, config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_has_qkv_bias_and_no_o_bias() {
        let config: Config = serde_json::from_value(serde_json::json!({
            "model_type": "qwen2", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "tie_word_embeddings": true
        }))
        .unwrap();
        let vs = nn::VarStore::new(tch::Device::Cpu);
        new(&vs.root(), &config);
        let names: Vec<String> = vs.variables().into_keys().collect();
        for bias in ["q_proj.bias", "k_proj.bias", "v_proj.bias"] {
            assert!(names.contains(&format!("model.layers.0.self_attn.{bias}")), "{bias} missing");
        }
        assert!(!names.iter().any(|n| n.contains("o_proj.bias") || n.starts_with("lm_head")));
    }
}
