//! haloflow's language-model core on libtorch (`tch`): Hugging Face checkpoints (Llama family,
//! Qwen2/Qwen3, Gemma 2/3), tokenizers and chat templates, and completion log-probabilities. Only the
//! machine-learning stages link this crate (and libtorch).

pub mod allocator;
pub mod chat_template;
pub mod config;
pub mod dataset;
pub mod device;
pub mod fingerprint;
pub mod gemma2;
pub mod gemma3;
pub mod generate;
pub mod layers;
pub mod llama;
pub mod logprobs;
pub mod lora;
pub mod memory;
pub mod losses;
pub mod model;
pub mod network;
pub mod prompt_format;
pub mod qwen2;
pub mod qwen3;
pub mod recompute;
pub mod weights;
pub mod tokenize;

