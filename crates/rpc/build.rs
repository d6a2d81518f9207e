//! Compiles `proto/rpc.proto` (the RPC layer's messages) with protox, so
//! building needs no system `protoc`. The layer owns its messages; they
//! travel as Concern payloads under the RPC command id.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    let proto_file = format!("{proto_dir}/rpc.proto");
    println!("cargo:rerun-if-changed={proto_file}");
    let descriptors = protox::compile([&proto_file], [proto_dir])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
