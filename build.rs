//! Build script.
//!
//! 1. bindgen turns `kernels/segattn_params.h` into Rust, so that Rust and CUDA share one
//!    definition of the kernel parameters.
//! 2. The kernels in `kernels/` are compiled with the host C++ compiler under the SIMT emulation
//!    layer (`kernels/emu/`), so that plain `cargo test` runs them on the CPU.
//! 3. Under `--features cuda` only: nvcc compiles the production kernels (kernels/production.txt)
//!    into `$OUT_DIR/segattn.fatbin` (see build/nvcc.rs).

use std::path::{Path, PathBuf};

#[path = "build/nvcc.rs"]
mod nvcc;

fn main() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=build.rs");
    generate_params_bindings(&out_dir);
    compile_emulated_kernels();
    nvcc::compile_production_fatbin(&out_dir);
}

fn generate_params_bindings(out_dir: &Path) {
    let header = "kernels/segattn_params.h";
    println!("cargo:rerun-if-changed={header}");
    let bindings = bindgen::Builder::default()
        .header(header)
        .allowlist_type("Segattn.*")
        .allowlist_var("SEGATTN_.*")
        .derive_default(true)
        .derive_debug(true)
        .layout_tests(true)
        .generate()
        .unwrap_or_else(|e| {
            panic!(
                "bindgen failed on {header}: {e}. bindgen needs libclang: run \
                 scripts/install-build-deps.sh (Debian: apt-get install libclang-dev)"
            )
        });
    bindings
        .write_to_file(out_dir.join("segattn_params.rs"))
        .expect("writing the params bindings");
}

/// Every `.cu` and `.cpp` file under kernels/, compiled as C++ with SEGATTN_EMULATE defined.
fn compile_emulated_kernels() {
    let mut sources = Vec::new();
    collect_sources(Path::new("kernels"), &mut sources);
    sources.sort();
    println!("cargo:rerun-if-changed=kernels");
    if sources.is_empty() {
        return;
    }
    // cc puts every flag before every file, so `-x c++` makes the .cu files plain C++ here.
    compile_sources(&sources);
}

fn compile_sources(sources: &[PathBuf]) {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .define("SEGATTN_EMULATE", None)
        .include("kernels")
        .flag("-fno-strict-aliasing")
        .flag("-x")
        .flag("c++");
    for src in sources {
        build.file(src);
    }
    build.compile("segattn_emulated_kernels");
}

fn collect_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "cu" || e == "cpp") {
            out.push(path);
        }
    }
}
