//! Compiles the .proto files with protox (pure Rust), so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/blkmesh/v1/nodes.proto",
        "proto/blkmesh/v1/exports.proto",
        "proto/blkmesh/v1/workers.proto",
        "proto/blkmesh/v1/stats.proto",
        "proto/blkmesh/v1/zones.proto",
        "proto/blkmesh/v1/images.proto",
        "proto/blkmesh/v1/jobs.proto",
        "proto/blkmesh/ipc/v1/worker.proto",
        "proto/blkmesh/agent/v1/agent.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let descriptors = prost::Message::encode_to_vec(&fds);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    // serde for the API messages in the protobuf JSON mapping, with the
    // .proto field names: the manager's state file is made of them.
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .preserve_proto_field_names()
        .build(&[".blkmesh.v1"])?;
    Ok(())
}
