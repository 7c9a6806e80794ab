//! Per-step training metrics and their Parquet file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use haloflow_ml::losses::{self, LossOutput};
use serde::{Deserialize, Serialize};

use crate::parallel::Ranks;

/// Token positions forward passes computed (policy and live reference, prompts shared or
/// not), named as in refcache's summary.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tokens {
    /// Tokens of the sequences scored, each counted whole (what separate passes would compute
    /// without padding): `tokens_computed`.
    pub tokens: usize,
    /// Positions computed without padding, each shared prompt once: `forward_tokens_computed`.
    pub forward: usize,
    /// Positions computed, padding included: `padded_tokens_computed`.
    pub padded: usize,
}

impl std::ops::Add for Tokens {
    type Output = Tokens;

    fn add(self, o: Tokens) -> Tokens {
        Tokens { tokens: self.tokens + o.tokens, forward: self.forward + o.forward, padded: self.padded + o.padded }
    }
}

impl Tokens {
    /// As a flat array, for collectives.
    pub fn to_array(self) -> [f64; 3] {
        [self.tokens as f64, self.forward as f64, self.padded as f64]
    }

    /// From [`Tokens::to_array`]'s layout.
    pub fn from_array(a: &[f64]) -> Tokens {
        Tokens { tokens: a[0].round() as usize, forward: a[1].round() as usize, padded: a[2].round() as usize }
    }

    /// The counts with refcache's names, and the fractions they imply: prompt tokens sharing
    /// saved (`prefix_sharing_saving = 1 − forward / tokens`) and padding computed
    /// (`padding_waste = 1 − forward / padded`).
    pub fn named(self) -> [(&'static str, f64); 5] {
        let ratio = |a: usize, b: usize| if b > 0 { 1.0 - a as f64 / b as f64 } else { 0.0 };
        [
            ("tokens_computed", self.tokens as f64),
            ("forward_tokens_computed", self.forward as f64),
            ("padded_tokens_computed", self.padded as f64),
            ("prefix_sharing_saving", ratio(self.forward, self.tokens)),
            ("padding_waste", ratio(self.forward, self.padded)),
        ]
    }

    /// The totals of training rows written by [`Row::finish`].
    pub fn total(rows: &[Row]) -> Tokens {
        let sum = |name: &str| rows.iter().filter_map(|r| r.get(name)).sum::<f64>().round() as usize;
        Tokens { tokens: sum("tokens_computed"), forward: sum("forward_tokens_computed"), padded: sum("padded_tokens_computed") }
    }
}

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

    /// Adds a microbatch's metrics, each weighted by the count its mean is over (class means
    /// by the class's completions), so that a step's value is the mean over all its
    /// completions, as TRL's trainers combine their `*_sum` and `count/*` metrics.
    pub fn add_microbatch(&mut self, out: &LossOutput) {
        for e in out.metrics.entries().into_iter().filter(|e| e.value.is_finite() && e.weight > 0.0) {
            let slot = self.pending.entry(e.name.to_string()).or_default();
            slot.0 += e.value * e.weight;
            slot.1 += e.weight;
        }
    }

    /// Replaces the pending microbatch sums with their totals over the ranks (a collective),
    /// so that every rank's row describes the step's whole batch.
    pub fn sum_over(&mut self, ranks: &Ranks) -> Result<()> {
        self.pending = ranks.merge_sums(&self.pending)?;
        Ok(())
    }

    /// The step's means of the added microbatches, and `rewards/margins` derived from the two
    /// class means; a metric no microbatch defined (a class absent from the whole step) is
    /// left out, as TRL logs no key for it.
    fn averaged(&self) -> Vec<(String, f64)> {
        let mean = |k: &str| self.pending.get(k).filter(|(_, w)| *w > 0.0).map(|(s, w)| s / w);
        let margins = losses::margin(mean("rewards/chosen"), mean("rewards/rejected"));
        let means = self.pending.keys().filter_map(|k| mean(k).map(|v| (k.clone(), v)));
        means.chain(margins.map(|m| ("rewards/margins".to_string(), m))).collect()
    }

    /// Completes a training step's row; `tokens_per_s` counts the positions the model computed
    /// without padding (shared prompts once).
    pub fn finish(&mut self, loss: f64, lr: f64, grad_norm: f64, examples: usize, tokens: Tokens, seconds: f64) {
        let averaged = self.averaged();
        self.values.extend(averaged);
        for (k, v) in [
            ("loss", loss),
            ("lr", lr),
            ("grad_norm", grad_norm),
            ("examples", examples as f64),
            ("seconds", seconds),
            ("tokens_per_s", tokens.forward as f64 / seconds.max(1e-9)),
            ("examples_per_s", examples as f64 / seconds.max(1e-9)),
        ]
        .into_iter()
        .chain(tokens.named())
        {
            self.values.insert(k.to_string(), v);
        }
    }

    /// Records an evaluation: `eval/loss` and the evaluation's averaged metrics as `eval/...`
    /// (TRL's `eval_` prefix).
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

/// Writes rows as `metrics.parquet`: `step`, `epoch`, then one nullable f64 column per metric;
/// the run's hyperparameters as a JSON object under [`HPARAMS_KEY`] in the file's metadata.
pub fn write(path: &Path, rows: &[Row], hparams: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
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
    let metadata = [(HPARAMS_KEY.to_string(), serde_json::Value::Object(hparams.clone()).to_string())].into();
    haloflow::io::write_parquet(path, &schema, &[batch], metadata)
}

/// Key of the run's hyperparameters (a JSON object) in the metadata of `metrics.parquet`.
pub const HPARAMS_KEY: &str = "haloflow.hparams";

/// Reads a `metrics.parquet` written by [`write`] back into rows (null cells are left out).
pub fn read(path: &Path) -> Result<Vec<Row>> {
    let table = haloflow::io::read_parquet(path)?;
    let mut rows = Vec::with_capacity(table.num_rows());
    for batch in &table.batches {
        let int = |name: &str| -> Result<&Int64Array> {
            let column = batch.column_by_name(name).with_context(|| format!("{}: no `{name}` column", path.display()))?;
            column.as_any().downcast_ref::<Int64Array>().with_context(|| format!("{}: column `{name}` is not int64", path.display()))
        };
        let (steps, epochs) = (int("step")?, int("epoch")?);
        let mut floats = Vec::new();
        for (field, column) in table.schema.fields().iter().zip(batch.columns()) {
            if !matches!(field.name().as_str(), "step" | "epoch") {
                let values = column.as_any().downcast_ref::<Float64Array>();
                floats.push((field.name(), values.with_context(|| format!("{}: column `{}` is not float64", path.display(), field.name()))?));
            }
        }
        for i in 0..batch.num_rows() {
            let mut row = Row::new(usize::try_from(steps.value(i))?, usize::try_from(epochs.value(i))?);
            row.values.extend(floats.iter().filter(|(_, c)| c.is_valid(i)).map(|(name, c)| (name.to_string(), c.value(i))));
            rows.push(row);
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use haloflow_ml::losses::Metrics;
    use tch::Tensor;

    use super::*;

    /// A microbatch of `chosen` desirable and `rejected` undesirable rows with the given class means.
    fn microbatch(chosen: usize, rejected: usize, rewards: (Option<f64>, Option<f64>), logps: (Option<f64>, Option<f64>)) -> LossOutput {
        let metrics = Metrics {
            rewards_chosen: rewards.0,
            rewards_rejected: rewards.1,
            logps_chosen: logps.0,
            logps_rejected: logps.1,
            chosen,
            rejected,
            examples: chosen + rejected,
            kl: Some(0.5),
            ..Metrics::default()
        };
        LossOutput { loss: Tensor::from(0.0), per_example: Tensor::zeros([0], tch::kind::FLOAT_CPU), count: chosen + rejected, metrics }
    }

    #[test]
    fn class_means_of_a_step_are_over_the_class_completions() {
        let mut row = Row::new(1, 0);
        // 1 desirable row of reward 1.0 and 3 undesirable ones; then 3 desirable of reward 0.0 and 1 undesirable.
        row.add_microbatch(&microbatch(1, 3, (Some(1.0), Some(-1.0)), (Some(-10.0), Some(-20.0))));
        row.add_microbatch(&microbatch(3, 1, (Some(0.0), Some(-3.0)), (Some(-30.0), Some(-40.0))));
        row.finish(0.7, 1e-4, 1.0, 8, Tokens { tokens: 100, forward: 80, padded: 100 }, 1.0);
        // TRL: sum over the class's completions / their count: (1·1 + 3·0)/4, not (4·1 + 4·0)/8.
        assert_eq!(row.get("rewards/chosen"), Some(0.25));
        assert_eq!(row.get("rewards/rejected"), Some(-1.5));
        assert_eq!(row.get("rewards/margins"), Some(1.75));
        assert_eq!(row.get("logps/chosen"), Some(-25.0));
        assert_eq!(row.get("logps/rejected"), Some(-25.0));
        assert_eq!(row.get("kl"), Some(0.5));
    }

    #[test]
    fn a_class_absent_from_a_step_has_no_value() {
        let mut row = Row::new(1, 0);
        row.add_microbatch(&microbatch(2, 0, (Some(0.3), None), (Some(-5.0), None)));
        row.add_microbatch(&microbatch(2, 0, (Some(0.1), None), (Some(-7.0), None)));
        row.finish(0.7, 1e-4, 1.0, 4, Tokens { tokens: 100, forward: 75, padded: 90 }, 1.0);
        assert!((row.get("rewards/chosen").unwrap() - 0.2).abs() < 1e-12);
        assert_eq!(row.get("logps/chosen"), Some(-6.0));
        // Like TRL (no key logged), not NaN and not 0: the Parquet column holds null.
        for name in ["rewards/rejected", "logps/rejected", "rewards/margins"] {
            assert_eq!(row.get(name), None, "{name}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.parquet");
        let mut other = Row::new(2, 0);
        other.add_microbatch(&microbatch(1, 1, (Some(0.0), Some(0.0)), (Some(-1.0), Some(-1.0))));
        other.finish(0.6, 1e-4, 1.0, 2, Tokens { tokens: 10, forward: 10, padded: 12 }, 1.0);
        let hparams: serde_json::Map<String, serde_json::Value> = serde_json::from_str(r#"{"loss": "kto", "beta": 0.1}"#).unwrap();
        write(&path, &[row, other], &hparams).unwrap();
        let back = read(&path).unwrap();
        let metadata = haloflow::io::read_parquet(&path).unwrap().schema.metadata()[HPARAMS_KEY].clone();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&metadata).unwrap(), serde_json::Value::Object(hparams));
        assert_eq!(back.iter().map(|r| r.get("logps/rejected")).collect::<Vec<_>>(), [None, Some(-1.0)]);
        assert_eq!(back.iter().map(|r| (r.step, r.epoch)).collect::<Vec<_>>(), [(1, 0), (2, 0)]);
        // Token accounting: per step, and totals over the steps read back.
        assert_eq!(back[0].get("tokens_per_s"), Some(75.0));
        assert_eq!(back[0].get("prefix_sharing_saving"), Some(0.25));
        let total = Tokens::total(&back);
        assert_eq!(total, Tokens { tokens: 110, forward: 85, padded: 102 });
        assert_eq!(total.named()[4], ("padding_waste", 1.0 - 85.0 / 102.0));
    }
}
