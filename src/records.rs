//! Typed rows of the `paired`, `binary` and `plan` schemas, and their conversion to and from
//! Arrow record batches. Readers validate against [`crate::schema`] and name the file, row and
//! field of any bad value.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, ListArray, RecordBatch, StringArray,
    StructArray,
};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field};
use serde::{Deserialize, Serialize};

use crate::schema::{self, SchemaDef};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Text of the message.
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message { role: role.to_string(), content: content.into() }
    }
}

/// The id of a prompt: the first 16 hex digits of the blake3 hash of its messages.
pub fn prompt_id(prompt: &[Message]) -> String {
    let mut hasher = blake3::Hasher::new();
    for m in prompt {
        for part in [m.role.as_str(), m.content.as_str()] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
    }
    hasher.finalize().to_hex()[..16].to_string()
}

/// A row of the `paired` schema.
#[derive(Debug, Clone, PartialEq)]
pub struct PairedRow {
    /// Id of the prompt.
    pub prompt_id: String,
    /// Unique id of the pair.
    pub pair_id: String,
    /// Chat messages before the replies.
    pub prompt: Vec<Message>,
    /// Preferred reply.
    pub chosen: String,
    /// Dispreferred reply.
    pub rejected: String,
    /// Score of the chosen reply, if any.
    pub score_chosen: Option<f64>,
    /// Score of the rejected reply, if any.
    pub score_rejected: Option<f64>,
    /// Origin of the pair.
    pub source: Option<String>,
}

/// A row of the `binary` schema.
#[derive(Debug, Clone, PartialEq)]
pub struct BinaryRow {
    /// Unique id of the example.
    pub example_id: String,
    /// Id of the prompt.
    pub prompt_id: String,
    /// Chat messages before the completion.
    pub prompt: Vec<Message>,
    /// The reply.
    pub completion: String,
    /// Desirable (true) or undesirable (false).
    pub label: bool,
    /// Finite weight.
    pub weight: f64,
    /// Origin of the example.
    pub source: Option<String>,
}

/// A row of the `plan` schema: a binary row placed in a microbatch with its KL partner.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRow {
    /// The example.
    pub example: BinaryRow,
    /// Microbatch index.
    pub batch: i64,
    /// Example whose completion is the KL partner.
    pub kl_example_id: String,
    /// The KL partner completion.
    pub kl_completion: String,
}

fn strings<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

fn opt_strings<'a>(values: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(values.collect::<StringArray>())
}

/// Builds the `list<struct<role, content>>` column from prompts.
pub fn messages_array<'a>(prompts: impl Iterator<Item = &'a [Message]>) -> ArrayRef {
    let mut offsets = vec![0i32];
    let (mut roles, mut contents) = (Vec::new(), Vec::new());
    for prompt in prompts {
        for m in prompt {
            roles.push(m.role.as_str());
            contents.push(m.content.as_str());
        }
        offsets.push(roles.len() as i32);
    }
    let values = StructArray::new(
        schema::message_fields(),
        vec![strings(roles.into_iter()), strings(contents.into_iter())],
        None,
    );
    let field = Arc::new(Field::new("item", schema::message_struct(), true));
    Arc::new(ListArray::new(field, OffsetBuffer::new(offsets.into()), Arc::new(values), None))
}

fn batch_for(def: &SchemaDef, columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(def.arrow_schema(), columns)?)
}

/// Converts paired rows to a record batch of the `paired` schema.
pub fn paired_batch(rows: &[PairedRow]) -> Result<RecordBatch> {
    batch_for(
        &schema::by_name(schema::PAIRED)?,
        vec![
            strings(rows.iter().map(|r| r.prompt_id.as_str())),
            messages_array(rows.iter().map(|r| r.prompt.as_slice())),
            strings(rows.iter().map(|r| r.chosen.as_str())),
            strings(rows.iter().map(|r| r.rejected.as_str())),
            strings(rows.iter().map(|r| r.pair_id.as_str())),
            Arc::new(rows.iter().map(|r| r.score_chosen).collect::<Float64Array>()),
            Arc::new(rows.iter().map(|r| r.score_rejected).collect::<Float64Array>()),
            opt_strings(rows.iter().map(|r| r.source.as_deref())),
        ],
    )
}

fn binary_columns<'a>(rows: impl Iterator<Item = &'a BinaryRow> + Clone) -> Vec<ArrayRef> {
    vec![
        strings(rows.clone().map(|r| r.example_id.as_str())),
        strings(rows.clone().map(|r| r.prompt_id.as_str())),
        messages_array(rows.clone().map(|r| r.prompt.as_slice())),
        strings(rows.clone().map(|r| r.completion.as_str())),
        Arc::new(rows.clone().map(|r| Some(r.label)).collect::<BooleanArray>()),
        Arc::new(rows.clone().map(|r| r.weight).collect::<Float64Array>()),
        opt_strings(rows.map(|r| r.source.as_deref())),
    ]
}

/// Converts binary rows to a record batch of the `binary` schema.
pub fn binary_batch(rows: &[BinaryRow]) -> Result<RecordBatch> {
    batch_for(&schema::by_name(schema::BINARY)?, binary_columns(rows.iter()))
}

/// Converts plan rows to a record batch of the `plan` schema.
pub fn plan_batch(rows: &[PlanRow]) -> Result<RecordBatch> {
    let mut columns = binary_columns(rows.iter().map(|r| &r.example));
    columns.push(Arc::new(rows.iter().map(|r| r.batch).collect::<Int64Array>()));
    columns.push(strings(rows.iter().map(|r| r.kl_example_id.as_str())));
    columns.push(strings(rows.iter().map(|r| r.kl_completion.as_str())));
    batch_for(&schema::by_name(schema::PLAN)?, columns)
}

/// Typed access to the columns of one batch, with errors that name the column.
pub struct Columns<'a> {
    batch: &'a RecordBatch,
}

impl<'a> Columns<'a> {
    /// Wraps a batch.
    pub fn new(batch: &'a RecordBatch) -> Self {
        Columns { batch }
    }

    fn column<T: 'static>(&self, name: &str) -> Result<Option<&'a T>> {
        match self.batch.column_by_name(name) {
            None => Ok(None),
            Some(array) => array
                .as_any()
                .downcast_ref::<T>()
                .map(Some)
                .ok_or_else(|| anyhow!("column `{name}` has type {}", schema::type_name(array.data_type()))),
        }
    }

    fn required<T: 'static>(&self, name: &str) -> Result<&'a T> {
        self.column::<T>(name)?.ok_or_else(|| anyhow!("missing column `{name}`"))
    }

    /// A required string column.
    pub fn str(&self, name: &str) -> Result<&'a StringArray> {
        self.required(name)
    }

    /// An optional string column.
    pub fn opt_str(&self, name: &str) -> Result<Option<&'a StringArray>> {
        self.column(name)
    }

    /// A required f64 column.
    pub fn f64(&self, name: &str) -> Result<&'a Float64Array> {
        self.required(name)
    }

    /// An optional f64 column.
    pub fn opt_f64(&self, name: &str) -> Result<Option<&'a Float64Array>> {
        self.column(name)
    }

    /// A required i64 column.
    pub fn i64(&self, name: &str) -> Result<&'a Int64Array> {
        self.required(name)
    }

    /// A required bool column.
    pub fn bool(&self, name: &str) -> Result<&'a BooleanArray> {
        self.required(name)
    }

    /// A required messages column, decoded row by row through [`Self::messages_at`].
    pub fn messages(&self, name: &str) -> Result<&'a ListArray> {
        let list: &ListArray = self.required(name)?;
        if !matches!(list.value_type(), DataType::Struct(_)) {
            bail!("column `{name}` is not a list of messages");
        }
        Ok(list)
    }
}

/// The roles a message may have (`tool` for tool results, as chat templates know them).
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Whether a prompt holds no text (no message, or only blank ones).
pub fn is_empty_prompt(prompt: &[Message]) -> bool {
    prompt.iter().all(|m| m.content.trim().is_empty())
}

/// Refuses a prompt that holds no text or a message whose role no chat template knows.
fn check_prompt(prompt: &[Message]) -> Result<()> {
    if is_empty_prompt(prompt) {
        bail!("field `prompt`: empty (no message with text)");
    }
    if let Some((i, m)) = prompt.iter().enumerate().find(|(_, m)| !ROLES.contains(&m.role.as_str())) {
        bail!("field `prompt`: message {i}: unknown role `{}` (roles: {})", m.role, ROLES.join(", "));
    }
    Ok(())
}

/// Decodes row `i` of a messages column.
pub fn messages_at(list: &ListArray, i: usize) -> Result<Vec<Message>> {
    let value = list.value(i);
    let structs = value.as_any().downcast_ref::<StructArray>().context("messages are not structs")?;
    let get = |field: &str| -> Result<&StringArray> {
        structs
            .column_by_name(field)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| anyhow!("message field `{field}` missing or not a string"))
    };
    let (roles, contents) = (get("role")?, get("content")?);
    Ok((0..structs.len())
        .map(|j| Message::new(roles.value(j), contents.value(j)))
        .collect())
}

fn opt_string(array: Option<&StringArray>, i: usize) -> Option<String> {
    array.filter(|a| a.is_valid(i)).map(|a| a.value(i).to_string())
}

fn opt_f64(array: Option<&Float64Array>, i: usize) -> Option<f64> {
    array.filter(|a| a.is_valid(i)).map(|a| a.value(i))
}

/// Reads a table file and checks it against `schema_name`; calls `row` for every row with
/// the batch columns and the row index within the batch. Errors name the file and row.
fn read_rows<T>(
    path: &Path,
    schema_name: &str,
    mut row: impl FnMut(&Columns, usize, usize) -> Result<T>,
) -> Result<Vec<T>> {
    let def = schema::by_name(schema_name)?;
    let table = crate::io::read_table(path)?;
    def.check_schema(&table.schema)
        .with_context(|| format!("{}: not a `{schema_name}` table", path.display()))?;
    let mut out = Vec::with_capacity(table.num_rows());
    let mut offset = 0;
    for batch in &table.batches {
        def.check_batch(batch, offset).with_context(|| path.display().to_string())?;
        let cols = Columns::new(batch);
        for i in 0..batch.num_rows() {
            out.push(
                row(&cols, i, offset + i)
                    .with_context(|| format!("{}: row {}", path.display(), offset + i))?,
            );
        }
        offset += batch.num_rows();
    }
    Ok(out)
}

/// Refuses a table in which two rows share an id: every stage that keys rows by id (labels,
/// reference log-probs, KL partners) would silently mix them up. Names the file, the id and
/// both rows.
pub fn check_unique_ids<'a>(path: &Path, field: &str, ids: impl Iterator<Item = &'a str>) -> Result<()> {
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (row, id) in ids.enumerate() {
        if let Some(first) = seen.insert(id, row) {
            bail!(
                "{}: rows {first} and {row}: field `{field}`: duplicate id \"{id}\" (ids must be unique; \
                 two imports of the same format concatenated? give each source its own ids)",
                path.display()
            );
        }
    }
    Ok(())
}

/// Reads a `paired` table (Arrow IPC or Parquet); pair ids must be unique.
pub fn read_paired(path: &Path) -> Result<Vec<PairedRow>> {
    let rows = read_rows(path, schema::PAIRED, |c, i, row| {
        let prompt_id = c.str("prompt_id")?.value(i).to_string();
        Ok(PairedRow {
            pair_id: opt_string(c.opt_str("pair_id")?, i)
                .unwrap_or_else(|| format!("{prompt_id}#{row}")),
            prompt_id,
            prompt: prompt_at(c, i)?,
            chosen: c.str("chosen")?.value(i).to_string(),
            rejected: c.str("rejected")?.value(i).to_string(),
            score_chosen: opt_f64(c.opt_f64("score_chosen")?, i),
            score_rejected: opt_f64(c.opt_f64("score_rejected")?, i),
            source: opt_string(c.opt_str("source")?, i),
        })
    })?;
    check_unique_ids(path, "pair_id", rows.iter().map(|r| r.pair_id.as_str()))?;
    Ok(rows)
}

/// Row `i`'s prompt, checked.
fn prompt_at(c: &Columns, i: usize) -> Result<Vec<Message>> {
    let prompt = messages_at(c.messages("prompt")?, i)?;
    check_prompt(&prompt)?;
    Ok(prompt)
}

fn binary_row(c: &Columns, i: usize) -> Result<BinaryRow> {
    Ok(BinaryRow {
        example_id: c.str("example_id")?.value(i).to_string(),
        prompt_id: c.str("prompt_id")?.value(i).to_string(),
        prompt: prompt_at(c, i)?,
        completion: c.str("completion")?.value(i).to_string(),
        label: c.bool("label")?.value(i),
        weight: c.f64("weight")?.value(i),
        source: opt_string(c.opt_str("source")?, i),
    })
}

/// Reads a `binary` table (Arrow IPC or Parquet); example ids must be unique.
pub fn read_binary(path: &Path) -> Result<Vec<BinaryRow>> {
    let rows = read_rows(path, schema::BINARY, |c, i, _| binary_row(c, i))?;
    check_unique_ids(path, "example_id", rows.iter().map(|r| r.example_id.as_str()))?;
    Ok(rows)
}

/// Reads a `plan` table (Arrow IPC or Parquet); example ids must be unique.
pub fn read_plan(path: &Path) -> Result<Vec<PlanRow>> {
    let rows = read_rows(path, schema::PLAN, |c, i, _| {
        Ok(PlanRow {
            example: binary_row(c, i)?,
            batch: c.i64("batch")?.value(i),
            kl_example_id: c.str("kl_example_id")?.value(i).to_string(),
            kl_completion: c.str("kl_completion")?.value(i).to_string(),
        })
    })?;
    check_unique_ids(path, "example_id", rows.iter().map(|r| r.example.example_id.as_str()))?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn pair(i: usize) -> PairedRow {
        let prompt = vec![Message::new("user", format!("question {i}"))];
        PairedRow {
            prompt_id: prompt_id(&prompt),
            pair_id: format!("p{i}"),
            prompt,
            chosen: "good".into(),
            rejected: "bad".into(),
            score_chosen: Some(1.0),
            score_rejected: None,
            source: Some("test".into()),
        }
    }

    #[test]
    fn paired_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.arrow");
        let rows: Vec<_> = (0..3).map(pair).collect();
        let batch = paired_batch(&rows).unwrap();
        crate::io::write_arrow(&path, &batch.schema(), &[batch], HashMap::new()).unwrap();
        assert_eq!(read_paired(&path).unwrap(), rows);
    }

    #[test]
    fn nan_weight_is_refused_with_file_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.arrow");
        let mut rows: Vec<BinaryRow> = (0..3)
            .map(|i| BinaryRow {
                example_id: format!("e{i}"),
                prompt_id: "p".into(),
                prompt: vec![Message::new("user", "hi")],
                completion: "c".into(),
                label: i % 2 == 0,
                weight: 1.0,
                source: None,
            })
            .collect();
        rows[2].weight = f64::NAN;
        let batch = binary_batch(&rows).unwrap();
        crate::io::write_arrow(&path, &batch.schema(), &[batch], HashMap::new()).unwrap();
        let err = format!("{:#}", read_binary(&path).unwrap_err());
        assert!(err.contains("b.arrow") && err.contains("row 2") && err.contains("weight"), "{err}");
    }

    #[test]
    fn duplicate_ids_are_refused_naming_file_rows_and_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.arrow");
        let mut rows: Vec<_> = (0..4).map(pair).collect();
        rows[3].pair_id = "p1".into();
        let batch = paired_batch(&rows).unwrap();
        crate::io::write_arrow(&path, &batch.schema(), &[batch], HashMap::new()).unwrap();
        let err = format!("{:#}", read_paired(&path).unwrap_err());
        assert!(err.contains("p.arrow") && err.contains("rows 1 and 3") && err.contains("\"p1\"") && err.contains("pair_id"), "{err}");

        let binary: Vec<BinaryRow> = ["e0", "e1", "e0"]
            .iter()
            .map(|id| BinaryRow {
                example_id: id.to_string(),
                prompt_id: "p".into(),
                prompt: vec![Message::new("user", "hi")],
                completion: "c".into(),
                label: true,
                weight: 1.0,
                source: None,
            })
            .collect();
        let path = dir.path().join("b.arrow");
        let batch = binary_batch(&binary).unwrap();
        crate::io::write_arrow(&path, &batch.schema(), &[batch], HashMap::new()).unwrap();
        let err = format!("{:#}", read_binary(&path).unwrap_err());
        assert!(err.contains("b.arrow") && err.contains("rows 0 and 2") && err.contains("\"e0\"") && err.contains("example_id"), "{err}");
    }

    #[test]
    fn empty_prompts_unknown_roles_and_nonpositive_weights_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, rows: &[PairedRow]| {
            let path = dir.path().join(name);
            let batch = paired_batch(rows).unwrap();
            crate::io::write_arrow(&path, &batch.schema(), &[batch], HashMap::new()).unwrap();
            path
        };
        let mut rows: Vec<_> = (0..3).map(pair).collect();
        rows[1].prompt = vec![Message::new("user", "  ")];
        let err = format!("{:#}", read_paired(&write("empty.arrow", &rows)).unwrap_err());
        assert!(err.contains("empty.arrow") && err.contains("row 1") && err.contains("`prompt`: empty"), "{err}");
        let mut rows: Vec<_> = (0..3).map(pair).collect();
        rows[2].prompt = vec![Message::new("system", "s"), Message::new("human", "hi")];
        let err = format!("{:#}", read_paired(&write("role.arrow", &rows)).unwrap_err());
        assert!(err.contains("row 2") && err.contains("message 1: unknown role `human`"), "{err}");

        for weight in [0.0, -1.0] {
            let rows = vec![BinaryRow {
                example_id: "e".into(),
                prompt_id: "p".into(),
                prompt: vec![Message::new("user", "hi")],
                completion: "c".into(),
                label: true,
                weight,
                source: None,
            }];
            let path = dir.path().join("w.arrow");
            let batch = binary_batch(&rows).unwrap();
            crate::io::write_arrow(&path, &batch.schema(), &[batch], HashMap::new()).unwrap();
            let err = format!("{:#}", read_binary(&path).unwrap_err());
            assert!(err.contains("row 0") && err.contains("`weight`") && err.contains("positive"), "{err}");
        }
    }

    #[test]
    fn prompt_id_depends_on_roles_and_boundaries() {
        let a = vec![Message::new("user", "ab"), Message::new("assistant", "c")];
        let b = vec![Message::new("user", "a"), Message::new("assistant", "bc")];
        assert_ne!(prompt_id(&a), prompt_id(&b));
        assert_eq!(prompt_id(&a), prompt_id(&a.clone()));
    }
}
