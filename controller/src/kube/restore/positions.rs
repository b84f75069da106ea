//! Step 6, positions: restored servers hold what the backup recorded.

use std::time::Duration;

use super::plan::Planned;
use super::run::Run;
use super::{POLL, POSITION_BOUND, Stop, stop};
use crate::kube::reason::Reason;
use crate::kube::resolve::{agent_port, pod_identity};

/// How restored position `a` stands to recorded position `b`, by engine
/// (`None`: not comparable: GTID sets that each lack what the other has,
/// or an engine whose positions do not survive a restart).
pub(super) fn compare(engine: &str, a: &str, b: &str) -> Option<std::cmp::Ordering> {
    use stillpoint_proto::PositionExt;
    use stillpoint_proto::pb::GtidFlavor;
    use stillpoint_proto::position::{gtid_from_display, parse_lsn};
    let flavor = match engine {
        "postgres" => return Some(parse_lsn(a)?.cmp(&parse_lsn(b)?)),
        "mariadb" => GtidFlavor::Mariadb,
        "mysql" => GtidFlavor::Mysql,
        _ => return None,
    };
    gtid_from_display(flavor, a)
        .compare(&gtid_from_display(flavor, b))
        .ok()
}

/// Whether a restored server of `engine` must be exactly at the position
/// the backup recorded. A MySQL or MariaDB member was frozen with its
/// commits blocked, so its restored GTID set is the recorded one; a
/// PostgreSQL member's crash recovery writes WAL of its own (and in
/// `backup` mode writes flowed through the cut), so it is at or past it.
pub(super) fn exact(engine: &str) -> bool {
    matches!(engine, "mariadb" | "mysql")
}

/// Whether restored position `a` is at or past `b` (`None`: not known).
pub(super) fn reached(engine: &str, a: &str, b: &str) -> Option<bool> {
    match (compare(engine, a, b), exact(engine)) {
        (Some(o), _) => Some(o != std::cmp::Ordering::Less),
        // GTID sets that are not comparable: `a` lacks some of `b`.
        (None, true) => Some(false),
        (None, false) => None,
    }
}
impl Run {
    /// The restored server's position, through its agent (if it has one).
    pub(super) async fn position_of(&self, pod: &str) -> Result<Option<String>, String> {
        let Some(p) = self.w.pods.get_opt(pod).await.map_err(|e| e.to_string())? else {
            return Err(format!("pod {pod} is gone"));
        };
        let (Some(port), Some(ip)) = (
            agent_port(&p),
            p.status.as_ref().and_then(|s| s.pod_ip.clone()),
        ) else {
            return Ok(None);
        };
        let identity = pod_identity(&self.ctx.settings.trust_domain, &p);
        let d = self
            .ctx
            .resolver
            .describe(
                &format!("{ip}:{port}"),
                &identity,
                Duration::from_secs(5),
                crate::core::agents::DEFAULT_RPC_TIMEOUT,
            )
            .await
            .map_err(|v| v.message)?;
        Ok(d.position)
    }

    /// 6. Restored servers hold what the backup recorded for them.
    pub(super) async fn check_positions(
        &mut self,
        planned: &[Planned],
        members: &[&Planned],
    ) -> Result<(), Stop> {
        for p in members {
            let check = self.check_position(planned, p).await?;
            self.member(&p.rec.pod).check = Some(check);
        }
        self.save().await?;
        Ok(())
    }

    /// What checking member `p` found (why not, where it cannot be).
    async fn check_position(&mut self, planned: &[Planned], p: &Planned) -> Result<String, Stop> {
        let engine = p.rec.engine.clone().unwrap_or_default();
        if !matches!(engine.as_str(), "postgres" | "mariadb" | "mysql") {
            return Ok(format!(
                "not checked: {engine} positions do not survive a restart"
            ));
        }
        let Some(pod) = p.restored_pod.clone() else {
            return Ok("not checked: a Deployment's pods have no fixed names".into());
        };
        let (must, what) = match (p.is_replica(), exact(&engine)) {
            (true, false) => (
                p.rec.aligned_to.clone().or(p.rec.position.clone()),
                "the position it was aligned to",
            ),
            _ => (p.rec.position.clone(), "the position it was frozen at"),
        };
        let Some(must) = must else {
            return Ok("not checked: the backup recorded no position".into());
        };
        let Some(at) = self.replayed(&pod, &engine, &must).await? else {
            return Ok("not checked: the restored pod has no agent".into());
        };
        self.member(&p.rec.pod).position = Some(at.clone());
        holds(&pod, &engine, &at, &must, what)?;
        let mut check = match exact(&engine) {
            true => format!("ok: {at} is exactly {what}"),
            false => format!("ok: {at} holds {what} ({must})"),
        };
        if p.is_replica() {
            check.push_str(&self.not_ahead(planned, p, &pod, &engine, &at).await?);
        }
        Ok(check)
    }

    /// The position of restored `pod` once it reached `must`, or when
    /// `POSITION_BOUND` is over (replay may still be going on once Ready);
    /// none if it has no agent.
    async fn replayed(&self, pod: &str, engine: &str, must: &str) -> Result<Option<String>, Stop> {
        let deadline = tokio::time::Instant::now() + POSITION_BOUND;
        loop {
            match self.position_of(pod).await {
                Err(e) => {
                    return Err(stop(
                        Reason::PositionCheckFailed,
                        format!("asking pod {pod}'s agent its position: {e}"),
                    ));
                }
                Ok(None) => return Ok(None),
                Ok(Some(at)) => {
                    if reached(engine, &at, must) != Some(false)
                        || tokio::time::Instant::now() >= deadline
                    {
                        return Ok(Some(at));
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A restored replica is not ahead of its restored primary: the note
    /// that says so, empty when the primary cannot be asked.
    async fn not_ahead(
        &self,
        planned: &[Planned],
        p: &Planned,
        pod: &str,
        engine: &str,
        at: &str,
    ) -> Result<String, Stop> {
        let Some(primary_pod) = planned
            .iter()
            .find(|q| Some(&q.rec.pod) == p.rec.primary.as_ref())
            .and_then(|q| q.restored_pod.clone())
        else {
            return Ok(String::new());
        };
        let Ok(Some(theirs)) = self.position_of(&primary_pod).await else {
            return Ok(String::new());
        };
        if reached(engine, &theirs, at) == Some(false) {
            return Err(stop(
                Reason::PositionCheckFailed,
                format!(
                    "restored replica {pod} is at {at}, ahead of its restored primary {primary_pod} at {theirs}"
                ),
            ));
        }
        Ok(format!(", not ahead of {primary_pod} ({theirs})"))
    }
}

/// Restored `pod` at `at` holds `what` (`must`): not short of it, and not
/// past it where the engine is exact.
fn holds(pod: &str, engine: &str, at: &str, must: &str, what: &str) -> Result<(), Stop> {
    if reached(engine, at, must) == Some(false) {
        return Err(stop(
            Reason::PositionCheckFailed,
            format!(
                "restored pod {pod} is at {at}, short of {what} ({must}) within {POSITION_BOUND:?}: the restored data lacks what the backup promised"
            ),
        ));
    }
    if exact(engine) && compare(engine, at, must) != Some(std::cmp::Ordering::Equal) {
        return Err(stop(
            Reason::PositionCheckFailed,
            format!(
                "restored pod {pod} is at {at}, past {what} ({must}): it holds transactions \
                 the backup did not record, so its data is not this backup's"
            ),
        ));
    }
    Ok(())
}
