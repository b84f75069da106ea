//! A real Prometheus (built from its Go module by `tests/k8s/tools.sh`) on
//! a free loopback port, in a temp dir, killed on drop: scraping what a
//! test gives it, evaluating a rule file, answered through its HTTP API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A running Prometheus.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// One sample of an instant vector: its labels and value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// An alert as Prometheus's `/api/v1/alerts` reports it.
#[derive(Debug, Clone)]
pub struct Alert {
    pub labels: BTreeMap<String, String>,
    /// `pending` or `firing`.
    pub state: String,
}

impl Alert {
    pub fn name(&self) -> &str {
        self.labels.get("alertname").map_or("", String::as_str)
    }
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn labels_of(v: &serde_json::Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

impl Prometheus {
    /// Starts Prometheus with `scrape_configs` (YAML, the list under
    /// `scrape_configs:`) and the rule file `rules`, scraping and
    /// evaluating every second; returns once it is ready.
    pub fn start(scrape_configs: &str, rules: &str) -> Result<Prometheus> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("rules.yaml"), rules)?;
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s, scrape_timeout: 1s}}\n\
                 rule_files: [rules.yaml]\nscrape_configs:\n{scrape_configs}"
            ),
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let log = dir.path().join("prometheus.log");
        let child = Command::new(crate::chart::tool("prometheus")?)
            .current_dir(dir.path())
            .args([
                "--config.file=prometheus.yml",
                "--storage.tsdb.path=data",
                &format!("--web.listen-address={addr}"),
                "--log.level=warn",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting prometheus")?;
        let mut p = Prometheus {
            child,
            addr,
            log,
            _dir: dir,
        };
        let start = Instant::now();
        loop {
            if let Ok((status, _)) = stillpoint_lab::servers::http_get(p.addr, "/-/ready")
                && status.contains("200")
            {
                return Ok(p);
            }
            if let Some(exit) = p.child.try_wait()? {
                bail!("prometheus exited ({exit}):\n{}", p.log_text());
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("prometheus not ready in 30 s:\n{}", p.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What it logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Result<serde_json::Value> {
        let (status, body) = stillpoint_lab::servers::http_get(self.addr, path)?;
        let v: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("GET {path}: {status}: {body}"))?;
        if v["status"] != "success" {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(v["data"].clone())
    }

    /// An instant query at now.
    pub fn query(&self, expr: &str) -> Result<Vec<Sample>> {
        let data = self.get(&format!("/api/v1/query?query={}", encode(expr)))?;
        let mut out = Vec::new();
        for r in data["result"].as_array().into_iter().flatten() {
            let value = r["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN);
            out.push(Sample {
                labels: labels_of(&r["metric"]),
                value,
            });
        }
        Ok(out)
    }

    /// A range query (`matrix` result as Prometheus returns it), from
    /// `start` to `end` (Unix seconds) every `step` seconds.
    pub fn query_range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> Result<serde_json::Value> {
        let data = self.get(&format!(
            "/api/v1/query_range?query={}&start={start}&end={end}&step={step}",
            encode(expr)
        ))?;
        Ok(data["result"].clone())
    }

    /// The alerts pending or firing now.
    pub fn alerts(&self) -> Result<Vec<Alert>> {
        let data = self.get("/api/v1/alerts")?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| Alert {
                labels: labels_of(&a["labels"]),
                state: a["state"].as_str().unwrap_or_default().to_string(),
            })
            .collect())
    }

    /// Every scrape target with its health (`up`, `down`, `unknown`).
    pub fn targets(&self) -> Result<Vec<(BTreeMap<String, String>, String)>> {
        let data = self.get("/api/v1/targets")?;
        Ok(data["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    labels_of(&t["labels"]),
                    t["health"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
