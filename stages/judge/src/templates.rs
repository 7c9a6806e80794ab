//! Judge prompt templates: the built-in ones (TOML files under `templates/`, embedded in the
//! binary) and a user's own template file, rendered into the chat messages sent to a judge.
//!
//! A template file holds `description`, an optional `max_tokens` (the judge's answer budget the
//! template was designed for), one or more `[[messages]]` (`role`, `content`) and a `[verdict]`
//! table (see [`VerdictSpec`]). Contents may use the placeholders of [`PLACEHOLDERS`]; any other
//! `{name}` made of lowercase letters, digits and underscores is an error, every other brace is
//! literal text (AlpacaEval's prompt is JSON-like).

use std::path::Path;

use anyhow::{bail, Context, Result};
use haloflow::records::Message;
use serde::Deserialize;

use crate::verdict::VerdictSpec;

/// The built-in templates: name and TOML text.
pub const BUILTIN: &[(&str, &str)] = &[
    ("halos", include_str!("../templates/halos.toml")),
    ("mt-bench", include_str!("../templates/mt-bench.toml")),
    ("alpaca-eval", include_str!("../templates/alpaca-eval.toml")),
];

/// The placeholders a template may use, with what each one becomes.
pub const PLACEHOLDERS: &[(&str, &str)] = &[
    ("question", "the prompt's user message (the whole conversation if it has several turns)"),
    ("conversation", "the prompt's messages in Tulu format (<|user|>, <|assistant|> prefixes)"),
    ("answer_a", "the output shown first"),
    ("answer_b", "the output shown second"),
    ("reference", "the prompt's reference answer (every prompt must have one)"),
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateFile {
    #[serde(default)]
    description: String,
    #[serde(default)]
    max_tokens: Option<u32>,
    messages: Vec<Message>,
    verdict: VerdictSpec,
}

/// A parsed, validated template.
#[derive(Debug, Clone)]
pub struct Template {
    /// Built-in name, or the file's path.
    pub name: String,
    /// The template's source text (part of the response cache key).
    pub text: String,
    /// One line on what the template asks.
    pub description: String,
    /// The answer budget the template was designed for, if it says.
    pub max_tokens: Option<u32>,
    /// Messages with placeholders.
    pub messages: Vec<Message>,
    /// How verdicts are read from an answer.
    pub verdict: VerdictSpec,
}

/// The values of the placeholders for one judge request.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// `{question}`.
    pub question: &'a str,
    /// `{conversation}`.
    pub conversation: &'a str,
    /// `{answer_a}`.
    pub answer_a: &'a str,
    /// `{answer_b}`.
    pub answer_b: &'a str,
    /// `{reference}`, if the prompt has one.
    pub reference: Option<&'a str>,
}

/// A piece of template text: literal text or a `{placeholder}`.
enum Piece<'a> {
    Text(&'a str),
    Placeholder(&'a str),
}

/// Splits `text` into literal text and `{name}` placeholders (lowercase, digits, underscores).
fn pieces(text: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(after.len());
        if name_len > 0 && after[name_len..].starts_with('}') {
            out.push(Piece::Text(&rest[..open]));
            out.push(Piece::Placeholder(&after[..name_len]));
            rest = &after[name_len + 1..];
        } else {
            out.push(Piece::Text(&rest[..=open]));
            rest = after;
        }
    }
    out.push(Piece::Text(rest));
    out
}

impl Template {
    /// A built-in template by name.
    pub fn builtin(name: &str) -> Result<Template> {
        let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        let (_, text) = BUILTIN
            .iter()
            .find(|(n, _)| *n == name)
            .with_context(|| format!("unknown template `{name}` (built-in: {}; or give --template-file)", names.join(", ")))?;
        Template::parse(name, text)
    }

    /// A user's template file.
    pub fn from_file(path: &Path) -> Result<Template> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading template {}", path.display()))?;
        Template::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates template text; errors name the template.
    pub fn parse(name: &str, text: &str) -> Result<Template> {
        let file: TemplateFile = toml::from_str(text).with_context(|| format!("template `{name}`: not a valid template file"))?;
        let template = Template {
            name: name.to_string(),
            text: text.to_string(),
            description: file.description,
            max_tokens: file.max_tokens,
            messages: file.messages,
            verdict: file.verdict,
        };
        template.validate().with_context(|| format!("template `{name}`"))?;
        Ok(template)
    }

    fn validate(&self) -> Result<()> {
        if self.messages.is_empty() {
            bail!("has no [[messages]]");
        }
        for m in &self.messages {
            if !["system", "user", "assistant"].contains(&m.role.as_str()) {
                bail!("message role `{}` is not system, user or assistant", m.role);
            }
            for piece in pieces(&m.content) {
                if let Piece::Placeholder(p) = piece {
                    if !PLACEHOLDERS.iter().any(|(known, _)| *known == p) {
                        let known: Vec<&str> = PLACEHOLDERS.iter().map(|(k, _)| *k).collect();
                        bail!("unknown placeholder {{{p}}} (known: {})", known.join(", "));
                    }
                }
            }
        }
        for required in ["answer_a", "answer_b"] {
            if !self.uses(required) {
                bail!("never uses {{{required}}}");
            }
        }
        if !self.uses("question") && !self.uses("conversation") {
            bail!("uses neither {{question}} nor {{conversation}}");
        }
        let labels = self.verdict.labels();
        if labels.iter().any(|(l, _)| l.trim().is_empty()) {
            bail!("[verdict] has an empty label");
        }
        let fold = |s: &str| if self.verdict.case_sensitive { s.to_string() } else { s.to_lowercase() };
        for (i, (x, _)) in labels.iter().enumerate() {
            if labels[i + 1..].iter().any(|(y, _)| fold(x) == fold(y)) {
                bail!("[verdict] label `{x}` is used twice");
            }
        }
        Ok(())
    }

    /// Whether any message uses `{placeholder}`.
    pub fn uses(&self, placeholder: &str) -> bool {
        self.messages
            .iter()
            .any(|m| pieces(&m.content).iter().any(|p| matches!(p, Piece::Placeholder(n) if *n == placeholder)))
    }

    /// The judge's messages for one request. Placeholders are substituted in one pass, so text
    /// inside an answer that looks like a placeholder is left alone.
    pub fn render(&self, fields: &Fields) -> Result<Vec<Message>> {
        self.messages
            .iter()
            .map(|m| {
                let mut content = String::with_capacity(m.content.len() + fields.answer_a.len() + fields.answer_b.len());
                for piece in pieces(&m.content) {
                    content.push_str(match piece {
                        Piece::Text(t) => t,
                        Piece::Placeholder("question") => fields.question,
                        Piece::Placeholder("conversation") => fields.conversation,
                        Piece::Placeholder("answer_a") => fields.answer_a,
                        Piece::Placeholder("answer_b") => fields.answer_b,
                        Piece::Placeholder("reference") => fields.reference.context("the prompt has no reference answer")?,
                        Piece::Placeholder(other) => bail!("unknown placeholder {{{other}}}"),
                    });
                }
                Ok(Message::new(&m.role, content))
            })
            .collect()
    }
}

/// `{question}`: the only user message of a single-turn prompt (system messages aside), or the
/// whole [`conversation`] when the prompt has several turns.
pub fn question(prompt: &[Message]) -> String {
    let turns: Vec<&Message> = prompt.iter().filter(|m| m.role != "system").collect();
    match turns.as_slice() {
        [only] if only.role == "user" => only.content.clone(),
        _ => conversation(prompt),
    }
}

/// `{conversation}`: the messages in Tulu format, as the HALOs scripts show them to GPT-4:
/// each message prefixed by `\n<|ROLE|>\n`, the whole trimmed.
pub fn conversation(prompt: &[Message]) -> String {
    prompt
        .iter()
        .map(|m| format!("\n<|{}|>\n{}", m.role, m.content))
        .collect::<String>()
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(a: &'a str, b: &'a str) -> Fields<'a> {
        Fields { question: "What is 2+2?", conversation: "<|user|>\nWhat is 2+2?", answer_a: a, answer_b: b, reference: None }
    }

    #[test]
    fn builtins_parse_and_render_their_answers_in_order() {
        for (name, _) in BUILTIN {
            let t = Template::builtin(name).unwrap();
            let text: String = t.render(&fields("FIRST {answer_b}", "SECOND")).unwrap().iter().map(|m| m.content.clone()).collect();
            let (a, b) = (text.find("FIRST").unwrap(), text.find("SECOND").unwrap());
            assert!(a < b, "{name}: answer_a comes first");
            assert!(text.contains("FIRST {answer_b}"), "{name}: placeholders inside answers are not substituted");
            assert!(!text.contains("{question}") && !text.contains("{conversation}"), "{name}");
        }
        let alpaca = Template::builtin("alpaca-eval").unwrap().render(&fields("x", "y")).unwrap();
        assert_eq!(alpaca[0].role, "system");
        assert!(alpaca[1].content.contains("\"instruction\": \"\"\"What is 2+2?\"\"\""), "{}", alpaca[1].content);
        assert!(Template::builtin("gpt5").unwrap_err().to_string().contains("halos, mt-bench, alpaca-eval"));
    }

    #[test]
    fn user_templates_are_validated() {
        let good = r#"
            messages = [{ role = "user", content = "Q: {question}\nA: {answer_a}\nB: {answer_b}\nRef: {reference} {not a placeholder}" }]
            [verdict]
            a = "A"
            b = "B"
            match = "exact"
            case_sensitive = false
        "#;
        let t = Template::parse("mine", good).unwrap();
        assert!(t.uses("reference") && !t.uses("conversation"));
        let err = format!("{:#}", t.render(&fields("x", "y")).unwrap_err());
        assert!(err.contains("no reference"), "{err}");
        let mut f = fields("x", "y");
        f.reference = Some("4");
        assert!(t.render(&f).unwrap()[0].content.ends_with("Ref: 4 {not a placeholder}"));

        let typo = good.replace("{answer_b}", "{answer_2}");
        let err = format!("{:#}", Template::parse("typo", &typo).unwrap_err());
        assert!(err.contains("unknown placeholder {answer_2}"), "{err}");
        let missing = good.replace("{answer_b}", "");
        assert!(format!("{:#}", Template::parse("m", &missing).unwrap_err()).contains("never uses {answer_b}"));
        let dup = good.replace("b = \"B\"", "b = \"a\"");
        assert!(format!("{:#}", Template::parse("d", &dup).unwrap_err()).contains("used twice"));
        let role = good.replace("role = \"user\"", "role = \"judge\"");
        assert!(format!("{:#}", Template::parse("r", &role).unwrap_err()).contains("role `judge`"));
    }

    #[test]
    fn question_and_conversation_of_a_prompt() {
        let single = [Message::new("system", "Be brief."), Message::new("user", "Hi?")];
        assert_eq!(question(&single), "Hi?");
        assert_eq!(conversation(&single), "<|system|>\nBe brief.\n<|user|>\nHi?");
        let multi = [Message::new("user", "Hi"), Message::new("assistant", "Hello"), Message::new("user", "Bye?")];
        assert_eq!(question(&multi), "<|user|>\nHi\n<|assistant|>\nHello\n<|user|>\nBye?");
    }
}
