//! Stillpoint's Kubernetes mode in the lab: its CRDs and the RBAC from
//! `deploy/` installed once per lab, the controller run as a process under
//! a token of its own ServiceAccount (never as admin), and database pods
//! with the agent as a sidecar.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::api::{Api, DynamicObject, PostParams};
use tokio::sync::OnceCell;

use super::{KubeLab, wait_async};
use crate::harness::agent::{agent_binary, controller_binary};
use crate::harness::pki::{CONTROLLER_IDENTITY, Pki};

/// The trust domain of the agents' identities in these tests.
pub const TRUST_DOMAIN: &str = "stillpoint.test";
/// The controller's namespace and ServiceAccount (deploy/rbac.yaml).
pub const CONTROLLER_NS: &str = "stillpoint-system";
pub const CONTROLLER_SA: &str = "stillpoint-controller";

/// What a test binary shares: the PKI and the installed resources.
#[derive(Debug)]
pub struct Installed {
    pub pki: Pki,
    /// The controller's client identity.
    pub controller_tls: PathBuf,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Creates every document of a multi-document YAML file; those that
/// exist already are left as they are.
pub async fn apply_all(lab: &KubeLab, client: &kube::Client, yaml: &str) -> Result<()> {
    for doc in yaml.split("\n---\n") {
        if doc
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            continue;
        }
        match lab.apply_yaml(client, doc).await {
            Ok(_) => {}
            Err(e)
                if e.downcast_ref::<kube::Error>()
                    .is_some_and(|k| matches!(k, kube::Error::Api(s) if s.code == 409)) => {}
            Err(e) => {
                return Err(e.context(format!(
                    "applying:\n{}",
                    doc.lines().take(6).collect::<Vec<_>>().join("\n")
                )));
            }
        }
    }
    Ok(())
}

/// Installs the CRDs, RBAC and the admission policies from
/// `deploy/` (once per lab).
pub async fn install(lab: &'static KubeLab) -> Result<&'static Installed> {
    static INSTALLED: OnceCell<Installed> = OnceCell::const_new();
    INSTALLED
        .get_or_try_init(|| async {
            apply_deploy(lab).await?;
            Installed::new()
        })
        .await
}

impl Installed {
    /// A new PKI and the controller's identity from it (for a lab of a
    /// test's own, after [`apply_deploy`]).
    pub fn new() -> Result<Installed> {
        let pki = Pki::new()?;
        let files = pki.issue("controller", CONTROLLER_IDENTITY)?;
        let controller_tls = files.cert.parent().context("cert dir")?.to_path_buf();
        Ok(Installed {
            pki,
            controller_tls,
        })
    }
}

/// Installs the CRDs, RBAC and the admission policies from `deploy/`
/// into `lab` and waits until the CRDs are served ([`install`] does it
/// for the shared lab; a second lab of a test calls this).
pub async fn apply_deploy(lab: &KubeLab) -> Result<()> {
    let admin = lab.admin().await?;
    let crds = std::fs::read_to_string(repo().join("deploy/crds/stillpoint.dev.yaml"))?;
    apply_all(lab, &admin, &crds).await?;
    let rbac = std::fs::read_to_string(repo().join("deploy/rbac.yaml"))?;
    apply_all(lab, &admin, &rbac).await?;
    // The policy confining what the controller's ServiceAccount
    // creates: every lab test runs under it.
    let policy = std::fs::read_to_string(repo().join("deploy/controller-policy.yaml"))?;
    apply_all(lab, &admin, &policy).await?;
    // Who may restore a content into another namespace.
    let restores = std::fs::read_to_string(repo().join("deploy/restore-policy.yaml"))?;
    apply_all(lab, &admin, &restores).await?;
    // The CRDs serve once established.
    let gvk = kube::api::GroupVersionKind::gvk("stillpoint.dev", "v1alpha1", "GroupBackup");
    wait_async(
        "the Stillpoint CRDs served",
        Duration::from_secs(60),
        || {
            let admin = admin.clone();
            let gvk = gvk.clone();
            async move { Ok(kube::discovery::pinned_kind(&admin, &gvk).await.is_ok()) }
        },
    )
    .await?;
    Ok(())
}

impl Installed {
    /// A Secret `name` in `ns` with an agent identity for ServiceAccount `sa`
    /// (`tls.crt`, `tls.key`, `ca.crt`).
    pub async fn agent_secret(&self, lab: &KubeLab, ns: &str, sa: &str, name: &str) -> Result<()> {
        let identity = format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}");
        let files = self.pki.issue(&format!("{ns}-{name}"), &identity)?;
        let read = |p: &Path| std::fs::read_to_string(p).with_context(|| p.display().to_string());
        let secret: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": { "name": name, "namespace": ns },
            "stringData": {
                "tls.crt": read(&files.cert)?,
                "tls.key": read(&files.key)?,
                "ca.crt": read(&files.ca)?,
            }
        }))?;
        let admin = lab.admin().await?;
        let gvk = kube::api::GroupVersionKind::gvk("", "v1", "Secret");
        let (resource, _) = kube::discovery::pinned_kind(&admin, &gvk).await?;
        let api: Api<DynamicObject> = Api::namespaced_with(admin, ns, &resource);
        api.create(&PostParams::default(), &secret).await?;
        Ok(())
    }
}

/// The agent sidecar of a pod: engine, DSN, its identity from Secret
/// `secret`, the pod's data volume `volume` at `/data`.
pub fn agent_container(engine: &str, dsn: &str, secret_volume: &str, volume: &str) -> String {
    let _ = agent_binary();
    format!(
        r#"  - name: stillpoint-agent
    image: ghcr.io/stillpoint-dev/stillpoint-agent:0.1.0
    env:
    - {{name: STILLPOINT_MEMBER, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
    - {{name: STILLPOINT_ENGINE, value: {engine}}}
    - {{name: STILLPOINT_DSN, value: "{dsn}"}}
    - {{name: STILLPOINT_LISTEN_ADDR, value: "0.0.0.0:9443"}}
    - {{name: STILLPOINT_ADMIN_ADDR, value: "0.0.0.0:9090"}}
    - {{name: STILLPOINT_TLS_CERT, value: /etc/stillpoint/tls/tls.crt}}
    - {{name: STILLPOINT_TLS_KEY, value: /etc/stillpoint/tls/tls.key}}
    - {{name: STILLPOINT_TLS_CA, value: /etc/stillpoint/tls/ca.crt}}
    - {{name: STILLPOINT_CONTROLLER_IDENTITY, value: "{CONTROLLER_IDENTITY}"}}
    - {{name: STILLPOINT_VOLUMES, value: /data}}
    - {{name: STILLPOINT_STATE_DIR, value: /tmp/stillpoint}}
    - {{name: STILLPOINT_LOG, value: "info,stillpoint_agent=debug"}}
    ports: [{{name: stillpoint, containerPort: 9443}}]
    readinessProbe: {{tcpSocket: {{port: 9443}}, periodSeconds: 1}}
    volumeMounts:
    - {{name: {volume}, mountPath: /data}}
    - {{name: {secret_volume}, mountPath: /etc/stillpoint/tls, readOnly: true}}
"#
    )
}

/// The controller as a process, under its ServiceAccount's token.
#[derive(Debug)]
pub struct ControllerProc {
    child: Child,
    pub identity: String,
    pub log: PathBuf,
    /// Its identity's directory (`--pki`: it writes it), removed on drop.
    pub tls_dir: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl ControllerProc {
    /// Starts a controller replica `identity` watching namespace `ns`,
    /// electing its leader by Lease `lease` (in stillpoint-system).
    pub async fn start(
        lab: &KubeLab,
        installed: &Installed,
        ns: &str,
        identity: &str,
        lease: &str,
    ) -> Result<Self> {
        Self::start_as(lab, installed, ns, identity, lease, CONTROLLER_SA).await
    }

    /// The same, with more flags (`extra` overrides the lab's defaults,
    /// e.g. `--resync 30s`).
    pub async fn start_with(
        lab: &KubeLab,
        installed: &Installed,
        ns: &str,
        identity: &str,
        lease: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let tls = &installed.controller_tls;
        Self::spawn(lab, ns, identity, lease, CONTROLLER_SA, tls, extra, None).await
    }

    /// The same, as ServiceAccount `sa` of stillpoint-system.
    pub async fn start_as(
        lab: &KubeLab,
        installed: &Installed,
        ns: &str,
        identity: &str,
        lease: &str,
        sa: &str,
    ) -> Result<Self> {
        Self::spawn(
            lab,
            ns,
            identity,
            lease,
            sa,
            &installed.controller_tls,
            &[],
            None,
        )
        .await
    }

    /// A replica running the in-cluster PKI (`--pki`, CA Secret `secret`),
    /// watching namespace `ns` (every namespace if empty):
    /// it issues its own identity into a directory of its own and serves
    /// the webhook and the certificate endpoint on the lab's bridge, whose
    /// address the API server and the pods reach. `extra` are more flags.
    pub async fn start_pki(
        lab: &KubeLab,
        ns: &str,
        identity: &str,
        lease: &str,
        webhook_config: &str,
        secret: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let tls = tempfile::Builder::new()
            .prefix("stillpoint-controller-tls-")
            .tempdir()?
            .keep();
        let gateway = lab.bridge.gateway().to_string();
        let mut args: Vec<String> = [
            "--pki",
            "--pki-secret",
            secret,
            "--webhook-config",
            webhook_config,
            "--webhook-host",
            &gateway,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push("--webhook-listen".into());
        args.push(format!("{gateway}:0"));
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proc =
            Self::spawn(lab, ns, identity, lease, CONTROLLER_SA, &tls, &args, None).await?;
        proc.tls_dir = Some(tls);
        Ok(proc)
    }

    /// A replica that reaches the API server only through `gate` (which
    /// a test cuts to partition it off); it reaches agents directly.
    pub async fn start_through(
        lab: &KubeLab,
        installed: &Installed,
        ns: &str,
        identity: &str,
        lease: &str,
        gate: &super::gate::Gate,
    ) -> Result<Self> {
        let tls = &installed.controller_tls;
        let through = Some(gate.addr());
        Self::spawn(lab, ns, identity, lease, CONTROLLER_SA, tls, &[], through).await
    }

    /// A controller process, reaching the API server at `through` if given
    /// (its certificate still checked for the lab's own address).
    #[allow(clippy::too_many_arguments)]
    async fn spawn(
        lab: &KubeLab,
        ns: &str,
        identity: &str,
        lease: &str,
        sa: &str,
        tls_dir: &Path,
        extra: &[&str],
        through: Option<std::net::SocketAddr>,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("stillpoint-controller-")
            .tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        lab.kubeconfig_for(CONTROLLER_NS, sa, &kubeconfig).await?;
        if let Some(addr) = through {
            let host = lab.api_address().ip();
            let config = std::fs::read_to_string(&kubeconfig)?.replace(
                &format!("server: {}\n", lab.server),
                &format!("server: https://{addr}\n    tls-server-name: {host}\n"),
            );
            std::fs::write(&kubeconfig, config)?;
        }
        let log = dir.path().join("controller.log");
        // The lab's short times (its schedules fire every few seconds),
        // unless `extra` gives its own.
        let lab_defaults: Vec<(&str, &str)> = [
            // Short, but with room for a loaded machine (the scale test
            // lists 1,000 backups while renewing).
            ("--lease-duration", "6s"),
            ("--renew-deadline", "4s"),
            ("--retry-period", "1s"),
            ("--resync", "5s"),
            ("--min-schedule-interval", "2s"),
        ]
        .into_iter()
        .filter(|(flag, _)| !extra.contains(flag))
        .collect();
        let out = std::fs::File::create(&log)?;
        let child = Command::new(controller_binary()?)
            .arg("controller")
            .args(["--kubeconfig", &kubeconfig.display().to_string()])
            .args(["--tls-dir", &tls_dir.display().to_string()])
            .args(["--trust-domain", TRUST_DOMAIN])
            .args(["--lease-namespace", CONTROLLER_NS, "--lease-name", lease])
            .args(
                lab_defaults
                    .iter()
                    .flat_map(|(flag, value)| [*flag, *value]),
            )
            .args(["--identity", identity])
            .args(match ns.is_empty() {
                true => vec![],
                false => vec!["--watch-namespace", ns],
            })
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .env("STILLPOINT_LOG", "info,stillpoint_controller=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn()
            .context("starting stillpoint controller")?;
        Ok(ControllerProc {
            child,
            identity: identity.into(),
            log,
            tls_dir: None,
            _dir: dir,
        })
    }

    /// Where the webhook and certificate endpoint listen (`--pki`), once
    /// the controller said so.
    pub async fn webhook_addr(&self, bound: Duration) -> Result<String> {
        let found = std::sync::Arc::new(std::sync::Mutex::new(None));
        wait_async("the controller's webhook address", bound, || {
            let found = found.clone();
            let logs = self.logs();
            async move {
                let addr = logs
                    .split("certificate endpoint on https://")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .map(str::to_string);
                let some = addr.is_some();
                *found.lock().unwrap() = addr;
                Ok(some)
            }
        })
        .await
        .with_context(|| self.logs())?;
        let addr = found.lock().unwrap().clone().unwrap_or_default();
        Ok(addr)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `GET path` on its metrics listener: (status code, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        use std::io::{Read, Write};
        let logs = self.logs();
        let addr = logs
            .split("metrics on http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .context("the controller has not said where it listens yet")?;
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no HTTP status")?;
        let body = response
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        Ok((code, body))
    }

    /// SIGKILL: it gets no chance to thaw or release anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and waits for it to exit.
    pub fn terminate(&mut self, bound: Duration) -> Result<std::process::ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let deadline = std::time::Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "the controller did not exit within {bound:?} of SIGTERM:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.tls_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
