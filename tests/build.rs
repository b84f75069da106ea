//! Generates the lab's CSI driver API from `k8s/csi/csi.proto` with a
//! vendored `protoc` (and its well-known types).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let include = protoc_bin_vendored::include_path()?;
    println!("cargo:rerun-if-changed=k8s/csi/csi.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(
            config,
            &["k8s/csi/csi.proto"],
            &["k8s/csi", include.to_str().ok_or("non-UTF-8 include path")?],
        )?;
    Ok(())
}
