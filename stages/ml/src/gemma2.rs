//! The Gemma 2 decoder block (Gemma 3's text model uses it too, see `gemma3.rs`):
//! `(1 + w)` RMSNorms before *and* after both attention and the MLP (`input_layernorm`,
//! `post_attention_layernorm`, `pre_feedforward_layernorm`, `post_feedforward_layernorm`),
//! grouped-query attention scaled by `query_pre_attn_scalar^-½` with soft-capped logits
//! (`attn_logit_softcapping`), and a GeGLU MLP (GELU, tanh approximation). The network around
//! it (`network.rs`) scales the embeddings by `sqrt(hidden)`, soft-caps the final logits
//! (`final_logit_softcapping`) and alternates sliding-window and global layers (`layer_types`;
//! by default every other layer slides, starting with the first).

use tch::nn;
use tch::Tensor;

use crate::config::Config;
use crate::layers::{self, Attention, Linear, Mlp, RmsNorm};
use crate::network::Layer;

/// One Gemma block.
#[derive(Debug)]
pub struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: RmsNorm,
    /// Whether the layer attends within the sliding window only.
    sliding: bool,
}

impl Block {
    /// The block's parameters under `vs` (`model.layers.N`).
    pub fn new(vs: nn::Path, c: &Config, sliding: bool) -> Block {
        let h = c.hidden_size;
        Block {
            sliding,
            input_layernorm: RmsNorm::of(&vs / "input_layernorm", c, h),
            self_attn: Attention::new(&vs / "self_attn", c),
            post_attention_layernorm: RmsNorm::of(&vs / "post_attention_layernorm", c, h),
            pre_feedforward_layernorm: RmsNorm::of(&vs / "pre_feedforward_layernorm", c, h),
            mlp: Mlp::new(&vs / "mlp", c),
            post_feedforward_layernorm: RmsNorm::of(&vs / "post_feedforward_layernorm", c, h),
        }
    }
}

impl Layer for Block {
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, cache: Option<&mut Option<(Tensor, Tensor)>>) -> Tensor {
        let attn = self.self_attn.forward(&self.input_layernorm.forward(x), cos, sin, mask, cache);
        let h = x + self.post_attention_layernorm.forward(&attn);
        let mlp = self.mlp.forward(&self.pre_feedforward_layernorm.forward(&h));
        &h + self.post_feedforward_layernorm.forward(&mlp)
    }

    fn sliding(&self) -> bool {
        self.sliding
    }

    fn projections(&mut self) -> Vec<(&'static str, &mut Linear)> {
        layers::projections(&mut self.self_attn, &mut self.mlp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::Network;

    #[test]
    fn gemma2_has_four_norms_per_layer_and_a_tied_head() {
        let config: Config = serde_json::from_value(serde_json::json!({
            "model_type": "gemma2", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "max_position_embeddings": 64, "sliding_window": 4
        }))
        .unwrap();
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let net = Network::new(&vs.root(), &config);
        let names: Vec<String> = vs.variables().into_keys().collect();
        for norm in ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"] {
            assert!(names.contains(&format!("model.layers.1.{norm}.weight")), "{norm} missing");
        }
        assert!(!names.iter().any(|n| n.contains("q_norm") || n.starts_with("lm_head") || n.contains("bias")), "{names:?}");
        assert_eq!(config.sliding_window_layers().unwrap(), (Some(4), vec![true, false]), "every other layer slides, from the first");
        assert_eq!(net.sliding_window(), Some(4));
        assert_eq!((config.softcap("attn_logit_softcapping"), config.softcap("final_logit_softcapping")), (Some(50.0), Some(30.0)));
        assert_eq!(config.attention_scale(), Some(1.0 / 16.0), "query_pre_attn_scalar defaults to 256");
    }

    #[test]
    fn gemma_configs_asking_for_unimplemented_features_are_refused_by_name() {
        let base = serde_json::json!({"model_type": "gemma2", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64, "sliding_window": 4});
        for (extra, name) in [
            (serde_json::json!({"hidden_activation": "gelu"}), "hidden_activation `gelu`"),
            (serde_json::json!({"use_bidirectional_attention": true}), "use_bidirectional_attention"),
            (serde_json::json!({"sliding_window": null}), "sliding_window"),
        ] {
            let mut json = base.clone();
            json.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let config: Config = serde_json::from_value(json).unwrap();
            let err = config.architecture().unwrap_err().to_string();
            assert!(err.contains(name), "{name}: {err}");
        }
    }
}
