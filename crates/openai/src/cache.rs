//! The answer cache: every answer, one JSON line each in `CACHE_DIR/answers.jsonl`.
//!
//! A line is appended (one `write` call, no buffering) as soon as an answer arrives, so a run
//! that is killed keeps every answer it received, and a rerun or resumed run asks only for the
//! rest. Several processes may append to the same file (lines are written whole with
//! `O_APPEND`). Unreadable lines (a torn write after a power loss, say) are skipped with a
//! warning. Only answers are cached: a request that failed is asked again next time.
//!
//! A key ([`KeyHasher`]) is the blake3 hash of length-prefixed fields: the stage's key version
//! first, then everything that changes the answer.
//!
//! Where it lives ([`dir`]): the stage's `--cache-dir`, else `$HALO_STAGE_CACHE_DIR/STAGE` (the
//! runner's per-work-dir directory for stage caches, which `halo gc` empties), else
//! `.halo/STAGE-cache` in the working directory.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The environment variable by which the runner names its directory for stage caches.
pub const STAGE_CACHE_ENV: &str = "HALO_STAGE_CACHE_DIR";

/// File name of the cache inside the cache directory.
pub const FILE_NAME: &str = "answers.jsonl";

/// The cache directory of stage `stage` (`judge`, `sample`): `explicit` (`--cache-dir`), else
/// `stage` inside the runner's stage-cache directory (`stage_cache`, the value of
/// [`STAGE_CACHE_ENV`]), else `.halo/STAGE-cache`.
pub fn dir(explicit: Option<&Path>, stage_cache: Option<&Path>, stage: &str) -> PathBuf {
    match (explicit, stage_cache) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(stage_cache)) => stage_cache.join(stage),
        (None, None) => PathBuf::from(format!(".halo/{stage}-cache")),
    }
}

/// [`dir`] with the runner's directory read from [`STAGE_CACHE_ENV`].
pub fn dir_from_env(explicit: Option<&Path>, stage: &str) -> PathBuf {
    let stage_cache = std::env::var_os(STAGE_CACHE_ENV).map(PathBuf::from);
    dir(explicit, stage_cache.as_deref(), stage)
}

/// Builds a cache key from fields, each hashed with its length first (so no two different
/// field lists give the same bytes).
pub struct KeyHasher(blake3::Hasher);

impl KeyHasher {
    /// A key starting with the stage's key version (bumped when the meaning of a cached answer
    /// changes).
    pub fn new(version: &str) -> KeyHasher {
        let mut hasher = KeyHasher(blake3::Hasher::new());
        hasher.field(version.as_bytes());
        hasher
    }

    /// Adds one field.
    pub fn field(&mut self, bytes: &[u8]) -> &mut KeyHasher {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    /// The key: 64 hex digits.
    pub fn finish(&self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

#[derive(Serialize, Deserialize)]
struct Line<T> {
    key: String,
    #[serde(flatten)]
    answer: T,
}

/// An open cache of answers of type `T` (serialized as a JSON object): the answers read at
/// start, and the file new answers are appended to.
pub struct Cache<T> {
    path: PathBuf,
    answers: HashMap<String, T>,
    file: File,
}

impl<T: Serialize + DeserializeOwned + Clone> Cache<T> {
    /// Opens (creating if needed) the cache in `dir` and reads its answers.
    pub fn open(dir: &Path) -> Result<Cache<T>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating cache dir {}", dir.display()))?;
        let path = dir.join(FILE_NAME);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading cache {}", path.display())),
        };
        let text = String::from_utf8_lossy(&bytes);
        let mut answers = HashMap::new();
        let mut skipped = 0usize;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Line<T>>(line) {
                Ok(l) => {
                    answers.entry(l.key).or_insert(l.answer);
                }
                Err(_) => skipped += 1,
            }
        }
        if skipped > 0 {
            tracing::warn!("{}: skipped {skipped} unreadable line(s)", path.display());
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening cache {}", path.display()))?;
        if !text.is_empty() && !text.ends_with('\n') {
            // Finish a torn last line so the next answer starts a line of its own.
            file.write_all(b"\n").with_context(|| format!("appending to cache {}", path.display()))?;
        }
        Ok(Cache { path, answers, file })
    }

    /// The cached answer for `key`, if any.
    pub fn get(&self, key: &str) -> Option<&T> {
        self.answers.get(key)
    }

    /// Number of answers in the cache.
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    /// Whether the cache holds no answer.
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    /// Appends an answer to the file (one `write` call) and remembers it.
    pub fn append(&mut self, key: &str, answer: &T) -> Result<()> {
        let mut line = serde_json::to_string(&Line { key: key.to_string(), answer: answer.clone() })?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .with_context(|| format!("appending to cache {}", self.path.display()))?;
        self.answers.insert(key.to_string(), answer.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Answer {
        raw: String,
        tokens: Option<i64>,
    }

    fn answer(raw: &str) -> Answer {
        Answer { raw: raw.into(), tokens: Some(3) }
    }

    #[test]
    fn keys_are_length_prefixed_fields_after_the_version() {
        let key = |fields: &[&str]| {
            let mut k = KeyHasher::new("v1");
            fields.iter().for_each(|f| {
                k.field(f.as_bytes());
            });
            k.finish()
        };
        assert_eq!(key(&["a", "b"]).len(), 64);
        assert_eq!(key(&["a", "b"]), key(&["a", "b"]));
        assert_ne!(key(&["a", "b"]), key(&["ab", ""]), "field boundaries count");
        assert_ne!(key(&["a"]), KeyHasher::new("v2").field(b"a").finish());
    }

    #[test]
    fn the_directory_is_the_option_else_the_runners_else_the_default() {
        let (mine, runner) = (Path::new("mine"), Path::new("/work/stage-cache"));
        assert_eq!(dir(Some(mine), Some(runner), "judge"), mine);
        assert_eq!(dir(None, Some(runner), "judge"), Path::new("/work/stage-cache/judge"));
        assert_eq!(dir(None, None, "sample"), Path::new(".halo/sample-cache"));
    }

    #[test]
    fn answers_survive_reopening_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = Cache::open(dir.path()).unwrap();
        cache.append("k1", &answer("[[A]]")).unwrap();
        cache.append("k2", &answer("[[B]]")).unwrap();
        drop(cache);
        let mut file = OpenOptions::new().append(true).open(dir.path().join(FILE_NAME)).unwrap();
        file.write_all(b"{\"key\":\"k3\",\"raw\":\"tor").unwrap();
        let mut cache = Cache::<Answer>::open(dir.path()).unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("k2"), Some(&answer("[[B]]")));
        assert!(cache.get("k3").is_none());
        cache.append("k4", &answer("[[C]]")).unwrap();
        drop(cache);
        let cache = Cache::<Answer>::open(dir.path()).unwrap();
        assert_eq!(cache.get("k4"), Some(&answer("[[C]]")), "an answer after a torn line is kept");
    }
}
