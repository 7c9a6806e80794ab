//! Test helpers shared by the unit tests and `tests/cli.rs` (included there by path): the real
//! data files in `../shared/data` and temporary input files.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Anthropic HH-RLHF, helpful-base test split (2,354 pairs), relative to `../shared`.
pub const HH_HELPFUL: &str =
    "data/hh-rlhf/helpful-base-test.jsonl.gz";
/// Anthropic HH-RLHF, harmless-base test split.
pub const HH_HARMLESS: &str =
    "data/hh-rlhf/harmless-base-test.jsonl.gz";
/// 100 Open-Assistant message trees.
pub const OASST: &str = "data/oasst/en_100_tree.jsonl";
/// The 80 MT-Bench questions.
pub const MT_BENCH: &str =
    "data/prompts/mt_bench_question.jsonl";
/// The 80 Vicuna-Bench questions.
pub const VICUNA_BENCH: &str =
    "data/prompts/vicuna_bench_question.jsonl";

/// The real data file at `../shared/RELATIVE`, or a visible skip (see [`haloflow::shared::path`]).
pub fn shared_file(relative: &str) -> Option<PathBuf> {
    haloflow::shared::path(relative)
}

/// Writes `contents` to `name` in a new temporary directory (kept alive by the returned guard).
pub fn temp_file(name: &str, contents: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(name);
    std::fs::write(&path, contents).expect("writing temporary input");
    (dir, path)
}

/// The skip counts that are not zero.
pub fn nonzero(skipped: &BTreeMap<&'static str, u64>) -> BTreeMap<&'static str, u64> {
    skipped.iter().filter(|(_, &n)| n > 0).map(|(&k, &n)| (k, n)).collect()
}
