//! Hugging Face chat templates, rendered as transformers renders them.
//!
//! A chat template is the Jinja source in a model's `tokenizer_config.json` (`chat_template`),
//! its `chat_template.jinja`, or a GGUF's `tokenizer.chat_template`. transformers renders it
//! with jinja2 (`apply_chat_template(..., tokenize=False)`); [`ChatTemplate`] renders it with
//! minijinja set up the same way, so the text (and so the token ids) match byte for byte:
//!
//! * `trim_blocks` and `lstrip_blocks` on, no autoescaping, the final newline dropped;
//! * Python string, list and dict methods (`.strip()`, `.items()`, ...) through
//!   minijinja-contrib's `pycompat`;
//! * the variables `messages` (a list of `{role, content}`), `add_generation_prompt`, `tools`
//!   (`none` unless given), `documents` (`none`) and the tokenizer's special tokens
//!   (`bos_token`, `eos_token`, and any others set with [`ChatTemplate::with_special_token`];
//!   a token the tokenizer does not define is left undefined, as in transformers);
//! * the functions `raise_exception(msg)` (fails the render with `msg`) and `strftime_now(fmt)`
//!   (local time, Python `strftime` directives);
//! * a `tojson` filter that is Python's `json.dumps(x, ensure_ascii=False)`, with its `indent`,
//!   `separators`, `sort_keys` and `ensure_ascii` keywords: unlike Jinja's own `tojson` it does
//!   not HTML-escape `<`, `>`, `&` or `'`.
//!
//! `stages/ml/tests/data/templates/expected.json` (written by
//! `ci/parity/make_template_expectations.py` with transformers) holds the reference renders
//! of Llama 3, Llama 3.1, Qwen2.5 and SmolLM2 templates that the tests compare against.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result};
use haloflow::records::Message;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};

/// A compiled chat template with the special tokens it is rendered with.
#[derive(Debug)]
pub struct ChatTemplate {
    /// Names the template in errors (and is its name inside `env`).
    name: String,
    env: Environment<'static>,
    /// Template variables such as `bos_token` → `<s>`.
    special_tokens: BTreeMap<String, String>,
}

impl ChatTemplate {
    /// Compiles `source`; `name` says where it came from (e.g. the path of the
    /// `tokenizer_config.json`) and names the template in every error. `bos_token` and
    /// `eos_token` are the texts of the tokenizer's BOS and EOS tokens, if it has them.
    pub fn new(
        name: impl Into<String>,
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let name = name.into();
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .context("building the Jinja syntax configuration")?,
        );
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(name.clone(), source.to_string())
            .with_context(|| format!("chat template `{name}` does not parse"))?;
        let mut template = ChatTemplate { name, env, special_tokens: BTreeMap::new() };
        for (key, value) in [("bos_token", bos_token), ("eos_token", eos_token)] {
            if let Some(value) = value {
                template = template.with_special_token(key, value);
            }
        }
        Ok(template)
    }

    /// Sets another special-token variable (`unk_token`, `pad_token`, ...), as transformers
    /// passes every special token of the tokenizer to the template.
    pub fn with_special_token(mut self, key: &str, value: String) -> Self {
        self.special_tokens.insert(key.to_string(), value);
        self
    }

    /// Where the template came from, as given to [`ChatTemplate::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends with the header of
    /// the assistant turn the model is to write.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_inner(messages, None, add_generation_prompt)
    }

    /// Renders a conversation with tool (function) definitions, JSON schemas as in
    /// transformers' `apply_chat_template(..., tools=...)`. Templates without tool support
    /// ignore them.
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_inner(messages, Some(tools), add_generation_prompt)
    }

    fn render_inner(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let mut context: BTreeMap<&str, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.as_str(), Value::from(v.as_str())))
            .collect();
        context.insert("messages", Value::from(Serde(messages)));
        context.insert("tools", tools.map_or(Value::from(()), |t| Value::from(Serde(t))));
        context.insert("documents", Value::from(()));
        context.insert("add_generation_prompt", Value::from(add_generation_prompt));
        let template = self.env.get_template(&self.name)?;
        template
            .render(context)
            .with_context(|| format!("chat template `{}` failed to render", self.name))
    }
}

/// `raise_exception(msg)`: what templates call to reject a conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(fmt)`: the local time formatted like Python's `datetime.now().strftime(fmt)`.
fn strftime_now(format: String) -> Result<String, Error> {
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(ErrorKind::InvalidOperation, format!("strftime_now: bad format {format:?}"))
    })?;
    Ok(out)
}

/// How `tojson` lays out JSON: Python `json.dumps` options.
struct JsonStyle {
    /// `None`: everything on one line; otherwise one item a line, indented by this per level.
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

/// The `tojson` filter: Python's `json.dumps(value, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, keywords as there.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.to_string()),
        Some(v) => {
            let n = i64::try_from(v)?;
            Some(" ".repeat(usize::try_from(n).unwrap_or(0)))
        }
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let (item_separator, key_separator) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair (item_separator, key_separator)",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle {
        indent,
        item_separator,
        key_separator,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    Ok(Value::from(out))
}

fn not_serializable(value: &Value) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!("tojson: a value of kind {} is not JSON serializable", value.kind()),
    )
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&json_number(value)?),
        ValueKind::String => {
            write_json_string(out, value.as_str().unwrap_or_default(), style.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, ('[', ']'), &items, style, depth, |out, item, depth| {
                write_json(out, item, style, depth)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, ('{', '}'), &entries, style, depth, |out, (key, item), depth| {
                write_json_string(out, key, style.ensure_ascii);
                out.push_str(&style.key_separator);
                write_json(out, item, style, depth)
            })?;
        }
        _ => return Err(not_serializable(value)),
    }
    Ok(())
}

/// Writes `[...]` or `{...}` with Python's layout: empty containers stay `[]`/`{}`; with an
/// indent each item is on its own line.
fn write_container<T>(
    out: &mut String,
    (open, close): (char, char),
    items: &[T],
    style: &JsonStyle,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &T, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if !items.is_empty() {
        let newline = |out: &mut String, level: usize| {
            if let Some(indent) = &style.indent {
                out.push('\n');
                out.push_str(&indent.repeat(level));
            }
        };
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&style.item_separator);
            }
            newline(out, depth + 1);
            write_item(out, item, depth + 1)?;
        }
        newline(out, depth);
    }
    out.push(close);
    Ok(())
}

/// A map key as Python's `json.dumps` writes it: strings as they are, numbers, booleans and
/// `None` converted; anything else refused.
fn json_key(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::Number => json_number(key),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_string()),
        ValueKind::None => Ok("null".to_string()),
        _ => Err(not_serializable(key)),
    }
}

/// A number as Python writes it: integers exactly, floats as `repr(float)`.
fn json_number(value: &Value) -> Result<String, Error> {
    if value.is_integer() {
        return Ok(value.to_string());
    }
    Ok(python_float_repr(f64::try_from(value.clone())?))
}

/// Python's `repr(x)` (and `json.dumps(x)`) for a float: the shortest digits that round-trip,
/// positional for decimal exponents in [-4, 16), scientific (`1e+16`, `1.5e-05`) otherwise.
fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x < 0.0 { "-Infinity" } else { "Infinity" }.to_string();
    }
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-7", "1e20", "0e0".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exponent) = sci.split_once('e').expect("`{:e}` always writes an exponent");
    let exponent: i32 = exponent.parse().expect("`{:e}` writes an integer exponent");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exponent) {
        let point = exponent + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
        } else if digits.len() as i32 <= point {
            format!("{digits}{}.0", "0".repeat((point - digits.len() as i32) as usize))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let fraction = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{first}{fraction}e{exp_sign}{:02}", exponent.unsigned_abs())
    }
}

/// A JSON string literal as Python writes it: `"`, `\` and control characters escaped (the
/// short forms `\n`, `\t`, ... where JSON has them); with `ensure_ascii` every non-ASCII
/// character as `\uXXXX` (UTF-16 surrogate pairs beyond the BMP).
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_str(source: &str, context_json: serde_json::Value) -> Result<String> {
        let template = ChatTemplate::new("test", source, None, None)?;
        let template = template.env.get_template("test")?;
        Ok(template.render(Value::from(Serde(context_json)))?)
    }

    #[test]
    fn tojson_is_python_json_dumps_without_html_escaping() {
        let x = serde_json::json!({"s": "<a href='x'>&\"é\"</a>\n\u{1}", "n": [1, -2.5, 1e20, 1.5e-5, true, null], "e": {}, "l": []});
        assert_eq!(
            render_str("{{ x | tojson }}", serde_json::json!({"x": x})).unwrap(),
            r#"{"s": "<a href='x'>&\"é\"</a>\n\u0001", "n": [1, -2.5, 1e+20, 1.5e-05, true, null], "e": {}, "l": []}"#
        );
        assert_eq!(
            render_str(
                "{{ x | tojson(indent=2) }}",
                serde_json::json!({"x": {"a": [1, {}], "b": "ü"}})
            )
            .unwrap(),
            "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": \"ü\"\n}"
        );
        assert_eq!(
            render_str(
                "{{ x | tojson(separators=(',', ':'), sort_keys=true, ensure_ascii=true) }}",
                serde_json::json!({"x": {"b": "é🤗", "a": 1}})
            )
            .unwrap(),
            r#"{"a":1,"b":"\u00e9\ud83e\udd17"}"#
        );
        let err = render_str("{{ x | tojson(bogus=1) }}", serde_json::json!({"x": 1})).unwrap_err();
        assert!(format!("{err:#}").contains("bogus"), "{err:#}");
    }

    #[test]
    fn float_repr_matches_python() {
        for (x, python) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (123456.789, "123456.789"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e-4, "0.00012345"),
            (1.2345e-5, "1.2345e-05"),
            (-2.5e300, "-2.5e+300"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ] {
            assert_eq!(python_float_repr(x), python, "{x}");
        }
    }

    #[test]
    fn raise_exception_fails_the_render_naming_the_template() {
        let template = ChatTemplate::new(
            "my/tokenizer_config.json",
            "{{ raise_exception('roles must alternate') }}",
            None,
            None,
        )
        .unwrap();
        let err = format!("{:#}", template.render(&[], false).unwrap_err());
        assert!(err.contains("chat template `my/tokenizer_config.json` failed to render"), "{err}");
        assert!(err.contains("roles must alternate"), "{err}");
    }

    #[test]
    fn parse_errors_name_the_template() {
        let err =
            ChatTemplate::new("broken.jinja", "{% for m in messages %}", None, None).unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("chat template `broken.jinja` does not parse"), "{err}");
    }

    #[test]
    fn strftime_now_formats_the_local_time() {
        let year = chrono::Local::now().format("%Y").to_string();
        assert_eq!(render_str("{{ strftime_now('%Y') }}", serde_json::json!({})).unwrap(), year);
        // "%d %b %Y" as in Llama 3.2's template: two digits, a month name, the year.
        let date = render_str("{{ strftime_now('%d %b %Y') }}", serde_json::json!({})).unwrap();
        assert!(date.ends_with(&year) && date.len() == 11, "{date}");
    }

    #[test]
    fn python_semantics_of_values_methods_and_whitespace() {
        let source = "{% for m in messages %}\n  {% if m.content.strip().startswith('x') %}\n{{ m.role.upper() }}:{{ none }}/{{ true }}\n  {% endif %}\n{% endfor %}\n";
        let messages = [Message::new("user", "  xy "), Message::new("assistant", "no")];
        let template = ChatTemplate::new("t", source, None, None).unwrap();
        assert_eq!(template.render(&messages, false).unwrap(), "USER:None/True\n");
    }

    #[test]
    fn special_tokens_are_variables_and_missing_ones_are_undefined() {
        let template = ChatTemplate::new(
            "t",
            "[{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token is defined }}]",
            Some("<s>".into()),
            None,
        )
        .unwrap()
        .with_special_token("pad_token", "<pad>".into());
        assert_eq!(template.render(&[], true).unwrap(), "[<s>||<pad>|False]");
        assert_eq!(template.name(), "t");
    }
}
