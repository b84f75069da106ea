//! Scheduled backups: the loop behind `stillpoint serve`.
//!
//! - Each schedule fires at its cron times in its time zone.
//! - A group is never backed up twice at once: a firing that finds its
//!   group still being backed up (by this or another schedule) is skipped,
//!   with a log line and `stillpoint_schedule_skips_total{reason="overlap"}`.
//! - After every run, the schedule's retention deletes what it no longer
//!   keeps (snapshots, then manifests).
//! - The last time each schedule fired is kept in `<catalog>/.schedules.json`.
//!   At start-up, runs that fell while the controller was down are counted
//!   (`stillpoint_schedule_missed_total`) and, with `missed = "run-once"`
//!   (the default), one backup is taken at once; `missed = "skip"` waits for
//!   the next time.
//! - Shutdown (SIGTERM, Ctrl-C) aborts any backup in flight: every member
//!   is thawed, whatever was cut is deleted, and the manifest says `aborted`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::local::config::{Config, Missed, Schedule};
use crate::local::orchestrator::{Orchestrator, new_backup_id};
use crate::local::retention;
use crate::metrics::{Metrics, SkipLabels, metrics};

/// The reason a shutdown was asked for; `None` while running.
pub type Shutdown = watch::Receiver<Option<String>>;

/// Waits for a shutdown and returns its reason.
pub async fn shutdown_reason(mut shutdown: Shutdown) -> String {
    match shutdown.wait_for(Option::is_some).await {
        Ok(reason) => reason.clone().unwrap_or_default(),
        Err(_) => "the controller is shutting down".to_string(),
    }
}

/// When each schedule last fired, kept beside the manifests.
#[derive(Debug)]
struct State {
    path: PathBuf,
    fired: Mutex<BTreeMap<String, DateTime<Utc>>>,
}

impl State {
    fn load(path: PathBuf) -> State {
        let fired = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        State {
            path,
            fired: Mutex::new(fired),
        }
    }

    fn last(&self, schedule: &str) -> Option<DateTime<Utc>> {
        self.fired
            .lock()
            .expect("not poisoned")
            .get(schedule)
            .copied()
    }

    fn record(&self, schedule: &str, at: DateTime<Utc>) {
        let mut fired = self.fired.lock().expect("not poisoned");
        fired.insert(schedule.to_string(), at);
        let tmp = self.path.with_extension("json.tmp");
        let written = serde_json::to_vec_pretty(&*fired)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(&tmp, json))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            tracing::warn!(
                schedule,
                "cannot record the schedule state in {}: {e}",
                self.path.display()
            );
        }
    }
}

pub use crate::core::schedule::missed_runs;

/// Runs every schedule of `config` until `shutdown` fires, then waits for
/// the runs in flight to abort.
pub async fn serve(config: Config, orchestrator: Orchestrator, shutdown: Shutdown) {
    let config = Arc::new(config);
    let state = Arc::new(State::load(
        orchestrator.catalog.dir().join(".schedules.json"),
    ));
    let busy: Arc<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>> = Arc::new(
        config
            .groups
            .keys()
            .map(|g| (g.clone(), Arc::new(tokio::sync::Mutex::new(()))))
            .collect(),
    );
    let runs = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
    let mut loops = JoinSet::new();
    for schedule in config.schedules.values() {
        if schedule.suspend {
            tracing::info!(schedule = %schedule.name, "suspended; not running it");
            continue;
        }
        let fire = Fire {
            config: config.clone(),
            orchestrator: orchestrator.clone(),
            state: state.clone(),
            busy: busy.clone(),
            runs: runs.clone(),
            shutdown: shutdown.clone(),
            schedule: schedule.clone(),
        };
        loops.spawn(fire.run_loop());
    }
    let _ = shutdown_reason(shutdown).await;
    loops.abort_all();
    while loops.join_next().await.is_some() {}
    let mut runs = runs.lock().await;
    while runs.join_next().await.is_some() {}
}

struct Fire {
    config: Arc<Config>,
    orchestrator: Orchestrator,
    state: Arc<State>,
    busy: Arc<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    runs: Arc<tokio::sync::Mutex<JoinSet<()>>>,
    shutdown: Shutdown,
    schedule: Schedule,
}

impl Fire {
    async fn run_loop(self) {
        let name = self.schedule.name.clone();
        let now = Utc::now();
        match self.state.last(&name) {
            Some(last) => {
                let missed = missed_runs(&self.schedule, last, now);
                if missed > 0 {
                    metrics()
                        .schedule_missed
                        .get_or_create(&Metrics::schedule(None, &name))
                        .inc_by(missed);
                    tracing::warn!(
                        schedule = %name,
                        missed,
                        last_fired = %last,
                        policy = ?self.schedule.missed,
                        "runs were missed while the controller was not running"
                    );
                    if self.schedule.missed == Missed::RunOnce {
                        self.fire(now).await;
                    }
                }
            }
            None => self.state.record(&name, now),
        }
        let mut after = now;
        loop {
            let local = after.with_timezone(&self.schedule.timezone);
            let next = match self.schedule.cron.find_next_occurrence(&local, false) {
                Ok(next) => next.with_timezone(&Utc),
                Err(e) => {
                    tracing::error!(schedule = %name, "no next run time: {e}; the schedule stops");
                    return;
                }
            };
            let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
            self.fire(next).await;
            // A late wake-up (suspended host) does not replay the times it slept through.
            after = next.max(Utc::now() - chrono::Duration::milliseconds(1));
        }
    }

    /// One due time: starts a run unless the group is busy.
    async fn fire(&self, due: DateTime<Utc>) {
        let name = &self.schedule.name;
        self.state.record(name, due);
        let lock = self.busy[&self.schedule.group].clone();
        let Ok(guard) = lock.try_lock_owned() else {
            metrics()
                .schedule_skips
                .get_or_create(&SkipLabels {
                    namespace: Default::default(),
                    schedule: name.clone(),
                    reason: "overlap".into(),
                })
                .inc();
            tracing::warn!(
                schedule = %name,
                group = %self.schedule.group,
                due = %due,
                "skipped: the group is still being backed up (runs of one group never overlap)"
            );
            return;
        };
        metrics()
            .schedule_runs
            .get_or_create(&Metrics::schedule(None, name))
            .inc();
        let group = self.config.groups[&self.schedule.group].clone();
        let orchestrator = self.orchestrator.clone();
        let schedule = self.schedule.clone();
        let shutdown = self.shutdown.clone();
        let mut runs = self.runs.lock().await;
        while runs.try_join_next().is_some() {}
        runs.spawn(async move {
            let id = new_backup_id(&group.name);
            tracing::info!(schedule = %schedule.name, backup_id = %id, "scheduled backup starting");
            let result = orchestrator
                .backup_until(&group, &id, Some(&schedule.name), shutdown_reason(shutdown))
                .await;
            if let Err(e) = &result {
                tracing::warn!(schedule = %schedule.name, backup_id = %id, "scheduled backup failed: {}", e.cause);
            }
            match retention::apply(&orchestrator.catalog, &group, &schedule.name, schedule.retention).await {
                Ok(deleted) if !deleted.is_empty() => {
                    metrics()
                        .retention_deletions
                        .get_or_create(&Metrics::schedule(None, &schedule.name))
                        .inc_by(deleted.len() as u64);
                }
                Ok(_) => {}
                Err(e) => {
                    metrics()
                        .retention_failures
                        .get_or_create(&Metrics::schedule(None, &schedule.name))
                        .inc();
                    tracing::warn!(schedule = %schedule.name, "retention: {e:#}")
                }
            }
            drop(guard);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(cron: &str, tz: chrono_tz::Tz) -> Schedule {
        Schedule {
            name: "s".into(),
            group: "g".into(),
            cron: croner::parser::CronParser::builder()
                .seconds(croner::parser::Seconds::Optional)
                .build()
                .parse(cron)
                .unwrap(),
            timezone: tz,
            retention: Default::default(),
            missed: Missed::RunOnce,
            suspend: false,
        }
    }

    #[test]
    fn missed_runs_are_counted_in_the_schedules_time_zone() {
        use chrono::TimeZone;
        // 02:00 every day in Berlin is 01:00 UTC in winter.
        let s = schedule("0 2 * * *", chrono_tz::Europe::Berlin);
        let last = Utc.with_ymd_and_hms(2026, 1, 1, 1, 0, 0).unwrap();
        assert_eq!(missed_runs(&s, last, last), 0);
        let just_before = Utc.with_ymd_and_hms(2026, 1, 3, 0, 59, 59).unwrap();
        assert_eq!(missed_runs(&s, last, just_before), 1);
        let at = Utc.with_ymd_and_hms(2026, 1, 3, 1, 0, 0).unwrap();
        assert_eq!(missed_runs(&s, last, at), 2);
        let every_second = schedule("* * * * * *", chrono_tz::UTC);
        assert_eq!(
            missed_runs(&every_second, last, last + chrono::Duration::seconds(30)),
            30
        );
    }
}
