//! Reference log-probs for training: from the `refcache` Parquet (default; the reference model
//! is never loaded) after checking its fingerprint, or from a live reference model.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use arrow_array::{Array, Float32Array, Float64Array, ListArray, StringArray};
use haloflow::schema::{self, REF_FINGERPRINT};
use haloflow_ml::fingerprint::Fingerprint;

/// A row's reference log-probs.
#[derive(Debug, Clone, PartialEq)]
pub struct RefRow {
    /// Summed log-probs of the row's two sequences (completion and KL partner, or chosen and
    /// rejected).
    pub sums: [f64; 2],
    /// Per-token log-probs of the first sequence's completion, when the cache holds them.
    pub tokens: Option<Vec<f32>>,
}

/// Reads a `ref_logps` Parquet file and checks that it was computed from `expected`.
pub fn load(path: &Path, expected: &Fingerprint) -> Result<HashMap<String, RefRow>> {
    let table = haloflow::io::read_parquet(path)?;
    schema::by_name(schema::REF_LOGPS)?.check_schema(&table.schema).with_context(|| path.display().to_string())?;
    let stored: Fingerprint = table
        .metadata(REF_FINGERPRINT)
        .with_context(|| format!("{}: no {REF_FINGERPRINT} metadata: not written by halo-refcache", path.display()))
        .and_then(|text| serde_json::from_str(text).with_context(|| format!("{}: unreadable fingerprint", path.display())))?;
    stored.check(expected).with_context(|| format!("{}", path.display()))?;
    let mut out = HashMap::new();
    for batch in &table.batches {
        let col = |name: &str| batch.column_by_name(name);
        let ids = col("example_id").and_then(|c| c.as_any().downcast_ref::<StringArray>()).context("example_id")?;
        let first = col("logp").and_then(|c| c.as_any().downcast_ref::<Float64Array>()).context("logp")?;
        let second = col("kl_logp")
            .or_else(|| col("rejected_logp"))
            .and_then(|c| c.as_any().downcast_ref::<Float64Array>())
            .with_context(|| format!("{}: neither kl_logp nor rejected_logp", path.display()))?;
        let tokens = col("token_logps").and_then(|c| c.as_any().downcast_ref::<ListArray>());
        for i in 0..batch.num_rows() {
            let tokens = tokens.filter(|t| t.is_valid(i)).map(|t| {
                let values = t.value(i);
                values.as_any().downcast_ref::<Float32Array>().map(|v| v.values().to_vec()).unwrap_or_default()
            });
            out.insert(ids.value(i).to_string(), RefRow { sums: [first.value(i), second.value(i)], tokens });
        }
    }
    Ok(out)
}

/// Looks up the reference row of every row id, naming the first missing one.
pub fn lookup<'a>(refs: &'a HashMap<String, RefRow>, ids: &[&str]) -> Result<Vec<&'a RefRow>> {
    ids.iter()
        .map(|id| match refs.get(*id) {
            Some(r) => Ok(r),
            None => bail!("the reference log-prob cache has no row `{id}`: recompute it for this data"),
        })
        .collect()
}
