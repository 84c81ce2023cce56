//! Embed libtorch's library directory as an rpath so binaries and tests run without
//! `LD_LIBRARY_PATH`; `--no-as-needed -ltorch` keeps libtorch (and its CUDA part) linked.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
    }
}
