//! Qwen3: the Llama block of `llama.rs` with an RMSNorm over each head of q and k
//! (`self_attn.q_norm`, `self_attn.k_norm`, width `head_dim`) before the rotation, no q/k/v
//! bias (unless `attention_bias`, which also adds one to o), `head_dim` from the config
//! (default 128, not hidden/heads), and sliding-window layers as transformers chooses them
//! (`use_sliding_window` with `layer_types`, else the layers from `max_window_layers` on).
//! `Attention::new` (`layers.rs`) adds the norms for this architecture, so
//! [`crate::network::Network`] builds Qwen3 with the Llama block; this module names the
//! variant and holds its tests.

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::network::Network;
    use tch::nn;

    fn config(extra: serde_json::Value) -> Config {
        let mut json = serde_json::json!({
            "model_type": "qwen3", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "tie_word_embeddings": true
        });
        json.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn qwen3_has_per_head_qk_norms_and_no_bias() {
        let c = config(serde_json::json!({"head_dim": 8}));
        let vs = nn::VarStore::new(tch::Device::Cpu);
        Network::new(&vs.root(), &c);
        let vars = vs.variables();
        assert_eq!(vars["model.layers.0.self_attn.q_norm.weight"].size(), [8]);
        assert_eq!(vars["model.layers.0.self_attn.k_norm.weight"].size(), [8]);
        assert_eq!(vars["model.layers.0.self_attn.q_proj.weight"].size(), [32, 16], "head_dim 8 × 4 heads");
        assert!(!vars.keys().any(|n| n.contains("bias")));
        assert_eq!(config(serde_json::json!({})).head_dim(), 128, "transformers' Qwen3 default");
    }

    #[test]
    fn qwen3_sliding_layers_follow_transformers() {
        let off = config(serde_json::json!({"sliding_window": 4}));
        assert_eq!(off.sliding_window_layers().unwrap(), (None, vec![false; 3]), "use_sliding_window defaults to false");
        let on = config(serde_json::json!({"sliding_window": 4, "use_sliding_window": true, "max_window_layers": 1}));
        assert_eq!(on.sliding_window_layers().unwrap(), (Some(4), vec![false, true, true]));
        let typed = config(serde_json::json!({"sliding_window": 4, "use_sliding_window": true, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}));
        assert_eq!(typed.sliding_window_layers().unwrap(), (Some(4), vec![true, false, true]));
    }
}
