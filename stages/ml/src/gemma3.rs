//! Gemma 3's text model (`Gemma3ForCausalLM`, model_type `gemma3_text`): the Gemma 2 block of
//! `gemma2.rs` with a `(1 + w)` RMSNorm over each head of q and k (`self_attn.q_norm`,
//! `self_attn.k_norm`) before the rotation, no soft-capping unless the config asks for it
//! (`attn_logit_softcapping` / `final_logit_softcapping`, default none), sliding layers by
//! `layer_types` (default: all but every `sliding_window_pattern`-th, 6), and two RoPE bases:
//! `rope_local_base_freq` (default 10000, never scaled) on sliding layers, `rope_theta`
//! (default 1e6, with `linear` scaling if configured; other kinds are refused) on global ones —
//! or the same from transformers 5's per-layer-type `rope_parameters`. `Attention::new`
//! (`layers.rs`) and [`crate::config::Config::local_rope`] encode the differences, so
//! [`crate::network::Network`] builds Gemma 3 with the Gemma 2 block; this module names the
//! variant and holds its tests.

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::network::Network;
    use tch::nn;

    fn config(extra: serde_json::Value) -> Config {
        let mut json = serde_json::json!({
            "model_type": "gemma3_text", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "max_position_embeddings": 64, "sliding_window": 4
        });
        json.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn gemma3_has_qk_norms_two_rope_bases_and_no_softcaps() {
        let c = config(serde_json::json!({}));
        let vs = nn::VarStore::new(tch::Device::Cpu);
        Network::new(&vs.root(), &c);
        let vars = vs.variables();
        assert_eq!(vars["model.layers.0.self_attn.q_norm.weight"].size(), [8]);
        assert!(vars.contains_key("model.layers.6.post_feedforward_layernorm.weight"));
        assert_eq!(c.sliding_window_layers().unwrap().1, [true, true, true, true, true, false, true], "five of six layers slide");
        assert_eq!((c.rope().unwrap().0, c.local_rope().unwrap().unwrap().0), (1e6, 1e4), "transformers' default bases");
        assert_eq!((c.softcap("attn_logit_softcapping"), c.softcap("final_logit_softcapping")), (None, None));
        let legacy = config(serde_json::json!({"rope_theta": 5e5, "rope_local_base_freq": 2e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}));
        let (theta, scaling) = legacy.rope().unwrap();
        assert_eq!((theta, scaling.unwrap().factor), (5e5, 8.0));
        assert_eq!(legacy.local_rope().unwrap(), Some((2e4, None)), "the local base is never scaled");
        let v5 = config(serde_json::json!({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 3e5}, "sliding_attention": {"rope_type": "default", "rope_theta": 7e3}}}));
        assert_eq!((v5.rope().unwrap().0, v5.local_rope().unwrap().unwrap().0), (3e5, 7e3));
    }

    #[test]
    fn gemma3_rope_scaling_other_than_linear_is_refused_by_name() {
        let yarn = config(serde_json::json!({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}));
        assert!(yarn.architecture().unwrap_err().to_string().contains("rope scaling type `yarn`"));
        let sliding = config(serde_json::json!({"sliding_window_pattern": 2}));
        assert_eq!(sliding.sliding_window_layers().unwrap().1, [true, false, true, false, true, false, true]);
    }
}
