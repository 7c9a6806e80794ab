//! Input tables for the tests, and running `halo-judge`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray};
use haloflow::records::{self, Message, PairedRow};
use haloflow::schema;

/// The chat prompt of a single-turn question.
pub fn prompt(question: &str) -> Vec<Message> {
    vec![Message::new("user", question)]
}

fn strings<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

fn write(path: &Path, name: &str, columns: Vec<ArrayRef>) {
    let batch = RecordBatch::try_new(schema::by_name(name).unwrap().arrow_schema(), columns).unwrap();
    haloflow::io::write_arrow(path, &batch.schema(), &[batch], Default::default()).unwrap();
}

/// Writes a `samples` table of `model` with one sample per `(question, completion)`.
pub fn write_samples(path: &Path, model: &str, rows: &[(String, String)]) {
    let prompts: Vec<Vec<Message>> = rows.iter().map(|(q, _)| prompt(q)).collect();
    let ids: Vec<String> = prompts.iter().map(|p| records::prompt_id(p)).collect();
    write(
        path,
        schema::SAMPLES,
        vec![
            strings(ids.iter().map(String::as_str)),
            records::messages_array(prompts.iter().map(Vec::as_slice)),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|_| 0))),
            strings(rows.iter().map(|(_, c)| c.as_str())),
            strings(rows.iter().map(|_| model)),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|(q, _)| q.len() as i64))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|(_, c)| c.split_whitespace().count() as i64))),
            strings(rows.iter().map(|_| "eos")),
        ],
    );
}

/// Writes a `prompts` table: `(question, reference, category)`.
pub fn write_prompts(path: &Path, rows: &[(&str, Option<&str>, Option<&str>)]) {
    let prompts: Vec<Vec<Message>> = rows.iter().map(|(q, _, _)| prompt(q)).collect();
    let ids: Vec<String> = prompts.iter().map(|p| records::prompt_id(p)).collect();
    write(
        path,
        schema::PROMPTS,
        vec![
            strings(ids.iter().map(String::as_str)),
            records::messages_array(prompts.iter().map(Vec::as_slice)),
            Arc::new(rows.iter().map(|r| r.1).collect::<StringArray>()),
            Arc::new(rows.iter().map(|r| r.2).collect::<StringArray>()),
        ],
    );
}

/// Writes a `paired` table: `(question, chosen, rejected)`.
pub fn write_paired(path: &Path, rows: &[(&str, &str, &str)]) {
    let rows: Vec<PairedRow> = rows
        .iter()
        .enumerate()
        .map(|(i, (q, c, r))| PairedRow {
            prompt_id: records::prompt_id(&prompt(q)),
            pair_id: format!("pair{i}"),
            prompt: prompt(q),
            chosen: c.to_string(),
            rejected: r.to_string(),
            score_chosen: None,
            score_rejected: None,
            source: None,
        })
        .collect();
    let batch = records::paired_batch(&rows).unwrap();
    haloflow::io::write_arrow(path, &batch.schema(), &[batch], Default::default()).unwrap();
}

/// A work directory with the paths of a judge run.
pub struct Run {
    /// The temporary directory (removed on drop).
    pub dir: tempfile::TempDir,
}

impl Run {
    /// A fresh directory.
    pub fn new() -> Run {
        Run { dir: tempfile::tempdir().unwrap() }
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The arguments naming this directory's inputs and outputs (`out` prefixes the outputs).
    pub fn io_args(&self, out: &str) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, file) in [
            ("--candidate", "candidate.arrow".to_string()),
            ("--baseline", "baseline.arrow".to_string()),
            ("--judgments", format!("{out}/judgments.arrow")),
            ("--summary", format!("{out}/summary.json")),
            ("--report", format!("{out}/report")),
            ("--cache-dir", "cache".to_string()),
        ] {
            args.push(flag.to_string());
            args.push(self.path(&file).display().to_string());
        }
        args
    }

    /// Runs `halo-judge` with `args` and extra environment variables, in this directory (with
    /// no proxy, API key or log level inherited from the environment).
    pub fn judge(&self, args: &[String], env: &[(&str, &str)]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_halo-judge"));
        command.args(args).current_dir(self.dir.path());
        for var in ["RUST_LOG", "OPENAI_API_KEY", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"] {
            command.env_remove(var);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().unwrap()
    }

    /// The summary of output `out`.
    pub fn summary(&self, out: &str) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(self.path(&format!("{out}/summary.json"))).unwrap()).unwrap()
    }

    /// The judgments of output `out`.
    pub fn judgments(&self, out: &str) -> Vec<Judgment> {
        let table = haloflow::io::read_arrow(&self.path(&format!("{out}/judgments.arrow"))).unwrap();
        schema::by_name(schema::JUDGMENTS).unwrap().check_schema(&table.schema).unwrap();
        let mut rows = Vec::new();
        for batch in &table.batches {
            let col = |name: &str| batch.column_by_name(name).unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
            let (ids, first, raw, verdict, pair, error) =
                (col("prompt_id"), col("first"), col("raw"), col("verdict"), col("pair_verdict"), col("error"));
            for i in 0..batch.num_rows() {
                rows.push(Judgment {
                    prompt_id: ids.value(i).to_string(),
                    first: first.value(i).to_string(),
                    raw: raw.value(i).to_string(),
                    verdict: verdict.value(i).to_string(),
                    pair_verdict: pair.value(i).to_string(),
                    error: error.is_valid(i).then(|| error.value(i).to_string()),
                });
            }
        }
        rows
    }
}

/// A row of the judgments table.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgment {
    /// Prompt id.
    pub prompt_id: String,
    /// `candidate` or `baseline`.
    pub first: String,
    /// Raw answer.
    pub raw: String,
    /// Verdict of this request.
    pub verdict: String,
    /// Verdict of its pair.
    pub pair_verdict: String,
    /// Why the request failed, if it did.
    pub error: Option<String>,
}

/// Asserts a run succeeded, showing its output otherwise.
pub fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "halo-judge failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
