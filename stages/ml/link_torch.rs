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
pub fn main() {
    let lib = torch_lib_dir();
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
