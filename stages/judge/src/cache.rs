//! The response cache: every judge answer, one JSON line each in `CACHE_DIR/answers.jsonl`.
//!
//! A line is appended (one `write` call, no buffering) as soon as an answer arrives, so a run
//! that is killed keeps every answer it received, and a rerun or resumed run asks only for the
//! rest. Several processes may append to the same file (lines are written whole with
//! `O_APPEND`). Unreadable lines (a torn write after a power loss, say) are skipped with a
//! warning. Only answers are cached: a request that failed is asked again next time.
//!
//! The key is the blake3 hash of [`KEY_VERSION`], the backend's fingerprint (endpoint, judge
//! model and every sampling setting), the template's text, the prompt, both outputs in the order
//! shown, which side was shown first, and the reference answer.
//!
//! Where it lives ([`dir`]): `--cache-dir`, else `$HALO_STAGE_CACHE_DIR/judge` (the runner's
//! per-work-dir directory for stage caches, which `halo gc` empties), else `.halo/judge-cache`
//! in the working directory.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use haloflow::records::Message;
use serde::{Deserialize, Serialize};

use crate::backends::JudgeAnswer;
use crate::verdict::Side;

/// Bumped when the meaning of a cached answer changes (e.g. how verdicts are parsed).
pub const KEY_VERSION: &str = "halo-judge-cache-v2";

/// The environment variable by which the runner names its directory for stage caches.
pub const STAGE_CACHE_ENV: &str = "HALO_STAGE_CACHE_DIR";

/// The cache directory when neither `--cache-dir` nor [`STAGE_CACHE_ENV`] names one.
pub const DEFAULT_DIR: &str = ".halo/judge-cache";

/// The cache directory: `explicit` (`--cache-dir`), else `judge` inside the runner's stage-cache
/// directory (`stage_cache`, the value of [`STAGE_CACHE_ENV`]), else [`DEFAULT_DIR`].
pub fn dir(explicit: Option<&Path>, stage_cache: Option<&Path>) -> PathBuf {
    match (explicit, stage_cache) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(stage_cache)) => stage_cache.join("judge"),
        (None, None) => PathBuf::from(DEFAULT_DIR),
    }
}

/// File name of the cache inside the cache directory.
pub const FILE_NAME: &str = "answers.jsonl";

/// What identifies one judge request.
pub struct KeyParts<'a> {
    /// [`crate::backends::Backend::fingerprint`].
    pub fingerprint: &'a str,
    /// The template's source text.
    pub template: &'a str,
    /// The prompt the outputs answer.
    pub prompt: &'a [Message],
    /// The output shown first.
    pub answer_a: &'a str,
    /// The output shown second.
    pub answer_b: &'a str,
    /// Which side was shown first.
    pub first: Side,
    /// The prompt's reference answer, if any.
    pub reference: Option<&'a str>,
}

impl KeyParts<'_> {
    /// The cache key: 64 hex digits.
    pub fn key(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        let mut field = |bytes: &[u8]| {
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        field(KEY_VERSION.as_bytes());
        field(self.fingerprint.as_bytes());
        field(self.template.as_bytes());
        field(&(self.prompt.len() as u64).to_le_bytes());
        for m in self.prompt {
            field(m.role.as_bytes());
            field(m.content.as_bytes());
        }
        field(self.answer_a.as_bytes());
        field(self.answer_b.as_bytes());
        field(self.first.as_str().as_bytes());
        match self.reference {
            Some(r) => field(format!("some:{r}").as_bytes()),
            None => field(b"none"),
        }
        hasher.finalize().to_hex().to_string()
    }
}

#[derive(Serialize, Deserialize)]
struct Line {
    key: String,
    #[serde(flatten)]
    answer: JudgeAnswer,
}

/// An open cache: the answers read at start, and the file new answers are appended to.
pub struct Cache {
    path: PathBuf,
    answers: HashMap<String, JudgeAnswer>,
    file: File,
}

impl Cache {
    /// Opens (creating if needed) the cache in `dir` and reads its answers.
    pub fn open(dir: &Path) -> Result<Cache> {
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
            match serde_json::from_str::<Line>(line) {
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
    pub fn get(&self, key: &str) -> Option<&JudgeAnswer> {
        self.answers.get(key)
    }

    /// Number of answers in the cache.
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    /// Appends an answer to the file (one `write` call) and remembers it.
    pub fn append(&mut self, key: &str, answer: &JudgeAnswer) -> Result<()> {
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
    use crate::verdict::Shown;

    fn answer(raw: &str) -> JudgeAnswer {
        JudgeAnswer { raw: raw.into(), verdict: Shown::A, latency_ms: 1.5, prompt_tokens: Some(3), completion_tokens: None, preference_first: None }
    }

    fn parts<'a>(prompt: &'a [Message], a: &'a str, first: Side) -> KeyParts<'a> {
        KeyParts { fingerprint: "openai model=m", template: "t", prompt, answer_a: a, answer_b: "b", first, reference: None }
    }

    #[test]
    fn keys_depend_on_every_part() {
        let prompt = [Message::new("user", "q")];
        let base = parts(&prompt, "a", Side::Candidate).key();
        assert_eq!(base.len(), 64);
        assert_eq!(base, parts(&prompt, "a", Side::Candidate).key());
        assert_ne!(base, parts(&prompt, "a", Side::Baseline).key());
        assert_ne!(base, parts(&prompt, "a2", Side::Candidate).key());
        assert_ne!(base, parts(&[Message::new("user", "q2")], "a", Side::Candidate).key());
        let mut p = parts(&prompt, "a", Side::Candidate);
        p.fingerprint = "openai model=other";
        assert_ne!(base, p.key());
        p = parts(&prompt, "a", Side::Candidate);
        p.reference = Some("");
        assert_ne!(base, p.key());
    }

    #[test]
    fn the_directory_is_the_option_else_the_runners_else_the_default() {
        let (mine, runner) = (Path::new("mine"), Path::new("/work/stage-cache"));
        assert_eq!(dir(Some(mine), Some(runner)), mine);
        assert_eq!(dir(None, Some(runner)), Path::new("/work/stage-cache/judge"));
        assert_eq!(dir(None, None), Path::new(DEFAULT_DIR));
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
        let mut cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("k2"), Some(&answer("[[B]]")));
        assert!(cache.get("k3").is_none());
        cache.append("k4", &answer("[[C]]")).unwrap();
        drop(cache);
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.get("k4"), Some(&answer("[[C]]")), "an answer after a torn line is kept");
    }
}
