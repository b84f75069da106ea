//! The CLI in Kubernetes mode (`--kube`, or when there is no local config
//! file but a kubeconfig or an in-cluster ServiceAccount): `backup
//! create|list|describe|delete|export|import`, `status [GROUP]` and `plan ID` on
//! GroupBackups and ConsistencyGroups, with the output formats of local
//! mode.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use serde::Serialize;

use super::backup::{BackupCommand, DescribeArgs, ExportArgs, IdArgs, ImportArgs, members_table};
use super::output::table;
use super::{Command, Global};
use crate::core::protocol::new_backup_id;
use crate::kube::crd::{BackupPhase, ConsistencyGroup, GroupBackup, GroupBackupSpec, GroupQuiesce};
use crate::kube::crd::{GroupBackupContent, GroupRestore, GroupRestoreSpec, RestorePhase};
use crate::kube::transfer;
use k8s_openapi::api::core::v1::Secret;

/// Whether this invocation is in Kubernetes mode.
pub fn wanted(global: &Global) -> bool {
    if global.kube {
        return true;
    }
    if global.config.exists() {
        return false;
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    std::env::var_os("KUBECONFIG").is_some()
        || home.is_some_and(|h| h.join(".kube/config").exists())
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

/// Runs a command in Kubernetes mode.
pub fn dispatch(command: Command, global: &Global) -> anyhow::Result<()> {
    let runtime = super::runtime()?;
    runtime.block_on(async {
        let client = super::controller::kube_client_in(
            global.kubeconfig.as_deref(),
            global.context.as_deref(),
        )
        .await?;
        let ns = global
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let k = Kube { client, ns };
        match command {
            Command::Backup(command) => k.backup(command, global).await,
            Command::Status(args) => k.status(args.group.as_deref(), global).await,
            Command::Plan(args) => k.plan(&args.id, global).await,
            Command::Quiesce(args) => k.quiesce(args).await,
            Command::Thaw(args) => k.thaw(&args.target).await,
            Command::Restore(args) => k.restore(args, global).await,
            _ => bail!(
                "this command works in local mode only (a local config file, `--config`); in \
                 Kubernetes mode use `backup`, `status`, `plan`, `quiesce`, `thaw` and `restore`"
            ),
        }
    })
}

struct Kube {
    client: kube::Client,
    ns: String,
}

/// How long a quiesce without `--for` holds (Ctrl-C ends it sooner).
const QUIESCE_DEFAULT: Duration = Duration::from_secs(3600);

impl Kube {
    /// The group and (for a member) the member a target names: a group's
    /// name, a member name of a group, or a pod of one.
    async fn target(&self, target: &str) -> anyhow::Result<(String, Option<String>)> {
        let groups: Api<ConsistencyGroup> = Api::namespaced(self.client.clone(), &self.ns);
        let list = groups.list(&Default::default()).await?.items;
        if list.iter().any(|g| g.name_any() == target) {
            return Ok((target.to_string(), None));
        }
        let found: Vec<String> = list
            .iter()
            .filter(|g| {
                g.spec.members.iter().any(|m| m.name == target)
                    || g.status
                        .iter()
                        .flat_map(|s| s.members.iter())
                        .any(|m| m.pod == target)
            })
            .map(|g| g.name_any())
            .collect();
        match found.as_slice() {
            [one] => Ok((one.clone(), Some(target.to_string()))),
            [] => bail!(
                "no ConsistencyGroup in namespace {} is named {target} or has a member or pod of that name",
                self.ns
            ),
            many => bail!(
                "{target} is a member of several groups ({}); quiesce the group instead",
                many.join(", ")
            ),
        }
    }

    /// `quiesce TARGET [--for D] [--ttl T]`: creates a GroupQuiesce,
    /// prints the frozen members and positions, and follows it to its end;
    /// Ctrl-C deletes it (which thaws).
    async fn quiesce(&self, args: super::quiesce::QuiesceArgs) -> anyhow::Result<()> {
        use crate::kube::crd::{GroupQuiesceSpec, QuiescePhase};
        let (group, member) = self.target(&args.target).await?;
        let duration = args.duration.unwrap_or(QUIESCE_DEFAULT);
        let secs = |d: Duration| format!("{}ms", d.as_millis());
        let name = format!("quiesce-{}", new_backup_id(&args.target));
        let q = GroupQuiesce::new(
            &name,
            GroupQuiesceSpec {
                group,
                member,
                duration: secs(duration),
                ttl: Some(secs(args.ttl)),
            },
        );
        let api: Api<GroupQuiesce> = Api::namespaced(self.client.clone(), &self.ns);
        api.create(&PostParams::default(), &q)
            .await
            .with_context(|| format!("creating GroupQuiesce {name}"))?;
        let follow = async {
            let mut printed = false;
            loop {
                let q = api.get(&name).await?;
                let status = q.status.clone().unwrap_or_default();
                match status.phase.unwrap_or_default() {
                    QuiescePhase::Frozen if !printed => {
                        for m in &status.members {
                            println!(
                                "frozen {} at {}",
                                m.pod,
                                m.position.as_deref().unwrap_or("-")
                            );
                        }
                        println!(
                            "GroupQuiesce {name} holds for {duration:?} (Ctrl-C, or `stillpoint thaw {}`, thaws now)",
                            args.target
                        );
                        printed = true;
                    }
                    QuiescePhase::Thawed => {
                        println!("thawed: {}", condition_message(&status));
                        return Ok(());
                    }
                    QuiescePhase::Failed => {
                        bail!(
                            "{}",
                            status
                                .error
                                .clone()
                                .unwrap_or_else(|| condition_message(&status))
                        )
                    }
                    _ => {}
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        };
        tokio::select! {
            result = follow => result,
            _ = tokio::signal::ctrl_c() => {
                api.delete(&name, &DeleteParams::default()).await?;
                self.gone(&api, &name).await?;
                println!("interrupted: GroupQuiesce {name} deleted, its members thawed");
                Ok(())
            }
        }
    }

    /// Waits (bounded) until a GroupQuiesce is gone: its finalizer goes
    /// only once its members thawed.
    async fn gone(&self, api: &Api<GroupQuiesce>, name: &str) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while api.get_opt(name).await?.is_some() {
            if tokio::time::Instant::now() > deadline {
                bail!("GroupQuiesce {name} is still there after 60 s: is the controller running?");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// `thaw TARGET`: deletes every GroupQuiesce of that group or member
    /// and waits until each thawed.
    async fn thaw(&self, target: &str) -> anyhow::Result<()> {
        let api: Api<GroupQuiesce> = Api::namespaced(self.client.clone(), &self.ns);
        let matching: Vec<String> = api
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter(|q| q.metadata.deletion_timestamp.is_none())
            .filter(|q| q.spec.group == target || q.spec.member.as_deref() == Some(target))
            .map(|q| q.name_any())
            .collect();
        if matching.is_empty() {
            println!("no GroupQuiesce holds {target} in namespace {}", self.ns);
            return Ok(());
        }
        for name in &matching {
            api.delete(name, &DeleteParams::default()).await?;
        }
        for name in &matching {
            self.gone(&api, name).await?;
            println!("thawed: GroupQuiesce {name} deleted");
        }
        Ok(())
    }
}

impl Kube {
    /// `restore BACKUP`: creates a GroupRestore, prints each stage as it
    /// changes and follows it to its end (exit code = outcome). Ctrl-C
    /// stops following; the restore goes on.
    async fn restore(
        &self,
        args: super::restore::RestoreArgs,
        global: &Global,
    ) -> anyhow::Result<()> {
        if args.to.is_some() || args.start {
            bail!(
                "--to and --start are local mode's; in Kubernetes mode the restore makes PVCs and scales workloads"
            );
        }
        if self.get_backup(&args.id).await.is_err() {
            bail!("no GroupBackup {} in namespace {}", args.id, self.ns);
        }
        let name = args
            .name
            .clone()
            .unwrap_or_else(|| new_backup_id(&format!("{}-restore", args.id)));
        let r = GroupRestore::new(
            &name,
            GroupRestoreSpec {
                backup: Some(args.id.clone()),
                content: None,
                pvc_prefix: args.prefix.clone(),
                in_place: args.in_place,
                volumes_only: args.volumes_only,
                stage_timeout: args.stage_timeout.clone(),
            },
        );
        let api: Api<GroupRestore> = Api::namespaced(self.client.clone(), &self.ns);
        api.create(&PostParams::default(), &r)
            .await
            .with_context(|| format!("creating GroupRestore {name}"))?;
        eprintln!("GroupRestore {name} of GroupBackup {} created", args.id);
        let r = tokio::select! {
            r = follow_restore(&api, &name) => r?,
            _ = tokio::signal::ctrl_c() => {
                println!("stopped following; GroupRestore {name} goes on (kubectl get grouprestore {name} -n {})", self.ns);
                return Ok(());
            }
        };
        restore_outcome(&r, global)
    }
}

/// Follows GroupRestore `name` until it ends, printing each stage's
/// progress once.
async fn follow_restore(api: &Api<GroupRestore>, name: &str) -> anyhow::Result<GroupRestore> {
    let mut shown: Vec<String> = Vec::new();
    loop {
        let r = api.get(name).await?;
        let s = r.status.clone().unwrap_or_default();
        let lines: Vec<String> = s
            .stages
            .iter()
            .map(|st| {
                format!(
                    "stage {} ({}): {} [{}]",
                    st.stage,
                    st.class,
                    st.phase,
                    st.members.join(", ")
                )
            })
            .collect();
        for line in &lines {
            if !shown.contains(line) {
                eprintln!("{line}");
            }
        }
        shown = lines;
        if s.phase.unwrap_or_default().is_final() {
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// An ended restore, printed with its members; an error if it failed.
fn restore_outcome(r: &GroupRestore, global: &Global) -> anyhow::Result<()> {
    let name = r.name_any();
    let s = r.status.clone().unwrap_or_default();
    let rows: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            vec![
                m.stage.to_string(),
                m.pod.clone(),
                m.restored_pod.clone().unwrap_or_else(|| "-".into()),
                m.phase.clone(),
                m.pvcs.join(","),
                m.check.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let members = table(
        &["STAGE", "POD", "RESTORED AS", "PHASE", "PVCS", "CHECK"],
        &rows,
    );
    if s.phase.unwrap_or_default() == RestorePhase::Succeeded {
        global
            .output
            .print(r, || format!("GroupRestore {name} succeeded\n\n{members}"));
        return Ok(());
    }
    if global.output != super::output::Output::Table {
        global.output.print(r, String::new);
    } else {
        eprintln!("{members}");
    }
    let reason = condition(&s.conditions, "Completed")
        .map(|c| c.1)
        .unwrap_or_default();
    bail!(
        "GroupRestore {name} failed ({reason}): {}",
        s.error.unwrap_or_default()
    )
}

/// One group's status: its conditions, last backup and members.
fn group_status(ns: &str, g: &ConsistencyGroup) -> String {
    let s = g.status.clone().unwrap_or_default();
    let mut out = format!("ConsistencyGroup {ns}/{}\n", g.name_any());
    for c in &s.conditions {
        out.push_str(&format!(
            "  {}={} {}: {}\n",
            c.type_, c.status, c.reason, c.message
        ));
    }
    if let Some(b) = &s.last_successful_backup {
        out.push_str(&format!("  last successful backup: {b}\n"));
    }
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.pod.clone(),
                dash(&m.ip),
                dash(&m.engine),
                dash(&m.role),
                dash(&m.primary),
                dash(&m.position),
                m.pvcs.join(","),
                dash(&m.driver),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &[
            "MEMBER", "POD", "IP", "ENGINE", "ROLE", "PRIMARY", "POSITION", "PVCS", "DRIVER",
        ],
        &rows,
    ));
    out
}

/// The namespace's groups, one line each.
fn groups_table(rows: &[GroupRow]) -> String {
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.protectable.clone(),
                r.reason.clone(),
                r.members.to_string(),
                r.last_successful_backup
                    .clone()
                    .unwrap_or_else(|| "-".into()),
                r.message.chars().take(100).collect(),
            ]
        })
        .collect();
    table(
        &[
            "GROUP",
            "PROTECTABLE",
            "REASON",
            "MEMBERS",
            "LAST BACKUP",
            "MESSAGE",
        ],
        &lines,
    )
}

fn condition_message(s: &crate::kube::crd::GroupQuiesceStatus) -> String {
    s.conditions
        .iter()
        .find(|c| c.type_ == "Frozen")
        .map(|c| format!("{}: {}", c.reason, c.message))
        .unwrap_or_default()
}

pub use crate::kube::store::manifest_of;

fn phase(b: &GroupBackup) -> BackupPhase {
    b.status.as_ref().and_then(|s| s.phase).unwrap_or_default()
}

fn window(b: &GroupBackup) -> String {
    b.status
        .as_ref()
        .and_then(|s| s.freeze_window.clone())
        .unwrap_or_else(|| "-".into())
}

/// The reason and message of a condition.
fn condition(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(String, String, String)> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[derive(Debug, Serialize)]
struct GroupRow {
    name: String,
    protectable: String,
    reason: String,
    message: String,
    members: u32,
    last_successful_backup: Option<String>,
}

impl Kube {
    fn backups(&self) -> Api<GroupBackup> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn groups(&self) -> Api<ConsistencyGroup> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn get_backup(&self, name: &str) -> anyhow::Result<GroupBackup> {
        self.backups()
            .get_opt(name)
            .await?
            .with_context(|| format!("no GroupBackup {name} in namespace {}", self.ns))
    }

    async fn backup(&self, command: BackupCommand, global: &Global) -> anyhow::Result<()> {
        match command {
            BackupCommand::Create(args) => self.create(&args.group, args.id, global).await,
            BackupCommand::List => self.list_backups(global).await,
            BackupCommand::Describe(args) => self.describe_backup(args, global).await,
            BackupCommand::Delete(args) => self.delete_backup(args).await,
            BackupCommand::Export(args) => self.export(args).await,
            BackupCommand::Import(args) => self.import(args).await,
        }
    }

    /// `backup export`: the content of a GroupBackup (or a content) as one
    /// YAML document.
    async fn export(&self, args: ExportArgs) -> anyhow::Result<()> {
        let name = match args.content {
            true => args.name.clone(),
            false => {
                let b = self.get_backup(&args.name).await?;
                b.status.and_then(|s| s.content).with_context(|| {
                    format!(
                        "GroupBackup {} has no GroupBackupContent: only a backup that succeeded has one",
                        args.name
                    )
                })?
            }
        };
        let contents: Api<GroupBackupContent> = Api::all(self.client.clone());
        let content = contents
            .get_opt(&name)
            .await?
            .with_context(|| format!("no GroupBackupContent {name}"))?;
        let kept = match &content.spec.kept_secret {
            Some(at) => Api::<Secret>::namespaced(self.client.clone(), &at.namespace)
                .get_opt(&at.name)
                .await?
                .with_context(|| {
                    format!(
                        "Secret {}/{}, the content's kept Secret, is gone",
                        at.namespace, at.name
                    )
                })?
                .data
                .unwrap_or_default(),
            None => Default::default(),
        };
        let document = transfer::export(&content, &kept, args.include_secrets);
        let yaml = serde_yaml::to_string(&document)?;
        match &args.file {
            Some(path) => {
                std::fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))?
            }
            None => print!("{yaml}"),
        }
        Ok(())
    }

    /// `backup import`: an export's content created here.
    async fn import(&self, args: ImportArgs) -> anyhow::Result<()> {
        let text = match args.file.as_os_str() == "-" {
            true => std::io::read_to_string(std::io::stdin())?,
            false => std::fs::read_to_string(&args.file)
                .with_context(|| format!("reading {}", args.file.display()))?,
        };
        let document: serde_json::Value = serde_yaml::from_str(&text)
            .with_context(|| format!("{} is not YAML", args.file.display()))?;
        let name = transfer::import(&self.client, &document, &args.controller_namespace).await?;
        println!(
            "GroupBackupContent {name} imported; restore it with a GroupRestore of spec.content: {name}"
        );
        Ok(())
    }

    /// `backup list`: the namespace's GroupBackups, oldest first.
    async fn list_backups(&self, global: &Global) -> anyhow::Result<()> {
        let mut list = self.backups().list(&Default::default()).await?.items;
        list.sort_by_key(|b| b.metadata.creation_timestamp.clone().map(|t| t.0));
        global.output.print(&list, || {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|b| {
                    vec![
                        b.name_any(),
                        b.spec.group.clone(),
                        phase(b).as_str().into(),
                        window(b),
                        b.metadata
                            .creation_timestamp
                            .as_ref()
                            .map(|t| t.0.to_string())
                            .unwrap_or_default(),
                        b.status
                            .as_ref()
                            .and_then(|s| s.error.clone())
                            .unwrap_or_default()
                            .chars()
                            .take(80)
                            .collect(),
                    ]
                })
                .collect();
            table(
                &["NAME", "GROUP", "PHASE", "WINDOW", "CREATED", "ERROR"],
                &rows,
            )
        });
        Ok(())
    }

    /// `backup describe`: a GroupBackup, its members and snapshots (and its
    /// timeline).
    async fn describe_backup(&self, args: DescribeArgs, global: &Global) -> anyhow::Result<()> {
        let b = self.get_backup(&args.id).await?;
        let m = manifest_of(&b);
        global.output.print(&b, || {
            let s = b.status.clone().unwrap_or_default();
            let mut out = format!(
                "GroupBackup {}/{}\n  group:         {}\n  phase:         {}\n  snapshotter:   {}\n  freeze window: {}\n  run by:        {}\n",
                self.ns,
                b.name_any(),
                b.spec.group,
                phase(&b).as_str(),
                s.snapshotter.clone().unwrap_or_else(|| "-".into()),
                window(&b),
                s.run_by.clone().unwrap_or_else(|| "-".into()),
            );
            if let Some(v) = &s.volume_group_snapshot {
                out.push_str(&format!("  group snapshot: {v}\n"));
            }
            if let Some(e) = &s.error {
                out.push_str(&format!("  error:         {e}\n"));
            }
            for c in &s.conditions {
                out.push_str(&format!("  condition:     {}={} {}: {}\n", c.type_, c.status, c.reason, c.message));
            }
            out.push('\n');
            out.push_str(&members_table(&m));
            let rows: Vec<Vec<String>> = s
                .members
                .iter()
                .flat_map(|m| m.volume_snapshots.iter().map(move |v| vec![m.pod.clone(), v.pvc.clone(), v.name.clone()]))
                .collect();
            if !rows.is_empty() {
                out.push('\n');
                out.push_str(&table(&["POD", "PVC", "VOLUMESNAPSHOT"], &rows));
            }
            if args.timeline {
                out.push('\n');
                out.push_str(&m.timeline.gantt(60));
            }
            out
        });
        Ok(())
    }

    /// `backup delete`: deleted, and waited for until its finalizer (and,
    /// with `deletionPolicy: Delete`, the snapshot controller) is done.
    async fn delete_backup(&self, args: IdArgs) -> anyhow::Result<()> {
        let b = self.get_backup(&args.id).await?;
        self.backups()
            .delete(&args.id, &DeleteParams::default())
            .await?;
        // The finalizer deletes its snapshots first (per deletionPolicy).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while self.backups().get_opt(&args.id).await?.is_some() {
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "GroupBackup {} is still being deleted after 120 s: is the controller running? \
                     (its finalizer deletes the snapshots)",
                    args.id
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if b.spec.deletion_policy == crate::kube::crd::DeletionPolicy::Retain {
            println!("deleted GroupBackup {} (keeping its snapshots)", args.id);
            return Ok(());
        }
        // The finalizer asked for the snapshots' deletion; the
        // snapshot controller carries it out: wait for that too.
        self.snapshots_gone(&b, deadline).await?;
        println!("deleted GroupBackup {} and its snapshots", args.id);
        Ok(())
    }

    /// The VolumeSnapshots and VolumeGroupSnapshots a backup left in the
    /// namespace: those its status records (a group snapshot's own carry no
    /// label) and those labelled with its uid.
    async fn snapshots_of(&self, backup: &GroupBackup) -> anyhow::Result<Vec<String>> {
        use kube::api::{DynamicObject, ListParams};
        let uid = backup.metadata.uid.clone().unwrap_or_default();
        let selector = format!("{}={uid}", crate::kube::crd::BACKUP_LABEL);
        let mut left = Vec::new();
        let snapshots: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &self.ns,
            &crate::kube::csi::volume_snapshot_resource(),
        );
        let recorded = backup.status.iter().flat_map(|s| s.members.iter());
        for v in recorded.flat_map(|m| m.volume_snapshots.iter()) {
            if snapshots.get_opt(&v.name).await?.is_some() {
                left.push(format!("VolumeSnapshot {}", v.name));
            }
        }
        let mut resources = vec![crate::kube::csi::volume_snapshot_resource()];
        if let Ok(groups) = crate::kube::csi::volume_group_snapshot_resource(&self.client).await {
            resources.push(groups);
        }
        for resource in resources {
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &self.ns, &resource);
            let list = api.list(&ListParams::default().labels(&selector)).await?;
            for name in list.items.into_iter().filter_map(|o| o.metadata.name) {
                let name = format!("{} {name}", resource.kind);
                if !left.contains(&name) {
                    left.push(name);
                }
            }
        }
        Ok(left)
    }

    /// Waits until a deleted backup's snapshots are gone, saying what is
    /// left as it changes; past `deadline`, fails naming what remains.
    async fn snapshots_gone(
        &self,
        backup: &GroupBackup,
        deadline: tokio::time::Instant,
    ) -> anyhow::Result<()> {
        let mut said = Vec::new();
        loop {
            let left = self.snapshots_of(backup).await?;
            if left.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the GroupBackup is deleted, but its snapshots are still there after 120 s: {} \
                     (is the snapshot controller running? `kubectl describe` them for why)",
                    left.join(", ")
                );
            }
            if left != said {
                eprintln!(
                    "waiting for {} snapshot(s) to be deleted: {}",
                    left.len(),
                    left.join(", ")
                );
                said = left;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Creates a GroupBackup and follows it to its end.
    async fn create(&self, group: &str, id: Option<String>, global: &Global) -> anyhow::Result<()> {
        if self.groups().get_opt(group).await?.is_none() {
            bail!("no ConsistencyGroup {group} in namespace {}", self.ns);
        }
        let name = id.unwrap_or_else(|| new_backup_id(group));
        let backup = GroupBackup::new(
            &name,
            GroupBackupSpec {
                group: group.into(),
                deletion_policy: Default::default(),
            },
        );
        self.backups()
            .create(&PostParams::default(), &backup)
            .await
            .with_context(|| format!("creating GroupBackup {name}"))?;
        let spinner = global.output.interactive().then(|| {
            let s = indicatif::ProgressBar::new_spinner();
            s.enable_steady_tick(Duration::from_millis(100));
            s
        });
        let mut last = BackupPhase::Pending;
        let b = loop {
            let b = self.get_backup(&name).await?;
            let now = phase(&b);
            if let Some(s) = &spinner {
                s.set_message(format!(
                    "GroupBackup {name} of group {group}: {}",
                    now.as_str()
                ));
            } else if now != last {
                eprintln!("GroupBackup {name}: {}", now.as_str());
            }
            last = now;
            if now.is_final() {
                break b;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if let Some(s) = spinner {
            s.finish_and_clear();
        }
        let m = manifest_of(&b);
        match phase(&b) {
            BackupPhase::Succeeded => {
                global.output.print(&b, || {
                    format!(
                        "GroupBackup {name} of group {group} succeeded; freeze window {}\n\n{}",
                        window(&b),
                        members_table(&m)
                    )
                });
                Ok(())
            }
            other => {
                if global.output != super::output::Output::Table {
                    global.output.print(&b, String::new);
                }
                let s = b.status.unwrap_or_default();
                let reason = condition(&s.conditions, "Completed")
                    .map(|c| c.1)
                    .unwrap_or_default();
                bail!(
                    "GroupBackup {name} of group {group} {} ({reason}): {}; every member was thawed and \
                     partial snapshots were deleted",
                    other.as_str().to_lowercase(),
                    s.error.unwrap_or_default()
                )
            }
        }
    }

    async fn status(&self, group: Option<&str>, global: &Global) -> anyhow::Result<()> {
        if let Some(g) = group {
            let g = self
                .groups()
                .get_opt(g)
                .await?
                .with_context(|| format!("no ConsistencyGroup {g} in namespace {}", self.ns))?;
            global.output.print(&g, || group_status(&self.ns, &g));
            return Ok(());
        }
        let groups = self.groups().list(&Default::default()).await?.items;
        let rows: Vec<GroupRow> = groups
            .iter()
            .map(|g| {
                let s = g.status.clone().unwrap_or_default();
                let (protectable, reason, message) = condition(&s.conditions, "Protectable")
                    .unwrap_or(("Unknown".into(), String::new(), String::new()));
                GroupRow {
                    name: g.name_any(),
                    protectable,
                    reason,
                    message,
                    members: s.resolved_members,
                    last_successful_backup: s.last_successful_backup,
                }
            })
            .collect();
        global.output.print(&rows, || groups_table(&rows));
        Ok(())
    }

    async fn plan(&self, id: &str, global: &Global) -> anyhow::Result<()> {
        let b = self.get_backup(id).await?;
        super::plan::print(&manifest_of(&b), "GroupBackup", phase(&b).as_str(), global);
        Ok(())
    }
}
