//! The controller's Prometheus metrics. One process-wide registry:
//! `stillpoint serve` exposes it on `/metrics`, and every command writes it
//! to `--metrics-file` (for a textfile collector) when asked.

use std::sync::OnceLock;

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The namespace of a Kubernetes-mode series (`namespace="…"`, first);
/// local mode's series have none. Groups and schedules of two namespaces
/// may share a name: without it their series would be one.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Namespace(pub Option<String>);

impl EncodeLabelSet for Namespace {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some(ns) => [("namespace", ns.as_str())].encode(encoder),
            None => Ok(()),
        }
    }
}

impl Namespace {
    pub fn of(ns: Option<&str>) -> Namespace {
        Namespace(ns.filter(|n| !n.is_empty()).map(str::to_string))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    #[prometheus(flatten)]
    pub namespace: Namespace,
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    #[prometheus(flatten)]
    pub namespace: Namespace,
    pub group: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineLabel {
    pub engine: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SnapshotLabels {
    #[prometheus(flatten)]
    pub namespace: Namespace,
    pub group: String,
    pub driver: String,
    pub step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScheduleLabel {
    #[prometheus(flatten)]
    pub namespace: Namespace,
    pub schedule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabels {
    #[prometheus(flatten)]
    pub namespace: Namespace,
    pub schedule: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~26 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 20))
}

fn window_histogram() -> Histogram {
    // 250 µs .. ~33 s
    Histogram::new(exponential_buckets(0.00025, 2.0, 18))
}

/// Every metric the controller exports (prefix `stillpoint_`).
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub freeze_window: Histograms<GroupLabel>,
    pub backups: Family<ResultLabels, Counter>,
    pub agent_freeze: Histograms<EngineLabel>,
    pub agent_thaw: Histograms<EngineLabel>,
    pub agent_flush: Histograms<EngineLabel>,
    pub alignment_wait: Histograms<GroupLabel>,
    pub snapshot_failures: Family<SnapshotLabels, Counter>,
    pub schedule_runs: Family<ScheduleLabel, Counter>,
    pub schedule_skips: Family<SkipLabels, Counter>,
    pub schedule_missed: Family<ScheduleLabel, Counter>,
    pub retention_deletions: Family<ScheduleLabel, Counter>,
    pub restore_order_violations: Counter,
    pub webhook_refusals: Family<ReasonLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("stillpoint");
        let freeze_window = Histograms::new_with_constructor(window_histogram as fn() -> Histogram);
        registry.register(
            "freeze_window_seconds",
            "First freeze request to last thaw acknowledgement, per backup",
            freeze_window.clone(),
        );
        let backups = Family::default();
        registry.register(
            "backups",
            "Group backups by result (succeeded, failed, aborted)",
            backups.clone(),
        );
        let agent_freeze = Histograms::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "agent_freeze_seconds",
            "Time each engine took to freeze, as its agent reports it",
            agent_freeze.clone(),
        );
        let agent_thaw = Histograms::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "agent_thaw_seconds",
            "Time each engine took to thaw, as its agent reports it",
            agent_thaw.clone(),
        );
        let agent_flush = Histograms::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "agent_flush_seconds",
            "Time each engine's flush took before the cut (its own flush, e.g. a Redis save \
             while paused, plus syncfs of its volumes), as its agent reports it",
            agent_flush.clone(),
        );
        let alignment_wait =
            Histograms::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "alignment_wait_seconds",
            "Time a replica took to reach its frozen primary's position",
            alignment_wait.clone(),
        );
        let snapshot_failures = Family::default();
        registry.register(
            "snapshot_failures",
            "Snapshot coordination failures by driver and step (prepare, cut, ready, delete)",
            snapshot_failures.clone(),
        );
        let schedule_runs = Family::default();
        registry.register(
            "schedule_runs",
            "Scheduled backups started",
            schedule_runs.clone(),
        );
        let schedule_skips = Family::default();
        registry.register(
            "schedule_skips",
            "Scheduled runs not started, by reason (overlap: the group was still being backed up)",
            schedule_skips.clone(),
        );
        let schedule_missed = Family::default();
        registry.register(
            "schedule_missed",
            "Scheduled runs that fell while the controller was not running",
            schedule_missed.clone(),
        );
        let retention_deletions = Family::default();
        registry.register(
            "retention_deletions",
            "Backups (manifest and snapshots) deleted by retention",
            retention_deletions.clone(),
        );
        let restore_order_violations = Counter::default();
        registry.register(
            "restore_order_violations",
            "Restore stages that were due while an earlier stage was not healthy (the start was refused)",
            restore_order_violations.clone(),
        );
        let webhook_refusals = Family::default();
        registry.register(
            "webhook_refusals",
            "Connections and requests the webhook endpoint refused before handling them, by \
             reason (connections: over the connection limit; busy: no turn within the wait; \
             too_large: over the route's body limit; timeout: the body came too slowly)",
            webhook_refusals.clone(),
        );
        Metrics {
            registry,
            freeze_window,
            backups,
            agent_freeze,
            agent_thaw,
            agent_flush,
            alignment_wait,
            snapshot_failures,
            schedule_runs,
            schedule_skips,
            schedule_missed,
            retention_deletions,
            restore_order_violations,
            webhook_refusals,
        }
    }
}

impl Metrics {
    pub fn group(ns: Option<&str>, group: &str) -> GroupLabel {
        GroupLabel {
            namespace: Namespace::of(ns),
            group: group.to_string(),
        }
    }

    pub fn engine(engine: &str) -> EngineLabel {
        EngineLabel {
            engine: engine.to_string(),
        }
    }

    pub fn schedule(ns: Option<&str>, schedule: &str) -> ScheduleLabel {
        ScheduleLabel {
            namespace: Namespace::of(ns),
            schedule: schedule.to_string(),
        }
    }

    pub fn snapshot_failure(&self, ns: Option<&str>, group: &str, driver: &str, step: &str) {
        self.snapshot_failures
            .get_or_create(&SnapshotLabels {
                namespace: Namespace::of(ns),
                group: group.to_string(),
                driver: driver.to_string(),
                step: step.to_string(),
            })
            .inc();
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}
