//! Link-time fixes for libtorch taken from the PyTorch wheel.
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
    if Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
