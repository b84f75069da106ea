//! Agent configuration, read from `STILLPOINT_*` environment variables.
//!
//! Every key is a documented `ENV_*` constant with its `DEFAULT_*`. All keys
//! are parsed before anything is reported, so one run lists every problem.
//! Credentials (the database DSN) come only from the environment or a file,
//! never from the command line, and are never printed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use stillpoint_proto::tls::{TlsFiles, validate_identity};

use crate::certs::CertSource;
use crate::engine::EngineKind;

/// Name of this member in logs, errors and `Describe` (default: `$HOSTNAME`).
pub const ENV_MEMBER: &str = "STILLPOINT_MEMBER";
/// Engine to drive: `postgres`, `mysql` (also `mariadb`), `redis`,
/// `mongodb`, `fsfreeze`, `exec`, or `noop` (bookkeeping only, for protocol
/// tests and benchmarks).
pub const ENV_ENGINE: &str = "STILLPOINT_ENGINE";
/// gRPC (mTLS) listen address.
pub const ENV_LISTEN_ADDR: &str = "STILLPOINT_LISTEN_ADDR";
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:9443";
/// Admin HTTP listen address (`/healthz`, `/metrics`), plain HTTP.
pub const ENV_ADMIN_ADDR: &str = "STILLPOINT_ADMIN_ADDR";
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:9090";
/// The agent's certificate (PEM), carrying its URI SAN identity.
pub const ENV_TLS_CERT: &str = "STILLPOINT_TLS_CERT";
pub const DEFAULT_TLS_CERT: &str = "/etc/stillpoint/tls/tls.crt";
/// The agent's private key (PEM).
pub const ENV_TLS_KEY: &str = "STILLPOINT_TLS_KEY";
pub const DEFAULT_TLS_KEY: &str = "/etc/stillpoint/tls/tls.key";
/// The CA that issues controller certificates (PEM).
pub const ENV_TLS_CA: &str = "STILLPOINT_TLS_CA";
pub const DEFAULT_TLS_CA: &str = "/etc/stillpoint/tls/ca.crt";
/// The only client identity accepted (URI SAN), e.g.
/// `spiffe://cluster.local/ns/stillpoint/sa/stillpoint-controller`. Required.
pub const ENV_CONTROLLER_IDENTITY: &str = "STILLPOINT_CONTROLLER_IDENTITY";
/// How often the TLS files are checked for changes.
/// The controller's certificate endpoint (`https://…/v1/certificate`).
/// When set, the agent obtains its certificate there at start (and renews
/// it at two thirds of its life) and writes it to the TLS files, which
/// then need not exist beforehand.
pub const ENV_CERT_URL: &str = "STILLPOINT_CERT_URL";
/// The projected ServiceAccount token (audience `stillpoint`) the agent
/// proves itself with at the certificate endpoint.
pub const ENV_TOKEN_FILE: &str = "STILLPOINT_TOKEN_FILE";
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/stillpoint/token";
/// The CA bundle the certificate endpoint's serving certificate is checked
/// against.
pub const ENV_CERT_CA: &str = "STILLPOINT_CERT_CA";
pub const DEFAULT_CERT_CA: &str = "/etc/stillpoint/ca/ca.crt";
pub const ENV_TLS_RELOAD_INTERVAL: &str = "STILLPOINT_TLS_RELOAD_INTERVAL";
pub const DEFAULT_TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(10);
/// Bound on one TLS handshake.
pub const ENV_HANDSHAKE_TIMEOUT: &str = "STILLPOINT_HANDSHAKE_TIMEOUT";
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest lease TTL a freeze may ask for.
pub const ENV_MAX_TTL: &str = "STILLPOINT_MAX_TTL";
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(600);
/// Bound on the engine's freeze step (acquiring locks).
pub const ENV_FREEZE_TIMEOUT: &str = "STILLPOINT_FREEZE_TIMEOUT";
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the engine's thaw step.
pub const ENV_THAW_TIMEOUT: &str = "STILLPOINT_THAW_TIMEOUT";
pub const DEFAULT_THAW_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the engine's prepare step.
pub const ENV_PREPARE_TIMEOUT: &str = "STILLPOINT_PREPARE_TIMEOUT";
pub const DEFAULT_PREPARE_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound on the flush (the engine's own flush, e.g. a Redis save made
/// while paused, then `syncfs(2)` on the volumes). It is also bounded by
/// the lease: a flush never outlives the hold it runs in.
pub const ENV_FLUSH_TIMEOUT: &str = "STILLPOINT_FLUSH_TIMEOUT";
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(60);
/// Comma-separated paths where the agent sees the member's volumes; the
/// flush runs `syncfs(2)` on each (once per filesystem). Default: the paths
/// the server reports (data directory, WAL, binlog, AOF, ...), which is
/// right when the agent sees the server's files at the server's own paths.
pub const ENV_VOLUMES: &str = "STILLPOINT_VOLUMES";
/// Longest `WaitForPosition` the agent serves, whatever the caller asks.
pub const ENV_MAX_WAIT: &str = "STILLPOINT_MAX_WAIT";
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(300);
/// Time given to in-flight RPCs after SIGTERM (holds are thawed first).
pub const ENV_SHUTDOWN_GRACE: &str = "STILLPOINT_SHUTDOWN_GRACE";
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Database connection string. Prefer `STILLPOINT_DSN_FILE`.
pub const ENV_DSN: &str = "STILLPOINT_DSN";
/// File holding the database connection string (e.g. a mounted Secret).
pub const ENV_DSN_FILE: &str = "STILLPOINT_DSN_FILE";
/// Log filter (tracing `EnvFilter` syntax).
pub const ENV_LOG: &str = "STILLPOINT_LOG";
pub const DEFAULT_LOG: &str = "info";
/// Log format: `text` or `json`.
pub const ENV_LOG_FORMAT: &str = "STILLPOINT_LOG_FORMAT";
/// Directory for the agent's state files (locks to undo after a crash).
pub const ENV_STATE_DIR: &str = "STILLPOINT_STATE_DIR";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/stillpoint";
/// Bound on connecting to the database.
pub const ENV_CONNECT_TIMEOUT: &str = "STILLPOINT_CONNECT_TIMEOUT";
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on acquiring the engine's lock (PostgreSQL `lock_timeout`, MySQL
/// `lock_wait_timeout`, MongoDB `fsyncLockAcquisitionTimeoutMillis`).
pub const ENV_LOCK_TIMEOUT: &str = "STILLPOINT_LOCK_TIMEOUT";
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a replica's position is polled while waiting for a target.
pub const ENV_POLL_INTERVAL: &str = "STILLPOINT_POLL_INTERVAL";
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How often a hold whose lock lives in the server is checked for loss
/// (MariaDB/MySQL held session, Redis restarts).
pub const ENV_HOLD_CHECK_INTERVAL: &str = "STILLPOINT_HOLD_CHECK_INTERVAL";
pub const DEFAULT_HOLD_CHECK_INTERVAL: Duration = Duration::from_millis(200);
/// PostgreSQL: `backup` (default; writes keep flowing) or `fence` (also
/// `LOCK TABLE … IN EXCLUSIVE MODE` on the fenced schemas' tables).
pub const ENV_PG_MODE: &str = "STILLPOINT_PG_MODE";
/// PostgreSQL fence: comma-separated databases (default: the DSN's database).
pub const ENV_PG_FENCE_DATABASES: &str = "STILLPOINT_PG_FENCE_DATABASES";
/// PostgreSQL fence: comma-separated schemas whose tables are locked.
pub const ENV_PG_FENCE_SCHEMAS: &str = "STILLPOINT_PG_FENCE_SCHEMAS";
pub const DEFAULT_PG_FENCE_SCHEMAS: &str = "public";
/// PostgreSQL: how long the temporary slot keeps the backup's WAL after the
/// thaw, so that it can be copied.
pub const ENV_PG_WAL_RETAIN: &str = "STILLPOINT_PG_WAL_RETAIN";
pub const DEFAULT_PG_WAL_RETAIN: Duration = Duration::from_secs(300);
/// Comma-separated mount points to `FIFREEZE` after the database freeze
/// (the `fsfreeze` engine, or any database engine).
pub const ENV_FSFREEZE_MOUNTS: &str = "STILLPOINT_FSFREEZE_MOUNTS";
/// exec engine: the command (run by `sh -c`) started at freeze and kept
/// running as the hold.
pub const ENV_EXEC_COMMAND: &str = "STILLPOINT_EXEC_COMMAND";
/// exec engine: a probe command; the freeze is done once it exits 0.
pub const ENV_EXEC_READY_COMMAND: &str = "STILLPOINT_EXEC_READY_COMMAND";
/// exec engine: a line on the command's stdout that marks the freeze done.
pub const ENV_EXEC_READY_LINE: &str = "STILLPOINT_EXEC_READY_LINE";
/// exec engine: time between SIGTERM and SIGKILL at thaw.
pub const ENV_EXEC_GRACE: &str = "STILLPOINT_EXEC_GRACE";
pub const DEFAULT_EXEC_GRACE: Duration = Duration::from_secs(5);
/// noop engine: artificial freeze latency.
pub const ENV_NOOP_FREEZE_LATENCY: &str = "STILLPOINT_NOOP_FREEZE_LATENCY";
/// noop engine: artificial thaw latency.
pub const ENV_NOOP_THAW_LATENCY: &str = "STILLPOINT_NOOP_THAW_LATENCY";
/// noop engine: artificial latency of describe and position (a server
/// that stopped answering its agent).
pub const ENV_NOOP_DESCRIBE_LATENCY: &str = "STILLPOINT_NOOP_DESCRIBE_LATENCY";
/// noop engine: the role it reports, `primary` or `replica`.
pub const ENV_NOOP_ROLE: &str = "STILLPOINT_NOOP_ROLE";
/// noop engine: the upstream a replica reports.
pub const ENV_NOOP_UPSTREAM: &str = "STILLPOINT_NOOP_UPSTREAM";

/// Every key this agent reads, for `--help` and for spotting typos.
pub const ALL_KEYS: &[&str] = &[
    ENV_MEMBER,
    ENV_ENGINE,
    ENV_LISTEN_ADDR,
    ENV_ADMIN_ADDR,
    ENV_TLS_CERT,
    ENV_TLS_KEY,
    ENV_TLS_CA,
    ENV_CONTROLLER_IDENTITY,
    ENV_TLS_RELOAD_INTERVAL,
    ENV_CERT_URL,
    ENV_TOKEN_FILE,
    ENV_CERT_CA,
    ENV_HANDSHAKE_TIMEOUT,
    ENV_MAX_TTL,
    ENV_FREEZE_TIMEOUT,
    ENV_THAW_TIMEOUT,
    ENV_PREPARE_TIMEOUT,
    ENV_FLUSH_TIMEOUT,
    ENV_VOLUMES,
    ENV_MAX_WAIT,
    ENV_SHUTDOWN_GRACE,
    ENV_DSN,
    ENV_DSN_FILE,
    ENV_LOG,
    ENV_LOG_FORMAT,
    ENV_STATE_DIR,
    ENV_CONNECT_TIMEOUT,
    ENV_LOCK_TIMEOUT,
    ENV_POLL_INTERVAL,
    ENV_HOLD_CHECK_INTERVAL,
    ENV_PG_MODE,
    ENV_PG_FENCE_DATABASES,
    ENV_PG_FENCE_SCHEMAS,
    ENV_PG_WAL_RETAIN,
    ENV_FSFREEZE_MOUNTS,
    ENV_EXEC_COMMAND,
    ENV_EXEC_READY_COMMAND,
    ENV_EXEC_READY_LINE,
    ENV_EXEC_GRACE,
    ENV_NOOP_FREEZE_LATENCY,
    ENV_NOOP_THAW_LATENCY,
    ENV_NOOP_DESCRIBE_LATENCY,
    ENV_NOOP_ROLE,
    ENV_NOOP_UPSTREAM,
];

/// A value that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The secret itself, for handing to a driver. Never log the result.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings of the noop engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoopConfig {
    pub freeze_latency: Duration,
    pub thaw_latency: Duration,
    pub describe_latency: Duration,
    pub replica: bool,
    pub upstream: String,
}

/// PostgreSQL freeze mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgMode {
    /// `pg_backup_start` + a temporary slot; writes keep flowing.
    Backup,
    /// Backup mode plus `LOCK TABLE … IN EXCLUSIVE MODE` (reads allowed).
    Fence,
}

/// Settings of the PostgreSQL engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgConfig {
    pub mode: PgMode,
    /// Empty: the DSN's own database.
    pub fence_databases: Vec<String>,
    pub fence_schemas: Vec<String>,
    pub wal_retain: Duration,
}

/// Settings of the exec engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecConfig {
    pub command: String,
    pub ready_command: Option<String>,
    pub ready_line: Option<String>,
    pub grace: Duration,
}

/// Everything an engine needs to know.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub dsn: Option<Secret>,
    pub state_dir: PathBuf,
    pub connect_timeout: Duration,
    pub lock_timeout: Duration,
    pub poll_interval: Duration,
    pub hold_check_interval: Duration,
    /// How long a prepared (not yet frozen) backup may wait for its freeze:
    /// the longest lease, `STILLPOINT_MAX_TTL`.
    pub prepared_expiry: Duration,
    pub fsfreeze_mounts: Vec<PathBuf>,
    pub pg: PgConfig,
    pub exec: ExecConfig,
    pub noop: NoopConfig,
}

/// The whole agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub member: String,
    pub engine: EngineKind,
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub tls: TlsFiles,
    /// Where the certificate comes from, when the controller issues it.
    pub certificates: Option<CertSource>,
    pub controller_identity: String,
    pub tls_reload_interval: Duration,
    pub handshake_timeout: Duration,
    pub max_ttl: Duration,
    pub freeze_timeout: Duration,
    pub thaw_timeout: Duration,
    pub prepare_timeout: Duration,
    pub flush_timeout: Duration,
    /// `STILLPOINT_VOLUMES` (empty: the server's own paths).
    pub volumes: Vec<PathBuf>,
    pub max_wait: Duration,
    pub shutdown_grace: Duration,
    pub log: String,
    pub log_format: LogFormat,
    pub engines: EngineConfig,
}

/// Every problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for problem in &self.0 {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Where configuration values come from (the process environment, or a map in tests).
pub trait Source {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy)]
pub struct Environment;

impl Source for Environment {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Source for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        BTreeMap::get(self, key).cloned()
    }
}

struct Reader<'a, S> {
    source: &'a S,
    errors: Vec<String>,
}

impl<S: Source> Reader<'_, S> {
    fn raw(&self, key: &str) -> Option<String> {
        self.source
            .get(key)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn string(&self, key: &str, default: &str) -> String {
        self.raw(key).unwrap_or_else(|| default.to_string())
    }

    fn parse<T>(&mut self, key: &str, default: T, parse: impl Fn(&str) -> Result<T, String>) -> T {
        match self.raw(key) {
            None => default,
            Some(text) => parse(&text).unwrap_or_else(|why| {
                self.errors.push(format!("{key}={text:?}: {why}"));
                default
            }),
        }
    }

    fn duration(&mut self, key: &str, default: Duration) -> Duration {
        self.parse(key, default, parse_duration)
    }

    fn positive_duration(&mut self, key: &str, default: Duration) -> Duration {
        self.parse(key, default, |text| match parse_duration(text)? {
            d if d.is_zero() => Err("must be greater than zero".into()),
            d => Ok(d),
        })
    }

    fn addr(&mut self, key: &str, default: &str) -> SocketAddr {
        let fallback = default.parse().expect("default addresses parse");
        self.parse(key, fallback, |text| {
            text.parse()
                .map_err(|_| "not an address of the form IP:PORT (e.g. 0.0.0.0:9443)".into())
        })
    }

    fn list(&self, key: &str, default: &str) -> Vec<String> {
        self.string(key, default)
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    fn file(&mut self, key: &str, default: &str) -> PathBuf {
        let path = PathBuf::from(self.string(key, default));
        if !path.is_file() {
            self.errors.push(format!(
                "{key}: file {} does not exist or is not a regular file",
                path.display()
            ));
        }
        path
    }
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigErrors> {
        Config::from_source(&Environment)
    }

    /// Reads the configuration, collecting every problem.
    pub fn from_source<S: Source>(source: &S) -> Result<Config, ConfigErrors> {
        let mut r = Reader {
            source,
            errors: Vec::new(),
        };
        let member = r
            .raw(ENV_MEMBER)
            .or_else(|| source.get("HOSTNAME"))
            .unwrap_or_else(|| "stillpoint-agent".to_string());
        let engine = r.engine();
        let listen_addr = r.addr(ENV_LISTEN_ADDR, DEFAULT_LISTEN_ADDR);
        let admin_addr = r.addr(ENV_ADMIN_ADDR, DEFAULT_ADMIN_ADDR);
        let certificates = r.raw(ENV_CERT_URL).map(|url| CertSource {
            url,
            token_file: PathBuf::from(r.string(ENV_TOKEN_FILE, DEFAULT_TOKEN_FILE)),
            ca_file: PathBuf::from(r.string(ENV_CERT_CA, DEFAULT_CERT_CA)),
        });
        let tls = r.tls(certificates.as_ref());
        let controller_identity = r.controller_identity();
        let tls_reload_interval =
            r.positive_duration(ENV_TLS_RELOAD_INTERVAL, DEFAULT_TLS_RELOAD_INTERVAL);
        let handshake_timeout =
            r.positive_duration(ENV_HANDSHAKE_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT);
        let max_ttl = r.positive_duration(ENV_MAX_TTL, DEFAULT_MAX_TTL);
        let freeze_timeout = r.positive_duration(ENV_FREEZE_TIMEOUT, DEFAULT_FREEZE_TIMEOUT);
        let thaw_timeout = r.positive_duration(ENV_THAW_TIMEOUT, DEFAULT_THAW_TIMEOUT);
        let prepare_timeout = r.positive_duration(ENV_PREPARE_TIMEOUT, DEFAULT_PREPARE_TIMEOUT);
        let flush_timeout = r.positive_duration(ENV_FLUSH_TIMEOUT, DEFAULT_FLUSH_TIMEOUT);
        let volumes = r.directories(ENV_VOLUMES);
        let max_wait = r.positive_duration(ENV_MAX_WAIT, DEFAULT_MAX_WAIT);
        let shutdown_grace = r.duration(ENV_SHUTDOWN_GRACE, DEFAULT_SHUTDOWN_GRACE);
        let dsn = r.dsn(engine);
        let state_dir = PathBuf::from(r.string(ENV_STATE_DIR, DEFAULT_STATE_DIR));
        let connect_timeout = r.positive_duration(ENV_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT);
        let lock_timeout = r.positive_duration(ENV_LOCK_TIMEOUT, DEFAULT_LOCK_TIMEOUT);
        let poll_interval = r.positive_duration(ENV_POLL_INTERVAL, DEFAULT_POLL_INTERVAL);
        let hold_check_interval =
            r.positive_duration(ENV_HOLD_CHECK_INTERVAL, DEFAULT_HOLD_CHECK_INTERVAL);
        let pg = r.pg();
        let fsfreeze_mounts = r.directories(ENV_FSFREEZE_MOUNTS);
        if engine == EngineKind::Fsfreeze && fsfreeze_mounts.is_empty() {
            r.errors.push(format!(
                "engine fsfreeze needs {ENV_FSFREEZE_MOUNTS} (comma-separated mount points)"
            ));
        }
        let exec = r.exec(engine);
        let log = r.string(ENV_LOG, DEFAULT_LOG);
        let log_format = r.parse(ENV_LOG_FORMAT, LogFormat::Text, |text| match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("must be 'text' or 'json'".into()),
        });
        let noop = r.noop();
        if !r.errors.is_empty() {
            return Err(ConfigErrors(r.errors));
        }
        Ok(Config {
            member,
            engine,
            listen_addr,
            admin_addr,
            tls,
            certificates,
            controller_identity,
            tls_reload_interval,
            handshake_timeout,
            max_ttl,
            freeze_timeout,
            thaw_timeout,
            prepare_timeout,
            flush_timeout,
            volumes,
            max_wait,
            shutdown_grace,
            log,
            log_format,
            engines: EngineConfig {
                dsn,
                state_dir,
                connect_timeout,
                lock_timeout,
                poll_interval,
                hold_check_interval,
                prepared_expiry: max_ttl,
                fsfreeze_mounts,
                pg,
                exec,
                noop,
            },
        })
    }
}

/// The parts of the configuration that are more than one key read alone.
impl<S: Source> Reader<'_, S> {
    fn engine(&mut self) -> EngineKind {
        match self.raw(ENV_ENGINE) {
            None => {
                self.errors.push(format!(
                    "{ENV_ENGINE} is required (one of: {})",
                    EngineKind::supported_names()
                ));
                EngineKind::Noop
            }
            Some(name) => name.parse().unwrap_or_else(|why: String| {
                self.errors.push(format!("{ENV_ENGINE}={name:?}: {why}"));
                EngineKind::Noop
            }),
        }
    }

    /// The TLS files: written by the agent itself from the controller's
    /// answer when it obtains its certificate, else existing files.
    fn tls(&mut self, certificates: Option<&CertSource>) -> TlsFiles {
        let Some(source) = certificates else {
            return TlsFiles {
                cert: self.file(ENV_TLS_CERT, DEFAULT_TLS_CERT),
                key: self.file(ENV_TLS_KEY, DEFAULT_TLS_KEY),
                ca: self.file(ENV_TLS_CA, DEFAULT_TLS_CA),
            };
        };
        if !source.url.starts_with("https://") {
            self.errors.push(format!(
                "{ENV_CERT_URL}={:?}: must be an https:// URL",
                source.url
            ));
        }
        for (key, file) in [
            (ENV_TOKEN_FILE, &source.token_file),
            (ENV_CERT_CA, &source.ca_file),
        ] {
            if !file.is_file() {
                self.errors.push(format!(
                    "{key}: file {} does not exist (with {ENV_CERT_URL} set)",
                    file.display()
                ));
            }
        }
        TlsFiles {
            cert: PathBuf::from(self.string(ENV_TLS_CERT, DEFAULT_TLS_CERT)),
            key: PathBuf::from(self.string(ENV_TLS_KEY, DEFAULT_TLS_KEY)),
            ca: PathBuf::from(self.string(ENV_TLS_CA, DEFAULT_TLS_CA)),
        }
    }

    fn controller_identity(&mut self) -> String {
        match self.raw(ENV_CONTROLLER_IDENTITY) {
            None => {
                self.errors.push(format!(
                    "{ENV_CONTROLLER_IDENTITY} is required: the URI SAN of the controller's \
                     certificate, e.g. spiffe://cluster.local/ns/stillpoint/sa/stillpoint-controller"
                ));
                String::new()
            }
            Some(id) => {
                if let Err(why) = validate_identity(&id) {
                    self.errors
                        .push(format!("{ENV_CONTROLLER_IDENTITY}: {why}"));
                }
                id
            }
        }
    }

    /// A comma-separated list of existing absolute directories.
    fn directories(&mut self, key: &str) -> Vec<PathBuf> {
        let dirs: Vec<PathBuf> = self.list(key, "").into_iter().map(PathBuf::from).collect();
        for dir in &dirs {
            if !dir.is_absolute() || !dir.is_dir() {
                self.errors.push(format!(
                    "{key}: {} is not an existing absolute directory",
                    dir.display()
                ));
            }
        }
        dirs
    }

    /// The connection string, from the variable or the file (one of them),
    /// where the engine needs one and can use it.
    fn dsn(&mut self, engine: EngineKind) -> Option<Secret> {
        let dsn = match (self.raw(ENV_DSN), self.raw(ENV_DSN_FILE)) {
            (Some(_), Some(_)) => {
                self.errors
                    .push(format!("set only one of {ENV_DSN} and {ENV_DSN_FILE}"));
                None
            }
            (Some(dsn), None) => Some(Secret::new(dsn)),
            (None, Some(path)) => self.dsn_file(&path),
            (None, None) => None,
        };
        if engine.needs_dsn() && dsn.is_none() {
            self.errors.push(format!(
                "engine {engine} needs a connection string: set {ENV_DSN_FILE} (or {ENV_DSN})"
            ));
        }
        if let Some(dsn) = &dsn
            && let Err(why) = engine.check_dsn(dsn.expose())
        {
            // The reason never repeats the DSN itself: it may hold a password.
            self.errors.push(format!(
                "{ENV_DSN}/{ENV_DSN_FILE}: not a usable {engine} connection string: {why}"
            ));
        }
        dsn
    }

    fn dsn_file(&mut self, path: &str) -> Option<Secret> {
        match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => Some(Secret::new(text.trim().to_string())),
            Ok(_) => {
                self.errors.push(format!("{ENV_DSN_FILE}: {path} is empty"));
                None
            }
            Err(e) => {
                self.errors
                    .push(format!("{ENV_DSN_FILE}: cannot read {path}: {e}"));
                None
            }
        }
    }

    fn pg(&mut self) -> PgConfig {
        PgConfig {
            mode: self.parse(ENV_PG_MODE, PgMode::Backup, |text| match text {
                "backup" => Ok(PgMode::Backup),
                "fence" => Ok(PgMode::Fence),
                _ => Err("must be 'backup' or 'fence'".into()),
            }),
            fence_databases: self.list(ENV_PG_FENCE_DATABASES, ""),
            fence_schemas: self.list(ENV_PG_FENCE_SCHEMAS, DEFAULT_PG_FENCE_SCHEMAS),
            wal_retain: self.duration(ENV_PG_WAL_RETAIN, DEFAULT_PG_WAL_RETAIN),
        }
    }

    fn exec(&mut self, engine: EngineKind) -> ExecConfig {
        let exec = ExecConfig {
            command: self.string(ENV_EXEC_COMMAND, ""),
            ready_command: self.raw(ENV_EXEC_READY_COMMAND),
            ready_line: self.raw(ENV_EXEC_READY_LINE),
            grace: self.duration(ENV_EXEC_GRACE, DEFAULT_EXEC_GRACE),
        };
        if engine == EngineKind::Exec && exec.command.is_empty() {
            self.errors.push(format!(
                "engine exec needs {ENV_EXEC_COMMAND} (the command that holds)"
            ));
        }
        exec
    }

    fn noop(&mut self) -> NoopConfig {
        NoopConfig {
            freeze_latency: self.duration(ENV_NOOP_FREEZE_LATENCY, Duration::ZERO),
            thaw_latency: self.duration(ENV_NOOP_THAW_LATENCY, Duration::ZERO),
            describe_latency: self.duration(ENV_NOOP_DESCRIBE_LATENCY, Duration::ZERO),
            replica: self.parse(ENV_NOOP_ROLE, false, |text| match text {
                "primary" => Ok(false),
                "replica" => Ok(true),
                _ => Err("must be 'primary' or 'replica'".into()),
            }),
            upstream: self.string(ENV_NOOP_UPSTREAM, ""),
        }
    }
}

pub use stillpoint_proto::duration::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    fn source(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let errors = Config::from_source(&source(&[
            (ENV_ENGINE, "oracle"),
            (ENV_LISTEN_ADDR, "nowhere"),
            (ENV_TLS_CERT, "/nonexistent/tls.crt"),
            (ENV_MAX_TTL, "0s"),
            (ENV_LOG_FORMAT, "xml"),
        ]))
        .unwrap_err();
        let text = errors.to_string();
        for needle in [
            ENV_ENGINE,
            ENV_LISTEN_ADDR,
            ENV_TLS_CERT,
            ENV_TLS_KEY,
            ENV_CONTROLLER_IDENTITY,
            ENV_MAX_TTL,
            ENV_LOG_FORMAT,
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }

    #[test]
    fn secrets_are_not_printed() {
        let secret = Secret::new("postgres://app:hunter2@db/app".into());
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
