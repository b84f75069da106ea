//! The GroupQuiesce reconciler: a manual freeze of a group (or one member)
//! for a while. The leader freezes every targeted member in parallel (any
//! refusal thaws the others), holds them renewing the agents' lease, and
//! thaws when the duration ends, when the resource is deleted (its
//! finalizer waits for the thaw), or when the controller shuts down. If
//! the controller dies, the agents thaw when the lease runs out, and the
//! next leader marks the quiesce `Failed` (`ControllerRestarted`).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use stillpoint_proto::PositionExt;
use tokio::sync::watch;

use crate::core::error::ErrorKind;
use crate::core::holder::{Holder, freeze_all, hold_id};
use crate::core::model::AgentEndpoint;
use crate::kube::controller::{Context, Live, ReconcileError, now};
use crate::kube::crd::{
    ConsistencyGroup, GroupQuiesce, GroupQuiesceStatus, QUIESCE_FINALIZER, QuiescePhase,
    QuiescedMember, ResolvedMember,
};
use crate::kube::reason::Reason;
use crate::kube::resolve::Resolution;
use crate::kube::store::set_condition;

/// The longest hold a GroupQuiesce may ask for.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// The lease when neither the quiesce nor the group names one.
const DEFAULT_TTL: Duration = Duration::from_secs(30);

async fn apply_status(
    api: &Api<GroupQuiesce>,
    name: &str,
    status: &GroupQuiesceStatus,
) -> Result<(), kube::Error> {
    crate::kube::store::apply_status(api, name, "GroupQuiesce", status).await
}

/// Ends a quiesce that never held anything, or whose holder is gone.
async fn end(
    ctx: &Context,
    q: &GroupQuiesce,
    phase: QuiescePhase,
    reason: Reason,
    message: String,
) -> Result<Action, ReconcileError> {
    let api: Api<GroupQuiesce> =
        Api::namespaced(ctx.client.clone(), &q.namespace().unwrap_or_default());
    let mut status = q.status.clone().unwrap_or_default();
    status.phase = Some(phase);
    status.observed_generation = q.metadata.generation;
    if phase == QuiescePhase::Failed {
        status.error = Some(message.clone());
    }
    status.thawed_at = Some(now());
    set_condition(
        &mut status.conditions,
        "Frozen",
        false,
        reason,
        &message,
        q.metadata.generation,
    );
    apply_status(&api, &q.name_any(), &status).await?;
    ctx.event(q, phase == QuiescePhase::Failed, reason, message)
        .await;
    Ok(Action::await_change())
}

/// Parses a GroupQuiesce's duration field `what` (`duration`, `ttl`):
/// longer than zero.
pub fn parse(text: &str, what: &str) -> Result<Duration, String> {
    stillpoint_proto::duration::parse_duration(text)
        .map_err(|e| format!("spec.{what} {text:?}: {e}"))
        .and_then(|d| match d.is_zero() {
            true => Err(format!("spec.{what} must be longer than zero")),
            false => Ok(d),
        })
}

/// A GroupQuiesce's reconcile, on kube-rs's finalizer (added before
/// anything freezes; removed once the hold has thawed).
pub async fn reconcile(q: Arc<GroupQuiesce>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let api: Api<GroupQuiesce> =
        Api::namespaced(ctx.client.clone(), &q.namespace().unwrap_or_default());
    finalizer(&api, QUIESCE_FINALIZER, q, |event| async {
        match event {
            FinalizerEvent::Apply(q) => step(q, &ctx).await,
            FinalizerEvent::Cleanup(q) => cleanup(&q, &ctx).await,
        }
    })
    .await
    .map_err(ReconcileError::from)
}

/// The quiesce's state machine: an ended one rests; one held here is left
/// to its task; one held elsewhere failed with its controller; a pending
/// one is taken.
async fn step(q: Arc<GroupQuiesce>, ctx: &Arc<Context>) -> Result<Action, ReconcileError> {
    let phase = q.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
    let uid = q.uid().unwrap_or_default();
    if phase.is_final() || ctx.live.lock().unwrap().contains_key(&uid) {
        return Ok(Action::await_change());
    }
    if phase == QuiescePhase::Frozen {
        let by = q
            .status
            .as_ref()
            .and_then(|s| s.run_by.clone())
            .unwrap_or_default();
        let m = format!(
            "the controller holding this quiesce ({by}) stopped; its members thawed when their \
             lease ran out"
        );
        return end(
            ctx,
            &q,
            QuiescePhase::Failed,
            Reason::ControllerRestarted,
            m,
        )
        .await;
    }
    take(q, ctx).await
}

/// Deleted: thaws a hold of it here and waits until it has.
async fn cleanup(q: &GroupQuiesce, ctx: &Context) -> Result<Action, ReconcileError> {
    let why = format!("GroupQuiesce {} was deleted", q.name_any());
    ctx.stop_live(&q.uid().unwrap_or_default(), why).await;
    Ok(Action::await_change())
}

/// What a quiesce asks for, read and checked: its duration, its group and
/// the lease.
struct Asked {
    duration: Duration,
    group: ConsistencyGroup,
    ttl: Duration,
}

/// Why a pending quiesce is not held.
#[derive(Debug, thiserror::Error)]
enum NotHeld {
    /// It cannot be: the reason and message it fails with.
    #[error("{1}")]
    Refused(Reason, String),
    /// Not now: the reconcile is retried.
    #[error(transparent)]
    Retry(#[from] ReconcileError),
}

impl From<kube::Error> for NotHeld {
    fn from(e: kube::Error) -> Self {
        NotHeld::Retry(e.into())
    }
}

/// Reads the spec and the group.
async fn asked(q: &GroupQuiesce, ctx: &Context) -> Result<Asked, NotHeld> {
    let invalid = |m: String| Err(NotHeld::Refused(Reason::InvalidSpec, m));
    let duration = match parse(&q.spec.duration, "duration") {
        Ok(d) if d <= MAX_DURATION => d,
        Ok(_) => {
            return invalid(format!(
                "spec.duration {:?} is longer than 24h",
                q.spec.duration
            ));
        }
        Err(m) => return invalid(m),
    };
    let ns = q.namespace().unwrap_or_default();
    let groups: Api<ConsistencyGroup> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(group) = groups.get_opt(&q.spec.group).await? else {
        let m = format!(
            "ConsistencyGroup {} does not exist in namespace {ns}",
            q.spec.group
        );
        return Err(NotHeld::Refused(Reason::GroupNotFound, m));
    };
    let ttl = match q.spec.ttl.as_deref().or(group.spec.lease_ttl.as_deref()) {
        Some(t) => match parse(t, "ttl") {
            Ok(d) => d,
            Err(m) => return invalid(m),
        },
        None => DEFAULT_TTL,
    };
    Ok(Asked {
        duration,
        group,
        ttl,
    })
}

/// The resolved members the quiesce targets, each with a reachable agent.
fn targets(q: &GroupQuiesce, resolution: &Resolution) -> Result<Vec<ResolvedMember>, NotHeld> {
    let targets: Vec<_> = resolution
        .members
        .iter()
        .filter(|m| {
            q.spec
                .member
                .as_ref()
                .is_none_or(|t| *t == m.name || *t == m.pod)
        })
        .cloned()
        .collect();
    if targets.is_empty() {
        let m = match &q.spec.member {
            Some(t) => format!("group {} has no member or pod {t}", q.spec.group),
            None => format!(
                "group {} has no members: {}",
                q.spec.group, resolution.resolved.message
            ),
        };
        return Err(NotHeld::Refused(Reason::MemberNotFound, m));
    }
    if let Some(m) = targets
        .iter()
        .find(|m| m.agent.is_none() || m.identity.is_none())
    {
        let message = format!(
            "pod {} has no reachable agent: {}",
            m.pod, resolution.resolved.message
        );
        return Err(NotHeld::Refused(Reason::NoAgent, message));
    }
    Ok(targets)
}

/// A pending quiesce: reads what it asks, resolves its targets, freezes
/// them and holds.
async fn take(q: Arc<GroupQuiesce>, ctx: &Arc<Context>) -> Result<Action, ReconcileError> {
    match held_as(&q, ctx).await {
        Ok((asked, targets)) => hold(q, ctx, asked, targets).await,
        Err(NotHeld::Refused(reason, m)) => end(ctx, &q, QuiescePhase::Failed, reason, m).await,
        Err(NotHeld::Retry(e)) => Err(e),
    }
}

/// What the quiesce asks and the members it holds.
async fn held_as(q: &GroupQuiesce, ctx: &Context) -> Result<(Asked, Vec<ResolvedMember>), NotHeld> {
    let asked = asked(q, ctx).await?;
    let resolution = ctx.resolver.resolve(&asked.group).await;
    let targets = targets(q, &resolution)?;
    Ok((asked, targets))
}

/// Freezes every target in parallel (any refusal thaws the others),
/// records `Frozen`, and holds in a task of its own.
async fn hold(
    q: Arc<GroupQuiesce>,
    ctx: &Arc<Context>,
    asked: Asked,
    targets: Vec<ResolvedMember>,
) -> Result<Action, ReconcileError> {
    let (ns, name, uid) = (
        q.namespace().unwrap_or_default(),
        q.name_any(),
        q.uid().unwrap_or_default(),
    );
    let (cancel, cancelled) = watch::channel(None::<String>);
    let (finished, done) = watch::channel(false);
    let group = (ns.clone(), format!("quiesce:{}", q.spec.group));
    ctx.live.lock().unwrap().insert(
        uid.clone(),
        Live {
            group,
            cancel,
            done,
        },
    );
    let id = hold_id("GroupQuiesce", &format!("{ns}/{name}"), Some(&uid));
    let agents: Vec<_> = targets
        .iter()
        .map(|m| {
            let endpoint = AgentEndpoint {
                addr: m.agent.clone().unwrap_or_default(),
                identity: m.identity.clone().unwrap_or_default(),
            };
            (m.clone(), endpoint)
        })
        .collect();
    let tls = &ctx.resolver.tls;
    let (duration, ttl) = (asked.duration, asked.ttl);
    let holders = match freeze_all(tls, &agents, |m| format!("pod {}", m.pod), &id, ttl).await {
        Ok(holders) => holders,
        Err(errors) => {
            ctx.live.lock().unwrap().remove(&uid);
            let _ = finished.send(true);
            let m = format!(
                "the freeze was refused; nothing is left frozen: {}",
                errors.join("; ")
            );
            return end(
                ctx,
                &q,
                QuiescePhase::Failed,
                Reason::Run(ErrorKind::FreezeFailed),
                m,
            )
            .await;
        }
    };
    let held = Held {
        q: (*q).clone(),
        holders,
        duration,
        cancelled,
        finished,
    };
    match held.record_frozen(ctx, ttl).await {
        Ok(held) => {
            tokio::spawn(held.go(ctx.clone()));
            Ok(Action::await_change())
        }
        Err(e) => Err(e),
    }
}

/// A quiesce holding its members, in its own task.
struct Held {
    q: GroupQuiesce,
    holders: Vec<(ResolvedMember, Holder)>,
    duration: Duration,
    cancelled: watch::Receiver<Option<String>>,
    finished: watch::Sender<bool>,
}

impl Held {
    /// Records `Frozen` with each member's position, and its Event; if the
    /// status cannot be written, thaws everything and gives up.
    async fn record_frozen(mut self, ctx: &Context, ttl: Duration) -> Result<Held, ReconcileError> {
        let duration = self.duration;
        let until = k8s_openapi::jiff::Timestamp::now()
            .checked_add(k8s_openapi::jiff::SignedDuration::try_from(duration).unwrap_or_default())
            .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now());
        let q = &self.q;
        let mut status = GroupQuiesceStatus {
            observed_generation: q.metadata.generation,
            phase: Some(QuiescePhase::Frozen),
            run_by: Some(ctx.settings.identity.clone()),
            frozen_at: Some(now()),
            until: Some(MicroTime(until)),
            members: self
                .holders
                .iter()
                .map(|(m, h)| QuiescedMember {
                    pod: m.pod.clone(),
                    member: Some(m.name.clone()),
                    position: h.frozen.position.as_ref().map(PositionExt::display),
                })
                .collect(),
            ..q.status.clone().unwrap_or_default()
        };
        let message = format!(
            "{} member(s) of group {} frozen for {duration:?} (lease {ttl:?})",
            self.holders.len(),
            q.spec.group
        );
        let generation = q.metadata.generation;
        set_condition(
            &mut status.conditions,
            "Frozen",
            true,
            Reason::Held,
            &message,
            generation,
        );
        let api: Api<GroupQuiesce> =
            Api::namespaced(ctx.client.clone(), &q.namespace().unwrap_or_default());
        // A write that hangs (the API server unreachable) must not hold the
        // group past a cancel: the Lease lost, a shutdown. Delivered late,
        // after another replica took the quiesce, it is refused.
        let (mut cancelled, name) = (self.cancelled.clone(), q.name_any());
        let version = q.resource_version().unwrap_or_default();
        let written = tokio::select! {
            written = crate::kube::store::apply_status_at(&api, &name, "GroupQuiesce", &version, &status) =>
                written.map_err(ReconcileError::from),
            why = cancelled.wait_for(|c| c.is_some()) => {
                let why = why.map(|w| w.clone().unwrap_or_default()).unwrap_or_default();
                Err(ReconcileError::Cancelled(why))
            }
        };
        if let Err(e) = written {
            for (_, h) in self.holders {
                let _ = h.thaw(false).await;
            }
            ctx.live
                .lock()
                .unwrap()
                .remove(&q.uid().unwrap_or_default());
            let _ = self.finished.send(true);
            return Err(e);
        }
        ctx.event(q, false, Reason::Frozen, message).await;
        self.q.status = Some(status);
        Ok(self)
    }

    /// Holds until the end, a cancel (deletion, shutdown) or a lost hold;
    /// then thaws and records how it ended.
    async fn go(self, ctx: Arc<Context>) {
        let Held {
            q,
            holders,
            duration,
            mut cancelled,
            finished,
        } = self;
        let lost = async {
            loop {
                if let Some((m, why)) = holders
                    .iter()
                    .find_map(|(m, h)| h.lost().map(|why| (m.pod.clone(), why)))
                {
                    return format!("the hold on pod {m} was lost: {why}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let (reason, message, failed) = tokio::select! {
            _ = tokio::time::sleep(duration) => (Reason::Expired, format!("held for {duration:?}; thawed"), false),
            why = cancelled.wait_for(|c| c.is_some()) => {
                let why = why.map(|w| w.clone().unwrap_or_default()).unwrap_or_default();
                (Reason::Thawed, format!("{why}; thawed"), false)
            }
            why = lost => (Reason::Run(ErrorKind::HoldLost), why, true),
        };
        // All at once: a member whose agent does not answer is waited for
        // up to the lease, and must not hold the others' thaw back.
        let thawed = futures_util::future::join_all(
            holders
                .into_iter()
                .map(|(m, h)| async move { (m, h.thaw(false).await) }),
        )
        .await;
        let problems: Vec<String> = thawed
            .into_iter()
            .filter_map(|(m, r)| r.err().map(|e| format!("pod {}: {e}", m.pod)))
            .collect();
        let (phase, reason, message) = match (failed, problems.is_empty()) {
            (false, true) => (QuiescePhase::Thawed, reason, message),
            _ => (
                QuiescePhase::Failed,
                if failed {
                    reason
                } else {
                    Reason::Run(ErrorKind::ThawFailed)
                },
                format!("{message} {}", problems.join("; "))
                    .trim()
                    .to_string(),
            ),
        };
        if let Err(e) = end(&ctx, &q, phase, reason, message).await {
            tracing::warn!("writing the end of GroupQuiesce {}: {e}", q.name_any());
        }
        ctx.live
            .lock()
            .unwrap()
            .remove(&q.uid().unwrap_or_default());
        let _ = finished.send(true);
    }
}
