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
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;
use stillpoint_proto::PositionExt;
use tokio::sync::watch;

use crate::core::holder::{freeze_all, hold_id};
use crate::core::model::AgentEndpoint;
use crate::kube::controller::{Context, Live, ReconcileError, now};
use crate::kube::crd::{
    ConsistencyGroup, GroupQuiesce, GroupQuiesceStatus, QUIESCE_FINALIZER, QuiescePhase,
    QuiescedMember,
};
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

async fn set_finalizer(
    api: &Api<GroupQuiesce>,
    q: &GroupQuiesce,
    present: bool,
) -> Result<(), kube::Error> {
    let mut finalizers: Vec<String> = q.finalizers().to_vec();
    finalizers.retain(|f| f != QUIESCE_FINALIZER);
    if present {
        finalizers.push(QUIESCE_FINALIZER.into());
    }
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": q.resource_version()}});
    api.patch(
        &q.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Ends a quiesce that never held anything, or whose holder is gone.
async fn end(
    ctx: &Context,
    q: &GroupQuiesce,
    phase: QuiescePhase,
    reason: &str,
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

fn parse(text: &str, what: &str) -> Result<Duration, String> {
    stillpoint_proto::duration::parse_duration(text)
        .map_err(|e| format!("spec.{what} {text:?}: {e}"))
        .and_then(|d| match d.is_zero() {
            true => Err(format!("spec.{what} must be longer than zero")),
            false => Ok(d),
        })
}

pub async fn reconcile(q: Arc<GroupQuiesce>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let ns = q.namespace().unwrap_or_default();
    let name = q.name_any();
    let uid = q.uid().unwrap_or_default();
    let api: Api<GroupQuiesce> = Api::namespaced(ctx.client.clone(), &ns);
    let phase = q.status.as_ref().and_then(|s| s.phase).unwrap_or_default();

    if q.metadata.deletion_timestamp.is_some() {
        if !q.finalizers().iter().any(|f| f == QUIESCE_FINALIZER) {
            return Ok(Action::await_change());
        }
        let live = ctx.live.lock().unwrap().get(&uid).map(|l| {
            let _ = l
                .cancel
                .send(Some(format!("GroupQuiesce {name} was deleted")));
            l.done.clone()
        });
        if let Some(mut done) = live {
            let _ = done.wait_for(|d| *d).await;
        }
        set_finalizer(&api, &q, false).await?;
        return Ok(Action::await_change());
    }
    if phase.is_final() || ctx.live.lock().unwrap().contains_key(&uid) {
        return Ok(Action::await_change());
    }
    if phase == QuiescePhase::Frozen {
        let by = q
            .status
            .as_ref()
            .and_then(|s| s.run_by.clone())
            .unwrap_or_default();
        return end(
            &ctx,
            &q,
            QuiescePhase::Failed,
            "ControllerRestarted",
            format!(
                "the controller holding this quiesce ({by}) stopped; its members thawed when their lease ran out"
            ),
        )
        .await;
    }
    if !q.finalizers().iter().any(|f| f == QUIESCE_FINALIZER) {
        set_finalizer(&api, &q, true).await?;
        return Ok(Action::await_change());
    }
    let duration = match parse(&q.spec.duration, "duration") {
        Ok(d) if d <= MAX_DURATION => d,
        Ok(_) => {
            let m = format!("spec.duration {:?} is longer than 24h", q.spec.duration);
            return end(&ctx, &q, QuiescePhase::Failed, "InvalidSpec", m).await;
        }
        Err(m) => return end(&ctx, &q, QuiescePhase::Failed, "InvalidSpec", m).await,
    };
    let groups: Api<ConsistencyGroup> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(group) = groups.get_opt(&q.spec.group).await? else {
        let m = format!(
            "ConsistencyGroup {} does not exist in namespace {ns}",
            q.spec.group
        );
        return end(&ctx, &q, QuiescePhase::Failed, "GroupNotFound", m).await;
    };
    let ttl = match q.spec.ttl.as_deref().or(group.spec.lease_ttl.as_deref()) {
        Some(t) => match parse(t, "ttl") {
            Ok(d) => d,
            Err(m) => return end(&ctx, &q, QuiescePhase::Failed, "InvalidSpec", m).await,
        },
        None => DEFAULT_TTL,
    };
    let resolution = ctx.resolver.resolve(&group).await;
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
        return end(&ctx, &q, QuiescePhase::Failed, "MemberNotFound", m).await;
    }
    if let Some(m) = targets
        .iter()
        .find(|m| m.agent.is_none() || m.identity.is_none())
    {
        let message = format!(
            "pod {} has no reachable agent: {}",
            m.pod, resolution.resolved.message
        );
        return end(&ctx, &q, QuiescePhase::Failed, "NoAgent", message).await;
    }

    // Freeze every target in parallel; any refusal thaws the others.
    let (cancel, mut cancelled) = watch::channel(None::<String>);
    let (finished, done) = watch::channel(false);
    ctx.live.lock().unwrap().insert(
        uid.clone(),
        Live {
            group: (ns.clone(), format!("quiesce:{}", q.spec.group)),
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
    let holders = match freeze_all(tls, &agents, |m| format!("pod {}", m.pod), &id, ttl).await {
        Ok(holders) => holders,
        Err(errors) => {
            ctx.live.lock().unwrap().remove(&uid);
            let _ = finished.send(true);
            let m = format!(
                "the freeze was refused; nothing is left frozen: {}",
                errors.join("; ")
            );
            return end(&ctx, &q, QuiescePhase::Failed, "FreezeFailed", m).await;
        }
    };
    let until = k8s_openapi::jiff::Timestamp::now()
        .checked_add(k8s_openapi::jiff::SignedDuration::try_from(duration).unwrap_or_default())
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now());
    let mut status = GroupQuiesceStatus {
        observed_generation: q.metadata.generation,
        phase: Some(QuiescePhase::Frozen),
        run_by: Some(ctx.settings.identity.clone()),
        frozen_at: Some(now()),
        until: Some(MicroTime(until)),
        members: holders
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
        holders.len(),
        q.spec.group
    );
    set_condition(
        &mut status.conditions,
        "Frozen",
        true,
        "Held",
        &message,
        q.metadata.generation,
    );
    if let Err(e) = apply_status(&api, &name, &status).await {
        for (_, h) in holders {
            let _ = h.thaw(false).await;
        }
        ctx.live.lock().unwrap().remove(&uid);
        let _ = finished.send(true);
        return Err(e.into());
    }
    ctx.event(&*q, false, "Frozen", message).await;

    // Hold until the end, a cancel (deletion, shutdown) or a lost hold.
    let mut q_obj = (*q).clone();
    q_obj.status = Some(status);
    tokio::spawn(async move {
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
            _ = tokio::time::sleep(duration) => ("Expired", format!("held for {duration:?}; thawed"), false),
            why = cancelled.wait_for(|c| c.is_some()) => {
                let why = why.map(|w| w.clone().unwrap_or_default()).unwrap_or_default();
                ("Thawed", format!("{why}; thawed"), false)
            }
            why = lost => ("HoldLost", why, true),
        };
        let mut problems = Vec::new();
        for (m, h) in holders {
            if let Err(e) = h.thaw(false).await {
                problems.push(format!("pod {}: {e}", m.pod));
            }
        }
        let (phase, reason, message) = match (failed, problems.is_empty()) {
            (false, true) => (QuiescePhase::Thawed, reason, message),
            _ => (
                QuiescePhase::Failed,
                if failed { reason } else { "ThawFailed" },
                format!("{message} {}", problems.join("; "))
                    .trim()
                    .to_string(),
            ),
        };
        if let Err(e) = end(&ctx, &q_obj, phase, reason, message).await {
            tracing::warn!("writing the end of GroupQuiesce {}: {e}", q_obj.name_any());
        }
        ctx.live
            .lock()
            .unwrap()
            .remove(&q_obj.uid().unwrap_or_default());
        let _ = finished.send(true);
    });
    Ok(Action::await_change())
}
