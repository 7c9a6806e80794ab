//! The shared reference material beside the repository (`../shared`: real preference data,
//! prompts, the stories260K model), for tests and benchmarks. A test that needs a file that
//! is missing is skipped with a visible message, or fails when `HALO_REQUIRE_SHARED=1` (as in
//! CI), so it never passes silently.

use std::path::PathBuf;

/// `../shared/RELATIVE` beside the repository, if present. When it is missing this prints
/// `SKIPPED: PATH is missing` and returns `None`, or panics when `HALO_REQUIRE_SHARED=1`.
pub fn path(relative: &str) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared").join(relative);
    if path.exists() {
        return Some(path.canonicalize().unwrap_or(path));
    }
    if std::env::var("HALO_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!("{} is missing and HALO_REQUIRE_SHARED=1", path.display());
    }
    eprintln!("SKIPPED: {} is missing", path.display());
    None
}
