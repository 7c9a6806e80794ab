//! Run manifests: what each run did, like a lock file.
//!
//! `WORK_DIR/PIPELINE.lock.json` always holds the latest manifest (the state a `halo run`
//! compares against to explain why a stage reruns); every run also keeps a copy under
//! `WORK_DIR/runs/`. `halo gc` keeps the cache entries referenced by lock files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::stages::Params;
use std::collections::BTreeMap;

/// What a stage's cache key is made of; kept so the next run can say what changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyParts {
    /// What runs: the built-in binary's hash or the command's argv, version and files.
    pub identity: Identity,
    /// Resolved params.
    pub params: Params,
    /// Content hash of each input.
    pub inputs: BTreeMap<String, String>,
    /// Declared schema of each output.
    pub outputs: BTreeMap<String, String>,
    /// Rank count, for stages whose results depend on it (left out when 1, so keys of
    /// single-process stages are what they were before ranks existed).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub ranks: usize,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl KeyParts {
    /// The cache key: blake3 of the canonical JSON of the parts.
    pub fn key(&self) -> String {
        crate::hashing::hash_json(&serde_json::json!({ "haloflow_cache": 1, "parts": self }))
    }
}

/// The identity of a stage's program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Identity {
    /// A built-in stage: its binary and the binary's content hash.
    Builtin {
        /// Binary name (`halo-unpair`).
        binary: String,
        /// blake3 of the binary.
        hash: String,
    },
    /// A user command.
    Command {
        /// argv with variables substituted and placeholders left in.
        argv: Vec<String>,
        /// User-given version.
        version: Option<String>,
        /// Content hashes of argv elements that name files (scripts).
        files: BTreeMap<String, String>,
    },
}

/// Status of a stage in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Executed in this run.
    Ran,
    /// Its outputs came from the cache.
    Cached,
    /// Executed and failed.
    Failed,
    /// Not executed because an upstream stage failed.
    Skipped,
    /// Outside this run's selection (`--only`); the record is the previous one.
    NotRun,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Status::Ran => "ran",
            Status::Cached => "cached",
            Status::Failed => "FAILED",
            Status::Skipped => "skipped",
            Status::NotRun => "not run",
        };
        f.pad(s)
    }
}

/// One output as recorded in a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputRecord {
    /// Path of the output in the cache.
    pub path: PathBuf,
    /// Content hash.
    pub hash: String,
    /// Rows for tables.
    pub rows: Option<u64>,
}

/// One stage as recorded in a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// Stage name.
    pub name: String,
    /// What happened.
    pub status: Status,
    /// Why it ran (or why it failed or was skipped).
    pub reason: Option<String>,
    /// Cache key, when it could be computed.
    pub key: Option<String>,
    /// What the key is made of.
    pub parts: Option<KeyParts>,
    /// Outputs by name.
    pub outputs: BTreeMap<String, OutputRecord>,
    /// Seconds spent (running, or checking the cache).
    pub duration_s: f64,
}

/// A run manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Pipeline name.
    pub pipeline: String,
    /// Pipeline file.
    pub file: PathBuf,
    /// haloflow version that ran it.
    pub halo_version: String,
    /// Start time, seconds since the epoch.
    pub started_unix: f64,
    /// Wall time of the run in seconds.
    pub wall_s: f64,
    /// The run's `--set` overrides (`halo status` uses them when given none).
    #[serde(default)]
    pub overrides: Vec<String>,
    /// Whether every selected stage succeeded.
    pub ok: bool,
    /// Stages in pipeline order.
    pub stages: Vec<StageRecord>,
}

impl Manifest {
    /// The record of a stage.
    pub fn stage(&self, name: &str) -> Option<&StageRecord> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Path of the lock file of `pipeline` in `work_dir`.
    pub fn lock_path(work_dir: &Path, pipeline: &str) -> PathBuf {
        work_dir.join(format!("{pipeline}.lock.json"))
    }

    /// Reads the latest manifest of a pipeline, if any.
    pub fn load_lock(work_dir: &Path, pipeline: &str) -> Result<Option<Manifest>> {
        let path = Self::lock_path(work_dir, pipeline);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("{}: unreadable", path.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes this manifest as the lock file and as a copy under `runs/`.
    pub fn save(&self, work_dir: &Path) -> Result<PathBuf> {
        let stamp = (self.started_unix * 1000.0) as u64;
        crate::io::write_json(&work_dir.join("runs").join(format!("{}-{stamp}.json", self.pipeline)), self)?;
        let lock = Self::lock_path(work_dir, &self.pipeline);
        crate::io::write_json(&lock, self)?;
        Ok(lock)
    }

    /// Keeps this manifest as the named run `WORK_DIR/PIPELINE@NAME.lock.json`: a lock file of
    /// its own, so `halo gc` keeps what it references after later runs moved on.
    pub fn keep_as(&self, work_dir: &Path, name: &str) -> Result<PathBuf> {
        let path = work_dir.join(format!("{}@{name}.lock.json", self.pipeline));
        crate::io::write_json(&path, self)?;
        Ok(path)
    }

    /// Cache keys referenced by every lock file in `work_dir` (named runs included).
    pub fn referenced_keys(work_dir: &Path) -> Result<std::collections::BTreeSet<String>> {
        let mut keys = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(work_dir).with_context(|| format!("listing {}", work_dir.display()))? {
            let path = entry?.path();
            if path.to_string_lossy().ends_with(".lock.json") {
                let m: Manifest = serde_json::from_slice(&std::fs::read(&path)?)
                    .with_context(|| format!("{}: unreadable", path.display()))?;
                keys.extend(m.stages.into_iter().filter_map(|s| s.key));
            }
        }
        Ok(keys)
    }
}

/// Explains what differs between the previous key parts of a stage and the current ones,
/// e.g. `params.beta 0.1 → 0.2` or `input pairs changed`.
pub fn explain_change(prev: &KeyParts, now: &KeyParts) -> Vec<String> {
    let mut why = Vec::new();
    match (&prev.identity, &now.identity) {
        (Identity::Builtin { binary, hash: a }, Identity::Builtin { hash: b, .. }) if a != b => {
            why.push(format!("{binary} binary changed"))
        }
        (Identity::Command { argv: a1, version: v1, files: f1 }, Identity::Command { argv: a2, version: v2, files: f2 }) => {
            if a1 != a2 {
                why.push(format!("command changed: {} → {}", a1.join(" "), a2.join(" ")));
            }
            if v1 != v2 {
                why.push(format!("version {} → {}", v1.as_deref().unwrap_or("none"), v2.as_deref().unwrap_or("none")));
            }
            for (file, hash) in f2 {
                if f1.get(file).is_some_and(|h| h != hash) {
                    why.push(format!("file {file} changed"));
                }
            }
        }
        (a, b) if a != b => why.push("stage program changed".into()),
        _ => {}
    }
    let keys: std::collections::BTreeSet<&String> = prev.params.keys().chain(now.params.keys()).collect();
    for k in keys {
        match (prev.params.get(k), now.params.get(k)) {
            (Some(a), Some(b)) if a != b => why.push(format!("params.{k} {a} → {b}")),
            (None, Some(b)) => why.push(format!("params.{k} added ({b})")),
            (Some(a), None) => why.push(format!("params.{k} removed (was {a})")),
            _ => {}
        }
    }
    for (name, hash) in &now.inputs {
        match prev.inputs.get(name) {
            Some(h) if h != hash => why.push(format!("input {name} changed")),
            None => why.push(format!("input {name} added")),
            _ => {}
        }
    }
    if prev.outputs != now.outputs {
        why.push("declared outputs changed".into());
    }
    if prev.ranks != now.ranks {
        why.push(format!("ranks {} → {}", prev.ranks, now.ranks));
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(beta: f64, input: &str) -> KeyParts {
        KeyParts {
            identity: Identity::Builtin { binary: "halo-train".into(), hash: "h".into() },
            params: serde_json::from_value(serde_json::json!({ "beta": beta })).unwrap(),
            inputs: BTreeMap::from([("pairs".to_string(), input.to_string())]),
            outputs: BTreeMap::new(),
            ranks: 1,
        }
    }

    #[test]
    fn explains_param_and_input_changes() {
        let why = explain_change(&parts(0.1, "a"), &parts(0.2, "b"));
        assert_eq!(why, ["params.beta 0.1 → 0.2", "input pairs changed"]);
        assert!(explain_change(&parts(0.1, "a"), &parts(0.1, "a")).is_empty());
        assert_ne!(parts(0.1, "a").key(), parts(0.2, "a").key());
        let two = KeyParts { ranks: 2, ..parts(0.1, "a") };
        assert_eq!(explain_change(&parts(0.1, "a"), &two), ["ranks 1 → 2"]);
        assert_ne!(two.key(), parts(0.1, "a").key());
        // One rank leaves the key as it was before the field existed.
        assert!(!serde_json::to_string(&parts(0.1, "a")).unwrap().contains("ranks"));
    }
}
