//! `stillpoint controller`: Kubernetes mode's control plane — the
//! ConsistencyGroup and GroupBackup reconcilers (while this replica holds
//! the leader Lease), `/metrics`, `/healthz` and `/readyz`.
//! `stillpoint crds`: the CustomResourceDefinitions, as YAML.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use hyper::{Method, StatusCode};
use stillpoint_proto::admin::{self, OPENMETRICS, TEXT};
use stillpoint_proto::tls::TlsFiles;
use tokio::signal::unix::{SignalKind, signal};

use super::Global;
use crate::core::agents::ControllerTls;
use crate::kube::controller::{self, Context, Settings};
use crate::metrics::metrics;

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Directory with the controller's client identity for dialling agents
    /// (`tls.crt`, `tls.key`, `ca.crt`: a kubernetes.io/tls Secret with the
    /// CA, or `stillpoint certs issue --out`). Re-read every 10 s.
    #[arg(
        long,
        env = "STILLPOINT_TLS_DIR",
        default_value = "/etc/stillpoint/tls"
    )]
    pub tls_dir: PathBuf,
    /// The trust domain of the agents' identities
    /// (`spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`).
    #[arg(long, env = "STILLPOINT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Namespace of the leader Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "stillpoint-system")]
    pub lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "STILLPOINT_LEASE_NAME",
        default_value = "stillpoint-controller"
    )]
    pub lease_name: String,
    /// How long the leader Lease lasts without renewal (a standby takes
    /// over this long after the leader died); renewed every third of it.
    #[arg(long, env = "STILLPOINT_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// This replica's name: the Lease holder, `status.runBy` of its backups
    /// (default: the pod name, else the host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How often each ConsistencyGroup is resolved again without changes.
    #[arg(long, env = "STILLPOINT_RESYNC", default_value = "30s", value_parser = parse_duration)]
    pub resync: Duration,
    /// Watch only this namespace's ConsistencyGroups and GroupBackups
    /// (default: every namespace; the ClusterRole allows both).
    #[arg(long, env = "STILLPOINT_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Address of the plain-HTTP listener for `/metrics`, `/healthz`, `/readyz`.
    #[arg(
        long,
        env = "STILLPOINT_METRICS_LISTEN",
        default_value = "0.0.0.0:9464"
    )]
    pub metrics_listen: SocketAddr,
    /// Kubeconfig file (default: `KUBECONFIG`, `~/.kube/config`, or the
    /// in-cluster ServiceAccount).
    #[arg(long, env = "STILLPOINT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    stillpoint_proto::duration::parse_duration(text)
}

/// A client from a kubeconfig file, or the default chain.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("the kubeconfig {} is not usable", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes configuration: set KUBECONFIG, --kubeconfig, or run in a pod",
        )?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

pub fn run(args: ControllerArgs, _global: &Global) -> anyhow::Result<()> {
    let runtime = super::runtime()?;
    runtime.block_on(async {
        let tls = ControllerTls::watch(TlsFiles::in_dir(&args.tls_dir), Duration::from_secs(10))
            .with_context(|| {
                format!(
                    "the controller's identity in {} is not usable (--tls-dir: tls.crt, tls.key, ca.crt)",
                    args.tls_dir.display()
                )
            })?;
        let client = kube_client(args.kubeconfig.as_deref()).await?;
        let identity = args.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        let settings = Settings {
            identity: identity.clone(),
            lease_namespace: args.lease_namespace.clone(),
            lease_name: args.lease_name.clone(),
            lease_duration: args.lease_duration,
            trust_domain: args.trust_domain.clone(),
            resync: args.resync,
            namespace: args.watch_namespace.clone(),
        };
        let ctx = Context::new(client, tls, settings);
        let listener = tokio::net::TcpListener::bind(args.metrics_listen)
            .await
            .with_context(|| format!("cannot listen on {} (--metrics-listen)", args.metrics_listen))?;
        let listening = listener.local_addr().unwrap_or(args.metrics_listen);
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        tokio::spawn(admin::serve(listener, move |method, path| match (method, path) {
            (&Method::GET, "/healthz") => (StatusCode::OK, TEXT, "ok\n".to_string()),
            // Ready while leading: a standby is alive but not serving.
            (&Method::GET, "/readyz") => match *ready.borrow() {
                true => (StatusCode::OK, TEXT, "leading\n".to_string()),
                false => (StatusCode::SERVICE_UNAVAILABLE, TEXT, "standby: not the leader\n".to_string()),
            },
            (&Method::GET, "/metrics") => (StatusCode::OK, OPENMETRICS, metrics().encode()),
            _ => admin::not_found(),
        }));
        let (stop, shutdown) = tokio::sync::watch::channel(None);
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        tokio::spawn(async move {
            let reason = tokio::select! {
                _ = term.recv() => "the controller received SIGTERM",
                _ = tokio::signal::ctrl_c() => "the controller was interrupted (SIGINT)",
            };
            let _ = stop.send(Some(reason.to_string()));
        });
        eprintln!(
            "stillpoint controller {identity}: waiting for the leader Lease {}/{}; metrics on http://{}/metrics",
            args.lease_namespace, args.lease_name, listening
        );
        controller::run(ctx, shutdown, ready_tx).await?;
        eprintln!("stillpoint controller {identity}: stopped; every member thawed, the Lease released");
        Ok(())
    })
}

/// `stillpoint crds`.
pub fn crds() -> anyhow::Result<()> {
    print!("{}", crate::kube::crd::crds_yaml());
    Ok(())
}
