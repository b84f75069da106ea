//! Local-mode configuration: one TOML file with the groups, their members,
//! the snapshotter, the budgets, TLS and the catalog. Every error points at
//! its field (`groups.shop.members[2].primary: …`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use stillpoint_proto::tls::{TlsFiles, validate_identity};

use crate::core::model::{AgentEndpoint, GroupSpec, MemberSpec, Role, VolumeId};

/// Default bound on the whole freeze window.
pub const DEFAULT_FREEZE_BUDGET: &str = "5s";
/// Default lease TTL given to the agents.
pub const DEFAULT_LEASE_TTL: &str = "30s";
/// Default bound on a replica's alignment wait.
pub const DEFAULT_ALIGN_TIMEOUT: &str = "5s";
/// Default bound on dialling an agent (at most 1m).
pub const DEFAULT_CONNECT_TIMEOUT: &str = "5s";
/// Default bound on each request to an agent outside the freeze's own
/// budgets (at most 5m).
pub const DEFAULT_RPC_TIMEOUT: &str = "30s";
/// How a member accepts a path its volumes do not hold, in local mode's
/// words.
pub const ACCEPT_GAP: &str = "`accept_uncovered = [\"{path}\"]` for member {member}";
/// What makes an InnoDB member cuttable by the `copy` snapshotter, in local
/// mode's words.
pub const COPY_FIX: &str = "Set `fsfreeze = true` for member {member} (and \
     STILLPOINT_FSFREEZE_MOUNTS on its agent), or use an atomic snapshotter (btrfs, exec)";

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Directory of the backup manifests.
    pub catalog: PathBuf,
    pub tls: TlsSection,
    #[serde(default)]
    pub groups: BTreeMap<String, GroupFile>,
    /// Scheduled backups, run by `stillpoint serve`.
    #[serde(default)]
    pub schedules: BTreeMap<String, ScheduleFile>,
}

pub use crate::core::schedule::{Missed, Schedule};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleFile {
    /// The group to back up.
    pub group: String,
    /// Cron expression; a sixth, leading field gives seconds.
    pub cron: String,
    /// IANA time zone the expression is read in (default UTC).
    pub timezone: Option<String>,
    /// Keep this many of the schedule's newest backups.
    pub keep_last: Option<usize>,
    /// Delete the schedule's backups older than this (e.g. `14d`).
    pub max_age: Option<String>,
    #[serde(default)]
    pub missed: Missed,
    /// Do not run (the schedule stays in the file).
    #[serde(default)]
    pub suspend: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// A `stillpoint certs issue` directory (tls.crt, tls.key, ca.crt) ...
    pub dir: Option<PathBuf>,
    /// ... or the three files.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    Btrfs,
    Copy,
    Exec,
    /// Cuts nothing (the benchmarks' no-op cut); not available in files.
    #[serde(skip)]
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupFile {
    #[serde(default = "default_driver")]
    pub snapshotter: Driver,
    /// Where btrfs snapshots and copies go.
    pub snapshot_dir: Option<PathBuf>,
    pub exec: Option<ExecTemplates>,
    pub freeze_budget: Option<String>,
    pub lease_ttl: Option<String>,
    pub align_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub rpc_timeout: Option<String>,
    pub members: Vec<MemberFile>,
}

fn default_driver() -> Driver {
    Driver::Btrfs
}

/// Command templates of the exec snapshotter (run by `sh -c`). Placeholders:
/// `{volume}` (the volume path), `{snapshot}` (a name unique per backup,
/// member and volume), `{backup}`, `{member}`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecTemplates {
    pub snapshot: String,
    pub delete: String,
    /// Bound on each command (default 5m); the freeze budget bounds the
    /// snapshot commands as well.
    pub timeout: Option<String>,
}

/// Default bound on one exec snapshotter command.
pub const DEFAULT_EXEC_TIMEOUT: &str = "5m";

impl ExecTemplates {
    /// The bound on each command (validated when the file is loaded).
    pub fn timeout(&self) -> Duration {
        parse_duration(self.timeout.as_deref().unwrap_or(DEFAULT_EXEC_TIMEOUT))
            .unwrap_or(Duration::from_secs(300))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleHint {
    Primary,
    Replica,
    Standalone,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberFile {
    pub name: String,
    /// `host:port` of the member's agent.
    pub agent: String,
    /// The URI SAN the agent's certificate must carry.
    pub identity: String,
    pub role: RoleHint,
    /// For a replica: the name of its primary (in the same group).
    pub primary: Option<String>,
    #[serde(default)]
    pub volumes: Vec<PathBuf>,
    /// Restore stage (lower first); default by engine class.
    pub restore_stage: Option<u32>,
    /// The agent freezes this member's mount (`STILLPOINT_FSFREEZE_MOUNTS`),
    /// which makes a `copy` of an InnoDB member consistent.
    #[serde(default)]
    pub fsfreeze: bool,
    /// Paths the member's server uses (as its agent reports them) that are
    /// knowingly not on its volumes. Without this, a backup whose volumes
    /// do not hold everything the server needs for crash recovery is
    /// refused before anything freezes; with it, the backup goes ahead and
    /// its manifest carries a warning. A path here covers everything below it.
    #[serde(default)]
    pub accept_uncovered: Vec<PathBuf>,
}

/// A validated group.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub driver: Driver,
    pub snapshot_dir: PathBuf,
    pub exec: Option<ExecTemplates>,
    pub freeze_budget: Duration,
    pub lease_ttl: Duration,
    pub align_timeout: Duration,
    pub connect_timeout: Duration,
    pub rpc_timeout: Duration,
    pub members: Vec<MemberFile>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub catalog: PathBuf,
    pub tls: TlsFiles,
    pub groups: BTreeMap<String, Group>,
    pub schedules: BTreeMap<String, Schedule>,
}

/// Every problem found, each naming its field.
#[derive(Debug, thiserror::Error)]
#[error("{path}: invalid configuration:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<String>,
}

/// Parses `250ms`, `5s`, `2m`, `1h`, `7d`; zero is refused (every
/// duration here bounds or spaces something).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = stillpoint_proto::duration::parse_duration(text)?;
    if d.is_zero() {
        return Err(format!("'{}' is out of range (must be > 0)", text.trim()));
    }
    Ok(d)
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let fail = |problems: Vec<String>| ConfigError {
            path: path.to_path_buf(),
            problems,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail(vec![format!("cannot read the file: {e}")]))?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let fail = |problems: Vec<String>| ConfigError {
            path: path.to_path_buf(),
            problems,
        };
        let file: File =
            toml::from_str(text).map_err(|e| fail(vec![e.to_string().trim().to_string()]))?;
        let mut c = Checker {
            base: path.parent().unwrap_or(Path::new(".")),
            problems: Vec::new(),
        };
        let tls = c.tls(&file.tls);
        let groups: BTreeMap<String, Group> = file
            .groups
            .iter()
            .map(|(name, g)| (name.clone(), c.group(name, g)))
            .collect();
        let schedules: BTreeMap<String, Schedule> = file
            .schedules
            .iter()
            .filter_map(|(name, s)| Some((name.clone(), c.schedule(name, s, &groups)?)))
            .collect();
        if !c.problems.is_empty() {
            return Err(fail(c.problems));
        }
        Ok(Config {
            path: path.to_path_buf(),
            catalog: c.resolve(&file.catalog),
            tls,
            groups,
            schedules,
        })
    }

    pub fn group(&self, name: &str) -> Result<&Group, String> {
        self.groups.get(name).ok_or_else(|| {
            format!(
                "no group '{name}' in {} (groups: {})",
                self.path.display(),
                self.groups.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}

/// Reads a parsed file into a configuration, collecting every problem
/// (each named by where it is in the file) rather than stopping at the
/// first.
struct Checker<'a> {
    /// Relative paths are relative to the file's directory.
    base: &'a Path,
    problems: Vec<String>,
}

impl Checker<'_> {
    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn tls(&mut self, tls: &TlsSection) -> TlsFiles {
        match (&tls.dir, &tls.cert, &tls.key, &tls.ca) {
            (Some(dir), None, None, None) => TlsFiles::in_dir(&self.resolve(dir)),
            (None, Some(cert), Some(key), Some(ca)) => TlsFiles {
                cert: self.resolve(cert),
                key: self.resolve(key),
                ca: self.resolve(ca),
            },
            _ => {
                self.problems
                    .push("tls: set either `dir` or all of `cert`, `key` and `ca`".into());
                TlsFiles::in_dir(self.base)
            }
        }
    }

    /// A duration at `at.field`, its default when absent.
    fn duration(
        &mut self,
        at: &str,
        field: &str,
        value: &Option<String>,
        default: &str,
    ) -> Duration {
        parse_duration(value.as_deref().unwrap_or(default)).unwrap_or_else(|e| {
            self.problems.push(format!("{at}.{field}: {e}"));
            Duration::from_secs(1)
        })
    }

    fn group(&mut self, name: &str, g: &GroupFile) -> Group {
        use crate::core::agents::{MAX_CONNECT_TIMEOUT, MAX_RPC_TIMEOUT, within};
        let at = format!("groups.{name}");
        let freeze_budget = self.duration(
            &at,
            "freeze_budget",
            &g.freeze_budget,
            DEFAULT_FREEZE_BUDGET,
        );
        let lease_ttl = self.duration(&at, "lease_ttl", &g.lease_ttl, DEFAULT_LEASE_TTL);
        let align_timeout = self.duration(
            &at,
            "align_timeout",
            &g.align_timeout,
            DEFAULT_ALIGN_TIMEOUT,
        );
        let connect_timeout = self.duration(
            &at,
            "connect_timeout",
            &g.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        );
        let rpc_timeout = self.duration(&at, "rpc_timeout", &g.rpc_timeout, DEFAULT_RPC_TIMEOUT);
        for (field, value, max) in [
            ("connect_timeout", connect_timeout, MAX_CONNECT_TIMEOUT),
            ("rpc_timeout", rpc_timeout, MAX_RPC_TIMEOUT),
        ] {
            if let Err(e) = within(field, value, max) {
                self.problems.push(format!("{at}.{e}"));
            }
        }
        let snapshot_dir = self.snapshotter(&at, g);
        if g.members.is_empty() {
            self.problems
                .push(format!("{at}.members: a group needs at least one member"));
        }
        for (i, m) in g.members.iter().enumerate() {
            self.member(&format!("{at}.members[{i}]"), name, g, m);
        }
        Group {
            name: name.to_string(),
            driver: g.snapshotter,
            snapshot_dir,
            exec: g.exec.clone(),
            freeze_budget,
            lease_ttl,
            align_timeout,
            connect_timeout,
            rpc_timeout,
            members: g.members.clone(),
        }
    }

    /// The snapshotter's settings; returns its directory.
    fn snapshotter(&mut self, at: &str, g: &GroupFile) -> PathBuf {
        let snapshot_dir = match (&g.snapshot_dir, g.driver_needs_dir()) {
            (Some(dir), _) => self.resolve(dir),
            (None, true) => {
                self.problems.push(
                    format!(
                        "{at}.snapshot_dir: required by the {:?} snapshotter",
                        g.snapshotter
                    )
                    .to_lowercase(),
                );
                PathBuf::new()
            }
            (None, false) => PathBuf::new(),
        };
        if g.snapshotter == Driver::Exec && g.exec.is_none() {
            self.problems.push(format!(
                "{at}.exec: required by the exec snapshotter (snapshot and delete templates)"
            ));
        }
        if let Some(Err(e)) = g
            .exec
            .as_ref()
            .and_then(|t| t.timeout.as_deref())
            .map(parse_duration)
        {
            self.problems.push(format!("{at}.exec.timeout: {e}"));
        }
        snapshot_dir
    }

    /// Member `m` (at `at`) of group `group`.
    fn member(&mut self, at: &str, group: &str, g: &GroupFile, m: &MemberFile) {
        let problems = &mut self.problems;
        if m.name.is_empty() {
            problems.push(format!("{at}.name: must not be empty"));
        }
        if g.members.iter().filter(|o| o.name == m.name).count() > 1 {
            problems.push(format!(
                "{at}.name: '{}' is used by more than one member",
                m.name
            ));
        }
        if let Err(e) = validate_identity(&m.identity) {
            problems.push(format!("{at}.identity: {e}"));
        }
        if m.agent
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            problems.push(format!("{at}.agent: '{}' is not host:port", m.agent));
        }
        if let Some(problem) = primary_problem(at, group, g, m) {
            problems.push(problem);
        }
        for (what, paths) in [
            ("volumes", &m.volumes),
            ("accept_uncovered", &m.accept_uncovered),
        ] {
            for (i, path) in paths.iter().enumerate() {
                if !path.is_absolute() {
                    problems.push(format!(
                        "{at}.{what}[{i}]: '{}' must be an absolute path",
                        path.display()
                    ));
                }
            }
        }
        if m.volumes.is_empty() && g.snapshotter != Driver::Exec {
            problems.push(format!(
                "{at}.volumes: a member needs at least one volume to snapshot"
            ));
        }
    }

    /// Schedule `name`, if its cron and time zone can be read.
    fn schedule(
        &mut self,
        name: &str,
        s: &ScheduleFile,
        groups: &BTreeMap<String, Group>,
    ) -> Option<Schedule> {
        let at = format!("schedules.{name}");
        let problems = &mut self.problems;
        if !groups.contains_key(&s.group) {
            problems.push(format!(
                "{at}.group: no group '{}' (groups: {})",
                s.group,
                groups.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        let cron = crate::core::schedule::parse_cron(&s.cron)
            .map_err(|e| problems.push(format!("{at}.cron: {e}")))
            .ok();
        let timezone = crate::core::schedule::parse_timezone(s.timezone.as_deref())
            .map_err(|e| problems.push(format!("{at}.timezone: {e}")))
            .ok();
        if s.keep_last == Some(0) {
            problems.push(format!(
                "{at}.keep_last: must be at least 1 (leave it out to keep any number)"
            ));
        }
        let max_age = s.max_age.as_deref().and_then(|text| {
            parse_duration(text)
                .map_err(|e| problems.push(format!("{at}.max_age: {e}")))
                .ok()
        });
        Some(Schedule {
            name: name.to_string(),
            group: s.group.clone(),
            cron: cron?,
            timezone: timezone?,
            retention: crate::local::retention::Retention {
                keep_last: s.keep_last,
                max_age,
            },
            missed: s.missed,
            suspend: s.suspend,
        })
    }
}

/// What is wrong with member `m`'s role and primary, if anything: only a
/// replica names a primary, a primary of its own group.
fn primary_problem(at: &str, group: &str, g: &GroupFile, m: &MemberFile) -> Option<String> {
    match (m.role, &m.primary) {
        (RoleHint::Replica, None) => Some(format!("{at}.primary: a replica must name its primary")),
        (RoleHint::Replica, Some(p)) => match g.members.iter().find(|o| &o.name == p) {
            None => Some(format!(
                "{at}.primary: '{p}' is not a member of group {group}; a replica can only be \
                 backed up with its primary in the same group"
            )),
            Some(o) if o.role != RoleHint::Primary => {
                Some(format!("{at}.primary: '{p}' is not a primary"))
            }
            Some(_) => None,
        },
        (_, Some(_)) => Some(format!("{at}.primary: only a replica has a primary")),
        _ => None,
    }
}

impl RoleHint {
    pub fn role(self) -> Role {
        match self {
            RoleHint::Primary => Role::Primary,
            RoleHint::Replica => Role::Replica,
            RoleHint::Standalone => Role::Standalone,
        }
    }
}

impl MemberFile {
    /// The member as the protocol takes it.
    pub fn spec(&self) -> MemberSpec {
        MemberSpec {
            name: self.name.clone(),
            agent: AgentEndpoint {
                addr: self.agent.clone(),
                identity: self.identity.clone(),
            },
            role: self.role.role(),
            primary: self.primary.clone(),
            volumes: self.volumes.iter().cloned().map(VolumeId::Path).collect(),
            restore_stage: self.restore_stage,
            fsfreeze: self.fsfreeze,
            accept_uncovered: self.accept_uncovered.clone(),
        }
    }
}

impl Group {
    /// The group as the protocol takes it.
    pub fn spec(&self) -> GroupSpec {
        GroupSpec {
            name: self.name.clone(),
            namespace: None,
            members: self.members.iter().map(MemberFile::spec).collect(),
            freeze_budget: self.freeze_budget,
            lease_ttl: self.lease_ttl,
            align_timeout: self.align_timeout,
            connect_timeout: self.connect_timeout,
            rpc_timeout: self.rpc_timeout,
        }
    }
}

impl GroupFile {
    fn driver_needs_dir(&self) -> bool {
        matches!(self.snapshotter, Driver::Btrfs | Driver::Copy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
catalog = "catalog"
[tls]
dir = "pki/controller"
[groups.shop]
snapshotter = "copy"
snapshot_dir = "/snapshots"
freeze_budget = "2s"
[[groups.shop.members]]
name = "pg-0"
agent = "127.0.0.1:9443"
identity = "spiffe://local/ns/db/sa/pg-0"
role = "primary"
volumes = ["/data/pg-0"]
[[groups.shop.members]]
name = "pg-1"
agent = "127.0.0.1:9444"
identity = "spiffe://local/ns/db/sa/pg-1"
role = "replica"
primary = "pg-0"
volumes = ["/data/pg-1"]
"#;

    #[test]
    fn a_good_file_loads_with_paths_relative_to_it() {
        let c = Config::parse(Path::new("/etc/stillpoint/local.toml"), GOOD).unwrap();
        assert_eq!(c.catalog, PathBuf::from("/etc/stillpoint/catalog"));
        assert_eq!(
            c.tls.cert,
            PathBuf::from("/etc/stillpoint/pki/controller/tls.crt")
        );
        let g = c.group("shop").unwrap();
        assert_eq!(g.freeze_budget, Duration::from_secs(2));
        assert_eq!(g.lease_ttl, Duration::from_secs(30));
        assert!(c.group("nope").unwrap_err().contains("groups: shop"));
    }

    #[test]
    fn a_schedule_reads_seconds_and_its_time_zone() {
        let text = format!(
            "{GOOD}\n[schedules.often]\ngroup = \"shop\"\ncron = \"*/5 * * * * *\"\ntimezone = \"Europe/Berlin\"\nkeep_last = 3\nmax_age = \"7d\"\nmissed = \"skip\"\n"
        );
        let c = Config::parse(Path::new("x.toml"), &text).unwrap();
        let s = &c.schedules["often"];
        assert_eq!(s.timezone, chrono_tz::Europe::Berlin);
        assert_eq!(s.missed, Missed::Skip);
        assert_eq!(s.retention.keep_last, Some(3));
        assert_eq!(s.retention.max_age, Some(Duration::from_secs(7 * 86400)));
        let t0 = chrono::TimeZone::with_ymd_and_hms(&s.timezone, 2026, 1, 1, 0, 0, 1).unwrap();
        let next = s.cron.find_next_occurrence(&t0, false).unwrap();
        assert_eq!((next - t0).num_seconds(), 4);
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/stillpoint.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.group("lvm").unwrap().driver, Driver::Exec);
        assert_eq!(c.schedules["shop-nightly"].retention.keep_last, Some(7));
        assert!(c.schedules["shop-hourly"].suspend);
    }

    #[test]
    fn every_error_points_at_its_field() {
        let bad = GOOD
            .replace("primary = \"pg-0\"", "primary = \"pg-9\"")
            .replace("freeze_budget = \"2s\"", "freeze_budget = \"soon\"")
            .replace("spiffe://local/ns/db/sa/pg-0", "pg-0")
            .replace("127.0.0.1:9444", "nowhere");
        let err = Config::parse(Path::new("x.toml"), &bad)
            .unwrap_err()
            .to_string();
        for needle in [
            "groups.shop.members[1].primary: 'pg-9' is not a member of group shop",
            "groups.shop.freeze_budget:",
            "groups.shop.members[0].identity:",
            "groups.shop.members[1].agent:",
        ] {
            assert!(err.contains(needle), "{needle} missing from:\n{err}");
        }
        let schedules = format!(
            "{GOOD}\n[schedules.bad]\ngroup = \"nope\"\ncron = \"61 * * * *\"\ntimezone = \"Mars/Olympus\"\nkeep_last = 0\nmax_age = \"forever\"\n"
        );
        let err = Config::parse(Path::new("x.toml"), &schedules)
            .unwrap_err()
            .to_string();
        for needle in [
            "schedules.bad.group: no group 'nope' (groups: shop)",
            "schedules.bad.cron: '61 * * * *'",
            "schedules.bad.timezone: 'Mars/Olympus'",
            "schedules.bad.keep_last:",
            "schedules.bad.max_age:",
        ] {
            assert!(err.contains(needle), "{needle} missing from:\n{err}");
        }
        let unknown = GOOD.replace("snapshotter = \"copy\"", "snapshoter = \"copy\"");
        let err = Config::parse(Path::new("x.toml"), &unknown)
            .unwrap_err()
            .to_string();
        assert!(err.contains("snapshoter") && err.contains("line"), "{err}");
    }
}
