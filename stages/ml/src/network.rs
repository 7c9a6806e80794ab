//! The model interface: a decoder-only causal LM whose blocks are chosen by its
//! [`Architecture`] — token embedding (scaled by `sqrt(hidden)` for Gemma), `num_hidden_layers`
//! decoder [`Layer`]s (Llama's pre-norm block in `llama.rs` for Llama, Mistral, Qwen2 and
//! Qwen3; Gemma's sandwich-norm block in `gemma2.rs` for Gemma 2 and 3), a final RMSNorm and
//! the LM head (soft-capped for Gemma 2). Log-probs, generation, activation checkpointing,
//! LoRA, training and the judge all go through [`Network`]; nothing outside the block files
//! knows an architecture.
//!
//! Per layer, a forward passes the rotary cos/sin (Gemma 3's sliding layers get their own
//! base's), the attention mask (the sliding-window mask on sliding layers) and the layer's KV
//! cache slot.

use std::sync::Arc;

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::config::{Architecture, Config};
use crate::layers::{init_std, Linear, RmsNorm, Rope};
use crate::lora::Adapter;
use crate::recompute::{grad_enabled, grad_if, LayerArgs, Segment, Tape};
use crate::{gemma2, llama};

/// One decoder block.
pub trait Layer: std::fmt::Debug + Send {
    /// The block on hidden states `x (B, T, hidden)` with rotary `cos`/`sin`, a boolean
    /// attention `mask` (true = attend; causal without one) and its cache slot.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, cache: Option<&mut Option<(Tensor, Tensor)>>) -> Tensor;

    /// Whether the block attends within the sliding window only.
    fn sliding(&self) -> bool;

    /// Its linear maps, named under the block (`self_attn.q_proj`), for LoRA.
    fn projections(&mut self) -> Vec<(&'static str, &mut Linear)>;
}

/// Keys and values of earlier positions, per layer, for incremental decoding, with the
/// position ids of the cached columns (for sliding-window masks). A sliding-window layer may
/// hold fewer columns than the others ([`Network::bound_cache`]): always the latest ones.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// `(B, T_total)` position ids of every cached column.
    positions: Option<Tensor>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> i64 {
        self.positions.as_ref().map_or(0, |p| p.size()[1])
    }

    /// Columns each layer holds (a sliding-window layer's may be fewer, see
    /// [`Network::bound_cache`]).
    pub fn layer_columns(&self) -> Vec<i64> {
        self.layers.iter().map(|l| l.as_ref().map_or(0, |(k, _)| k.size()[2])).collect()
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A cache holding the rows in `index` (rows may repeat), leaving this one as it is.
    pub fn selected(&self, index: &Tensor) -> KvCache {
        let layers = self
            .layers
            .iter()
            .map(|l| l.as_ref().map(|(k, v)| (k.index_select(0, index), v.index_select(0, index))))
            .collect();
        KvCache { layers, positions: self.positions.as_ref().map(|p| p.index_select(0, index)) }
    }

    /// Keeps only the batch rows in `index` (for dropping finished sequences).
    pub fn select(&mut self, index: &Tensor) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(0, index);
            *v = v.index_select(0, index);
        }
        if let Some(p) = self.positions.as_mut() {
            *p = p.index_select(0, index);
        }
    }

    /// Key position ids `(B, T_total)` for a call at `positions (B, T)`: the cached ones
    /// followed by these, which are recorded.
    fn push_positions(&mut self, positions: &Tensor) -> Tensor {
        let all = match &self.positions {
            Some(p) => Tensor::cat(&[p, positions], 1),
            None => positions.shallow_clone(),
        };
        self.positions = Some(all.shallow_clone());
        all
    }
}

/// The sliding-window mask `(B, 1, T, T_total)` for queries at `positions (B, T)` and keys at
/// `key_positions (B, T_total)`: `mask` (or causality by position) and `q − k < window`.
/// `None` when no key can be that far (the layers' own mask is then the same).
fn window_mask(positions: &Tensor, key_positions: &Tensor, mask: Option<&Tensor>, window: i64) -> Option<Tensor> {
    if key_positions.size()[1] <= window {
        return None;
    }
    let distance = positions.unsqueeze(-1) - key_positions.unsqueeze(1);
    let near = distance.lt(window).unsqueeze(1);
    let base = match mask {
        Some(m) => m.shallow_clone(),
        None => distance.ge(0).unsqueeze(1),
    };
    Some(base.logical_and(&near))
}

/// Rows continuing from a prompt batch's rows in [`Network::shared_forward`].
#[derive(Debug)]
pub struct Continuation {
    /// `(G, T)` token ids.
    pub ids: Tensor,
    /// `(G, T)` their position ids.
    pub positions: Tensor,
    /// `(G, 1, T, L + T)` boolean mask over the prompt's `L` columns and then their own.
    pub mask: Tensor,
    /// `(G,)` the prompt row each row continues.
    pub rows: Tensor,
    /// Whether they keep a graph.
    pub grad: bool,
}

/// Holds a forward back until the weights it is about to read are current: ZeRO-1's
/// all-gathers of the weights a step updated run while the next forward reaches them. A
/// forward reads the weights in stages ([`Network::weight_stage`]): 0 the token embedding,
/// `i + 1` decoder layer `i`, and last everything after the layers (the final norm, the LM
/// head, and any head outside the network, which reads the final hidden states).
pub trait WeightsGate: Send + Sync + std::fmt::Debug {
    /// Returns once the weights of stages `0..=stage` are current.
    fn before(&self, stage: usize);
}

/// A causal LM of any supported architecture (see the module documentation).
#[derive(Debug)]
pub struct Network {
    embed_tokens: Tensor,
    /// Gemma's embedding scale `sqrt(hidden)`.
    embed_scale: Option<f64>,
    layers: Vec<Box<dyn Layer>>,
    norm: RmsNorm,
    lm_head: Option<Tensor>,
    rope: Rope,
    /// Gemma 3's RoPE of the sliding-window layers.
    local_rope: Option<Rope>,
    /// Soft-capping of the logits (Gemma 2).
    final_softcap: Option<f64>,
    /// The sliding window (keys a query sees, itself included), if any layer has one.
    window: Option<i64>,
    /// Activation checkpointing's record of forwards (off unless enabled).
    tape: Tape,
    /// What each stage of a forward waits for before reading its weights (nothing unless set).
    gate: Option<Arc<dyn WeightsGate>>,
}

impl Network {
    /// Creates the parameters of `config`'s architecture under `vs` (randomly initialised:
    /// load weights afterwards). `config` must have passed [`Config::architecture`].
    pub fn new(vs: &nn::Path, config: &Config) -> Network {
        let arch = config.architecture().expect("a config checked by Config::architecture");
        let model = vs / "model";
        let (v, h) = (config.vocab_size as i64, config.hidden_size as i64);
        let std = init_std(config);
        let embed_tokens = (&model / "embed_tokens").var("weight", &[v, h], Init::Randn { mean: 0.0, stdev: std });
        let (window, sliding) = config.sliding_window_layers().expect("a config checked by Config::architecture");
        let layers = (0..config.num_hidden_layers)
            .map(|i| -> Box<dyn Layer> {
                let vs = &model / "layers" / i;
                match arch {
                    Architecture::Gemma2 | Architecture::Gemma3 => Box::new(gemma2::Block::new(vs, config, sliding[i])),
                    Architecture::Llama | Architecture::Qwen2 | Architecture::Qwen3 => Box::new(llama::Block::new(vs, config, sliding[i])),
                }
            })
            .collect();
        let norm = RmsNorm::of(&model / "norm", config, config.hidden_size);
        let lm_head = (!config.tied())
            .then(|| (vs / "lm_head").var("weight", &[v, h], Init::Randn { mean: 0.0, stdev: std }));
        let (theta, scaling) = config.rope().expect("a config checked by Config::architecture");
        let rope = Rope::new(config.head_dim(), theta, scaling.as_ref(), vs.device());
        let local = config.local_rope().expect("a config checked by Config::architecture");
        let local_rope = local.map(|(theta, scaling)| Rope::new(config.head_dim(), theta, scaling.as_ref(), vs.device()));
        Network {
            embed_tokens,
            embed_scale: arch.is_gemma().then(|| (config.hidden_size as f64).sqrt()),
            layers,
            norm,
            lm_head,
            rope,
            local_rope,
            final_softcap: config.softcap("final_logit_softcapping"),
            window: window.map(|w| w as i64),
            tape: Tape::default(),
            gate: None,
        }
    }

    /// Makes every forward wait for `gate` before each stage of weights it reads (see
    /// [`WeightsGate`]); `None` reads them as they are.
    pub fn set_weights_gate(&mut self, gate: Option<Arc<dyn WeightsGate>>) {
        self.gate = gate;
    }

    /// The stage of a forward that first reads parameter `name` (as [`crate::model::CausalLm::trainable`]
    /// names it): 0 for the token embedding, `i + 1` for decoder layer `i` (its LoRA adapters
    /// included), the last stage for anything else (final norm, LM head, heads outside the
    /// network).
    pub fn weight_stage(&self, name: &str) -> usize {
        let layers = self.layers.len();
        if name.starts_with("model.embed_tokens.") {
            return 0;
        }
        let layer = name.strip_prefix("model.layers.").and_then(|rest| rest.split('.').next()).and_then(|i| i.parse::<usize>().ok());
        match layer {
            Some(i) if i < layers => i + 1,
            _ => layers + 1,
        }
    }

    /// Waits for the gate, if any, before reading the weights of `stage`.
    fn wait_for(&self, stage: usize) {
        if let Some(gate) = &self.gate {
            gate.before(stage);
        }
    }

    /// The final norm of hidden states `x` (the last stage of weights).
    fn final_norm(&self, x: &Tensor) -> Tensor {
        self.wait_for(self.layers.len() + 1);
        self.norm.forward(x)
    }

    /// Token embeddings `(B, T, hidden)` of `input_ids (B, T)` (Gemma's scaled by
    /// `sqrt(hidden)` rounded to the dtype, as transformers does).
    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        self.wait_for(0);
        let x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        match self.embed_scale {
            Some(s) => {
                let scale = Tensor::from(s as f32).to_kind(x.kind()).to_device(x.device());
                x * scale
            }
            None => x,
        }
    }

    /// Final hidden states `(B, T, hidden)` for `input_ids (B, T)` at `positions (B, T)`.
    /// `mask` is a boolean `(B, 1, T, T_total)` attention mask (true = attend); without one the
    /// attention is causal, which is exact for right-padded batches. With a cache, keys and
    /// values of earlier calls are prepended and this call's are appended. Sliding-window
    /// layers also hide keys whose position id is `window` or more below the query's.
    pub fn hidden_states(&self, input_ids: &Tensor, positions: &Tensor, mask: Option<&Tensor>, mut cache: Option<&mut KvCache>) -> Tensor {
        let mut x = self.embed(input_ids);
        let key_positions = match cache.as_deref_mut() {
            Some(c) => c.push_positions(positions),
            None => positions.shallow_clone(),
        };
        let args = self.layer_args(positions, &key_positions, mask, x.kind());
        // A forward with a cache keeps its full graph: the cached keys and values of a later
        // call would need the earlier call's layers recomputed together with it
        // ([`Network::shared_forward`] is the checkpointable way to continue from a prompt).
        if cache.is_none() && self.tape.applies() {
            let x = self.tape.forward(vec![x], self.layers.len(), vec![Segment::alone(args)], |i, xs, s| self.segments(i, xs, s));
            return self.final_norm(&x[0]);
        }
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize_with(self.layers.len(), || None);
        }
        for i in 0..self.layers.len() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = self.layer(i, &x, &args, slot);
        }
        self.final_norm(&x)
    }

    /// A prompt batch and continuations of its rows, layer by layer: final hidden states of the
    /// `prefix` (causal over `prefix_ids (B, L)` at `prefix_positions`) and of every
    /// continuation, each of whose rows attends to its prompt row's keys and values (masked
    /// by its own `mask (G, 1, T, L + T)`) and then to its own. A continuation without
    /// gradient runs under no-grad; the prompt keeps a graph when any continuation does, so
    /// their gradients flow into it. Layer `i` runs on the prompt and then on every
    /// continuation, so only one layer's prompt keys and values are held at a time; under
    /// activation checkpointing the whole forward is one recorded forward (see
    /// `recompute.rs`), prompt sharing and checkpointing together.
    pub fn shared_forward(&self, prefix_ids: &Tensor, prefix_positions: &Tensor, continuations: &[Continuation]) -> (Tensor, Vec<Tensor>) {
        let grad = continuations.iter().any(|c| c.grad) && grad_enabled();
        let mut xs = vec![grad_if(grad, || self.embed(prefix_ids))];
        let kind = xs[0].kind();
        let mut segments = vec![Segment { args: self.layer_args(prefix_positions, prefix_positions, None, kind), continues: None, grad }];
        for c in continuations {
            let key_positions = Tensor::cat(&[&prefix_positions.index_select(0, &c.rows), &c.positions], 1);
            xs.push(grad_if(c.grad && grad, || self.embed(&c.ids)));
            segments.push(Segment { args: self.layer_args(&c.positions, &key_positions, Some(&c.mask), kind), continues: Some(c.rows.shallow_clone()), grad: c.grad && grad });
        }
        let grads: Vec<bool> = segments.iter().map(|s| s.grad).collect();
        let xs = if grad && self.tape.enabled() {
            self.tape.forward(xs, self.layers.len(), segments, |i, xs, s| self.segments(i, xs, s))
        } else {
            (0..self.layers.len()).fold(xs, |xs, i| self.segments(i, &xs, &segments))
        };
        let mut hidden = xs.iter().zip(grads).map(|(x, grad)| grad_if(grad, || self.final_norm(x)));
        let prefix = hidden.next().expect("the prompt's hidden states");
        (prefix, hidden.collect())
    }

    /// Rotary tables and masks of a forward at `positions (B, T)` over keys at
    /// `key_positions (B, T_total)`.
    fn layer_args(&self, positions: &Tensor, key_positions: &Tensor, mask: Option<&Tensor>, kind: Kind) -> LayerArgs {
        let (cos, sin) = self.rope.cos_sin(positions, kind);
        let local = self.local_rope.as_ref().map(|r| r.cos_sin(positions, kind));
        let window_mask = self.window.and_then(|w| window_mask(positions, key_positions, mask, w));
        LayerArgs { cos, sin, local, mask: mask.map(|m| m.shallow_clone()), window_mask }
    }

    /// Layer `i` on every segment of a forward: the first alone (a lone batch, or the prompt
    /// whose keys and values it keeps), then each continuation from its prompt rows' keys and
    /// values; a segment without gradient under no-grad.
    fn segments(&self, i: usize, xs: &[Tensor], segments: &[Segment]) -> Vec<Tensor> {
        if segments.len() == 1 {
            return vec![grad_if(segments[0].grad, || self.layer(i, &xs[0], &segments[0].args, None))];
        }
        let mut slot = None;
        let mut out = vec![grad_if(segments[0].grad, || self.layer(i, &xs[0], &segments[0].args, Some(&mut slot)))];
        let (k, v) = slot.expect("the prompt's keys and values");
        for (x, s) in xs[1..].iter().zip(&segments[1..]) {
            let rows = s.continues.as_ref().expect("a continuation names its prompt rows");
            let mut slot = Some((k.index_select(0, rows), v.index_select(0, rows)));
            out.push(grad_if(s.grad, || self.layer(i, x, &s.args, Some(&mut slot))));
        }
        out
    }

    /// Layer `i` on `x`: a sliding layer gets the window mask and (Gemma 3) the local RoPE.
    fn layer(&self, i: usize, x: &Tensor, args: &LayerArgs, cache: Option<&mut Option<(Tensor, Tensor)>>) -> Tensor {
        self.wait_for(i + 1);
        let layer = &self.layers[i];
        let (mask, (cos, sin)) = match layer.sliding() {
            true => (args.window_mask.as_ref().or(args.mask.as_ref()), args.local.as_ref().map_or((&args.cos, &args.sin), |(c, s)| (c, s))),
            false => (args.mask.as_ref(), (&args.cos, &args.sin)),
        };
        layer.forward(x, cos, sin, mask, cache)
    }

    /// The adapter slot of every projection, with its module name
    /// (`model.layers.0.self_attn.q_proj`) and `(inputs, outputs)` widths, for `lora::attach`.
    pub fn adapter_slots(&mut self) -> Vec<(String, (i64, i64), &mut Option<Adapter>)> {
        let mut slots = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, linear) in layer.projections() {
                let size = linear.weight.size();
                slots.push((format!("model.layers.{i}.{name}"), (size[1], size[0]), &mut linear.adapter));
            }
        }
        slots
    }

    /// The sliding window, when any layer has one.
    pub fn sliding_window(&self) -> Option<i64> {
        self.window
    }

    /// Bounds the cache of every sliding-window layer to the `window − 1` latest columns: all
    /// that the next query can see, when the cache's columns are aligned positions (as in
    /// [`crate::generate::Decoder`]'s left-padded batch, where a column's position id is the
    /// same offset from every row's next position).
    pub fn bound_cache(&self, cache: &mut KvCache) {
        let Some(w) = self.window else { return };
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            if let (true, Some((k, v))) = (layer.sliding(), slot.as_mut()) {
                let len = k.size()[2];
                if len > w - 1 {
                    *k = k.narrow(2, len - (w - 1), w - 1);
                    *v = v.narrow(2, len - (w - 1), w - 1);
                }
            }
        }
    }

    /// Turns activation checkpointing on or off: while on, a forward without a cache that
    /// autograd records keeps only each layer's input, and [`Network::finish_backward`] must
    /// follow the loss's `backward()` (see `recompute.rs`).
    pub fn set_checkpointing(&self, on: bool) {
        self.tape.set_enabled(on);
    }

    /// Completes the backward pass of every checkpointed forward since the last call
    /// (recomputing the layers); call it after the loss's `backward()`. Does nothing when no
    /// forward was checkpointed.
    pub fn finish_backward(&self) -> anyhow::Result<()> {
        self.tape.finish_backward(|i, xs, s| self.segments(i, xs, s))
    }

    /// Whether activation checkpointing is on (see [`Network::set_checkpointing`]).
    pub fn checkpointing(&self) -> bool {
        self.tape.enabled()
    }

    /// Checkpointed forwards waiting for [`Network::finish_backward`].
    pub fn pending_backward(&self) -> usize {
        self.tape.pending()
    }

    /// Logits `(B, T, vocab)` from hidden states (Gemma 2: `cap · tanh(logits / cap)`).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        self.wait_for(self.layers.len() + 1);
        let logits = hidden.linear::<Tensor>(self.lm_head.as_ref().unwrap_or(&self.embed_tokens), None);
        match self.final_softcap {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }

    /// Logits for `input_ids` at positions `0..T` with causal attention.
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        let (b, t) = input_ids.size2().expect("input ids are (B, T)");
        let positions = Tensor::arange(t, (Kind::Int64, input_ids.device())).unsqueeze(0).expand([b, t], false);
        self.logits(&self.hidden_states(input_ids, &positions, None, None))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::logprobs::{sequence_logps, shared_prefix_pass, Batch, Sequence, LOGITS_CHUNK};
    use crate::model::CausalLm;
    use tch::Device;

    /// A stand-in for ZeRO-1's all-gathers: every weight is zero until a forward asks for its
    /// stage (or a later one), which then copies its value in, once.
    #[derive(Debug)]
    struct Arrivals {
        /// (stage, parameter, its value, arrived)
        weights: Mutex<Vec<(usize, Tensor, Tensor, bool)>>,
        asked: Mutex<Vec<usize>>,
    }

    impl Arrivals {
        /// Takes the weights away again.
        fn leave(&self) {
            self.asked.lock().unwrap().clear();
            for (_, p, _, arrived) in self.weights.lock().unwrap().iter_mut() {
                let _ = tch::no_grad(|| p.shallow_clone().zero_());
                *arrived = false;
            }
        }
    }

    impl WeightsGate for Arrivals {
        fn before(&self, stage: usize) {
            self.asked.lock().unwrap().push(stage);
            for (s, p, value, arrived) in self.weights.lock().unwrap().iter_mut() {
                if *s <= stage && !*arrived {
                    tch::no_grad(|| p.shallow_clone().copy_(value));
                    *arrived = true;
                }
            }
        }
    }

    fn sequences(count: usize, seed: usize) -> Vec<Sequence> {
        (0..count)
            .map(|i| Sequence { ids: (0..6 + (i + seed) % 5).map(|j| 3 + ((i * 7 + j * 5 + seed * 11) % 90) as i64).collect(), completion_start: 3 })
            .collect()
    }

    /// What the trainer computes with the policy, each way it runs it: a batch's log-probs with
    /// gradient (checkpointed when the model is), prompts shared by continuations with and
    /// without gradient, the logits; and the gradient of it all.
    fn forwards(model: &CausalLm) -> Vec<Tensor> {
        let seqs = sequences(4, 0);
        let refs: Vec<&Sequence> = seqs.iter().collect();
        let batch = Batch::new(&refs, 0, Device::Cpu);
        // Each row's prompt with another row's completion.
        let others: Vec<Sequence> = sequences(4, 1).into_iter().zip(&seqs).map(|(o, s)| Sequence { ids: [&s.ids[..3], &o.ids[3..]].concat(), completion_start: 3 }).collect();
        let pairs: Vec<(&Sequence, &Sequence)> = seqs.iter().zip(&others).collect();
        let (plain, _) = sequence_logps(&model.net, &batch, LOGITS_CHUNK);
        let shared = shared_prefix_pass(&model.net, &pairs, Device::Cpu, usize::MAX, LOGITS_CHUNK, [Some(true), Some(false)]).sums();
        let logits = tch::no_grad(|| model.net.forward(&batch.input_ids));
        let params: Vec<Tensor> = model.trainable().into_values().collect();
        for p in &params {
            p.shallow_clone().zero_grad();
        }
        (plain.sum(Kind::Float) + shared.sum(Kind::Float)).backward();
        model.net.finish_backward().unwrap();
        let mut out = vec![plain.detach(), shared.detach(), logits];
        out.extend(params.iter().map(Tensor::grad));
        out
    }

    /// With its weights arriving only when a forward's gate asks for their stage, the network
    /// computes what it computes with all its weights in place, plainly and checkpointed: every
    /// read of a weight comes after its stage's gate.
    #[test]
    fn every_forward_waits_for_the_weights_it_reads() {
        let config: Config = serde_json::from_value(serde_json::json!({
            "model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "max_position_embeddings": 64, "tie_word_embeddings": false, "initializer_range": 0.2
        }))
        .unwrap();
        tch::manual_seed(3);
        let mut model = CausalLm::random(config, std::path::Path::new("."), Device::Cpu, Kind::Float).unwrap();
        let stages: Vec<(String, usize)> = model.trainable().keys().map(|n| (n.clone(), model.net.weight_stage(n))).collect();
        assert!(stages.contains(&("model.embed_tokens.weight".into(), 0)) && stages.contains(&("model.layers.2.mlp.down_proj.weight".into(), 3)) && stages.contains(&("lm_head.weight".into(), 4)), "{stages:?}");
        for checkpointing in [false, true] {
            model.net.set_checkpointing(checkpointing);
            model.net.set_weights_gate(None);
            let expected = forwards(&model);
            let arrivals = Arc::new(Arrivals {
                weights: Mutex::new(model.trainable().into_iter().map(|(n, p)| (model.net.weight_stage(&n), p.shallow_clone(), p.detach().copy(), true)).collect()),
                asked: Mutex::default(),
            });
            arrivals.leave();
            model.net.set_weights_gate(Some(arrivals.clone()));
            let got = forwards(&model);
            assert_eq!(arrivals.asked.lock().unwrap().first(), Some(&0), "the embedding is waited for first");
            for (i, (e, g)) in expected.iter().zip(&got).enumerate() {
                assert!(e.equal(g), "checkpointing {checkpointing}: result {i} differs: a weight was read before it arrived");
            }
        }
    }
}
