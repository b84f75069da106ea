//! A Kubernetes lab leaves nothing behind: no process, mount, network
//! namespace, bridge or temp dir (its own binary, so no other lab runs).

use std::path::Path;
use std::time::Duration;

use stillpoint_tests::harness::kube::{KubeLab, net, wait_pod_ready};

/// Processes whose command line mentions `dir`, or whose root is below it
/// (a container of the lab).
fn processes_of(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let root = std::fs::read_link(e.path().join("root")).ok()?;
            (cmdline.contains(&needle) || root.starts_with(dir))
                .then(|| format!("{} {cmdline}", e.file_name().to_string_lossy()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_leaves_no_process_mount_namespace_or_directory_behind() {
    let lab = tokio::task::block_in_place(KubeLab::start).unwrap();
    let admin = lab.admin().await.unwrap();
    let ns = lab.namespace("cleanup").await.unwrap();
    lab.apply_yaml(
        &admin,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: sleeper, namespace: {ns}}}\n\
             spec: {{containers: [{{name: s, image: busybox, command: [sleep, '3600']}}]}}"
        ),
    )
    .await
    .unwrap();
    let pod = wait_pod_ready(&admin, &ns, "sleeper", Duration::from_secs(60))
        .await
        .unwrap();
    let uid = pod.metadata.uid.clone().unwrap();
    let netns = format!("spl-{}", &uid[..12]);
    let (dir, bridge) = (lab.dir.clone(), lab.bridge.name.clone());
    let csi = lab.csi().root.clone();
    assert!(
        net::namespaces_with_prefix(&netns).len() == 1,
        "the pod has its namespace"
    );
    assert!(!processes_of(&dir).is_empty(), "the lab runs");
    let startup = lab.startup_seconds();
    assert!(startup.is_some());
    tokio::task::block_in_place(|| drop(lab));

    assert_eq!(processes_of(&dir), Vec::<String>::new());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let csi = csi.parent().unwrap().display().to_string();
    assert!(
        !mounts
            .lines()
            .any(|l| l.contains(&dir.display().to_string()) || l.contains(&csi)),
        "{mounts}"
    );
    assert!(net::namespaces_with_prefix(&netns).is_empty());
    let links = std::process::Command::new("ip")
        .args(["link", "show"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&links.stdout).contains(&bridge));
    assert!(!dir.exists(), "{} is removed", dir.display());
}
