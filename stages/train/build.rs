//! Links libtorch (through stages/ml/link_torch.rs) and compiles halo-train's shim (the fused
//! AdamW, shim/fused_adamw.cpp; dropping gradients, shim/grads.cpp) against the torch wheel's
//! headers: nothing but torch is needed.

#[path = "../ml/link_torch.rs"]
mod link_torch;

const SHIM: [&str; 2] = ["shim/fused_adamw.cpp", "shim/grads.cpp"];

fn main() {
    link_torch::main();
    for file in SHIM {
        println!("cargo:rerun-if-changed={file}");
    }
    let include = link_torch::torch_lib_dir().parent().expect("torch/lib has a parent").join("include");
    cc::Build::new()
        .cpp(true)
        .files(SHIM)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(link_torch::shim_include())
        .flag("-std=c++20")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("halo_train_shim");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
