//! The fingerprint of reference log-probs: what model, tokenizer, lengths and data they were
//! computed from. `refcache` stores it in its Parquet metadata; the trainer recomputes it for
//! its own reference model and data and refuses a cache that does not match.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::tokenize::Tokenizer;
use crate::weights::weight_files;

fn unrecorded() -> String {
    "unrecorded".into()
}

/// What reference log-probs depend on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// blake3 of the weight files.
    pub weights: String,
    /// blake3 of tokenizer.json, tokenizer_config.json and chat_template.jinja (the files that
    /// hold the chat template), those present.
    pub tokenizer: String,
    /// The chat template the tokenizer uses, if any (also covered by `tokenizer`; kept readable).
    pub chat_template: Option<String>,
    /// How prompts became text (`template`, `transcript` or `plain`); caches written before
    /// the field existed read as `unrecorded` and match nothing.
    #[serde(default = "unrecorded")]
    pub prompt_format: String,
    /// Prompt truncation length.
    pub max_prompt_length: usize,
    /// Sequence truncation length.
    pub max_length: usize,
    /// blake3 of the data file scored.
    pub data: String,
}

impl Fingerprint {
    /// Computes the fingerprint of a model directory and a data file tokenized by `tok`.
    pub fn compute(model_dir: &Path, tok: &Tokenizer, data: &Path, max_prompt_length: usize, max_length: usize) -> Result<Fingerprint> {
        Ok(Fingerprint {
            weights: weights_hash(model_dir)?,
            tokenizer: tokenizer_hash(model_dir)?,
            chat_template: chat_template(model_dir),
            prompt_format: tok.prompt_format().to_string(),
            max_prompt_length,
            max_length,
            data: haloflow::hashing::hash_path(data).with_context(|| format!("hashing {}", data.display()))?,
        })
    }

    /// Checks that a stored fingerprint matches the expected one; the error lists every field
    /// that differs.
    pub fn check(&self, expected: &Fingerprint) -> Result<()> {
        let mut diffs = Vec::new();
        if self.weights != expected.weights {
            diffs.push("the reference model's weights differ".to_string());
        }
        if self.tokenizer != expected.tokenizer || self.chat_template != expected.chat_template {
            diffs.push("the tokenizer or chat template differs".to_string());
        }
        if self.prompt_format != expected.prompt_format {
            diffs.push(format!("prompt formats differ: cache {}, expected {} (--prompt-format)", self.prompt_format, expected.prompt_format));
        }
        if (self.max_prompt_length, self.max_length) != (expected.max_prompt_length, expected.max_length) {
            diffs.push(format!(
                "lengths differ: cache max_prompt_length={} max_length={}, expected {} and {}",
                self.max_prompt_length, self.max_length, expected.max_prompt_length, expected.max_length
            ));
        }
        if self.data != expected.data {
            diffs.push("the data differs".to_string());
        }
        if !diffs.is_empty() {
            bail!("the reference log-prob cache does not match: {}; recompute it with halo-refcache", diffs.join("; "));
        }
        Ok(())
    }
}

/// blake3 of a model directory's weight files (for an adapter directory: the base model's and
/// the adapter's).
pub fn weights_hash(model_dir: &Path) -> Result<String> {
    let mut weights = blake3::Hasher::new();
    for file in weight_files(model_dir)? {
        weights.update(haloflow::hashing::hash_path(&file)?.as_bytes());
    }
    Ok(weights.finalize().to_hex().to_string())
}

/// blake3 of a model directory's tokenizer files: tokenizer.json, tokenizer_config.json and
/// chat_template.jinja, those present (a directory without the last hashes as before it counted).
fn tokenizer_hash(model_dir: &Path) -> Result<String> {
    let mut tokenizer = blake3::Hasher::new();
    for file in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        let path = model_dir.join(file);
        if path.is_file() {
            tokenizer.update(haloflow::hashing::hash_path(&path)?.as_bytes());
        }
    }
    Ok(tokenizer.finalize().to_hex().to_string())
}

/// The chat template the tokenizer uses: `chat_template.jinja` (which takes precedence, as
/// transformers 5 writes it), else the `chat_template` of `tokenizer_config.json` (a string, or
/// JSON text for template lists).
fn chat_template(model_dir: &Path) -> Option<String> {
    if let Ok(source) = std::fs::read_to_string(model_dir.join("chat_template.jinja")) {
        return Some(source);
    }
    let text = std::fs::read(model_dir.join("tokenizer_config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_slice(&text).ok()?;
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatches_are_listed() {
        let a = Fingerprint { weights: "w".into(), tokenizer: "t".into(), chat_template: None, prompt_format: "transcript".into(), max_prompt_length: 8, max_length: 16, data: "d".into() };
        assert!(a.check(&a.clone()).is_ok());
        let b = Fingerprint { weights: "w2".into(), max_length: 32, ..a.clone() };
        let err = a.check(&b).unwrap_err().to_string();
        assert!(err.contains("weights differ") && err.contains("lengths differ") && !err.contains("data differs"), "{err}");
        let plain = Fingerprint { prompt_format: "plain".into(), ..a.clone() };
        assert!(a.check(&plain).unwrap_err().to_string().contains("prompt formats differ: cache transcript, expected plain"));
        let old: Fingerprint = serde_json::from_str(r#"{"weights": "w", "tokenizer": "t", "chat_template": null, "max_prompt_length": 8, "max_length": 16, "data": "d"}"#).unwrap();
        assert!(old.check(&a).unwrap_err().to_string().contains("cache unrecorded"));
    }

    /// A chat_template.jinja (transformers 5's save_pretrained writes the template there, and
    /// the tokenizer prefers it) is part of the fingerprint: editing it invalidates a cache.
    #[test]
    fn chat_template_jinja_is_fingerprinted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": "{{ config }}"}"#).unwrap();
        let without = tokenizer_hash(dir.path()).unwrap();
        assert_eq!(chat_template(dir.path()).as_deref(), Some("{{ config }}"));
        std::fs::write(dir.path().join("chat_template.jinja"), "{{ one }}").unwrap();
        let one = tokenizer_hash(dir.path()).unwrap();
        assert_eq!(chat_template(dir.path()).as_deref(), Some("{{ one }}"));
        std::fs::write(dir.path().join("chat_template.jinja"), "{{ two }}").unwrap();
        let two = tokenizer_hash(dir.path()).unwrap();
        assert!(without != one && one != two, "the tokenizer hash ignores chat_template.jinja");
    }
}
