//! From llama.cpp's conventions to Hugging Face's: tensor names, the Q/K row permutation,
//! and `config.json` / `generation_config.json` from the GGUF metadata.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};

use crate::gguf::{Gguf, TensorInfo};

/// Architectures (`general.architecture`) this crate converts.
pub const SUPPORTED_ARCHITECTURES: &str = "llama (Llama 2/3 without rope scaling, Mistral, TinyLlama, SmolLM)";

/// The Hugging Face name of a llama.cpp tensor name, `None` for names without one.
pub fn hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undoes the row permutation that llama.cpp's `convert_hf_to_gguf.py` applies to the query
/// and key projections so that its rotary embedding can rotate adjacent pairs:
/// `w.reshape(heads, 2, rows / heads / 2, cols).swapaxes(1, 2).reshape(rows, cols)`. In the
/// GGUF, row `2i + j` of a head is row `j·half + i` of the Hugging Face head (`half` = head
/// width / 2). `data` is a row-major `rows × cols` matrix.
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Result<Vec<f32>> {
    ensure!(data.len() == rows * cols, "{} values for a {rows} × {cols} matrix", data.len());
    ensure!(heads > 0 && rows.is_multiple_of(2 * heads), "{rows} rows do not split into {heads} heads of an even width");
    let width = rows / heads;
    let half = width / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf_row = h * width + 2 * i + j;
                let hf_row = h * width + j * half + i;
                out[hf_row * cols..(hf_row + 1) * cols].copy_from_slice(&data[gguf_row * cols..(gguf_row + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// The shape of a llama-architecture model, from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaParams {
    /// `embedding_length`.
    pub hidden: usize,
    /// `feed_forward_length`.
    pub intermediate: usize,
    /// `block_count`.
    pub layers: usize,
    /// `attention.head_count`.
    pub heads: usize,
    /// `attention.head_count_kv` (default: `heads`).
    pub kv_heads: usize,
    /// `attention.key_length` (default: `hidden / heads`).
    pub head_dim: usize,
    /// `attention.layer_norm_rms_epsilon`.
    pub rms_eps: f64,
    /// `rope.freq_base` (default 10000).
    pub rope_theta: f64,
    /// `context_length`.
    pub max_positions: usize,
    /// Rows of `token_embd.weight`.
    pub vocab: usize,
    /// Whether the file has no `output.weight`, so the LM head is the embedding matrix.
    pub tied: bool,
}

impl LlamaParams {
    /// Reads and checks the metadata of `general.architecture = llama` and the embedding's
    /// shape. Refuses other architectures and rope scaling, which the model code does not read
    /// from GGUF files.
    pub fn from_gguf(g: &Gguf) -> Result<LlamaParams> {
        let path = g.path.display();
        let arch = g.require_str("general.architecture")?;
        ensure!(
            arch == "llama",
            "{path}: architecture `{arch}` is not supported (supported: {SUPPORTED_ARCHITECTURES})"
        );
        let key = |k: &str| format!("llama.{k}");
        let int = |k: &str| -> Result<usize> { Ok(g.require_u64(&key(k))? as usize) };
        if let Some(scaling) = g.str(&key("rope.scaling.type"))?.filter(|s| *s != "none") {
            bail!("{path}: rope scaling `{scaling}` (llama.rope.scaling.type) is not supported");
        }
        let hidden = int("embedding_length")?;
        let heads = int("attention.head_count")?;
        ensure!(
            heads > 0 && hidden.is_multiple_of(heads),
            "{path}: embedding_length {hidden} is not a multiple of head_count {heads}"
        );
        let kv_heads = g.u64(&key("attention.head_count_kv"))?.map_or(heads, |v| v as usize);
        ensure!(
            kv_heads > 0 && heads.is_multiple_of(kv_heads),
            "{path}: head_count {heads} is not a multiple of head_count_kv {kv_heads}"
        );
        let head_dim = g.u64(&key("attention.key_length"))?.map_or(hidden / heads, |v| v as usize);
        if let Some(rope_dim) = g.u64(&key("rope.dimension_count"))? {
            ensure!(rope_dim as usize == head_dim, "{path}: rope.dimension_count {rope_dim} differs from the head width {head_dim} (partial rotary embeddings are not supported)");
        }
        let embd =
            g.tensor("token_embd.weight").with_context(|| format!("{path}: tensor `token_embd.weight` is missing"))?;
        let shape = embd.shape();
        ensure!(
            shape.len() == 2 && shape[1] == hidden,
            "{path}: tensor `token_embd.weight` has shape {shape:?}, expected [vocab, {hidden}]"
        );
        let vocab = shape[0];
        if let Some(v) = g.u64(&key("vocab_size"))? {
            ensure!(
                v as usize == vocab,
                "{path}: llama.vocab_size {v} differs from the {vocab} rows of token_embd.weight"
            );
        }
        let rms_eps = g
            .f64(&key("attention.layer_norm_rms_epsilon"))?
            .with_context(|| format!("{path}: metadata `llama.attention.layer_norm_rms_epsilon` is missing"))?;
        Ok(LlamaParams {
            hidden,
            intermediate: int("feed_forward_length")?,
            layers: int("block_count")?,
            heads,
            kv_heads,
            head_dim,
            rms_eps,
            rope_theta: g.f64(&key("rope.freq_base"))?.unwrap_or(10000.0),
            max_positions: int("context_length")?,
            vocab,
            tied: g.tensor("output.weight").is_none(),
        })
    }

    /// The row-major shape every converted tensor must have, by Hugging Face name.
    fn expected_shape(&self, hf: &str) -> Option<Vec<usize>> {
        let (h, q, kv, f) = (self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate);
        let part = hf.strip_prefix("model.layers.").and_then(|r| r.split_once('.')).map_or(hf, |(_, p)| p);
        Some(match part {
            "model.embed_tokens.weight" | "lm_head.weight" => vec![self.vocab, h],
            "model.norm.weight" | "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![h],
            "self_attn.q_proj.weight" => vec![q, h],
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
            "self_attn.o_proj.weight" => vec![h, q],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![f, h],
            "mlp.down_proj.weight" => vec![h, f],
            _ => return None,
        })
    }

    /// Every Hugging Face tensor name the model needs.
    fn required_names(&self) -> Vec<String> {
        let mut names = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
        if !self.tied {
            names.push("lm_head.weight".into());
        }
        for layer in 0..self.layers {
            for part in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
                "input_layernorm",
                "post_attention_layernorm",
            ] {
                names.push(format!("model.layers.{layer}.{part}.weight"));
            }
        }
        names
    }

    /// `config.json` of a `LlamaForCausalLM` in f32, with the special token ids given.
    pub fn config_json(&self, ids: &SpecialIds) -> Value {
        let mut config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_positions,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": self.tied,
            "initializer_range": 0.02,
            "torch_dtype": "float32",
            "use_cache": true,
        });
        config.as_object_mut().expect("object").extend(ids.to_json());
        config
    }
}

/// The ids of the special tokens (`tokenizer.ggml.*_token_id`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialIds {
    /// `bos_token_id`.
    pub bos: Option<u32>,
    /// `eos_token_id`.
    pub eos: Option<u32>,
    /// `padding_token_id`.
    pub pad: Option<u32>,
    /// `unknown_token_id`.
    pub unk: Option<u32>,
}

impl SpecialIds {
    /// Reads the ids from the metadata, checking each is below `n_tokens`.
    pub fn from_gguf(g: &Gguf, n_tokens: usize) -> Result<SpecialIds> {
        let id = |name: &str| -> Result<Option<u32>> {
            let key = format!("tokenizer.ggml.{name}_token_id");
            match g.u64(&key)? {
                None => Ok(None),
                Some(id) if (id as usize) < n_tokens => Ok(Some(id as u32)),
                Some(id) => bail!("{}: {key} {id} is not below the {n_tokens} tokens", g.path.display()),
            }
        };
        Ok(SpecialIds { bos: id("bos")?, eos: id("eos")?, pad: id("padding")?, unk: id("unknown")? })
    }

    /// `bos_token_id`, `eos_token_id` and `pad_token_id` (those present), as in `config.json`
    /// and `generation_config.json`.
    pub fn to_json(&self) -> Map<String, Value> {
        [("bos_token_id", self.bos), ("eos_token_id", self.eos), ("pad_token_id", self.pad)]
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), json!(v?))))
            .collect()
    }
}

/// How one GGUF tensor becomes one safetensors tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    /// The GGUF tensor.
    pub info: TensorInfo,
    /// Its Hugging Face name.
    pub hf_name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Heads whose row permutation to undo (query and key projections only).
    pub unpermute_heads: Option<usize>,
}

/// Plans the conversion of every tensor of `g`: each must have a Hugging Face name, a
/// supported type, whole blocks per row and the shape `params` implies, and no required tensor
/// may be missing. All problems are found before anything is written.
pub fn plan(g: &Gguf, params: &LlamaParams) -> Result<Vec<TensorPlan>> {
    let path = g.path.display();
    let mut plans = Vec::new();
    for t in &g.tensors {
        let name = &t.name;
        let hf = hf_name(name)
            .with_context(|| format!("{path}: tensor `{name}` has no Hugging Face counterpart in a llama model"))?;
        let Some(layout) = t.ty.layout() else {
            bail!(
                "{path}: tensor `{name}` has type {}, which is not supported (supported: {})",
                t.ty,
                crate::gguf::GgmlType::supported_list()
            );
        };
        ensure!(
            t.dims[0].is_multiple_of(layout.elements as u64),
            "{path}: tensor `{name}`: rows of {} values are not whole {} blocks of {}",
            t.dims[0],
            t.ty,
            layout.elements
        );
        let shape = t.shape();
        let expected = params.expected_shape(&hf).expect("every mapped name has a shape");
        ensure!(
            shape == expected,
            "{path}: tensor `{name}` has shape {shape:?}, expected {expected:?} from the metadata"
        );
        if let Some(layer) = hf.strip_prefix("model.layers.").and_then(|r| r.split_once('.')).map(|(l, _)| l) {
            let layer: usize = layer.parse().expect("hf_name writes a number");
            ensure!(
                layer < params.layers,
                "{path}: tensor `{name}` belongs to layer {layer}, but block_count is {}",
                params.layers
            );
        }
        let unpermute_heads = if name.ends_with("attn_q.weight") {
            Some(params.heads)
        } else if name.ends_with("attn_k.weight") {
            Some(params.kv_heads)
        } else {
            None
        };
        plans.push(TensorPlan { info: t.clone(), hf_name: hf, shape, unpermute_heads });
    }
    for name in params.required_names() {
        ensure!(plans.iter().any(|p| p.hf_name == name), "{path}: no tensor for `{name}`");
    }
    Ok(plans)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's permutation, as `convert_hf_to_gguf.py` writes it (the inverse of
    /// [`unpermute_rows`]): GGUF row `h·w + 2i + j` = HF row `h·w + j·(w/2) + i`.
    fn permute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
        let width = rows / heads;
        let mut out = vec![0f32; data.len()];
        for (gguf_row, chunk) in out.chunks_exact_mut(cols).enumerate() {
            let (h, r) = (gguf_row / width, gguf_row % width);
            let hf_row = h * width + (r % 2) * (width / 2) + r / 2;
            chunk.copy_from_slice(&data[hf_row * cols..(hf_row + 1) * cols]);
        }
        out
    }

    #[test]
    fn permutation_round_trip() {
        for (rows, cols, heads) in [(8, 3, 1), (12, 5, 3), (576, 4, 9), (192, 2, 3)] {
            let data: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
            let permuted = permute_rows(&data, rows, cols, heads);
            assert_ne!(permuted, data);
            assert_eq!(unpermute_rows(&permuted, rows, cols, heads).unwrap(), data, "{rows}×{cols}, {heads} heads");
        }
    }

    #[test]
    fn permutation_matches_numpy_reshape_swapaxes() {
        // One head of width 4, one column: reshape(1, 2, 2, 1).swapaxes(1, 2) turns HF rows
        // [a0 a1 b0 b1] into [a0 b0 a1 b1], i.e. GGUF rows [0, 2, 1, 3] of the HF matrix.
        assert_eq!(permute_rows(&[0., 1., 2., 3.], 4, 1, 1), [0., 2., 1., 3.]);
        assert_eq!(unpermute_rows(&[0., 2., 1., 3.], 4, 1, 1).unwrap(), [0., 1., 2., 3.]);
        // Two heads of width 4: each head separately.
        assert_eq!(
            unpermute_rows(&[0., 2., 1., 3., 4., 6., 5., 7.], 8, 1, 2).unwrap(),
            [0., 1., 2., 3., 4., 5., 6., 7.]
        );
        assert!(unpermute_rows(&[0.; 6], 6, 1, 2).is_err(), "heads of odd width");
    }

    #[test]
    fn names() {
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert_eq!(hf_name("blk.12.attn_output.weight").unwrap(), "model.layers.12.self_attn.o_proj.weight");
        assert_eq!(hf_name("blk.0.ffn_norm.weight").unwrap(), "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert_eq!(hf_name("rope_freqs.weight"), None);
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("blk.0.attn_q.bias"), None);
    }
}
