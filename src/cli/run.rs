//! `halo run`.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use clap::Args;
use haloflow::manifest::Status;
use haloflow::runner::{Plan, RunOptions, WorkLock, Workspace};

use super::PipelineArgs;

/// Arguments of `halo run`.
#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// Run only this stage (repeatable); its inputs must be up to date.
    #[arg(long, value_name = "STAGE")]
    only: Vec<String>,
    /// Rerun this stage and everything downstream of it (repeatable).
    #[arg(long, value_name = "STAGE")]
    from: Vec<String>,
    /// Rerun this stage even if it is cached (repeatable).
    #[arg(long, value_name = "STAGE")]
    force: Vec<String>,
    /// Where the stages run: `local` (this machine) or `slurm` (one Slurm job per stage, via
    /// srun); overrides `[pipeline] executor`.
    #[arg(long, value_name = "local|slurm")]
    executor: Option<String>,
    /// Say what would run and why, without running anything.
    #[arg(long)]
    dry_run: bool,
    /// Execute at most N stages at once (default: all whose inputs are ready).
    #[arg(short, long, value_name = "N")]
    jobs: Option<usize>,
    /// Keep this run: its manifest is saved as WORK_DIR/PIPELINE@NAME.lock.json, and `halo gc`
    /// keeps every cache entry it references (DVC-experiment style).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
}

/// Runs the pipeline; returns whether every stage succeeded.
pub fn run(args: &RunArgs) -> Result<bool> {
    let mut pipeline = args.pipeline.load()?;
    if let Some(executor) = &args.executor {
        pipeline.executor = executor.parse().context("--executor")?;
    }
    let options = RunOptions { only: args.only.clone(), from: args.from.clone(), force: args.force.clone(), jobs: args.jobs };
    if let Some(name) = &args.name {
        haloflow::pipeline::check_name("run", name)?;
    }
    if args.dry_run {
        let workspace = Workspace::open(pipeline)?;
        workspace.check_params()?;
        return dry_run(workspace, &options);
    }
    let _lock = WorkLock::acquire(&pipeline.work_dir)?;
    let workspace_dir = pipeline.work_dir.clone();
    let lock_file = haloflow::manifest::Manifest::lock_path(&pipeline.work_dir, &pipeline.name);
    let workspace = Workspace::open(pipeline)?;
    workspace.check_params()?;
    workspace.cache.clean_temp()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let manifest = runtime.block_on(workspace.run(&options))?;
    print!("{}", haloflow::progress::table(&manifest.stages));
    for failed in manifest.stages.iter().filter(|s| matches!(s.status, Status::Failed)) {
        eprintln!("\nerror: stage `{}`: {}", failed.name, failed.reason.as_deref().unwrap_or("failed"));
    }
    if let Some(name) = &args.name {
        let kept = manifest.keep_as(&workspace_dir, name)?;
        println!("kept as {}", kept.display());
    }
    let ran = manifest.stages.iter().filter(|s| s.status == Status::Ran).count();
    println!("{ran} ran, manifest {}", lock_file.display());
    Ok(manifest.ok)
}

fn dry_run(workspace: Workspace, options: &RunOptions) -> Result<bool> {
    let mut forced: BTreeSet<String> = workspace.pipeline.with_descendants(&options.from)?;
    forced.extend(options.force.iter().cloned());
    for (name, _, plan) in workspace.analyze(&forced) {
        if !options.only.is_empty() && !options.only.contains(&name) {
            continue;
        }
        match plan {
            Plan::Fresh(_) => println!("cached     {name}"),
            Plan::Run(why) => println!("would run  {name}: {why}"),
            Plan::AfterUpstream(up) => println!("would run  {name}: if upstream `{up}` changes its outputs"),
        }
    }
    Ok(true)
}
