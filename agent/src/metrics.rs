//! The agent's Prometheus metrics, served on `/metrics` of the admin listener.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineLabel {
    pub engine: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub engine: String,
    pub step: String,
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    pub cause: String,
}

type Histograms = Family<EngineLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~26 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 20))
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// 1 while a hold is in force.
    pub frozen: Gauge,
    /// How long the hold in force has lasted (set at each scrape).
    pub frozen_seconds: Gauge<f64, AtomicU64>,
    /// How far past its lease's deadline the hold in force is (set at each
    /// scrape): above zero only while a thaw the lease called for has not
    /// completed.
    pub overdue_seconds: Gauge<f64, AtomicU64>,
    pub freeze_seconds: Histograms,
    pub thaw_seconds: Histograms,
    pub lease_expiries: Counter,
    pub takeovers: Counter,
    pub thaws: Family<CauseLabel, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub tls_refusals: Family<CauseLabel, Counter>,
    pub tls_reloads: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("stillpoint_agent");
        let frozen = Gauge::default();
        registry.register(
            "frozen",
            "1 while this agent holds a freeze",
            frozen.clone(),
        );
        let frozen_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "frozen_seconds",
            "How long the hold in force has lasted (0 when none is)",
            frozen_seconds.clone(),
        );
        let overdue_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "hold_overdue_seconds",
            "How far past its lease's deadline the hold in force is: above 0 only while a thaw \
             the lease called for has not completed",
            overdue_seconds.clone(),
        );
        let freeze_seconds = Histograms::new_with_constructor(latency_histogram);
        registry.register(
            "freeze_duration_seconds",
            "Time the engine took to freeze",
            freeze_seconds.clone(),
        );
        let thaw_seconds = Histograms::new_with_constructor(latency_histogram);
        registry.register(
            "thaw_duration_seconds",
            "Time the engine took to thaw",
            thaw_seconds.clone(),
        );
        let lease_expiries = Counter::default();
        registry.register(
            "lease_expiries",
            "Holds thawed because no renewal arrived within the TTL",
            lease_expiries.clone(),
        );
        let takeovers = Counter::default();
        registry.register(
            "hold_takeovers",
            "Holds taken over by another Freeze stream of the same backup (the earlier stream then renews, flushes and thaws nothing)",
            takeovers.clone(),
        );
        let thaws = Family::default();
        registry.register("thaws", "Holds ended, by cause", thaws.clone());
        let failures = Family::default();
        registry.register(
            "failures",
            "Engine failures by step and cause",
            failures.clone(),
        );
        let tls_refusals = Family::default();
        registry.register(
            "tls_refusals",
            "Connections refused during the mTLS handshake, by reason",
            tls_refusals.clone(),
        );
        let tls_reloads = Counter::default();
        registry.register(
            "tls_reloads",
            "TLS credentials reloaded from disk",
            tls_reloads.clone(),
        );
        Metrics {
            registry,
            frozen,
            frozen_seconds,
            overdue_seconds,
            freeze_seconds,
            thaw_seconds,
            lease_expiries,
            takeovers,
            thaws,
            failures,
            tls_refusals,
            tls_reloads,
        }
    }
}

impl Metrics {
    pub fn engine(engine: &str) -> EngineLabel {
        EngineLabel {
            engine: engine.to_string(),
        }
    }

    pub fn failure(&self, err: &crate::engine::EngineError) {
        self.failures
            .get_or_create(&FailureLabels {
                engine: err.engine.name().to_string(),
                step: err.step.to_string(),
                cause: err.cause.label().to_string(),
            })
            .inc();
    }

    /// Sets the gauges read off the hold in force (`None`: no hold).
    pub fn observe_hold(&self, times: Option<crate::hold::HoldTimes>) {
        let (held, overdue) = times.map_or((0.0, 0.0), |t| {
            (t.held.as_secs_f64(), t.overdue.as_secs_f64())
        });
        self.frozen_seconds.set(held);
        self.overdue_seconds.set(overdue);
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
