//! TRL-style datasets, JSONL or Parquet:
//!
//! - preference rows `prompt`/`chosen`/`rejected` (kind `paired`),
//! - unpaired rows `prompt`/`completion`/`label` with an optional `weight` (kind `binary`).
//!
//! Each of these may be "standard" (plain strings; a string prompt becomes one user message) or
//! "conversational" (lists of `{role, content}`; a reply list must hold exactly one assistant
//! message). Conversational pairs may leave out `prompt`: it is then the messages that
//! `chosen` and `rejected` share at their start ("implicit prompt").

use std::path::Path;

use anyhow::{bail, Result};
use haloflow::records::{is_empty_prompt, prompt_id, BinaryRow, Message, PairedRow};
use serde_json::Value;

use crate::format::Format;
use crate::output::{Collected, EMPTY_PROMPT, EMPTY_REPLY, IDENTICAL_REPLIES};
use crate::source::{Field, Record};

/// Skip reason: a conversational reply that is not exactly one assistant message.
pub const NOT_ONE_ASSISTANT_MESSAGE: &str = "not_one_assistant_message";
/// Skip reason: an implicit-prompt pair whose `chosen` and `rejected` share no first message.
pub const NO_SHARED_PROMPT: &str = "no_shared_prompt";

const FIELDS: &[&str] = &["prompt", "chosen", "rejected", "completion", "label", "weight"];

/// Imports preference pairs (`prompt`/`chosen`/`rejected`) from `path`.
pub fn import_paired(path: &Path, limit: Option<usize>) -> Result<Collected<PairedRow>> {
    let reasons = [NO_SHARED_PROMPT, NOT_ONE_ASSISTANT_MESSAGE, EMPTY_PROMPT, EMPTY_REPLY, IDENTICAL_REPLIES];
    Collected::read(path, FIELDS, &reasons, limit, |record, out| {
        let root = record.root();
        if !root.has("chosen") && root.has("completion") {
            bail!(
                "{}: this is an unpaired TRL file (prompt/completion/label): import it with --kind binary",
                record.loc
            );
        }
        let (chosen, rejected) = (root.get("chosen")?, root.get("rejected")?);
        let (prompt, chosen, rejected) = match root.opt("prompt")? {
            Some(prompt) => (messages_or_text(&prompt)?, reply(&chosen)?, reply(&rejected)?),
            None => match implicit_prompt(&chosen, &rejected)? {
                Ok(split) => split,
                Err(reason) => {
                    out.skip(reason);
                    return Ok(());
                }
            },
        };
        let (Some(chosen), Some(rejected)) = (chosen, rejected) else {
            out.skip(NOT_ONE_ASSISTANT_MESSAGE);
            return Ok(());
        };
        out.push_pair(PairedRow {
            prompt_id: prompt_id(&prompt),
            pair_id: row_id(record),
            prompt,
            chosen,
            rejected,
            score_chosen: None,
            score_rejected: None,
            source: Some(Format::Trl.name().to_string()),
        });
        Ok(())
    })
}

/// Imports unpaired examples (`prompt`/`completion`/`label`, optional `weight`) from `path`.
pub fn import_binary(path: &Path, limit: Option<usize>) -> Result<Collected<BinaryRow>> {
    Collected::read(path, FIELDS, &[NOT_ONE_ASSISTANT_MESSAGE, EMPTY_PROMPT, EMPTY_REPLY], limit, |record, out| {
        let root = record.root();
        if !root.has("completion") && root.has("chosen") {
            bail!(
                "{}: this is a preference TRL file (prompt/chosen/rejected): import it with --kind paired \
                 (the unpair stage turns pairs into binary examples)",
                record.loc
            );
        }
        let prompt = messages_or_text(&root.get("prompt")?)?;
        let label = root.get("label")?.bool()?;
        let weight = match root.opt("weight")? {
            Some(field) => match field.finite()? {
                w if w > 0.0 => w,
                w => return Err(field.error(format!("weight {w} is not positive"))),
            },
            None => 1.0,
        };
        match reply(&root.get("completion")?)? {
            _ if is_empty_prompt(&prompt) => out.skip(EMPTY_PROMPT),
            None => out.skip(NOT_ONE_ASSISTANT_MESSAGE),
            Some(completion) if completion.trim().is_empty() => out.skip(EMPTY_REPLY),
            Some(completion) => out.push(BinaryRow {
                example_id: row_id(record),
                prompt_id: prompt_id(&prompt),
                prompt,
                completion,
                label,
                weight,
                source: Some(Format::Trl.name().to_string()),
            }),
        }
        Ok(())
    })
}

/// The id of the pair or example of a record: `trl-LINE`.
fn row_id(record: &Record) -> String {
    record.loc.id(Format::Trl.name())
}

/// A list of `{role, content}` messages.
fn messages(field: &Field) -> Result<Vec<Message>> {
    field.array()?.iter().map(|m| Ok(Message::new(m.get("role")?.str()?, m.get("content")?.str()?))).collect()
}

/// A prompt: a list of messages, or a string taken as one user message.
fn messages_or_text(field: &Field) -> Result<Vec<Message>> {
    match &field.value {
        Value::String(text) => Ok(vec![Message::new("user", text)]),
        Value::Array(_) => messages(field),
        _ => Err(field.expected(STRING_OR_MESSAGES)),
    }
}

/// A reply: a string, or the content of a list holding exactly one assistant message (`None`
/// if the list holds anything else).
fn reply(field: &Field) -> Result<Option<String>> {
    match &field.value {
        Value::String(text) => Ok(Some(text.clone())),
        Value::Array(_) => Ok(one_assistant_message(messages(field)?)),
        _ => Err(field.expected(STRING_OR_MESSAGES)),
    }
}

const STRING_OR_MESSAGES: &str = "a string or a list of {role, content} messages";

/// The content of the only message of `messages` if it is an assistant message.
fn one_assistant_message(mut messages: Vec<Message>) -> Option<String> {
    match messages.pop() {
        Some(m) if messages.is_empty() && m.role == "assistant" => Some(m.content),
        _ => None,
    }
}

/// The prompt and the replies (see [`reply`]) of an implicit-prompt pair.
type Split = (Vec<Message>, Option<String>, Option<String>);

/// Splits conversational `chosen` and `rejected` lists into their shared first messages (the
/// prompt) and the rest of each.
fn implicit_prompt(chosen: &Field, rejected: &Field) -> Result<Result<Split, &'static str>> {
    if chosen.value.is_string() {
        bail!(chosen.error(
            "a standard (string) pair needs a \"prompt\" field; only conversational pairs (lists of messages) may leave it out"
        ));
    }
    let (mut chosen, mut rejected) = (messages(chosen)?, messages(rejected)?);
    if chosen == rejected {
        return Ok(Err(IDENTICAL_REPLIES));
    }
    let shared = chosen.iter().zip(&rejected).take_while(|(c, r)| c == r).count();
    if shared == 0 {
        return Ok(Err(NO_SHARED_PROMPT));
    }
    let (chosen_reply, rejected_reply) = (chosen.split_off(shared), rejected.split_off(shared));
    Ok(Ok((chosen, one_assistant_message(chosen_reply), one_assistant_message(rejected_reply))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{nonzero, temp_file};
    use arrow_array::{BooleanArray, Float64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field as ArrowField, Schema};
    use parquet::basic::Compression;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn user(text: &str) -> Message {
        Message::new("user", text)
    }

    fn paired(lines: &[&str]) -> Result<Collected<PairedRow>> {
        let (_dir, path) = temp_file("data.jsonl", &lines.join("\n"));
        import_paired(&path, None)
    }

    fn binary(lines: &[&str]) -> Result<Collected<BinaryRow>> {
        let (_dir, path) = temp_file("data.jsonl", &lines.join("\n"));
        import_binary(&path, None)
    }

    fn error(result: Result<impl Sized>) -> String {
        result.err().expect("an error").to_string()
    }

    #[test]
    fn standard_and_conversational_pairs() {
        let out = paired(&[
            r#"{"prompt": "q", "chosen": "good", "rejected": "bad"}"#,
            r#"{"prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]}"#
                .replace('\n', " ")
                .as_str(),
            r#"{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}"#
                .replace('\n', " ")
                .as_str(),
        ])
        .unwrap();
        let rows = &out.rows;
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r.chosen == "good" && r.rejected == "bad"));
        assert_eq!(rows[0].prompt, [user("q")]);
        assert_eq!(rows[1].prompt, [Message::new("system", "be nice"), user("q")]);
        assert_eq!(rows[2].prompt, [user("q")]);
        assert_eq!(rows[0].prompt_id, rows[2].prompt_id);
        let tag = &rows[0].pair_id["trl-".len()..rows[0].pair_id.len() - 2];
        assert_eq!(tag.len(), 8, "{}", rows[0].pair_id);
        assert_eq!(rows.iter().map(|r| r.pair_id.as_str()).collect::<Vec<_>>(), [1, 2, 3].map(|l| format!("trl-{tag}-{l}")));
    }

    #[test]
    fn unusable_pairs_are_counted() {
        let out = paired(&[
            r#"{"prompt": "q", "chosen": "same", "rejected": "same"}"#,
            r#"{"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}"#,
            r#"{"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "a"}]}"#,
            r#"{"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "bad"}"#,
            r#"{"prompt": "q", "chosen": "ok", "rejected": "bad"}"#,
        ])
        .unwrap();
        assert_eq!(out.rows.len(), 1);
        assert_eq!(
            nonzero(&out.skipped),
            BTreeMap::from([(IDENTICAL_REPLIES, 2), (NO_SHARED_PROMPT, 1), (NOT_ONE_ASSISTANT_MESSAGE, 1)])
        );
    }

    #[test]
    fn standard_and_conversational_binary_rows() {
        let out = binary(&[
            r#"{"prompt": "q", "completion": "good", "label": true}"#,
            r#"{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "bad"}], "label": false, "weight": 0.5}"#,
            r#"{"prompt": "q", "completion": "  ", "label": true}"#,
            r#"{"prompt": " ", "completion": "c", "label": true}"#,
        ])
        .unwrap();
        let got: Vec<_> = out
            .rows
            .iter()
            .map(|r| (r.example_id.rsplit('-').next().unwrap(), r.completion.as_str(), r.label, r.weight))
            .collect();
        assert_eq!(got, [("1", "good", true, 1.0), ("2", "bad", false, 0.5)]);
        assert_eq!(out.rows[0].prompt_id, out.rows[1].prompt_id);
        assert_eq!(nonzero(&out.skipped), BTreeMap::from([(EMPTY_REPLY, 1), (EMPTY_PROMPT, 1)]));
    }

    #[test]
    fn nonpositive_weights_name_file_line_and_field() {
        for w in ["0", "-0.5"] {
            let err = error(binary(&[&format!(r#"{{"prompt": "q", "completion": "a", "label": true, "weight": {w}}}"#)]));
            assert!(err.contains(":1: field \"weight\"") && err.contains("not positive"), "{err}");
        }
    }

    #[test]
    fn bad_values_name_file_line_and_field() {
        let err = error(binary(&[
            r#"{"prompt": "q", "completion": "a", "label": true}"#,
            r#"{"prompt": "q", "completion": "a", "label": "yes"}"#,
        ]));
        assert!(
            err.ends_with("data.jsonl:2: field \"label\": expected a boolean (true or false), found string"),
            "{err}"
        );
        let err =
            error(binary(&[r#"{"prompt": "q", "completion": "a", "label": true, "weight": Infinity}"#]));
        assert!(err.contains("data.jsonl:1: malformed JSON") && err.contains("NaN and Infinity"), "{err}");
        let err = error(binary(&[r#"{"prompt": "q", "completion": "a", "label": true, "weight": "NaN"}"#]));
        assert!(
            err.ends_with("data.jsonl:1: field \"weight\": expected a finite number, found NaN"),
            "{err}"
        );
        let err = error(paired(&[r#"{"prompt": "q", "chosen": 1, "rejected": "b"}"#]));
        assert!(err.ends_with("data.jsonl:1: field \"chosen\": expected a string or a list of {role, content} messages, found number"), "{err}");
        let err = error(paired(&[r#"{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}"#]));
        assert!(err.ends_with("data.jsonl:1: field \"prompt[0].content\": missing"), "{err}");
        let err = error(paired(&[r#"{"chosen": "a", "rejected": "b"}"#]));
        assert!(
            err.contains("data.jsonl:1: field \"chosen\": a standard (string) pair needs a \"prompt\""),
            "{err}"
        );
    }

    #[test]
    fn kind_must_match_the_columns() {
        let err = error(paired(&[r#"{"prompt": "q", "completion": "a", "label": true}"#]));
        assert!(
            err.contains("data.jsonl:1: this is an unpaired TRL file") && err.contains("--kind binary"),
            "{err}"
        );
        let err = error(binary(&[r#"{"prompt": "q", "chosen": "a", "rejected": "b"}"#]));
        assert!(
            err.contains("data.jsonl:1: this is a preference TRL file") && err.contains("--kind paired"),
            "{err}"
        );
    }

    /// Writes a Parquet file compressed as pyarrow and Hugging Face do (Snappy) or with gzip.
    fn write_parquet(path: &Path, batch: &RecordBatch, compression: Compression) {
        let props =
            parquet::file::properties::WriterProperties::builder().set_compression(compression).build();
        let file = std::fs::File::create(path).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
        writer.write(batch).unwrap();
        writer.close().unwrap();
    }

    #[test]
    fn parquet_conversational_pairs_and_binary_rows() {
        let dir = tempfile::tempdir().unwrap();
        let prompts = [vec![user("q1")], vec![user("q2")]];
        let replies = |texts: [&str; 2]| {
            let lists: Vec<Vec<Message>> =
                texts.iter().map(|t| vec![Message::new("assistant", *t)]).collect();
            haloflow::records::messages_array(lists.iter().map(|m| m.as_slice()))
        };
        let schema = Arc::new(Schema::new(vec![
            ArrowField::new("prompt", haloflow::schema::messages_type(), false),
            ArrowField::new("chosen", haloflow::schema::messages_type(), false),
            ArrowField::new("rejected", haloflow::schema::messages_type(), false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                haloflow::records::messages_array(prompts.iter().map(|p| p.as_slice())),
                replies(["good1", "good2"]),
                replies(["bad1", "bad2"]),
            ],
        )
        .unwrap();
        let path = dir.path().join("pairs.parquet");
        write_parquet(&path, &batch, Compression::SNAPPY);
        let out = import_paired(&path, None).unwrap();
        let got: Vec<_> = out
            .rows
            .iter()
            .map(|r| (r.pair_id.rsplit('-').next().unwrap(), r.prompt[0].content.as_str(), r.chosen.as_str()))
            .collect();
        assert_eq!(got, [("1", "q1", "good1"), ("2", "q2", "good2")]);

        let schema = Arc::new(Schema::new(vec![
            ArrowField::new("prompt", DataType::Utf8, false),
            ArrowField::new("completion", DataType::Utf8, false),
            ArrowField::new("label", DataType::Boolean, false),
            ArrowField::new("weight", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["q", "q"])),
                Arc::new(StringArray::from(vec!["a", "b"])),
                Arc::new(BooleanArray::from(vec![true, false])),
                Arc::new(Float64Array::from(vec![None, Some(f64::NAN)])),
            ],
        )
        .unwrap();
        let path = dir.path().join("binary.parquet");
        write_parquet(&path, &batch, Compression::GZIP(Default::default()));
        let err = import_binary(&path, None).err().unwrap().to_string();
        assert!(
            err.ends_with("binary.parquet:2: field \"weight\": expected a finite number, found NaN"),
            "{err}"
        );
        let out = import_binary(&path, Some(1)).unwrap();
        assert_eq!((out.rows.len(), out.rows[0].weight, out.rows[0].label), (1, 1.0, true));
    }
}
