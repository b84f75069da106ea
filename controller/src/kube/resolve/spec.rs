//! The group's spec, checked alone: its budgets and its members' names,
//! selectors and primaries.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{
    DEFAULT_ALIGN_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_FREEZE_BUDGET, DEFAULT_LEASE_TTL,
    Verdict,
};
use crate::core::agents::{DEFAULT_RPC_TIMEOUT, MAX_CONNECT_TIMEOUT, MAX_RPC_TIMEOUT, within};
use crate::core::error::ErrorKind;
use crate::kube::crd::ConsistencyGroupSpec;
use crate::kube::reason::Reason;

/// A group's budgets and timeouts, its spec's or the defaults.
#[derive(Debug, Clone, Copy)]
pub(super) struct Budgets {
    pub(super) freeze_budget: Duration,
    pub(super) lease_ttl: Duration,
    pub(super) align_timeout: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) rpc_timeout: Duration,
}

/// The spec's budgets, and its members as the spec can mean them.
pub(super) fn check(spec: &ConsistencyGroupSpec) -> Result<Budgets, Verdict> {
    let budgets = budgets(spec)?;
    members(spec)?;
    Ok(budgets)
}

/// A group's freeze budget, if its spec reads.
pub(crate) fn freeze_budget(spec: &ConsistencyGroupSpec) -> Option<Duration> {
    budgets(spec).ok().map(|b| b.freeze_budget)
}

fn budgets(spec: &ConsistencyGroupSpec) -> Result<Budgets, Verdict> {
    let budget = |text: &Option<String>, default: Duration| match text {
        None => Ok(default),
        Some(t) => stillpoint_proto::duration::parse_duration(t)
            .map_err(|e| Verdict::no(Reason::InvalidSpec, e)),
    };
    let bounded = |name: &str, value: Duration, max: Duration| {
        within(name, value, max).map_err(|e| Verdict::no(Reason::InvalidSpec, e))
    };
    Ok(Budgets {
        freeze_budget: budget(&spec.freeze_budget, DEFAULT_FREEZE_BUDGET)?,
        lease_ttl: budget(&spec.lease_ttl, DEFAULT_LEASE_TTL)?,
        align_timeout: budget(&spec.align_timeout, DEFAULT_ALIGN_TIMEOUT)?,
        connect_timeout: bounded(
            "connectTimeout",
            budget(&spec.connect_timeout, DEFAULT_CONNECT_TIMEOUT)?,
            MAX_CONNECT_TIMEOUT,
        )?,
        rpc_timeout: bounded(
            "rpcTimeout",
            budget(&spec.rpc_timeout, DEFAULT_RPC_TIMEOUT)?,
            MAX_RPC_TIMEOUT,
        )?,
    })
}

/// Members: some, each named once, found by a selector or a StatefulSet's
/// pod (one of them), their primaries members too.
fn members(spec: &ConsistencyGroupSpec) -> Result<(), Verdict> {
    if spec.members.is_empty() {
        return Err(Verdict::no(Reason::InvalidSpec, "the group has no members"));
    }
    let mut names = BTreeSet::new();
    for t in &spec.members {
        if !names.insert(t.name.as_str()) {
            return Err(Verdict::no(
                Reason::InvalidSpec,
                format!("two members are named {}", t.name),
            ));
        }
        if t.selector.is_none() == t.stateful_set.is_none() {
            return Err(Verdict::no(
                Reason::InvalidSpec,
                format!("member {}: give either `selector` or `statefulSet`", t.name),
            ));
        }
        if let Some(p) = &t.primary
            && !spec.members.iter().any(|m| &m.name == p)
        {
            return Err(Verdict::no(
                Reason::Run(ErrorKind::ReplicaWithoutPrimary),
                format!(
                    "member {}: its primary {p} is not a member of the group",
                    t.name
                ),
            ));
        }
    }
    Ok(())
}
