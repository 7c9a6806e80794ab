//! `halo status`.

use std::collections::BTreeSet;

use anyhow::Result;
use haloflow::runner::{Plan, Workspace};

use super::PipelineArgs;

/// Prints fresh/stale per stage with the reason and, for fresh stages, output paths. Without
/// `--set`, the overrides of the last run apply, so the answer agrees with what it ran.
pub fn status(args: &PipelineArgs) -> Result<bool> {
    let workspace = Workspace::open(args.load_as_last_run()?)?;
    for (name, _, plan) in workspace.analyze(&BTreeSet::new()) {
        match plan {
            Plan::Fresh(entry) => {
                println!("fresh  {name}");
                for output in entry.outputs.keys() {
                    let path = workspace.cache.output_path(&entry, output).expect("output of its own entry");
                    println!("         {output}: {}", path.display());
                }
            }
            Plan::Run(why) => println!("stale  {name}: {why}"),
            Plan::AfterUpstream(up) => println!("stale  {name}: upstream `{up}` is stale"),
        }
    }
    Ok(true)
}
