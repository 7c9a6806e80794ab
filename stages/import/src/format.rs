//! The input formats and output kinds, and detection of the format from the first record.

use std::path::Path;

use anyhow::{Context, Result};
use clap::ValueEnum;
use haloflow::schema;

use crate::source;

/// An input format (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Detect from the first record.
    Auto,
    /// Anthropic HH-RLHF transcripts (`chosen`/`rejected`).
    HhRlhf,
    /// Open-Assistant message trees.
    Oasst,
    /// TRL-style preference or unpaired rows (JSONL or Parquet).
    Trl,
    /// MT-Bench / Vicuna-Bench question files.
    MtBench,
}

impl Format {
    /// The name used on the command line, in summaries and as the rows' `source`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::HhRlhf => "hh-rlhf",
            Format::Oasst => "oasst",
            Format::Trl => "trl",
            Format::MtBench => "mt-bench",
        }
    }

    /// The format to use for `path` and whether it was detected: `self` unless it is `Auto`.
    pub fn resolve(self, path: &Path) -> Result<(Format, bool)> {
        if self != Format::Auto {
            return Ok((self, false));
        }
        let first = source::records(path, DETECTION_FIELDS)?.next().with_context(|| {
            format!("cannot detect the format of {}: it holds no records", path.display())
        })??;
        let root = first.root();
        let format = if root.has("message_tree_id") {
            Format::Oasst
        } else if root.has("question_id") && root.has("turns") {
            Format::MtBench
        } else if first.value.get("chosen").and_then(|c| c.as_str()).is_some_and(is_hh_transcript) {
            Format::HhRlhf
        } else {
            Format::Trl
        };
        Ok((format, true))
    }
}

/// The fields [`Format::resolve`] looks at.
const DETECTION_FIELDS: &[&str] = &["message_tree_id", "question_id", "turns", "chosen"];

/// Whether a string looks like an HH-RLHF transcript.
fn is_hh_transcript(text: &str) -> bool {
    text.contains("\n\nHuman:") || text.trim_start().starts_with("Human:")
}

/// The schema of the `data` output (`--kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Preference pairs (`paired` schema).
    Paired,
    /// Unpaired examples with a desirable/undesirable label (`binary` schema).
    Binary,
    /// Prompts to sample from and judge (`prompts` schema).
    Prompts,
}

impl Kind {
    /// The name of the output schema.
    pub fn schema(self) -> &'static str {
        match self {
            Kind::Paired => schema::PAIRED,
            Kind::Binary => schema::BINARY,
            Kind::Prompts => schema::PROMPTS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{shared_file, temp_file, HH_HELPFUL, MT_BENCH, OASST, VICUNA_BENCH};

    fn detect(line: &str) -> Format {
        let (_dir, path) = temp_file("in.jsonl", line);
        let (format, detected) = Format::Auto.resolve(&path).unwrap();
        assert!(detected);
        format
    }

    #[test]
    fn detection_from_first_record() {
        assert_eq!(
            detect(r#"{"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "x"}"#),
            Format::HhRlhf
        );
        assert_eq!(detect(r#"{"message_tree_id": "t", "prompt": {}}"#), Format::Oasst);
        assert_eq!(detect(r#"{"question_id": 1, "turns": ["q"]}"#), Format::MtBench);
        assert_eq!(detect(r#"{"prompt": "q", "chosen": "a", "rejected": "b"}"#), Format::Trl);
        assert_eq!(detect(r#"{"prompt": "q", "completion": "a", "label": true}"#), Format::Trl);
    }

    #[test]
    fn explicit_format_is_kept_and_empty_file_cannot_be_detected() {
        let (_dir, path) = temp_file("empty.jsonl", "\n");
        assert_eq!(Format::Oasst.resolve(&path).unwrap(), (Format::Oasst, false));
        let err = Format::Auto.resolve(&path).unwrap_err().to_string();
        assert!(err.contains("cannot detect the format") && err.contains("empty.jsonl"), "{err}");
    }

    #[test]
    fn real_files_are_detected() {
        for (path, expected) in [
            (HH_HELPFUL, Format::HhRlhf),
            (OASST, Format::Oasst),
            (MT_BENCH, Format::MtBench),
            (VICUNA_BENCH, Format::MtBench),
        ] {
            let Some(path) = shared_file(path) else { continue };
            let path = path.as_path();
            assert_eq!(Format::Auto.resolve(path).unwrap(), (expected, true), "{}", path.display());
        }
    }
}
