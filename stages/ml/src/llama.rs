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
        let mut inv_freq = Tensor::from(config.rope_theta as f32).to_device(device).pow(&exponents).reciprocal();
        if let Some(s) = config.rope_scaling.as_ref().filter(|s| s.rope_type == "llama3") {
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

/// Keys and values of earlier positions, per layer, for incremental decoding.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> i64 {
        self.layers.first().and_then(|l| l.as_ref()).map(|(k, _)| k.size()[2]).unwrap_or(0)
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
        KvCache { layers }
    }

    /// Keeps only the batch rows in `index` (for dropping finished sequences).
    pub fn select(&mut self, index: &Tensor) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(0, index);
            *v = v.index_select(0, index);
        }
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
}

impl Block {
    fn new(vs: nn::Path, c: &Config) -> Block {
        Block {
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

/// The Llama causal LM.
#[derive(Debug)]
pub struct Llama {
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Option<Tensor>,
    rope: Rope,
}

impl Llama {
    /// Creates the parameters under `vs` (randomly initialised: load weights afterwards).
    pub fn new(vs: &nn::Path, config: &Config) -> Llama {
        let model = vs / "model";
        let (v, h) = (config.vocab_size as i64, config.hidden_size as i64);
        let std = init_std(config);
        let embed_tokens = (&model / "embed_tokens").var("weight", &[v, h], Init::Randn { mean: 0.0, stdev: std });
        let layers = (0..config.num_hidden_layers).map(|i| Block::new(&model / "layers" / i, config)).collect();
        let norm = RmsNorm::new(&model / "norm", config.hidden_size, config.rms_norm_eps);
        let lm_head = (!config.tie_word_embeddings)
            .then(|| (vs / "lm_head").var("weight", &[v, h], Init::Randn { mean: 0.0, stdev: std }));
        Llama { embed_tokens, layers, norm, lm_head, rope: Rope::new(config, vs.device()) }
    }

    /// Final hidden states `(B, T, hidden)` for `input_ids (B, T)` at `positions (B, T)`.
    /// `mask` is a boolean `(B, 1, T, T_total)` attention mask (true = attend); without one the
    /// attention is causal, which is exact for right-padded batches. With a cache, keys and
    /// values of earlier calls are prepended and this call's are appended.
    pub fn hidden_states(&self, input_ids: &Tensor, positions: &Tensor, mask: Option<&Tensor>, mut cache: Option<&mut KvCache>) -> Tensor {
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false);
        let (cos, sin) = self.rope.cos_sin(positions, x.kind());
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize_with(self.layers.len(), || None);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
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
