//! Schedules, as both modes read and run them: a cron expression (a sixth,
//! leading field gives seconds) in an IANA time zone, the retention of the
//! backups it made, and what to do about runs missed while no controller
//! ran. Local mode (`stillpoint serve`) and Kubernetes mode
//! (BackupSchedule) use these.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::core::retention::Retention;

/// What a scheduler does about runs that fell while it was not running.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Missed {
    /// Run once at start-up if at least one run was missed.
    #[default]
    RunOnce,
    /// Wait for the next scheduled time.
    Skip,
}

/// A validated schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub name: String,
    pub group: String,
    pub cron: croner::Cron,
    pub timezone: chrono_tz::Tz,
    pub retention: Retention,
    pub missed: Missed,
    pub suspend: bool,
}

/// Parses a cron expression (five fields, or six with leading seconds).
pub fn parse_cron(text: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(text)
        .map_err(|e| format!("'{text}': {e}"))
}

/// Parses an IANA time zone (default UTC).
pub fn parse_timezone(text: Option<&str>) -> Result<chrono_tz::Tz, String> {
    match text {
        None => Ok(chrono_tz::UTC),
        Some(tz) => tz
            .parse::<chrono_tz::Tz>()
            .map_err(|_| format!("'{tz}' is not an IANA time zone (e.g. Europe/Berlin, UTC)")),
    }
}

impl Schedule {
    /// The runs that fell strictly after `last` and up to `now`, oldest
    /// first (at most `limit`).
    pub fn runs_between(
        &self,
        last: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut runs = Vec::new();
        let mut at = whole_second(last).with_timezone(&self.timezone);
        while runs.len() < limit {
            match self.cron.find_next_occurrence(&at, false) {
                Ok(next) if next.with_timezone(&Utc) <= now => {
                    runs.push(next.with_timezone(&Utc));
                    at = next;
                }
                _ => break,
            }
        }
        runs
    }

    /// The next run strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&whole_second(after).with_timezone(&self.timezone), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// `t` at its whole second. croner carries the fraction of the time it
/// counts from into the runs it returns (from 10:00:00.4, every 3 s gives
/// 10:00:03.4), which would make every run late by that fraction; a cron
/// time is a whole second, and the runs strictly after `t` are those
/// strictly after its whole second.
fn whole_second(t: DateTime<Utc>) -> DateTime<Utc> {
    chrono::SubsecRound::trunc_subsecs(t, 0)
}

/// The runs of `schedule` that fell strictly after `last` and up to `now`
/// (counted up to 10,000).
pub fn missed_runs(schedule: &Schedule, last: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    schedule.runs_between(last, now, 10_000).len() as u64
}

/// What a scheduler does now, given the runs due since its last firing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firing {
    /// Take a backup now.
    pub fire: bool,
    /// Runs that were missed (not taken at their time).
    pub missed: u64,
    /// What to record as the last firing time.
    pub record: Option<DateTime<Utc>>,
    /// The scheduled time a backup taken now is for (the latest run due):
    /// the same whichever look at the schedule takes it, so it names the
    /// run.
    pub slot: Option<DateTime<Utc>>,
}

/// Decides a firing from the runs `due` since the last one (oldest
/// first): a run is on time when it fell within `tolerance` of `now`;
/// every other due run was missed, and `missed` says whether one backup
/// is taken for them.
pub fn decide(
    due: &[DateTime<Utc>],
    now: DateTime<Utc>,
    tolerance: chrono::Duration,
    missed: Missed,
) -> Firing {
    let Some(latest) = due.last() else {
        return Firing {
            fire: false,
            missed: 0,
            record: None,
            slot: None,
        };
    };
    let on_time = now - *latest <= tolerance;
    let missed_count = due.len() as u64 - u64::from(on_time);
    Firing {
        fire: on_time || (missed_count > 0 && missed == Missed::RunOnce),
        missed: missed_count,
        record: Some(if on_time { now } else { *latest }),
        slot: Some(*latest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_fall_on_whole_seconds_whatever_time_they_are_counted_from() {
        let at = |t: &str| DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc);
        let s = Schedule {
            name: "s".into(),
            group: "g".into(),
            cron: parse_cron("*/3 * * * * *").unwrap(),
            timezone: chrono_tz::UTC,
            retention: Default::default(),
            missed: Missed::RunOnce,
            suspend: false,
        };
        let last = at("2026-12-07T10:00:00.4Z");
        // Due at 10:00:03, not at 10:00:03.4.
        let due = s.runs_between(last, at("2026-12-07T10:00:03.1Z"), 10);
        assert_eq!(due, [at("2026-12-07T10:00:03Z")]);
        assert_eq!(s.next_after(last), Some(at("2026-12-07T10:00:03Z")));
        // Strictly after: a run at the time counted from is not due again.
        let ran = at("2026-12-07T10:00:03.7Z");
        assert_eq!(s.next_after(ran), Some(at("2026-12-07T10:00:06Z")));
        assert!(
            s.runs_between(ran, at("2026-12-07T10:00:05.9Z"), 10)
                .is_empty()
        );
    }

    #[test]
    fn firings_on_time_late_and_missed() {
        let now = chrono::SubsecRound::trunc_subsecs(Utc::now(), 0);
        let s = chrono::Duration::seconds;
        let tol = s(5);
        assert!(!decide(&[], now, tol, Missed::RunOnce).fire);
        // On time.
        let f = decide(&[now - s(1)], now, tol, Missed::Skip);
        assert_eq!((f.fire, f.missed), (true, 0));
        // Recorded as taken now, for the run it is late for.
        assert_eq!((f.record, f.slot), (Some(now), Some(now - s(1))));
        // Three missed while down, none on time.
        let due = [now - s(300), now - s(200), now - s(100)];
        let f = decide(&due, now, tol, Missed::RunOnce);
        assert_eq!((f.fire, f.missed, f.record), (true, 3, Some(now - s(100))));
        assert_eq!(f.slot, Some(now - s(100)));
        let f = decide(&due, now, tol, Missed::Skip);
        assert_eq!((f.fire, f.missed), (false, 3));
        // Two missed, and one now.
        let f = decide(&[now - s(200), now - s(100), now], now, tol, Missed::Skip);
        assert_eq!((f.fire, f.missed), (true, 2));
    }
}
