//! Compile `fedee.proto` with protox (pure Rust), so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=fedee.proto");
    let fds = protox::compile(["fedee.proto"], ["."])?;
    // Chunk payloads are `bytes::Bytes`: decoding slices tonic's receive buffer instead of
    // copying each 1 MiB chunk into a fresh Vec, and senders can slice one shared buffer.
    tonic_prost_build::configure()
        .bytes(".fedee.v1.Chunk.data")
        .compile_fds(fds)?;
    Ok(())
}
