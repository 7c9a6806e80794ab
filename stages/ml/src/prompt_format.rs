//! How a prompt (a list of messages) becomes text, and how a reply follows it.
//!
//! * `template`: the model's chat template (`add_generation_prompt = true`); the reply follows
//!   the rendered text directly.
//! * `transcript`: the raw transcript of Anthropic's HH-RLHF, which HALOs and TRL users feed
//!   to base models: `"\n\nHuman: …"` and `"\n\nAssistant: …"` turns (a system message is the
//!   text before the first turn), ending with `"\n\nAssistant:"`; the reply follows after one
//!   space (`"\n\nAssistant: reply"`), and generation stops at the next `"\n\nHuman:"`.
//! * `plain`: the contents joined by a blank line, the reply following with no separator
//!   (haloflow's form before transcripts; roles are lost).
//!
//! `auto`, the default, is `template` for a model with a chat template and `transcript` for
//! one without.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Result};
use haloflow::records::Message;

use crate::tokenize::Tokenizer;

/// Marks a user turn in a transcript.
pub const HUMAN: &str = "\n\nHuman:";
/// Marks an assistant turn in a transcript.
pub const ASSISTANT: &str = "\n\nAssistant:";

/// A prompt format as asked for (`--prompt-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptFormat {
    /// `template` when the model has a chat template, else `transcript`.
    #[default]
    Auto,
    /// The model's chat template.
    Template,
    /// `\n\nHuman: …\n\nAssistant:` turns.
    Transcript,
    /// Contents joined by blank lines.
    Plain,
}

impl PromptFormat {
    /// The format used for a model with (or without) a chat template; `template` without one is
    /// an error.
    pub fn resolve(self, has_template: bool) -> Result<PromptFormat> {
        Ok(match (self, has_template) {
            (PromptFormat::Auto, true) => PromptFormat::Template,
            (PromptFormat::Auto, false) => PromptFormat::Transcript,
            (PromptFormat::Template, false) => bail!("--prompt-format template: the model has no chat template (tokenizer_config.json has no chat_template and there is no chat_template.jinja); use transcript or plain"),
            (format, _) => format,
        })
    }

    /// The text of `prompt` in a resolved format without a template (`transcript` or `plain`).
    pub fn render(self, prompt: &[Message]) -> String {
        match self {
            PromptFormat::Transcript => {
                let mut text = String::new();
                for m in prompt {
                    match m.role.as_str() {
                        "system" => text.push_str(&m.content),
                        "assistant" => text.push_str(&format!("{ASSISTANT} {}", m.content)),
                        _ => text.push_str(&format!("{HUMAN} {}", m.content)),
                    }
                }
                text + ASSISTANT
            }
            _ => prompt.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n"),
        }
    }

    /// The text written after the prompt text for `reply`: a transcript puts one space after
    /// `Assistant:` (unless the reply starts with whitespace).
    pub fn reply(self, reply: &str) -> String {
        match self {
            PromptFormat::Transcript if !reply.starts_with(char::is_whitespace) => format!(" {reply}"),
            _ => reply.to_string(),
        }
    }

    /// The reply in generated text: the separator [`PromptFormat::reply`] adds is removed.
    pub fn strip_reply(self, generated: &str) -> &str {
        match self {
            PromptFormat::Transcript => generated.strip_prefix(' ').unwrap_or(generated),
            _ => generated,
        }
    }

    /// Stop strings a reply in this format ends at (the next turn of a transcript).
    pub fn stop_strings(self) -> &'static [&'static str] {
        match self {
            PromptFormat::Transcript => &[HUMAN],
            _ => &[],
        }
    }
}

/// The `--prompt-format` flag of the stages that tokenize prompts (refcache, train, sample).
#[derive(Debug, Clone, clap::Args)]
pub struct PromptFormatArg {
    /// How prompts become text: auto (the model's chat template; for a model without one, an
    /// HH-RLHF transcript "\n\nHuman: …\n\nAssistant:" with the reply after one space),
    /// template, transcript or plain (contents joined by blank lines, no separator before the
    /// reply). Refcache and train must use the same (the cache's fingerprint records it).
    #[arg(long, default_value = "auto")]
    pub prompt_format: PromptFormat,
}

impl PromptFormatArg {
    /// The tokenizer of the model directory `dir`, rendering prompts in this format.
    pub fn tokenizer(&self, dir: &Path) -> Result<Tokenizer> {
        Tokenizer::from_dir(dir)?.with_prompt_format(self.prompt_format)
    }
}

impl FromStr for PromptFormat {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<PromptFormat> {
        Ok(match s {
            "auto" => PromptFormat::Auto,
            "template" => PromptFormat::Template,
            "transcript" => PromptFormat::Transcript,
            "plain" => PromptFormat::Plain,
            other => bail!("unknown prompt format `{other}` (use auto, template, transcript or plain)"),
        })
    }
}

impl fmt::Display for PromptFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PromptFormat::Auto => "auto",
            PromptFormat::Template => "template",
            PromptFormat::Transcript => "transcript",
            PromptFormat::Plain => "plain",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcripts_are_hh_rlhf_text() {
        let prompt = [Message::new("user", "Hi"), Message::new("assistant", "Hello."), Message::new("user", "How are you?")];
        let text = PromptFormat::Transcript.render(&prompt);
        assert_eq!(text, "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:");
        assert_eq!(text + &PromptFormat::Transcript.reply("Fine."), "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant: Fine.");
        assert_eq!(PromptFormat::Transcript.render(&[Message::new("system", "Be brief."), Message::new("user", "Q")]), "Be brief.\n\nHuman: Q\n\nAssistant:");
        assert_eq!(PromptFormat::Transcript.reply("\nlist"), "\nlist");
        assert_eq!(PromptFormat::Transcript.strip_reply(" Fine."), "Fine.");
    }

    #[test]
    fn plain_joins_contents_and_auto_resolves_by_template() {
        let prompt = [Message::new("system", "S"), Message::new("user", "Q")];
        assert_eq!(PromptFormat::Plain.render(&prompt), "S\n\nQ");
        assert_eq!(PromptFormat::Plain.reply("A"), "A");
        assert_eq!(PromptFormat::Auto.resolve(false).unwrap(), PromptFormat::Transcript);
        assert_eq!(PromptFormat::Auto.resolve(true).unwrap(), PromptFormat::Template);
        assert_eq!(PromptFormat::Plain.resolve(true).unwrap(), PromptFormat::Plain);
        assert!(PromptFormat::Template.resolve(false).unwrap_err().to_string().contains("no chat template"));
        for name in ["auto", "template", "transcript", "plain"] {
            assert_eq!(name.parse::<PromptFormat>().unwrap().to_string(), name);
        }
        assert!("chatml".parse::<PromptFormat>().unwrap_err().to_string().contains("transcript"));
    }
}
