//! Deleting backups (their snapshots, then their manifest) and the
//! retention policy of schedules.
//!
//! Retention only ever looks at the backups its own schedule made (the
//! manifest's `schedule`): a backup taken by hand is never pruned.
//!
//! - Succeeded backups: the newest `keep_last` are kept; any older than
//!   `max_age` is deleted, except that the newest succeeded backup is never
//!   deleted for its age alone (a stopped schedule must not age its group
//!   down to nothing restorable).
//! - Failed, aborted and interrupted (`running` left by a crash) backups
//!   follow the same two rules among themselves, without that exception;
//!   their manifests are kept for a while so the failures can be read.

use std::time::Duration;

use crate::core::record::{Manifest, Outcome};

/// A schedule's retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    pub keep_last: Option<usize>,
    pub max_age: Option<Duration>,
}

fn created(m: &Manifest) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(
        &m.created_at,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()
}

/// The ids `policy` deletes among `schedule`'s backups, as of `now`.
pub fn select(
    manifests: &[Manifest],
    schedule: &str,
    policy: Retention,
    now: time::OffsetDateTime,
) -> Vec<String> {
    let mut doomed = Vec::new();
    for succeeded in [true, false] {
        let mut own: Vec<&Manifest> = manifests
            .iter()
            .filter(|m| m.schedule.as_deref() == Some(schedule))
            .filter(|m| (m.outcome == Outcome::Succeeded) == succeeded)
            .collect();
        // Newest first.
        own.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        for (rank, m) in own.iter().enumerate() {
            let beyond_count = policy.keep_last.is_some_and(|n| rank >= n);
            let too_old = policy.max_age.is_some_and(|age| {
                created(m).is_some_and(|at| (now - at).unsigned_abs() > age && now > at)
            });
            let last_good = succeeded && rank == 0;
            if beyond_count || (too_old && !last_good) {
                doomed.push(m.id.clone());
            }
        }
    }
    doomed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::timeline::Timeline;

    fn manifest(id: &str, minutes_ago: i64, outcome: Outcome, schedule: Option<&str>) -> Manifest {
        let at = time::OffsetDateTime::UNIX_EPOCH + time::Duration::hours(1000)
            - time::Duration::minutes(minutes_ago);
        Manifest {
            id: id.into(),
            group: "g".into(),
            schedule: schedule.map(str::to_string),
            created_at: at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
            outcome,
            error: None,
            snapshotter: "btrfs".into(),
            freeze_window_us: None,
            cut_us: None,
            members: vec![],
            timeline: Timeline::default(),
            warnings: vec![],
        }
    }

    fn now() -> time::OffsetDateTime {
        time::OffsetDateTime::UNIX_EPOCH + time::Duration::hours(1000)
    }

    #[test]
    fn keep_last_keeps_the_newest_of_its_own_schedule_only() {
        let all = vec![
            manifest("a", 50, Outcome::Succeeded, Some("s")),
            manifest("b", 40, Outcome::Succeeded, Some("s")),
            manifest("c", 30, Outcome::Succeeded, Some("s")),
            manifest("manual", 60, Outcome::Succeeded, None),
            manifest("other", 60, Outcome::Succeeded, Some("t")),
            manifest("f1", 45, Outcome::Failed, Some("s")),
            manifest("f2", 35, Outcome::Aborted, Some("s")),
        ];
        let policy = Retention {
            keep_last: Some(1),
            max_age: None,
        };
        let mut doomed = select(&all, "s", policy, now());
        doomed.sort();
        assert_eq!(doomed, vec!["a", "b", "f1"]);
    }

    #[test]
    fn max_age_never_deletes_the_newest_good_backup() {
        let all = vec![
            manifest("old", 120, Outcome::Succeeded, Some("s")),
            manifest("older", 180, Outcome::Succeeded, Some("s")),
            manifest("failed", 90, Outcome::Failed, Some("s")),
            manifest("fresh-fail", 1, Outcome::Failed, Some("s")),
        ];
        let policy = Retention {
            keep_last: None,
            max_age: Some(Duration::from_secs(3600)),
        };
        let mut doomed = select(&all, "s", policy, now());
        doomed.sort();
        assert_eq!(doomed, vec!["failed", "older"]);
        assert!(select(&all, "s", Retention::default(), now()).is_empty());
    }
}
