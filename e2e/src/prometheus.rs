//! A real Prometheus (Debian's package, found or unpacked by `e2e/prometheus/install.sh`)
//! started on a loopback port, scraping targets listed in a file it watches, so tests can add
//! targets (a restarted operator) while it runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::binaries::dir_printed_by;
use crate::daemon::Daemon;
use crate::{Error, Result};

/// Directory holding `prometheus` and `promtool` (see `e2e/prometheus/install.sh`).
pub fn prometheus_bin_dir() -> Result<PathBuf> {
    dir_printed_by(&Path::new(env!("CARGO_MANIFEST_DIR")).join("prometheus/install.sh"))
}

/// The Prometheus operator's CRD folder (see `e2e/prometheus/operator-crds.sh`).
pub fn prometheus_operator_crds_dir() -> Result<PathBuf> {
    dir_printed_by(&Path::new(env!("CARGO_MANIFEST_DIR")).join("prometheus/operator-crds.sh"))
}

/// One scrape target: `job` and extra labels (e.g. `node`) as a PodMonitor's relabelling
/// would add them in a cluster.
#[derive(Clone, Debug)]
pub struct Target {
    pub job: String,
    pub addr: SocketAddr,
    pub labels: BTreeMap<String, String>,
}

/// One sample of an instant query.
#[derive(Clone, Debug)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A running Prometheus.
pub struct Prometheus {
    addr: SocketAddr,
    targets_file: PathBuf,
    daemon: Daemon,
    http: reqwest::Client,
}

impl Prometheus {
    /// Starts Prometheus in `dir` (config, data and log), scraping and evaluating `rule_files`
    /// every second.
    pub fn start(dir: &Path, targets: &[Target], rule_files: &[PathBuf]) -> Result<Prometheus> {
        let bin = prometheus_bin_dir()?;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let targets_file = dir.join("targets.json");
        write_targets(&targets_file, targets)?;
        // JSON is YAML: the config needs no YAML writer.
        let config = json!({
            "global": { "scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s" },
            "rule_files": rule_files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "scrape_configs": [{
                "job_name": "localmodel",
                "file_sd_configs": [{ "files": [targets_file.display().to_string()], "refresh_interval": "1s" }],
            }],
        });
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config.to_string())
            .map_err(|e| Error::io(format!("writing {}", config_file.display()), e))?;
        // promtool checks the configuration and the rule files it names.
        let check = Command::new(bin.join("promtool"))
            .args(["check", "config"])
            .arg(&config_file)
            .output()
            .map_err(|e| Error::io("running promtool", e))?;
        if !check.status.success() {
            return Err(Error::Other(format!(
                "promtool check config: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            )));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| Error::io("finding a free port", e))?
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let args: Vec<String> = vec![
            format!("--config.file={}", config_file.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={addr}"),
            "--web.console.templates=/nonexistent".into(),
            "--web.console.libraries=/nonexistent".into(),
            "--log.level=warn".into(),
        ];
        let daemon = Daemon::spawn(
            "prometheus",
            &bin.join("prometheus"),
            &args,
            &[],
            &dir.join("prometheus.log"),
        )?;
        Ok(Prometheus {
            addr,
            targets_file,
            daemon,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| Error::Other(format!("building an HTTP client: {e}")))?,
        })
    }

    /// Waits until `/-/ready` answers 200; fails at once, with its log, if Prometheus exited.
    pub async fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + within;
        let url = format!("http://{}/-/ready", self.addr);
        let mut last: String;
        loop {
            if let Some(status) = self.daemon.exited() {
                return Err(Error::Other(format!(
                    "prometheus exited with {status} while starting:\n{}",
                    self.daemon.log_tail(20)
                )));
            }
            match self.http.get(&url).send().await {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => last = format!("{url} answered {}", r.status()),
                Err(e) => last = format!("{url}: {e}"),
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "Prometheus to be ready".into(),
                    waited: within,
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.daemon.log_tail(lines)
    }

    /// Replaces the scrape targets (Prometheus rereads the file within a second or two).
    pub fn set_targets(&self, targets: &[Target]) -> Result<()> {
        write_targets(&self.targets_file, targets)
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        let url = format!("http://{}{path}", self.addr);
        let resp = self
            .http
            .get(&url)
            .query(query)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let body: Value = resp.json().await.map_err(|e| format!("{url}: {e}"))?;
        if !status.is_success() || body["status"] != "success" {
            return Err(format!("{url} answered {status}: {body}"));
        }
        Ok(body["data"].clone())
    }

    /// Evaluates `expr` now (an instant query). Errors carry Prometheus' message.
    pub async fn query(&self, expr: &str) -> Result<Vec<Sample>, String> {
        let data = self.get("/api/v1/query", &[("query", expr)]).await?;
        let mut out = Vec::new();
        match data["resultType"].as_str() {
            Some("vector") => {
                for r in data["result"].as_array().into_iter().flatten() {
                    out.push(Sample {
                        labels: r["metric"]
                            .as_object()
                            .map(|m| {
                                m.iter()
                                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        value: parse_value(&r["value"][1]),
                    });
                }
            }
            Some("scalar") => out.push(Sample {
                labels: BTreeMap::new(),
                value: parse_value(&data["result"][1]),
            }),
            other => return Err(format!("unexpected result type {other:?} for {expr}")),
        }
        Ok(out)
    }

    /// Values of `label` on the series matching `selector` (what Grafana's `label_values` does).
    pub async fn label_values(&self, label: &str, selector: &str) -> Result<Vec<String>, String> {
        let data = self
            .get(
                &format!("/api/v1/label/{label}/values"),
                &[("match[]", selector)],
            )
            .await?;
        Ok(data
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect())
    }

    /// Every loaded rule: `(name, health, last error)` (health is `unknown` until evaluated).
    pub async fn rules(&self) -> Result<Vec<(String, String, String)>, String> {
        let data = self.get("/api/v1/rules", &[]).await?;
        Ok(data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or("").to_string(),
                    r["health"].as_str().unwrap_or("").to_string(),
                    r["lastError"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect())
    }

    /// Alerts pending or firing now: `(labels, state)`.
    pub async fn alerts(&self) -> Result<Vec<(BTreeMap<String, String>, String)>, String> {
        let data = self.get("/api/v1/alerts", &[]).await?;
        Ok(data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                let labels = a["labels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                (labels, a["state"].as_str().unwrap_or("").to_string())
            })
            .collect())
    }

    /// The health of every active target: `(scrape URL, health, last error)`.
    pub async fn targets(&self) -> Result<Vec<(String, String, String)>, String> {
        let data = self.get("/api/v1/targets", &[("state", "active")]).await?;
        Ok(data["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    t["scrapeUrl"].as_str().unwrap_or("").to_string(),
                    t["health"].as_str().unwrap_or("").to_string(),
                    t["lastError"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect())
    }
}

fn parse_value(v: &Value) -> f64 {
    v.as_str()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

fn write_targets(file: &Path, targets: &[Target]) -> Result<()> {
    let groups: Vec<Value> = targets
        .iter()
        .map(|t| {
            let mut labels = t.labels.clone();
            labels.insert("job".into(), t.job.clone());
            json!({ "targets": [t.addr.to_string()], "labels": labels })
        })
        .collect();
    // Written aside and renamed: Prometheus never reads half a file.
    let tmp = file.with_extension("json.tmp");
    std::fs::write(&tmp, Value::Array(groups).to_string())
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, file).map_err(|e| Error::io(format!("renaming to {}", file.display()), e))
}
