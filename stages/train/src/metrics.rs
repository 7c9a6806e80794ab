//! Per-step training metrics and their Parquet file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use haloflow_ml::losses::LossOutput;
use serde::{Deserialize, Serialize};

use crate::parallel::Ranks;

/// The metrics of one optimizer step (or of the evaluation before the first, step 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Optimizer step (1-based; 0 = before training).
    pub step: usize,
    /// Epoch of the step.
    pub epoch: usize,
    /// Named values: loss, lr, grad_norm, rewards/..., eval/..., tokens_per_s, ...
    pub values: BTreeMap<String, f64>,
    /// Count-weighted sums of microbatch metrics, averaged by `finish`.
    #[serde(skip)]
    pending: BTreeMap<String, (f64, f64)>,
}

impl Row {
    /// An empty row.
    pub fn new(step: usize, epoch: usize) -> Row {
        Row { step, epoch, values: BTreeMap::new(), pending: BTreeMap::new() }
    }

    /// Adds a microbatch's metrics, weighted by its example count, and the mean policy
    /// log-probs of its first (chosen/completion) and second (rejected) sequences.
    pub fn add_microbatch(&mut self, out: &LossOutput, policy_logps: (f64, f64)) {
        let w = out.count as f64;
        let entries = out.metrics.entries().into_iter().map(|(k, v)| (k.to_string(), v));
        let logps = [("logps/chosen".to_string(), policy_logps.0), ("logps/rejected".to_string(), policy_logps.1)];
        for (name, value) in entries.chain(logps).filter(|(_, v)| v.is_finite()) {
            let slot = self.pending.entry(name).or_default();
            slot.0 += value * w;
            slot.1 += w;
        }
    }

    /// Replaces the pending microbatch sums with their totals over the ranks (a collective),
    /// so that every rank's row describes the step's whole batch.
    pub fn sum_over(&mut self, ranks: &Ranks) -> Result<()> {
        self.pending = ranks.merge_sums(&self.pending)?;
        Ok(())
    }

    fn averaged(&self) -> impl Iterator<Item = (String, f64)> + '_ {
        self.pending.iter().filter(|(_, (_, w))| *w > 0.0).map(|(k, (s, w))| (k.clone(), s / w))
    }

    /// Completes a training step's row.
    pub fn finish(&mut self, loss: f64, lr: f64, grad_norm: f64, examples: usize, tokens: usize, seconds: f64) {
        let averaged: Vec<(String, f64)> = self.averaged().collect();
        self.values.extend(averaged);
        for (k, v) in [
            ("loss", loss),
            ("lr", lr),
            ("grad_norm", grad_norm),
            ("examples", examples as f64),
            ("seconds", seconds),
            ("tokens_per_s", tokens as f64 / seconds.max(1e-9)),
            ("examples_per_s", examples as f64 / seconds.max(1e-9)),
        ] {
            self.values.insert(k.to_string(), v);
        }
    }

    /// Records an evaluation: `eval/loss` and the evaluation's averaged metrics as `eval/...`.
    pub fn set_eval(&mut self, loss: f64, eval: &Row) {
        self.values.insert("eval/loss".into(), loss);
        for (k, v) in eval.averaged() {
            self.values.insert(format!("eval/{k}"), v);
        }
    }

    /// A value by name.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.get(name).copied()
    }

    /// The row as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        map.insert("step".into(), self.step.into());
        map.insert("epoch".into(), self.epoch.into());
        for (k, v) in &self.values {
            map.insert(k.clone(), serde_json::json!(v));
        }
        serde_json::Value::Object(map)
    }
}

/// Writes rows as `metrics.parquet`: `step`, `epoch`, then one nullable f64 column per metric.
pub fn write(path: &Path, rows: &[Row]) -> Result<()> {
    let names: BTreeSet<&String> = rows.iter().flat_map(|r| r.values.keys()).collect();
    let mut fields = vec![Field::new("step", DataType::Int64, false), Field::new("epoch", DataType::Int64, false)];
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(rows.iter().map(|r| r.step as i64).collect::<Int64Array>()),
        Arc::new(rows.iter().map(|r| r.epoch as i64).collect::<Int64Array>()),
    ];
    for name in names {
        fields.push(Field::new(name.as_str(), DataType::Float64, true));
        columns.push(Arc::new(rows.iter().map(|r| r.get(name)).collect::<Float64Array>()));
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    haloflow::io::write_parquet(path, &schema, &[batch], Default::default())
}
