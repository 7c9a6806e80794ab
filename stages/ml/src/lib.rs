//! haloflow's language-model core on libtorch (`tch`): Hugging Face checkpoints (Llama family
//! and Qwen2), tokenizers and chat templates, and completion log-probabilities. Only the
//! machine-learning stages link this crate (and libtorch).

pub mod chat_template;
pub mod config;
pub mod dataset;
pub mod device;
pub mod fingerprint;
pub mod generate;
pub mod llama;
pub mod logprobs;
pub mod lora;
pub mod memory;
pub mod losses;
pub mod model;
pub mod prompt_format;
pub mod qwen2;
pub mod recompute;
pub mod weights;
pub mod tokenize;
