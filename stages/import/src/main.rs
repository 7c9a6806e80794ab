//! `halo-import`: the `import` stage. Converts Anthropic HH-RLHF, Open-Assistant trees,
//! TRL-style JSONL/Parquet and MT-Bench question files into a haloflow table (`paired`,
//! `binary` or `prompts`) and writes a JSON summary of what was read, written and skipped.

mod format;
mod hh_rlhf;
mod mt_bench;
mod oasst;
mod output;
mod source;
#[cfg(test)]
mod test_util;
mod trl;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;
use haloflow::records::{binary_batch, paired_batch};

use crate::format::{Format, Kind};
use crate::output::Job;

const EXAMPLES: &str = "\
Examples:
  halo-import --source helpful-base-test.jsonl.gz --data pairs.arrow --summary summary.json
  halo-import --source en_100_tree.jsonl --format oasst --data pairs.arrow --summary summary.json
  halo-import --source kto.parquet --kind binary --data binary.arrow --summary summary.json --limit 1000
  halo-import --source mt_bench_question.jsonl --kind prompts --data prompts.arrow --summary summary.json

Formats: hh-rlhf and oasst give paired rows; trl gives paired (prompt/chosen/rejected) or
binary (prompt/completion/label[/weight]) rows; mt-bench gives prompts.";

/// Import preference data or prompts into a haloflow Arrow table.
#[derive(Debug, Parser)]
#[command(name = "halo-import", version, after_help = EXAMPLES)]
struct Args {
    /// Input file: JSONL (gzip detected by its magic bytes) or Parquet.
    #[arg(long)]
    source: PathBuf,
    /// Output table (Arrow IPC file), written atomically.
    #[arg(long)]
    data: PathBuf,
    /// Output summary (JSON): rows read and written, skip reasons with counts, format.
    #[arg(long)]
    summary: PathBuf,
    /// Input format; `auto` detects it from the first record.
    #[arg(long, value_enum, default_value_t = Format::Auto)]
    format: Format,
    /// Schema of the output table.
    #[arg(long, value_enum, default_value_t = Kind::Paired)]
    kind: Kind,
    /// Keep only the first N output rows.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

fn main() {
    haloflow::stage_cli::main(|| run(Args::parse()));
}

fn run(args: Args) -> Result<()> {
    let (format, detected) = args.format.resolve(&args.source)?;
    let job = Job {
        source: &args.source,
        data: &args.data,
        summary: &args.summary,
        format,
        detected,
        kind: args.kind,
        limit: args.limit,
    };
    let (path, limit) = (job.source, job.limit);
    match (format, args.kind) {
        (Format::HhRlhf, Kind::Paired) => output::write(hh_rlhf::import(path, limit)?, paired_batch, &job),
        (Format::Oasst, Kind::Paired) => output::write(oasst::import(path, limit)?, paired_batch, &job),
        (Format::Trl, Kind::Paired) => output::write(trl::import_paired(path, limit)?, paired_batch, &job),
        (Format::Trl, Kind::Binary) => output::write(trl::import_binary(path, limit)?, binary_batch, &job),
        (Format::MtBench, Kind::Prompts) => {
            output::write(mt_bench::import(path, limit)?, mt_bench::prompts_batch, &job)
        }
        (format, kind) => bail!(
            "{}format {} cannot produce kind {}: hh-rlhf and oasst give --kind paired, \
             trl gives --kind paired or binary, mt-bench gives --kind prompts",
            if detected { format!("{}: detected ", path.display()) } else { String::new() },
            format.name(),
            kind.schema()
        ),
    }
}
