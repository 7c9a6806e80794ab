//! `halo export`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use haloflow::export::{self, Format};
use haloflow::pipeline::StageKind;
use haloflow::runner::{Plan, Workspace};

use super::PipelineArgs;

/// Arguments of `halo export`.
#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pipeline: PipelineArgs,
    /// The output to export, as STAGE.OUTPUT (e.g. train.policy, judge.judgments).
    target: String,
    /// Where to write it (a file, or a directory for directory outputs).
    dest: PathBuf,
    /// copy, parquet, csv or jsonl (default: by DEST's extension, else copy).
    #[arg(long)]
    format: Option<Format>,
    /// Replace DEST if it exists.
    #[arg(long)]
    force: bool,
}

/// Exports one fresh output of the pipeline (with the last run's overrides unless `--set` is
/// given); a stale stage is refused with the reason, never exported from an older run.
pub fn export(args: &ExportArgs) -> Result<bool> {
    let (stage_name, output) = export::parse_target(&args.target)?;
    let workspace = Workspace::open(args.pipeline.load_as_last_run()?)?;
    let stage = workspace.pipeline.stage(&stage_name)?.clone();
    let fresh: BTreeMap<String, _> = workspace
        .analyze(&BTreeSet::new())
        .into_iter()
        .map(|(name, _, plan)| (name, plan))
        .collect();
    let entry = match &fresh[&stage.name] {
        Plan::Fresh(entry) => entry.clone(),
        Plan::Run(why) => bail!("stage `{}` is not up to date ({why}): run the pipeline first", stage.name),
        Plan::AfterUpstream(up) => bail!("stage `{}` is not up to date (upstream `{up}` is stale): run the pipeline first", stage.name),
    };
    let outputs: Vec<&str> = stage.outputs.iter().map(|(n, _)| n.as_str()).collect();
    let src = workspace
        .cache
        .output_path(&entry, &output)
        .with_context(|| format!("stage `{}` has no output `{output}` (outputs: {})", stage.name, outputs.join(", ")))?;
    export::check_dest(&args.dest, args.force)?;
    let dest = &args.dest;
    let format = args.format.unwrap_or_else(|| Format::from_dest(dest));
    if src.is_dir() {
        if format != Format::Copy {
            bail!("`{}` is a directory: it exports as a copy only (not {format:?})", args.target);
        }
        let mut extra = Vec::new();
        if matches!(&stage.kind, StageKind::Builtin(b) if b == "train") && output == "policy" {
            let summary = read_summary(&workspace, &fresh, &stage.name)?;
            let mut judges = BTreeMap::new();
            for judge in export::judges_of(&workspace.pipeline, &stage.name) {
                if matches!(fresh.get(&judge.name), Some(Plan::Fresh(_))) {
                    judges.insert(judge.name.clone(), read_summary(&workspace, &fresh, &judge.name)?);
                }
            }
            extra.push(("README.md", export::model_card(&workspace.pipeline, &stage, &summary, &judges)));
        }
        export::copy_dir(&src, dest, &extra)?;
    } else if format == Format::Copy {
        export::copy_file(&src, dest)?;
    } else {
        export::write_table(&src, dest, format)?;
    }
    println!("exported {} to {}", args.target, dest.display());
    Ok(true)
}

/// The summary.json output of a fresh stage.
fn read_summary(workspace: &Workspace, fresh: &BTreeMap<String, Plan>, stage: &str) -> Result<serde_json::Value> {
    let Some(Plan::Fresh(entry)) = fresh.get(stage) else { bail!("stage `{stage}` is not up to date") };
    let path = workspace.cache.output_path(entry, "summary").with_context(|| format!("stage `{stage}` has no summary output"))?;
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{}: not JSON", path.display()))
}
