//! The judge's answer cache: haloflow-openai's resumable cache ([`haloflow_openai::cache`], one
//! JSON line per answer in `CACHE_DIR/answers.jsonl`) holding [`JudgeAnswer`]s.
//!
//! The key is the blake3 hash of [`KEY_VERSION`], the backend's fingerprint (endpoint, judge
//! model and every sampling setting), the template's text, the prompt, both outputs in the order
//! shown, which side was shown first, and the reference answer.
//!
//! Where it lives ([`dir`]): `--cache-dir`, else `$HALO_STAGE_CACHE_DIR/judge` (the runner's
//! per-work-dir directory for stage caches, which `halo gc` empties), else `.halo/judge-cache`
//! in the working directory.

use std::path::{Path, PathBuf};

use haloflow::records::Message;
use haloflow_openai::cache::KeyHasher;

use crate::backends::JudgeAnswer;
use crate::verdict::Side;

/// Bumped when the meaning of a cached answer changes (e.g. how verdicts are parsed).
pub const KEY_VERSION: &str = "halo-judge-cache-v2";

/// The judge's answer cache.
pub type Cache = haloflow_openai::cache::Cache<JudgeAnswer>;

/// The cache directory: `explicit` (`--cache-dir`), else `judge` in the runner's stage-cache
/// directory, else `.halo/judge-cache`.
pub fn dir(explicit: Option<&Path>) -> PathBuf {
    haloflow_openai::cache::dir_from_env(explicit, "judge")
}

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
        let mut key = KeyHasher::new(KEY_VERSION);
        key.field(self.fingerprint.as_bytes()).field(self.template.as_bytes()).field(&(self.prompt.len() as u64).to_le_bytes());
        for m in self.prompt {
            key.field(m.role.as_bytes()).field(m.content.as_bytes());
        }
        key.field(self.answer_a.as_bytes()).field(self.answer_b.as_bytes()).field(self.first.as_str().as_bytes());
        match self.reference {
            Some(r) => key.field(format!("some:{r}").as_bytes()),
            None => key.field(b"none"),
        };
        key.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn keys_are_those_of_the_judges_own_cache_before_it_was_shared() {
        // The key of this request as halo-judge computed it before the cache moved to
        // haloflow-openai (same fields, same order): existing caches stay valid.
        let mut hasher = blake3::Hasher::new();
        let mut field = |bytes: &[u8]| {
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        for f in [KEY_VERSION.as_bytes(), b"openai model=m", b"t", &1u64.to_le_bytes(), b"user", b"q", b"a", b"b", b"candidate", b"none"] {
            field(f);
        }
        assert_eq!(parts(&[Message::new("user", "q")], "a", Side::Candidate).key(), hasher.finalize().to_hex().to_string());
    }
}
