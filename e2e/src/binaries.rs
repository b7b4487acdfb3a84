//! Finding the control-plane binaries: `LOCALMODEL_CONTROLPLANE_BIN`, else the directory that
//! `e2e/controlplane/build.sh` prints (it builds them once and then reuses its cache).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::{Error, Result};

/// Paths of the control-plane binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub dir: PathBuf,
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
    /// `helm`, when the directory has one.
    pub helm: Option<PathBuf>,
}

impl Binaries {
    /// The binaries in `dir`; `kube-apiserver` and `etcd` must be there.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Result<Binaries> {
        let dir = dir.into();
        let need = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::Binaries(format!("{} does not exist", p.display())))
            }
        };
        let helm = dir.join("helm");
        Ok(Binaries {
            kube_apiserver: need("kube-apiserver")?,
            etcd: need("etcd")?,
            helm: helm.is_file().then_some(helm),
            dir,
        })
    }
}

/// The binaries every control plane of this process uses (looked up once).
pub fn find_binaries() -> Result<Binaries> {
    static FOUND: OnceLock<std::result::Result<Binaries, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| locate().map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::Binaries)
}

fn locate() -> Result<Binaries> {
    if let Some(dir) = std::env::var_os("LOCALMODEL_CONTROLPLANE_BIN").filter(|d| !d.is_empty()) {
        return Binaries::in_dir(PathBuf::from(dir))
            .map_err(|e| Error::Binaries(format!("LOCALMODEL_CONTROLPLANE_BIN: {e}")));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("controlplane/build.sh");
    eprintln!(
        "e2e: LOCALMODEL_CONTROLPLANE_BIN unset; running {} (first run builds kube-apiserver, etcd and helm: minutes)",
        script.display()
    );
    let dir = dir_printed_by(&script)?;
    Binaries::in_dir(dir)
}

/// Runs `bash SCRIPT` (stderr shown as it goes) and returns the directory it prints as its last
/// non-empty stdout line: how the harness's setup scripts (`controlplane/build.sh`,
/// `prometheus/install.sh`, `prometheus/operator-crds.sh`) hand over what they made.
pub fn dir_printed_by(script: &Path) -> Result<PathBuf> {
    let out = Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Error::io(format!("running {}", script.display()), e))?;
    if !out.status.success() {
        return Err(Error::Binaries(format!(
            "{} failed with {} (its output is above)",
            script.display(),
            out.status
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| Error::Binaries(format!("{} printed no directory", script.display())))?;
    Ok(PathBuf::from(dir.trim()))
}
