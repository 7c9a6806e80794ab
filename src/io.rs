//! Arrow IPC and Parquet files, written atomically.
//!
//! Every writer here writes to a temporary sibling (`.NAME.tmp-PID`) and renames it into place
//! only when the file is complete, so a killed stage never leaves a file that looks valid.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

/// A table read from disk: schema (with metadata) and its batches.
pub struct Table {
    /// Schema of the file, including key/value metadata.
    pub schema: SchemaRef,
    /// Record batches in file order.
    pub batches: Vec<RecordBatch>,
}

impl Table {
    /// Total number of rows.
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }

    /// A schema metadata value, if present.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.schema.metadata().get(key).map(|s| s.as_str())
    }
}

/// The temporary path used while `path` is being written.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes a file atomically: `write` fills a temporary sibling which is synced and renamed to
/// `path` only if `write` succeeds. On error the temporary file is removed.
pub fn write_atomic<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> Result<()>,
{
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = temp_sibling(path);
    let result = (|| {
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut writer = BufWriter::new(file);
        write(&mut writer)?;
        writer.flush()?;
        writer.get_ref().sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Writes a JSON document atomically (pretty-printed, trailing newline).
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value)?;
        w.write_all(b"\n")?;
        Ok(())
    })
}

/// Writes batches as an Arrow IPC file atomically. `metadata` is added to the schema.
pub fn write_arrow(
    path: &Path,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let schema = std::sync::Arc::new(schema.as_ref().clone().with_metadata(metadata));
    write_atomic(path, |w| {
        let mut writer = arrow_ipc::writer::FileWriter::try_new(w, &schema)?;
        for batch in batches {
            let batch = batch.clone().with_schema(schema.clone())?;
            writer.write(&batch)?;
        }
        writer.finish()?;
        Ok(())
    })
}

/// Reads a whole Arrow IPC file. Errors name the file.
pub fn read_arrow(path: &Path) -> Result<Table> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = arrow_ipc::reader::FileReader::try_new(BufReader::new(file), None)
        .with_context(|| format!("{}: not an Arrow IPC file", path.display()))?;
    let schema = reader.schema();
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .with_context(|| format!("{}: reading record batches", path.display()))?;
    Ok(Table { schema, batches })
}

/// Reads a whole Parquet file. Errors name the file.
pub fn read_parquet(path: &Path) -> Result<Table> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?;
    let schema = builder.schema().clone();
    let batches = builder
        .build()?
        .collect::<std::result::Result<Vec<_>, _>>()
        .with_context(|| format!("{}: reading record batches", path.display()))?;
    Ok(Table { schema, batches })
}

/// Writes batches as a zstd-compressed Parquet file atomically, with key/value metadata.
pub fn write_parquet(
    path: &Path,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let schema = std::sync::Arc::new(schema.as_ref().clone().with_metadata(metadata));
    write_atomic(path, |w| {
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
            .build();
        let mut writer = parquet::arrow::ArrowWriter::try_new(w, schema.clone(), Some(props))?;
        for batch in batches {
            writer.write(&batch.clone().with_schema(schema.clone())?)?;
        }
        writer.close()?;
        Ok(())
    })
}

/// Reads a table from an Arrow IPC or Parquet file, chosen by extension (`.parquet` or not).
pub fn read_table(path: &Path) -> Result<Table> {
    if is_lfs_pointer(path) {
        bail!("{}: a Git LFS pointer, not the data: fetch the file (`git lfs pull`) and rerun", path.display());
    }
    if path.extension().is_some_and(|e| e == "parquet") {
        read_parquet(path)
    } else {
        read_arrow(path)
    }
}

/// How a Git LFS pointer file begins (what a clone without `git lfs` holds instead of the data).
pub const LFS_POINTER_START: &str = "version https://git-lfs.github.com/spec/";

/// Whether `path` is a small file holding a Git LFS pointer.
pub fn is_lfs_pointer(path: &Path) -> bool {
    let mut start = [0u8; LFS_POINTER_START.len()];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut start)).is_ok()
        && start == LFS_POINTER_START.as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int64Array, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    use std::sync::Arc;

    #[test]
    fn arrow_and_parquet_round_trip_with_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![1, 2, 3]))]).unwrap();
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        for name in ["t.arrow", "t.parquet"] {
            let path = dir.path().join(name);
            if name.ends_with("parquet") {
                write_parquet(&path, &schema, &[batch.clone()], meta.clone()).unwrap();
            } else {
                write_arrow(&path, &schema, &[batch.clone()], meta.clone()).unwrap();
            }
            let table = read_table(&path).unwrap();
            assert_eq!(table.num_rows(), 3);
            assert_eq!(table.metadata("k"), Some("v"));
        }
        // No temporary files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-")).collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        let err = write_atomic(&path, |w| {
            w.write_all(b"{\"half\":")?;
            anyhow::bail!("killed halfway")
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn lfs_pointers_are_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.arrow");
        std::fs::write(&path, format!("{LFS_POINTER_START}v1\noid sha256:0123\nsize 99\n")).unwrap();
        let err = format!("{:#}", read_table(&path).err().expect("refused"));
        assert!(err.contains("data.arrow") && err.contains("Git LFS pointer"), "{err}");
    }
}
