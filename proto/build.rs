//! Generates the agent API from `stillpoint/agent/v1/agent.proto` with a
//! vendored `protoc`, so building never needs a system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    println!("cargo:rerun-if-changed=stillpoint/agent/v1/agent.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &["stillpoint/agent/v1/agent.proto"], &["."])?;
    Ok(())
}
