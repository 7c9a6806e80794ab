//! The Llama decoder block (Llama 2/3, Mistral, TinyLlama, SmolLM; Qwen2 and Qwen3 use it
//! too, see `qwen2.rs` and `qwen3.rs`): pre-norm grouped-query attention with rotary position
//! embeddings, then a pre-norm SwiGLU MLP, each added to the residual stream.
//!
//! Parameter names are those of Hugging Face checkpoints (`model.layers.0.self_attn.q_proj.weight`),
//! so weights load and save without renaming.

use tch::nn;
use tch::Tensor;

use crate::config::Config;
use crate::layers::{self, Attention, Linear, Mlp, RmsNorm};
use crate::network::Layer;

/// One Llama block.
#[derive(Debug)]
pub struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    /// Whether the layer attends within the sliding window only.
    sliding: bool,
}

impl Block {
    /// The block's parameters under `vs` (`model.layers.N`).
    pub fn new(vs: nn::Path, c: &Config, sliding: bool) -> Block {
        Block {
            sliding,
            input_layernorm: RmsNorm::new(&vs / "input_layernorm", c.hidden_size, c.rms_norm_eps),
            self_attn: Attention::new(&vs / "self_attn", c),
            post_attention_layernorm: RmsNorm::new(&vs / "post_attention_layernorm", c.hidden_size, c.rms_norm_eps),
            mlp: Mlp::new(&vs / "mlp", c),
        }
    }
}

impl Layer for Block {
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, cache: Option<&mut Option<(Tensor, Tensor)>>) -> Tensor {
        let h = x + self.self_attn.forward(&self.input_layernorm.forward(x), cos, sin, mask, cache);
        &h + self.mlp.forward(&self.post_attention_layernorm.forward(&h))
    }

    fn sliding(&self) -> bool {
        self.sliding
    }

    fn projections(&mut self) -> Vec<(&'static str, &mut Linear)> {
        layers::projections(&mut self.self_attn, &mut self.mlp)
    }
}
