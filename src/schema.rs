//! The Arrow schemas exchanged by stages: the plug-in contract.
//!
//! Every stage output declares one of the [`SchemaDef`]s below (by name in a pipeline, e.g.
//! `outputs = { filtered = "paired" }`). The runner validates each output file against its
//! declaration with [`validate_file`] before the stage's result enters the cache, so a user's own
//! stage is held to the same contract as the built-in ones. `datasets/README.md` documents the same
//! tables for people writing stages in other languages; `halo schema NAME` prints them.
//!
//! Matching rules: every required column must be present with the declared type and no nulls;
//! optional columns may be absent or null; extra columns are allowed and carried along. Types are
//! compared structurally: nullability flags and the names of list items do not matter (pyarrow and
//! arrow-rs disagree on both), physical types do (`string` is Utf8, not LargeUtf8).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};

/// How an output is stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Arrow IPC file format (`.arrow`).
    Arrow,
    /// Parquet (`.parquet`).
    Parquet,
    /// A JSON document (`.json`), e.g. a stage summary.
    Json,
    /// A directory of files (e.g. a model checkpoint); validated only for existence.
    Dir,
}

impl Format {
    /// File name extension used for outputs of this format ("" for directories).
    pub fn extension(self) -> &'static str {
        match self {
            Format::Arrow => ".arrow",
            Format::Parquet => ".parquet",
            Format::Json => ".json",
            Format::Dir => "",
        }
    }
}

/// One column of a schema.
#[derive(Debug, Clone)]
pub struct Column {
    /// Column name.
    pub name: &'static str,
    /// Arrow data type.
    pub data_type: DataType,
    /// Required columns must be present and non-null; optional ones may be absent or null.
    pub required: bool,
    /// One line for the documentation.
    pub doc: &'static str,
}

/// A named schema of the stage contract.
#[derive(Debug, Clone)]
pub struct SchemaDef {
    /// Name used in pipelines (`outputs = { x = "binary" }`).
    pub name: &'static str,
    /// Storage format.
    pub format: Format,
    /// What a row means.
    pub doc: &'static str,
    /// Columns (empty for JSON and directories).
    pub columns: Vec<Column>,
}

/// Name of the `paired` schema: preference pairs.
pub const PAIRED: &str = "paired";
/// Name of the `binary` schema: unpaired examples with a desirable/undesirable label.
pub const BINARY: &str = "binary";
/// Name of the `plan` schema: `binary` rows in training order with batch index and KL partners.
pub const PLAN: &str = "plan";
/// Name of the `prompts` schema: prompts for sampling and judging.
pub const PROMPTS: &str = "prompts";
/// Name of the `samples` schema: generated completions.
pub const SAMPLES: &str = "samples";
/// Name of the `judgments` schema: one judge verdict per row.
pub const JUDGMENTS: &str = "judgments";
/// Name of the `ref_logps` schema: reference-model log-probabilities (Parquet).
pub const REF_LOGPS: &str = "ref_logps";
/// Name of the `metrics` schema: per-step training metrics (Parquet).
pub const METRICS: &str = "metrics";
/// Name of the `json` pseudo-schema: any JSON document.
pub const JSON: &str = "json";
/// Name of the `dir` pseudo-schema: a directory (model checkpoints, reports).
pub const DIR: &str = "dir";

/// Key of the `ref_logps` Parquet metadata holding the JSON fingerprint of the reference model,
/// tokenizer, lengths and data it was computed from.
pub const REF_FINGERPRINT: &str = "haloflow.fingerprint";

/// Keys of the `plan` output's Arrow schema metadata written by `resample`.
pub mod plan_meta {
    /// λ_D, the weight of desirable examples (decimal string).
    pub const LAMBDA_D: &str = "haloflow.lambda_d";
    /// λ_U, the weight of undesirable examples (decimal string).
    pub const LAMBDA_U: &str = "haloflow.lambda_u";
    /// Microbatch size m of the plan (decimal string).
    pub const MICROBATCH_SIZE: &str = "haloflow.microbatch_size";
    /// Seed used for the subset and the order (decimal string).
    pub const SEED: &str = "haloflow.seed";
}

/// The type of a chat prompt: a list of `{role, content}` messages.
pub fn messages_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", message_struct(), true)))
}

/// The struct type of one chat message.
pub fn message_struct() -> DataType {
    DataType::Struct(message_fields())
}

/// The fields of one chat message: `role` and `content`.
pub fn message_fields() -> Fields {
    Fields::from(vec![
        Field::new("role", DataType::Utf8, false),
        Field::new("content", DataType::Utf8, false),
    ])
}

/// The type of per-token values: `list<float>`.
pub fn float_list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Float32, true)))
}

fn req(name: &'static str, data_type: DataType, doc: &'static str) -> Column {
    Column { name, data_type, required: true, doc }
}

fn opt(name: &'static str, data_type: DataType, doc: &'static str) -> Column {
    Column { name, data_type, required: false, doc }
}

fn binary_columns() -> Vec<Column> {
    vec![
        req("example_id", DataType::Utf8, "unique id of the example"),
        req("prompt_id", DataType::Utf8, "id of the prompt (shared by examples of one prompt)"),
        req("prompt", messages_type(), "chat messages before the completion"),
        req("completion", DataType::Utf8, "the assistant's reply being judged"),
        req("label", DataType::Boolean, "true = desirable, false = undesirable"),
        req("weight", DataType::Float64, "finite, positive per-example weight (1.0 by default)"),
        opt("source", DataType::Utf8, "where the example came from"),
    ]
}

/// Every schema of the contract, in documentation order.
pub fn all() -> Vec<SchemaDef> {
    let mut plan = binary_columns();
    plan.extend([
        req("batch", DataType::Int64, "microbatch index; rows of a batch are contiguous"),
        req("kl_example_id", DataType::Utf8, "example whose completion is this row's KL partner"),
        req("kl_completion", DataType::Utf8, "mismatched completion y' for the KTO reference point"),
    ]);
    vec![
        SchemaDef {
            name: PAIRED,
            format: Format::Arrow,
            doc: "one preference pair: a prompt with a chosen and a rejected reply",
            columns: vec![
                req("prompt_id", DataType::Utf8, "id of the prompt (hash of its messages)"),
                req("prompt", messages_type(), "chat messages before the replies"),
                req("chosen", DataType::Utf8, "the preferred assistant reply"),
                req("rejected", DataType::Utf8, "the dispreferred assistant reply"),
                opt("pair_id", DataType::Utf8, "unique id of the pair (derived from row if absent)"),
                opt("score_chosen", DataType::Float64, "score of the chosen reply, if rated"),
                opt("score_rejected", DataType::Float64, "score of the rejected reply, if rated"),
                opt("source", DataType::Utf8, "where the pair came from"),
            ],
        },
        SchemaDef {
            name: BINARY,
            format: Format::Arrow,
            doc: "one example with binary feedback (desirable or undesirable)",
            columns: binary_columns(),
        },
        SchemaDef {
            name: PLAN,
            format: Format::Arrow,
            doc: "binary rows in training order, stratified into microbatches with KL partners",
            columns: plan,
        },
        SchemaDef {
            name: PROMPTS,
            format: Format::Arrow,
            doc: "a prompt to sample from and judge",
            columns: vec![
                req("prompt_id", DataType::Utf8, "id of the prompt"),
                req("prompt", messages_type(), "chat messages to continue"),
                opt("reference", DataType::Utf8, "reference answer (rule judge, baselines)"),
                opt("category", DataType::Utf8, "category of the prompt"),
            ],
        },
        SchemaDef {
            name: SAMPLES,
            format: Format::Arrow,
            doc: "one generated completion",
            columns: vec![
                req("prompt_id", DataType::Utf8, "id of the prompt"),
                req("prompt", messages_type(), "chat messages that were continued"),
                req("sample_index", DataType::Int64, "index among the samples of this prompt"),
                req("completion", DataType::Utf8, "generated text"),
                req("model", DataType::Utf8, "model that generated it"),
                req("prompt_tokens", DataType::Int64, "tokens in the rendered prompt"),
                req("completion_tokens", DataType::Int64, "generated tokens"),
                req("finish_reason", DataType::Utf8, "eos, stop or length"),
            ],
        },
        SchemaDef {
            name: JUDGMENTS,
            format: Format::Arrow,
            doc: "one judge verdict between a candidate and a baseline output",
            columns: vec![
                req("prompt_id", DataType::Utf8, "id of the prompt"),
                req("first", DataType::Utf8, "which output was shown first: candidate or baseline"),
                req("raw", DataType::Utf8, "the judge's raw answer"),
                req("verdict", DataType::Utf8, "candidate, baseline, tie or invalid"),
                req("latency_ms", DataType::Float64, "judge latency"),
                opt("prompt_tokens", DataType::Int64, "judge prompt tokens"),
                opt("completion_tokens", DataType::Int64, "judge completion tokens"),
            ],
        },
        SchemaDef {
            name: REF_LOGPS,
            format: Format::Parquet,
            doc: "reference-model summed log-probs of completions, keyed by example id",
            columns: vec![
                req("example_id", DataType::Utf8, "example (binary) or pair (paired) id"),
                req("logp", DataType::Float64, "summed log-prob of the completion (chosen)"),
                req("n_tokens", DataType::Int64, "completion tokens"),
                opt("kl_logp", DataType::Float64, "summed log-prob of the KL partner completion"),
                opt("kl_n_tokens", DataType::Int64, "KL partner tokens"),
                opt("rejected_logp", DataType::Float64, "summed log-prob of the rejected reply"),
                opt("rejected_n_tokens", DataType::Int64, "rejected tokens"),
                opt("token_logps", float_list(), "per-token log-probs of the completion (chosen)"),
                opt("kl_token_logps", float_list(), "per-token log-probs of the KL partner"),
                opt("rejected_token_logps", float_list(), "per-token log-probs of the rejected reply"),
            ],
        },
        SchemaDef {
            name: METRICS,
            format: Format::Parquet,
            doc: "one optimizer step of training (step 0: evaluation before training); further nullable double columns hold rewards/..., logps/..., kl, eval/...",
            columns: vec![
                req("step", DataType::Int64, "optimizer step, 1-based (0 = before training)"),
                req("epoch", DataType::Int64, "epoch of the step"),
                opt("loss", DataType::Float64, "training loss of the step (null at step 0)"),
                opt("lr", DataType::Float64, "learning rate of the step"),
                opt("grad_norm", DataType::Float64, "global gradient norm before clipping"),
                opt("tokens_per_s", DataType::Float64, "throughput of the step"),
                opt("eval/loss", DataType::Float64, "held-out loss, when evaluated"),
            ],
        },
        SchemaDef { name: JSON, format: Format::Json, doc: "a JSON document", columns: vec![] },
        SchemaDef { name: DIR, format: Format::Dir, doc: "a directory of files", columns: vec![] },
    ]
}

/// Looks a schema up by name, with the list of known names in the error.
pub fn by_name(name: &str) -> Result<SchemaDef> {
    let all = all();
    let names: Vec<&str> = all.iter().map(|s| s.name).collect();
    all.into_iter()
        .find(|s| s.name == name)
        .with_context(|| format!("unknown schema `{name}` (known: {})", names.join(", ")))
}

impl SchemaDef {
    /// The Arrow schema a writer of this table uses: all columns, optional ones nullable.
    pub fn arrow_schema(&self) -> SchemaRef {
        let fields: Vec<Field> = self
            .columns
            .iter()
            .map(|c| Field::new(c.name, c.data_type.clone(), !c.required))
            .collect();
        Arc::new(Schema::new(fields))
    }

    /// Checks a found Arrow schema against this definition: names the column, the expected
    /// and the found type on mismatch.
    pub fn check_schema(&self, found: &Schema) -> Result<()> {
        for col in &self.columns {
            match found.field_with_name(col.name) {
                Ok(field) => {
                    if !types_match(&col.data_type, field.data_type()) {
                        bail!(
                            "column `{}`: expected type {}, found {}",
                            col.name,
                            type_name(&col.data_type),
                            type_name(field.data_type())
                        );
                    }
                }
                Err(_) if col.required => bail!(
                    "missing required column `{}` (expected type {}); found columns: {}",
                    col.name,
                    type_name(&col.data_type),
                    found.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
                ),
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// Checks the data of one batch: required columns hold no nulls, `weight` is finite and
    /// positive.
    /// `row_offset` is the index of the batch's first row in the file, for messages.
    pub fn check_batch(&self, batch: &RecordBatch, row_offset: usize) -> Result<()> {
        for col in self.columns.iter().filter(|c| c.required) {
            let Some(array) = batch.column_by_name(col.name) else { continue };
            if array.null_count() > 0 {
                let row = (0..array.len()).find(|&i| array.is_null(i)).unwrap_or(0);
                bail!("row {}: required column `{}` is null", row_offset + row, col.name);
            }
        }
        if let Some(weights) = batch.column_by_name("weight") {
            if let Some(w) = weights.as_any().downcast_ref::<arrow_array::Float64Array>() {
                if let Some(i) = (0..w.len()).find(|&i| w.is_valid(i) && !(w.value(i).is_finite() && w.value(i) > 0.0)) {
                    bail!("row {}: field `weight` is {} (must be finite and positive)", row_offset + i, w.value(i));
                }
            }
        }
        Ok(())
    }
}

/// Validates an output file or directory against a schema; returns its row count (None for
/// JSON and directories). Errors name the file.
pub fn validate_file(def: &SchemaDef, path: &Path) -> Result<Option<u64>> {
    let ctx = || format!("{} (schema `{}`)", path.display(), def.name);
    match def.format {
        Format::Dir => {
            if !path.is_dir() {
                bail!("{}: expected a directory", ctx());
            }
            Ok(None)
        }
        Format::Json => {
            let text = std::fs::read_to_string(path).with_context(ctx)?;
            serde_json::from_str::<serde_json::Value>(&text)
                .with_context(|| format!("{}: not valid JSON", ctx()))?;
            Ok(None)
        }
        Format::Arrow => {
            let table = crate::io::read_arrow(path)?;
            def.check_schema(&table.schema).with_context(ctx)?;
            let mut offset = 0;
            for batch in &table.batches {
                def.check_batch(batch, offset).with_context(ctx)?;
                offset += batch.num_rows();
            }
            Ok(Some(offset as u64))
        }
        Format::Parquet => {
            let table = crate::io::read_parquet(path)?;
            def.check_schema(&table.schema).with_context(ctx)?;
            let mut offset = 0;
            for batch in &table.batches {
                def.check_batch(batch, offset).with_context(ctx)?;
                offset += batch.num_rows();
            }
            Ok(Some(offset as u64))
        }
    }
}

/// Structural type equality ignoring nullability and list item names.
fn types_match(expected: &DataType, found: &DataType) -> bool {
    match (expected, found) {
        (DataType::List(a), DataType::List(b)) => types_match(a.data_type(), b.data_type()),
        (DataType::Struct(a), DataType::Struct(b)) => {
            a.len() == b.len()
                && a.iter().all(|fa| {
                    b.iter().any(|fb| fa.name() == fb.name() && types_match(fa.data_type(), fb.data_type()))
                })
        }
        _ => expected == found,
    }
}

/// A short human name of an Arrow type, e.g. `list<struct<role: string, content: string>>`.
pub fn type_name(t: &DataType) -> String {
    match t {
        DataType::Utf8 => "string".into(),
        DataType::LargeUtf8 => "large_string".into(),
        DataType::Boolean => "bool".into(),
        DataType::Int64 => "int64".into(),
        DataType::Int32 => "int32".into(),
        DataType::Float64 => "double".into(),
        DataType::Float32 => "float".into(),
        DataType::List(f) => format!("list<{}>", type_name(f.data_type())),
        DataType::LargeList(f) => format!("large_list<{}>", type_name(f.data_type())),
        DataType::Struct(fields) => format!(
            "struct<{}>",
            fields
                .iter()
                .map(|f| format!("{}: {}", f.name(), type_name(f.data_type())))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => format!("{other}").to_lowercase(),
    }
}

/// Markdown documentation of every schema (printed by `halo schema`, kept in `datasets/README.md`).
pub fn markdown() -> String {
    let mut out = String::new();
    for def in all() {
        out.push_str(&format!("### `{}` ({:?})\n\n{}\n\n", def.name, def.format, def.doc));
        if def.columns.is_empty() {
            continue;
        }
        out.push_str("| column | type | required | meaning |\n|---|---|---|---|\n");
        for c in &def.columns {
            out.push_str(&format!(
                "| `{}` | `{}` | {} | {} |\n",
                c.name,
                type_name(&c.data_type),
                if c.required { "yes" } else { "no" },
                c.doc
            ));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_names_column_expected_and_found() {
        let def = by_name(BINARY).unwrap();
        let mut fields: Vec<Field> = def.arrow_schema().fields().iter().map(|f| f.as_ref().clone()).collect();
        let idx = fields.iter().position(|f| f.name() == "label").unwrap();
        fields[idx] = Field::new("label", DataType::Utf8, false);
        let err = def.check_schema(&Schema::new(fields)).unwrap_err().to_string();
        assert!(err.contains("`label`") && err.contains("bool") && err.contains("string"), "{err}");
    }

    #[test]
    fn missing_required_column_is_refused_but_optional_may_be_absent() {
        let def = by_name(PAIRED).unwrap();
        let without = |name: &str| {
            Schema::new(
                def.arrow_schema().fields().iter().filter(|f| f.name() != name).map(|f| f.as_ref().clone()).collect::<Vec<_>>(),
            )
        };
        assert!(def.check_schema(&without("source")).is_ok());
        let err = def.check_schema(&without("chosen")).unwrap_err().to_string();
        assert!(err.contains("missing required column `chosen`"), "{err}");
    }

    #[test]
    fn nullability_and_item_names_do_not_matter() {
        let pyarrow_style = DataType::List(Arc::new(Field::new(
            "element",
            DataType::Struct(Fields::from(vec![
                Field::new("role", DataType::Utf8, true),
                Field::new("content", DataType::Utf8, true),
            ])),
            true,
        )));
        assert!(types_match(&messages_type(), &pyarrow_style));
        assert!(!types_match(&DataType::Utf8, &DataType::LargeUtf8));
    }

    #[test]
    fn unknown_schema_lists_known_ones() {
        let err = by_name("pairs").unwrap_err().to_string();
        assert!(err.contains("paired") && err.contains("binary"), "{err}");
    }
}
