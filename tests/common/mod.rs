//! Helpers for integration tests that run the real `halo` binary and stage binaries.
#![allow(dead_code)] // each test file uses a different subset

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use haloflow::manifest::{Manifest, Status};

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/data` beside the repository (see [`haloflow::shared::path`]).
pub fn shared_data() -> Option<PathBuf> {
    haloflow::shared::path("data")
}

/// Path of a binary built next to `halo` (the workspace's stage binaries).
pub fn binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_halo")).with_file_name(name);
    assert!(path.is_file(), "{} is not built: run `cargo build --release --workspace` first", path.display());
    path
}

/// A `halo` command with the project venv first on PATH (for Python plug-in stages).
pub fn halo(args: &[&str]) -> Command {
    for stage in ["halo-import", "halo-unpair", "halo-resample"] {
        binary(stage);
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_halo"));
    let venv = repo_root().join(".venv/bin");
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env("PATH", format!("{}:{path}", venv.display())).args(args);
    cmd
}

/// Runs `halo` and returns its output, printing it for failed tests.
pub fn run(args: &[&str]) -> Output {
    let out = halo(args).output().expect("halo runs");
    eprintln!("$ halo {}\n{}{}", args.join(" "), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

/// Runs `halo` and asserts it succeeded.
pub fn run_ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(out.status.success(), "halo {} failed", args.join(" "));
    out
}

/// The lock manifest of a pipeline in a work dir.
pub fn manifest(work: &Path, pipeline: &str) -> Manifest {
    Manifest::load_lock(work, pipeline).unwrap().expect("a manifest was written")
}

/// Names of the stages that have a given status in the latest manifest.
pub fn stages_with(work: &Path, pipeline: &str, status: Status) -> BTreeSet<String> {
    manifest(work, pipeline).stages.into_iter().filter(|s| s.status == status).map(|s| s.name).collect()
}

/// A set of stage names.
pub fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Stderr and stdout of an output as one string.
pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Stage names that have an entry in the cache of a work dir.
pub fn cached_stages(work: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    if let Ok(dir) = std::fs::read_dir(work.join("cache")) {
        for entry in dir.flatten() {
            if let Ok(bytes) = std::fs::read(entry.path().join("entry.json")) {
                let e: haloflow::cache::Entry = serde_json::from_slice(&bytes).unwrap();
                names.insert(e.stage);
            }
        }
    }
    names
}
