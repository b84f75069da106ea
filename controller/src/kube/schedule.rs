//! The BackupSchedule reconciler: GroupBackups at cron times, with the
//! same schedule and retention rules as local mode (`crate::core::schedule`,
//! `crate::core::retention`).
//!
//! - A firing that finds a backup of the group not yet ended (from this
//!   schedule or any other creator) is skipped: an Event `Skipped` and
//!   `stillpoint_schedule_skips_total{reason="overlap"}`.
//! - Runs that fell while no controller led (from `status.lastScheduleTime`)
//!   are counted (`stillpoint_schedule_missed_total`, an Event) and, with
//!   `missed: run-once`, one backup is taken at once; `skip` waits.
//! - Retention looks only at the schedule's own GroupBackups (the label
//!   `stillpoint.dev/schedule-uid` with this schedule's uid, of its group)
//!   that have ended, deletes what the policy
//!   does not keep (their snapshots go through the GroupBackup finalizer),
//!   and never deletes the newest successful one for its age alone.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::Action;

use crate::core::retention::{Retention, select};
use crate::core::schedule::{Schedule, decide, parse_cron, parse_timezone};
use crate::kube::controller::{Context, ReconcileError};
use crate::kube::crd::{
    BackupSchedule, BackupScheduleStatus, GROUP_LABEL, GroupBackup, GroupBackupSpec,
    SCHEDULE_LABEL, SCHEDULE_UID_LABEL, SCHEDULED_TIME_ANNOTATION,
};
use crate::kube::reason::Reason;
use crate::kube::store::{manifest_of, set_condition};
use crate::metrics::{Metrics, SkipLabels, metrics};

/// A run is on time when it is reconciled within this of its time;
/// otherwise it was missed.
pub const ON_TIME: Duration = Duration::from_secs(3);
/// The longest wait between two looks at a schedule.
const RESYNC: Duration = Duration::from_secs(5);

fn micro(t: DateTime<Utc>) -> MicroTime {
    let ts = k8s_openapi::jiff::Timestamp::from_microsecond(t.timestamp_micros())
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now());
    MicroTime(ts)
}

fn from_micro(t: &MicroTime) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.0.as_microsecond()).unwrap_or_else(Utc::now)
}

/// How many backups a schedule keeps when `keepLast` is left out.
pub const DEFAULT_KEEP_LAST: u32 = 30;

/// How long a schedule's shortest gap is remembered ([`shortest_gap_of`]).
const GAP_KEPT: Duration = Duration::from_secs(600);

/// The shortest gap between firings of cron expression `text` (parsed as
/// `cron`) in `tz`, remembered for [`GAP_KEPT`] by expression and zone:
/// every reconcile of a schedule and every scrape of the leader's gauges
/// asks, and each answer walks 100 firings (about 0.1 ms for a daily
/// schedule in a zone with daylight saving time).
fn shortest_gap_of(text: &str, cron: &croner::Cron, tz: chrono_tz::Tz) -> Option<chrono::Duration> {
    type Gaps = HashMap<(String, chrono_tz::Tz), (Instant, Option<chrono::Duration>)>;
    static GAPS: LazyLock<Mutex<Gaps>> = LazyLock::new(Mutex::default);
    let now = Instant::now();
    let key = (text.to_string(), tz);
    let kept = |at: &Instant| now.duration_since(*at) < GAP_KEPT;
    if let Some((at, gap)) = GAPS.lock().unwrap().get(&key)
        && kept(at)
    {
        return *gap;
    }
    let gap = shortest_gap(cron, tz);
    let mut gaps = GAPS.lock().unwrap();
    gaps.retain(|_, (at, _)| kept(at));
    gaps.insert(key, (now, gap));
    gap
}

/// The shortest gap between two of `cron`'s next 100 firings (in `tz`).
fn shortest_gap(cron: &croner::Cron, tz: chrono_tz::Tz) -> Option<chrono::Duration> {
    let mut at = Utc::now().with_timezone(&tz);
    let mut times = Vec::with_capacity(100);
    for _ in 0..100 {
        match cron.find_next_occurrence(&at, false) {
            Ok(next) => {
                times.push(next);
                at = next;
            }
            Err(_) => break,
        }
    }
    times.windows(2).map(|w| w[1] - w[0]).min()
}

/// Checks a BackupSchedule's spec as its reconciler reads it (cron
/// expression, time zone, interval against `min_interval`, retention):
/// why it is refused, if it is.
pub fn check_spec(bs: &BackupSchedule, min_interval: Duration) -> Result<(), String> {
    schedule_of(bs, min_interval).map(|_| ())
}

fn schedule_of(bs: &BackupSchedule, min_interval: Duration) -> Result<Schedule, String> {
    let s = &bs.spec;
    let cron = parse_cron(&s.schedule).map_err(|e| format!("spec.schedule {e}"))?;
    let timezone =
        parse_timezone(s.time_zone.as_deref()).map_err(|e| format!("spec.timeZone {e}"))?;
    if let Some(gap) = shortest_gap_of(&s.schedule, &cron, timezone)
        && gap.to_std().unwrap_or_default() < min_interval
    {
        return Err(format!(
            "spec.schedule {:?} fires {} apart, more often than this controller allows (at \
             most every {}: --min-schedule-interval)",
            s.schedule,
            stillpoint_proto::duration::format_duration(gap.to_std().unwrap_or_default()),
            stillpoint_proto::duration::format_duration(min_interval)
        ));
    }
    if s.keep_last == Some(0) {
        return Err(format!(
            "spec.keepLast must be at least 1 (left out, the newest {DEFAULT_KEEP_LAST} are kept)"
        ));
    }
    let max_age = s
        .max_age
        .as_deref()
        .map(|t| {
            stillpoint_proto::duration::parse_duration(t)
                .map_err(|e| format!("spec.maxAge {t:?}: {e}"))
        })
        .transpose()?;
    Ok(Schedule {
        name: bs.name_any(),
        group: s.group.clone(),
        cron,
        timezone,
        retention: Retention {
            keep_last: Some(s.keep_last.unwrap_or(DEFAULT_KEEP_LAST) as usize),
            max_age,
        },
        missed: s.missed,
        suspend: s.suspend,
    })
}

/// What the leader's gauges say of schedule `bs` (none while it is
/// suspended or its spec does not read): its shortest gap between firings
/// and when its newest successful backup, among `all` of its namespace,
/// completed (its creation when none did).
pub(crate) fn state_of(
    bs: &BackupSchedule,
    all: &[Arc<GroupBackup>],
    min_interval: Duration,
) -> Option<crate::metrics::ScheduleState> {
    let schedule = schedule_of(bs, min_interval).ok()?;
    if schedule.suspend {
        return None;
    }
    let interval = shortest_gap_of(&bs.spec.schedule, &schedule.cron, schedule.timezone)?
        .to_std()
        .ok()?;
    let succeeded = own_backups(bs, all, &schedule)
        .into_iter()
        .filter_map(crate::kube::state::succeeded_at)
        .fold(None, |a: Option<f64>, t| Some(a.map_or(t, |a| a.max(t))));
    let born = bs
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second() as f64);
    Some(crate::metrics::ScheduleState {
        namespace: bs.namespace(),
        schedule: schedule.name,
        group: schedule.group,
        interval_seconds: interval.as_secs_f64(),
        last_success_seconds: succeeded.or(born)?,
    })
}

async fn apply_status(
    api: &Api<BackupSchedule>,
    name: &str,
    status: &BackupScheduleStatus,
) -> Result<(), kube::Error> {
    let mut status = status.clone();
    let generation = status.observed_generation;
    crate::kube::store::fit(&mut status, generation);
    crate::kube::store::apply_status(api, name, "BackupSchedule", &status).await
}

fn created(b: &GroupBackup) -> DateTime<Utc> {
    b.metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0))
        .unwrap_or_else(Utc::now)
}

/// Whether schedule `uid` (of `group`) made backup `b`.
fn made_by(b: &GroupBackup, uid: &str, group: &str) -> bool {
    !uid.is_empty()
        && b.labels().get(SCHEDULE_UID_LABEL).map(String::as_str) == Some(uid)
        && b.spec.group == group
}

fn ended(b: &GroupBackup) -> bool {
    b.status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_final())
}

pub async fn reconcile(
    bs: Arc<BackupSchedule>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let api: Api<BackupSchedule> =
        Api::namespaced(ctx.client.clone(), &bs.namespace().unwrap_or_default());
    let mut status = bs.status.clone().unwrap_or_default();
    status.observed_generation = bs.metadata.generation;
    let schedule = match schedule_of(&bs, ctx.settings.min_schedule_interval) {
        Ok(s) => s,
        Err(message) => return invalid(&bs, &ctx, status, message).await,
    };
    let generation = bs.metadata.generation;
    let valid = "the schedule is valid";
    set_condition(
        &mut status.conditions,
        "Valid",
        true,
        Reason::Valid,
        valid,
        generation,
    );
    let all = ctx.backups_in(&bs.namespace().unwrap_or_default()).await?;
    let own = own_backups(&bs, &all, &schedule);
    summarize(&mut status, &own);
    prune(&bs, &ctx, &own, &schedule).await?;
    let now = Utc::now();
    if schedule.suspend {
        status.next_schedule_time = None;
        apply_status(&api, &bs.name_any(), &status).await?;
        return Ok(Action::requeue(RESYNC));
    }
    let firing = firing_of(&bs, &status, &own, &schedule, now);
    report_missed(&bs, &ctx, &firing).await;
    if let (true, Some(slot)) = (firing.fire, firing.slot) {
        fire(&bs, &ctx, &all, &schedule, slot, &mut status).await?;
    }
    if let Some(at) = firing.record {
        status.last_schedule_time = Some(micro(at));
    }
    let next = schedule.next_after(now);
    status.next_schedule_time = next.map(micro);
    let wait = next
        .and_then(|n| (n - Utc::now()).to_std().ok())
        .unwrap_or(RESYNC)
        .clamp(Duration::from_millis(100), RESYNC);
    // The runs are recorded by the backups themselves: a status that
    // cannot be written is retried at the next look, which keeps the
    // schedule's time, not after a growing backoff that would miss runs.
    if let Err(e) = apply_status(&api, &bs.name_any(), &status).await {
        tracing::warn!(
            schedule = %key_of(&bs),
            "status not written (written again in {wait:?}): {e}"
        );
    }
    Ok(Action::requeue(wait))
}

/// `namespace/name` of a schedule.
fn key_of(bs: &BackupSchedule) -> String {
    format!("{}/{}", bs.namespace().unwrap_or_default(), bs.name_any())
}

/// A spec that cannot be read: `Valid=False` with why (an Event once).
async fn invalid(
    bs: &BackupSchedule,
    ctx: &Context,
    mut status: BackupScheduleStatus,
    message: String,
) -> Result<Action, ReconcileError> {
    let already = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Valid" && c.status == "False" && c.message == message);
    let generation = bs.metadata.generation;
    set_condition(
        &mut status.conditions,
        "Valid",
        false,
        Reason::InvalidSpec,
        &message,
        generation,
    );
    status.next_schedule_time = None;
    let api: Api<BackupSchedule> =
        Api::namespaced(ctx.client.clone(), &bs.namespace().unwrap_or_default());
    apply_status(&api, &bs.name_any(), &status).await?;
    if !already {
        ctx.event(bs, true, Reason::InvalidSpec, message).await;
    }
    Ok(Action::await_change())
}

/// The schedule's own backups among a namespace's.
fn own_backups<'a>(
    bs: &BackupSchedule,
    all: &'a [Arc<GroupBackup>],
    schedule: &Schedule,
) -> Vec<&'a GroupBackup> {
    let uid = bs.uid().unwrap_or_default();
    all.iter()
        .map(|b| &**b)
        .filter(|b| made_by(b, &uid, &schedule.group))
        .collect()
}

/// Its backups that have not ended, and its newest successful one.
fn summarize(status: &mut BackupScheduleStatus, own: &[&GroupBackup]) {
    status.active = own
        .iter()
        .filter(|b| !ended(b) && b.metadata.deletion_timestamp.is_none())
        .map(|b| b.name_any())
        .collect();
    status.last_successful_backup = own
        .iter()
        .filter(|b| {
            b.status.as_ref().and_then(|s| s.phase)
                == Some(crate::kube::crd::BackupPhase::Succeeded)
        })
        .max_by_key(|b| (created(b), b.name_any()))
        .map(|b| b.name_any());
}

/// Retention, among its backups that have ended.
async fn prune(
    bs: &BackupSchedule,
    ctx: &Context,
    own: &[&GroupBackup],
    schedule: &Schedule,
) -> Result<(), ReconcileError> {
    let name = bs.name_any();
    let manifests: Vec<_> = own
        .iter()
        .filter(|b| ended(b) && b.metadata.deletion_timestamp.is_none())
        .map(|b| {
            let mut m = manifest_of(b);
            m.schedule = Some(name.clone());
            m
        })
        .collect();
    let backups: Api<GroupBackup> =
        Api::namespaced(ctx.client.clone(), &bs.namespace().unwrap_or_default());
    let now_time = time::OffsetDateTime::now_utc();
    for doomed in select(&manifests, &name, schedule.retention, now_time) {
        match backups.delete(&doomed, &DeleteParams::default()).await {
            Ok(_) => {
                let message = format!("deleted GroupBackup {doomed} (retention)");
                ctx.event(bs, false, Reason::Pruned, message).await
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                metrics()
                    .retention_failures
                    .get_or_create(&Metrics::schedule(bs.namespace().as_deref(), &name))
                    .inc();
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// The scheduled time of the run backup `b` was taken for.
fn slot_of(b: &GroupBackup) -> Option<DateTime<Utc>> {
    let text = b.annotations().get(SCHEDULED_TIME_ANNOTATION)?;
    let at = DateTime::parse_from_rfc3339(text).ok()?;
    Some(at.with_timezone(&Utc))
}

/// The schedule's last run: the later of its status's and of the newest
/// run its own backups were taken for (a run whose status write was lost,
/// or that a stale cache of the schedule does not show yet).
fn last_run(status: &BackupScheduleStatus, own: &[&GroupBackup]) -> Option<DateTime<Utc>> {
    let recorded = status.last_schedule_time.as_ref().map(from_micro);
    let taken = own.iter().filter_map(|b| slot_of(b)).max();
    recorded.max(taken)
}

/// When the schedule was created (the run `immediate` takes is for it).
fn born(bs: &BackupSchedule) -> Option<DateTime<Utc>> {
    let t = bs.metadata.creation_timestamp.as_ref()?;
    DateTime::from_timestamp(t.0.as_second(), 0)
}

/// Whether a run is due now, and how many were missed.
fn firing_of(
    bs: &BackupSchedule,
    status: &BackupScheduleStatus,
    own: &[&GroupBackup],
    schedule: &Schedule,
    now: DateTime<Utc>,
) -> crate::core::schedule::Firing {
    let last = last_run(status, own);
    let firing = match last {
        None if bs.spec.immediate => crate::core::schedule::Firing {
            fire: true,
            missed: 0,
            record: Some(now),
            slot: Some(born(bs).unwrap_or(now)),
        },
        _ => {
            let since = last.or_else(|| born(bs)).unwrap_or(now);
            let due = schedule.runs_between(since, now, 10_000);
            let on_time = chrono::Duration::from_std(ON_TIME).unwrap_or_default();
            decide(&due, now, on_time, schedule.missed)
        }
    };
    tracing::debug!(
        schedule = %key_of(bs),
        fire = firing.fire,
        missed = firing.missed,
        "schedule reconciled"
    );
    firing
}

/// Counts and says the runs that fell while no controller led.
async fn report_missed(bs: &BackupSchedule, ctx: &Context, firing: &crate::core::schedule::Firing) {
    if firing.missed == 0 {
        return;
    }
    let ns = bs.namespace().unwrap_or_default();
    metrics()
        .schedule_missed
        .get_or_create(&Metrics::schedule(Some(&ns), &bs.name_any()))
        .inc_by(firing.missed);
    let what = match firing.fire {
        true => "one backup is taken now (missed: run-once)",
        false => "none is taken for them (missed: skip)",
    };
    let message = format!(
        "{} run(s) fell while no controller led; {what}",
        firing.missed
    );
    ctx.event(bs, true, Reason::Missed, message).await;
}

/// The run for `slot`: nothing when its backup exists already (an earlier
/// look at the schedule took it), skipped while a backup of the group has
/// not ended, else a new GroupBackup named by the slot.
async fn fire(
    bs: &BackupSchedule,
    ctx: &Context,
    all: &[Arc<GroupBackup>],
    schedule: &Schedule,
    slot: DateTime<Utc>,
    status: &mut BackupScheduleStatus,
) -> Result<(), ReconcileError> {
    let (ns, name) = (bs.namespace().unwrap_or_default(), bs.name_any());
    let backup_name = format!("{name}-{}", slot.format("%Y%m%d-%H%M%S"));
    if let Some(b) = all.iter().find(|b| b.name_any() == backup_name) {
        already(bs, ctx, b, schedule).await;
        return Ok(());
    }
    let running = all.iter().find(|b| {
        b.spec.group == schedule.group && !ended(b) && b.metadata.deletion_timestamp.is_none()
    });
    if let Some(b) = running {
        let message = format!(
            "a run was skipped: GroupBackup {} of group {} has not ended",
            b.name_any(),
            schedule.group
        );
        skipped(bs, ctx, "overlap", message).await;
        return Ok(());
    }
    let backups: Api<GroupBackup> = Api::namespaced(ctx.client.clone(), &ns);
    let backup = run_backup(bs, schedule, &backup_name, slot);
    match backups.create(&PostParams::default(), &backup).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = backups.get(&backup_name).await?;
            already(bs, ctx, &existing, schedule).await;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    metrics()
        .schedule_runs
        .get_or_create(&Metrics::schedule(Some(&ns), &name))
        .inc();
    status.active.push(backup_name.clone());
    let message = format!("created GroupBackup {backup_name}");
    ctx.event(bs, false, Reason::Scheduled, message).await;
    Ok(())
}

/// The GroupBackup of the run for `slot`, named `name`.
fn run_backup(
    bs: &BackupSchedule,
    schedule: &Schedule,
    name: &str,
    slot: DateTime<Utc>,
) -> GroupBackup {
    let mut backup = GroupBackup::new(
        name,
        GroupBackupSpec {
            group: schedule.group.clone(),
            deletion_policy: bs.spec.deletion_policy,
        },
    );
    backup.metadata.labels = Some(
        [
            (SCHEDULE_LABEL.to_string(), bs.name_any()),
            (SCHEDULE_UID_LABEL.to_string(), bs.uid().unwrap_or_default()),
            (GROUP_LABEL.to_string(), schedule.group.clone()),
        ]
        .into(),
    );
    let at = slot.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    backup.metadata.annotations = Some([(SCHEDULED_TIME_ANNOTATION.to_string(), at)].into());
    backup
}

/// The run's backup exists: taken by an earlier look at this schedule
/// (nothing to do), or a GroupBackup of that name it did not make (the
/// run is skipped, and said so).
async fn already(bs: &BackupSchedule, ctx: &Context, existing: &GroupBackup, schedule: &Schedule) {
    let uid = bs.uid().unwrap_or_default();
    if made_by(existing, &uid, &schedule.group) {
        tracing::debug!(
            schedule = %key_of(bs),
            backup = %existing.name_any(),
            "the run was taken already"
        );
        return;
    }
    let message = format!(
        "a run was skipped: GroupBackup {} exists and was not made by this schedule",
        existing.name_any()
    );
    skipped(bs, ctx, "name-taken", message).await
}

/// A run not taken: counted by `reason`, and an Event.
async fn skipped(bs: &BackupSchedule, ctx: &Context, reason: &str, message: String) {
    metrics()
        .schedule_skips
        .get_or_create(&SkipLabels {
            namespace: crate::metrics::Namespace::of(bs.namespace().as_deref()),
            schedule: bs.name_any(),
            reason: reason.into(),
        })
        .inc();
    ctx.event(bs, true, Reason::Skipped, message).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(spec: &str) -> BackupSchedule {
        serde_yaml::from_str(&format!(
            "apiVersion: stillpoint.dev/v1alpha1\nkind: BackupSchedule\nmetadata: {{name: s, namespace: n}}\nspec: {spec}"
        ))
        .unwrap()
    }

    #[test]
    fn a_schedule_firing_more_often_than_allowed_is_refused() {
        let minute = Duration::from_secs(60);
        let every_second = schedule("{group: g, schedule: \"* * * * * *\"}");
        let why = schedule_of(&every_second, minute).unwrap_err();
        assert!(why.contains("fires 1s apart"), "{why}");
        assert!(why.contains("at most every 1m"), "{why}");
        // Irregular: twice a minute apart, then an hour's pause.
        let bursts = schedule("{group: g, schedule: \"0 0,1 * * * *\"}");
        assert!(schedule_of(&bursts, Duration::from_secs(61)).is_err());
        assert!(schedule_of(&bursts, minute).is_ok());
        let hourly = schedule("{group: g, schedule: \"0 * * * *\"}");
        assert!(schedule_of(&hourly, minute).is_ok());
    }

    #[test]
    fn a_run_taken_is_not_taken_again_whatever_the_status_says() {
        let bs = schedule("{group: g, schedule: \"*/3 * * * * *\"}");
        let s = schedule_of(&bs, Duration::from_secs(1)).unwrap();
        let at = |t: &str| DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc);
        let slot = at("2026-12-07T10:00:03Z");
        let b = run_backup(&bs, &s, "s-20261207-100003", slot);
        assert_eq!(slot_of(&b), Some(slot));
        assert_eq!(b.labels()[GROUP_LABEL], "g");
        // The status lost the run (or is read from a stale cache): the
        // backup says it was taken.
        let mut status = BackupScheduleStatus {
            last_schedule_time: Some(micro(at("2026-12-07T10:00:00.02Z"))),
            ..Default::default()
        };
        let now = at("2026-12-07T10:00:04Z");
        assert_eq!(last_run(&status, &[&b]), Some(slot));
        let firing = firing_of(&bs, &status, &[&b], &s, now);
        assert_eq!((firing.fire, firing.missed), (false, 0));
        // Without the backup, the run is due, and named by its time.
        let firing = firing_of(&bs, &status, &[], &s, now);
        assert_eq!((firing.fire, firing.slot), (true, Some(slot)));
        // A status ahead of the backups wins.
        status.last_schedule_time = Some(micro(at("2026-12-07T10:00:06.01Z")));
        assert_eq!(
            last_run(&status, &[&b]),
            Some(at("2026-12-07T10:00:06.01Z"))
        );
    }

    #[test]
    fn retention_keeps_the_newest_30_unless_told() {
        let minute = Duration::from_secs(60);
        let untold = schedule_of(&schedule("{group: g, schedule: \"0 * * * *\"}"), minute).unwrap();
        assert_eq!(untold.retention.keep_last, Some(30));
        let told = schedule_of(
            &schedule("{group: g, schedule: \"0 * * * *\", keepLast: 3}"),
            minute,
        )
        .unwrap();
        assert_eq!(told.retention.keep_last, Some(3));
    }

    #[test]
    fn a_remembered_gap_is_the_one_of_its_expression_and_zone() {
        let gap = |text: &str, tz| {
            let cron = parse_cron(text).unwrap();
            (shortest_gap_of(text, &cron, tz), shortest_gap(&cron, tz))
        };
        for _ in 0..2 {
            for (text, tz, minutes) in [
                ("*/5 * * * *", chrono_tz::UTC, 5),
                ("0 * * * *", chrono_tz::UTC, 60),
                ("*/5 * * * *", chrono_tz::Asia::Kolkata, 5),
            ] {
                let (remembered, computed) = gap(text, tz);
                assert_eq!(remembered, computed, "{text} {tz}");
                assert_eq!(
                    remembered,
                    Some(chrono::Duration::minutes(minutes)),
                    "{text}"
                );
            }
        }
    }
}
