//! The lab's kubelet: runs the pods bound to the lab's node as processes of
//! this machine, faithfully enough that Kubernetes code under test needs no
//! special case.
//!
//! - Pods nobody scheduled (no `nodeName`, the default scheduler) are bound
//!   to the lab's node.
//! - Each pod gets its own network namespace on the lab's bridge; its
//!   address is `status.podIP`/`podIPs`, and its containers share it.
//! - Each container runs in its own mount namespace on an overlay of the
//!   host's root filesystem (so nothing it writes outside its volumes
//!   reaches the host), with its volumes bind-mounted at their
//!   `mountPath`s: PVCs of the lab's CSI driver (the volume's directory),
//!   `emptyDir`, `hostPath`, Secret, ConfigMap, downward API and projected
//!   volumes, including ServiceAccount tokens from TokenRequest (audience
//!   and expiry as asked, bound to the pod, refreshed at 80% of their life).
//! - Each pod's `/etc/resolv.conf` names the lab's cluster DNS ([`super::dns`])
//!   with the namespace's search path, unless its `dnsPolicy` is `Default`.
//! - Images are not pulled. An image's name (without registry and tag)
//!   chooses the host program it stands for, when the container gives no
//!   `command`: `stillpoint-agent` → the built agent; `postgres` →
//!   PostgreSQL's `postgres`; `mariadb`, `mysql` → `mariadbd`; `redis`,
//!   `valkey` → `redis-server`; `busybox`, `debian`, `alpine`, `ubuntu` →
//!   `/bin/sh`. Any other image fails its container (`ImageNotMapped`).
//!   `command`/`args`, `env` (with `valueFrom` secretKeyRef,
//!   configMapKeyRef, fieldRef) and `envFrom`, `workingDir`, `runAsUser`,
//!   `runAsGroup` and `fsGroup` are honoured; PostgreSQL's programs are on
//!   the default `PATH`.
//! - Init containers run in order; native sidecars (`initContainers` with
//!   `restartPolicy: Always`) start before the app containers and keep
//!   running; exec / tcpSocket / httpGet startup, readiness and liveness
//!   probes set `started`, `ready` and the pod's conditions; containers
//!   restart per `restartPolicy` (backoff 1 s doubling to 30 s).
//! - Deleting a pod stops its containers (SIGTERM to each process group,
//!   SIGKILL after the grace period; app containers before sidecars), then
//!   removes its namespace and files, and the pod object.
//!
//! What it cannot do fails the pod visibly: a waiting reason and message on
//! the container, or a pod condition, never silence.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PersistentVolume, PersistentVolumeClaim, Pod, Probe, Secret,
    ServiceAccount, Volume,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{KubeLab, NODE, csi, net};

/// The default `PATH` inside containers (PostgreSQL's programs included).
fn default_path() -> String {
    let pg = stillpoint_lab::servers::postgres::bindir()
        .map(|p| format!("{}:", p.display()))
        .unwrap_or_default();
    format!("{pg}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
}

/// The host program an image stands for (see the module docs).
pub fn entrypoint(image: &str) -> Option<Vec<String>> {
    let name = image.rsplit('/').next().unwrap_or(image);
    let name = name.split(['@', ':']).next().unwrap_or(name);
    let program = match name {
        n if n.contains("stillpoint-agent") => crate::harness::agent::agent_binary()
            .ok()?
            .display()
            .to_string(),
        n if n.contains("stillpoint-controller") => crate::harness::agent::controller_binary()
            .ok()?
            .display()
            .to_string(),
        "postgres" | "postgresql" => stillpoint_lab::servers::postgres::bindir()
            .ok()?
            .join("postgres")
            .display()
            .to_string(),
        "mariadb" | "mysql" => "/usr/sbin/mariadbd".into(),
        "redis" | "valkey" => "/usr/bin/redis-server".into(),
        "busybox" | "debian" | "alpine" | "ubuntu" => "/bin/sh".into(),
        _ => return None,
    };
    Some(vec![program])
}

/// The network namespace of the pod with `uid`.
pub(crate) fn netns_name(uid: &str) -> String {
    format!("spl-{}", &uid[..uid.len().min(12)])
}

/// Single-quotes a word for `sh`.
fn q(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// What the runner keeps of each pod it runs, for teardown and faults:
/// each running container's name and process group.
#[derive(Debug, Default)]
struct Shared {
    groups: Mutex<Vec<(String, u32)>>,
}

#[derive(Debug)]
struct Handle {
    stop: watch::Sender<bool>,
    shared: Arc<Shared>,
}

/// Everything a pod task needs.
struct Ctx {
    client: kube::Client,
    /// The API server's address (`https://<host>:<port>`), which pods reach.
    server: String,
    dir: PathBuf,
    bridge: Arc<net::Bridge>,
    csi: Arc<csi::CsiDriver>,
    pods: Mutex<HashMap<String, Handle>>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The running kubelet stand-in.
#[derive(Debug)]
pub struct PodRunner {
    ctx: Arc<Ctx>,
    task: tokio::task::JoinHandle<()>,
}

impl PodRunner {
    /// Starts watching pods (on the current runtime).
    pub async fn start(lab: &KubeLab) -> Result<PodRunner> {
        let ctx = Arc::new(Ctx {
            client: lab.admin().await?,
            server: lab.server.clone(),
            dir: lab.dir.join("pods"),
            bridge: lab.bridge.clone(),
            csi: lab.csi(),
            pods: Mutex::new(HashMap::new()),
        });
        std::fs::create_dir_all(&ctx.dir)?;
        let task = tokio::spawn(watch_pods(ctx.clone()));
        Ok(PodRunner { ctx, task })
    }

    /// Kills every container and removes every pod network (teardown; the
    /// pods' files go with the lab's directory).
    pub fn stop_all(self) {
        self.task.abort();
        let (uids, handles): (Vec<String>, Vec<Handle>) =
            self.ctx.pods.lock().unwrap().drain().unzip();
        for h in &handles {
            let _ = h.stop.send(true);
            for (_, group) in h.shared.groups.lock().unwrap().iter() {
                kill_group(*group, "KILL");
            }
        }
        for h in &handles {
            for (_, group) in h.shared.groups.lock().unwrap().iter() {
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while crate::harness::pid_alive(*group) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        // By name, not by what each pod task recorded: a task that is
        // releasing its network right now has already cleared its record.
        for uid in &uids {
            let netns = netns_name(uid);
            if super::net::namespaces_with_prefix(&netns).contains(&netns) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &netns])
                    .status();
            }
        }
    }
}

impl PodRunner {
    /// `signal` to the main process of container `container` of the pod
    /// with `uid` (KILL: the pod's task sees it exit and restarts it).
    pub fn signal_container(&self, uid: &str, container: &str, signal: &str) -> Result<()> {
        let pods = self.ctx.pods.lock().unwrap();
        let handle = pods.get(uid).context("the runner does not run this pod")?;
        let groups = handle.shared.groups.lock().unwrap();
        let (_, pid) = groups
            .iter()
            .find(|(name, _)| name == container)
            .with_context(|| format!("container {container} is not running"))?;
        crate::harness::signal(*pid, signal);
        Ok(())
    }

    /// SIGKILL to every process of every pod (a node crash); the pods'
    /// tasks restart their containers. Returns how many were killed.
    pub fn kill_all(&self) -> usize {
        let pods = self.ctx.pods.lock().unwrap();
        let mut killed = 0;
        for handle in pods.values() {
            for (_, group) in handle.shared.groups.lock().unwrap().iter() {
                kill_group(*group, "KILL");
                killed += 1;
            }
        }
        killed
    }
}

fn kill_group(group: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{group}")])
        .stderr(std::process::Stdio::null())
        .status();
}

async fn watch_pods(ctx: Arc<Ctx>) {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    // Backing off: while the API server is down, a watch that retries at
    // once would spin.
    let mut events = watcher(pods.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let pod = match event {
            Ok(watcher::Event::Apply(pod)) | Ok(watcher::Event::InitApply(pod)) => pod,
            Ok(watcher::Event::Delete(pod)) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                if let Some(h) = ctx.pods.lock().unwrap().get(&uid) {
                    let _ = h.stop.send(true);
                }
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!("pod watch: {e}");
                continue;
            }
        };
        if let Err(e) = on_pod(&ctx, pod).await {
            tracing::warn!("pod runner: {e:#}");
        }
    }
}

async fn on_pod(ctx: &Arc<Ctx>, pod: Pod) -> Result<()> {
    let (ns, name) = (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    );
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    match spec.node_name.as_deref() {
        None | Some("") if !terminating => {
            let ours = spec
                .scheduler_name
                .as_deref()
                .is_none_or(|s| s == "default-scheduler");
            if ours {
                let binding = json!({
                    "apiVersion": "v1", "kind": "Binding",
                    "metadata": {"name": name, "namespace": ns},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
                });
                let _: serde_json::Value = api
                    .create_subresource("binding", &name, &PostParams::default(), &binding)
                    .await
                    .with_context(|| format!("binding {ns}/{name}"))?;
            }
            return Ok(());
        }
        Some(NODE) => {}
        _ => return Ok(()),
    }
    let known = ctx.pods.lock().unwrap().get(&uid).map(|h| h.stop.clone());
    match (known, terminating) {
        (Some(stop), true) => {
            let _ = stop.send(true);
        }
        (Some(_), false) => {}
        (None, true) => {
            // Never ran here (or already stopped): the final removal.
            let _ = api
                .delete(&name, &DeleteParams::default().grace_period(0))
                .await;
        }
        (None, false) => {
            let done = matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
            if done {
                return Ok(());
            }
            let (stop, stopped) = watch::channel(false);
            let shared = Arc::new(Shared::default());
            ctx.pods.lock().unwrap().insert(
                uid.clone(),
                Handle {
                    stop,
                    shared: shared.clone(),
                },
            );
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut task = PodTask::new(ctx.clone(), pod, shared, stopped);
                if let Err(e) = task.run().await {
                    tracing::warn!("pod {ns}/{name}: {e:#}");
                }
                task.cleanup().await;
                ctx.pods.lock().unwrap().remove(&uid);
            });
        }
    }
    Ok(())
}

/// A projected token kept fresh.
#[derive(Debug, Clone)]
struct Token {
    path: PathBuf,
    audience: Option<String>,
    expiration: i64,
    fetched: Instant,
}

#[derive(Debug, Default, Clone)]
struct ProbeState {
    successes: i32,
    failures: i32,
    last: Option<Instant>,
}

#[derive(Debug)]
struct Running {
    child: tokio::process::Child,
    pid: u32,
    since: Instant,
    started_at: String,
}

#[derive(Debug, Clone)]
struct Exit {
    code: i32,
    reason: String,
    started_at: String,
    finished_at: String,
}

#[derive(Debug)]
struct Ctr {
    spec: Container,
    init: bool,
    sidecar: bool,
    running: Option<Running>,
    restarts: i32,
    last: Option<Exit>,
    /// An init container that finished successfully.
    done: bool,
    started: bool,
    ready: bool,
    next_start: Instant,
    backoff: Duration,
    waiting: Option<(String, String)>,
    startup: ProbeState,
    readiness: ProbeState,
    liveness: ProbeState,
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

struct PodTask {
    ctx: Arc<Ctx>,
    pod: Pod,
    ns: String,
    name: String,
    uid: String,
    dir: PathBuf,
    shared: Arc<Shared>,
    stopped: watch::Receiver<bool>,
    net: Option<net::PodNet>,
    /// Volume name → host directory.
    volumes: BTreeMap<String, PathBuf>,
    tokens: Vec<Token>,
    /// Secrets and ConfigMaps the containers' environment reads.
    lookups: Mutex<Lookups>,
    ctrs: Vec<Ctr>,
    start_time: String,
    failure: Option<(String, String)>,
    last_status: String,
}

impl PodTask {
    fn new(ctx: Arc<Ctx>, pod: Pod, shared: Arc<Shared>, stopped: watch::Receiver<bool>) -> Self {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let dir = ctx
            .dir
            .join(format!("{ns}_{name}_{}", &uid[..uid.len().min(8)]));
        let spec = pod.spec.clone().unwrap_or_default();
        let ctr = |c: &Container, init: bool| Ctr {
            sidecar: init && c.restart_policy.as_deref() == Some("Always"),
            spec: c.clone(),
            init,
            running: None,
            restarts: 0,
            last: None,
            done: false,
            started: false,
            ready: false,
            next_start: Instant::now(),
            backoff: Duration::from_secs(1),
            waiting: None,
            startup: ProbeState::default(),
            readiness: ProbeState::default(),
            liveness: ProbeState::default(),
        };
        let mut ctrs: Vec<Ctr> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| ctr(c, true))
            .collect();
        ctrs.extend(spec.containers.iter().map(|c| ctr(c, false)));
        PodTask {
            ctx,
            pod,
            ns,
            name,
            uid,
            dir,
            shared,
            stopped,
            net: None,
            volumes: BTreeMap::new(),
            tokens: Vec::new(),
            lookups: Mutex::new(Lookups::default()),
            ctrs,
            start_time: now_rfc3339(),
            failure: None,
            last_status: String::new(),
        }
    }

    fn spec(&self) -> k8s_openapi::api::core::v1::PodSpec {
        self.pod.spec.clone().unwrap_or_default()
    }

    fn api(&self) -> Api<Pod> {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    async fn run(&mut self) -> Result<()> {
        std::fs::create_dir_all(self.dir.join("volumes"))?;
        self.patch_status().await;
        // Volumes first: PVCs may still be binding.
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if *self.stopped.borrow() {
                return Ok(());
            }
            // Each attempt bounded: an API request that hangs is retried,
            // with why in the pod's conditions.
            let attempt = tokio::time::timeout(Duration::from_secs(20), self.prepare_volumes());
            let outcome = match attempt.await {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!("preparing the volumes took over 20 s")),
            };
            match outcome {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    self.failure = Some(("VolumesNotReady".into(), format!("{e:#}")));
                    self.patch_status().await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    self.failure = Some(("VolumesFailed".into(), format!("{e:#}")));
                    self.patch_status().await;
                    return Err(e);
                }
            }
        }
        self.failure = None;
        let netns = netns_name(&self.uid);
        let bridge = self.ctx.bridge.clone();
        let attach = tokio::task::spawn_blocking(move || bridge.attach(&netns));
        let net = match tokio::time::timeout(Duration::from_secs(60), attach).await {
            Ok(net) => net??,
            Err(_) => {
                let why = "attaching the pod to the lab's network took over 60 s";
                self.failure = Some(("NetworkNotReady".into(), why.into()));
                self.patch_status().await;
                bail!("{why}");
            }
        };
        self.net = Some(net);
        loop {
            if *self.stopped.borrow() {
                return Ok(());
            }
            self.step().await;
            self.patch_status().await;
            let mut stopped = self.stopped.clone();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stopped.changed() => {}
            }
        }
    }

    /// One round: start what is due, reap what exited, probe, refresh tokens.
    async fn step(&mut self) {
        let policy = self
            .spec()
            .restart_policy
            .unwrap_or_else(|| "Always".into());
        self.reap(&policy);
        // Init containers in order; each sidecar must have started, each
        // other one finished, before the next.
        let mut inits_done = true;
        for i in 0..self.ctrs.len() {
            if !self.ctrs[i].init {
                continue;
            }
            let c = &self.ctrs[i];
            let satisfied = if c.sidecar { c.started } else { c.done };
            if satisfied {
                continue;
            }
            inits_done = false;
            if c.running.is_none() && Instant::now() >= c.next_start && self.failure.is_none() {
                self.start(i);
            }
            break;
        }
        if inits_done {
            for i in 0..self.ctrs.len() {
                let c = &self.ctrs[i];
                let finished = c.last.is_some() && !c.init && !restarts(&policy, c);
                if !c.init && c.running.is_none() && !finished && Instant::now() >= c.next_start {
                    self.start(i);
                }
            }
        }
        for i in 0..self.ctrs.len() {
            self.probe(i).await;
        }
        self.refresh_tokens().await;
    }

    /// Collects exited containers and schedules restarts.
    fn reap(&mut self, policy: &str) {
        for c in &mut self.ctrs {
            let Some(running) = c.running.as_mut() else {
                continue;
            };
            let status = match running.child.try_wait() {
                Ok(Some(status)) => status,
                _ => continue,
            };
            let running = c.running.take().expect("checked");
            // Whatever the main process left behind in its group ends too.
            kill_group(running.pid, "KILL");
            self.shared
                .groups
                .lock()
                .unwrap()
                .retain(|(_, g)| *g != running.pid);
            let code = status.code().unwrap_or(137);
            c.last = Some(Exit {
                code,
                reason: if code == 0 {
                    "Completed".into()
                } else {
                    "Error".into()
                },
                started_at: running.started_at,
                finished_at: now_rfc3339(),
            });
            c.started = false;
            c.ready = false;
            c.readiness = ProbeState::default();
            c.liveness = ProbeState::default();
            c.startup = ProbeState::default();
            if c.init && !c.sidecar && code == 0 {
                c.done = true;
                continue;
            }
            if c.sidecar || restarts(policy, c) {
                if running.since.elapsed() > Duration::from_secs(60) {
                    c.backoff = Duration::from_secs(1);
                }
                c.next_start = Instant::now() + c.backoff;
                c.backoff = (c.backoff * 2).min(Duration::from_secs(30));
                c.restarts += 1;
                c.waiting = Some(("CrashLoopBackOff".into(), format!("exited with {code}")));
            }
        }
    }

    fn start(&mut self, i: usize) {
        match self.spawn(i) {
            Ok(running) => {
                let name = self.ctrs[i].spec.name.clone();
                self.shared.groups.lock().unwrap().push((name, running.pid));
                let c = &mut self.ctrs[i];
                c.waiting = None;
                c.running = Some(running);
                if c.spec.startup_probe.is_none() {
                    c.started = true;
                }
            }
            Err((reason, message)) => {
                let c = &mut self.ctrs[i];
                c.waiting = Some((reason, message));
                c.next_start = Instant::now() + c.backoff;
                c.backoff = (c.backoff * 2).min(Duration::from_secs(30));
            }
        }
    }

    /// The container's environment, every `valueFrom` resolved.
    fn environment(&self, c: &Container) -> std::result::Result<Vec<(String, String)>, String> {
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), default_path()),
            ("HOSTNAME".into(), self.name.clone()),
            ("HOME".into(), "/root".into()),
        ];
        // As the kubelet gives them, for in-cluster clients: the API
        // server itself (the lab has no service proxy).
        let server = self.ctx.server.trim_start_matches("https://");
        if let Some((host, port)) = server.rsplit_once(':') {
            env.push(("KUBERNETES_SERVICE_HOST".into(), host.into()));
            env.push(("KUBERNETES_SERVICE_PORT".into(), port.into()));
        }
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(n, _)| *n != k);
            env.push((k, v));
        };
        let lookups = self.lookups.lock().unwrap();
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            let data = if let Some(s) = &from.secret_ref {
                lookups.secrets.get(&s.name).cloned()
            } else if let Some(m) = &from.config_map_ref {
                lookups.config_maps.get(&m.name).cloned()
            } else {
                None
            };
            for (k, v) in data.unwrap_or_default() {
                set(&mut env, format!("{prefix}{k}"), v);
            }
        }
        for e in c.env.iter().flatten() {
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    if let Some(s) = &from.secret_key_ref {
                        lookups
                            .secrets
                            .get(&s.name)
                            .and_then(|d| d.get(&s.key).cloned())
                            .ok_or_else(|| format!("secret {} has no key {}", s.name, s.key))?
                    } else if let Some(m) = &from.config_map_key_ref {
                        lookups
                            .config_maps
                            .get(&m.name)
                            .and_then(|d| d.get(&m.key).cloned())
                            .ok_or_else(|| format!("configmap {} has no key {}", m.name, m.key))?
                    } else if let Some(f) = &from.field_ref {
                        self.field(&f.field_path)
                            .ok_or_else(|| format!("fieldRef {} is not supported", f.field_path))?
                    } else {
                        return Err(format!("env {}: this valueFrom is not supported", e.name));
                    }
                }
                (None, None) => String::new(),
            };
            set(&mut env, e.name.clone(), value);
        }
        Ok(env)
    }

    fn field(&self, path: &str) -> Option<String> {
        let spec = self.spec();
        Some(match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.ns.clone(),
            "metadata.uid" => self.uid.clone(),
            "spec.nodeName" => NODE.into(),
            "spec.serviceAccountName" => spec
                .service_account_name
                .unwrap_or_else(|| "default".into()),
            "status.podIP" => self.net.as_ref()?.address.to_string(),
            "status.hostIP" => self.ctx.bridge.gateway().to_string(),
            other => {
                let key = other
                    .strip_prefix("metadata.labels['")
                    .or_else(|| other.strip_prefix("metadata.annotations['"))?
                    .strip_suffix("']")?;
                let map = if other.starts_with("metadata.labels") {
                    self.pod.metadata.labels.clone()
                } else {
                    self.pod.metadata.annotations.clone()
                };
                map?.get(key)?.clone()
            }
        })
    }

    /// The uid/gid a container runs as (`None`: root, the image default
    /// here), and the pod's fsGroup as a supplementary group.
    fn identity(&self, c: &Container) -> (Option<i64>, Option<i64>) {
        let pod = self.spec().security_context.unwrap_or_default();
        let own = c.security_context.clone().unwrap_or_default();
        let user = own.run_as_user.or(pod.run_as_user);
        let group = own.run_as_group.or(pod.run_as_group);
        (user, group)
    }

    fn spawn(&self, i: usize) -> std::result::Result<Running, (String, String)> {
        let c = &self.ctrs[i].spec;
        let image = c.image.clone().unwrap_or_default();
        let mut argv = match &c.command {
            Some(command) if !command.is_empty() => command.clone(),
            _ => entrypoint(&image).ok_or_else(|| {
                (
                    "ImageNotMapped".to_string(),
                    format!(
                        "the lab runs no images: {image} stands for no host program (see the pod runner's image map)"
                    ),
                )
            })?,
        };
        argv.extend(c.args.clone().unwrap_or_default());
        let env = self
            .environment(c)
            .map_err(|m| ("CreateContainerConfigError".to_string(), m))?;
        let cdir = self.dir.join("containers").join(&c.name);
        let (upper, work, root) = (cdir.join("upper"), cdir.join("work"), cdir.join("root"));
        crate::harness::remove_tree(&cdir);
        for d in [&upper, &work, &root] {
            std::fs::create_dir_all(d)
                .map_err(|e| ("RunContainerError".to_string(), e.to_string()))?;
        }
        let mut script = vec![
            "set -e".to_string(),
            format!(
                "mount -t overlay overlay -o lowerdir=/,upperdir={},workdir={} {}",
                q(&upper.display().to_string()),
                q(&work.display().to_string()),
                q(&root.display().to_string())
            ),
            "R=".to_string() + &q(&root.display().to_string()),
            "mount -t proc proc \"$R/proc\"".into(),
            "mount --rbind /dev \"$R/dev\"".into(),
            "mount -t tmpfs -o mode=1777 tmpfs \"$R/dev/shm\"".into(),
            "mount --rbind /sys \"$R/sys\"".into(),
            "mount -t tmpfs -o mode=1777 tmpfs \"$R/tmp\"".into(),
            "mount -t tmpfs -o mode=755 tmpfs \"$R/run\"".into(),
            format!("hostname {}", q(&self.name)),
        ];
        // Cluster DNS (dnsPolicy ClusterFirst, the default): the lab's
        // resolver. The host's resolv.conf may be a link out of the root.
        if self.spec().dns_policy.as_deref().unwrap_or("ClusterFirst") == "ClusterFirst" {
            let conf = super::dns::resolv_conf(self.ctx.bridge.gateway(), &self.ns);
            script.push("rm -f \"$R/etc/resolv.conf\"".into());
            script.push(format!("printf '%s' {} > \"$R/etc/resolv.conf\"", q(&conf)));
        }
        // A mapped program built in a temp dir (a fresh clone under /tmp)
        // would be hidden by the container's own /tmp and /run.
        if let Some(program) = argv
            .first()
            .filter(|p| p.starts_with("/tmp/") || p.starts_with("/run/"))
        {
            let target = format!("\"$R\"{}", q(program));
            script.push(format!("mkdir -p \"$(dirname {target})\"; touch {target}"));
            script.push(format!("mount --bind {} {target}", q(program)));
        }
        for m in c.volume_mounts.iter().flatten() {
            let source = self.volumes.get(&m.name).ok_or_else(|| {
                (
                    "CreateContainerConfigError".to_string(),
                    format!("volume {} is not in the pod", m.name),
                )
            })?;
            let source = match m.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => {
                    let s = source.join(sub);
                    let _ = std::fs::create_dir_all(&s);
                    s
                }
                _ => source.clone(),
            };
            // The target is resolved inside the container's root: a link
            // such as /var/run -> /run must not lead out to the host's.
            script.push(format!(
                "T=\"$R$(chroot \"$R\" /usr/bin/realpath -m {})\"",
                q(&m.mount_path)
            ));
            let target = "\"$T\"";
            if source.is_dir() {
                script.push(format!("mkdir -p {target}"));
            } else {
                script.push(format!("mkdir -p \"$(dirname {target})\"; touch {target}"));
            }
            script.push(format!(
                "mount --bind {} {target}",
                q(&source.display().to_string())
            ));
            if m.read_only == Some(true) {
                script.push(format!("mount -o remount,bind,ro {target}"));
            }
        }
        let (user, group) = self.identity(c);
        let workdir = c.working_dir.clone().unwrap_or_else(|| "/".into());
        let mut exec = vec!["exec chroot \"$R\"".to_string()];
        if let Some(uid) = user {
            let fs_group = self
                .spec()
                .security_context
                .and_then(|s| s.fs_group)
                .map(|g| format!(" --groups={g}"))
                .unwrap_or_else(|| " --clear-groups".into());
            let gid = group.unwrap_or_else(|| passwd_gid(uid).unwrap_or(uid));
            exec.push(format!(
                "/usr/bin/setpriv --reuid={uid} --regid={gid}{fs_group}"
            ));
        }
        exec.push("/usr/bin/env -i".into());
        exec.extend(env.iter().map(|(k, v)| q(&format!("{k}={v}"))));
        exec.push("/bin/sh -c 'cd \"$0\" 2>/dev/null || cd /; exec \"$@\"'".into());
        exec.push(q(&workdir));
        exec.extend(argv.iter().map(|a| q(a)));
        script.push(exec.join(" "));
        let script_path = cdir.join("run.sh");
        std::fs::write(&script_path, script.join("\n") + "\n")
            .map_err(|e| ("RunContainerError".to_string(), e.to_string()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", c.name)))
            .map_err(|e| ("RunContainerError".to_string(), e.to_string()))?;
        let netns = self
            .net
            .as_ref()
            .map(|n| n.netns.clone())
            .unwrap_or_default();
        let child = tokio::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "sh",
            ])
            .arg(&script_path)
            .stdin(std::process::Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|e| ("RunContainerError".to_string(), e.to_string()))?,
            )
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| ("RunContainerError".to_string(), e.to_string()))?;
        let pid = child.id().unwrap_or(0);
        Ok(Running {
            child,
            pid,
            since: Instant::now(),
            started_at: now_rfc3339(),
        })
    }

    /// Runs container `i`'s probes that are due.
    async fn probe(&mut self, i: usize) {
        let Some(pid) = self.ctrs[i].running.as_ref().map(|r| r.pid) else {
            return;
        };
        let since = self.ctrs[i]
            .running
            .as_ref()
            .map(|r| r.since)
            .expect("running");
        let spec = self.ctrs[i].spec.clone();
        let ip = self.net.as_ref().map(|n| n.address);
        // Startup gates the others.
        if !self.ctrs[i].started {
            if let Some(p) = &spec.startup_probe
                && let Some(ok) =
                    due_probe(p, &mut self.ctrs[i].startup, since, pid, ip, &spec).await
            {
                let s = &mut self.ctrs[i].startup;
                if ok >= p.success_threshold.unwrap_or(1) {
                    self.ctrs[i].started = true;
                } else if s.failures >= p.failure_threshold.unwrap_or(3) {
                    kill_group(pid, "KILL");
                }
            }
            return;
        }
        match &spec.readiness_probe {
            None => self.ctrs[i].ready = true,
            Some(p) => {
                if let Some(ok) =
                    due_probe(p, &mut self.ctrs[i].readiness, since, pid, ip, &spec).await
                {
                    let threshold = p.failure_threshold.unwrap_or(3);
                    if ok >= p.success_threshold.unwrap_or(1) {
                        self.ctrs[i].ready = true;
                    } else if self.ctrs[i].readiness.failures >= threshold {
                        self.ctrs[i].ready = false;
                    }
                }
            }
        }
        if let Some(p) = &spec.liveness_probe
            && due_probe(p, &mut self.ctrs[i].liveness, since, pid, ip, &spec)
                .await
                .is_some()
            && self.ctrs[i].liveness.failures >= p.failure_threshold.unwrap_or(3)
        {
            // The kubelet restarts a container that fails its liveness probe.
            kill_group(pid, "TERM");
        }
    }

    async fn refresh_tokens(&mut self) {
        for i in 0..self.tokens.len() {
            let t = &self.tokens[i];
            let life = Duration::from_secs(t.expiration.max(600) as u64);
            if t.fetched.elapsed() > life.mul_f64(0.8) {
                let (path, audience, expiration) =
                    (t.path.clone(), t.audience.clone(), t.expiration);
                if self
                    .write_token(&path, audience.as_deref(), expiration)
                    .await
                    .is_ok()
                {
                    self.tokens[i].fetched = Instant::now();
                }
            }
        }
    }

    async fn write_token(
        &self,
        path: &Path,
        audience: Option<&str>,
        expiration: i64,
    ) -> Result<()> {
        let sa = self
            .spec()
            .service_account_name
            .unwrap_or_else(|| "default".into());
        let sas: Api<ServiceAccount> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: audience.map(|a| vec![a.to_string()]),
                expiration_seconds: Some(expiration),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(self.name.clone()),
                    uid: Some(self.uid.clone()),
                }),
            }),
            ..Default::default()
        };
        let token = sas
            .create_token_request(&sa, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {}/{sa}", self.ns))?
            .status
            .context("TokenRequest returned no token")?
            .token
            .context("TokenRequest returned no token")?;
        write_atomic(path, token.as_bytes(), 0o644)
    }

    /// Builds every volume of the pod under its directory.
    async fn prepare_volumes(&mut self) -> Result<()> {
        let spec = self.spec();
        let mut volumes = BTreeMap::new();
        let mut lookups = Lookups::default();
        // Everything env and volumes read, fetched once.
        let secrets: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let maps: Api<ConfigMap> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            for e in c.env.iter().flatten() {
                if let Some(from) = &e.value_from {
                    if let Some(s) = &from.secret_key_ref {
                        lookups.secret(&secrets, &s.name).await?;
                    }
                    if let Some(m) = &from.config_map_key_ref {
                        lookups.config_map(&maps, &m.name).await?;
                    }
                }
            }
            for from in c.env_from.iter().flatten() {
                if let Some(s) = &from.secret_ref {
                    lookups.secret(&secrets, &s.name).await?;
                }
                if let Some(m) = &from.config_map_ref {
                    lookups.config_map(&maps, &m.name).await?;
                }
            }
        }
        let mut tokens = Vec::new();
        for v in spec.volumes.iter().flatten() {
            let path = self.volume(v, &mut lookups, &mut tokens).await?;
            volumes.insert(v.name.clone(), path);
        }
        if let Some(group) = spec.security_context.and_then(|s| s.fs_group) {
            for (name, path) in &volumes {
                let owned = spec
                    .volumes
                    .iter()
                    .flatten()
                    .find(|v| &v.name == name)
                    .is_some_and(|v| v.host_path.is_none());
                if owned {
                    let _ = std::process::Command::new("chgrp")
                        .args(["-R", &group.to_string()])
                        .arg(path)
                        .status();
                    let _ = std::process::Command::new("chmod")
                        .args(["-R", "g+rwX"])
                        .arg(path)
                        .status();
                }
            }
        }
        self.volumes = volumes;
        self.tokens = tokens;
        *self.lookups.lock().unwrap() = lookups;
        Ok(())
    }

    async fn volume(
        &self,
        v: &Volume,
        lookups: &mut Lookups,
        tokens: &mut Vec<Token>,
    ) -> Result<PathBuf> {
        let dir = self.dir.join("volumes").join(&v.name);
        if let Some(claim) = &v.persistent_volume_claim {
            let pvcs: Api<PersistentVolumeClaim> =
                Api::namespaced(self.ctx.client.clone(), &self.ns);
            let pvc = pvcs.get(&claim.claim_name).await?;
            let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
            let pv_name = pvc.spec.and_then(|s| s.volume_name).filter(|_| bound);
            let pv_name =
                pv_name.with_context(|| format!("PVC {} is not bound yet", claim.claim_name))?;
            let pvs: Api<PersistentVolume> = Api::all(self.ctx.client.clone());
            let pv = pvs.get(&pv_name).await?;
            let source = pv.spec.and_then(|s| s.csi).with_context(|| {
                format!(
                    "PV {pv_name} is not a CSI volume: the lab mounts only its own driver's volumes"
                )
            })?;
            if source.driver != csi::DRIVER {
                bail!(
                    "PV {pv_name} is of driver {}, not the lab's {}",
                    source.driver,
                    csi::DRIVER
                );
            }
            return Ok(self.ctx.csi.volume_path(&source.volume_handle));
        }
        if let Some(host) = &v.host_path {
            return Ok(PathBuf::from(&host.path));
        }
        std::fs::create_dir_all(&dir)?;
        if v.empty_dir.is_some() {
            set_mode(&dir, 0o777)?;
            return Ok(dir);
        }
        if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let data = lookups.secret_data(self, &name).await?;
            write_items(&dir, &data, s.items.as_deref(), s.default_mode)?;
            return Ok(dir);
        }
        if let Some(m) = &v.config_map {
            let data = lookups.config_map_data(self, &m.name).await?;
            write_items(&dir, &data, m.items.as_deref(), m.default_mode)?;
            return Ok(dir);
        }
        if let Some(d) = &v.downward_api {
            for item in d.items.iter().flatten() {
                let value = item
                    .field_ref
                    .as_ref()
                    .and_then(|f| self.field(&f.field_path))
                    .with_context(|| format!("downward API item {} is not supported", item.path))?;
                write_atomic(&dir.join(&item.path), value.as_bytes(), 0o644)?;
            }
            return Ok(dir);
        }
        if let Some(p) = &v.projected {
            for source in p.sources.iter().flatten() {
                if let Some(t) = &source.service_account_token {
                    let path = dir.join(&t.path);
                    let expiration = t.expiration_seconds.unwrap_or(3600);
                    self.write_token(&path, t.audience.as_deref(), expiration)
                        .await?;
                    tokens.push(Token {
                        path,
                        audience: t.audience.clone(),
                        expiration,
                        fetched: Instant::now(),
                    });
                } else if let Some(m) = &source.config_map {
                    let data = lookups.config_map_data(self, &m.name).await?;
                    write_items(&dir, &data, m.items.as_deref(), None)?;
                } else if let Some(s) = &source.secret {
                    let data = lookups.secret_data(self, &s.name).await?;
                    write_items(&dir, &data, s.items.as_deref(), None)?;
                } else if let Some(d) = &source.downward_api {
                    for item in d.items.iter().flatten() {
                        let value = item
                            .field_ref
                            .as_ref()
                            .and_then(|f| self.field(&f.field_path))
                            .with_context(|| {
                                format!("downward API item {} is not supported", item.path)
                            })?;
                        write_atomic(&dir.join(&item.path), value.as_bytes(), 0o644)?;
                    }
                } else {
                    bail!(
                        "volume {}: a projected source the lab does not support",
                        v.name
                    );
                }
            }
            return Ok(dir);
        }
        bail!(
            "volume {}: this volume type is not supported by the lab's pod runner",
            v.name
        )
    }

    fn status_json(&self) -> serde_json::Value {
        let policy = self
            .spec()
            .restart_policy
            .unwrap_or_else(|| "Always".into());
        let status = |c: &Ctr| {
            let state = match (&c.running, &c.waiting, &c.last) {
                (Some(r), _, _) => json!({"running": {"startedAt": r.started_at}}),
                (None, Some((reason, message)), _) => {
                    json!({"waiting": {"reason": reason, "message": message}})
                }
                (None, None, Some(e)) => json!({"terminated": {
                    "exitCode": e.code, "reason": e.reason, "startedAt": e.started_at, "finishedAt": e.finished_at}}),
                (None, None, None) => json!({"waiting": {"reason": "PodInitializing"}}),
            };
            let mut s = json!({
                "name": c.spec.name,
                "image": c.spec.image.clone().unwrap_or_default(),
                "imageID": "",
                "ready": c.ready && c.running.is_some(),
                "started": c.started && c.running.is_some(),
                "restartCount": c.restarts,
                "state": state,
            });
            if let (Some(_), Some(e)) = (&c.running, &c.last) {
                s["lastState"] = json!({"terminated": {"exitCode": e.code, "reason": e.reason,
                    "startedAt": e.started_at, "finishedAt": e.finished_at}});
            }
            s
        };
        let inits: Vec<&Ctr> = self.ctrs.iter().filter(|c| c.init).collect();
        let apps: Vec<&Ctr> = self.ctrs.iter().filter(|c| !c.init).collect();
        let initialized = inits
            .iter()
            .all(|c| if c.sidecar { c.started } else { c.done });
        let ready = initialized
            && apps.iter().all(|c| c.ready && c.running.is_some())
            && inits
                .iter()
                .filter(|c| c.sidecar)
                .all(|c| c.ready && c.running.is_some());
        let all_exited =
            !apps.is_empty() && apps.iter().all(|c| c.running.is_none() && c.last.is_some());
        let phase = if self.net.is_none() {
            "Pending"
        } else if all_exited && apps.iter().all(|c| !restarts(&policy, c)) {
            if apps
                .iter()
                .all(|c| c.last.as_ref().is_some_and(|e| e.code == 0))
            {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if !initialized
            && inits
                .iter()
                .any(|c| !c.sidecar && c.last.as_ref().is_some_and(|e| e.code != 0))
            && policy == "Never"
        {
            "Failed"
        } else if initialized && apps.iter().any(|c| c.running.is_some()) {
            "Running"
        } else {
            "Pending"
        };
        let condition = |kind: &str, ok: bool, reason: Option<&(String, String)>| {
            let mut c = json!({"type": kind, "status": if ok { "True" } else { "False" }, "lastTransitionTime": null});
            if let (false, Some((r, m))) = (ok, reason) {
                c["reason"] = json!(r);
                c["message"] = json!(m);
            }
            c
        };
        let mut out = json!({
            "phase": phase,
            "hostIP": self.ctx.bridge.gateway().to_string(),
            "hostIPs": [{"ip": self.ctx.bridge.gateway().to_string()}],
            "startTime": self.start_time,
            "conditions": [
                condition("PodScheduled", true, None),
                condition("PodReadyToStartContainers", self.net.is_some(), self.failure.as_ref()),
                condition("Initialized", initialized, self.failure.as_ref()),
                condition("ContainersReady", ready, self.failure.as_ref()),
                condition("Ready", ready, self.failure.as_ref()),
            ],
            "initContainerStatuses": inits.iter().map(|c| status(c)).collect::<Vec<_>>(),
            "containerStatuses": apps.iter().map(|c| status(c)).collect::<Vec<_>>(),
        });
        if let Some(net) = &self.net {
            out["podIP"] = json!(net.address.to_string());
            out["podIPs"] = json!([{"ip": net.address.to_string()}]);
        }
        out
    }

    async fn patch_status(&mut self) {
        let status = self.status_json();
        let text = status.to_string();
        if text == self.last_status {
            return;
        }
        let patch = Patch::Merge(json!({"status": status}));
        match self
            .api()
            .patch_status(&self.name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => self.last_status = text,
            Err(e) => tracing::debug!("status of {}/{}: {e}", self.ns, self.name),
        }
    }

    /// Stops every container (app containers first, then sidecars, each
    /// SIGTERM then SIGKILL after the grace period), removes the pod's
    /// network and files, and the pod object.
    async fn cleanup(&mut self) {
        let grace = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30)
            .clamp(0, 30) as u64;
        let order: Vec<usize> = (0..self.ctrs.len())
            .filter(|i| !self.ctrs[*i].init)
            .chain((0..self.ctrs.len()).filter(|i| self.ctrs[*i].init).rev())
            .collect();
        for i in order {
            let Some(mut running) = self.ctrs[i].running.take() else {
                continue;
            };
            kill_group(running.pid, "TERM");
            let ended =
                tokio::time::timeout(Duration::from_secs(grace), running.child.wait()).await;
            kill_group(running.pid, "KILL");
            if ended.is_err() {
                let _ = running.child.wait().await;
            }
            self.shared
                .groups
                .lock()
                .unwrap()
                .retain(|(_, g)| *g != running.pid);
        }
        if let Some(net) = self.net.take() {
            self.ctx.bridge.release(net);
        }
        // The containers' mount namespaces ended with their processes.
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || crate::harness::remove_tree(&dir)).await;
        let deleted = self.pod.metadata.deletion_timestamp.is_some() || *self.stopped.borrow();
        if deleted {
            let params = DeleteParams::default().grace_period(0);
            let _ = self.api().delete(&self.name, &params).await;
        }
    }
}

fn restarts(policy: &str, c: &Ctr) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => c.last.as_ref().is_some_and(|e| e.code != 0),
        _ => true,
    }
}

/// The primary group of `uid` in the host's /etc/passwd.
fn passwd_gid(uid: i64) -> Option<i64> {
    std::fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[2] == uid.to_string())
        .and_then(|f| f[3].parse().ok())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("stillpoint-tmp");
    std::fs::write(&tmp, bytes)?;
    set_mode(&tmp, mode)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn write_items(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    mode: Option<i32>,
) -> Result<()> {
    let mode = mode.unwrap_or(0o644) as u32;
    match items {
        Some(items) => {
            for item in items {
                let value = data
                    .get(&item.key)
                    .with_context(|| format!("no key {} to project", item.key))?;
                write_atomic(
                    &dir.join(&item.path),
                    value,
                    item.mode.map_or(mode, |m| m as u32),
                )?;
            }
        }
        None => {
            for (k, v) in data {
                write_atomic(&dir.join(k), v, mode)?;
            }
        }
    }
    Ok(())
}

/// Secrets and ConfigMaps read for env and volumes.
#[derive(Debug, Default)]
struct Lookups {
    secrets: BTreeMap<String, BTreeMap<String, String>>,
    config_maps: BTreeMap<String, BTreeMap<String, String>>,
}

impl Lookups {
    async fn secret(&mut self, api: &Api<Secret>, name: &str) -> Result<()> {
        if !self.secrets.contains_key(name) {
            let s = api
                .get(name)
                .await
                .with_context(|| format!("secret {name}"))?;
            let data = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).to_string()))
                .chain(s.string_data.unwrap_or_default())
                .collect();
            self.secrets.insert(name.to_string(), data);
        }
        Ok(())
    }

    async fn config_map(&mut self, api: &Api<ConfigMap>, name: &str) -> Result<()> {
        if !self.config_maps.contains_key(name) {
            let m = api
                .get(name)
                .await
                .with_context(|| format!("configmap {name}"))?;
            self.config_maps
                .insert(name.to_string(), m.data.unwrap_or_default());
        }
        Ok(())
    }

    async fn secret_data(
        &mut self,
        task: &PodTask,
        name: &str,
    ) -> Result<BTreeMap<String, Vec<u8>>> {
        let api: Api<Secret> = Api::namespaced(task.ctx.client.clone(), &task.ns);
        let s = api
            .get(name)
            .await
            .with_context(|| format!("secret {name}"))?;
        self.secret(&api, name).await?;
        Ok(s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect())
    }

    async fn config_map_data(
        &mut self,
        task: &PodTask,
        name: &str,
    ) -> Result<BTreeMap<String, Vec<u8>>> {
        let api: Api<ConfigMap> = Api::namespaced(task.ctx.client.clone(), &task.ns);
        let m = api
            .get(name)
            .await
            .with_context(|| format!("configmap {name}"))?;
        self.config_map(&api, name).await?;
        Ok(m.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .chain(
                m.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            )
            .collect())
    }
}

/// Runs a probe if it is due; returns the consecutive successes after it
/// (0 after a failure), or `None` if it was not due.
async fn due_probe(
    p: &Probe,
    state: &mut ProbeState,
    since: Instant,
    pid: u32,
    ip: Option<Ipv4Addr>,
    c: &Container,
) -> Option<i32> {
    let delay = Duration::from_secs(p.initial_delay_seconds.unwrap_or(0).max(0) as u64);
    let period = Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64);
    if since.elapsed() < delay || state.last.is_some_and(|l| l.elapsed() < period) {
        return None;
    }
    state.last = Some(Instant::now());
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64);
    let ok = tokio::time::timeout(timeout, run_probe(p, pid, ip, c))
        .await
        .unwrap_or(false);
    if ok {
        state.successes += 1;
        state.failures = 0;
    } else {
        state.failures += 1;
        state.successes = 0;
    }
    Some(state.successes)
}

fn port(port: &IntOrString, c: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

async fn run_probe(p: &Probe, pid: u32, ip: Option<Ipv4Addr>, c: &Container) -> bool {
    if let Some(exec) = &p.exec {
        let command = exec.command.clone().unwrap_or_default();
        return tokio::process::Command::new("nsenter")
            .args([
                "-t",
                &pid.to_string(),
                "-m",
                "-n",
                "-u",
                "-r",
                "-w",
                "--",
                "/usr/bin/env",
                "-i",
            ])
            .arg(format!("PATH={}", default_path()))
            .args(&command)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .status()
            .await
            .is_ok_and(|s| s.success());
    }
    let Some(ip) = ip else {
        return false;
    };
    if let Some(tcp) = &p.tcp_socket {
        let Some(port) = port(&tcp.port, c) else {
            return false;
        };
        return tokio::net::TcpStream::connect((ip, port)).await.is_ok();
    }
    if let Some(http) = &p.http_get {
        let Some(port) = port(&http.port, c) else {
            return false;
        };
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        let Ok(mut stream) = tokio::net::TcpStream::connect((ip, port)).await else {
            return false;
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n");
        if stream.write_all(request.as_bytes()).await.is_err() {
            return false;
        }
        let mut head = [0u8; 16];
        let n = stream.read(&mut head).await.unwrap_or(0);
        let line = String::from_utf8_lossy(&head[..n]);
        return line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse::<u16>().ok())
            .is_some_and(|code| (200..400).contains(&code));
    }
    false
}
