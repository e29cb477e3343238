//! Link-time fixes for libtorch taken from the PyTorch wheel, and the small
//! C++ shim (`src/native/shim.cpp`) for what tch does not expose.
//!
//! torch-sys tells us (through its `links = "tch"` metadata) where libtorch's
//! shared libraries live. Without help the binary has no rpath to them, so it
//! would only start with `LD_LIBRARY_PATH` set; and the linker drops
//! `libtorch_cuda.so` as "unused" (nothing references its symbols directly),
//! which silently hides every GPU. Both are fixed here.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    compile_shim(Path::new(&lib_dir));
    if Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// Compiles the shim against the headers beside libtorch's `lib/`, with the
/// C++ ABI libtorch was built with (PyTorch wheels since 2.7 use the new
/// one; `LIBTORCH_CXX11_ABI=0` for an old libtorch, as torch-sys reads it).
fn compile_shim(lib_dir: &Path) {
    const SHIM: &str = "src/native/shim.cpp";
    println!("cargo:rerun-if-changed={SHIM}");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let root = lib_dir
        .parent()
        .expect("libtorch's lib directory has a parent");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file(SHIM)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag_if_supported("-Wno-unused-parameter")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .warnings(false)
        .compile("finetuned_shim");
}
