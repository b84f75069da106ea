//! A MongoDB wire-protocol peer (`tests/support/mongo_peer.py`, on
//! mockupdb): there is no mongod to be had here, so the MongoDB engine talks
//! to this scripted peer, which keeps the fsync lock count as mongod does and
//! logs every command it receives.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

use super::require;

#[derive(Debug)]
pub struct MongoPeer {
    child: Child,
    pub port: u16,
    log: PathBuf,
    optime_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl MongoPeer {
    /// Starts the peer with extra `mongo_peer.py` arguments.
    pub fn start(args: &[&str]) -> Result<Self> {
        let python = require(&["python3"], "python3")?;
        let check = Command::new(&python)
            .args(["-c", "import mockupdb, pymongo"])
            .stderr(Stdio::null())
            .status()?;
        if !check.success() {
            bail!(
                "the MongoDB peer needs mockupdb: `python3 -m pip install mockupdb pymongo` (.ci/run does this)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("stillpoint-mongo-")
            .tempdir()?;
        let log = dir.path().join("commands.jsonl");
        let optime_file = dir.path().join("optime.json");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("support/mongo_peer.py");
        let mut child = Command::new(python)
            .arg(script)
            .arg("--log")
            .arg(&log)
            .arg("--optime-file")
            .arg(&optime_file)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the MongoDB peer")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let port = line
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse().ok())
            .with_context(|| format!("the MongoDB peer did not report its port: {line:?}"))?;
        Ok(MongoPeer {
            child,
            port,
            log,
            optime_file,
            _dir: dir,
        })
    }

    pub fn url(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// Every command received so far (handshakes and hello excluded).
    pub fn commands(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The commands whose name is one of `names`, in order.
    pub fn commands_named(&self, names: &[&str]) -> Vec<serde_json::Value> {
        self.commands()
            .into_iter()
            .filter(|c| {
                c.as_object()
                    .and_then(|o| o.keys().next())
                    .is_some_and(|k| names.contains(&k.as_str()))
            })
            .collect()
    }

    /// Sets the optime the peer reports in `hello.lastWrite`.
    pub fn set_optime(&self, seconds: u32, increment: u32, term: i64) {
        std::fs::write(
            &self.optime_file,
            format!("[{seconds}, {increment}, {term}]"),
        )
        .unwrap();
    }
}

impl Drop for MongoPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
