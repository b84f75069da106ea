//! The leader's gauges of its objects ([`crate::metrics::StateSource`]):
//! each schedule's interval and last success, each group's freeze budget
//! and last success. Read from the reconcilers' caches at every scrape, so
//! a deleted or suspended object's series go with it and a new leader
//! exports them from its first scrape, without remembering anything.
//! Sampling also creates each known object's counters at zero
//! ([`crate::metrics::Metrics::touch_group`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::reflector::Store;

use crate::kube::crd::{BackupPhase, BackupSchedule, ConsistencyGroup, GroupBackup, GroupRestore};
use crate::metrics::metrics;
use crate::metrics::{GroupState, ScheduleState, StateSource};

/// The caches of one leadership term.
#[derive(Clone)]
pub struct LeaderState {
    pub groups: Store<ConsistencyGroup>,
    pub schedules: Store<BackupSchedule>,
    pub backups: Store<GroupBackup>,
    pub restores: Store<GroupRestore>,
    pub min_schedule_interval: Duration,
}

impl std::fmt::Debug for LeaderState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderState").finish_non_exhaustive()
    }
}

/// When backup `b` succeeded (its completion), in seconds since the epoch.
pub(crate) fn succeeded_at(b: &GroupBackup) -> Option<f64> {
    let status = b.status.as_ref()?;
    if status.phase != Some(BackupPhase::Succeeded) {
        return None;
    }
    Some(status.completion_time.as_ref()?.0.as_microsecond() as f64 / 1e6)
}

/// The GroupBackups of each namespace, indexed once per scrape rather
/// than filtered from all of them for every group and schedule.
fn by_namespace(all: Vec<Arc<GroupBackup>>) -> HashMap<Option<String>, Vec<Arc<GroupBackup>>> {
    let mut index: HashMap<Option<String>, Vec<Arc<GroupBackup>>> = HashMap::new();
    for b in all {
        index.entry(b.namespace()).or_default().push(b);
    }
    index
}

impl StateSource for LeaderState {
    fn schedules(&self) -> Vec<ScheduleState> {
        for r in self.restores.state() {
            metrics().touch_restore(r.namespace().as_deref(), &r.name_any());
        }
        for bs in self.schedules.state() {
            metrics().touch_schedule(bs.namespace().as_deref(), &bs.name_any());
        }
        let backups = by_namespace(self.backups.state());
        self.schedules
            .state()
            .iter()
            .filter_map(|bs| {
                let own = backups.get(&bs.namespace()).map_or(&[][..], Vec::as_slice);
                crate::kube::schedule::state_of(bs, own, self.min_schedule_interval)
            })
            .collect()
    }

    fn groups(&self) -> Vec<GroupState> {
        let backups = by_namespace(self.backups.state());
        self.groups
            .state()
            .iter()
            .map(|g| {
                let (ns, name) = (g.namespace(), g.name_any());
                let driver = serde_json::to_value(g.spec.snapshot.driver)
                    .ok()
                    .and_then(|d| d.as_str().map(str::to_string))
                    .unwrap_or_default();
                metrics().touch_group(ns.as_deref(), &name, &driver);
                let last = backups
                    .get(&ns)
                    .into_iter()
                    .flatten()
                    .filter(|b| b.spec.group == name)
                    .filter_map(|b| succeeded_at(b))
                    .fold(None, |a: Option<f64>, t| Some(a.map_or(t, |a| a.max(t))));
                GroupState {
                    namespace: ns,
                    freeze_budget_seconds: crate::kube::resolve::freeze_budget(&g.spec)
                        .map(|d| d.as_secs_f64()),
                    group: name,
                    last_success_seconds: last,
                }
            })
            .collect()
    }
}
