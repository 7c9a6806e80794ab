//! What an adapter collects (rows up to `--limit`, records read, skip reasons) and how it is
//! written: the `data` Arrow file and the `summary` JSON, both atomically, or nothing at all
//! when no row was imported.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Result};
use arrow_array::RecordBatch;
use haloflow::records::{is_empty_prompt, PairedRow};
use serde::Serialize;

use crate::format::{Format, Kind};
use crate::source::{self, Record};

/// Skip reason: a pair whose chosen or rejected reply (or a completion) is empty.
pub const EMPTY_REPLY: &str = "empty_reply";
/// Skip reason of every adapter: the prompt holds no text (readers downstream refuse such rows).
pub const EMPTY_PROMPT: &str = "empty_prompt";
/// Skip reason: a pair whose chosen and rejected replies are the same text.
pub const IDENTICAL_REPLIES: &str = "identical_replies";

/// Rows produced by an adapter and the counts that go into the summary.
pub struct Collected<T> {
    /// Rows kept, at most `--limit`.
    pub rows: Vec<T>,
    /// Records read: lines, Parquet rows or (Open-Assistant) trees.
    pub rows_read: u64,
    /// Why input was left out, with counts (every reason the adapter checks, zeros included).
    pub skipped: BTreeMap<&'static str, u64>,
    /// Other counts worth reporting that are not skips.
    pub notes: BTreeMap<&'static str, u64>,
    limit: usize,
}

impl<T> Collected<T> {
    /// Feeds the records of `path` (Parquet: the columns `fields`) to `each` until `limit`
    /// rows are kept; the first error stops the import. `reasons` are the skip reasons the
    /// adapter checks, reported even when they never happen.
    pub fn read(
        path: &Path,
        fields: &[&str],
        reasons: &[&'static str],
        limit: Option<usize>,
        mut each: impl FnMut(&Record, &mut Self) -> Result<()>,
    ) -> Result<Self> {
        let mut out = Collected {
            rows: Vec::new(),
            rows_read: 0,
            skipped: reasons.iter().map(|&reason| (reason, 0)).collect(),
            notes: BTreeMap::new(),
            limit: limit.unwrap_or(usize::MAX),
        };
        let mut records = source::records(path, fields)?;
        while out.rows.len() < out.limit {
            let Some(record) = records.next() else { break };
            out.rows_read += 1;
            each(&record?, &mut out)?;
        }
        Ok(out)
    }

    /// Keeps a row unless the limit is reached.
    pub fn push(&mut self, row: T) {
        if self.rows.len() < self.limit {
            self.rows.push(row);
        }
    }

    /// Counts one skip for `reason`.
    pub fn skip(&mut self, reason: &'static str) {
        *self.skipped.entry(reason).or_default() += 1;
    }

    /// Adds one to the informational counter `key`.
    pub fn note(&mut self, key: &'static str) {
        *self.notes.entry(key).or_default() += 1;
    }

    fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }
}

impl Collected<PairedRow> {
    /// Keeps a pair unless its prompt ([`EMPTY_PROMPT`]) or a reply is empty ([`EMPTY_REPLY`]) or both replies are the same
    /// ([`IDENTICAL_REPLIES`]): such a pair teaches nothing, and unpaired it would label one
    /// text both desirable and undesirable.
    pub fn push_pair(&mut self, row: PairedRow) {
        if is_empty_prompt(&row.prompt) {
            self.skip(EMPTY_PROMPT);
        } else if row.chosen.trim().is_empty() || row.rejected.trim().is_empty() {
            self.skip(EMPTY_REPLY);
        } else if row.chosen == row.rejected {
            self.skip(IDENTICAL_REPLIES);
        } else {
            self.push(row);
        }
    }
}

/// What this run was asked to do, recorded in the summary.
pub struct Job<'a> {
    /// Input file.
    pub source: &'a Path,
    /// Output Arrow IPC file.
    pub data: &'a Path,
    /// Output summary JSON.
    pub summary: &'a Path,
    /// Format used (never `auto`).
    pub format: Format,
    /// Whether the format was detected (`--format auto`).
    pub detected: bool,
    /// Schema of the output.
    pub kind: Kind,
    /// `--limit`, if given.
    pub limit: Option<usize>,
}

/// The `summary` output.
#[derive(Serialize)]
struct Summary {
    /// Input file.
    source: String,
    /// Format used.
    format: &'static str,
    /// Whether the format was detected (`--format auto`) rather than given.
    format_detected: bool,
    /// Schema of the `data` output.
    kind: &'static str,
    /// Records read: lines, Parquet rows or (Open-Assistant) trees.
    rows_read: u64,
    /// Rows in the `data` output.
    rows_written: usize,
    /// Sum of `skipped`.
    skipped_total: u64,
    /// Skip reason → count, for every reason the adapter checks (Open-Assistant counts
    /// replies left out of the rankings).
    skipped: BTreeMap<&'static str, u64>,
    /// Other counts that are not skips.
    notes: BTreeMap<&'static str, u64>,
    /// `--limit`, if given.
    limit: Option<usize>,
}

/// Writes the rows with `to_batch` to `job.data` and the summary to `job.summary`, and logs
/// the summary. Zero rows is an error, and then nothing is written.
pub fn write<T>(out: Collected<T>, to_batch: fn(&[T]) -> Result<RecordBatch>, job: &Job) -> Result<()> {
    let skipped = out
        .skipped
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(reason, n)| format!("{reason} ({n})"))
        .collect::<Vec<_>>()
        .join(", ");
    if out.rows.is_empty() {
        bail!(
            "no rows imported from {}: {} records read, {} skipped{}",
            job.source.display(),
            out.rows_read,
            out.skipped_total(),
            if skipped.is_empty() { String::new() } else { format!(" as {skipped}") }
        );
    }
    let batch = to_batch(&out.rows)?;
    haloflow::io::write_arrow(job.data, &batch.schema(), &[batch], HashMap::new())?;
    let summary = Summary {
        source: job.source.display().to_string(),
        format: job.format.name(),
        format_detected: job.detected,
        kind: job.kind.schema(),
        rows_read: out.rows_read,
        rows_written: out.rows.len(),
        skipped_total: out.skipped_total(),
        skipped: out.skipped,
        notes: out.notes,
        limit: job.limit,
    };
    haloflow::io::write_json(job.summary, &summary)?;
    tracing::info!(
        "imported {} {} rows from {} (format {}{}): {} records read, {} skipped{}",
        summary.rows_written,
        summary.kind,
        summary.source,
        summary.format,
        if summary.format_detected { ", detected" } else { "" },
        summary.rows_read,
        summary.skipped_total,
        if skipped.is_empty() { String::new() } else { format!(" as {skipped}") }
    );
    if !summary.notes.is_empty() {
        tracing::info!("notes: {:?}", summary.notes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::temp_file;
    use haloflow::records::{paired_batch, Message};

    fn pair(chosen: &str, rejected: &str) -> PairedRow {
        PairedRow {
            prompt_id: "p".into(),
            pair_id: "x".into(),
            prompt: vec![Message::new("user", "q")],
            chosen: chosen.into(),
            rejected: rejected.into(),
            score_chosen: None,
            score_rejected: None,
            source: None,
        }
    }

    fn collect(limit: Option<usize>) -> Collected<PairedRow> {
        let (_dir, path) =
            temp_file("in.jsonl", "{\"c\": \"a\"}\n{\"c\": \" \"}\n{\"c\": \"b\"}\n{\"c\": \"d\"}\n");
        Collected::read(&path, &[], &[EMPTY_REPLY, IDENTICAL_REPLIES], limit, |record, out| {
            let c = record.root().get("c")?.str()?;
            out.push_pair(pair(c, if c == "b" { "b" } else { "r" }));
            Ok(())
        })
        .unwrap()
    }

    #[test]
    fn pairs_with_empty_or_identical_replies_are_counted_skips() {
        let out = collect(None);
        assert_eq!(out.rows.iter().map(|r| r.chosen.as_str()).collect::<Vec<_>>(), ["a", "d"]);
        assert_eq!(out.rows_read, 4);
        assert_eq!(out.skipped, BTreeMap::from([(EMPTY_REPLY, 1), (IDENTICAL_REPLIES, 1)]));
    }

    #[test]
    fn limit_stops_reading_once_enough_rows_are_kept() {
        let out = collect(Some(1));
        assert_eq!((out.rows.len(), out.rows_read), (1, 1));
    }

    #[test]
    fn empty_result_is_an_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (data, summary) = (dir.path().join("d.arrow"), dir.path().join("s.json"));
        let mut out = collect(Some(0));
        out.skip(EMPTY_REPLY);
        let job = Job {
            source: Path::new("in.jsonl"),
            data: &data,
            summary: &summary,
            format: Format::Trl,
            detected: false,
            kind: Kind::Paired,
            limit: Some(0),
        };
        let err = write(out, paired_batch, &job).unwrap_err().to_string();
        assert_eq!(err, "no rows imported from in.jsonl: 0 records read, 1 skipped as empty_reply (1)");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
