//! `KubeLab`: a real Kubernetes control plane and CSI snapshot stack for
//! the tests, run as processes of this machine.
//!
//! - etcd, kube-apiserver (RBAC, admission with MutatingAdmissionWebhook
//!   and ServiceAccount, TokenRequest and TokenReview, serving certificates
//!   from a throwaway CA) and kube-controller-manager (PV binding,
//!   garbage collection, namespaces, service accounts, workloads) — built
//!   from their Go modules by `tests/k8s/build.sh`, cached outside the tree;
//! - the external-snapshotter's snapshot-controller and csi-snapshotter
//!   (group snapshots on) and the external-provisioner's csi-provisioner,
//!   in front of the lab's own CSI driver ([`csi`]);
//! - the snapshot CRDs, a StorageClass, VolumeSnapshotClasses and
//!   VolumeGroupSnapshotClasses for that driver, and one Node, whose pods
//!   the [`runner`] runs (it plays the kubelet), each in its own network
//!   namespace on a bridge the lab creates ([`net`]), naming each other
//!   through the lab's cluster DNS ([`dns`]).
//!
//! One lab per test binary ([`KubeLab::shared`]), shared by its tests (each
//! its own namespace); it is stopped and removed when the binary exits.
//! [`KubeLab::start`] makes a private one, removed on drop.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, DynamicObject, PostParams};

use crate::harness::free_port;
use crate::harness::loopfs::LoopMount;

pub mod csi;
pub mod cut;
pub mod dns;
pub mod gate;
pub mod net;
pub mod runner;
pub mod shop;
pub mod stillpoint;

/// The lab's node: every pod runs here.
pub const NODE: &str = "lab-node";
/// The StorageClass of the lab's CSI driver (the default class).
pub const STORAGE_CLASS: &str = "lab";
/// Snapshot classes: `lab` takes live copies (not atomic, as
/// csi-driver-host-path does); `lab-atomic` takes atomic per-volume
/// snapshots.
pub const SNAPSHOT_CLASS: &str = "lab";
pub const ATOMIC_SNAPSHOT_CLASS: &str = "lab-atomic";
/// Atomic per-volume snapshots that take 3 s each (slow storage).
pub const SLOW_SNAPSHOT_CLASS: &str = "lab-slow";

/// One upstream process of the lab, stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
struct LabProc {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    child: Child,
    log: PathBuf,
}

impl LabProc {
    fn spawn(name: &'static str, program: &Path, args: &[String], logs: &Path) -> Result<LabProc> {
        use std::os::unix::process::CommandExt;
        let log = logs.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(LabProc {
            name,
            program: program.to_path_buf(),
            args: args.to_vec(),
            child,
            log,
        })
    }

    /// SIGKILL to its process group, as a crash; then the same command
    /// again (as a static pod's kubelet restarts it).
    fn crash_and_restart(&mut self) -> Result<()> {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
        let logs = self.log.parent().context("log directory")?.to_path_buf();
        *self = LabProc::spawn(self.name, &self.program.clone(), &self.args.clone(), &logs)?;
        Ok(())
    }

    fn tail(&self) -> String {
        crate::harness::log_tail(&self.log)
    }

    fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, self.tail());
        }
        Ok(())
    }

    fn stop(&mut self) {
        let group = self.child.id();
        crate::harness::signal(group, "TERM");
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{group}")])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{group}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

/// Where the lab's binaries and CRDs are: built (or found built) by
/// `tests/k8s/build.sh`, or `$STILLPOINT_LAB_DIR`.
pub fn binaries() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("STILLPOINT_LAB_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/build.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): the Kubernetes lab needs Go 1.26 and the Go module proxy",
            script.display(),
            out.status
        );
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(dir))
}

/// The lab's throwaway PKI.
#[derive(Debug)]
struct Certs {
    ca_der: Vec<u8>,
    ca: PathBuf,
    serving: (PathBuf, PathBuf),
    admin: (PathBuf, PathBuf),
    service_accounts: PathBuf,
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

impl Certs {
    fn make(dir: &Path, gateway: Ipv4Addr) -> Result<Certs> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose, SanType,
        };
        std::fs::create_dir_all(dir)?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "stillpoint-lab-ca");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?;
        write(&dir.join("ca.crt"), &ca_cert.pem())?;
        write(&dir.join("ca.key"), &ca_key.serialize_pem())?;
        let ca_der = ca_cert.der().to_vec();
        let issuer = Issuer::new(ca, ca_key);
        let leaf =
            |name: &str, cn: &str, org: Option<&str>, server: bool| -> Result<(PathBuf, PathBuf)> {
                let mut p = CertificateParams::new(Vec::<String>::new())?;
                p.distinguished_name.push(DnType::CommonName, cn);
                if let Some(org) = org {
                    p.distinguished_name.push(DnType::OrganizationName, org);
                }
                if server {
                    for dns in [
                        "localhost",
                        "kubernetes",
                        "kubernetes.default",
                        "kubernetes.default.svc",
                        "kubernetes.default.svc.cluster.local",
                    ] {
                        p.subject_alt_names.push(SanType::DnsName(dns.try_into()?));
                    }
                    p.subject_alt_names
                        .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
                    p.subject_alt_names.push(SanType::IpAddress(gateway.into()));
                }
                p.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyEncipherment,
                ];
                p.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
                let key = KeyPair::generate()?;
                let cert = p.signed_by(&key, &issuer)?;
                let (crt, k) = (
                    dir.join(format!("{name}.crt")),
                    dir.join(format!("{name}.key")),
                );
                write(&crt, &cert.pem())?;
                write(&k, &key.serialize_pem())?;
                Ok((crt, k))
            };
        let serving = leaf("apiserver", "kube-apiserver", None, true)?;
        let admin = leaf("admin", "lab-admin", Some("system:masters"), false)?;
        let sa = KeyPair::generate()?;
        let service_accounts = dir.join("service-accounts.key");
        write(&service_accounts, &sa.serialize_pem())?;
        write(&dir.join("service-accounts.pub"), &sa.public_key_pem())?;
        Ok(Certs {
            ca_der,
            ca: dir.join("ca.crt"),
            serving,
            admin,
            service_accounts,
        })
    }
}

/// A running lab. Stopped and removed when dropped (or, for the shared one,
/// when the test binary exits).
pub struct KubeLab {
    /// `https://<bridge gateway>:<port>`.
    pub server: String,
    /// The CA every lab certificate chains to (PEM file and DER).
    pub ca_file: PathBuf,
    pub ca_der: Vec<u8>,
    /// A kubeconfig for the admin (`system:masters`).
    pub admin_kubeconfig: PathBuf,
    /// The lab's root directory (logs, state).
    pub dir: PathBuf,
    pub bridge: Arc<net::Bridge>,
    procs: Mutex<Vec<LabProc>>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    csi: Mutex<Option<Arc<csi::CsiDriver>>>,
    runner: Mutex<Option<runner::PodRunner>>,
    csi_mount: Mutex<Option<LoopMount>>,
    tempdir: Mutex<Option<tempfile::TempDir>>,
    torn_down: Once,
}

impl std::fmt::Debug for KubeLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeLab")
            .field("server", &self.server)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

static SHARED: OnceLock<KubeLab> = OnceLock::new();

extern "C" fn teardown_shared() {
    let _ = std::panic::catch_unwind(|| {
        if let Some(lab) = SHARED.get() {
            lab.teardown();
        }
    });
}

impl KubeLab {
    /// The test binary's lab, started on first use, torn down at exit.
    pub fn shared() -> &'static KubeLab {
        SHARED.get_or_init(|| {
            let lab = KubeLab::start().expect("starting the Kubernetes lab");
            #[allow(unsafe_code)]
            // SAFETY: `teardown_shared` is a plain `extern "C" fn()` that
            // catches its own panics; atexit only stores the pointer.
            unsafe {
                libc::atexit(teardown_shared);
            }
            lab
        })
    }

    /// Starts a private lab (blocking; call from a blocking context). Its
    /// own runtime runs the CSI driver and the pod runner.
    pub fn start() -> Result<KubeLab> {
        std::thread::spawn(|| Self::start_blocking(None))
            .join()
            .map_err(|_| anyhow!("starting the lab panicked"))?
    }

    /// Starts a private lab whose CSI driver serves `other`'s storage, as
    /// two clusters in one cloud region reach the same storage: a
    /// snapshot's handle cut in one is restorable in the other.
    pub fn start_sharing_storage(other: &KubeLab) -> Result<KubeLab> {
        let root = other.csi().root.clone();
        std::thread::spawn(move || Self::start_blocking(Some(root)))
            .join()
            .map_err(|_| anyhow!("starting the lab panicked"))?
    }

    fn start_blocking(storage: Option<PathBuf>) -> Result<KubeLab> {
        if !crate::harness::is_root() {
            bail!("the Kubernetes lab needs root (network namespaces, mounts)");
        }
        let started = Instant::now();
        let bins = binaries()?;
        let tempdir = tempfile::Builder::new()
            .prefix("stillpoint-lab-")
            .tempdir()?;
        let dir = tempdir.path().to_path_buf();
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let bridge = Arc::new(net::Bridge::create()?);
        let gateway = bridge.gateway();
        let certs = Certs::make(&dir.join("pki"), gateway)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .thread_name("kube-lab")
            .build()?;
        let port = free_port();
        let lab = KubeLab {
            server: format!("https://{gateway}:{port}"),
            ca_file: certs.ca.clone(),
            ca_der: certs.ca_der.clone(),
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            dir: dir.clone(),
            bridge,
            procs: Mutex::new(Vec::new()),
            runtime: Mutex::new(None),
            csi: Mutex::new(None),
            runner: Mutex::new(None),
            csi_mount: Mutex::new(None),
            tempdir: Mutex::new(Some(tempdir)),
            torn_down: Once::new(),
        };
        let result = (|| -> Result<()> {
            lab.write_kubeconfig(&certs)?;
            lab.control_plane(&bins, &certs, port)?;
            runtime.block_on(lab.storage(&bins, storage))?;
            runtime.block_on(lab.install(&bins))?;
            runtime.block_on(async { dns::serve(lab.admin().await?, gateway).await })?;
            let runner = runtime.block_on(runner::PodRunner::start(&lab))?;
            *lab.runner.lock().unwrap() = Some(runner);
            runtime.block_on(lab.wait_default_service_account())
        })();
        *lab.runtime.lock().unwrap() = Some(runtime);
        if let Err(e) = result {
            let logs = lab.logs();
            lab.teardown();
            return Err(e.context(logs));
        }
        tracing::info!("the Kubernetes lab is up in {:?}", started.elapsed());
        let _ = std::fs::write(
            dir.join("startup-seconds"),
            format!("{:.1}", started.elapsed().as_secs_f64()),
        );
        Ok(lab)
    }

    fn write_kubeconfig(&self, certs: &Certs) -> Result<()> {
        write(
            &self.admin_kubeconfig,
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
                 users:\n- name: admin\n  user:\n    client-certificate: {}\n    client-key: {}\n\
                 contexts:\n- name: lab\n  context:\n    cluster: lab\n    user: admin\ncurrent-context: lab\n",
                self.server,
                certs.ca.display(),
                certs.admin.0.display(),
                certs.admin.1.display()
            ),
        )
    }

    fn spawn(&self, name: &'static str, program: &Path, args: Vec<String>) -> Result<()> {
        let proc = LabProc::spawn(name, program, &args, &self.dir.join("logs"))?;
        self.procs.lock().unwrap().push(proc);
        Ok(())
    }

    fn ensure_running(&self) -> Result<()> {
        for p in self.procs.lock().unwrap().iter_mut() {
            p.ensure_running()?;
        }
        Ok(())
    }

    /// Every component's last log lines (for a failed start).
    fn logs(&self) -> String {
        self.procs
            .lock()
            .unwrap()
            .iter()
            .map(LabProc::tail)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// etcd, kube-apiserver and kube-controller-manager.
    fn control_plane(&self, bins: &Path, certs: &Certs, port: u16) -> Result<()> {
        let bin = bins.join("bin");
        let (client, peer) = (free_port(), free_port());
        let s = |v: &str| v.to_string();
        let p = |v: &Path| v.display().to_string();
        self.spawn(
            "etcd",
            &bin.join("etcd"),
            vec![
                s("--name=lab"),
                format!("--data-dir={}", p(&self.dir.join("etcd"))),
                format!("--listen-client-urls=http://127.0.0.1:{client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster=lab=http://127.0.0.1:{peer}"),
                s("--unsafe-no-fsync=true"),
                s("--log-level=warn"),
            ],
        )?;
        let gateway = self.bridge.gateway().to_string();
        self.spawn(
            "kube-apiserver",
            &bin.join("kube-apiserver"),
            vec![
                format!("--etcd-servers=http://127.0.0.1:{client}"),
                format!("--bind-address={gateway}"),
                format!("--advertise-address={gateway}"),
                format!("--secure-port={port}"),
                format!("--cert-dir={}", p(&self.dir.join("apiserver"))),
                format!("--tls-cert-file={}", p(&certs.serving.0)),
                format!("--tls-private-key-file={}", p(&certs.serving.1)),
                format!("--client-ca-file={}", p(&certs.ca)),
                s("--authorization-mode=RBAC"),
                s("--allow-privileged=true"),
                s("--service-cluster-ip-range=10.96.0.0/24"),
                s("--service-account-issuer=https://kubernetes.default.svc.cluster.local"),
                format!(
                    "--service-account-key-file={}",
                    p(&certs.service_accounts.with_extension("pub"))
                ),
                format!(
                    "--service-account-signing-key-file={}",
                    p(&certs.service_accounts)
                ),
                s("--enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook"),
                // Webhooks named by Service are called at its endpoints'
                // addresses: the lab has no Service network to route a
                // cluster IP.
                s("--enable-aggregator-routing=true"),
                s("--profiling=false"),
                s("--v=1"),
            ],
        )?;
        // Ready when /readyz answers through the admin credentials.
        let kubeconfig = self.admin_kubeconfig.clone();
        let ready = |path: &str| {
            Command::new("curl")
                .args(["-sf", "--max-time", "2", "--cacert"])
                .arg(&certs.ca)
                .arg("--cert")
                .arg(&certs.admin.0)
                .arg("--key")
                .arg(&certs.admin.1)
                .arg(format!("{}{path}", self.server))
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        while !ready("/readyz") {
            self.ensure_running()?;
            if Instant::now() > deadline {
                bail!("kube-apiserver is not ready within 90 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.spawn(
            "kube-controller-manager",
            &bin.join("kube-controller-manager"),
            vec![
                format!("--kubeconfig={}", p(&kubeconfig)),
                format!("--authentication-kubeconfig={}", p(&kubeconfig)),
                format!("--authorization-kubeconfig={}", p(&kubeconfig)),
                s("--bind-address=127.0.0.1"),
                format!("--secure-port={}", free_port()),
                format!("--cert-dir={}", p(&self.dir.join("kcm"))),
                s("--leader-elect=false"),
                s("--use-service-account-credentials=false"),
                // No kubelet heartbeats: the node lifecycle controller would
                // mark the lab's node unknown and evict its pods.
                s("--controllers=*,-nodelifecycle,-nodeipam,-cloud-node-lifecycle"),
                format!("--root-ca-file={}", p(&certs.ca)),
                format!(
                    "--service-account-private-key-file={}",
                    p(&certs.service_accounts)
                ),
                format!("--cluster-signing-cert-file={}", p(&certs.ca)),
                format!(
                    "--cluster-signing-key-file={}",
                    p(&self.dir.join("pki/ca.key"))
                ),
                s("--v=1"),
            ],
        )?;
        Ok(())
    }

    /// The lab's CSI driver (its state on a btrfs image, so atomic
    /// snapshots are possible, or `shared`: another lab's) and the CSI
    /// sidecars in front of it.
    async fn storage(&self, bins: &Path, shared: Option<PathBuf>) -> Result<()> {
        let driver = match shared {
            Some(root) => csi::CsiDriver::start_at(&root, &self.dir.join("csi.sock"))?,
            None => {
                let mount = tokio::task::spawn_blocking(|| LoopMount::btrfs(4096)).await??;
                let driver = csi::CsiDriver::start(&mount.path().join("csi"))?;
                *self.csi_mount.lock().unwrap() = Some(mount);
                driver
            }
        };
        let socket = format!("unix://{}", driver.socket.display());
        *self.csi.lock().unwrap() = Some(Arc::new(driver));
        let bin = bins.join("bin");
        let kubeconfig = format!("--kubeconfig={}", self.admin_kubeconfig.display());
        let group = "--feature-gates=CSIVolumeGroupSnapshot=true".to_string();
        self.spawn(
            "snapshot-controller",
            &bin.join("snapshot-controller"),
            vec![
                kubeconfig.clone(),
                group.clone(),
                "--leader-election=false".into(),
                // client-go's default 5 requests/s would pace every
                // snapshot (and so a CSI cut's freeze window) by the
                // client's rate limiter, not by the driver.
                "--kube-api-qps=200".into(),
                "--kube-api-burst=400".into(),
                // Retries back off to 5 minutes by default: a snapshot
                // deleted while it is being cut would sit that long.
                "--retry-interval-max=2s".into(),
            ],
        )?;
        self.spawn(
            "csi-snapshotter",
            &bin.join("csi-snapshotter"),
            vec![
                kubeconfig.clone(),
                group,
                format!("--csi-address={socket}"),
                "--leader-election=false".into(),
                "--kube-api-qps=200".into(),
                "--kube-api-burst=400".into(),
                // Retries back off to 5 minutes by default: a snapshot
                // deleted while it is being cut would sit that long.
                "--retry-interval-max=2s".into(),
            ],
        )?;
        self.spawn(
            "csi-provisioner",
            &bin.join("csi-provisioner"),
            vec![
                kubeconfig,
                format!("--csi-address={socket}"),
                "--leader-election=false".into(),
                "--immediate-topology=false".into(),
                "--extra-create-metadata".into(),
                // As for the snapshotter: client-go's 5 requests/s and
                // retries backing off to 5 minutes left a PVC unbound for
                // over 2 minutes while four tests made PVCs at once.
                "--kube-api-qps=200".into(),
                "--kube-api-burst=400".into(),
                "--retry-interval-max=2s".into(),
            ],
        )?;
        Ok(())
    }

    /// The snapshot CRDs, the classes and the node.
    async fn install(&self, bins: &Path) -> Result<()> {
        let client = self.admin().await?;
        let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            Api::all(client.clone());
        let mut names = Vec::new();
        for entry in std::fs::read_dir(bins.join("crd"))?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !name.ends_with(".yaml") || name == "kustomization.yaml" {
                continue;
            }
            let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
                serde_yaml::from_str(&std::fs::read_to_string(entry.path())?)
                    .with_context(|| format!("reading {name}"))?;
            names.push(crd.metadata.name.clone().unwrap_or_default());
            crds.create(&PostParams::default(), &crd).await?;
        }
        for name in &names {
            wait_async(
                &format!("CRD {name} established"),
                Duration::from_secs(30),
                || {
                    let crds = crds.clone();
                    let name = name.clone();
                    async move {
                        let crd = crds.get(&name).await?;
                        Ok(crd
                            .status
                            .and_then(|s| s.conditions)
                            .unwrap_or_default()
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True"))
                    }
                },
            )
            .await?;
        }
        let driver = csi::DRIVER;
        let documents = format!(
            r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: {STORAGE_CLASS}
  annotations: {{storageclass.kubernetes.io/is-default-class: "true"}}
provisioner: {driver}
reclaimPolicy: Delete
volumeBindingMode: Immediate
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata:
  name: {SNAPSHOT_CLASS}
  annotations: {{snapshot.storage.kubernetes.io/is-default-class: "true", stillpoint.dev/atomic: "false"}}
driver: {driver}
deletionPolicy: Delete
parameters: {{mode: copy}}
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata:
  name: {ATOMIC_SNAPSHOT_CLASS}
  annotations: {{stillpoint.dev/atomic: "true"}}
driver: {driver}
deletionPolicy: Delete
parameters: {{mode: atomic}}
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata:
  name: {SLOW_SNAPSHOT_CLASS}
  annotations: {{stillpoint.dev/atomic: "true"}}
driver: {driver}
deletionPolicy: Delete
parameters: {{mode: atomic, delayMs: "3000"}}
---
apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshotClass
metadata:
  name: {SNAPSHOT_CLASS}
  annotations: {{groupsnapshot.storage.kubernetes.io/is-default-class: "true", stillpoint.dev/atomic: "false"}}
driver: {driver}
deletionPolicy: Delete
parameters: {{mode: copy}}
---
apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshotClass
metadata:
  name: {ATOMIC_SNAPSHOT_CLASS}
  annotations: {{stillpoint.dev/atomic: "true"}}
driver: {driver}
deletionPolicy: Delete
parameters: {{mode: atomic}}
---
apiVersion: v1
kind: Node
metadata:
  name: {NODE}
  labels: {{kubernetes.io/hostname: {NODE}, kubernetes.io/os: linux}}
"#
        );
        for document in documents.split("\n---\n") {
            self.apply_yaml(&client, document).await?;
        }
        Ok(())
    }

    /// Creates the object a YAML document describes (any kind the server
    /// knows).
    pub async fn apply_yaml(&self, client: &kube::Client, yaml: &str) -> Result<DynamicObject> {
        let (api, object) = dynamic(client, yaml).await?;
        Ok(api.create(&PostParams::default(), &object).await?)
    }

    /// Server-side applies the object a YAML document describes as a dry
    /// run: the API server validates it (schema, admission) and keeps
    /// nothing.
    pub async fn dry_run_yaml(&self, client: &kube::Client, yaml: &str) -> Result<DynamicObject> {
        let params = kube::api::PatchParams::apply("stillpoint-tests").force();
        dry_apply(client, yaml, params).await
    }

    /// The same with strict field validation: a field the kind does not
    /// have is refused, not dropped.
    pub async fn validate_yaml(&self, client: &kube::Client, yaml: &str) -> Result<DynamicObject> {
        let params = kube::api::PatchParams::apply("stillpoint-tests")
            .force()
            .validation_strict();
        dry_apply(client, yaml, params).await
    }

    async fn wait_default_service_account(&self) -> Result<()> {
        let client = self.admin().await?;
        let sas: Api<ServiceAccount> = Api::namespaced(client, "default");
        wait_async(
            "the default ServiceAccount",
            Duration::from_secs(60),
            || {
                let sas = sas.clone();
                async move { Ok(sas.get_opt("default").await?.is_some()) }
            },
        )
        .await
    }

    /// A client with the admin's credentials (on the caller's runtime).
    pub async fn admin(&self) -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.admin_kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A token of ServiceAccount `ns/name` from TokenRequest.
    pub async fn token(&self, ns: &str, name: &str, audiences: &[&str]) -> Result<String> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.admin().await?, ns);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: (!audiences.is_empty())
                    .then(|| audiences.iter().map(|a| a.to_string()).collect()),
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let issued = sas
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {ns}/{name}"))?;
        issued
            .status
            .and_then(|s| s.token)
            .context("TokenRequest returned no token")
    }

    /// A client that acts as ServiceAccount `ns/name`: exactly the RBAC it
    /// will have in a cluster.
    pub async fn client_for(&self, ns: &str, name: &str) -> Result<kube::Client> {
        let token = self.token(ns, name, &[]).await?;
        let mut config = kube::Config::new(self.server.parse()?);
        config.root_cert = Some(vec![self.ca_der.clone()]);
        config.auth_info.token = Some(token.into());
        config.default_namespace = ns.to_string();
        Ok(kube::Client::try_from(config)?)
    }

    /// A kubeconfig file for ServiceAccount `ns/name` (for a process).
    pub async fn kubeconfig_for(&self, ns: &str, name: &str, path: &Path) -> Result<()> {
        let token = self.token(ns, name, &[]).await?;
        write(
            path,
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
                 users:\n- name: {name}\n  user:\n    token: {token}\n\
                 contexts:\n- name: lab\n  context:\n    cluster: lab\n    user: {name}\n    namespace: {ns}\ncurrent-context: lab\n",
                self.server,
                self.ca_file.display()
            ),
        )
    }

    /// The API server's address (an IP and port: the bridge's gateway).
    pub fn api_address(&self) -> std::net::SocketAddr {
        self.server
            .trim_start_matches("https://")
            .parse()
            .expect("the lab's API server listens on an IP address")
    }

    /// Cuts pod `ns/pod` off from the API server, as a network partition
    /// between a node and the control plane does: every packet it sends
    /// to the API server's port is lost (its requests hang; nothing
    /// answers with an error), while the pod still reaches and is reached
    /// by everything else (other pods, probes, DNS). See `cut.rs`.
    pub async fn cut_from_api(&self, ns: &str, pod: &str) -> Result<cut::Cut> {
        let (uid, _) = self.pod_net(ns, pod).await?;
        let api = self.api_address();
        let netns = runner::netns_name(&uid);
        cut::Cut::outbound(&netns, &api.ip().to_string(), &api.port().to_string())
    }

    /// Cuts pod `ns/pod` off from port `port` of address `to` (another
    /// pod): every packet it sends there is lost.
    pub async fn cut_pod_from(
        &self,
        ns: &str,
        pod: &str,
        to: std::net::Ipv4Addr,
        port: u16,
    ) -> Result<cut::Cut> {
        let (uid, _) = self.pod_net(ns, pod).await?;
        cut::Cut::outbound(
            &runner::netns_name(&uid),
            &to.to_string(),
            &port.to_string(),
        )
    }

    /// Cuts this machine (where the lab's controller processes run) and
    /// pod `ns/pod` apart on TCP port `port` of the pod, both ways.
    pub async fn cut_host_from(&self, ns: &str, pod: &str, port: u16) -> Result<cut::Cut> {
        let (uid, ip) = self.pod_net(ns, pod).await?;
        let netns = runner::netns_name(&uid);
        let gateway = self.bridge.gateway().to_string();
        cut::Cut::between_host_and(&netns, ip, &gateway, &port.to_string())
    }

    /// Cuts the containers of pod `ns/pod` off from each other on
    /// loopback (its agent from its database), as a partition inside the
    /// pod would: packets are dropped, nothing answers. See `cut.rs`.
    pub async fn cut_inside(&self, ns: &str, pod: &str) -> Result<cut::Cut> {
        let (uid, _) = self.pod_net(ns, pod).await?;
        cut::Cut::loopback(&runner::netns_name(&uid))
    }

    /// Crashes control-plane component `name` (`etcd`, `kube-apiserver`,
    /// …: SIGKILL) and starts it again at once with the same flags and
    /// state; returns when the API server answers again.
    pub async fn crash_and_restart(&self, name: &str) -> Result<()> {
        {
            let mut procs = self.procs.lock().unwrap();
            let p = procs
                .iter_mut()
                .find(|p| p.name == name)
                .with_context(|| format!("no lab component {name}"))?;
            p.crash_and_restart()?;
        }
        let admin = self.admin().await?;
        wait_async(
            &format!("the API server answering after {name} restarted"),
            Duration::from_secs(120),
            || {
                let admin = admin.clone();
                async move {
                    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(admin);
                    Ok(nodes.get_opt(NODE).await.is_ok_and(|n| n.is_some()))
                }
            },
        )
        .await
    }

    /// SIGKILL to the main process of container `container` of pod
    /// `ns/pod` (a crash; the pod runner restarts it per its policy).
    pub async fn kill_container(&self, ns: &str, pod: &str, container: &str) -> Result<()> {
        self.signal_container(ns, pod, container, "KILL").await
    }

    /// `signal` (`STOP`, `CONT`, …) to the main process of container
    /// `container` of pod `ns/pod`.
    pub async fn signal_container(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
        signal: &str,
    ) -> Result<()> {
        let (uid, _) = self.pod_net(ns, pod).await?;
        let runner = self.runner.lock().unwrap();
        runner
            .as_ref()
            .context("the pod runner is not running")?
            .signal_container(&uid, container, signal)
    }

    /// The node crashes: SIGKILL to every process of every pod; the pod
    /// runner then restarts their containers per their policies (their
    /// network and volumes stay, as a rebooted kubelet's pods' do).
    pub fn kill_node(&self) -> Result<usize> {
        let runner = self.runner.lock().unwrap();
        Ok(runner
            .as_ref()
            .context("the pod runner is not running")?
            .kill_all())
    }

    /// Pod `ns/pod`'s uid and address.
    async fn pod_net(&self, ns: &str, pod: &str) -> Result<(String, std::net::Ipv4Addr)> {
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.admin().await?, ns);
        let p = pods.get(pod).await?;
        let uid = p.metadata.uid.clone().unwrap_or_default();
        let ip = p
            .status
            .and_then(|s| s.pod_ip)
            .context("the pod has no IP yet")?
            .parse()?;
        Ok((uid, ip))
    }

    /// What container `container` of pod `ns/pod` wrote (every run of the
    /// pod of that name, oldest first), for failure messages.
    pub fn container_log(&self, ns: &str, pod: &str, container: &str) -> String {
        let prefix = format!("{ns}_{pod}_");
        let mut runs: Vec<(std::time::SystemTime, PathBuf)> =
            std::fs::read_dir(self.dir.join("pods"))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| {
                    let at = e
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(std::time::UNIX_EPOCH);
                    (at, e.path().join(format!("{container}.log")))
                })
                .collect();
        runs.sort();
        runs.iter()
            .map(|(_, p)| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A new namespace named after `prefix` (unique in this lab).
    pub async fn namespace(&self, prefix: &str) -> Result<String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{n}");
        let namespaces: Api<Namespace> = Api::all(self.admin().await?);
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        namespaces.create(&PostParams::default(), &ns).await?;
        let sas: Api<ServiceAccount> = Api::namespaced(self.admin().await?, &name);
        wait_async(
            "the namespace's default ServiceAccount",
            Duration::from_secs(30),
            || {
                let sas = sas.clone();
                async move { Ok(sas.get_opt("default").await?.is_some()) }
            },
        )
        .await?;
        Ok(name)
    }

    /// The lab's CSI driver (volume and snapshot files).
    pub fn csi(&self) -> Arc<csi::CsiDriver> {
        self.csi.lock().unwrap().clone().expect("the lab is up")
    }

    /// How long the last start took, in seconds (written at start-up).
    pub fn startup_seconds(&self) -> Option<f64> {
        std::fs::read_to_string(self.dir.join("startup-seconds"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Stops everything and removes the lab's files. Idempotent.
    pub fn teardown(&self) {
        self.torn_down.call_once(|| {
            // Pods first (their processes, mounts and namespaces), then the
            // control plane, then the storage and the network.
            if let Some(runner) = self.runner.lock().unwrap().take() {
                runner.stop_all();
            }
            let mut procs = std::mem::take(&mut *self.procs.lock().unwrap());
            for p in procs.iter_mut().rev() {
                p.stop();
            }
            self.csi.lock().unwrap().take();
            if let Some(runtime) = self.runtime.lock().unwrap().take() {
                runtime.shutdown_timeout(Duration::from_secs(2));
            }
            self.csi_mount.lock().unwrap().take();
            self.bridge.remove();
            if let Some(dir) = self.tempdir.lock().unwrap().take() {
                crate::harness::remove_tree(dir.path());
                drop(dir);
            }
        });
    }
}

impl Drop for KubeLab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A server-side apply of `yaml`'s object with `params`, as a dry run.
async fn dry_apply(
    client: &kube::Client,
    yaml: &str,
    params: kube::api::PatchParams,
) -> Result<DynamicObject> {
    let (api, object) = dynamic(client, yaml).await?;
    let name = object
        .metadata
        .name
        .clone()
        .context("the document has no name")?;
    Ok(api
        .patch(&name, &params.dry_run(), &kube::api::Patch::Apply(&object))
        .await?)
}

/// Polls an async `check` until it returns true, at most `bound`.
pub async fn wait_async<F, Fut>(what: &str, bound: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + bound;
    let mut last = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(match last {
                Some(e) => e.context(format!("{what}: not within {bound:?}")),
                None => anyhow!("{what}: not within {bound:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until pod `ns/name` is Ready; returns it (its `status.podIP` set).
pub async fn wait_pod_ready(
    client: &kube::Client,
    ns: &str,
    name: &str,
    bound: Duration,
) -> Result<k8s_openapi::api::core::v1::Pod> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    let last = Arc::new(Mutex::new(None));
    let result = wait_async(&format!("pod {ns}/{name} Ready"), bound, || {
        let (pods, last) = (pods.clone(), last.clone());
        async move {
            let pod = pods.get(name).await?;
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            *last.lock().unwrap() = Some(pod);
            Ok(ready)
        }
    })
    .await;
    let last = last.lock().unwrap().take();
    match result {
        Ok(()) => Ok(last.expect("read")),
        Err(e) => Err(e.context(format!(
            "its status: {}",
            serde_json::to_string(&last.and_then(|p| p.status)).unwrap_or_default()
        ))),
    }
}

/// The pod's IP.
pub fn pod_ip(pod: &k8s_openapi::api::core::v1::Pod) -> Result<Ipv4Addr> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .context("the pod has no IP")?
        .parse()
        .context("the pod IP is not IPv4")
}

/// Waits until PVC `ns/name` is Bound.
pub async fn wait_pvc_bound(
    client: &kube::Client,
    ns: &str,
    name: &str,
    bound: Duration,
) -> Result<()> {
    let pvcs: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(client.clone(), ns);
    wait_async(&format!("PVC {ns}/{name} Bound"), bound, || {
        let pvcs = pvcs.clone();
        async move {
            let pvc = pvcs.get(name).await?;
            Ok(pvc.status.and_then(|s| s.phase).as_deref() == Some("Bound"))
        }
    })
    .await
}

/// Reads a custom object's field (a JSON pointer, e.g. `/status/readyToUse`).
pub async fn custom_field(
    client: &kube::Client,
    api_version: &str,
    kind: &str,
    ns: &str,
    name: &str,
    pointer: &str,
) -> Result<Option<serde_json::Value>> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
    let (resource, _) = kube::discovery::pinned_kind(client, &gvk).await?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
    let object = serde_json::to_value(api.get(name).await?)?;
    Ok(object.pointer(pointer).cloned())
}

/// The uid and gid of a host user (the lab runs containers as host users).
pub fn host_user(name: &str) -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = std::process::Command::new("id")
            .args([flag, name])
            .output()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("no host user {name}"))
    };
    Ok((id("-u")?, id("-g")?))
}

/// A client of the PostgreSQL that `pod` runs (port 5432, user postgres).
pub async fn postgres_of(pod: &k8s_openapi::api::core::v1::Pod) -> Result<tokio_postgres::Client> {
    let ip = pod_ip(pod)?;
    let (client, conn) = tokio_postgres::connect(
        &format!("host={ip} port=5432 user=postgres dbname=postgres connect_timeout=5"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    Ok(client)
}

/// The object a YAML document describes and the API it lives in (any kind
/// the server knows; a namespaced one without a namespace in `default`).
async fn dynamic(client: &kube::Client, yaml: &str) -> Result<(Api<DynamicObject>, DynamicObject)> {
    let object: DynamicObject = serde_yaml::from_str(yaml).context("parsing YAML")?;
    let types = object
        .types
        .clone()
        .context("the document has no apiVersion/kind")?;
    let (group, version) = match types.api_version.split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), types.api_version.clone()),
    };
    let gvk = kube::api::GroupVersionKind::gvk(&group, &version, &types.kind);
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("the server has no {}", types.kind))?;
    let api: Api<DynamicObject> = match (caps.scope, object.metadata.namespace.as_deref()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => {
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        (kube::discovery::Scope::Namespaced, None) => {
            Api::default_namespaced_with(client.clone(), &resource)
        }
        (kube::discovery::Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
    };
    Ok((api, object))
}
