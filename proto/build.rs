//! Compiles `proto/workq.proto` with protox (pure Rust), so no system `protoc` is
//! needed. The encoded descriptor set is written by hand because `compile_fds` never
//! writes `file_descriptor_set_path` (see shared/reference/crates.md §2).

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_file("workq.proto")?;

    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("workq_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        // Decoded as slices of the received frame, not copied into a Vec each: the
        // engine copies a payload once, into the item's record.
        .bytes(".workq.v1.NewItem.payload")
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
