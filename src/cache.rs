//! The content-addressed stage cache under `WORK_DIR/cache`.
//!
//! An entry is a directory `cache/KEY/` holding a stage's outputs, its log and `entry.json`
//! (the [`Entry`] record: per output its file, schema, blake3 hash, size, mtime and rows). A
//! stage runs in `WORK_DIR/tmp/KEY.PID/`; only after it exits 0 and its outputs pass schema
//! validation is `entry.json` written and the directory renamed into place, so an entry either
//! exists whole or not at all. Before use an entry is checked by size, and rehashed when a
//! file's mtime moved; `halo verify` rehashes everything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::hashing::{self, Stamp};

/// Name of the record file inside an entry.
pub const ENTRY_FILE: &str = "entry.json";
/// Name of the captured stdout/stderr of the stage inside an entry.
pub const LOG_FILE: &str = "stage.log";

/// One output stored in an entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredOutput {
    /// File or directory name inside the entry.
    pub file: String,
    /// Schema it was validated against.
    pub schema: String,
    /// blake3 of its content.
    pub hash: String,
    /// Size and mtime when stored.
    pub stamp: Stamp,
    /// Row count for tables.
    pub rows: Option<u64>,
}

/// The record of a complete cache entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Stage that produced it (informational: entries are shared by key).
    pub stage: String,
    /// Cache key.
    pub key: String,
    /// Seconds the stage ran.
    pub duration_s: f64,
    /// Outputs by name.
    pub outputs: BTreeMap<String, StoredOutput>,
}

/// Result of looking a key up.
#[derive(Debug)]
pub enum Lookup {
    /// A complete entry whose files match their record.
    Valid(Entry),
    /// No entry for this key.
    Missing,
    /// An entry exists but a file was edited, truncated or removed.
    Corrupt(String),
}

/// Whether `file` names a file directly inside an entry (one normal path component): an
/// entry record naming `../x` or `/x` must not make the runner read or trust files elsewhere.
fn is_plain_file_name(file: &str) -> bool {
    let mut parts = Path::new(file).components();
    matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None))
}

/// The cache directory of one work dir.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    tmp: PathBuf,
}

impl Cache {
    /// The cache inside `work_dir` (directories are created on demand).
    pub fn new(work_dir: &Path) -> Cache {
        Cache { root: work_dir.join("cache"), tmp: work_dir.join("tmp") }
    }

    /// Directory of the entry for `key`.
    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Path of output `name` of a valid entry.
    pub fn output_path(&self, entry: &Entry, name: &str) -> Option<PathBuf> {
        entry.outputs.get(name).filter(|o| is_plain_file_name(&o.file)).map(|o| self.entry_dir(&entry.key).join(&o.file))
    }

    fn read_entry(&self, key: &str) -> Result<Option<Entry>> {
        let file = self.entry_dir(key).join(ENTRY_FILE);
        match std::fs::read(&file) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("{}: unreadable", file.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
        }
    }

    /// Looks up `key`. With `full`, every output is rehashed; otherwise only outputs whose
    /// mtime moved are (sizes are always compared).
    pub fn lookup(&self, key: &str, full: bool) -> Lookup {
        let entry = match self.read_entry(key) {
            Ok(Some(e)) => e,
            Ok(None) => return Lookup::Missing,
            Err(e) => return Lookup::Corrupt(format!("{e:#}")),
        };
        let dir = self.entry_dir(key);
        for (name, out) in &entry.outputs {
            if !is_plain_file_name(&out.file) {
                return Lookup::Corrupt(format!("output `{name}`: file name \"{}\" leaves the cache entry", out.file));
            }
            let path = dir.join(&out.file);
            let now = match hashing::stamp(&path) {
                Ok(s) => s,
                Err(_) => return Lookup::Corrupt(format!("output `{name}` ({}) is missing", out.file)),
            };
            if now.size != out.stamp.size {
                return Lookup::Corrupt(format!(
                    "output `{name}` ({}) has {} bytes, {} were stored",
                    out.file, now.size, out.stamp.size
                ));
            }
            if full || now.mtime_ns != out.stamp.mtime_ns {
                match hashing::hash_path(&path) {
                    Ok(h) if h == out.hash => {}
                    _ => return Lookup::Corrupt(format!("output `{name}` ({}) content changed", out.file)),
                }
            }
        }
        Lookup::Valid(entry)
    }

    /// Creates a fresh temporary directory for a run of `key`.
    pub fn new_temp(&self, key: &str) -> Result<PathBuf> {
        let dir = self.tmp.join(format!("{key}.{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Moves a finished temporary directory into the cache as the entry `entry.key`,
    /// replacing a corrupt entry of the same key. Writes `entry.json` last, then renames.
    pub fn commit(&self, temp: &Path, entry: &Entry) -> Result<()> {
        crate::io::write_json(&temp.join(ENTRY_FILE), entry)?;
        std::fs::create_dir_all(&self.root).with_context(|| format!("creating {}", self.root.display()))?;
        let target = self.entry_dir(&entry.key);
        if target.exists() {
            self.remove(&entry.key)?;
        }
        std::fs::rename(temp, &target)
            .with_context(|| format!("moving {} to {}", temp.display(), target.display()))
    }

    /// Removes an entry: first renamed aside (so it stops being an entry at once), then deleted.
    pub fn remove(&self, key: &str) -> Result<()> {
        let dir = self.entry_dir(key);
        std::fs::create_dir_all(&self.tmp)?;
        let trash = self.tmp.join(format!("trash-{key}.{}", std::process::id()));
        std::fs::rename(&dir, &trash).with_context(|| format!("removing {}", dir.display()))?;
        std::fs::remove_dir_all(&trash).with_context(|| format!("deleting {}", trash.display()))
    }

    /// Keys of all entries present.
    pub fn keys(&self) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        if let Ok(dir) = std::fs::read_dir(&self.root) {
            for e in dir {
                keys.push(e?.file_name().to_string_lossy().into_owned());
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Deletes leftovers of interrupted runs. Call only while holding the work-dir lock.
    pub fn clean_temp(&self) -> Result<()> {
        if self.tmp.exists() {
            std::fs::remove_dir_all(&self.tmp).with_context(|| format!("cleaning {}", self.tmp.display()))?;
        }
        Ok(())
    }

    /// Total bytes stored under an entry.
    pub fn entry_size(&self, key: &str) -> u64 {
        hashing::stamp(&self.entry_dir(key)).map(|s| s.size).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(cache: &Cache, key: &str, content: &str) -> PathBuf {
        let temp = cache.new_temp(key).unwrap();
        std::fs::write(temp.join("out.json"), content).unwrap();
        let path = temp.join("out.json");
        let entry = Entry {
            stage: "s".into(),
            key: key.into(),
            duration_s: 0.0,
            outputs: BTreeMap::from([(
                "out".to_string(),
                StoredOutput {
                    file: "out.json".into(),
                    schema: "json".into(),
                    hash: hashing::hash_path(&path).unwrap(),
                    stamp: hashing::stamp(&path).unwrap(),
                    rows: None,
                },
            )]),
        };
        cache.commit(&temp, &entry).unwrap();
        cache.entry_dir(key).join("out.json")
    }

    #[test]
    fn edits_and_truncation_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let path = store(&cache, "k1", "{\"a\": 1}");
        assert!(matches!(cache.lookup("k1", false), Lookup::Valid(_)));
        std::fs::write(&path, "{\"a\": 2}").unwrap(); // same size, new content
        assert!(matches!(cache.lookup("k1", false), Lookup::Corrupt(m) if m.contains("content changed")));
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(cache.lookup("k1", false), Lookup::Corrupt(m) if m.contains("bytes")));
        assert!(matches!(cache.lookup("k2", false), Lookup::Missing));
    }

    #[test]
    fn uncommitted_temp_is_not_an_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let temp = cache.new_temp("k").unwrap();
        std::fs::write(temp.join("out.json"), "{}").unwrap();
        assert!(matches!(cache.lookup("k", false), Lookup::Missing));
        cache.clean_temp().unwrap();
        assert!(!temp.exists());
        store(&cache, "k", "{}");
        cache.remove("k").unwrap();
        assert!(cache.keys().unwrap().is_empty());
    }
}
