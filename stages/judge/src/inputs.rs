//! The stage's inputs: candidate `samples`, a baseline (`samples`, or a `paired` table whose
//! `chosen` replies are the baseline) and optional `prompts`, matched into [`Pair`]s.
//!
//! Matching is by `prompt_id`. Candidate sample k of a prompt is compared with the baseline's
//! reply k to that prompt when the baseline has one (its sample_index k, or its k-th pair of the
//! prompt), else with the baseline's first reply. Candidate samples whose prompt the baseline
//! lacks are counted and left out.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use haloflow::records::{self, messages_at, Columns, Message};
use haloflow::schema;

/// One comparison: a candidate sample and the baseline's reply to the same prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// Id of the prompt.
    pub prompt_id: String,
    /// The candidate sample's index among the samples of its prompt.
    pub sample_index: i64,
    /// The prompt's messages.
    pub prompt: Vec<Message>,
    /// The candidate's output.
    pub candidate: String,
    /// The baseline's output.
    pub baseline: String,
    /// The candidate output's tokens, if known.
    pub candidate_tokens: Option<i64>,
    /// The baseline output's tokens, if known.
    pub baseline_tokens: Option<i64>,
    /// The prompt's reference answer (from `prompts`).
    pub reference: Option<String>,
    /// The prompt's category (from `prompts`).
    pub category: Option<String>,
}

/// The matched inputs.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Pairs in candidate order.
    pub pairs: Vec<Pair>,
    /// The candidate's model name (its samples' `model`).
    pub candidate_name: String,
    /// The baseline's model name, or `chosen` for a `paired` baseline.
    pub baseline_name: String,
    /// Candidate samples without a baseline reply.
    pub unmatched: usize,
}

/// A reply read from a `samples` or `paired` table.
struct Reply {
    prompt_id: String,
    sample_index: i64,
    prompt: Vec<Message>,
    text: String,
    tokens: Option<i64>,
    model: String,
}

/// Reads a table and checks it against `schema_name`; calls `row` for every row.
fn read_rows<T>(path: &Path, schema_name: &str, mut row: impl FnMut(&Columns, usize) -> Result<T>) -> Result<Vec<T>> {
    let def = schema::by_name(schema_name)?;
    let table = haloflow::io::read_table(path)?;
    def.check_schema(&table.schema)
        .with_context(|| format!("{}: not a `{schema_name}` table", path.display()))?;
    let mut out = Vec::with_capacity(table.num_rows());
    let mut offset = 0;
    for batch in &table.batches {
        def.check_batch(batch, offset).with_context(|| path.display().to_string())?;
        let cols = Columns::new(batch);
        for i in 0..batch.num_rows() {
            out.push(row(&cols, i).with_context(|| format!("{}: row {}", path.display(), offset + i))?);
        }
        offset += batch.num_rows();
    }
    Ok(out)
}

/// One row of a `samples` table, every column.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRow {
    /// Id of the prompt.
    pub prompt_id: String,
    /// The prompt's messages.
    pub prompt: Vec<Message>,
    /// Index among the samples of the prompt.
    pub sample_index: i64,
    /// The generated text.
    pub completion: String,
    /// The model that generated it.
    pub model: String,
    /// Tokens of the rendered prompt.
    pub prompt_tokens: i64,
    /// Generated tokens.
    pub completion_tokens: i64,
    /// eos, stop or length.
    pub finish_reason: String,
}

/// Reads a `samples` table (Arrow IPC or Parquet).
pub fn read_sample_rows(path: &Path) -> Result<Vec<SampleRow>> {
    read_rows(path, schema::SAMPLES, |c, i| {
        Ok(SampleRow {
            prompt_id: c.str("prompt_id")?.value(i).to_string(),
            prompt: messages_at(c.messages("prompt")?, i)?,
            sample_index: c.i64("sample_index")?.value(i),
            completion: c.str("completion")?.value(i).to_string(),
            model: c.str("model")?.value(i).to_string(),
            prompt_tokens: c.i64("prompt_tokens")?.value(i),
            completion_tokens: c.i64("completion_tokens")?.value(i),
            finish_reason: c.str("finish_reason")?.value(i).to_string(),
        })
    })
}

/// Writes a `samples` table (Arrow IPC, atomically).
pub fn write_sample_rows(path: &Path, rows: &[SampleRow]) -> Result<()> {
    let strings = |get: fn(&SampleRow) -> &str| -> ArrayRef { Arc::new(StringArray::from_iter_values(rows.iter().map(get))) };
    let ints = |get: fn(&SampleRow) -> i64| -> ArrayRef { Arc::new(Int64Array::from_iter_values(rows.iter().map(get))) };
    let columns = vec![
        strings(|r| r.prompt_id.as_str()),
        records::messages_array(rows.iter().map(|r| r.prompt.as_slice())),
        ints(|r| r.sample_index),
        strings(|r| r.completion.as_str()),
        strings(|r| r.model.as_str()),
        ints(|r| r.prompt_tokens),
        ints(|r| r.completion_tokens),
        strings(|r| r.finish_reason.as_str()),
    ];
    let batch = RecordBatch::try_new(schema::by_name(schema::SAMPLES)?.arrow_schema(), columns)?;
    haloflow::io::write_arrow(path, &batch.schema(), &[batch], Default::default())
}

fn read_samples(path: &Path) -> Result<Vec<Reply>> {
    Ok(read_sample_rows(path)?
        .into_iter()
        .map(|r| Reply {
            prompt_id: r.prompt_id,
            sample_index: r.sample_index,
            prompt: r.prompt,
            text: r.completion,
            tokens: (r.finish_reason != crate::alpaca_eval::UNKNOWN_FINISH).then_some(r.completion_tokens),
            model: r.model,
        })
        .collect())
}

/// Whether a table file has a `chosen` column (a `paired` table).
fn is_paired(path: &Path) -> Result<bool> {
    Ok(haloflow::io::read_table(path)?.schema.field_with_name("chosen").is_ok())
}

/// The baseline's replies: `samples` as they are, `paired` rows as `chosen` replies numbered
/// per prompt in file order.
fn read_baseline(path: &Path) -> Result<Vec<Reply>> {
    if !is_paired(path)? {
        return read_samples(path);
    }
    let mut seen: HashMap<String, i64> = HashMap::new();
    Ok(records::read_paired(path)?
        .into_iter()
        .map(|p| {
            let index = seen.entry(p.prompt_id.clone()).or_insert(0);
            *index += 1;
            let sample_index = *index - 1;
            Reply { prompt_id: p.prompt_id, sample_index, prompt: p.prompt, text: p.chosen, tokens: None, model: "chosen".into() }
        })
        .collect())
}

/// What a `prompts` table adds to a prompt.
#[derive(Debug, Clone, Default)]
struct PromptMeta {
    reference: Option<String>,
    category: Option<String>,
}

/// `prompt_id` → reference and category, from a `prompts` table.
fn read_prompts(path: &Path) -> Result<HashMap<String, PromptMeta>> {
    let rows = read_rows(path, schema::PROMPTS, |c, i| {
        let opt = |name: &str| -> Result<Option<String>> {
            Ok(c.opt_str(name)?.filter(|a| arrow_array::Array::is_valid(*a, i)).map(|a| a.value(i).to_string()))
        };
        Ok((c.str("prompt_id")?.value(i).to_string(), PromptMeta { reference: opt("reference")?, category: opt("category")? }))
    })?;
    Ok(rows.into_iter().collect())
}

/// Reads and matches the inputs.
pub fn load(candidate: &Path, baseline: &Path, prompts: Option<&Path>) -> Result<Inputs> {
    let candidates = read_samples(candidate)?;
    if candidates.is_empty() {
        bail!("{}: the candidate has no samples", candidate.display());
    }
    let baselines = read_baseline(baseline)?;
    let meta = prompts.map(read_prompts).transpose()?.unwrap_or_default();
    let mut by_prompt: HashMap<&str, Vec<&Reply>> = HashMap::new();
    for reply in &baselines {
        by_prompt.entry(reply.prompt_id.as_str()).or_default().push(reply);
    }
    for replies in by_prompt.values_mut() {
        replies.sort_by_key(|r| r.sample_index);
    }
    let mut pairs = Vec::with_capacity(candidates.len());
    let mut unmatched = 0;
    for c in &candidates {
        let Some(replies) = by_prompt.get(c.prompt_id.as_str()) else {
            unmatched += 1;
            continue;
        };
        let b = replies.iter().find(|r| r.sample_index == c.sample_index).unwrap_or(&replies[0]);
        let PromptMeta { reference, category } = meta.get(&c.prompt_id).cloned().unwrap_or_default();
        pairs.push(Pair {
            prompt_id: c.prompt_id.clone(),
            sample_index: c.sample_index,
            prompt: c.prompt.clone(),
            candidate: c.text.clone(),
            baseline: b.text.clone(),
            candidate_tokens: c.tokens,
            baseline_tokens: b.tokens,
            reference,
            category,
        });
    }
    if pairs.is_empty() {
        bail!(
            "no candidate sample has a baseline reply to the same prompt_id ({} candidate samples, {} baseline replies)",
            candidates.len(),
            baselines.len()
        );
    }
    if unmatched > 0 {
        tracing::warn!("{unmatched} candidate sample(s) have no baseline reply to their prompt and are left out");
    }
    Ok(Inputs {
        pairs,
        candidate_name: candidates[0].model.clone(),
        baseline_name: baselines.first().map_or_else(String::new, |b| b.model.clone()),
        unmatched,
    })
}
