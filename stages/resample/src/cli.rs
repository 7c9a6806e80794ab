//! Command-line arguments of `halo-resample`, as the pipeline runner passes them
//! (`--name value` for every input, output and param).

use std::path::PathBuf;

use clap::Parser;

const EXAMPLE: &str = "\
Example:
  halo-resample --data binary.arrow --plan plan.arrow --summary summary.json \\
      --desirable-fraction 0.1 --microbatch-size 8 --seed 0

  Keeps a seeded 10% of the desirable rows and all undesirable ones. With neither --lambda-d nor
  --lambda-u given, the weights follow the KTO paper's Eq. 8 (λ_D·n_D / (λ_U·n_U) in [1, 4/3],
  one of them 1): on 1:1 data this gives λ_D = 10, λ_U = 1. The plan lists the kept rows in
  microbatches of 8 holding both classes in proportion; row i of a microbatch takes the
  completion of row (i+1) mod 8 as its KL partner. λ_D, λ_U, the microbatch size and the seed
  are stored in the plan's schema metadata; summary.json reports counts and the choices made.

  In a pipeline: uses = \"resample\", inputs = { data = \"unpair.binary\" },
  params = { desirable_fraction = 0.1, microbatch_size = 8, seed = 0, drop_last = true }";

/// Subsample each class, set λ_D/λ_U and write the stratified KTO batch plan.
#[derive(Debug, Clone, Parser)]
#[command(name = "halo-resample", version, after_help = EXAMPLE)]
pub struct Args {
    /// Input table of the `binary` schema (Arrow IPC, or Parquet by extension).
    #[arg(long, value_name = "IN.arrow")]
    pub data: PathBuf,
    /// Output batch plan (`plan` schema, Arrow IPC).
    #[arg(long, value_name = "OUT.arrow")]
    pub plan: PathBuf,
    /// Output summary (JSON).
    #[arg(long, value_name = "OUT.json")]
    pub summary: PathBuf,
    /// Share of the desirable rows to keep, in (0, 1]: round(F·n) rows, chosen by the seed.
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    pub desirable_fraction: f64,
    /// Share of the undesirable rows to keep, in (0, 1].
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    pub undesirable_fraction: f64,
    /// λ_D, weight of desirable rows (default: Eq. 8 when λ_U is not given either, else 1).
    #[arg(long, value_name = "X")]
    pub lambda_d: Option<f64>,
    /// λ_U, weight of undesirable rows (default: Eq. 8 when λ_D is not given either, else 1).
    #[arg(long, value_name = "X")]
    pub lambda_u: Option<f64>,
    /// Rows per microbatch, at least 2 (KTO's mismatched KL pair).
    #[arg(long, value_name = "M", default_value_t = 8)]
    pub microbatch_size: usize,
    /// Seed of the subset and of every shuffle; the same seed gives a byte-identical plan.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Drop a final microbatch of fewer than M rows (a final batch of 1 row is always dropped).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub drop_last: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn parses_runner_style_arguments_with_defaults() {
        let args = Args::try_parse_from([
            "halo-resample",
            "--data",
            "in.arrow",
            "--plan",
            "p.arrow",
            "--summary",
            "s.json",
        ])
        .unwrap();
        assert_eq!((args.desirable_fraction, args.undesirable_fraction), (1.0, 1.0));
        assert_eq!((args.microbatch_size, args.seed, args.drop_last), (8, 0, true));
        assert_eq!((args.lambda_d, args.lambda_u), (None, None));
        let args = Args::try_parse_from([
            "halo-resample",
            "--data",
            "in.arrow",
            "--plan",
            "p.arrow",
            "--summary",
            "s.json",
            "--desirable-fraction",
            "0.1",
            "--lambda-u",
            "1.5",
            "--microbatch-size",
            "4",
            "--seed",
            "7",
            "--drop-last",
            "false",
        ])
        .unwrap();
        assert_eq!((args.desirable_fraction, args.lambda_u, args.drop_last), (0.1, Some(1.5), false));
        assert_eq!((args.microbatch_size, args.seed), (4, 7));
    }

    #[test]
    fn help_shows_an_example() {
        Args::command().debug_assert();
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("Example:") && help.contains("--desirable-fraction 0.1"), "{help}");
    }
}
