//! Content hashes (blake3) of files and directories, with a memo keyed by size and mtime so a
//! fully cached run does not reread large inputs or binaries.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Size and modification time of a file or directory tree (max mtime, total size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// Total size in bytes.
    pub size: u64,
    /// Modification time in nanoseconds since the epoch (latest file in a tree).
    pub mtime_ns: u128,
}

/// Reads the stamp of a file, or of all files under a directory.
pub fn stamp(path: &Path) -> Result<Stamp> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}: not found", path.display()))?;
    if meta.is_dir() {
        let mut total = Stamp { size: 0, mtime_ns: 0 };
        for file in tree_files(path)? {
            let s = stamp(&path.join(&file))?;
            total.size += s.size;
            total.mtime_ns = total.mtime_ns.max(s.mtime_ns);
        }
        return Ok(total);
    }
    let mtime_ns = meta.modified()?.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    Ok(Stamp { size: meta.len(), mtime_ns })
}

/// Relative paths of all files under `dir`, sorted.
pub fn tree_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let entries = std::fs::read_dir(dir.join(&rel)).with_context(|| format!("listing {}", dir.join(&rel).display()))?;
        for entry in entries {
            let entry = entry?;
            let child = rel.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                stack.push(child);
            } else {
                out.push(child);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// blake3 hex digest of a file's bytes, or of a directory tree (sorted relative paths and the
/// digests of their files).
pub fn hash_path(path: &Path) -> Result<String> {
    if path.is_dir() {
        let mut hasher = blake3::Hasher::new();
        for file in tree_files(path)? {
            let name = file.to_string_lossy();
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update(hash_path(&path.join(&file))?.as_bytes());
        }
        return Ok(hasher.finalize().to_hex().to_string());
    }
    let mut hasher = blake3::Hasher::new();
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    hasher.update_reader(file).with_context(|| format!("hashing {}", path.display()))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// blake3 hex digest of a JSON value's canonical text (object keys in insertion order, as built).
pub fn hash_json(value: &serde_json::Value) -> String {
    blake3::hash(value.to_string().as_bytes()).to_hex().to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemoEntry {
    stamp: Stamp,
    hash: String,
}

/// A persistent memo of path → hash, trusted while the path's stamp is unchanged.
#[derive(Debug, Default)]
pub struct HashMemo {
    file: Option<PathBuf>,
    entries: BTreeMap<PathBuf, MemoEntry>,
    dirty: bool,
}

impl HashMemo {
    /// Loads the memo stored at `file` (a missing or unreadable memo starts empty).
    pub fn load(file: &Path) -> HashMemo {
        let entries = std::fs::read(file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        HashMemo { file: Some(file.to_path_buf()), entries, dirty: false }
    }

    /// The content hash of `path`, from the memo when its size and mtime are unchanged.
    pub fn hash(&mut self, path: &Path) -> Result<String> {
        let key = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let now = stamp(path)?;
        if let Some(e) = self.entries.get(&key).filter(|e| e.stamp == now) {
            return Ok(e.hash.clone());
        }
        let hash = hash_path(path)?;
        self.entries.insert(key, MemoEntry { stamp: now, hash: hash.clone() });
        self.dirty = true;
        Ok(hash)
    }

    /// Writes the memo back if it changed.
    pub fn save(&mut self) -> Result<()> {
        if let (true, Some(file)) = (self.dirty, &self.file) {
            crate::io::write_json(file, &self.entries)?;
            self.dirty = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_hash_changes_with_content_and_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a"), "1").unwrap();
        let h1 = hash_path(dir.path()).unwrap();
        std::fs::write(dir.path().join("sub/a"), "2").unwrap();
        let h2 = hash_path(dir.path()).unwrap();
        std::fs::rename(dir.path().join("sub/a"), dir.path().join("sub/b")).unwrap();
        let h3 = hash_path(dir.path()).unwrap();
        assert!(h1 != h2 && h2 != h3);
    }

    #[test]
    fn memo_rehashes_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "one").unwrap();
        let mut memo = HashMemo::load(&dir.path().join("memo.json"));
        let h1 = memo.hash(&f).unwrap();
        memo.save().unwrap();
        let mut memo = HashMemo::load(&dir.path().join("memo.json"));
        assert_eq!(memo.hash(&f).unwrap(), h1);
        std::fs::write(&f, "two, longer").unwrap();
        assert_ne!(memo.hash(&f).unwrap(), h1);
    }
}
