//! The rows a reference model or a policy scores: a `plan` row gives its completion and its KL
//! partner completion, a `paired` row its chosen and rejected replies. Both become two
//! tokenized [`Sequence`]s per row under the tokenization contract of [`crate::tokenize`].

use std::path::Path;

use anyhow::{bail, Context, Result};
use haloflow::records::{self, Message};
use haloflow::schema;
use serde::Serialize;

use crate::logprobs::Sequence;
use crate::tokenize::{EmptyCompletion, Tokenizer};

/// Which table the rows came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    /// A `plan`: (completion, KL partner completion) per row.
    Plan,
    /// A `paired` table: (chosen, rejected) per row.
    Paired,
}

impl DataKind {
    /// The sequences of a row that run forward with gradient: both sides of a pair, a plan
    /// row's completion alone (its KL partner runs without gradient).
    pub fn sequences_per_row(self) -> usize {
        match self {
            DataKind::Plan => 1,
            DataKind::Paired => 2,
        }
    }
}

/// One row to score: an id, a prompt and two completions.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredRow {
    /// `example_id` (plan) or `pair_id` (paired).
    pub id: String,
    /// The prompt.
    pub prompt: Vec<Message>,
    /// Completion (plan) or chosen reply (paired).
    pub first: String,
    /// KL partner completion (plan) or rejected reply (paired).
    pub second: String,
}

/// Reads a `plan` or `paired` table, telling which by its columns.
pub fn read_rows(path: &Path) -> Result<(DataKind, Vec<ScoredRow>)> {
    let table = haloflow::io::read_table(path)?;
    let has = |c: &str| table.schema.field_with_name(c).is_ok();
    if has("kl_completion") {
        let rows = records::read_plan(path)?;
        Ok((DataKind::Plan, rows.into_iter().map(|r| ScoredRow { id: r.example.example_id, prompt: r.example.prompt, first: r.example.completion, second: r.kl_completion }).collect()))
    } else if has("chosen") {
        let rows = records::read_paired(path)?;
        Ok((DataKind::Paired, rows.into_iter().map(|r| ScoredRow { id: r.pair_id, prompt: r.prompt, first: r.chosen, second: r.rejected }).collect()))
    } else {
        bail!("{}: neither a `{}` nor a `{}` table", path.display(), schema::PLAN, schema::PAIRED)
    }
}

/// Counts of what tokenization did to a dataset.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct EncodeStats {
    /// Rows read.
    pub rows: usize,
    /// Rows skipped because a completion was empty or truncated to nothing.
    pub skipped: usize,
    /// The first skipped rows' ids and reasons.
    pub skipped_examples: Vec<(String, String)>,
    /// Sequences whose prompt lost its start to `max_prompt_length`.
    pub truncated_prompts: usize,
    /// Sequences whose completion lost its end to `max_length`.
    pub truncated_completions: usize,
}

/// A row with both sequences tokenized.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedRow {
    /// Row id.
    pub id: String,
    /// First and second completion as sequences.
    pub seqs: [Sequence; 2],
}

/// Tokenizes every row; rows with an empty completion are skipped and counted, never dropped
/// silently.
pub fn encode_rows(tok: &Tokenizer, rows: &[ScoredRow], max_prompt_length: usize, max_length: usize) -> Result<(Vec<EncodedRow>, EncodeStats)> {
    if max_prompt_length == 0 || max_length <= max_prompt_length {
        bail!("need 0 < max_prompt_length < max_length (got {max_prompt_length} and {max_length})");
    }
    let mut stats = EncodeStats { rows: rows.len(), ..Default::default() };
    let mut out = Vec::with_capacity(rows.len());
    'rows: for row in rows {
        let mut seqs = Vec::with_capacity(2);
        for completion in [&row.first, &row.second] {
            match tok.encode_example(&row.prompt, completion, max_prompt_length, max_length) {
                // The first token has no prediction: a completion needs at least one prompt token.
                Ok(e) if e.completion_start == 0 => {
                    stats.skipped += 1;
                    if stats.skipped_examples.len() < 20 {
                        stats.skipped_examples.push((row.id.clone(), "empty prompt: no token precedes the completion".into()));
                    }
                    continue 'rows;
                }
                Ok(e) => {
                    stats.truncated_prompts += e.truncated_prompt as usize;
                    stats.truncated_completions += e.truncated_completion as usize;
                    seqs.push(Sequence { ids: e.ids, completion_start: e.completion_start });
                }
                Err(err) if err.is::<EmptyCompletion>() => {
                    stats.skipped += 1;
                    if stats.skipped_examples.len() < 20 {
                        stats.skipped_examples.push((row.id.clone(), err.to_string()));
                    }
                    continue 'rows;
                }
                Err(err) => return Err(err).with_context(|| format!("row `{}`", row.id)),
            }
        }
        let second = seqs.pop().expect("two sequences");
        let first = seqs.pop().expect("two sequences");
        out.push(EncodedRow { id: row.id.clone(), seqs: [first, second] });
    }
    Ok((out, stats))
}
