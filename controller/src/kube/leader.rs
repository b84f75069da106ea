//! Leader election by a `coordination.k8s.io` Lease, with a renew deadline.
//!
//! - **Timing** ([`Timing`]): the leader tries to renew every `retryPeriod`;
//!   if no renewal succeeded within `renewDeadline` of the last one, it
//!   stops leading at once (the caller aborts and thaws what it runs and
//!   stops its reconcilers). Every Lease request is bounded by what is
//!   left of that deadline, so a request hanging on an unreachable API
//!   server never keeps a leader acting past it. `leaseDuration >
//!   renewDeadline > retryPeriod` (checked): the gap between the first two
//!   is the time the old leader has to stop before anyone may take over.
//! - **Expiry as observed, not by the clock**: another replica takes a held
//!   Lease only when its record (holder, renew time, transitions) has not
//!   changed for `leaseDuration` of *its own* monotonic time since it first
//!   saw that record; the holder's timestamps are never compared with the
//!   local clock, so skew between replicas does not matter. A replica that
//!   starts while a dead leader's record is there waits one
//!   `leaseDuration` (a leader that stopped cleanly released the Lease, and
//!   it is taken at once).
//!
//! Kept here rather than taken from a crate: kube-runtime has no leader
//! election, and the crates that add one judge expiry by comparing the
//! holder's `renewTime` with the local clock, or keep leading until a
//! renewal is refused rather than stopping at a deadline; what leading
//! means here (every run aborted and its members thawed before another
//! replica can lead) depends on both.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use tokio::time::Instant;

/// How long leadership lasts and is renewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a Lease lasts without a change another replica observes.
    pub lease_duration: Duration,
    /// How long the leader keeps acting without a successful renewal.
    pub renew_deadline: Duration,
    /// How often the leader renews, and a standby tries to acquire.
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl Timing {
    /// Checks `leaseDuration > renewDeadline > retryPeriod × 1.2 > 0` (the
    /// margin lets one retry fit in the deadline with its jitter).
    pub fn validate(&self) -> Result<(), String> {
        let Timing {
            lease_duration,
            renew_deadline,
            retry_period,
        } = *self;
        if retry_period.is_zero() {
            return Err("--retry-period must be longer than zero".into());
        }
        if renew_deadline.as_secs_f64() <= retry_period.as_secs_f64() * 1.2 {
            return Err(format!(
                "--renew-deadline ({renew_deadline:?}) must be longer than 1.2 × --retry-period \
                 ({retry_period:?}): the leader must get more than one try at renewing"
            ));
        }
        if lease_duration <= renew_deadline {
            return Err(format!(
                "--lease-duration ({lease_duration:?}) must be longer than --renew-deadline \
                 ({renew_deadline:?}): a leader that cannot renew must stop before another \
                 replica may take the Lease"
            ));
        }
        Ok(())
    }
}

/// A Lease record as another replica sees it change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: String,
    renew_time: Option<String>,
    transitions: i32,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Record {
        Record {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            renew_time: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
}

/// The record last seen, and when (local monotonic time) it was first seen.
#[derive(Debug, Clone)]
struct Observed {
    record: Record,
    since: Instant,
}

/// The leader Lease of one replica: acquired, renewed, released.
#[derive(Debug)]
pub struct LeaderLease {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    observed: Mutex<Option<Observed>>,
}

impl LeaderLease {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: Timing) -> Self {
        LeaderLease {
            api,
            name: name.into(),
            identity: identity.into(),
            timing,
            observed: Mutex::new(None),
        }
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Notes `spec` as seen now; returns since when its record is unchanged.
    fn observe(&self, spec: &LeaseSpec) -> Instant {
        let record = Record::of(spec);
        let mut observed = self.observed.lock().unwrap();
        match observed.as_ref() {
            Some(o) if o.record == record => o.since,
            _ => {
                let since = Instant::now();
                *observed = Some(Observed { record, since });
                since
            }
        }
    }

    /// Whether the Lease in `spec` may be taken: free, ours, or unchanged
    /// for its duration as this replica observed it.
    fn takeable(&self, spec: &LeaseSpec) -> bool {
        let since = self.observe(spec);
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(self.timing.lease_duration);
        holder.is_empty() || holder == self.identity || since.elapsed() >= duration
    }

    /// Takes (or renews) the Lease if it is free, ours or expired as
    /// observed; `Ok(false)` if another replica holds it.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let seconds = self.timing.lease_duration.as_secs().max(1) as i32;
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: kube::api::ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(None, now, seconds)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(made) => Ok(self.won(&made)),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if !self.takeable(&spec) {
            return Ok(false);
        }
        let mut next = lease.clone();
        next.spec = Some(self.spec(Some(&spec), now, seconds));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(made) => Ok(self.won(&made)),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The record this replica writes over `old` (none: a new Lease).
    fn spec(&self, old: Option<&LeaseSpec>, now: MicroTime, seconds: i32) -> LeaseSpec {
        let ours = old.is_some_and(|o| o.holder_identity.as_deref() == Some(&self.identity));
        let transitions = old.and_then(|o| o.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(seconds),
            acquire_time: match ours {
                true => old.and_then(|o| o.acquire_time.clone()),
                false => Some(now.clone()),
            },
            renew_time: Some(now),
            lease_transitions: Some(transitions + i32::from(old.is_some() && !ours)),
            ..Default::default()
        }
    }

    /// Notes the record this replica wrote; it holds the Lease.
    fn won(&self, lease: &Lease) -> bool {
        if let Some(spec) = &lease.spec {
            self.observe(spec);
        }
        true
    }

    /// Gives the Lease up, so another replica takes it at once. Bounded by
    /// the renew deadline.
    pub async fn release(&self) {
        let give_up = async {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok(());
            };
            let Some(spec) = lease.spec.as_mut() else {
                return Ok(());
            };
            if spec.holder_identity.as_deref() != Some(&self.identity) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.renew_time = None;
            spec.lease_duration_seconds = Some(1);
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        };
        match tokio::time::timeout(self.timing.renew_deadline, give_up).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("releasing the leader Lease: {e}"),
            Err(_) => {
                tracing::warn!("releasing the leader Lease: no answer within the renew deadline")
            }
        }
    }

    /// Renews until the renew deadline after `last` (when the last
    /// successful renewal was sent): returns when this replica renewed
    /// (`Some(sent)`), or `None` once it must stop leading (another
    /// replica holds the Lease, or the deadline passed).
    pub async fn renew_by_deadline(&self, last: Instant) -> Option<Instant> {
        let deadline = last + self.timing.renew_deadline;
        loop {
            let sent = Instant::now();
            if sent >= deadline {
                return None;
            }
            let tried = tokio::time::timeout_at(deadline, self.try_acquire()).await;
            crate::metrics::metrics()
                .lease_renewal
                .observe(sent.elapsed().as_secs_f64());
            match tried {
                Ok(Ok(true)) => return Some(sent),
                Ok(Ok(false)) => {
                    tracing::warn!("the leader Lease {} is held by another replica", self.name);
                    return None;
                }
                Ok(Err(e)) => tracing::warn!("renewing the leader Lease: {e}"),
                Err(_) => {
                    tracing::warn!(
                        "renewing the leader Lease: no renewal within the renew deadline ({:?})",
                        self.timing.renew_deadline
                    );
                    return None;
                }
            }
            let retry = (Instant::now() + self.timing.retry_period).min(deadline);
            tokio::time::sleep_until(retry).await;
        }
    }
}

/// Per-object exponential backoff of reconcile errors: 1 s, doubling
/// with each error in a row, at most [`Backoff::CAP`]; forgotten once the
/// object reconciles.
#[derive(Debug, Default)]
pub struct Backoff {
    errors: Mutex<std::collections::HashMap<String, u32>>,
}

impl Backoff {
    /// The longest wait before an object is reconciled again after errors.
    pub const CAP: Duration = Duration::from_secs(120);
    const BASE: Duration = Duration::from_secs(1);

    /// One more error of `key`: how long to wait before retrying it.
    pub fn failed(&self, key: &str) -> Duration {
        let mut errors = self.errors.lock().unwrap();
        let n = errors.entry(key.to_string()).or_insert(0);
        let wait = Self::BASE.saturating_mul(1 << (*n).min(16)).min(Self::CAP);
        *n = n.saturating_add(1);
        wait
    }

    /// `key` reconciled: its next error starts from the base again.
    pub fn succeeded(&self, key: &str) {
        self.errors.lock().unwrap().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn timings_must_leave_the_old_leader_time_to_stop() {
        assert!(Timing::default().validate().is_ok());
        let t = |l, r, p| Timing {
            lease_duration: secs(l),
            renew_deadline: secs(r),
            retry_period: secs(p),
        };
        assert!(
            t(15, 15, 2)
                .validate()
                .unwrap_err()
                .contains("--lease-duration")
        );
        assert!(t(15, 20, 2).validate().is_err());
        assert!(
            t(15, 10, 9)
                .validate()
                .unwrap_err()
                .contains("--renew-deadline")
        );
        assert!(
            t(15, 10, 0)
                .validate()
                .unwrap_err()
                .contains("--retry-period")
        );
    }

    #[test]
    fn errors_back_off_exponentially_up_to_the_cap_per_object() {
        let b = Backoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| b.failed("a")).collect();
        assert_eq!(&waits[..4], &[secs(1), secs(2), secs(4), secs(8)]);
        assert_eq!(waits[9], Backoff::CAP);
        assert_eq!(b.failed("b"), secs(1), "per object");
        b.succeeded("a");
        assert_eq!(b.failed("a"), secs(1), "forgotten once it reconciled");
    }

    fn spec(holder: &str, renew: i64, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(
                k8s_openapi::jiff::Timestamp::from_second(renew).unwrap(),
            )),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_expires_by_what_this_replica_saw_change_not_by_its_clock() {
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap()))
                .unwrap();
        let me = LeaderLease::new(Api::namespaced(client, "ns"), "l", "b", Timing::default());
        // Renewed long ago by the holder's clock: still not takeable until
        // it has stood unchanged for its duration here.
        assert!(!me.takeable(&spec("a", 0, 1)));
        tokio::time::advance(secs(14)).await;
        assert!(!me.takeable(&spec("a", 0, 1)));
        // The holder renews (its clock far behind ours): the wait restarts.
        assert!(!me.takeable(&spec("a", 1, 1)));
        tokio::time::advance(secs(14)).await;
        assert!(!me.takeable(&spec("a", 1, 1)));
        tokio::time::advance(secs(1)).await;
        assert!(me.takeable(&spec("a", 1, 1)), "unchanged for 15 s");
        // Free or ours: at once.
        assert!(me.takeable(&spec("", 1, 1)));
        assert!(me.takeable(&spec("b", 2, 2)));
    }
}
