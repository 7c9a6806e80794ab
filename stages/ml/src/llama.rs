//! The Llama decoder (Llama 2/3, Mistral, TinyLlama, SmolLM; Qwen2 reuses it with q/k/v bias,
//! see `qwen2.rs`): token embedding, `num_hidden_layers` pre-norm blocks of grouped-query
//! attention with rotary position embeddings and a SwiGLU MLP, a final RMSNorm and the LM head.
//!
//! Parameter names are those of Hugging Face checkpoints (`model.layers.0.self_attn.q_proj.weight`),
//! so weights load and save without renaming.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::config::Config;
use crate::lora::Adapter;
use crate::recompute::{LayerArgs, Tape};

/// A linear map `y = x Wᵀ + b`, plus a LoRA update when an adapter is attached.
#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<Adapter>,
}

impl Linear {
    fn new(vs: nn::Path, inputs: usize, outputs: usize, bias: bool, std: f64) -> Linear {
        let weight = vs.var("weight", &[outputs as i64, inputs as i64], Init::Randn { mean: 0.0, stdev: std });
        let bias = bias.then(|| vs.var("bias", &[outputs as i64], Init::Const(0.0)));
        Linear { weight, bias, adapter: None }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        match &self.adapter {
            Some(adapter) => adapter.apply(x, y),
            None => y,
        }
    }
}

/// RMSNorm, computed in f32 as transformers does: `w · x / sqrt(mean(x²) + ε)`.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vs: nn::Path, size: usize, eps: f64) -> RmsNorm {
        RmsNorm { weight: vs.var("weight", &[size as i64], Init::Const(1.0)), eps }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x = x.to_kind(Kind::Float);
        let variance = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = (x * (variance + self.eps).rsqrt()).to_kind(kind);
        &self.weight * normed
    }
}

/// Rotary position embedding frequencies (with llama3 scaling when configured).
#[derive(Debug)]
pub struct Rope {
    inv_freq: Tensor,
}

impl Rope {
    /// Frequencies for `config`, computed in f32 as transformers does.
    pub fn new(config: &Config, device: tch::Device) -> Rope {
        let dim = config.head_dim() as i64;
        let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / dim as f64;
        let (theta, scaling) = config.rope().expect("a config checked by Config::architecture");
        let mut inv_freq = Tensor::from(theta as f32).to_device(device).pow(&exponents).reciprocal();
        if let Some(s) = scaling.as_ref().filter(|s| s.rope_type == "llama3") {
            let old = s.original_max_position_embeddings as f64;
            let (low_wavelen, high_wavelen) = (old / s.low_freq_factor, old / s.high_freq_factor);
            let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
            let scaled = inv_freq.where_self(&wavelen.le(low_wavelen), &(&inv_freq / s.factor));
            let smooth = ((wavelen.reciprocal() * old) - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
            let keep: Tensor = smooth.ones_like() - &smooth;
            let smoothed: Tensor = &scaled * keep / s.factor + &scaled * &smooth;
            let medium = wavelen.ge(high_wavelen).logical_and(&wavelen.le(low_wavelen));
            inv_freq = smoothed.where_self(&medium, &scaled);
        }
        Rope { inv_freq }
    }

    /// cos and sin for positions `(B, T)`, shaped `(B, 1, T, head_dim)` in `kind`.
    fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq;
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3)
}

/// Keys and values of earlier positions, per layer, for incremental decoding, with the
/// position ids of the cached columns (for sliding-window masks). A sliding-window layer may
/// hold fewer columns than the others ([`Llama::bound_cache`]): always the latest ones.
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
    /// [`Llama::bound_cache`]).
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

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(vs: nn::Path, c: &Config) -> Attention {
        let (h, kv, d, std) = (c.num_attention_heads, c.kv_heads(), c.head_dim(), init_std(c));
        Attention {
            q_proj: Linear::new(&vs / "q_proj", c.hidden_size, h * d, c.qkv_bias(), std),
            k_proj: Linear::new(&vs / "k_proj", c.hidden_size, kv * d, c.qkv_bias(), std),
            v_proj: Linear::new(&vs / "v_proj", c.hidden_size, kv * d, c.qkv_bias(), std),
            o_proj: Linear::new(&vs / "o_proj", h * d, c.hidden_size, c.o_bias(), std),
            heads: h as i64,
            kv_heads: kv as i64,
            head_dim: d as i64,
        }
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, cache: Option<&mut Option<(Tensor, Tensor)>>) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states are (B, T, H)");
        let split = |y: Tensor, heads: i64| y.view([b, t, heads, self.head_dim]).transpose(1, 2);
        let q = split(self.q_proj.forward(x), self.heads);
        let k = split(self.k_proj.forward(x), self.kv_heads);
        let v = split(self.v_proj.forward(x), self.kv_heads);
        let q = &q * cos + rotate_half(&q) * sin;
        let mut k = &k * cos + rotate_half(&k) * sin;
        let mut v = v;
        let incremental = cache.as_ref().is_some_and(|c| c.is_some());
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2);
                v = Tensor::cat(&[pv, &v], 2);
            }
            *slot = Some((k.shallow_clone(), v.shallow_clone()));
        }
        // A sliding-window layer's cache may keep only the latest columns: the mask's are the
        // last ones of the whole cache.
        let (keys, mask_keys) = (k.size()[2], mask.map_or(0, |m| m.size()[3]));
        let narrowed = (mask_keys > keys).then(|| mask.expect("mask present").narrow(3, mask_keys - keys, keys));
        let mask = narrowed.as_ref().or(mask);
        // Grouped-query attention: SDPA pairs each query head with its key/value group itself.
        let causal = mask.is_none() && !incremental && t > 1;
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, None, self.heads != self.kv_heads);
        self.o_proj.forward(&y.transpose(1, 2).reshape([b, t, self.heads * self.head_dim]))
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(vs: nn::Path, c: &Config) -> Mlp {
        let std = init_std(c);
        Mlp {
            gate_proj: Linear::new(&vs / "gate_proj", c.hidden_size, c.intermediate_size, c.mlp_bias, std),
            up_proj: Linear::new(&vs / "up_proj", c.hidden_size, c.intermediate_size, c.mlp_bias, std),
            down_proj: Linear::new(&vs / "down_proj", c.intermediate_size, c.hidden_size, c.mlp_bias, std),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj.forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

#[derive(Debug)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    /// Whether the layer attends within the sliding window only.
    sliding: bool,
}

impl Block {
    fn new(vs: nn::Path, c: &Config, sliding: bool) -> Block {
        Block {
            sliding,
            input_layernorm: RmsNorm::new(&vs / "input_layernorm", c.hidden_size, c.rms_norm_eps),
            self_attn: Attention::new(&vs / "self_attn", c),
            post_attention_layernorm: RmsNorm::new(&vs / "post_attention_layernorm", c.hidden_size, c.rms_norm_eps),
            mlp: Mlp::new(&vs / "mlp", c),
        }
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, cache: Option<&mut Option<(Tensor, Tensor)>>) -> Tensor {
        let h = x + self.self_attn.forward(&self.input_layernorm.forward(x), cos, sin, mask, cache);
        &h + self.mlp.forward(&self.post_attention_layernorm.forward(&h))
    }
}

fn init_std(c: &Config) -> f64 {
    c.extra.get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(0.02)
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

/// The Llama causal LM.
#[derive(Debug)]
pub struct Llama {
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Option<Tensor>,
    rope: Rope,
    /// The sliding window (keys a query sees, itself included), if any layer has one.
    window: Option<i64>,
    /// Activation checkpointing's record of forwards (off unless enabled).
    tape: Tape,
}

impl Llama {
    /// Creates the parameters under `vs` (randomly initialised: load weights afterwards).
    pub fn new(vs: &nn::Path, config: &Config) -> Llama {
        let model = vs / "model";
        let (v, h) = (config.vocab_size as i64, config.hidden_size as i64);
        let std = init_std(config);
        let embed_tokens = (&model / "embed_tokens").var("weight", &[v, h], Init::Randn { mean: 0.0, stdev: std });
        let (window, sliding) = config.sliding_window_layers().expect("a config checked by Config::architecture");
        let layers = (0..config.num_hidden_layers).map(|i| Block::new(&model / "layers" / i, config, sliding[i])).collect();
        let norm = RmsNorm::new(&model / "norm", config.hidden_size, config.rms_norm_eps);
        let lm_head = (!config.tie_word_embeddings)
            .then(|| (vs / "lm_head").var("weight", &[v, h], Init::Randn { mean: 0.0, stdev: std }));
        Llama { embed_tokens, layers, norm, lm_head, rope: Rope::new(config, vs.device()), window: window.map(|w| w as i64), tape: Tape::default() }
    }

    /// Final hidden states `(B, T, hidden)` for `input_ids (B, T)` at `positions (B, T)`.
    /// `mask` is a boolean `(B, 1, T, T_total)` attention mask (true = attend); without one the
    /// attention is causal, which is exact for right-padded batches. With a cache, keys and
    /// values of earlier calls are prepended and this call's are appended. Sliding-window
    /// layers also hide keys whose position id is `window` or more below the query's.
    pub fn hidden_states(&self, input_ids: &Tensor, positions: &Tensor, mask: Option<&Tensor>, mut cache: Option<&mut KvCache>) -> Tensor {
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        let (cos, sin) = self.rope.cos_sin(positions, x.kind());
        let key_positions = match cache.as_deref_mut() {
            Some(c) => c.push_positions(positions),
            None => positions.shallow_clone(),
        };
        let window_mask = self.window.and_then(|w| window_mask(positions, &key_positions, mask, w));
        // A forward with a cache keeps its full graph: the cached keys and values of a later
        // call would need the earlier call's layers recomputed together with it.
        if cache.is_none() && self.tape.applies() {
            let args = LayerArgs { cos, sin, mask: mask.map(|m| m.shallow_clone()), window_mask };
            let x = self.tape.forward(x, self.layers.len(), args, |i, x, a| self.layer(i, x, a));
            return self.norm.forward(&x);
        }
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize_with(self.layers.len(), || None);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let mask = if layer.sliding { window_mask.as_ref().or(mask) } else { mask };
            x = layer.forward(&x, &cos, &sin, mask, slot);
        }
        self.norm.forward(&x)
    }

    /// The adapter slot of every projection, with its module name
    /// (`model.layers.0.self_attn.q_proj`) and `(inputs, outputs)` widths, for `lora::attach`.
    pub fn adapter_slots(&mut self) -> Vec<(String, (i64, i64), &mut Option<Adapter>)> {
        let mut slots = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let (attn, mlp) = (&mut layer.self_attn, &mut layer.mlp);
            let named = [
                ("self_attn.q_proj", &mut attn.q_proj),
                ("self_attn.k_proj", &mut attn.k_proj),
                ("self_attn.v_proj", &mut attn.v_proj),
                ("self_attn.o_proj", &mut attn.o_proj),
                ("mlp.gate_proj", &mut mlp.gate_proj),
                ("mlp.up_proj", &mut mlp.up_proj),
                ("mlp.down_proj", &mut mlp.down_proj),
            ];
            for (name, linear) in named {
                let size = linear.weight.size();
                slots.push((format!("model.layers.{i}.{name}"), (size[1], size[0]), &mut linear.adapter));
            }
        }
        slots
    }

    /// Layer `i` on `x` without a cache.
    fn layer(&self, i: usize, x: &Tensor, args: &LayerArgs) -> Tensor {
        let layer = &self.layers[i];
        let mask = if layer.sliding { args.window_mask.as_ref().or(args.mask.as_ref()) } else { args.mask.as_ref() };
        layer.forward(x, &args.cos, &args.sin, mask, None)
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
            if let (true, Some((k, v))) = (layer.sliding, slot.as_mut()) {
                let len = k.size()[2];
                if len > w - 1 {
                    *k = k.narrow(2, len - (w - 1), w - 1);
                    *v = v.narrow(2, len - (w - 1), w - 1);
                }
            }
        }
    }

    /// Turns activation checkpointing on or off: while on, a forward without a cache that
    /// autograd records keeps only each layer's input, and [`Llama::finish_backward`] must
    /// follow the loss's `backward()` (see `recompute.rs`).
    pub fn set_checkpointing(&self, on: bool) {
        self.tape.set_enabled(on);
    }

    /// Completes the backward pass of every checkpointed forward since the last call
    /// (recomputing the layers); call it after the loss's `backward()`. Does nothing when no
    /// forward was checkpointed.
    pub fn finish_backward(&self) -> anyhow::Result<()> {
        self.tape.finish_backward(|i, x, a| self.layer(i, x, a))
    }

    /// Checkpointed forwards waiting for [`Llama::finish_backward`].
    pub fn pending_backward(&self) -> usize {
        self.tape.pending()
    }

    /// Logits `(B, T, vocab)` from hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<Tensor>(self.lm_head.as_ref().unwrap_or(&self.embed_tokens), None)
    }

    /// Logits for `input_ids` at positions `0..T` with causal attention.
    pub fn forward(&self, input_ids: &Tensor) -> Tensor {
        let (b, t) = input_ids.size2().expect("input ids are (B, T)");
        let positions = Tensor::arange(t, (Kind::Int64, input_ids.device())).unsqueeze(0).expand([b, t], false);
        self.logits(&self.hidden_states(input_ids, &positions, None, None))
    }
}
