//! The controller's Prometheus metrics. One process-wide registry:
//! `stillpoint serve` exposes it on `/metrics`, and every command writes it
//! to `--metrics-file` (for a textfile collector) when asked.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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
pub struct FailureLabels {
    #[prometheus(flatten)]
    pub namespace: Namespace,
    pub group: String,
    pub phase: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestoreLabel {
    #[prometheus(flatten)]
    pub namespace: Namespace,
    pub restore: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestoreResultLabels {
    #[prometheus(flatten)]
    pub namespace: Namespace,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScheduleGroupLabels {
    #[prometheus(flatten)]
    pub namespace: Namespace,
    pub schedule: String,
    pub group: String,
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

/// A schedule as the leader sees it at a scrape.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleState {
    pub namespace: Option<String>,
    pub schedule: String,
    pub group: String,
    /// The shortest gap between its firings.
    pub interval_seconds: f64,
    /// When its newest successful backup completed, else when the schedule
    /// was created (a schedule that never succeeded is as late as one
    /// whose last success was then).
    pub last_success_seconds: f64,
}

/// A group as the leader sees it at a scrape.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupState {
    pub namespace: Option<String>,
    pub group: String,
    /// Its freeze budget, when its spec reads.
    pub freeze_budget_seconds: Option<f64>,
    /// When its newest successful backup completed, if one did.
    pub last_success_seconds: Option<f64>,
}

/// What the leader knows of its objects, read at every scrape (so a
/// deleted or suspended object's series go with it).
pub trait StateSource: Send + Sync + std::fmt::Debug {
    fn schedules(&self) -> Vec<ScheduleState>;
    fn groups(&self) -> Vec<GroupState>;
}

/// Encodes a [`StateSource`]'s gauges at each scrape; none while no
/// source is set (a replica that does not lead).
#[derive(Debug, Default)]
pub struct StateCollector {
    source: RwLock<Option<Arc<dyn StateSource>>>,
}

type F64Gauge = Gauge<f64, AtomicU64>;

fn encode_gauges<L>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, f64)>,
) -> Result<(), std::fmt::Error>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug,
{
    let family = Family::<L, F64Gauge>::default();
    for (labels, value) in samples {
        family.get_or_create(&labels).set(value);
    }
    if family.is_empty() {
        return Ok(());
    }
    family.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(source) = self.source.read().expect("not poisoned").clone() else {
            return Ok(());
        };
        let schedules = source.schedules();
        let labels = |s: &ScheduleState| ScheduleGroupLabels {
            namespace: Namespace::of(s.namespace.as_deref()),
            schedule: s.schedule.clone(),
            group: s.group.clone(),
        };
        encode_gauges(
            &mut encoder,
            "schedule_interval_seconds",
            "The shortest gap between a schedule's firings",
            schedules.iter().map(|s| (labels(s), s.interval_seconds)),
        )?;
        encode_gauges(
            &mut encoder,
            "schedule_last_success_timestamp_seconds",
            "When a schedule's newest successful backup completed (its creation, if none did)",
            schedules
                .iter()
                .map(|s| (labels(s), s.last_success_seconds)),
        )?;
        let groups = source.groups();
        let group = |g: &GroupState| Metrics::group(g.namespace.as_deref(), &g.group);
        encode_gauges(
            &mut encoder,
            "freeze_budget_seconds",
            "A group's freeze budget (spec.freezeBudget)",
            groups
                .iter()
                .filter_map(|g| Some((group(g), g.freeze_budget_seconds?))),
        )?;
        encode_gauges(
            &mut encoder,
            "group_last_success_timestamp_seconds",
            "When a group's newest successful backup completed",
            groups
                .iter()
                .filter_map(|g| Some((group(g), g.last_success_seconds?))),
        )
    }
}

impl StateCollector {
    /// Reads `source` at every scrape from now on (`None`: stop).
    pub fn set(&self, source: Option<Arc<dyn StateSource>>) {
        *self.source.write().expect("not poisoned") = source;
    }
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
    pub retention_failures: Family<ScheduleLabel, Counter>,
    pub restore_order_violations: Family<RestoreLabel, Counter>,
    pub restores: Family<RestoreResultLabels, Counter>,
    pub backup_failures: Family<FailureLabels, Counter>,
    pub webhook_refusals: Family<ReasonLabel, Counter>,
    /// Kubernetes mode: 1 while this replica leads.
    pub leader: Gauge,
    /// Kubernetes mode: each attempt at renewing the leader Lease.
    pub lease_renewal: Histogram,
    pub state: Arc<StateCollector>,
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
            "Scheduled runs not started, by reason (overlap: the group was still being backed up; \
             name-taken: a GroupBackup of the run's name was not made by the schedule)",
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
        let retention_failures = Family::default();
        registry.register(
            "retention_failures",
            "Retention passes of a schedule that could not delete a backup it should have",
            retention_failures.clone(),
        );
        let restore_order_violations = Family::default();
        registry.register(
            "restore_order_violations",
            "Restore stages that were due while an earlier stage was not healthy (the start was refused)",
            restore_order_violations.clone(),
        );
        let restores = Family::default();
        registry.register(
            "restores",
            "Kubernetes mode: GroupRestores that ended, by result (succeeded, failed)",
            restores.clone(),
        );
        let backup_failures = Family::default();
        registry.register(
            "backup_failures",
            "Group backups that did not succeed (failed or aborted), by the phase and reason \
             of their first problem",
            backup_failures.clone(),
        );
        let webhook_refusals = Family::default();
        registry.register(
            "webhook_refusals",
            "Connections and requests the webhook endpoint refused before handling them, by \
             reason (connections: over the connection limit; busy: no turn within the wait; \
             too_large: over the route's body limit; timeout: the body came too slowly)",
            webhook_refusals.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "controller_leader",
            "Kubernetes mode: 1 while this controller replica leads",
            leader.clone(),
        );
        let lease_renewal = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register(
            "controller_lease_renewal_seconds",
            "Kubernetes mode: time each attempt at renewing the leader Lease took (its GET and \
             PUT), whether it succeeded or not; the leader stops when none succeeds within \
             --renew-deadline",
            lease_renewal.clone(),
        );
        let state = Arc::new(StateCollector::default());
        registry.register_collector(Box::new(state.clone()));
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
            retention_failures,
            restore_order_violations,
            restores,
            backup_failures,
            webhook_refusals,
            leader,
            lease_renewal,
            state,
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

    /// Counts a restore stage refused because an earlier one was not healthy.
    pub fn order_violation(&self, ns: Option<&str>, restore: &str) {
        self.restore_order_violations
            .get_or_create(&RestoreLabel {
                namespace: Namespace::of(ns),
                restore: restore.to_string(),
            })
            .inc();
    }

    /// Counts a GroupRestore that ended.
    pub fn restore_ended(&self, ns: Option<&str>, succeeded: bool) {
        self.restores
            .get_or_create(&RestoreResultLabels {
                namespace: Namespace::of(ns),
                result: if succeeded { "succeeded" } else { "failed" }.to_string(),
            })
            .inc();
    }

    /// Creates a known group's counters and histograms at zero, so the
    /// first backup, failure or cut after a scrape is an increase rules
    /// and dashboards can see (a series created by its first increment
    /// starts at 1, which `increase()` cannot tell from nothing).
    pub fn touch_group(&self, ns: Option<&str>, group: &str, driver: &str) {
        for result in ["succeeded", "failed", "aborted"] {
            let _ = self.backups.get_or_create(&ResultLabels {
                namespace: Namespace::of(ns),
                group: group.to_string(),
                result: result.to_string(),
            });
        }
        let labels = Metrics::group(ns, group);
        let _ = self.freeze_window.get_or_create(&labels);
        let _ = self.alignment_wait.get_or_create(&labels);
        for step in ["prepare", "cut", "ready", "delete"] {
            let _ = self.snapshot_failures.get_or_create(&SnapshotLabels {
                namespace: Namespace::of(ns),
                group: group.to_string(),
                driver: driver.to_string(),
                step: step.to_string(),
            });
        }
    }

    /// Creates a known schedule's counters at zero (see [`Self::touch_group`]).
    pub fn touch_schedule(&self, ns: Option<&str>, schedule: &str) {
        let labels = Metrics::schedule(ns, schedule);
        let _ = self.schedule_runs.get_or_create(&labels);
        let _ = self.schedule_missed.get_or_create(&labels);
        let _ = self.retention_deletions.get_or_create(&labels);
        let _ = self.retention_failures.get_or_create(&labels);
        let _ = self.schedule_skips.get_or_create(&SkipLabels {
            namespace: Namespace::of(ns),
            schedule: schedule.to_string(),
            reason: "overlap".to_string(),
        });
    }

    /// Creates a known GroupRestore's counters at zero (see [`Self::touch_group`]).
    pub fn touch_restore(&self, ns: Option<&str>, restore: &str) {
        let _ = self.restore_order_violations.get_or_create(&RestoreLabel {
            namespace: Namespace::of(ns),
            restore: restore.to_string(),
        });
        for result in ["succeeded", "failed"] {
            let _ = self.restores.get_or_create(&RestoreResultLabels {
                namespace: Namespace::of(ns),
                result: result.to_string(),
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(Vec<ScheduleState>, Vec<GroupState>);

    impl StateSource for Fixed {
        fn schedules(&self) -> Vec<ScheduleState> {
            self.0.clone()
        }
        fn groups(&self) -> Vec<GroupState> {
            self.1.clone()
        }
    }

    #[test]
    fn the_leaders_gauges_are_read_at_each_scrape_and_go_with_their_source() {
        let m = Metrics::default();
        assert!(!m.encode().contains("schedule_interval_seconds"));
        let schedule = ScheduleState {
            namespace: Some("shop".into()),
            schedule: "hourly".into(),
            group: "g".into(),
            interval_seconds: 3600.0,
            last_success_seconds: 1.7e9,
        };
        let group = |budget| GroupState {
            namespace: Some("shop".into()),
            group: "g".into(),
            freeze_budget_seconds: budget,
            last_success_seconds: None,
        };
        m.state.set(Some(Arc::new(Fixed(
            vec![schedule],
            vec![group(Some(5.0))],
        ))));
        let text = m.encode();
        for line in [
            "stillpoint_schedule_interval_seconds{namespace=\"shop\",schedule=\"hourly\",group=\"g\"} 3600.0",
            "stillpoint_schedule_last_success_timestamp_seconds{namespace=\"shop\",schedule=\"hourly\",group=\"g\"} 1700000000.0",
            "stillpoint_freeze_budget_seconds{namespace=\"shop\",group=\"g\"} 5.0",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        // A group with no success has no last-success series.
        assert!(!text.contains("group_last_success"), "{text}");
        // Another scrape reads the source again: a group gone, its series too.
        m.state.set(Some(Arc::new(Fixed(vec![], vec![]))));
        let text = m.encode();
        assert!(!text.contains("freeze_budget_seconds{"), "{text}");
        m.state.set(None);
        assert!(!m.encode().contains("schedule_interval_seconds{"));
    }

    #[test]
    fn a_touched_group_exports_its_series_at_zero() {
        let m = Metrics::default();
        m.touch_group(Some("shop"), "g", "csi-group");
        let text = m.encode();
        for line in [
            "stillpoint_backups_total{namespace=\"shop\",group=\"g\",result=\"failed\"} 0",
            "stillpoint_snapshot_failures_total{namespace=\"shop\",group=\"g\",driver=\"csi-group\",step=\"cut\"} 0",
            "stillpoint_freeze_window_seconds_count{namespace=\"shop\",group=\"g\"} 0",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
