//! Compiles `proto/meshwork.proto` with protox (a protobuf compiler written in Rust),
//! so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    let proto_file = format!("{proto_dir}/meshwork.proto");
    println!("cargo:rerun-if-changed={proto_file}");

    let descriptors = protox::compile([&proto_file], [proto_dir])?;
    prost_build::Config::new()
        // `bytes` fields become `bytes::Bytes`, so decoding a frame slices the
        // receive buffer instead of copying payloads.
        .bytes(["."])
        // Hello is large (~150 B) and sent once per connection; boxed, every
        // Message is under half that size, so queues move and store less.
        .boxed(".meshwork.v1.Envelope.body.hello")
        .compile_fds(descriptors)?;
    Ok(())
}
