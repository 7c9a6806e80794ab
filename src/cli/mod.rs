//! Command-line interface of `halo`: one module per subcommand.

mod dag;
mod export;
mod gc;
mod run;
mod runs;
mod status;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use haloflow::pipeline::Pipeline;

const EXAMPLES: &str = "Examples:
  halo run pipelines/example.toml                 run what is stale, reuse the rest
  halo run pipelines/example.toml --dry-run       say what would run and why
  halo run pipelines/example.toml --set seed=3    override a [vars] value
  halo run pipelines/example.toml --force unpair  rerun one stage (and what its new output changes)
  halo run pipelines/ci-sweep.toml -j 2           a sweep (matrix), two stages at a time
  halo runs pipelines/ci-sweep.toml               one row per sweep point: params, losses, win rates
  halo status pipelines/example.toml              fresh/stale per stage
  halo export pipelines/quickstart.toml train.policy out/policy   the trained model, with a model card
  halo export pipelines/quickstart.toml judge.judgments out/j.parquet
  halo dag pipelines/example.toml --dot | dot -Tsvg > dag.svg";

/// Align language models with human-aware losses: run cached pipelines of stages.
#[derive(Parser)]
#[command(name = "halo", version, after_help = EXAMPLES)]
struct Cli {
    /// Log more (debug level); RUST_LOG overrides.
    #[arg(short, long, global = true)]
    verbose: bool,
    /// Where the built-in stages' binaries (halo-NAME) are looked for first; then the directory
    /// of `halo` itself, then PATH.
    #[arg(long, global = true, env = "HALO_BIN_DIR", value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline: execute stale stages, reuse cached ones.
    Run(run::RunArgs),
    /// Show whether each stage is fresh or stale, and why.
    Status(PipelineArgs),
    /// Print the stage graph (text, or Graphviz DOT with --dot).
    Dag(dag::DagArgs),
    /// Delete cache entries that no lock file references.
    Gc(PipelineArgs),
    /// Rehash every cache entry; report and remove corrupt ones.
    Verify(PipelineArgs),
    /// Print the Arrow schemas stages exchange (the plug-in contract).
    Schema,
    /// One row per sweep point (`matrix`) of the last run: params, final losses, win rates.
    Runs(runs::RunsArgs),
    /// Copy a stage output out of the cache to a stable path (tables as Parquet, CSV or JSON
    /// lines; a trained policy with a model card).
    Export(export::ExportArgs),
}

/// Arguments shared by commands that open a pipeline.
#[derive(Args, Clone)]
pub struct PipelineArgs {
    /// The pipeline TOML file.
    pub pipeline: PathBuf,
    /// Override a [vars] value (NAME=VALUE, repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub set: Vec<String>,
    /// Work dir for cache and manifests (default: [pipeline].work_dir, or .halo beside the file).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

impl PipelineArgs {
    /// Loads the pipeline with overrides applied.
    pub fn load(&self) -> anyhow::Result<Pipeline> {
        let mut pipeline = Pipeline::load(&self.pipeline, &self.set)?;
        if let Some(dir) = &self.work_dir {
            pipeline.work_dir = std::path::absolute(dir)?;
        }
        Ok(pipeline)
    }

    /// Loads the pipeline; without `--set`, with the overrides of its last run (said on
    /// stdout), so what is reported agrees with what `halo run` ran.
    pub fn load_as_last_run(&self) -> anyhow::Result<Pipeline> {
        let pipeline = self.load()?;
        if !self.set.is_empty() {
            return Ok(pipeline);
        }
        let last = haloflow::manifest::Manifest::load_lock(&pipeline.work_dir, &pipeline.name)?.map(|m| m.overrides).unwrap_or_default();
        if last.is_empty() {
            return Ok(pipeline);
        }
        let flags: Vec<String> = last.iter().map(|o| format!("--set {o}")).collect();
        println!("with the last run's overrides: {} (give --set to ask about others)", flags.join(" "));
        PipelineArgs { set: last, ..self.clone() }.load()
    }
}

/// Parses arguments, runs the subcommand and maps errors to exit status 1 (2 for usage).
pub fn main() -> ExitCode {
    haloflow::stage_cli::restore_sigpipe();
    let cli = Cli::parse();
    if let Some(dir) = &cli.bin_dir {
        // The runner reads HALO_BIN_DIR; set before any thread starts.
        std::env::set_var("HALO_BIN_DIR", dir);
    }
    haloflow::stage_cli::init_logging(cli.verbose);
    let result = match &cli.command {
        Command::Run(args) => run::run(args),
        Command::Status(args) => status::status(args),
        Command::Dag(args) => dag::dag(args),
        Command::Gc(args) => gc::gc(args),
        Command::Verify(args) => verify::verify(args),
        Command::Export(args) => export::export(args),
        Command::Runs(args) => runs::runs(args),
        Command::Schema => {
            print!("{}", haloflow::schema::markdown());
            Ok(true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
