//! The `judgments` output: one row per judge request, in pair order then order of showing.
//!
//! Besides the schema's columns it carries `sample_index` (the candidate sample), `pair_verdict`
//! (the verdict of the whole pair, repeated on each of its rows) and `error` (why a request got
//! no answer; null otherwise). A failed request has an empty `raw` and verdict `invalid`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use haloflow::schema;

use crate::backends::JudgeAnswer;
use crate::inputs::Pair;
use crate::judge::Judgment;
use crate::verdict::Verdict;

fn answer(j: &Judgment) -> Option<&JudgeAnswer> {
    j.outcome.as_ref().ok()
}

fn strings<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

/// The judgments as a record batch.
pub fn batch(pairs: &[Pair], judgments: &[Judgment], pair_verdicts: &[Verdict]) -> Result<RecordBatch> {
    let def = schema::by_name(schema::JUDGMENTS)?;
    let mut fields: Vec<Field> = def.arrow_schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.extend([
        Field::new("sample_index", DataType::Int64, false),
        Field::new("pair_verdict", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, true),
    ]);
    let columns: Vec<ArrayRef> = vec![
        strings(judgments.iter().map(|j| pairs[j.pair].prompt_id.as_str())),
        strings(judgments.iter().map(|j| j.first.as_str())),
        strings(judgments.iter().map(|j| answer(j).map_or("", |a| a.raw.as_str()))),
        strings(judgments.iter().map(|j| j.verdict().as_str())),
        Arc::new(Float64Array::from_iter_values(judgments.iter().map(Judgment::latency_ms))),
        Arc::new(judgments.iter().map(|j| answer(j).and_then(|a| a.prompt_tokens)).collect::<Int64Array>()),
        Arc::new(judgments.iter().map(|j| answer(j).and_then(|a| a.completion_tokens)).collect::<Int64Array>()),
        Arc::new(Int64Array::from_iter_values(judgments.iter().map(|j| pairs[j.pair].sample_index))),
        strings(judgments.iter().map(|j| pair_verdicts[j.pair].as_str())),
        Arc::new(judgments.iter().map(|j| j.outcome.as_ref().err().map(|f| f.reason.as_str())).collect::<StringArray>()),
    ];
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?)
}

/// Writes the judgments table (Arrow IPC, atomically).
pub fn write(path: &Path, pairs: &[Pair], judgments: &[Judgment], pair_verdicts: &[Verdict]) -> Result<()> {
    let batch = batch(pairs, judgments, pair_verdicts)?;
    haloflow::io::write_arrow(path, &batch.schema(), &[batch], Default::default())
}
