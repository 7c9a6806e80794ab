//! MT-Bench-style question files (`mt_bench_question.jsonl`, `vicuna_bench_question.jsonl`):
//! one `{"question_id", "category", "turns": [...], "reference": [...]?}` per line, imported as
//! `prompts` rows. Only the first turn becomes the prompt (later turns need the model's first
//! answer); `reference` is the first reference answer when present.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use arrow_array::{RecordBatch, StringArray};
use haloflow::records::{messages_array, Message};
use haloflow::schema;
use serde_json::Value;

use crate::output::Collected;
use crate::source::Field;

/// Skip reason: a question with an empty `turns` list.
pub const NO_TURNS: &str = "no_turns";
/// Skip reason: a question id seen before in the file.
pub const DUPLICATE_QUESTION_ID: &str = "duplicate_question_id";
/// Note: questions with more than one turn, of which only the first is imported.
pub const LATER_TURNS_DROPPED: &str = "questions_with_later_turns_dropped";

/// A row of the `prompts` schema.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    /// The question id.
    pub prompt_id: String,
    /// The first turn as a user message.
    pub prompt: Vec<Message>,
    /// The reference answer to the first turn, if any.
    pub reference: Option<String>,
    /// The question's category, if any.
    pub category: Option<String>,
}

/// Converts prompt rows to a record batch of the `prompts` schema.
pub fn prompts_batch(rows: &[PromptRow]) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(
        schema::by_name(schema::PROMPTS)?.arrow_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.prompt_id.as_str()))),
            messages_array(rows.iter().map(|r| r.prompt.as_slice())),
            Arc::new(rows.iter().map(|r| r.reference.as_deref()).collect::<StringArray>()),
            Arc::new(rows.iter().map(|r| r.category.as_deref()).collect::<StringArray>()),
        ],
    )?)
}

/// Imports the questions of `path` as prompts.
pub fn import(path: &Path, limit: Option<usize>) -> Result<Collected<PromptRow>> {
    let mut seen = HashSet::new();
    let fields = ["question_id", "category", "turns", "reference"];
    Collected::read(path, &fields, &[NO_TURNS, DUPLICATE_QUESTION_ID], limit, |record, out| {
        let root = record.root();
        let prompt_id = question_id(&root.get("question_id")?)?;
        let turns = root.get("turns")?.array()?;
        let Some(first) = turns.first() else {
            out.skip(NO_TURNS);
            return Ok(());
        };
        let prompt = vec![Message::new("user", first.str()?)];
        if turns.len() > 1 {
            out.note(LATER_TURNS_DROPPED);
        }
        let reference = match root.opt("reference")? {
            None => None,
            Some(field) if field.value.is_string() => Some(field.str()?.to_string()),
            Some(field) => field.array()?.first().map(|f| f.str().map(str::to_string)).transpose()?,
        };
        let category = root.opt("category")?.map(|f| f.str().map(str::to_string)).transpose()?;
        if !seen.insert(prompt_id.clone()) {
            out.skip(DUPLICATE_QUESTION_ID);
            return Ok(());
        }
        out.push(PromptRow { prompt_id, prompt, reference, category });
        Ok(())
    })
}

/// A question id, a number or a string, as a string.
fn question_id(field: &Field) -> Result<String> {
    match field.value {
        Value::Number(n) => Ok(n.to_string()),
        Value::String(s) => Ok(s.clone()),
        _ => Err(field.expected("a number or a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{shared_file, temp_file, MT_BENCH, VICUNA_BENCH};
    use std::collections::BTreeMap;

    #[test]
    fn questions_become_prompts() {
        let (_dir, path) = temp_file(
            "q.jsonl",
            &[
                r#"{"question_id": 7, "category": "math", "turns": ["1+1?", "and 2+2?"], "reference": ["2", "4"]}"#,
                r#"{"question_id": "x", "turns": ["hi"], "reference": "hello"}"#,
                r#"{"question_id": 7, "turns": ["again"]}"#,
                r#"{"question_id": 8, "turns": []}"#,
            ]
            .join("\n"),
        );
        let out = import(&path, None).unwrap();
        assert_eq!(
            out.rows,
            [
                PromptRow {
                    prompt_id: "7".into(),
                    prompt: vec![Message::new("user", "1+1?")],
                    reference: Some("2".into()),
                    category: Some("math".into()),
                },
                PromptRow {
                    prompt_id: "x".into(),
                    prompt: vec![Message::new("user", "hi")],
                    reference: Some("hello".into()),
                    category: None,
                },
            ]
        );
        assert_eq!(out.skipped, BTreeMap::from([(DUPLICATE_QUESTION_ID, 1), (NO_TURNS, 1)]));
        assert_eq!(out.notes, BTreeMap::from([(LATER_TURNS_DROPPED, 1)]));
        let batch = prompts_batch(&out.rows).unwrap();
        schema::by_name(schema::PROMPTS).unwrap().check_schema(&batch.schema()).unwrap();
    }

    #[test]
    fn bad_question_names_file_line_and_field() {
        let (_dir, path) = temp_file("q.jsonl", r#"{"question_id": 1, "turns": [3]}"#);
        let err = import(&path, None).err().unwrap().to_string();
        assert!(err.ends_with("q.jsonl:1: field \"turns[0]\": expected a string, found number"), "{err}");
        let (_dir, path) = temp_file("q.jsonl", r#"{"question_id": [1], "turns": ["q"]}"#);
        let err = import(&path, None).err().unwrap().to_string();
        assert!(
            err.ends_with("q.jsonl:1: field \"question_id\": expected a number or a string, found array"),
            "{err}"
        );
    }

    #[test]
    fn real_question_files() {
        for (path, with_reference) in [(MT_BENCH, 39), (VICUNA_BENCH, 0)] {
            let Some(path) = shared_file(path) else { continue };
            let path = path.as_path();
            let out = import(path, None).unwrap();
            assert_eq!((out.rows_read, out.rows.len()), (80, 80), "{}", path.display());
            assert_eq!(out.skipped, BTreeMap::from([(NO_TURNS, 0), (DUPLICATE_QUESTION_ID, 0)]));
            assert!(out.rows.iter().all(|r| r.category.is_some() && r.prompt.len() == 1));
            let references = out.rows.iter().filter(|r| r.reference.is_some()).count();
            assert_eq!(references, with_reference, "{}", path.display());
        }
    }
}
