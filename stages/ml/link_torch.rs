//! Build script shared by every binary that links libtorch (`build = "../ml/link_torch.rs"`):
//! links libtorch with `--no-as-needed` (otherwise the CUDA part is dropped and CUDA is never
//! seen) and records an rpath to torch's `lib/`, so binaries run without `LD_LIBRARY_PATH`.
//! A build script that does more (crates/dist compiles a C++ shim) includes this file as a
//! module and calls [`main`] and [`torch_lib_dir`].

use std::path::PathBuf;
use std::process::Command;

/// libtorch's `lib/` directory: `$LIBTORCH/lib`, else the one of the `torch` Python package.
pub fn torch_lib_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return PathBuf::from(dir).join("lib");
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python".into());
    let out = Command::new(&python)
        .args(["-c", "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"])
        .output()
        .expect("python with torch on PATH (run ci/bootstrap.sh and source ci/env.sh)");
    assert!(out.status.success(), "python cannot import torch: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
}

/// Links libtorch.
/// The directory of the header the C++ shims share (`stages/ml/shim/ffi_guard.h`), for a build
/// script that compiles one; tells cargo to rebuild when the header changes.
#[allow(dead_code)] // only the build scripts that compile a shim call it
pub fn shim_include() -> PathBuf {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let dir = crate_dir
        .ancestors()
        .map(|d| d.join("stages/ml/shim"))
        .find(|d| d.join("ffi_guard.h").exists())
        .expect("stages/ml/shim/ffi_guard.h in the workspace");
    println!("cargo:rerun-if-changed={}", dir.join("ffi_guard.h").display());
    dir
}

pub fn main() {
    let lib = torch_lib_dir();
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
