//! Links libtorch (through stages/ml/link_torch.rs, shared by every crate that links it) and,
//! with the `distributed` feature, compiles the c10d shim against torch's headers and gloo's
//! (Debian's `libgloo-dev`). Without gloo's headers the crate builds with distribution
//! compiled out and says so in a cargo warning. NCCL is compiled in when the CUDA headers of
//! the PyPI packages nvidia-cuda-runtime, nvidia-cuda-crt and nvidia-cuda-cccl are present.

#[path = "../../stages/ml/link_torch.rs"]
mod link_torch;

use std::path::{Path, PathBuf};

const SHIM: &str = "shim/c10d_shim.cpp";

/// The first directory holding `gloo/config.h`: `$GLOO_INCLUDE_DIR`, /usr/include, /usr/local/include.
fn gloo_include() -> Option<PathBuf> {
    let candidates = std::env::var_os("GLOO_INCLUDE_DIR").map(PathBuf::from).into_iter().chain(["/usr/include", "/usr/local/include"].map(PathBuf::from));
    candidates.into_iter().find(|d| d.join("gloo/config.h").exists())
}

/// The CUDA include directories when everything ProcessGroupNCCL.hpp needs is there.
fn cuda_includes(torch_lib: &Path) -> Option<Vec<PathBuf>> {
    let nvidia = torch_lib.parent()?.parent()?.join("nvidia");
    // Installing the header packages later must re-run this script (a missing path would
    // re-run it on every build, so only an existing directory is watched).
    if nvidia.is_dir() {
        println!("cargo:rerun-if-changed={}", nvidia.display());
    }
    let dirs = vec![nvidia.join("cu13/include"), nvidia.join("nccl/include")];
    let needed = ["cuda_runtime.h", "crt/host_config.h", "nv/target", "nccl.h"];
    needed.iter().all(|f| dirs.iter().any(|d| d.join(f).exists())).then_some(dirs)
}

fn main() {
    link_torch::main();
    println!("cargo:rustc-check-cfg=cfg(halo_c10d)");
    println!("cargo:rustc-check-cfg=cfg(halo_nccl)");
    println!("cargo:rerun-if-changed={SHIM}");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE_DIR");
    if std::env::var_os("CARGO_FEATURE_DISTRIBUTED").is_none() {
        return;
    }
    let Some(gloo) = gloo_include() else {
        println!("cargo:warning=haloflow-dist: gloo's headers (gloo/config.h) are missing, so distributed training is compiled out; install them (apt-get install libgloo-dev, or run ci/bootstrap.sh) and rebuild");
        return;
    };
    let lib = link_torch::torch_lib_dir();
    let include = lib.parent().expect("torch/lib has a parent").join("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file(SHIM)
        .include(link_torch::shim_include())
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(&gloo)
        .flag("-std=c++20")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .warnings(false);
    if let Some(cuda) = cuda_includes(&lib) {
        build.define("USE_C10D_NCCL", None).define("HALO_DIST_NCCL", None).includes(&cuda);
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-cfg=halo_nccl");
    } else if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:warning=haloflow-dist: torch is a CUDA build, but the CUDA headers NCCL needs (crt/host_config.h, nv/target: PyPI nvidia-cuda-crt and nvidia-cuda-cccl matching torch's CUDA) are missing beside torch, so NCCL is compiled out; run ci/bootstrap.sh and rebuild for multi-GPU runs");
    }
    build.compile("halo_c10d");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=halo_c10d");
}
