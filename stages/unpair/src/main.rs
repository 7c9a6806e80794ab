//! `halo-unpair`: paired → binary. See `halo-unpair --help`.

mod unpair;

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use haloflow::{io, records};

const EXAMPLE: &str = "Example:
  halo-unpair --pairs pairs.arrow --binary binary.arrow --summary summary.json --drop-conflicts true

Each pair gives one desirable row (the chosen reply) and one undesirable row (the rejected
reply) with the pair's prompt_id. Identical (prompt, completion) rows that carry both labels
are counted and reported; --drop-conflicts true removes them.";

/// Turn preference pairs into binary (desirable/undesirable) examples.
#[derive(Parser)]
#[command(name = "halo-unpair", version, after_help = EXAMPLE)]
struct Args {
    /// Input `paired` table (Arrow IPC or Parquet).
    #[arg(long)]
    pairs: PathBuf,
    /// Output `binary` table (Arrow IPC).
    #[arg(long)]
    binary: PathBuf,
    /// Output summary (JSON).
    #[arg(long)]
    summary: PathBuf,
    /// Drop every row of a (prompt, completion) that occurs with both labels.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    drop_conflicts: bool,
}

fn main() {
    haloflow::stage_cli::main(|| {
        let args = Args::parse();
        run(&args)
    });
}

fn run(args: &Args) -> Result<()> {
    let pairs = records::read_paired(&args.pairs)?;
    let (rows, summary) = unpair::unpair(&pairs, args.drop_conflicts)?;
    tracing::info!(
        pairs = summary.pairs,
        rows = summary.rows_written,
        conflicting_groups = summary.conflicting_groups,
        dropped = summary.rows_dropped,
        "unpaired"
    );
    if summary.conflicting_groups > 0 && !args.drop_conflicts {
        tracing::warn!(
            "{} (prompt, completion) groups carry both labels ({} rows); pass --drop-conflicts true to drop them",
            summary.conflicting_groups,
            summary.rows_in_conflicts
        );
    }
    let batch = records::binary_batch(&rows)?;
    io::write_arrow(&args.binary, &batch.schema(), &[batch], HashMap::new())?;
    io::write_json(&args.summary, &summary)
}
