//! pipelines/ci-ranks.toml (ci-tiny with refcache, train and sampling on `ranks` processes):
//! 2 ranks × 1 microbatch train to the same metrics as 1 rank × 2 microbatches within 1e-5,
//! and write the same reference log-probs and samples.

mod common;

use std::path::Path;

use arrow_array::{Array, Float64Array};
use common::*;
use haloflow::manifest::Manifest;

fn run_ci_ranks(work: &Path, data: &Path, ranks: usize) -> Manifest {
    let pipeline = repo_root().join("pipelines/ci-ranks.toml");
    let tokenizer = haloflow::shared::path("models/stories260K").expect("checked by the caller");
    run_ok(&[
        "run",
        pipeline.to_str().unwrap(),
        "--work-dir",
        work.to_str().unwrap(),
        "--set",
        &format!("data={}", data.display()),
        "--set",
        &format!("tokenizer={}", tokenizer.display()),
        "--set",
        &format!("ranks={ranks}"),
        "--set",
        &format!("grad_accum={}", 2 / ranks),
    ]);
    manifest(work, "ci-ranks")
}

/// The float columns of a metrics table that measure training (not speed), by name.
fn training_metrics(path: &Path) -> Vec<(String, Vec<Option<f64>>)> {
    let table = haloflow::io::read_table(path).unwrap();
    let mut columns = Vec::new();
    for (i, field) in table.schema.fields().iter().enumerate() {
        // Timing, and the token accounting: what was computed depends on the split (a rank with
        // one microbatch fuses KTO's KL pass into its prompt pass), what was learnt does not.
        let name = field.name();
        if name.contains("per_s") || name.contains("seconds") || name.contains("tokens_computed") || name == "prefix_sharing_saving" || name == "padding_waste" {
            continue;
        }
        let mut values = Vec::new();
        for batch in &table.batches {
            if let Some(col) = batch.column(i).as_any().downcast_ref::<Float64Array>() {
                values.extend((0..col.len()).map(|r| col.is_valid(r).then(|| col.value(r))));
            }
        }
        if !values.is_empty() {
            columns.push((field.name().clone(), values));
        }
    }
    columns
}

#[test]
fn two_ranks_train_to_the_metrics_of_one() {
    let Some(data) = shared_data() else { return };
    if haloflow::shared::path("models/stories260K").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let two = run_ci_ranks(&tmp.path().join("two"), &data, 2);
    let one = run_ci_ranks(&tmp.path().join("one"), &data, 1);

    for (stage, output) in [("refcache", "logps"), ("sample_init", "samples")] {
        assert_eq!(two.stage(stage).unwrap().outputs[output].hash, one.stage(stage).unwrap().outputs[output].hash, "{stage}.{output}");
    }
    let two_train = two.stage("train").unwrap();
    assert!(two_train.outputs["metrics"].path.parent().unwrap().join("stage.rank1.log").is_file(), "train ran on 2 ranks");
    let (a, b) = (training_metrics(&two_train.outputs["metrics"].path), training_metrics(&one.stage("train").unwrap().outputs["metrics"].path));
    assert_eq!(a.iter().map(|c| &c.0).collect::<Vec<_>>(), b.iter().map(|c| &c.0).collect::<Vec<_>>());
    assert!(a.iter().any(|(name, _)| name == "loss") && a.iter().any(|(name, _)| name == "grad_norm"));
    let mut compared = 0;
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(x.len(), y.len(), "{name}: steps");
        for (step, (x, y)) in x.iter().zip(y).enumerate() {
            match (x, y) {
                (Some(x), Some(y)) => {
                    assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{name} at row {step}: 2 ranks {x}, 1 rank {y}");
                    compared += 1;
                }
                (None, None) => {}
                _ => panic!("{name} at row {step}: 2 ranks {x:?}, 1 rank {y:?}"),
            }
        }
    }
    assert!(compared > 100, "only {compared} values compared");
}
