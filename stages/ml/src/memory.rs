//! A training memory estimate from a model's config (like `accelerate estimate-memory`, but for
//! training): weights, gradients, AdamW state, f32 master weights, a live reference model and
//! activations, in bytes, for a dtype, microbatch, sequence length, activation checkpointing,
//! ranks and ZeRO-1 sharding.
//!
//! The counts follow haloflow's model and trainer:
//! - parameters: embeddings, per layer q/k/v/o (with their biases), the gated MLP and two
//!   RMSNorms (four for Gemma; plus per-head q/k norms for Qwen3 and Gemma 3), the final norm
//!   and an untied LM head;
//! - trained tensors: every parameter (full training), or the count given in
//!   [`Setup::trainable`] (LoRA adapters);
//! - gradients in the weights' dtype, counted whole: halo-train drops them between steps (as
//!   torch's `zero_grad()`; DDP's bucket views excepted), so the forward passes run without
//!   them, but most exist at the backward pass's peak; AdamW moments in f32 (2 per trained element); f32 master
//!   weights when the weights are bf16/f16; with ZeRO-1 moments and masters are divided by the
//!   ranks, and bf16/f16 weights add the rank's slice of the reduced gradients in f32 (counted
//!   with the master weights); with ZeRO-2 the gradients are that slice in f32 (each window's
//!   leave once it is copied for its reduce-scatter); left out: the collectives' buffers at the end of the backward
//!   pass, when most activations are freed (with the overlap on: ZeRO-1's windows in flight
//!   plus, for f32 weights, the shard's f32 sums; DDP's buckets are the gradients' own memory
//!   and cost nothing);
//! - activations of the forwards with gradient of one microbatch (`sequences × length` tokens):
//!   per layer and token the tensors autograd keeps — the two RMSNorms' inputs and outputs
//!   (plus their f32 copies below f32), rotated q and k, v, the attention output and its
//!   log-sum-exp per head, and the MLP's gate, up, SiLU(gate) and product — and the head's
//!   logits for the completion positions with gradient ([`Setup::head_positions`]: only those
//!   reach the LM head, `logprobs::completion_logps`), in the dtype and the f32 copy
//!   log-sum-exp keeps, with the three f32 buffers that backward holds at once for one chunk
//!   of `chunk` positions (log-sum-exp's gradient and its temporary, and the gather's scattered
//!   gradient; backward walks the chunks one by one, freeing each chunk's logits), or, when it
//!   is more, the kept logits with one chunk of the passes without gradient (`chunk` positions'
//!   f32 logits and log-softmax's temporary). Measured (`examples/lmhead_memory.rs`, 262k
//!   vocabulary, mimalloc purging at once): 4.0× the logits of 512 and of 1024 positions, 2.7×
//!   for 1536 and 2.5× for 2048 in chunks of 1024; the count is 4.0, 4.0, 3.0 and 2.5×, an
//!   upper bound where the last chunk is partial. Gemma adds its two further norms'
//!   inputs and outputs, Qwen3 and Gemma 3 the q/k norms' inputs; Gemma 2's soft-capped
//!   attention is computed outside SDPA and keeps, per head and key, the capped logits and the
//!   probabilities (dtype) and the softmax output (f32), plus the key/value heads repeated to
//!   the query heads and the boolean mask; its soft-capped final logits keep one more copy.
//!   With checkpointing only each layer's input is kept, plus one layer's activations while it
//!   is recomputed. Attention scores are not counted (SDPA's fused kernels do not keep them).
//!
//! The framework's own memory (libtorch's code and state, the tokenizer, the data) is the
//! `runtime` part: the process's resident memory when the estimate is made ([`Setup::runtime`],
//! host memory; the CUDA fit check compares [`Estimate::tensors`] with the device's free memory).
//! Not counted: allocator caches, PPO's value head, and the no-grad forwards (reference, KL
//! partners) beyond their LM head's chunk.

use serde::Serialize;

use crate::config::{Architecture, Config};

/// GiB in bytes.
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// What a training run looks like, for the estimate.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Bytes per weight element (4: f32, 2: bf16/f16).
    pub dtype_bytes: usize,
    /// Sequences run forward with gradient per microbatch (rows; twice the pairs for paired
    /// losses).
    pub sequences: usize,
    /// Tokens per sequence (the longest a microbatch may pad to).
    pub length: usize,
    /// Completion positions a microbatch's passes with gradient run through the LM head (the
    /// most of any microbatch); at most `sequences × length`, the bound taken without data.
    pub head_positions: usize,
    /// Positions whose logits the passes without gradient compute at once (`--logits-chunk`).
    pub chunk: usize,
    /// Bytes the process holds besides the estimated tensors (see the module documentation).
    pub runtime: f64,
    /// Activation checkpointing.
    pub checkpointing: bool,
    /// Trained elements when not every parameter is (LoRA adapters); `None`: full training.
    pub trainable: Option<u64>,
    /// Processes of a data-parallel run.
    pub ranks: usize,
    /// ZeRO-1 sharding of the optimizer state.
    pub shard_optimizer: bool,
    /// ZeRO-2: the gradients sharded too (implies `shard_optimizer`).
    pub shard_gradients: bool,
    /// A live reference model (a second copy of the weights).
    pub live_reference: bool,
}

/// The estimate, per process, in bytes.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Estimate {
    /// Model parameters.
    pub parameters: u64,
    /// Trained elements.
    pub trainable: u64,
    /// The policy's weights.
    pub weights: f64,
    /// A live reference model's weights (0 without one).
    pub reference: f64,
    /// Gradients of the trained elements.
    pub gradients: f64,
    /// AdamW moments (and ZeRO-1's flat buffer).
    pub optimizer: f64,
    /// f32 master weights.
    pub master_weights: f64,
    /// Activations kept for backward at the peak of one microbatch.
    pub activations: f64,
    /// The LM head's part of `activations` (logits and backward's buffers).
    pub head_activations: f64,
    /// Completion positions counted through the LM head ([`Setup::head_positions`]).
    pub head_positions: usize,
    /// The process's own memory (host), measured when the estimate was made.
    pub runtime: f64,
}

impl Estimate {
    /// The sum of the parts.
    pub fn total(&self) -> f64 {
        self.tensors() + self.runtime
    }

    /// The tensors' part: what a CUDA run holds on the device.
    pub fn tensors(&self) -> f64 {
        self.weights + self.reference + self.gradients + self.optimizer + self.master_weights + self.activations
    }

    /// The parts in GiB, for summary.json.
    pub fn to_json(&self) -> serde_json::Value {
        let gib = |b: f64| (b / GIB * 1000.0).round() / 1000.0;
        serde_json::json!({
            "parameters": self.parameters,
            "trainable": self.trainable,
            "weights_gib": gib(self.weights),
            "reference_gib": gib(self.reference),
            "gradients_gib": gib(self.gradients),
            "optimizer_gib": gib(self.optimizer),
            "master_weights_gib": gib(self.master_weights),
            "activations_gib": gib(self.activations),
            "head_activations_gib": gib(self.head_activations),
            "head_positions": self.head_positions,
            "runtime_gib": gib(self.runtime),
            "total_gib": gib(self.total()),
        })
    }

    /// A printable table in GiB.
    pub fn table(&self) -> String {
        let rows = [
            ("weights", self.weights),
            ("reference (live)", self.reference),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("master weights", self.master_weights),
            ("activations", self.activations),
            ("  of it LM head", self.head_activations),
            ("runtime (process)", self.runtime),
            ("total", self.total()),
        ];
        let mut out = format!("parameters {} (trained {})\n", self.parameters, self.trainable);
        for (name, bytes) in rows {
            out.push_str(&format!("{name:<18} {:>9.3} GiB\n", bytes / GIB));
        }
        out
    }
}

/// Parameter count of `config`'s model.
pub fn parameter_count(c: &Config) -> u64 {
    let (h, v, i) = (c.hidden_size as u64, c.vocab_size as u64, c.intermediate_size as u64);
    let (q, kv) = ((c.num_attention_heads * c.head_dim()) as u64, (c.kv_heads() * c.head_dim()) as u64);
    let qkv_bias = if c.qkv_bias() { q + 2 * kv } else { 0 };
    let o_bias = if c.o_bias() { h } else { 0 };
    let mlp_bias = if c.mlp_bias() { 2 * i + h } else { 0 };
    let (norms, qk_norms) = norms(c);
    let layer = h * q + 2 * h * kv + q * h + qkv_bias + o_bias + 3 * h * i + mlp_bias + norms * h + qk_norms * c.head_dim() as u64;
    let head = if c.tied() { 0 } else { v * h };
    v * h + c.num_hidden_layers as u64 * layer + h + head
}

/// RMSNorms of width `hidden` per layer, and per-head q/k norms (of width `head_dim`).
fn norms(c: &Config) -> (u64, u64) {
    let arch = c.architecture().ok();
    let norms = if arch.is_some_and(|a| a.is_gemma()) { 4 } else { 2 };
    let qk = if matches!(arch, Some(Architecture::Qwen3 | Architecture::Gemma3)) { 2 } else { 0 };
    (norms, qk)
}

/// Activation bytes one layer keeps per token, for sequences of `length` tokens.
fn layer_bytes(c: &Config, dtype_bytes: usize, length: usize) -> f64 {
    let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    let (q, kv, heads) = ((c.num_attention_heads * c.head_dim()) as u64, (c.kv_heads() * c.head_dim()) as u64, c.num_attention_heads as u64);
    let (norms, qk_norms) = norms(c);
    // Each norm's input and output; the q/k norms' inputs (their outputs are the rotated q, k).
    let mut in_dtype = 2 * norms * h + 2 * q + 2 * kv + 4 * i + if qk_norms > 0 { q + kv } else { 0 };
    // Log-sum-exp per head (f32), RMSNorm's f32 copies of its inputs below f32.
    let mut f32s = heads + if dtype_bytes < 4 { norms * h } else { 0 };
    let mut bytes = 0.0;
    if c.softcap("attn_logit_softcapping").is_some() {
        let keys = length as u64;
        in_dtype += 2 * heads * keys + 2 * q;
        f32s += heads * keys - heads;
        bytes += keys as f64;
    }
    in_dtype as f64 * dtype_bytes as f64 + f32s as f64 * 4.0 + bytes
}

/// The process's `field` of /proc/self/status (`VmRSS:`, `VmHWM:`) in bytes; `None` where it
/// cannot be read (not Linux).
pub fn process_status_bytes(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

/// The estimate for `config` trained as `setup` says.
pub fn estimate(config: &Config, setup: &Setup) -> Estimate {
    let parameters = parameter_count(config);
    let trainable = setup.trainable.unwrap_or(parameters);
    let s = setup.dtype_bytes as f64;
    let (p, t) = (parameters as f64, trainable as f64);
    let world = setup.ranks.max(1) as f64;
    let narrow = setup.dtype_bytes < 4;
    let (optimizer, master_weights, gradients) = if setup.shard_gradients {
        (2.0 * t * 4.0 / world, if narrow { t * 4.0 / world } else { 0.0 }, t * 4.0 / world)
    } else if setup.shard_optimizer {
        (2.0 * t * 4.0 / world, if narrow { 2.0 * t * 4.0 / world } else { 0.0 }, t * s)
    } else {
        (2.0 * t * 4.0, if narrow { t * 4.0 } else { 0.0 }, t * s)
    };
    let tokens = (setup.sequences * setup.length) as f64;
    let layer = tokens * layer_bytes(config, setup.dtype_bytes, setup.length);
    let layers = config.num_hidden_layers as f64;
    let h = config.hidden_size as f64;
    let layers_kept = if setup.checkpointing { layers * tokens * h * s + layer } else { layers * layer };
    // The head: logits of the completion positions in the dtype (when not f32) and as f32
    // (soft-capped logits keep one more copy in the dtype, tanh's output), with backward's three
    // f32 buffers for one chunk, or, before backward, with one no-grad chunk's f32 logits and
    // temporary, whichever is more.
    let capped = if config.softcap("final_logit_softcapping").is_some() { s } else { 0.0 };
    let vocab = config.vocab_size as f64;
    let kept = setup.head_positions as f64 * vocab * (if setup.dtype_bytes < 4 { s } else { 0.0 } + capped + 4.0);
    let chunk = setup.chunk.max(1) as f64;
    let head = kept + vocab * 4.0 * f64::max(3.0 * chunk.min(setup.head_positions as f64), 2.0 * chunk);
    Estimate {
        parameters,
        trainable,
        weights: p * s,
        reference: if setup.live_reference { p * s } else { 0.0 },
        gradients,
        optimizer,
        master_weights,
        activations: layers_kept + head,
        head_activations: head,
        head_positions: setup.head_positions,
        runtime: setup.runtime,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3_8b() -> Config {
        serde_json::from_value(serde_json::json!({
            "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": false
        }))
        .unwrap()
    }

    fn setup() -> Setup {
        Setup { dtype_bytes: 2, sequences: 4, length: 1024, head_positions: 4096, chunk: 1024, runtime: 0.0, checkpointing: false, trainable: None, ranks: 1, shard_optimizer: false, shard_gradients: false, live_reference: false }
    }

    #[test]
    fn llama3_8b_has_its_published_parameter_count() {
        // Meta's Llama-3-8B: 8,030,261,248 parameters.
        assert_eq!(parameter_count(&llama3_8b()), 8_030_261_248);
    }

    #[test]
    fn the_parts_follow_the_arithmetic() {
        let c = llama3_8b();
        let p = 8_030_261_248f64;
        let e = estimate(&c, &setup());
        assert_eq!((e.weights, e.gradients, e.optimizer, e.master_weights, e.reference), (2.0 * p, 2.0 * p, 8.0 * p, 4.0 * p, 0.0));
        // Per token and layer: 4·4096 + 2·4096 + 2·1024 + 4·14336 bf16 elements, 32 + 2·4096 f32.
        let per_layer = 4096.0 * ((16384.0 + 8192.0 + 2048.0 + 57344.0) * 2.0 + (32.0 + 8192.0) * 4.0);
        // The completions' logits in bf16 and f32, backward's three f32 buffers for one chunk.
        let logits = 4096.0 * 128256.0 * 6.0 + 3.0 * 1024.0 * 128256.0 * 4.0;
        assert_eq!((e.activations, e.head_activations, e.head_positions), (32.0 * per_layer + logits, logits, 4096));
        // Only completion positions reach the LM head with gradient; with few of them the
        // no-grad passes' chunk (f32 logits and a temporary) beside them is more than backward's buffers.
        let few = estimate(&c, &Setup { head_positions: 500, ..setup() });
        assert_eq!(few.activations, 32.0 * per_layer + 500.0 * 128256.0 * 6.0 + 1024.0 * 128256.0 * 8.0);
        // Between the two, backward's buffers for all of them.
        let some = estimate(&c, &Setup { head_positions: 900, ..setup() });
        assert_eq!(some.head_activations, 900.0 * 128256.0 * 6.0 + 3.0 * 900.0 * 128256.0 * 4.0);
        // The runtime counts in the total, not in the tensors a CUDA device holds.
        let r = estimate(&c, &Setup { runtime: 5e8, ..setup() });
        assert_eq!((r.total() - e.total(), r.tensors()), (5e8, e.tensors()));
        // Checkpointing keeps each layer's input and one layer's activations.
        let ck = estimate(&c, &Setup { checkpointing: true, ..setup() });
        assert_eq!(ck.activations, 32.0 * 4096.0 * 4096.0 * 2.0 + per_layer + logits);
        // ZeRO-1 over 4 ranks: a quarter of the moments, and of the masters and reduced
        // gradients in f32 (bf16 weights); none of the latter for f32 weights.
        let z = estimate(&c, &Setup { ranks: 4, shard_optimizer: true, ..setup() });
        assert_eq!((z.optimizer, z.master_weights), (2.0 * p, 2.0 * p));
        let z32 = estimate(&c, &Setup { ranks: 4, shard_optimizer: true, dtype_bytes: 4, ..setup() });
        assert_eq!((z32.optimizer, z32.master_weights), (2.0 * p, 0.0));
        // ZeRO-2: the gradients are the shard's f32 sums, no longer counted with the masters.
        let z2 = estimate(&c, &Setup { ranks: 4, shard_optimizer: true, shard_gradients: true, ..setup() });
        assert_eq!((z2.gradients, z2.optimizer, z2.master_weights), (p, 2.0 * p, p));
        let z2_32 = estimate(&c, &Setup { ranks: 4, shard_optimizer: true, shard_gradients: true, dtype_bytes: 4, ..setup() });
        assert_eq!((z2_32.gradients, z2_32.master_weights), (p, 0.0));
        // Adapters: only their elements have gradients and optimizer state.
        let lora = estimate(&c, &Setup { trainable: Some(1_000_000), ..setup() });
        assert_eq!((lora.gradients, lora.optimizer, lora.master_weights, lora.weights), (2e6, 8e6, 4e6, 2.0 * p));
        // f32 needs no master weights; a live reference doubles the weights.
        let f32 = estimate(&c, &Setup { dtype_bytes: 4, live_reference: true, ..setup() });
        assert_eq!((f32.master_weights, f32.reference), (0.0, 4.0 * p));
    }

    #[test]
    fn tied_heads_and_biases_are_counted() {
        let c: Config = serde_json::from_value(serde_json::json!({
            "model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 16, "tie_word_embeddings": true
        }))
        .unwrap();
        // Per layer: q 8·8 + k, v 8·4 each + o 8·8 + q/k/v bias 8+4+4 + MLP 3·8·12 + norms 2·8.
        let layer = 64 + 64 + 64 + 16 + 288 + 16;
        assert_eq!(parameter_count(&c), 80 + 2 * layer + 8);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        crate::network::Network::new(&vs.root(), &c);
        assert_eq!(parameter_count(&c), vs.variables().values().map(|t| t.numel() as u64).sum::<u64>());
    }

    #[test]
    fn new_architectures_count_their_parameters_exactly() {
        for (model_type, extra) in [
            ("qwen3", serde_json::json!({"head_dim": 6})),
            ("gemma2", serde_json::json!({"head_dim": 6, "sliding_window": 4})),
            ("gemma3_text", serde_json::json!({"head_dim": 6, "sliding_window": 4, "tie_word_embeddings": false})),
        ] {
            let mut json = serde_json::json!({"model_type": model_type, "vocab_size": 10, "hidden_size": 8, "intermediate_size": 12,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16});
            json.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let c: Config = serde_json::from_value(json).unwrap();
            let vs = tch::nn::VarStore::new(tch::Device::Cpu);
            crate::network::Network::new(&vs.root(), &c);
            assert_eq!(parameter_count(&c), vs.variables().values().map(|t| t.numel() as u64).sum::<u64>(), "{model_type}");
        }
    }

    #[test]
    fn softcapped_attention_counts_its_score_matrices() {
        let gemma = |cap: serde_json::Value| -> Config {
            serde_json::from_value(serde_json::json!({"model_type": "gemma2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 12,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4, "max_position_embeddings": 64,
                "sliding_window": 4, "attn_logit_softcapping": cap, "final_logit_softcapping": null}))
            .unwrap()
        };
        let s = Setup { dtype_bytes: 4, sequences: 1, length: 32, ..setup() };
        let (capped, plain) = (estimate(&gemma(serde_json::json!(50.0)), &s), estimate(&gemma(serde_json::Value::Null), &s));
        // Per token and layer: 2 heads × 32 keys × (2 f32 copies + the f32 softmax) − the
        // log-sum-exp SDPA would keep, + q-width repeated keys and values, + 32 mask bytes.
        let per_token = (2.0 * 32.0 * 2.0 + 2.0 * 8.0) * 4.0 + (2.0 * 32.0 - 2.0) * 4.0 + 32.0;
        assert_eq!(capped.activations - plain.activations, 2.0 * 32.0 * per_token);
    }
}
