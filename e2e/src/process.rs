//! Child processes of the control plane.
//!
//! Every child is the leader of its own process group (so a kill reaches anything it forks) and,
//! unless the control plane is kept for inspection, gets `PR_SET_PDEATHSIG(SIGKILL)`: the kernel
//! kills it when the thread that forked it dies. That signal is tied to the forking *thread*,
//! not the process, so children are forked from one spawner thread that lives as long as the
//! test process: a test thread that ends does not take the control plane with it, and a test
//! process that dies in any way (panic, `exit`, SIGKILL) takes every child with it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{Error, Result};

type Job = Box<dyn FnOnce() + Send>;

/// The long-lived thread that forks every child (see the module docs).
fn spawner() -> &'static mpsc::Sender<Job> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("e2e-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
                // The sender lives in a static, so this thread never ends before the process.
            })
            .expect("spawning the e2e spawner thread");
        tx
    })
}

/// One running control-plane process, logging to a file.
pub(crate) struct Proc {
    pub name: String,
    pub port: u16,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    /// Starts `bin args…` with stdout and stderr appended to `log`.
    pub(crate) fn spawn(
        name: &str,
        bin: &Path,
        args: &[String],
        log: &Path,
        port: u16,
        die_with_parent: bool,
    ) -> Result<Proc> {
        let child = spawn_logged(name, bin, args, &[], log, die_with_parent)?;
        Ok(Proc {
            name: name.to_string(),
            port,
            log: log.to_path_buf(),
            child,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The error for a process that exited while starting.
    pub(crate) fn died(&self, status: ExitStatus) -> Error {
        Error::Died {
            binary: self.name.clone(),
            port: self.port,
            status: status.to_string(),
            log: self.log.clone(),
            log_tail: log_tail(&self.log, 30),
        }
    }

    /// SIGTERM to the process group, then SIGKILL after `grace`; reaps the child.
    pub(crate) fn kill(&mut self, grace: Duration) {
        if self.exited().is_none() {
            let pgid = self.child.id() as libc::pid_t;
            // SAFETY: plain kill(2) on the child's own process group.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            let start = Instant::now();
            while start.elapsed() < grace {
                if self.exited().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // Always SIGKILL the group: it also reaches anything the leader left behind.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

/// Starts `bin args…` (with `env` added) as the leader of its own process group, stdout and
/// stderr appended to `log`, forked from the spawner thread. With `die_with_parent` it gets
/// `PR_SET_PDEATHSIG(SIGKILL)`.
pub(crate) fn spawn_logged(
    name: &str,
    bin: &Path,
    args: &[String],
    env: &[(&str, String)],
    log: &Path,
    die_with_parent: bool,
) -> Result<Child> {
    let open = || {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::io(format!("opening {}", log.display()), e))
    };
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(open()?)
        .stderr(open()?)
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if die_with_parent {
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
        let parent = unsafe { libc::getpid() };
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    let (tx, rx) = mpsc::channel();
    spawner()
        .send(Box::new(move || {
            let _ = tx.send(cmd.spawn());
        }))
        .map_err(|_| Error::Other("the e2e spawner thread is gone".into()))?;
    rx.recv()
        .map_err(|_| Error::Other("the e2e spawner thread is gone".into()))?
        .map_err(|e| Error::io(format!("starting {name} ({})", bin.display()), e))
}

/// The last `lines` lines of a log file (at most 64 KiB are read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        text = String::from_utf8_lossy(&buf).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    let tail = &all[all.len().saturating_sub(lines)..];
    if tail.is_empty() {
        "(empty log)".into()
    } else {
        tail.iter()
            .map(|l| format!("  | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Whether the log says the process could not bind its port.
pub(crate) fn log_says_port_taken(path: &Path) -> bool {
    let tail = log_tail(path, 200);
    tail.contains("address already in use")
}
