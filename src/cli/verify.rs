//! `halo verify`.

use anyhow::Result;
use haloflow::cache::Lookup;
use haloflow::runner::{WorkLock, Workspace};

use super::PipelineArgs;

/// Rehashes every cache entry; corrupt ones are reported and removed so the next run rebuilds
/// them. Returns false (exit status 1) if any was corrupt.
pub fn verify(args: &PipelineArgs) -> Result<bool> {
    let pipeline = args.load()?;
    let _lock = WorkLock::acquire(&pipeline.work_dir)?;
    let workspace = Workspace::open(pipeline)?;
    let (mut ok, mut bad) = (0, 0);
    for key in workspace.cache.keys()? {
        match workspace.cache.lookup(&key, true) {
            Lookup::Valid(_) => ok += 1,
            Lookup::Missing => {}
            Lookup::Corrupt(why) => {
                bad += 1;
                println!("corrupt {key}: {why}; removed, the next run rebuilds it");
                workspace.cache.remove(&key)?;
            }
        }
    }
    println!("{ok} entries intact, {bad} corrupt");
    Ok(bad == 0)
}
