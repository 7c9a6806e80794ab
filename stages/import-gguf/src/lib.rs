//! `halo-import-gguf`: a GGUF file (llama.cpp's format) as a Hugging Face model directory.
//!
//! [`import`] reads the file ([`gguf`]), checks that every tensor can be converted
//! ([`convert::plan`]) and that the vocabulary can be rebuilt ([`tokenizer`]) before writing
//! anything, then dequantizes the tensors one at a time to `f32` ([`dequant`]), undoes
//! llama.cpp's permutation of the query/key rows, and streams them into `model.safetensors`
//! ([`safetensors`]) beside `config.json`, `generation_config.json`, `tokenizer.json` and
//! `tokenizer_config.json`. The directory is written under a temporary name and renamed into
//! place when complete.

#![warn(missing_docs)]

pub mod convert;
pub mod dequant;
pub mod gguf;
pub mod safetensors;
pub mod tokenizer;

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::convert::LlamaParams;
use crate::gguf::Gguf;
use crate::tokenizer::Vocab;

/// What [`import`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Tensors written.
    pub tensors: usize,
    /// Parameters (values) written.
    pub parameters: u64,
    /// Tokens in the vocabulary.
    pub tokens: usize,
    /// Whether the LM head is tied to the embeddings.
    pub tied: bool,
}

/// Converts the GGUF file `gguf_path` into the Hugging Face directory `out`, replacing it if
/// it exists. On error the temporary directory is removed and `out` is left as it was.
pub fn import(gguf_path: &Path, out: &Path) -> Result<Summary> {
    let started = Instant::now();
    let g = Gguf::open(gguf_path)?;
    tracing::info!(
        file = %gguf_path.display(),
        version = g.version,
        tensors = g.tensors.len(),
        name = g.str("general.name")?.unwrap_or("?"),
        "read GGUF header"
    );
    let params = LlamaParams::from_gguf(&g)?;
    let plans = convert::plan(&g, &params)?;
    let vocab = Vocab::from_gguf(&g)?;
    let tokenizer_json =
        vocab.tokenizer_json().with_context(|| format!("{}: building tokenizer.json", gguf_path.display()))?;

    let tmp = haloflow::io::temp_sibling(out);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let written = (|| -> Result<u64> {
        let parameters = write_weights(&g, &plans, &tmp.join("model.safetensors"))?;
        let json = |name: &str, value: &Value| haloflow::io::write_json(&tmp.join(name), value);
        json("config.json", &params.config_json(&vocab.ids))?;
        json("generation_config.json", &Value::Object(vocab.ids.to_json()))?;
        json("tokenizer.json", &tokenizer_json)?;
        json("tokenizer_config.json", &vocab.tokenizer_config(params.max_positions))?;
        if out.exists() {
            std::fs::remove_dir_all(out).with_context(|| format!("replacing {}", out.display()))?;
        }
        std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
        Ok(parameters)
    })();
    let parameters = match written {
        Ok(n) => n,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(err);
        }
    };
    let summary = Summary { tensors: plans.len(), parameters, tokens: vocab.tokens.len(), tied: params.tied };
    tracing::info!(
        out = %out.display(),
        tensors = summary.tensors,
        parameters = summary.parameters,
        tokens = summary.tokens,
        tied = summary.tied,
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "wrote Hugging Face model directory"
    );
    Ok(summary)
}

/// Dequantizes every planned tensor into the safetensors file `path`; returns the number of
/// values written.
fn write_weights(g: &Gguf, plans: &[convert::TensorPlan], path: &Path) -> Result<u64> {
    let declared: Vec<(String, Vec<usize>)> = plans.iter().map(|p| (p.hf_name.clone(), p.shape.clone())).collect();
    let mut writer = safetensors::Writer::create(path, &declared)?;
    let mut file = File::open(&g.path).with_context(|| format!("opening {}", g.path.display()))?;
    let bar = haloflow::stage_cli::progress(plans.len() as u64, "dequantizing tensors");
    let mut parameters = 0;
    for p in plans {
        let t = &p.info;
        let bytes = g.read_tensor(&mut file, t)?;
        let context = || format!("{}: tensor `{}` ({} {:?})", g.path.display(), t.name, t.ty, t.dims);
        let mut values = dequant::dequantize(t.ty, &bytes).with_context(context)?;
        if let Some(heads) = p.unpermute_heads {
            values = convert::unpermute_rows(&values, p.shape[0], p.shape[1], heads).with_context(context)?;
        }
        tracing::debug!(gguf = %t.name, hf = %p.hf_name, ty = %t.ty, shape = ?p.shape, "converted");
        writer.write(&p.hf_name, &values)?;
        parameters += values.len() as u64;
        bar.inc(1);
    }
    bar.finish_and_clear();
    writer.finish()?;
    Ok(parameters)
}
