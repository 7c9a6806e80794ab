//! Links libtorch (through stages/ml/link_torch.rs) and compiles the fused-AdamW shim
//! (shim/fused_adamw.cpp) against the torch wheel's headers: nothing but torch is needed.

#[path = "../ml/link_torch.rs"]
mod link_torch;

const SHIM: &str = "shim/fused_adamw.cpp";

fn main() {
    link_torch::main();
    println!("cargo:rerun-if-changed={SHIM}");
    let include = link_torch::torch_lib_dir().parent().expect("torch/lib has a parent").join("include");
    cc::Build::new()
        .cpp(true)
        .file(SHIM)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(link_torch::shim_include())
        .flag("-std=c++20")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("halo_fused_adamw");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
