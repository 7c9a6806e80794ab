//! The stage from end to end: read, subsample, weigh, plan, write.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use haloflow::schema::plan_meta;
use haloflow::{io, records};

use crate::batch_plan::{self, BatchPlan, PlanOptions};
use crate::cli::Args;
use crate::lambda::{self, Lambdas};
use crate::rng::Rng;
use crate::subset;
use crate::summary::{ClassCounts, Summary};

/// Runs the stage: writes the plan and the summary, or nothing at all on error.
pub fn run(args: &Args) -> Result<Summary> {
    subset::check_fraction("--desirable-fraction", args.desirable_fraction)?;
    subset::check_fraction("--undesirable-fraction", args.undesirable_fraction)?;
    batch_plan::check_microbatch_size(args.microbatch_size)?;

    let rows = records::read_binary(&args.data)
        .with_context(|| format!("reading --data {}", args.data.display()))?;
    if rows.is_empty() {
        bail!("{}: the input has no rows; KTO needs desirable and undesirable examples", args.data.display());
    }
    let (desirable, undesirable) = subset::split_by_label(rows);
    let input_rows = ClassCounts { desirable: desirable.len(), undesirable: undesirable.len() };
    let desirable = subset::keep_fraction(
        desirable,
        args.desirable_fraction,
        &mut Rng::stream(args.seed, "subset/desirable"),
    );
    let undesirable = subset::keep_fraction(
        undesirable,
        args.undesirable_fraction,
        &mut Rng::stream(args.seed, "subset/undesirable"),
    );
    let kept_rows = ClassCounts { desirable: desirable.len(), undesirable: undesirable.len() };
    if kept_rows.desirable == 0 || kept_rows.undesirable == 0 {
        bail!(
            "{}: KTO needs both classes, but {} desirable and {} undesirable rows remain \
             (input {} desirable at --desirable-fraction {}, {} undesirable at --undesirable-fraction {})",
            args.data.display(),
            kept_rows.desirable,
            kept_rows.undesirable,
            input_rows.desirable,
            args.desirable_fraction,
            input_rows.undesirable,
            args.undesirable_fraction,
        );
    }

    let lambdas = lambda::choose(kept_rows.desirable, kept_rows.undesirable, args.lambda_d, args.lambda_u)?;
    if let Some(warning) = &lambdas.warning {
        tracing::warn!("{warning}");
    }
    let options =
        PlanOptions { microbatch_size: args.microbatch_size, drop_last: args.drop_last, seed: args.seed };
    let plan = batch_plan::build(desirable, undesirable, &options)?;
    let summary = summarize(args, input_rows, kept_rows, &lambdas, &plan);
    write_outputs(args, &plan, &lambdas)?;
    io::write_json(&args.summary, &summary).inspect_err(|_| {
        // Keep the outputs all-or-nothing: a plan without its summary is not a result.
        let _ = std::fs::remove_file(&args.plan);
    })?;
    summary.log();
    Ok(summary)
}

/// Collects the summary of a run.
fn summarize(
    args: &Args,
    input_rows: ClassCounts,
    kept_rows: ClassCounts,
    lambdas: &Lambdas,
    plan: &BatchPlan,
) -> Summary {
    let planned_d: usize = plan.desirable_per_batch.iter().sum();
    Summary {
        input_rows,
        desirable_fraction: args.desirable_fraction,
        undesirable_fraction: args.undesirable_fraction,
        kept_rows,
        lambda_d: lambdas.lambda_d,
        lambda_u: lambdas.lambda_u,
        lambda_automatic: lambdas.automatic,
        weighted_ratio: lambdas.ratio,
        microbatch_size: args.microbatch_size,
        drop_last: args.drop_last,
        batches: plan.desirable_per_batch.len(),
        planned_rows: ClassCounts { desirable: planned_d, undesirable: plan.rows.len() - planned_d },
        dropped_rows: plan.dropped_desirable + plan.dropped_undesirable,
        desirable_per_batch_min: plan.desirable_per_batch.iter().copied().min().unwrap_or(0),
        desirable_per_batch_max: plan.desirable_per_batch.iter().copied().max().unwrap_or(0),
        matched_kl_pairs: plan.matched_kl_pairs,
        seed: args.seed,
        warnings: lambdas.warning.iter().cloned().collect(),
    }
}

/// Writes the plan table with λ_D, λ_U, the microbatch size and the seed in its schema metadata.
fn write_outputs(args: &Args, plan: &BatchPlan, lambdas: &Lambdas) -> Result<()> {
    let batch = records::plan_batch(&plan.rows).context("building the plan table")?;
    let metadata = HashMap::from([
        (plan_meta::LAMBDA_D.to_string(), lambdas.lambda_d.to_string()),
        (plan_meta::LAMBDA_U.to_string(), lambdas.lambda_u.to_string()),
        (plan_meta::MICROBATCH_SIZE.to_string(), args.microbatch_size.to_string()),
        (plan_meta::SEED.to_string(), args.seed.to_string()),
    ]);
    io::write_arrow(&args.plan, &batch.schema(), &[batch], metadata)
        .with_context(|| format!("writing --plan {}", args.plan.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rows::row;
    use clap::Parser;
    use haloflow::records::BinaryRow;
    use haloflow::schema;
    use std::path::Path;

    /// Writes `rows` as a `binary` Arrow file.
    fn write_binary(path: &Path, rows: &[BinaryRow]) {
        let batch = records::binary_batch(rows).unwrap();
        io::write_arrow(path, &batch.schema(), &[batch], HashMap::new()).unwrap();
    }

    /// `n` preference pairs unpaired: prompt i has desirable `e{i}` and undesirable `e{n+i}`.
    fn unpaired(n: usize) -> Vec<BinaryRow> {
        (0..n).flat_map(|i| [row(i, i, true), row(n + i, i, false)]).collect()
    }

    fn args(dir: &Path, extra: &[&str]) -> Args {
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let mut argv: Vec<String> = ["halo-resample", "--data"].map(String::from).to_vec();
        argv.extend([
            path("in.arrow"),
            "--plan".into(),
            path("plan.arrow"),
            "--summary".into(),
            path("summary.json"),
        ]);
        argv.extend(extra.iter().map(|s| s.to_string()));
        Args::try_parse_from(argv).unwrap()
    }

    fn outputs(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names.retain(|n| n != "in.arrow");
        names
    }

    #[test]
    fn end_to_end_plan_metadata_and_summary() {
        let dir = tempfile::tempdir().unwrap();
        write_binary(&dir.path().join("in.arrow"), &unpaired(100));
        let a = args(dir.path(), &["--desirable-fraction", "0.1", "--microbatch-size", "4", "--seed", "3"]);
        let summary = run(&a).unwrap();

        let plan = records::read_plan(&a.plan).unwrap();
        schema::validate_file(&schema::by_name(schema::PLAN).unwrap(), &a.plan).unwrap();
        // 10 desirable + 100 undesirable kept; 110 rows in batches of 4: 27 batches, 2 dropped.
        assert_eq!(plan.len(), 108);
        assert_eq!(plan.last().unwrap().batch, 26);
        assert!(plan.windows(2).all(|w| w[1].batch == w[0].batch || w[1].batch == w[0].batch + 1));
        let completions: HashMap<_, _> =
            plan.iter().map(|r| (r.example.example_id.clone(), r.example.completion.clone())).collect();
        for r in &plan {
            assert_eq!(completions[&r.kl_example_id], r.kl_completion);
            assert_ne!(r.kl_example_id, r.example.example_id);
        }

        let table = io::read_arrow(&a.plan).unwrap();
        assert_eq!(table.metadata(plan_meta::LAMBDA_D), Some("10"));
        assert_eq!(table.metadata(plan_meta::LAMBDA_U), Some("1"));
        assert_eq!(table.metadata(plan_meta::MICROBATCH_SIZE), Some("4"));
        assert_eq!(table.metadata(plan_meta::SEED), Some("3"));

        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&a.summary).unwrap()).unwrap();
        assert_eq!(json["input_rows"], serde_json::json!({"desirable": 100, "undesirable": 100}));
        assert_eq!(json["kept_rows"], serde_json::json!({"desirable": 10, "undesirable": 100}));
        assert_eq!((json["lambda_d"].as_f64(), json["lambda_automatic"].as_bool()), (Some(10.0), Some(true)));
        assert_eq!((json["batches"].as_u64(), json["dropped_rows"].as_u64()), (Some(27), Some(2)));
        assert_eq!(json["matched_kl_pairs"].as_u64(), Some(summary.matched_kl_pairs as u64));
        assert!(json["warnings"].as_array().unwrap().is_empty());
        assert_eq!(outputs(dir.path()), ["plan.arrow", "summary.json"]);
    }

    #[test]
    fn same_seed_gives_byte_identical_outputs() {
        let dir = tempfile::tempdir().unwrap();
        write_binary(&dir.path().join("in.arrow"), &unpaired(40));
        let read = |seed: &str| {
            run(&args(dir.path(), &["--undesirable-fraction", "0.5", "--seed", seed])).unwrap();
            (
                std::fs::read(dir.path().join("plan.arrow")).unwrap(),
                std::fs::read(dir.path().join("summary.json")).unwrap(),
            )
        };
        let first = read("1");
        assert_eq!(first, read("1"));
        assert_ne!(first.0, read("2").0);
    }

    #[test]
    fn given_lambda_outside_eq8_is_kept_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        write_binary(&dir.path().join("in.arrow"), &unpaired(40));
        let summary = run(&args(dir.path(), &["--desirable-fraction", "0.5", "--lambda-d", "1"])).unwrap();
        assert_eq!((summary.lambda_d, summary.lambda_u, summary.lambda_automatic), (1.0, 1.0, false));
        assert_eq!(summary.warnings.len(), 1);
        assert_eq!(
            io::read_arrow(&dir.path().join("plan.arrow")).unwrap().metadata(plan_meta::LAMBDA_D),
            Some("1")
        );
    }

    #[test]
    fn errors_name_the_problem_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let err = |extra: &[&str]| format!("{:#}", run(&args(dir.path(), extra)).unwrap_err());

        let e = err(&[]);
        assert!(e.contains("--data") && e.contains("in.arrow"), "{e}");

        write_binary(&dir.path().join("in.arrow"), &[]);
        let e = err(&[]);
        assert!(e.contains("in.arrow") && e.contains("no rows"), "{e}");

        let only_desirable: Vec<_> = (0..10).map(|i| row(i, i, true)).collect();
        write_binary(&dir.path().join("in.arrow"), &only_desirable);
        let e = err(&[]);
        assert!(e.contains("both classes") && e.contains("10 desirable and 0 undesirable"), "{e}");

        write_binary(&dir.path().join("in.arrow"), &unpaired(10));
        let e = err(&["--desirable-fraction", "0.01"]);
        assert!(e.contains("0 desirable and 10 undesirable"), "{e}");
        let e = err(&["--undesirable-fraction", "1.5"]);
        assert!(e.contains("--undesirable-fraction") && e.contains("1.5"), "{e}");
        let e = err(&["--microbatch-size", "1"]);
        assert!(e.contains("--microbatch-size") && e.contains("m ≥ 2"), "{e}");
        let e = err(&["--lambda-u", "0"]);
        assert!(e.contains("--lambda-u"), "{e}");
        let e = err(&["--microbatch-size", "64"]);
        assert!(e.contains("only 20 rows"), "{e}");

        assert!(outputs(dir.path()).is_empty(), "{:?}", outputs(dir.path()));
    }
}
