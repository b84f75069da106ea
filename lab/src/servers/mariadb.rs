//! A real MariaDB primary with a GTID replica
//! (`CHANGE MASTER TO … MASTER_USE_GTID=slave_pos`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
pub use stillpoint_controller::local::servers::mariadb::*;

use crate::servers::{
    ServerProcess, Setup, command_as, free_port, require, run, service_user, wait_for,
};

/// Password of the `repl` user the replica connects as.
const REPL_PASSWORD: &str = "stillpoint-repl";

/// A primary and its replica.
pub type MariaPair = crate::servers::Pair<MariaServer>;

impl crate::servers::Pair<MariaServer> {
    /// Starts a primary and a replica and waits until replication runs.
    pub fn start() -> Result<Self> {
        Self::start_in(None)
    }

    /// Starts the pair under `base` (a btrfs mount makes each data
    /// directory a subvolume).
    pub fn start_in(base: Option<&Path>) -> Result<Self> {
        Self::start_with(&Setup {
            base,
            ..Setup::default()
        })
    }

    /// Starts the pair laid out and tuned as `setup` says.
    pub fn start_with(setup: &Setup<'_>) -> Result<Self> {
        let install = require(
            &["mariadb-install-db", "mysql_install_db"],
            "mariadb-server",
        )?;
        let user = service_user("mysql")?;
        let scratch = setup.scratch("mariadb")?;
        let root = scratch.path().to_path_buf();
        let run_dir = scratch.owned_dir("run", user.as_ref())?;
        let logs = scratch.owned_dir("log", user.as_ref())?;
        let server = |name: &'static str, server_id: u32| -> Result<MariaServer> {
            let log_bin = match setup.logs_apart {
                true => Some(
                    scratch
                        .owned_dir(&format!("{name}-binlog"), user.as_ref())?
                        .join("binlog"),
                ),
                false => None,
            };
            Ok(MariaServer {
                name,
                port: free_port(),
                data: scratch.data_dir(name, user.as_ref())?,
                socket: run_dir.join(format!("{name}.sock")),
                log: logs.join(format!("{name}.err")),
                server_id,
                log_bin,
                process: ServerProcess::default(),
            })
        };
        let primary = server("primary", 1)?;
        let replica = server("replica", 2)?;
        let pair = MariaPair::new(primary, replica, scratch);
        for s in [&pair.primary, &pair.replica] {
            let mut cmd = command_as(&install, user.as_ref(), &root);
            cmd.arg("--no-defaults")
                .arg(format!("--datadir={}", s.data.display()))
                .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
            run(&mut cmd, "mariadb-install-db")?;
        }
        let durability: &[&str] = if setup.relaxed {
            &["--innodb-flush-log-at-trx-commit=2", "--sync-binlog=0"]
        } else {
            &[]
        };
        for s in [&pair.primary, &pair.replica] {
            start_server(s, user.as_ref(), &root, durability)?;
            s.sql(
                "SET sql_log_bin = 0; \
                 CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'; \
                 GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;",
            )?;
        }
        pair.primary.sql(&format!(
            "SET sql_log_bin = 0; \
             CREATE USER 'repl'@'127.0.0.1' IDENTIFIED BY '{REPL_PASSWORD}'; \
             GRANT REPLICATION SLAVE ON *.* TO 'repl'@'127.0.0.1';"
        ))?;
        let pos = pair.primary.sql("SELECT @@gtid_binlog_pos")?;
        pair.replica.sql(&format!(
            "SET GLOBAL gtid_slave_pos = '{pos}'; \
             CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {}, \
               MASTER_USER = 'repl', MASTER_PASSWORD = '{REPL_PASSWORD}', \
               MASTER_USE_GTID = slave_pos, MASTER_CONNECT_RETRY = 1; \
             START SLAVE;",
            pair.primary.port
        ))?;
        wait_for("MariaDB replica running", Duration::from_secs(30), || {
            let status = pair.replica.slave_status()?;
            let running = |field: &str| status.get(field).is_some_and(|v| v == "Yes");
            Ok(running("Slave_IO_Running") && running("Slave_SQL_Running"))
        })
        .with_context(|| pair.replica.log_tail())?;
        Ok(pair)
    }
}
