//! Compiles the .proto files with protox (pure Rust), so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/blkmesh/v1/nodes.proto",
        "proto/blkmesh/v1/exports.proto",
        "proto/blkmesh/v1/workers.proto",
        "proto/blkmesh/v1/stats.proto",
        "proto/blkmesh/v1/zones.proto",
        "proto/blkmesh/ipc/v1/worker.proto",
        "proto/blkmesh/agent/v1/agent.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
