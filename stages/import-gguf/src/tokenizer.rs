//! `tokenizer.json` and `tokenizer_config.json` rebuilt from a GGUF file's vocabulary.
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`) are converted. The
//! pre-tokenizer follows llama.cpp's for `tokenizer.ggml.pre`: for `smollm` (and `starcoder`,
//! `refact`, `codeshell`, which share its regexes in llama-vocab.cpp) every digit is first split
//! off on its own (`\p{N}`), then the GPT-2 regex applies; for `gpt2` the GPT-2 regex alone.
//! (transformers' own GGUF converter leaves the digit split out, and so tokenizes text such as
//! `":\n\n4"` differently from the original SmolLM2 tokenizer.)
//!
//! Control and unknown tokens (`tokenizer.ggml.token_type` 3 and 2) and the BOS/EOS/padding/
//! unknown tokens become special added tokens, user-defined ones (type 4) added tokens that are
//! not special. BOS and EOS are added by the post-processor when `tokenizer.ggml.add_bos_token` /
//! `add_eos_token` say so (both false for SmolLM2). The chat template is
//! `tokenizer.chat_template`.

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};

use crate::convert::SpecialIds;
use crate::gguf::Gguf;

/// Values of `tokenizer.ggml.pre` converted, with the pre-tokenizer each gets.
pub const SUPPORTED_PRE: &str = "smollm, starcoder, refact, codeshell (digits split, then GPT-2), gpt2";

/// `tokenizer.ggml.token_type` of an unknown token.
const TYPE_UNKNOWN: i64 = 2;
/// `tokenizer.ggml.token_type` of a control token.
const TYPE_CONTROL: i64 = 3;
/// `tokenizer.ggml.token_type` of a user-defined token.
const TYPE_USER_DEFINED: i64 = 4;

/// A GGUF file's byte-level BPE vocabulary and tokenizer settings.
#[derive(Debug, Clone)]
pub struct Vocab {
    /// Token strings by id (`tokenizer.ggml.tokens`).
    pub tokens: Vec<String>,
    /// Token types by id (`tokenizer.ggml.token_type`; 1 = normal when absent).
    pub types: Vec<i64>,
    /// BPE merges in priority order (`tokenizer.ggml.merges`, `"a b"` split in two).
    pub merges: Vec<(String, String)>,
    /// Whether to split every digit off first (`tokenizer.ggml.pre` of the smollm family).
    pub split_digits: bool,
    /// Special token ids.
    pub ids: SpecialIds,
    /// `tokenizer.ggml.add_bos_token` (default false).
    pub add_bos: bool,
    /// `tokenizer.ggml.add_eos_token` (default false).
    pub add_eos: bool,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl Vocab {
    /// Reads the vocabulary of `g`, refusing tokenizers other than byte-level BPE with a
    /// supported pre-tokenizer, and checking that every merge joins two tokens into a token.
    pub fn from_gguf(g: &Gguf) -> Result<Vocab> {
        let path = g.path.display();
        let model = g.require_str("tokenizer.ggml.model")?;
        ensure!(
            model == "gpt2",
            "{path}: tokenizer.ggml.model `{model}` is not supported (only `gpt2`, byte-level BPE)"
        );
        let pre = g.require_str("tokenizer.ggml.pre")?;
        let split_digits = match pre {
            "smollm" | "starcoder" | "refact" | "codeshell" => true,
            "gpt2" => false,
            other => bail!("{path}: tokenizer.ggml.pre `{other}` is not supported (supported: {SUPPORTED_PRE})"),
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            let items = g.array(key)?.with_context(|| format!("{path}: metadata `{key}` is missing"))?;
            items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str()
                        .map(str::to_string)
                        .with_context(|| format!("{path}: {key}[{i}] is a {}, not a string", v.type_name()))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types = match g.array("tokenizer.ggml.token_type")? {
            None => vec![1; tokens.len()],
            Some(items) => {
                ensure!(items.len() == tokens.len(), "{path}: {} token types for {} tokens", items.len(), tokens.len());
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.as_i64().with_context(|| format!("{path}: tokenizer.ggml.token_type[{i}] is not an integer"))
                    })
                    .collect::<Result<_>>()?
            }
        };
        let mut index = HashMap::with_capacity(tokens.len());
        for (id, token) in tokens.iter().enumerate() {
            if let Some(first) = index.insert(token.as_str(), id) {
                bail!("{path}: token {token:?} appears twice in tokenizer.ggml.tokens (ids {first} and {id})");
            }
        }
        let merges = strings("tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(i, merge)| {
                let parts: Vec<&str> = merge.split(' ').collect();
                let [a, b] = parts[..] else {
                    bail!("{path}: tokenizer.ggml.merges[{i}] {merge:?} is not two tokens separated by one space");
                };
                for t in [a, b, &format!("{a}{b}")] {
                    ensure!(
                        index.contains_key(t),
                        "{path}: tokenizer.ggml.merges[{i}] {merge:?}: {t:?} is not a token"
                    );
                }
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<Result<_>>()?;
        Ok(Vocab {
            ids: SpecialIds::from_gguf(g, tokens.len())?,
            tokens,
            types,
            merges,
            split_digits,
            add_bos: g.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
            add_eos: g.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
            chat_template: g.str("tokenizer.chat_template")?.map(str::to_string),
        })
    }

    /// Ids of the added tokens, with whether each is special.
    fn added(&self) -> Vec<(usize, bool)> {
        let special_ids = [self.ids.bos, self.ids.eos, self.ids.pad, self.ids.unk];
        (0..self.tokens.len())
            .filter_map(|id| {
                let special =
                    matches!(self.types[id], TYPE_CONTROL | TYPE_UNKNOWN) || special_ids.contains(&Some(id as u32));
                (special || self.types[id] == TYPE_USER_DEFINED).then_some((id, special))
            })
            .collect()
    }

    fn token(&self, id: Option<u32>) -> Option<&str> {
        id.map(|id| self.tokens[id as usize].as_str())
    }

    /// The post-processor: BOS/EOS around each sequence as the flags ask, else ByteLevel's
    /// (which only adjusts offsets).
    fn post_processor(&self) -> Result<Value> {
        let bos = if self.add_bos {
            Some(self.ids.bos.context("tokenizer.ggml.add_bos_token is true but there is no bos_token_id")?)
        } else {
            None
        };
        let eos = if self.add_eos {
            Some(self.ids.eos.context("tokenizer.ggml.add_eos_token is true but there is no eos_token_id")?)
        } else {
            None
        };
        if bos.is_none() && eos.is_none() {
            return Ok(
                json!({ "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true }),
            );
        }
        let special = |id: u32| json!({ "SpecialToken": { "id": self.tokens[id as usize], "type_id": 0 } });
        let sequence = |name: &str| json!({ "Sequence": { "id": name, "type_id": 0 } });
        let around = |name: &str| -> Vec<Value> {
            bos.map(special).into_iter().chain([sequence(name)]).chain(eos.map(special)).collect()
        };
        let mut special_tokens = Map::new();
        for id in bos.into_iter().chain(eos) {
            let token = &self.tokens[id as usize];
            special_tokens.insert(token.clone(), json!({ "id": token, "ids": [id], "tokens": [token] }));
        }
        let pair = [around("A"), around("B")].concat();
        Ok(json!({
            "type": "TemplateProcessing",
            "single": around("A"),
            "pair": pair,
            "special_tokens": special_tokens,
        }))
    }

    /// The Hugging Face `tokenizer.json`: byte-level BPE with the pre-tokenizer of
    /// `tokenizer.ggml.pre` and a ByteLevel decoder.
    pub fn tokenizer_json(&self) -> Result<Value> {
        let added: Vec<Value> = self
            .added()
            .into_iter()
            .map(|(id, special)| {
                json!({
                    "id": id, "content": self.tokens[id], "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": special,
                })
            })
            .collect();
        let byte_level =
            json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true });
        let pre_tokenizer = if self.split_digits {
            json!({
                "type": "Sequence",
                "pretokenizers": [
                    { "type": "Split", "pattern": { "Regex": "\\p{N}" }, "behavior": "Isolated", "invert": false },
                    byte_level,
                ],
            })
        } else {
            byte_level
        };
        let vocab: Map<String, Value> = self.tokens.iter().enumerate().map(|(id, t)| (t.clone(), json!(id))).collect();
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": self.post_processor()?,
            "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": self.merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>(),
            },
        }))
    }

    /// The Hugging Face `tokenizer_config.json`: special token strings, `add_bos_token` /
    /// `add_eos_token`, the added tokens, the chat template and `model_max_length`.
    pub fn tokenizer_config(&self, model_max_length: usize) -> Value {
        let decoder: Map<String, Value> = self
            .added()
            .into_iter()
            .map(|(id, special)| {
                let entry = json!({
                    "content": self.tokens[id], "lstrip": false, "normalized": false, "rstrip": false,
                    "single_word": false, "special": special,
                });
                (id.to_string(), entry)
            })
            .collect();
        let mut config = json!({
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "add_prefix_space": false,
            "added_tokens_decoder": decoder,
            "clean_up_tokenization_spaces": false,
            "model_max_length": model_max_length,
            "tokenizer_class": "GPT2Tokenizer",
        });
        let object = config.as_object_mut().expect("object");
        for (key, id) in [
            ("bos_token", self.ids.bos),
            ("eos_token", self.ids.eos),
            ("pad_token", self.ids.pad),
            ("unk_token", self.ids.unk),
        ] {
            if let Some(token) = self.token(id) {
                object.insert(key.into(), json!(token));
            }
        }
        if let Some(template) = &self.chat_template {
            object.insert("chat_template".into(), json!(template));
        }
        config
    }
}
