//! Qwen2 / Qwen2.5: the Llama block of `llama.rs` with a bias on the q, k and v projections
//! (and none on o), RMSNorm ε and RoPE θ from the config. `Config::qkv_bias` encodes the
//! difference, so [`crate::network::Network`] builds Qwen2 with the Llama block; this module
//! names the variant and holds its tests.

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::network::Network;
    use tch::nn;

    #[test]
    fn qwen2_has_qkv_bias_and_no_o_bias() {
        let config: Config = serde_json::from_value(serde_json::json!({
            "model_type": "qwen2", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "tie_word_embeddings": true
        }))
        .unwrap();
        let vs = nn::VarStore::new(tch::Device::Cpu);
        Network::new(&vs.root(), &config);
        let names: Vec<String> = vs.variables().into_keys().collect();
        for bias in ["q_proj.bias", "k_proj.bias", "v_proj.bias"] {
            assert!(names.contains(&format!("model.layers.0.self_attn.{bias}")), "{bias} missing");
        }
        assert!(!names.iter().any(|n| n.contains("o_proj.bias") || n.starts_with("lm_head")));
    }
}
