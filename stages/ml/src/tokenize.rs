//! A model's tokenizer and the tokenization contract of every stage that turns
//! (prompt, completion) examples into token ids.
//!
//! [`Tokenizer::from_dir`] reads a Hugging Face model directory: `tokenizer.json` (the
//! tokenizer itself), `tokenizer_config.json` (`chat_template`, `bos_token`, `eos_token`,
//! `add_bos_token`, `add_eos_token` and the other special tokens; a token may be a string or a
//! `{"content": ...}` object), a `chat_template.jinja` beside it (which, as in transformers,
//! takes precedence over the config's template), and the `eos_token_id`s of
//! `generation_config.json` and `config.json` when present.
//!
//! # The contract
//!
//! * **Prompt text.** A prompt (a list of messages) is rendered in the tokenizer's
//!   [`PromptFormat`]: by default with the model's chat template with
//!   `add_generation_prompt = true` (see [`crate::chat_template`]), and for a model without a
//!   template as an HH-RLHF transcript (`"\n\nHuman: …\n\nAssistant:"`, the reply after one
//!   space); `plain` joins the contents by a blank line (see [`crate::prompt_format`]).
//! * **Special tokens.** Special tokens written in the text (`<|im_start|>`, `</s>`, ...) are
//!   parsed as those tokens. The tokenizer's post-processor adds its special tokens (BOS for
//!   Llama-style tokenizers) unless the text already starts with the BOS token's text, as
//!   rendered templates that write `{{ bos_token }}` do: BOS is never doubled. When
//!   `tokenizer_config.json` sets `add_bos_token` or `add_eos_token`, the post-processor is
//!   rebuilt from them, as transformers does.
//! * **Joint tokenization.** An example is tokenized as one text, prompt text + reply text
//!   (the completion as the format writes it after a prompt), followed by the EOS token id
//!   (not appended when the ids already end with it). The
//!   completion starts at the first position where these ids differ from the ids of the prompt
//!   text alone. Tokenizing the completion on its own would differ: SentencePiece-style
//!   tokenizers prepend `▁` to every text, and merges can cross the boundary.
//! * **Truncation.** If the prompt part is longer than `max_prompt_length` tokens, its start
//!   is cut (its end kept). Then, if prompt + completion exceed `max_length`, the completion's
//!   end is cut (its start kept; a cut completion loses its EOS).
//! * **Skips.** An empty completion string, or a completion with no tokens left after
//!   truncation, is an [`EmptyCompletion`] error: stages count these (`err.is::<EmptyCompletion>()`)
//!   instead of failing.
//!
//! `ci/parity/make_tokenization_expectations.py` implements the same contract in Python with
//! Hugging Face `tokenizers`/transformers; the tests compare against its output.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use haloflow::records::Message;
use serde_json::Value;
use tokenizers::processors::template::TemplateProcessing;

use crate::chat_template::ChatTemplate;
use crate::prompt_format::PromptFormat;

/// The special tokens transformers passes to chat templates, besides BOS and EOS.
const OTHER_SPECIAL_TOKENS: [&str; 5] =
    ["unk_token", "pad_token", "sep_token", "cls_token", "mask_token"];

/// A model's tokenizer with its chat template and end-of-sequence token.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    bos_token: Option<String>,
    eos_id: u32,
    stop_ids: Vec<i64>,
    format: PromptFormat,
}

/// The token ids of one (prompt, completion) example; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Prompt ids followed by completion ids (the completion normally ends with EOS).
    pub ids: Vec<i64>,
    /// Index in `ids` of the first completion token; `ids[..completion_start]` is the prompt.
    pub completion_start: usize,
    /// The prompt was longer than `max_prompt_length` and lost its start.
    pub truncated_prompt: bool,
    /// Prompt + completion were longer than `max_length` and the completion lost its end.
    pub truncated_completion: bool,
}

/// Why an example has no completion tokens: an error that stages count as a skipped example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmptyCompletion {
    /// The completion string is empty.
    EmptyText,
    /// No completion token is left once the prompt (`prompt_tokens` long after
    /// `max_prompt_length`) is in `max_length`, or the completion text produced no token.
    NoTokensLeft {
        /// Length of the (possibly truncated) prompt in tokens.
        prompt_tokens: usize,
        /// The `max_length` the example had to fit.
        max_length: usize,
    },
}

impl fmt::Display for EmptyCompletion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmptyCompletion::EmptyText => write!(f, "empty completion"),
            EmptyCompletion::NoTokensLeft { prompt_tokens, max_length } => write!(
                f,
                "no completion token left: the prompt takes {prompt_tokens} of max_length {max_length} tokens"
            ),
        }
    }
}

impl std::error::Error for EmptyCompletion {}

/// A special token in `tokenizer_config.json`: a string, or an object with a `content` string.
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Reads and parses a JSON file, naming it in errors.
fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The `eos_token_id` (an id or a list of ids) of `generation_config.json` or `config.json`
/// in `dir`; empty if the file or the key is absent.
fn config_eos_ids(dir: &Path, file: &str) -> Result<Vec<u32>> {
    let path = dir.join(file);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let ids = match read_json(&path)?.get("eos_token_id") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(ids)) => {
            ids.iter().map(Value::as_u64).collect::<Option<Vec<_>>>().unwrap_or_default()
        }
        Some(id) => id.as_u64().into_iter().collect(),
    };
    ids.into_iter()
        .map(|id| {
            u32::try_from(id)
                .with_context(|| format!("{}: eos_token_id {id} is out of range", path.display()))
        })
        .collect()
}

/// The chat template of the model in `dir`: `chat_template.jinja`, else the config's
/// `chat_template` (a string, or a list of `{name, template}` of which `default` is used).
fn chat_template_source(
    dir: &Path,
    config: &Value,
    config_path: &Path,
) -> Result<Option<(PathBuf, String)>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        let source = std::fs::read_to_string(&jinja)
            .with_context(|| format!("reading {}", jinja.display()))?;
        return Ok(Some((jinja, source)));
    }
    let source = match config.get("chat_template") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str())
            .map(str::to_string)
            .with_context(|| {
                format!(
                    "{}: chat_template is a list without a `default` template",
                    config_path.display()
                )
            })?,
        Some(_) => bail!(
            "{}: chat_template is neither a string nor a list of named templates",
            config_path.display()
        ),
    };
    Ok(Some((config_path.to_path_buf(), source)))
}

/// The post-processor transformers builds from `add_bos_token`/`add_eos_token`: `bos` (text,
/// id) before and `eos` after each sequence, when given.
fn bos_eos_processor(
    bos: Option<(&str, u32)>,
    eos: Option<(&str, u32)>,
) -> Result<TemplateProcessing> {
    let sequence = |name: &str, type_id: u8| {
        let before = bos.map(|(b, _)| format!("{b}:{type_id} ")).unwrap_or_default();
        let after = eos.map(|(e, _)| format!(" {e}:{type_id}")).unwrap_or_default();
        format!("{before}${name}:{type_id}{after}")
    };
    let single = sequence("A", 0);
    let pair = format!("{single} {}", sequence("B", 1));
    let special: Vec<(String, u32)> =
        bos.into_iter().chain(eos).map(|(text, id)| (text.to_string(), id)).collect();
    TemplateProcessing::builder()
        .try_single(single.as_str())
        .and_then(|b| b.try_pair(pair.as_str()))
        .map_err(|e| anyhow!("{e}"))?
        .special_tokens(special)
        .build()
        .map_err(|e| anyhow!("{e}"))
}

impl Tokenizer {
    /// Loads the tokenizer of the model directory `dir` (see the module documentation).
    /// Fails naming the file when `tokenizer.json` or `tokenizer_config.json` is missing or
    /// bad, and refuses a tokenizer without a usable EOS token.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.exists() {
            bail!(
                "{} is missing: the model directory has no Hugging Face tokenizer",
                tokenizer_path.display()
            );
        }
        let mut inner = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| anyhow!("loading {}: {e}", tokenizer_path.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        if !config_path.exists() {
            bail!("{} is missing", config_path.display());
        }
        let config = read_json(&config_path)?;
        let token_id = |name: &str, text: &str| {
            inner.token_to_id(text).with_context(|| {
                format!(
                    "{}: {name} {text:?} is not a token of {}",
                    config_path.display(),
                    tokenizer_path.display()
                )
            })
        };

        let bos_token = token_text(config.get("bos_token"));
        let config_eos =
            [config_eos_ids(dir, "generation_config.json")?, config_eos_ids(dir, "config.json")?]
                .concat();
        let (eos_token, eos_id) = match token_text(config.get("eos_token")) {
            Some(text) => {
                let id = token_id("eos_token", &text)?;
                (text, id)
            }
            None => {
                let Some(&id) = config_eos.first() else {
                    bail!(
                        "{}: no EOS token (tokenizer_config.json has no eos_token, and neither \
                         generation_config.json nor config.json has an eos_token_id)",
                        dir.display()
                    );
                };
                let text = inner.id_to_token(id).with_context(|| {
                    format!(
                        "{}: eos_token_id {id} is not a token of {}",
                        dir.display(),
                        tokenizer_path.display()
                    )
                })?;
                (text, id)
            }
        };
        let mut stop_ids = vec![i64::from(eos_id)];
        for id in config_eos.into_iter().map(i64::from) {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }

        let add_bos = config.get("add_bos_token").and_then(Value::as_bool);
        let add_eos = config.get("add_eos_token").and_then(Value::as_bool);
        if add_bos.is_some() || add_eos.is_some() {
            // transformers rebuilds the post-processor when the config sets either flag.
            let bos = match (add_bos, bos_token.as_deref()) {
                (Some(true), Some(bos)) => Some((bos, token_id("bos_token", bos)?)),
                _ => None,
            };
            let eos = (add_eos == Some(true)).then_some((eos_token.as_str(), eos_id));
            let processor = bos_eos_processor(bos, eos).with_context(|| {
                format!("building the post-processor that {} asks for", config_path.display())
            })?;
            inner.with_post_processor(Some(processor));
        }

        let template = match chat_template_source(dir, &config, &config_path)? {
            None => None,
            Some((path, source)) => {
                let mut template = ChatTemplate::new(
                    path.display().to_string(),
                    &source,
                    bos_token.clone(),
                    Some(eos_token.clone()),
                )?;
                for key in OTHER_SPECIAL_TOKENS {
                    if let Some(text) = token_text(config.get(key)) {
                        template = template.with_special_token(key, text);
                    }
                }
                Some(template)
            }
        };
        let format = PromptFormat::Auto.resolve(template.is_some())?;
        Ok(Tokenizer { inner, template, bos_token, eos_id, stop_ids, format })
    }

    /// This tokenizer with prompts rendered in `format` (`auto` picks the template when the
    /// model has one, else the transcript); `template` for a model without one is an error.
    pub fn with_prompt_format(mut self, format: PromptFormat) -> Result<Tokenizer> {
        self.format = format.resolve(self.template.is_some())?;
        Ok(self)
    }

    /// The prompt format in use (`template`, `transcript` or `plain`).
    pub fn prompt_format(&self) -> PromptFormat {
        self.format
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// The id appended after every completion: the `eos_token` of `tokenizer_config.json`
    /// (else the first `eos_token_id` of `generation_config.json` or `config.json`).
    pub fn eos_id(&self) -> i64 {
        i64::from(self.eos_id)
    }

    /// Every id that ends generation: [`Tokenizer::eos_id`] first, then the `eos_token_id`s of
    /// `generation_config.json` and `config.json` (Llama 3 Instruct stops at `<|eot_id|>` and
    /// `<|end_of_text|>`).
    pub fn stop_ids(&self) -> &[i64] {
        &self.stop_ids
    }

    /// The text of a prompt in the tokenizer's [`PromptFormat`]: rendered with the chat template
    /// (`add_generation_prompt = true`), as a transcript, or as contents joined by `"\n\n"`.
    pub fn prompt_text(&self, prompt: &[Message]) -> Result<String> {
        match (&self.template, self.format) {
            (Some(template), PromptFormat::Template) => template.render(prompt, true),
            (_, format) => Ok(format.render(prompt)),
        }
    }

    /// Token ids of `text`, special tokens in it parsed, the post-processor's special tokens
    /// added unless the text already starts with the BOS token.
    fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let starts_with_bos =
            self.bos_token.as_deref().is_some_and(|bos| !bos.is_empty() && text.starts_with(bos));
        let encoding = self
            .inner
            .encode(text, !starts_with_bos)
            .map_err(|e| anyhow!("tokenizing a text of {} bytes: {e}", text.len()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The token ids of a prompt as the model sees it before generating (see
    /// [`Tokenizer::prompt_text`]).
    pub fn encode_prompt(&self, prompt: &[Message]) -> Result<Vec<i64>> {
        Ok(self.encode_text(&self.prompt_text(prompt)?)?.into_iter().map(i64::from).collect())
    }

    /// Tokenizes one example by the contract of the module documentation. An empty
    /// completion, or one truncated to nothing, is an [`EmptyCompletion`] error.
    pub fn encode_example(
        &self,
        prompt: &[Message],
        completion: &str,
        max_prompt_length: usize,
        max_length: usize,
    ) -> Result<Encoded> {
        if completion.is_empty() {
            return Err(EmptyCompletion::EmptyText.into());
        }
        let prompt_text = self.prompt_text(prompt)?;
        let prompt_ids = self.encode_text(&prompt_text)?;
        let mut ids = self.encode_text(&(prompt_text + &self.format.reply(completion)))?;
        if ids.last() != Some(&self.eos_id) {
            ids.push(self.eos_id);
        }
        let boundary = prompt_ids.iter().zip(&ids).take_while(|(a, b)| a == b).count();
        let (mut prompt_part, mut completion_part) = ids.split_at(boundary);

        let truncated_prompt = prompt_part.len() > max_prompt_length;
        if truncated_prompt {
            prompt_part = &prompt_part[prompt_part.len() - max_prompt_length..];
        }
        let room = max_length.saturating_sub(prompt_part.len());
        let truncated_completion = completion_part.len() > room;
        if truncated_completion {
            completion_part = &completion_part[..room];
        }
        if completion_part.is_empty() {
            return Err(EmptyCompletion::NoTokensLeft {
                prompt_tokens: prompt_part.len(),
                max_length,
            }
            .into());
        }
        Ok(Encoded {
            ids: prompt_part.iter().chain(completion_part).map(|&id| i64::from(id)).collect(),
            completion_start: prompt_part.len(),
            truncated_prompt,
            truncated_completion,
        })
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids = ids
            .iter()
            .map(|&id| u32::try_from(id).with_context(|| format!("token id {id} is out of range")))
            .collect::<Result<Vec<_>>>()?;
        self.inner.decode(&ids, true).map_err(|e| anyhow!("decoding {} token ids: {e}", ids.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer.json: `<unk>` 0, `<s>` 1, `</s>` 2 (special), then words.
    fn tokenizer_json(post_processor: Value) -> Value {
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        };
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": post_processor, "decoder": null,
            "model": {"type": "WordLevel", "unk_token": "<unk>",
                      "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "user": 5, ":": 6}}
        })
    }

    /// A fresh model directory holding `files` (name, JSON content).
    fn model_dir(name: &str, files: &[(&str, Value)]) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("haloflow-tokenize-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, content) in files {
            std::fs::write(dir.join(file), content.to_string()).unwrap();
        }
        dir
    }

    fn err_text(result: Result<Tokenizer>) -> String {
        format!("{:#}", result.expect_err("loading should fail"))
    }

    #[test]
    fn missing_files_are_named() {
        let dir = model_dir("missing-tokenizer", &[]);
        assert!(err_text(Tokenizer::from_dir(&dir)).contains("tokenizer.json is missing"));
        let dir = model_dir("missing-config", &[("tokenizer.json", tokenizer_json(Value::Null))]);
        assert!(err_text(Tokenizer::from_dir(&dir)).contains("tokenizer_config.json is missing"));
    }

    #[test]
    fn a_tokenizer_without_eos_is_refused() {
        let dir = model_dir(
            "no-eos",
            &[
                ("tokenizer.json", tokenizer_json(Value::Null)),
                ("tokenizer_config.json", serde_json::json!({})),
            ],
        );
        assert!(err_text(Tokenizer::from_dir(&dir)).contains("no EOS token"));
        let dir = model_dir(
            "unknown-eos",
            &[
                ("tokenizer.json", tokenizer_json(Value::Null)),
                (
                    "tokenizer_config.json",
                    serde_json::json!({"eos_token": {"content": "<|eot_id|>"}}),
                ),
            ],
        );
        let err = err_text(Tokenizer::from_dir(&dir));
        assert!(err.contains("eos_token \"<|eot_id|>\" is not a token"), "{err}");
    }

    #[test]
    fn eos_falls_back_to_generation_config_and_stop_ids_collect_all() {
        let dir = model_dir(
            "generation-config-eos",
            &[
                ("tokenizer.json", tokenizer_json(Value::Null)),
                ("tokenizer_config.json", serde_json::json!({"bos_token": null})),
                ("generation_config.json", serde_json::json!({"eos_token_id": [2, 4]})),
                ("config.json", serde_json::json!({"eos_token_id": 3})),
            ],
        );
        let tok = Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.eos_id(), 2);
        assert_eq!(tok.stop_ids(), &[2, 4, 3]);
    }

    #[test]
    fn add_bos_token_rebuilds_the_post_processor() {
        let files = |add_bos: bool| {
            [
                ("tokenizer.json", tokenizer_json(Value::Null)),
                (
                    "tokenizer_config.json",
                    serde_json::json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": add_bos, "add_eos_token": true}),
                ),
            ]
        };
        let plain = |dir| Tokenizer::from_dir(dir).unwrap().with_prompt_format(PromptFormat::Plain).unwrap();
        let tok = plain(model_dir("add-bos", &files(true)));
        assert_eq!(
            tok.encode_prompt(&[Message::new("user", "hello world")]).unwrap(),
            [1, 3, 4, 2]
        );
        let tok = plain(model_dir("no-add-bos", &files(false)));
        assert_eq!(tok.encode_prompt(&[Message::new("user", "hello world")]).unwrap(), [3, 4, 2]);
    }

    #[test]
    fn templates_come_from_the_config_list_or_chat_template_jinja() {
        let config = serde_json::json!({
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "chat_template": [
                {"name": "tool_use", "template": "unused"},
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.role }} : {{ m.content }}{{ eos_token }}{% endfor %}{{ unk_token }}"}
            ]
        });
        let dir = model_dir(
            "template-list",
            &[("tokenizer.json", tokenizer_json(Value::Null)), ("tokenizer_config.json", config)],
        );
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let prompt = [Message::new("user", "hello")];
        assert_eq!(tok.prompt_text(&prompt).unwrap(), "<s>user : hello</s><unk>");
        // Special tokens in the rendered text are parsed as such; the text starts with BOS,
        // so none is added.
        assert_eq!(tok.encode_prompt(&prompt).unwrap(), [1, 5, 6, 3, 2, 0]);
        assert_eq!(tok.decode(&[1, 5, 6, 3, 2]).unwrap(), "user : hello");

        std::fs::write(dir.join("chat_template.jinja"), "{{ messages[0].content }} world").unwrap();
        let tok = Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.prompt_text(&prompt).unwrap(), "hello world");
        assert!(tok.chat_template().unwrap().name().ends_with("chat_template.jinja"));
    }

    #[test]
    fn empty_completions_are_a_countable_error() {
        let dir = model_dir(
            "empty-completion",
            &[
                ("tokenizer.json", tokenizer_json(Value::Null)),
                ("tokenizer_config.json", serde_json::json!({"eos_token": "</s>"})),
            ],
        );
        let tok = Tokenizer::from_dir(&dir).unwrap().with_prompt_format(PromptFormat::Plain).unwrap();
        let prompt = [Message::new("user", "hello world hello")];
        let err = tok.encode_example(&prompt, "", 10, 10).unwrap_err();
        assert_eq!(err.downcast_ref::<EmptyCompletion>(), Some(&EmptyCompletion::EmptyText));
        let err = tok.encode_example(&prompt, " world", 3, 3).unwrap_err();
        assert_eq!(
            err.downcast_ref::<EmptyCompletion>(),
            Some(&EmptyCompletion::NoTokensLeft { prompt_tokens: 3, max_length: 3 })
        );
        let encoded = tok.encode_example(&prompt, " world", 2, 3).unwrap();
        assert_eq!(
            encoded,
            Encoded {
                ids: vec![4, 3, 4],
                completion_start: 2,
                truncated_prompt: true,
                truncated_completion: true
            }
        );
        assert!(tok.decode(&[-1]).is_err());
    }
}
