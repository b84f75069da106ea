//! The lab's CSI driver, `lab.csi.stillpoint.dev`: volumes are directories
//! (btrfs subvolumes when its state is on btrfs) that the pod runner
//! bind-mounts, served to the real external-provisioner and
//! external-snapshotter over a unix socket.
//!
//! It stands where csi-driver-host-path would (that module cannot be had
//! from the Go module proxy here) and behaves like it by default: a
//! snapshot is a **live copy** of the volume's files, one file after
//! another — not atomic — and a group snapshot copies its volumes one after
//! another. A class with `parameters: {mode: atomic}` instead takes a
//! read-only btrfs snapshot of each volume (atomic per volume; a group's
//! volumes are still snapshotted one by one, so not at one instant).
//! Restoring a volume from a snapshot copies (or, atomic, snapshots) it
//! back. Snapshots are ready as soon as they are made. A class parameter
//! `delayMs` makes each snapshot take that long (slow storage).
//!
//! The worst order on purpose: with `firstVolumes` (comma-separated volume
//! ids) and `thenAfterMs`, a group snapshot cuts those volumes first and
//! the others `thenAfterMs` later, and a single snapshot of any other
//! volume waits `thenAfterMs` before it is cut. Users' storage cuts a
//! group's volumes in every order; this makes the bad one deterministic.
//!
//! Every CreateSnapshot and CreateVolumeGroupSnapshot is logged with when
//! it was called and when it returned ([`CsiDriver::calls`]): the
//! benchmarks break a cut's time down with it.
//!
//! Storage that fails and then succeeds: with `failFirst: "N"`, the first
//! N requests for each snapshot (or group snapshot) fail with UNAVAILABLE;
//! the sidecars report the error in the objects' `status.error` and retry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

/// The generated CSI API (the subset in `tests/k8s/csi/csi.proto`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("csi.v1");
}

/// The driver's name, as StorageClasses and snapshot classes name it.
pub const DRIVER: &str = "lab.csi.stillpoint.dev";

/// How a snapshot is taken (the class parameter `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A live copy of the files (what csi-driver-host-path does): not atomic.
    Copy,
    /// A read-only btrfs snapshot: atomic per volume.
    Atomic,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotMeta {
    source: String,
    created: (i64, i32),
    mode: Mode,
    #[serde(default)]
    group: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct GroupMeta {
    snapshots: Vec<String>,
    created: (i64, i32),
}

/// The driver's state on disk.
#[derive(Debug)]
struct Store {
    root: PathBuf,
    btrfs: bool,
    /// One operation at a time: the sidecars retry, the lab is small.
    lock: Mutex<()>,
    /// Requests so far per snapshot name (for `failFirst`).
    attempts: Mutex<BTreeMap<String, u32>>,
    /// Every create call so far.
    calls: Mutex<Vec<Call>>,
}

/// One create call of the driver, as the sidecar made it.
#[derive(Debug, Clone)]
pub struct Call {
    /// `CreateSnapshot` or `CreateVolumeGroupSnapshot`.
    pub method: &'static str,
    /// The request's name: the sidecar's `snapshot-<VolumeSnapshot uid>`
    /// or `groupsnapshot-<VolumeGroupSnapshot uid>`.
    pub name: String,
    pub called: std::time::SystemTime,
    pub returned: std::time::SystemTime,
    pub ok: bool,
}

impl Store {
    fn log<T>(
        &self,
        method: &'static str,
        name: String,
        called: std::time::SystemTime,
        result: &Result<T, Status>,
    ) {
        self.calls.lock().unwrap().push(Call {
            method,
            name,
            called,
            returned: std::time::SystemTime::now(),
            ok: result.is_ok(),
        });
    }
}

fn now() -> (i64, i32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

fn timestamp((seconds, nanos): (i64, i32)) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn run(cmd: &mut Command) -> Result<(), Status> {
    let out = cmd.output().map_err(internal)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Status::internal(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Ids name directories: nothing but a plain name may be one.
fn checked(id: &str) -> Result<&str, Status> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !id.starts_with('.');
    if ok {
        Ok(id)
    } else {
        Err(Status::invalid_argument(format!("invalid id {id:?}")))
    }
}

impl Store {
    fn volume(&self, id: &str) -> PathBuf {
        self.root.join("volumes").join(id)
    }

    fn snapshot(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(id)
    }

    fn meta(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(format!("{id}.json"))
    }

    fn group(&self, id: &str) -> PathBuf {
        self.root.join("groups").join(format!("{id}.json"))
    }

    /// A new, empty volume (a subvolume on btrfs).
    fn create_dir(&self, path: &Path) -> Result<(), Status> {
        if self.btrfs {
            run(Command::new("btrfs")
                .args(["subvolume", "create"])
                .arg(path))?;
        } else {
            std::fs::create_dir(path).map_err(internal)?;
        }
        // As hostpath: any pod may write it; fsGroup and init containers
        // narrow it down.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .map_err(internal)
    }

    fn remove(&self, path: &Path) -> Result<(), Status> {
        if !path.exists() {
            return Ok(());
        }
        let subvolume = self.btrfs
            && Command::new("btrfs")
                .args(["subvolume", "show"])
                .arg(path)
                .output()
                .is_ok_and(|o| o.status.success());
        if subvolume {
            // A read-only snapshot must be made writable to be deleted
            // by some kernels' rules; `subvolume delete` takes it as is.
            run(Command::new("btrfs")
                .args(["subvolume", "delete"])
                .arg(path))
        } else {
            std::fs::remove_dir_all(path).map_err(internal)
        }
    }

    /// Copies the files of `from` into the (existing) directory `to`.
    fn copy_into(from: &Path, to: &Path) -> Result<(), Status> {
        run(Command::new("cp")
            .args(["-a", "--reflink=auto", "--no-target-directory"])
            .arg(from)
            .arg(to))
    }

    fn take(
        &self,
        source: &str,
        id: &str,
        mode: Mode,
        group: &str,
    ) -> Result<SnapshotMeta, Status> {
        let from = self.volume(checked(source)?);
        if !from.is_dir() {
            return Err(Status::not_found(format!("no volume {source}")));
        }
        let to = self.snapshot(checked(id)?);
        match mode {
            Mode::Atomic if self.btrfs => run(Command::new("btrfs")
                .args(["subvolume", "snapshot", "-r"])
                .arg(&from)
                .arg(&to))?,
            Mode::Atomic => {
                return Err(Status::invalid_argument(
                    "mode atomic needs the driver's state on btrfs",
                ));
            }
            Mode::Copy => {
                std::fs::create_dir(&to).map_err(internal)?;
                Self::copy_into(&from, &to)?;
            }
        }
        let meta = SnapshotMeta {
            source: source.to_string(),
            created: now(),
            mode,
            group: group.to_string(),
        };
        std::fs::write(self.meta(id), serde_json::to_vec(&meta).map_err(internal)?)
            .map_err(internal)?;
        Ok(meta)
    }

    fn read_snapshot(&self, id: &str) -> Option<SnapshotMeta> {
        serde_json::from_slice(&std::fs::read(self.meta(id)).ok()?).ok()
    }

    fn snapshot_pb(id: &str, meta: &SnapshotMeta) -> pb::Snapshot {
        pb::Snapshot {
            size_bytes: 0,
            snapshot_id: id.to_string(),
            source_volume_id: meta.source.clone(),
            creation_time: Some(timestamp(meta.created)),
            ready_to_use: true,
            group_snapshot_id: meta.group.clone(),
        }
    }
}

/// `failFirst`: whether this request for snapshot `name` is one of the
/// first N, which fail as storage that is busy would.
fn fail_first<'a>(
    store: &Store,
    name: &str,
    mut parameters: impl Iterator<Item = (&'a String, &'a String)>,
) -> Result<(), Status> {
    let Some((_, n)) = parameters.find(|(k, _)| *k == "failFirst") else {
        return Ok(());
    };
    let n: u32 = n
        .parse()
        .map_err(|_| Status::invalid_argument("parameter failFirst must be a number"))?;
    let mut attempts = store.attempts.lock().unwrap();
    let seen = attempts.entry(name.to_string()).or_default();
    *seen += 1;
    match *seen <= n {
        true => Err(Status::unavailable(format!(
            "the lab's storage is busy (failFirst: request {seen} of {n} for {name} fails)"
        ))),
        false => Ok(()),
    }
}

/// The order parameters of a class: the volumes cut first, and how long
/// every other volume's cut waits after them.
fn order(
    parameters: &BTreeMap<String, String>,
) -> Result<(Vec<String>, std::time::Duration), Status> {
    let first = parameters
        .get("firstVolumes")
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let after = match parameters.get("thenAfterMs") {
        None => 0,
        Some(ms) => ms
            .parse()
            .map_err(|_| Status::invalid_argument("parameter thenAfterMs must be a number"))?,
    };
    Ok((first, std::time::Duration::from_millis(after)))
}

fn mode(parameters: &BTreeMap<String, String>) -> Result<Mode, Status> {
    match parameters.get("mode").map(String::as_str) {
        None | Some("copy") => Ok(Mode::Copy),
        Some("atomic") => Ok(Mode::Atomic),
        Some(other) => Err(Status::invalid_argument(format!(
            "parameter mode must be copy or atomic, not {other}"
        ))),
    }
}

#[derive(Debug, Clone)]
struct Driver(std::sync::Arc<Store>);

#[tonic::async_trait]
impl pb::identity_server::Identity for Driver {
    async fn get_plugin_info(
        &self,
        _: Request<pb::GetPluginInfoRequest>,
    ) -> Result<Response<pb::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::GetPluginInfoResponse {
            name: DRIVER.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<pb::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::GetPluginCapabilitiesResponse>, Status> {
        use pb::plugin_capability::{Service, Type, service};
        let service = |t: service::Type| pb::PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        Ok(Response::new(pb::GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(service::Type::ControllerService),
                service(service::Type::GroupControllerService),
            ],
        }))
    }

    async fn probe(
        &self,
        _: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        Ok(Response::new(pb::ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl pb::controller_server::Controller for Driver {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(
            move || -> Result<Response<pb::CreateVolumeResponse>, Status> {
                let store = &*store;
                let r = request.into_inner();
                fail_first(store, &r.name, r.parameters.iter())?;
                let _guard = store.lock.lock().unwrap();
                let id = checked(&r.name)?.to_string();
                let path = store.volume(&id);
                let source = r.volume_content_source.clone();
                if !path.exists() {
                    use pb::volume_content_source::Type;
                    match source.as_ref().and_then(|s| s.r#type.as_ref()) {
                        None => store.create_dir(&path)?,
                        Some(Type::Snapshot(s)) => {
                            let from = store.snapshot(checked(&s.snapshot_id)?);
                            let meta = store.read_snapshot(&s.snapshot_id).ok_or_else(|| {
                                Status::not_found(format!("no snapshot {}", s.snapshot_id))
                            })?;
                            if meta.mode == Mode::Atomic {
                                run(Command::new("btrfs")
                                    .args(["subvolume", "snapshot"])
                                    .arg(&from)
                                    .arg(&path))?;
                            } else {
                                store.create_dir(&path)?;
                                Store::copy_into(&from, &path)?;
                            }
                        }
                        Some(Type::Volume(v)) => {
                            let from = store.volume(checked(&v.volume_id)?);
                            store.create_dir(&path)?;
                            Store::copy_into(&from, &path)?;
                        }
                    }
                }
                let capacity = r
                    .capacity_range
                    .map_or(0, |c| c.required_bytes.max(c.limit_bytes));
                Ok(Response::new(pb::CreateVolumeResponse {
                    volume: Some(pb::Volume {
                        capacity_bytes: capacity,
                        volume_id: id,
                        volume_context: Default::default(),
                        content_source: source,
                    }),
                }))
            },
        )
        .await
        .map_err(internal)?
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(
            move || -> Result<Response<pb::DeleteVolumeResponse>, Status> {
                let store = &*store;
                let _guard = store.lock.lock().unwrap();
                let id = request.into_inner().volume_id;
                store.remove(&store.volume(checked(&id)?))?;
                Ok(Response::new(pb::DeleteVolumeResponse {}))
            },
        )
        .await
        .map_err(internal)?
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use pb::controller_service_capability::{Rpc, Type, rpc};
        let rpc = |t: rpc::Type| pb::ControllerServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities: vec![
                rpc(rpc::Type::CreateDeleteVolume),
                rpc(rpc::Type::CreateDeleteSnapshot),
                rpc(rpc::Type::ListSnapshots),
                rpc(rpc::Type::CloneVolume),
            ],
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let (called, name) = (std::time::SystemTime::now(), request.get_ref().name.clone());
        let store = self.0.clone();
        let result = tokio::task::spawn_blocking(
            move || -> Result<Response<pb::CreateSnapshotResponse>, Status> {
                let store = &*store;
                let r = request.into_inner();
                fail_first(store, &r.name, r.parameters.iter())?;
                // `delayMs`: storage that takes this long to cut (a first
                // request only; a retry finds the snapshot made).
                if let Some(ms) = r.parameters.get("delayMs")
                    && store.read_snapshot(checked(&r.name)?).is_none()
                {
                    let ms: u64 = ms.parse().map_err(|_| {
                        Status::invalid_argument("parameter delayMs must be a number")
                    })?;
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
                // `thenAfterMs`: a volume not named first is cut later.
                let parameters: BTreeMap<String, String> =
                    r.parameters.clone().into_iter().collect();
                let (first, after) = order(&parameters)?;
                if !after.is_zero()
                    && !first.contains(&r.source_volume_id)
                    && store.read_snapshot(checked(&r.name)?).is_none()
                {
                    std::thread::sleep(after);
                }
                let _guard = store.lock.lock().unwrap();
                let id = checked(&r.name)?;
                let meta = match store.read_snapshot(id) {
                    Some(meta) if meta.source == r.source_volume_id => meta,
                    Some(_) => {
                        return Err(Status::already_exists(format!(
                            "snapshot {id} exists for another volume"
                        )));
                    }
                    None => {
                        let parameters: BTreeMap<String, String> =
                            r.parameters.into_iter().collect();
                        store.take(&r.source_volume_id, id, mode(&parameters)?, "")?
                    }
                };
                Ok(Response::new(pb::CreateSnapshotResponse {
                    snapshot: Some(Store::snapshot_pb(id, &meta)),
                }))
            },
        )
        .await
        .map_err(internal)
        .and_then(|r| r);
        self.0.log("CreateSnapshot", name, called, &result);
        result
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(
            move || -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
                let store = &*store;
                let _guard = store.lock.lock().unwrap();
                let id = request.into_inner().snapshot_id;
                store.remove(&store.snapshot(checked(&id)?))?;
                let _ = std::fs::remove_file(store.meta(&id));
                Ok(Response::new(pb::DeleteSnapshotResponse {}))
            },
        )
        .await
        .map_err(internal)?
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(
            move || -> Result<Response<pb::ListSnapshotsResponse>, Status> {
                let store = &*store;
                let r = request.into_inner();
                let mut entries = Vec::new();
                for entry in std::fs::read_dir(store.root.join("snapshots"))
                    .map_err(internal)?
                    .flatten()
                {
                    let name = entry.file_name().to_string_lossy().to_string();
                    let Some(id) = name.strip_suffix(".json") else {
                        continue;
                    };
                    let Some(meta) = store.read_snapshot(id) else {
                        continue;
                    };
                    if (!r.snapshot_id.is_empty() && r.snapshot_id != id)
                        || (!r.source_volume_id.is_empty() && r.source_volume_id != meta.source)
                    {
                        continue;
                    }
                    entries.push(pb::list_snapshots_response::Entry {
                        snapshot: Some(Store::snapshot_pb(id, &meta)),
                    });
                }
                Ok(Response::new(pb::ListSnapshotsResponse {
                    entries,
                    next_token: String::new(),
                }))
            },
        )
        .await
        .map_err(internal)?
    }
}

#[tonic::async_trait]
impl pb::group_controller_server::GroupController for Driver {
    async fn group_controller_get_capabilities(
        &self,
        _: Request<pb::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::GroupControllerGetCapabilitiesResponse>, Status> {
        use pb::group_controller_service_capability::{Rpc, Type, rpc};
        Ok(Response::new(pb::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![pb::GroupControllerServiceCapability {
                r#type: Some(Type::Rpc(Rpc {
                    r#type: rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                })),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<pb::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::CreateVolumeGroupSnapshotResponse>, Status> {
        let (called, name) = (std::time::SystemTime::now(), request.get_ref().name.clone());
        let store = self.0.clone();
        let result = tokio::task::spawn_blocking(
            move || -> Result<Response<pb::CreateVolumeGroupSnapshotResponse>, Status> {
                let store = &*store;
                let r = request.into_inner();
                let _guard = store.lock.lock().unwrap();
                let id = checked(&r.name)?.to_string();
                let meta = match std::fs::read(store.group(&id)) {
                    Ok(bytes) => serde_json::from_slice::<GroupMeta>(&bytes).map_err(internal)?,
                    Err(_) => {
                        let parameters: BTreeMap<String, String> =
                            r.parameters.into_iter().collect();
                        let mode = mode(&parameters)?;
                        let (first, after) = order(&parameters)?;
                        let mut snapshots = Vec::new();
                        // One volume after another, as hostpath does: those
                        // named first, then (after the pause) the others.
                        let mut volumes = r.source_volume_ids.clone();
                        volumes.sort_by_key(|v| !first.contains(v));
                        let mut paused = after.is_zero();
                        for volume in &volumes {
                            if !paused && !first.contains(volume) {
                                std::thread::sleep(after);
                                paused = true;
                            }
                            let snapshot = format!("{id}--{volume}");
                            if store.read_snapshot(&snapshot).is_none() {
                                store.take(volume, &snapshot, mode, &id)?;
                            }
                            snapshots.push(snapshot);
                        }
                        let meta = GroupMeta {
                            snapshots,
                            created: now(),
                        };
                        std::fs::write(
                            store.group(&id),
                            serde_json::to_vec(&meta).map_err(internal)?,
                        )
                        .map_err(internal)?;
                        meta
                    }
                };
                Ok(Response::new(pb::CreateVolumeGroupSnapshotResponse {
                    group_snapshot: Some(group_pb(store, &id, &meta)),
                }))
            },
        )
        .await
        .map_err(internal)
        .and_then(|r| r);
        self.0
            .log("CreateVolumeGroupSnapshot", name, called, &result);
        result
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<pb::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::DeleteVolumeGroupSnapshotResponse>, Status> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(
            move || -> Result<Response<pb::DeleteVolumeGroupSnapshotResponse>, Status> {
                let store = &*store;
                let r = request.into_inner();
                let _guard = store.lock.lock().unwrap();
                let id = checked(&r.group_snapshot_id)?;
                let mut snapshots = r.snapshot_ids;
                if let Ok(bytes) = std::fs::read(store.group(id))
                    && let Ok(meta) = serde_json::from_slice::<GroupMeta>(&bytes)
                {
                    snapshots.extend(meta.snapshots);
                }
                for snapshot in snapshots {
                    store.remove(&store.snapshot(checked(&snapshot)?))?;
                    let _ = std::fs::remove_file(store.meta(&snapshot));
                }
                let _ = std::fs::remove_file(store.group(id));
                Ok(Response::new(pb::DeleteVolumeGroupSnapshotResponse {}))
            },
        )
        .await
        .map_err(internal)?
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<pb::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<pb::GetVolumeGroupSnapshotResponse>, Status> {
        let store = self.0.clone();
        tokio::task::spawn_blocking(
            move || -> Result<Response<pb::GetVolumeGroupSnapshotResponse>, Status> {
                let store = &*store;
                let id = request.into_inner().group_snapshot_id;
                let bytes = std::fs::read(store.group(checked(&id)?))
                    .map_err(|_| Status::not_found(format!("no group snapshot {id}")))?;
                let meta: GroupMeta = serde_json::from_slice(&bytes).map_err(internal)?;
                Ok(Response::new(pb::GetVolumeGroupSnapshotResponse {
                    group_snapshot: Some(group_pb(store, &id, &meta)),
                }))
            },
        )
        .await
        .map_err(internal)?
    }
}

fn group_pb(store: &Store, id: &str, meta: &GroupMeta) -> pb::VolumeGroupSnapshot {
    pb::VolumeGroupSnapshot {
        group_snapshot_id: id.to_string(),
        snapshots: meta
            .snapshots
            .iter()
            .filter_map(|s| Some(Store::snapshot_pb(s, &store.read_snapshot(s)?)))
            .collect(),
        creation_time: Some(timestamp(meta.created)),
        ready_to_use: true,
    }
}

/// The running driver. Stops serving when dropped.
#[derive(Debug)]
pub struct CsiDriver {
    pub socket: PathBuf,
    pub root: PathBuf,
    store: std::sync::Arc<Store>,
    task: tokio::task::JoinHandle<()>,
}

impl CsiDriver {
    /// Serves the driver on `root/csi.sock` (on the current runtime), its
    /// state under `root`.
    pub fn start(root: &Path) -> Result<CsiDriver> {
        Self::start_at(root, &root.join("csi.sock"))
    }

    /// Serves the driver on `socket`, its state under `root`, which
    /// another lab's driver may serve too: two clusters on one storage.
    pub fn start_at(root: &Path, socket: &Path) -> Result<CsiDriver> {
        for dir in ["volumes", "snapshots", "groups"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        let socket = socket.to_path_buf();
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)
            .with_context(|| format!("binding {}", socket.display()))?;
        let store = std::sync::Arc::new(Store {
            root: root.to_path_buf(),
            btrfs: crate::harness::is_btrfs(root),
            lock: Mutex::new(()),
            attempts: Mutex::default(),
            calls: Mutex::default(),
        });
        let driver = Driver(store.clone());
        let task = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(pb::identity_server::IdentityServer::new(driver.clone()))
                .add_service(pb::controller_server::ControllerServer::new(driver.clone()))
                .add_service(pb::group_controller_server::GroupControllerServer::new(
                    driver,
                ))
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await;
            if let Err(e) = result {
                tracing::error!("the lab CSI driver stopped: {e}");
            }
        });
        Ok(CsiDriver {
            socket,
            root: root.to_path_buf(),
            store,
            task,
        })
    }

    /// Where a volume's files are (the pod runner bind-mounts this).
    pub fn volume_path(&self, volume_id: &str) -> PathBuf {
        self.root.join("volumes").join(volume_id)
    }

    /// Every create call so far, in the order they returned.
    pub fn calls(&self) -> Vec<Call> {
        self.store.calls.lock().unwrap().clone()
    }

    /// Where a snapshot's files are.
    pub fn snapshot_path(&self, snapshot_id: &str) -> PathBuf {
        self.root.join("snapshots").join(snapshot_id)
    }
}

impl Drop for CsiDriver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
