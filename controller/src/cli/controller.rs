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
use crate::kube::inject::InjectConfig;
use crate::kube::leader::Timing;
use crate::kube::pki::Pki;
use crate::kube::webhook::{self, OwnIdentity, Webhook, WebhookSettings};

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
    /// How long the leader Lease lasts without a change a standby observes
    /// (a standby takes over this long after it last saw the leader renew,
    /// judged by its own clock). Longer than --renew-deadline.
    #[arg(long, env = "STILLPOINT_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// How long the leader goes on acting without a successful renewal:
    /// past it, it aborts and thaws what it runs and stops leading. Every
    /// Lease request is bounded by it. Longer than 1.2 × --retry-period.
    #[arg(long, env = "STILLPOINT_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub renew_deadline: Duration,
    /// How often the leader renews the Lease and a standby tries for it.
    #[arg(long, env = "STILLPOINT_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub retry_period: Duration,
    /// This replica's name: the Lease holder, `status.runBy` of its backups
    /// (default: the pod name, else the host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How often each ConsistencyGroup is resolved again without changes.
    #[arg(long, env = "STILLPOINT_RESYNC", default_value = "30s", value_parser = parse_duration)]
    pub resync: Duration,
    /// The most reconciles of one kind (groups, backups, schedules, ...)
    /// that run at once; the others wait their turn. Bounds the requests
    /// a leader sends when it starts over many objects, so its Lease
    /// renewals are not queued behind them at the API server. 0: no bound.
    #[arg(
        long,
        env = "STILLPOINT_MAX_CONCURRENT_RECONCILES",
        default_value_t = 10
    )]
    pub max_concurrent_reconciles: u16,
    /// The shortest interval a BackupSchedule may fire at; one that fires
    /// more often is refused (condition Valid=False, InvalidSpec).
    #[arg(long, env = "STILLPOINT_MIN_SCHEDULE_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub min_schedule_interval: Duration,
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
    #[command(flatten)]
    pub pki: PkiArgs,
}

/// The in-cluster PKI, the injecting webhook and the agents' certificate
/// endpoint.
#[derive(Debug, Args)]
pub struct PkiArgs {
    /// Run the in-cluster PKI: keep the CA in Secret --pki-secret (created
    /// once, reused after restarts), issue this controller's identity into
    /// --tls-dir (which must be writable), and serve the injecting webhook
    /// and the agents' certificate endpoint on --webhook-listen. Without
    /// it, --tls-dir holds certificates made elsewhere (cert-manager,
    /// `stillpoint certs`).
    #[arg(long, env = "STILLPOINT_PKI")]
    pub pki: bool,
    /// The Secret (in --lease-namespace) holding the CA.
    #[arg(long, env = "STILLPOINT_PKI_SECRET", default_value = "stillpoint-ca")]
    pub pki_secret: String,
    /// How long a new CA is valid; it is rotated two thirds of the way in,
    /// the previous one trusted until it expires.
    #[arg(long, env = "STILLPOINT_CA_VALIDITY", default_value = "365d", value_parser = parse_duration)]
    pub ca_validity: Duration,
    /// How long an agent's (and this controller's) certificate is valid;
    /// renewed two thirds of the way in.
    #[arg(long, env = "STILLPOINT_AGENT_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub agent_cert_ttl: Duration,
    /// The controller's ServiceAccount (its identity is
    /// `spiffe://<trust-domain>/ns/<lease-namespace>/sa/<this>`).
    #[arg(
        long,
        env = "STILLPOINT_SERVICE_ACCOUNT",
        default_value = "stillpoint-controller"
    )]
    pub service_account: String,
    /// HTTPS address of the webhook and the certificate endpoint.
    #[arg(
        long,
        env = "STILLPOINT_WEBHOOK_LISTEN",
        default_value = "0.0.0.0:9444"
    )]
    pub webhook_listen: SocketAddr,
    /// Names (DNS or IP) of the endpoint's serving certificate (default:
    /// the Service `stillpoint-webhook` in --lease-namespace, deploy/webhook.yaml).
    #[arg(
        long = "webhook-host",
        env = "STILLPOINT_WEBHOOK_HOSTS",
        value_delimiter = ','
    )]
    pub webhook_hosts: Vec<String>,
    /// The MutatingWebhookConfiguration whose caBundle the leader keeps current.
    #[arg(
        long,
        env = "STILLPOINT_WEBHOOK_CONFIG",
        default_value = "stillpoint-injector"
    )]
    pub webhook_config: String,
    /// The largest AdmissionReview body the webhook reads; a larger one is
    /// answered 413 (and, with `failurePolicy: Fail`, its pod is not
    /// created). The default fits a pod with the API server's 256 KiB of
    /// annotations and a large spec; at most 3 MiB.
    #[arg(
        long,
        env = "STILLPOINT_WEBHOOK_MAX_REVIEW_BYTES",
        default_value_t = webhook::DEFAULT_MAX_REVIEW,
        value_parser = review_limit
    )]
    pub webhook_max_review_bytes: usize,
    /// The URL injected agents ask for their certificate at (default:
    /// `https://<first --webhook-host>:<port>/v1/certificate`).
    #[arg(long, env = "STILLPOINT_CERTIFICATE_URL")]
    pub certificate_url: Option<String>,
    /// How often each replica re-reads the CA Secret and renews its
    /// certificates, and the leader takes the next step of a CA rotation
    /// and republishes the bundle.
    #[arg(long, env = "STILLPOINT_PKI_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub pki_interval: Duration,
    /// The agent image the webhook injects (and GroupRestore runs in
    /// restore mode).
    #[arg(
        long,
        env = "STILLPOINT_AGENT_IMAGE",
        default_value = concat!("ghcr.io/stillpoint-dev/stillpoint-agent:", env!("CARGO_PKG_VERSION"))
    )]
    pub agent_image: String,
    /// Inject the agent as a native sidecar (`auto`: when the API server is
    /// 1.29 or newer), or as a regular container.
    #[arg(
        long,
        env = "STILLPOINT_NATIVE_SIDECARS",
        value_enum,
        default_value = "auto"
    )]
    pub native_sidecars: NativeSidecars,
}

/// Whether injected agents are native sidecars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NativeSidecars {
    Auto,
    Always,
    Never,
}

/// `--webhook-max-review-bytes`: 4 KiB to 3 MiB.
fn review_limit(text: &str) -> Result<usize, String> {
    let bytes: usize = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of bytes"))?;
    match bytes {
        4096..=webhook::MAX_REVIEW_LIMIT => Ok(bytes),
        _ => Err(format!(
            "{bytes} is outside 4096..={} (the API server's own request limit)",
            webhook::MAX_REVIEW_LIMIT
        )),
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    stillpoint_proto::duration::parse_duration(text)
}

/// A client from a kubeconfig file, or the default chain.
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    kube_client_in(kubeconfig, None).await
}

/// A client from a kubeconfig file (or KUBECONFIG, ~/.kube/config) and
/// one of its contexts (default: its current context), or the default
/// chain when neither is given.
pub async fn kube_client_in(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> anyhow::Result<kube::Client> {
    let options = kube::config::KubeConfigOptions {
        context: context.map(str::to_string),
        ..Default::default()
    };
    let config = match (kubeconfig, context) {
        (Some(path), _) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| format!("the kubeconfig {} is not usable", path.display()))?
        }
        (None, Some(context)) => kube::Config::from_kubeconfig(&options)
            .await
            .with_context(|| format!("the kubeconfig context {context:?} is not usable"))?,
        (None, None) => kube::Config::infer().await.context(
            "no Kubernetes configuration: set KUBECONFIG, --kubeconfig, or run in a pod",
        )?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// Starts the in-cluster PKI and the webhook endpoint; returns the
/// endpoint (whose upkeep the caller starts once it knows who leads).
async fn start_pki(
    args: &ControllerArgs,
    client: &kube::Client,
) -> anyhow::Result<(std::sync::Arc<Webhook>, OwnIdentity, time::OffsetDateTime)> {
    let p = &args.pki;
    let ns = &args.lease_namespace;
    if p.ca_validity < p.agent_cert_ttl * 3 {
        anyhow::bail!(
            "--ca-validity ({:?}) must be at least three times --agent-cert-ttl ({:?}): a rotation \
             trusts the next CA for one certificate lifetime before it signs",
            p.ca_validity,
            p.agent_cert_ttl
        );
    }
    let pki = Pki::load_or_create(
        client.clone(),
        ns,
        &p.pki_secret,
        p.ca_validity,
        p.agent_cert_ttl,
    )
    .await
    .with_context(|| format!("the CA in Secret {ns}/{}", p.pki_secret))?;
    let identity = format!(
        "spiffe://{}/ns/{ns}/sa/{}",
        args.trust_domain, p.service_account
    );
    let own = OwnIdentity {
        dir: args.tls_dir.clone(),
        uri: identity.clone(),
        ttl: p.agent_cert_ttl,
    };
    let own_not_after = pki
        .write_identity(&own.dir, &own.uri, own.ttl)
        .with_context(|| {
            format!(
                "writing the controller's identity into {}",
                own.dir.display()
            )
        })?;
    let hosts = match p.webhook_hosts.is_empty() {
        false => p.webhook_hosts.clone(),
        true => vec![
            format!("stillpoint-webhook.{ns}.svc"),
            format!("stillpoint-webhook.{ns}.svc.cluster.local"),
        ],
    };
    let listener = tokio::net::TcpListener::bind(p.webhook_listen)
        .await
        .with_context(|| format!("cannot listen on {} (--webhook-listen)", p.webhook_listen))?;
    let listening = listener.local_addr().unwrap_or(p.webhook_listen);
    let url = p.certificate_url.clone().unwrap_or_else(|| {
        let host = &hosts[0];
        let host = match host.parse::<std::net::Ipv6Addr>() {
            Ok(_) => format!("[{host}]"),
            Err(_) => host.clone(),
        };
        format!("https://{host}:{}/v1/certificate", listening.port())
    });
    let native = match p.native_sidecars {
        NativeSidecars::Always => true,
        NativeSidecars::Never => false,
        NativeSidecars::Auto => {
            let v = client
                .apiserver_version()
                .await
                .context("reading the API server's version (for --native-sidecars auto)")?;
            let minor: u32 = v.minor.trim_end_matches('+').parse().unwrap_or(0);
            v.major == "1" && minor >= 29
        }
    };
    let settings = WebhookSettings {
        hosts,
        identity: identity.clone(),
        trust_domain: args.trust_domain.clone(),
        agent_cert_ttl: p.agent_cert_ttl,
        serving_cert_ttl: p.agent_cert_ttl,
        webhook_config: p.webhook_config.clone(),
        max_review: p.webhook_max_review_bytes,
        inject: InjectConfig {
            image: p.agent_image.clone(),
            native_sidecars: native,
            controller_identity: identity,
            certificate_url: url,
            version: env!("CARGO_PKG_VERSION").to_string(),
        },
    };
    let webhook = Webhook::new(client.clone(), std::sync::Arc::new(pki), settings)?;
    eprintln!("stillpoint controller: webhook and certificate endpoint on https://{listening}");
    tokio::spawn(webhook.clone().serve(listener));
    Ok((webhook, own, own_not_after))
}

pub fn run(args: ControllerArgs, _global: &Global) -> anyhow::Result<()> {
    let timing = Timing {
        lease_duration: args.lease_duration,
        renew_deadline: args.renew_deadline,
        retry_period: args.retry_period,
    };
    timing.validate().map_err(anyhow::Error::msg)?;
    let runtime = super::runtime()?;
    runtime.block_on(async {
        let pki = match args.pki.pki {
            true => {
                let client = kube_client(args.kubeconfig.as_deref()).await?;
                Some(start_pki(&args, &client).await?)
            }
            false => None,
        };
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
            timing,
            trust_domain: args.trust_domain.clone(),
            resync: args.resync,
            max_concurrent_reconciles: args.max_concurrent_reconciles,
            namespace: args.watch_namespace.clone(),
            agent_image: args.pki.agent_image.clone(),
            min_schedule_interval: args.min_schedule_interval,
        };
        let ctx = Context::new(client, tls, settings);
        let listener = tokio::net::TcpListener::bind(args.metrics_listen)
            .await
            .with_context(|| format!("cannot listen on {} (--metrics-listen)", args.metrics_listen))?;
        let listening = listener.local_addr().unwrap_or(args.metrics_listen);
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        if let Some((webhook, own, own_not_after)) = pki {
            tokio::spawn(webhook::publish_bundles(
                webhook.clone(),
                args.pki.webhook_config.clone(),
                ready_tx.subscribe(),
            ));
            tokio::spawn(webhook::upkeep(
                webhook,
                own,
                own_not_after,
                args.pki.webhook_config.clone(),
                ready_tx.subscribe(),
                args.pki.pki_interval,
            ));
        }
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
