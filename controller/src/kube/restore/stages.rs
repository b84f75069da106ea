//! Step 5, stages: the workloads started step by step, each Ready before the
//! next.
//!
//! A step is a stage's primaries, then its replicas. Each step: the order
//! still holds (no workload runs more pods than the steps before allow),
//! the step's pods are started, they become Ready within the bound (or the
//! restore fails and holds every later stage), and their positions are
//! checked (step 6).

use std::collections::BTreeSet;
use std::time::Duration;

use kube::ResourceExt;

use super::plan::{Planned, replicas_up_to};
use super::run::Run;
use super::workloads::{Workloads, is_ready, not_ready_because};
use super::{Stop, stop};
use crate::core::plan::stage_class;
use crate::kube::controller::now;
use crate::kube::crd::WorkloadRef;
use crate::kube::reason::Reason;

/// A step of the plan: its stage, and whether it is the stage's replicas.
type Step = (u32, bool);

/// A member pod a step waits for: the backup's pod, the pod that runs it
/// again (a StatefulSet's), its workload and how many pods that runs.
#[derive(Clone)]
struct Wanted {
    pod: String,
    restored: Option<String>,
    target: WorkloadRef,
    replicas: i32,
}

fn targets(planned: &[Planned]) -> BTreeSet<WorkloadRef> {
    planned.iter().filter_map(|p| p.target.clone()).collect()
}

impl Run {
    /// 5 and 6. The stages, in order.
    pub(super) async fn stages(
        &mut self,
        planned: &[Planned],
        bound: Duration,
    ) -> Result<(), Stop> {
        let steps: BTreeSet<Step> = planned.iter().map(Planned::step).collect();
        let mut previous: Option<Step> = None;
        for step in steps {
            let members: Vec<&Planned> = planned.iter().filter(|p| p.step() == step).collect();
            self.order_holds(planned, step.0, previous).await?;
            self.start_step(planned, step, previous, &members).await?;
            if let Some(why) = self.wait_ready(planned, step, &members, bound).await? {
                return Err(self.step_failed(step.0, &members, bound, why));
            }
            self.step_ready(planned, step, &members).await?;
            previous = Some(step);
        }
        Ok(())
    }

    /// A workload of a later step found started breaks the order.
    async fn order_holds(
        &self,
        planned: &[Planned],
        stage: u32,
        previous: Option<Step>,
    ) -> Result<(), Stop> {
        for t in &targets(planned) {
            let allowed = replicas_up_to(planned, t, previous);
            if let Some(info) = self.w.get(t).await?
                && info.replicas > allowed
            {
                crate::metrics::metrics().order_violation(Some(&self.ns), &self.name);
                return Err(stop(
                    Reason::OrderViolation,
                    format!(
                        "{t} runs {} pods before its stage: at most {allowed} may run before stage {stage} starts \
                         (was it scaled by hand?)",
                        info.replicas
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The step's members recorded as starting, and their workloads scaled
    /// up to them.
    async fn start_step(
        &mut self,
        planned: &[Planned],
        step: Step,
        previous: Option<Step>,
        members: &[&Planned],
    ) -> Result<(), Stop> {
        let (stage, _) = step;
        self.status.stage = Some(stage);
        let s = self.stage(stage);
        if s.phase == "Waiting" {
            s.phase = "Starting".into();
            s.started_at = Some(now());
        }
        for p in members {
            self.member(&p.rec.pod).phase = "Starting".into();
        }
        self.save().await?;
        for t in &targets(planned) {
            let want = replicas_up_to(planned, t, Some(step));
            if want > replicas_up_to(planned, t, previous) {
                self.w.scale(t, want).await?;
            }
        }
        let note = format!(
            "stage {stage} ({}): starting {}",
            stage_class(stage),
            members
                .iter()
                .map(|p| p.restored_pod.clone().unwrap_or_else(|| p.rec.pod.clone()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.ctx
            .event(&self.restore, false, Reason::StageStarting, note)
            .await;
        Ok(())
    }

    /// Waits within `bound` for every member pod of the step to be Ready;
    /// returns why not, if they are not.
    async fn wait_ready(
        &self,
        planned: &[Planned],
        step: Step,
        members: &[&Planned],
        bound: Duration,
    ) -> Result<Option<String>, Stop> {
        let wanted: Vec<Wanted> = members
            .iter()
            .filter_map(|p| {
                let target = p.target.clone()?;
                Some(Wanted {
                    pod: p.rec.pod.clone(),
                    restored: p.restored_pod.clone(),
                    replicas: replicas_up_to(planned, &target, Some(step)),
                    target,
                })
            })
            .collect();
        let w = self.w.clone();
        self.wait(bound, || {
            let (w, wanted) = (w.clone(), wanted.clone());
            async move {
                let mut why = Vec::new();
                for m in &wanted {
                    why.extend(not_ready(&w, m).await?);
                }
                Ok((!why.is_empty()).then(|| why.join("; ")))
            }
        })
        .await
    }

    /// The step's members failed, every later stage held: the restore's
    /// end.
    fn step_failed(
        &mut self,
        stage: u32,
        members: &[&Planned],
        bound: Duration,
        why: String,
    ) -> Stop {
        for p in members {
            self.member(&p.rec.pod).phase = "Failed".into();
        }
        let later: Vec<String> = self
            .status
            .stages
            .iter()
            .filter(|s| s.stage > stage)
            .map(|s| format!("{} ({})", s.stage, s.class))
            .collect();
        crate::metrics::metrics().order_violation(Some(&self.ns), &self.name);
        let held = match later.is_empty() {
            true => String::new(),
            false => format!("; later stages {} were not started", later.join(", ")),
        };
        stop(
            Reason::StageNotReady,
            format!(
                "stage {stage} ({}) is not Ready after {bound:?}: {why}{held}",
                stage_class(stage)
            ),
        )
    }

    /// The step's members Ready and their positions checked; the stage
    /// Ready with its last step.
    async fn step_ready(
        &mut self,
        planned: &[Planned],
        step: Step,
        members: &[&Planned],
    ) -> Result<(), Stop> {
        let (stage, _) = step;
        for p in members {
            self.member(&p.rec.pod).phase = "Ready".into();
        }
        self.save().await?;
        self.check_positions(planned, members).await?;
        let last_of_stage = !planned
            .iter()
            .any(|p| p.rec.restore_stage == stage && p.step() > step);
        if last_of_stage {
            let s = self.stage(stage);
            s.phase = "Ready".into();
            s.ready_at = Some(now());
            self.save().await?;
            let note = format!("stage {stage} ({}) is Ready", stage_class(stage));
            self.ctx
                .event(&self.restore, false, Reason::StageReady, note)
                .await;
        }
        Ok(())
    }
}

/// Why member `m` of a step is not Ready yet (none if it is).
async fn not_ready(w: &Workloads, m: &Wanted) -> Result<Option<String>, Stop> {
    let (pod, t, n) = (&m.pod, &m.target, m.replicas);
    if let Some(name) = &m.restored {
        return Ok(match w.pods.get_opt(name).await? {
            None => Some(format!("pod {name} ({pod} restored) has not been created")),
            Some(p) if !is_ready(&p) => Some(format!(
                "pod {name} ({pod} restored) is not Ready: {}",
                not_ready_because(&p)
            )),
            Some(_) => None,
        });
    }
    let Some(info) = w.get(t).await? else {
        return Ok(Some(format!("{t} is gone")));
    };
    let pods = w.pods(t, &info).await?;
    let ready = pods.iter().filter(|p| is_ready(p)).count() as i32;
    if ready >= n {
        return Ok(None);
    }
    let detail = pods
        .iter()
        .filter(|p| !is_ready(p))
        .map(|p| format!("{}: {}", p.name_any(), not_ready_because(p)))
        .collect::<Vec<_>>()
        .join("; ");
    Ok(Some(
        format!("{t} has {ready} of {n} pods Ready {detail}")
            .trim()
            .to_string(),
    ))
}
