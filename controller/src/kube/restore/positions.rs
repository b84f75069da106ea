//! Step 6, positions: restored servers hold what the backup recorded.

use std::time::Duration;

use super::plan::Planned;
use super::run::Run;
use super::{POLL, POSITION_BOUND, Stop, stop};
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
            let engine = p.rec.engine.clone().unwrap_or_default();
            if !matches!(engine.as_str(), "postgres" | "mariadb" | "mysql") {
                self.member(&p.rec.pod).check = Some(format!(
                    "not checked: {engine} positions do not survive a restart"
                ));
                continue;
            }
            let Some(pod) = p.restored_pod.clone() else {
                self.member(&p.rec.pod).check =
                    Some("not checked: a Deployment's pods have no fixed names".into());
                continue;
            };
            let (must, what) = match (p.is_replica(), exact(&engine)) {
                (true, false) => (
                    p.rec.aligned_to.clone().or(p.rec.position.clone()),
                    "the position it was aligned to",
                ),
                _ => (p.rec.position.clone(), "the position it was frozen at"),
            };
            let Some(must) = must else {
                self.member(&p.rec.pod).check =
                    Some("not checked: the backup recorded no position".into());
                continue;
            };
            // Replay may still be going on once Ready: wait for it, bounded.
            let deadline = tokio::time::Instant::now() + POSITION_BOUND;
            let position = loop {
                match self.position_of(&pod).await {
                    Err(e) => {
                        return Err(stop(
                            "PositionCheckFailed",
                            format!("asking pod {pod}'s agent its position: {e}"),
                        ));
                    }
                    Ok(None) => break None,
                    Ok(Some(at)) => {
                        if reached(&engine, &at, &must) != Some(false)
                            || tokio::time::Instant::now() >= deadline
                        {
                            break Some(at);
                        }
                    }
                }
                tokio::time::sleep(POLL).await;
            };
            let Some(at) = position else {
                self.member(&p.rec.pod).check =
                    Some("not checked: the restored pod has no agent".into());
                continue;
            };
            self.member(&p.rec.pod).position = Some(at.clone());
            if reached(&engine, &at, &must) == Some(false) {
                return Err(stop(
                    "PositionCheckFailed",
                    format!(
                        "restored pod {pod} is at {at}, short of {what} ({must}) within {POSITION_BOUND:?}: the restored data lacks what the backup promised"
                    ),
                ));
            }
            if exact(&engine) && compare(&engine, &at, &must) != Some(std::cmp::Ordering::Equal) {
                return Err(stop(
                    "PositionCheckFailed",
                    format!(
                        "restored pod {pod} is at {at}, past {what} ({must}): it holds transactions \
                         the backup did not record, so its data is not this backup's"
                    ),
                ));
            }
            let mut check = match exact(&engine) {
                true => format!("ok: {at} is exactly {what}"),
                false => format!("ok: {at} holds {what} ({must})"),
            };
            if p.is_replica()
                && let Some(primary) = planned
                    .iter()
                    .find(|q| Some(&q.rec.pod) == p.rec.primary.as_ref())
                && let Some(primary_pod) = &primary.restored_pod
                && let Ok(Some(theirs)) = self.position_of(primary_pod).await
            {
                if reached(&engine, &theirs, &at) == Some(false) {
                    return Err(stop(
                        "PositionCheckFailed",
                        format!(
                            "restored replica {pod} is at {at}, ahead of its restored primary {primary_pod} at {theirs}"
                        ),
                    ));
                }
                check.push_str(&format!(", not ahead of {primary_pod} ({theirs})"));
            }
            self.member(&p.rec.pod).check = Some(check);
        }
        self.save().await?;
        Ok(())
    }
}
