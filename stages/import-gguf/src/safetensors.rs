//! Writing a safetensors file of `f32` tensors, streamed: the header is written from the
//! tensors' names and shapes first, then each tensor's data as it is produced, so only one
//! tensor is in memory at a time.
//!
//! Format: an 8-byte little-endian header length, a JSON header (`{"NAME": {"dtype": "F32",
//! "shape": [...], "data_offsets": [begin, end]}, ..., "__metadata__": {...}}`, padded with
//! spaces to a multiple of 8 bytes), then the tensors' bytes back to back, little-endian.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Map, Value};

/// A safetensors file being written; tensors must be written in the order they were declared.
pub struct Writer {
    out: BufWriter<File>,
    path: PathBuf,
    tensors: Vec<(String, usize)>,
    next: usize,
}

impl Writer {
    /// Creates `path` and writes the header for `tensors` (name, row-major shape), in that
    /// order, with `format: pt` metadata (what transformers expects).
    pub fn create(path: &Path, tensors: &[(String, Vec<usize>)]) -> Result<Writer> {
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({ "format": "pt" }));
        let mut offset = 0usize;
        for (name, shape) in tensors {
            let bytes = shape.iter().product::<usize>() * 4;
            let entry = json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes] });
            ensure!(header.insert(name.clone(), entry).is_none(), "tensor `{name}` twice in {}", path.display());
            offset += bytes;
        }
        let mut header = serde_json::to_vec(&Value::Object(header))?;
        header.resize(header.len().div_ceil(8) * 8, b' ');
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        let tensors = tensors.iter().map(|(name, shape)| (name.clone(), shape.iter().product())).collect();
        Ok(Writer { out, path: path.to_path_buf(), tensors, next: 0 })
    }

    /// Writes the data of the next declared tensor, `name`.
    pub fn write(&mut self, name: &str, data: &[f32]) -> Result<()> {
        let (expected, len) =
            self.tensors.get(self.next).with_context(|| format!("tensor `{name}` was not declared"))?;
        ensure!(expected == name, "tensor `{name}` written where `{expected}` was declared");
        ensure!(data.len() == *len, "tensor `{name}` has {} values, declared {len}", data.len());
        let mut bytes = Vec::with_capacity(1 << 16);
        for chunk in data.chunks(1 << 14) {
            bytes.clear();
            bytes.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
            self.out.write_all(&bytes).with_context(|| format!("writing {}", self.path.display()))?;
        }
        self.next += 1;
        Ok(())
    }

    /// Checks every declared tensor was written, flushes and syncs the file.
    pub fn finish(mut self) -> Result<()> {
        ensure!(
            self.next == self.tensors.len(),
            "{} of {} tensors written to {}",
            self.next,
            self.tensors.len(),
            self.path.display()
        );
        self.out.flush()?;
        self.out.get_ref().sync_all().with_context(|| format!("syncing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_a_small_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let mut w = Writer::create(&path, &[("a".into(), vec![2, 1]), ("b".into(), vec![1])]).unwrap();
        assert!(w.write("b", &[1.0]).is_err(), "out of order");
        w.write("a", &[1.0, -2.0]).unwrap();
        assert!(w.write("b", &[1.0, 2.0]).is_err(), "wrong size");
        w.write("b", &[0.5]).unwrap();
        w.finish().unwrap();

        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        assert_eq!(header["a"], json!({"dtype": "F32", "shape": [2, 1], "data_offsets": [0, 8]}));
        assert_eq!(header["b"]["data_offsets"], json!([8, 12]));
        assert_eq!(header["__metadata__"]["format"], "pt");
        let data: Vec<f32> =
            bytes[8 + n..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(data, [1.0, -2.0, 0.5]);
    }

    #[test]
    fn unfinished_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let w = Writer::create(&dir.path().join("t.safetensors"), &[("a".into(), vec![1])]).unwrap();
        assert!(w.finish().unwrap_err().to_string().contains("0 of 1 tensors"));
    }
}
