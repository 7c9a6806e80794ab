//! Finished chunks of a refcache run, kept in a scratch directory so a killed run resumes.
//! The directory is tied to a fingerprint of everything the results depend on; a directory
//! from another run is cleared, never mixed in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow_array::builder::{Float32Builder, ListBuilder};
use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, ListArray, RecordBatch};
use arrow_schema::{DataType, Field, Schema};

/// The result for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqResult {
    /// Summed completion log-prob.
    pub logp: f64,
    /// Completion tokens.
    pub n_tokens: i64,
    /// Per-token log-probs, when requested.
    pub tokens: Option<Vec<f32>>,
}

/// A scratch directory of chunk files.
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    /// Opens `dir` for a run identified by `run_id`; a directory left by a different run is cleared.
    pub fn open(dir: &Path, run_id: &str) -> Result<Scratch> {
        let marker = dir.join("run.id");
        let same = std::fs::read_to_string(&marker).map(|s| s == run_id).unwrap_or(false);
        if !same && dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing scratch {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating scratch {}", dir.display()))?;
        if !same {
            haloflow::io::write_atomic(&marker, |w| Ok(std::io::Write::write_all(w, run_id.as_bytes())?))?;
        }
        Ok(Scratch { dir: dir.to_path_buf() })
    }

    fn chunk_path(&self, chunk: usize) -> PathBuf {
        self.dir.join(format!("chunk-{chunk:06}.arrow"))
    }

    /// Reads a finished chunk: sequence index → result.
    pub fn read(&self, chunk: usize) -> Result<Option<HashMap<usize, SeqResult>>> {
        let path = self.chunk_path(chunk);
        if !path.exists() {
            return Ok(None);
        }
        let table = haloflow::io::read_arrow(&path)?;
        let mut out = HashMap::new();
        for batch in &table.batches {
            let col = |name: &str| batch.column_by_name(name).with_context(|| format!("{}: no column {name}", path.display()));
            let seq = col("seq")?.as_any().downcast_ref::<Int64Array>().context("seq")?;
            let logp = col("logp")?.as_any().downcast_ref::<Float64Array>().context("logp")?;
            let n = col("n_tokens")?.as_any().downcast_ref::<Int64Array>().context("n_tokens")?;
            let tokens = batch.column_by_name("tokens").and_then(|c| c.as_any().downcast_ref::<ListArray>());
            for i in 0..batch.num_rows() {
                let tokens = tokens.filter(|t| t.is_valid(i)).map(|t| {
                    let v = t.value(i);
                    let v = v.as_any().downcast_ref::<arrow_array::Float32Array>().expect("float list");
                    v.values().to_vec()
                });
                out.insert(seq.value(i) as usize, SeqResult { logp: logp.value(i), n_tokens: n.value(i), tokens });
            }
        }
        Ok(Some(out))
    }

    /// Writes a finished chunk atomically.
    pub fn write(&self, chunk: usize, results: &[(usize, SeqResult)]) -> Result<()> {
        let mut tokens = ListBuilder::new(Float32Builder::new());
        for (_, r) in results {
            match &r.tokens {
                Some(t) => {
                    tokens.values().append_slice(t);
                    tokens.append(true);
                }
                None => tokens.append(false),
            }
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(results.iter().map(|(i, _)| *i as i64).collect::<Int64Array>()),
            Arc::new(results.iter().map(|(_, r)| r.logp).collect::<Float64Array>()),
            Arc::new(results.iter().map(|(_, r)| r.n_tokens).collect::<Int64Array>()),
            Arc::new(tokens.finish()),
        ];
        let schema = Arc::new(Schema::new(vec![
            Field::new("seq", DataType::Int64, false),
            Field::new("logp", DataType::Float64, false),
            Field::new("n_tokens", DataType::Int64, false),
            Field::new("tokens", haloflow::schema::float_list(), true),
        ]));
        let batch = RecordBatch::try_new(schema.clone(), columns)?;
        haloflow::io::write_arrow(&self.chunk_path(chunk), &schema, &[batch], Default::default())
    }

    /// Deletes the scratch directory (after the output is complete).
    pub fn remove(self) -> Result<()> {
        std::fs::remove_dir_all(&self.dir).with_context(|| format!("removing scratch {}", self.dir.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_and_other_runs_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let s = Scratch::open(&path, "run-a").unwrap();
        let r = SeqResult { logp: -1.5, n_tokens: 3, tokens: Some(vec![-0.5, -0.5, -0.5]) };
        s.write(0, &[(7, r.clone()), (2, SeqResult { tokens: None, ..r.clone() })]).unwrap();
        let back = s.read(0).unwrap().unwrap();
        assert_eq!(back[&7], r);
        assert_eq!(back[&2].tokens, None);
        assert!(s.read(1).unwrap().is_none());
        let s = Scratch::open(&path, "run-a").unwrap();
        assert!(s.read(0).unwrap().is_some(), "same run resumes");
        let s = Scratch::open(&path, "run-b").unwrap();
        assert!(s.read(0).unwrap().is_none(), "another run starts clean");
    }
}
