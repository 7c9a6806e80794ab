//! `halo gc`.

use anyhow::Result;
use haloflow::manifest::Manifest;
use haloflow::runner::{WorkLock, Workspace, STAGE_CACHE_DIR};

use super::PipelineArgs;

/// Deletes cache entries that no lock file in the work dir references, the scratch space kept
/// by interrupted resumable stages, and the stages' own caches (`STAGE_CACHE_DIR`).
pub fn gc(args: &PipelineArgs) -> Result<bool> {
    let pipeline = args.load()?;
    let _lock = WorkLock::acquire(&pipeline.work_dir)?;
    let workspace = Workspace::open(pipeline)?;
    workspace.cache.clean_temp()?;
    let scratch = workspace.pipeline.work_dir.join("scratch");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).map_err(|e| anyhow::anyhow!("removing {}: {e}", scratch.display()))?;
    }
    let stage_cache = workspace.pipeline.work_dir.join(STAGE_CACHE_DIR);
    if stage_cache.exists() {
        std::fs::remove_dir_all(&stage_cache).map_err(|e| anyhow::anyhow!("removing {}: {e}", stage_cache.display()))?;
        println!("removed {} (stages' own caches, e.g. judge answers)", stage_cache.display());
    }
    let keep = Manifest::referenced_keys(&workspace.pipeline.work_dir)?;
    let (mut removed, mut bytes) = (0, 0);
    for key in workspace.cache.keys()? {
        if !keep.contains(&key) {
            bytes += workspace.cache.entry_size(&key);
            workspace.cache.remove(&key)?;
            removed += 1;
        }
    }
    println!("removed {removed} cache entries ({:.1} MiB), kept {}", bytes as f64 / 1048576.0, keep.len());
    Ok(true)
}
