//! Step 5, stages: the workloads started step by step, each Ready before the
//! next.

use std::collections::BTreeSet;
use std::time::Duration;

use kube::ResourceExt;

use super::plan::{Planned, replicas_up_to};
use super::run::Run;
use super::workloads::{is_ready, not_ready_because};
use super::{Stop, stop};
use crate::core::plan::stage_class;
use crate::kube::controller::now;
use crate::kube::crd::WorkloadRef;

impl Run {
    /// 5 and 6. The stages, in order.
    pub(super) async fn stages(
        &mut self,
        planned: &[Planned],
        bound: Duration,
    ) -> Result<(), Stop> {
        let steps: BTreeSet<(u32, bool)> = planned.iter().map(Planned::step).collect();
        let targets: BTreeSet<WorkloadRef> =
            planned.iter().filter_map(|p| p.target.clone()).collect();
        let mut previous: Option<(u32, bool)> = None;
        for step in steps {
            let (stage, _) = step;
            // A workload of a later step found started breaks the order.
            for t in &targets {
                let allowed = replicas_up_to(planned, t, previous);
                if let Some(info) = self.w.get(t).await?
                    && info.replicas > allowed
                {
                    crate::metrics::metrics().restore_order_violations.inc();
                    return Err(stop(
                        "OrderViolation",
                        format!(
                            "{t} runs {} pods before its stage: at most {allowed} may run before stage {stage} starts \
                             (was it scaled by hand?)",
                            info.replicas
                        ),
                    ));
                }
            }
            self.status.stage = Some(stage);
            let s = self.stage(stage);
            if s.phase == "Waiting" {
                s.phase = "Starting".into();
                s.started_at = Some(now());
            }
            let members: Vec<&Planned> = planned.iter().filter(|p| p.step() == step).collect();
            for p in &members {
                self.member(&p.rec.pod).phase = "Starting".into();
            }
            self.save().await?;
            for t in &targets {
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
                .event(&self.restore, false, "StageStarting", note)
                .await;
            // Every member pod of the step Ready.
            let w = self.w.clone();
            let wanted: Vec<(String, Option<String>, Option<WorkloadRef>, i32)> = members
                .iter()
                .map(|p| {
                    let t = p.target.clone();
                    let n = t
                        .as_ref()
                        .map(|t| replicas_up_to(planned, t, Some(step)))
                        .unwrap_or(0);
                    (p.rec.pod.clone(), p.restored_pod.clone(), t, n)
                })
                .collect();
            let why = self
                .wait(bound, || {
                    let (w, wanted) = (w.clone(), wanted.clone());
                    async move {
                        let mut why = Vec::new();
                        for (pod, restored, t, n) in &wanted {
                            let Some(t) = t else { continue };
                            match restored {
                                Some(name) => match w.pods.get_opt(name).await? {
                                    None => why.push(format!(
                                        "pod {name} ({pod} restored) has not been created"
                                    )),
                                    Some(p) if !is_ready(&p) => why.push(format!(
                                        "pod {name} ({pod} restored) is not Ready: {}",
                                        not_ready_because(&p)
                                    )),
                                    Some(_) => {}
                                },
                                None => {
                                    let Some(info) = w.get(t).await? else {
                                        why.push(format!("{t} is gone"));
                                        continue;
                                    };
                                    let pods = w.pods(t, &info).await?;
                                    let ready = pods.iter().filter(|p| is_ready(p)).count() as i32;
                                    if ready < *n {
                                        let detail = pods
                                            .iter()
                                            .filter(|p| !is_ready(p))
                                            .map(|p| {
                                                format!(
                                                    "{}: {}",
                                                    p.name_any(),
                                                    not_ready_because(p)
                                                )
                                            })
                                            .collect::<Vec<_>>()
                                            .join("; ");
                                        why.push(
                                            format!("{t} has {ready} of {n} pods Ready {detail}")
                                                .trim()
                                                .to_string(),
                                        );
                                    }
                                }
                            }
                        }
                        Ok((!why.is_empty()).then(|| why.join("; ")))
                    }
                })
                .await?;
            if let Some(why) = why {
                for p in &members {
                    let m = self.member(&p.rec.pod);
                    m.phase = "Failed".into();
                }
                let later: Vec<String> = self
                    .status
                    .stages
                    .iter()
                    .filter(|s| s.stage > stage)
                    .map(|s| format!("{} ({})", s.stage, s.class))
                    .collect();
                crate::metrics::metrics().restore_order_violations.inc();
                let held = match later.is_empty() {
                    true => String::new(),
                    false => format!("; later stages {} were not started", later.join(", ")),
                };
                return Err(stop(
                    "StageNotReady",
                    format!(
                        "stage {stage} ({}) is not Ready after {bound:?}: {why}{held}",
                        stage_class(stage)
                    ),
                ));
            }
            for p in &members {
                let m = self.member(&p.rec.pod);
                m.phase = "Ready".into();
            }
            self.save().await?;
            self.check_positions(planned, &members).await?;
            previous = Some(step);
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
                    .event(&self.restore, false, "StageReady", note)
                    .await;
            }
        }
        Ok(())
    }
}
