//! The pieces every decoder block is made of: linear maps (with LoRA adapter slots), RMSNorm
//! (Llama's `w · x̂` and Gemma's `(1 + w) · x̂`), rotary position embeddings, grouped-query
//! attention (with optional per-head q/k norms, attention scale and logit soft-capping) and
//! the gated MLP (SwiGLU or GeGLU).
//!
//! Parameter names are those of Hugging Face checkpoints (`q_proj.weight`), so weights load and
//! save without renaming.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::config::{Architecture, Config, RopeScaling};
use crate::lora::Adapter;

/// A linear map `y = x Wᵀ + b`, plus a LoRA update when an adapter is attached.
#[derive(Debug)]
pub struct Linear {
    /// `(outputs, inputs)`.
    pub weight: Tensor,
    bias: Option<Tensor>,
    /// The LoRA adapter slot.
    pub adapter: Option<Adapter>,
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

/// RMSNorm, computed in f32 as transformers does: Llama's `w · x / sqrt(mean(x²) + ε)` (the
/// normalised x cast back to the dtype first), or Gemma's `(1 + w) · x / sqrt(mean(x²) + ε)`
/// (all in f32, cast at the end).
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    /// Gemma's `(1 + w)` form.
    offset: bool,
}

impl RmsNorm {
    /// Llama's RMSNorm (weight initialised to 1).
    pub fn new(vs: nn::Path, size: usize, eps: f64) -> RmsNorm {
        RmsNorm { weight: vs.var("weight", &[size as i64], Init::Const(1.0)), eps, offset: false }
    }

    /// The norm of `c`'s architecture over `size` features: Llama's, or Gemma's `(1 + w)`
    /// form with `w` drawn from N(0, initializer_range²) (transformers starts it at 0; random
    /// weights make a random model's norms matter, for parity tests).
    pub fn of(vs: nn::Path, c: &Config, size: usize) -> RmsNorm {
        match c.architecture().is_ok_and(|a| a.is_gemma()) {
            true => RmsNorm { weight: vs.var("weight", &[size as i64], Init::Randn { mean: 0.0, stdev: init_std(c) }), eps: c.rms_norm_eps, offset: true },
            false => RmsNorm::new(vs, size, c.rms_norm_eps),
        }
    }

    /// Normalises the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x = x.to_kind(Kind::Float);
        let variance = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = x * (variance + self.eps).rsqrt();
        if self.offset {
            (normed * (self.weight.to_kind(Kind::Float) + 1.0)).to_kind(kind)
        } else {
            &self.weight * normed.to_kind(kind)
        }
    }
}

/// Rotary position embedding frequencies (with llama3 or linear scaling when configured).
#[derive(Debug)]
pub struct Rope {
    inv_freq: Tensor,
}

impl Rope {
    /// Frequencies for heads of width `dim` with base `theta`, computed in f32 as
    /// transformers does.
    pub fn new(dim: usize, theta: f64, scaling: Option<&RopeScaling>, device: tch::Device) -> Rope {
        let dim = dim as i64;
        let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / dim as f64;
        let mut inv_freq = Tensor::from(theta as f32).to_device(device).pow(&exponents).reciprocal();
        match scaling {
            Some(s) if s.rope_type == "llama3" => {
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
            Some(s) if s.rope_type == "linear" => inv_freq = inv_freq / s.factor,
            _ => {}
        }
        Rope { inv_freq }
    }

    /// cos and sin for positions `(B, T)`, shaped `(B, 1, T, head_dim)` in `kind`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq;
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    Tensor::cat(&[-x.narrow(3, half, half), x.narrow(3, 0, half)], 3)
}

/// Grouped-query self-attention with rotary embeddings: Llama's, plus Qwen3/Gemma 3's per-head
/// RMSNorm of q and k before the rotation, Gemma's `query_pre_attn_scalar` scale and Gemma 2's
/// soft-capping of the attention logits (`cap · tanh(s / cap)` before the mask).
#[derive(Debug)]
pub struct Attention {
    /// Query projection.
    q_proj: Linear,
    /// Key projection.
    k_proj: Linear,
    /// Value projection.
    v_proj: Linear,
    /// Output projection.
    o_proj: Linear,
    /// Per-head norms of q and k (Qwen3, Gemma 3).
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    /// Scale of the logits; `None`: `head_dim^-½`.
    scale: Option<f64>,
    /// Soft-capping of the logits.
    softcap: Option<f64>,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    /// The attention of `c`'s architecture under `vs` (`…/self_attn`).
    pub fn new(vs: nn::Path, c: &Config) -> Attention {
        let (h, kv, d, std) = (c.num_attention_heads, c.kv_heads(), c.head_dim(), init_std(c));
        let arch = c.architecture().expect("a config checked by Config::architecture");
        let qk_norm = matches!(arch, Architecture::Qwen3 | Architecture::Gemma3)
            .then(|| (RmsNorm::of(&vs / "q_norm", c, d), RmsNorm::of(&vs / "k_norm", c, d)));
        Attention {
            q_proj: Linear::new(&vs / "q_proj", c.hidden_size, h * d, c.qkv_bias(), std),
            k_proj: Linear::new(&vs / "k_proj", c.hidden_size, kv * d, c.qkv_bias(), std),
            v_proj: Linear::new(&vs / "v_proj", c.hidden_size, kv * d, c.qkv_bias(), std),
            o_proj: Linear::new(&vs / "o_proj", h * d, c.hidden_size, c.o_bias(), std),
            qk_norm,
            scale: c.attention_scale(),
            softcap: c.softcap("attn_logit_softcapping"),
            heads: h as i64,
            kv_heads: kv as i64,
            head_dim: d as i64,
        }
    }

    /// Attention of `x (B, T, hidden)` with rotary `cos`/`sin`, a boolean `mask` (true =
    /// attend; causal without one) and a layer cache slot (keys and values of earlier calls
    /// prepended, this call's appended).
    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, cache: Option<&mut Option<(Tensor, Tensor)>>) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states are (B, T, H)");
        let heads = |y: Tensor, heads: i64| y.view([b, t, heads, self.head_dim]);
        let (q, k) = (heads(self.q_proj.forward(x), self.heads), heads(self.k_proj.forward(x), self.kv_heads));
        let (q, k) = match &self.qk_norm {
            Some((qn, kn)) => (qn.forward(&q), kn.forward(&k)),
            None => (q, k),
        };
        let (q, k) = (q.transpose(1, 2), k.transpose(1, 2));
        let v = heads(self.v_proj.forward(x), self.kv_heads).transpose(1, 2);
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
        let causal = mask.is_none() && !incremental && t > 1;
        let y = match self.softcap {
            // Grouped-query attention: SDPA pairs each query head with its key/value group itself.
            None => Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, self.scale, self.heads != self.kv_heads),
            Some(cap) => self.capped(&q, &k, &v, mask, causal, cap),
        };
        self.o_proj.forward(&y.transpose(1, 2).reshape([b, t, self.heads * self.head_dim]))
    }

    /// Attention with soft-capped logits, written out as transformers' eager attention: logits
    /// `q kᵀ · scale` in the dtype, `cap · tanh(logits / cap)`, masked with f32's lowest value,
    /// softmax in f32, cast back, times v.
    fn capped(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool, cap: f64) -> Tensor {
        let groups = self.heads / self.kv_heads;
        let (k, v) = (k.repeat_interleave_self_int(groups, 1, None), v.repeat_interleave_self_int(groups, 1, None));
        let scale = self.scale.unwrap_or((self.head_dim as f64).powf(-0.5));
        let logits = q.matmul(&k.transpose(2, 3)) * scale;
        let logits = ((logits / cap).tanh() * cap).to_kind(Kind::Float);
        let (t, keys) = (q.size()[2], k.size()[2]);
        let causal_mask = causal.then(|| Tensor::ones([t, keys], (Kind::Bool, q.device())).tril(keys - t));
        let logits = match mask.or(causal_mask.as_ref()) {
            Some(m) => logits.masked_fill(&m.logical_not(), f64::from(f32::MIN)),
            None => logits,
        };
        logits.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(&v)
    }
}

/// The gated MLP `down(act(gate(x)) · up(x))`: SiLU (SwiGLU) or GELU with the tanh
/// approximation (Gemma's GeGLU).
#[derive(Debug)]
pub struct Mlp {
    /// Gate projection.
    gate_proj: Linear,
    /// Up projection.
    up_proj: Linear,
    /// Down projection.
    down_proj: Linear,
    /// GELU (tanh) instead of SiLU.
    gelu: bool,
}

impl Mlp {
    /// The MLP of `c`'s architecture under `vs` (`…/mlp`).
    pub fn new(vs: nn::Path, c: &Config) -> Mlp {
        let std = init_std(c);
        Mlp {
            gate_proj: Linear::new(&vs / "gate_proj", c.hidden_size, c.intermediate_size, c.mlp_bias(), std),
            up_proj: Linear::new(&vs / "up_proj", c.hidden_size, c.intermediate_size, c.mlp_bias(), std),
            down_proj: Linear::new(&vs / "down_proj", c.intermediate_size, c.hidden_size, c.mlp_bias(), std),
            gelu: c.architecture().is_ok_and(|a| a.is_gemma()),
        }
    }

    /// The MLP on `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let gate = self.gate_proj.forward(x);
        let gate = if self.gelu { gate.gelu("tanh") } else { gate.silu() };
        self.down_proj.forward(&(gate * self.up_proj.forward(x)))
    }
}

/// The linear maps of a block's attention and MLP, named under the block
/// (`self_attn.q_proj`, `mlp.gate_proj`), in the order PEFT lists them.
pub fn projections<'a>(attn: &'a mut Attention, mlp: &'a mut Mlp) -> Vec<(&'static str, &'a mut Linear)> {
    vec![
        ("self_attn.q_proj", &mut attn.q_proj),
        ("self_attn.k_proj", &mut attn.k_proj),
        ("self_attn.v_proj", &mut attn.v_proj),
        ("self_attn.o_proj", &mut attn.o_proj),
        ("mlp.gate_proj", &mut mlp.gate_proj),
        ("mlp.up_proj", &mut mlp.up_proj),
        ("mlp.down_proj", &mut mlp.down_proj),
    ]
}

/// Standard deviation of random weights (`initializer_range`, default 0.02).
pub fn init_std(c: &Config) -> f64 {
    c.extra.get("initializer_range").and_then(|v| v.as_f64()).unwrap_or(0.02)
}
