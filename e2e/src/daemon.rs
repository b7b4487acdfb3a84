//! Long-running processes of a test (operator, node-agents), started like the control plane's:
//! own process group, killed with the test process, output appended to a log file.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use crate::process::{log_tail, spawn_logged};
use crate::{Error, Result};

/// A process started by a test.
pub struct Daemon {
    name: String,
    log: PathBuf,
    child: Child,
}

impl Daemon {
    /// Starts `bin args…` with `env` added, output appended to `log`.
    pub fn spawn(
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(&str, String)],
        log: &Path,
    ) -> Result<Daemon> {
        let child = spawn_logged(name, bin, args, env, log, true)?;
        Ok(Daemon {
            name: name.to_string(),
            log: log.to_path_buf(),
            child,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of its log, indented.
    pub fn log_tail(&self, lines: usize) -> String {
        format!(
            "--- {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            log_tail(&self.log, lines)
        )
    }

    /// The exit status, if it exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL, no grace: what a crash or a lost node looks like.
    pub fn kill_hard(&mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on the child's own process group.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit status if it exited by itself.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.exited() {
            return Some(s);
        }
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on the child's own process group.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Some(s) = self.exited() {
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill_hard();
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.kill_hard();
        }
    }
}

/// A binary built next to the running test executable (`target/<profile>/NAME`), e.g. the
/// `operator` and `node-agent` that `cargo test --workspace` builds.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| Error::io("locating the test executable", e))?;
    // target/<profile>/deps/<test>-<hash>, or target/<profile>/<bin> for a binary.
    let mut dir = exe
        .parent()
        .ok_or_else(|| Error::Other(format!("unexpected executable path {}", exe.display())))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().ok_or_else(|| {
            Error::Other(format!("unexpected test executable path {}", exe.display()))
        })?;
    }
    let bin = dir.join(name);
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(Error::Other(format!(
            "{} not found: build it with `cargo test --workspace` (or `cargo build --workspace`)",
            bin.display()
        )))
    }
}
