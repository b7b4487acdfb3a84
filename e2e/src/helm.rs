//! `helm` from the control-plane build, for tests that render or lint the chart without a
//! cluster (those that need one use [`ControlPlane::helm`](crate::ControlPlane::helm)).

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use crate::{Error, Result, find_binaries, workspace_root};

/// The chart's folder.
pub fn chart_dir() -> PathBuf {
    workspace_root().join("charts/localmodel")
}

/// Runs `helm ARGS` with its own empty cache and config folders (nothing from the user's).
pub fn helm<I, S>(args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let bins = find_binaries()?;
    let helm = bins
        .helm
        .ok_or_else(|| Error::Binaries(format!("no helm in {}", bins.dir.display())))?;
    let home = std::env::temp_dir().join(format!("localmodel-helm-{}", std::process::id()));
    Command::new(&helm)
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("running {}", helm.display()), e))
}

/// `helm template RELEASE charts/localmodel --namespace NAMESPACE EXTRA…`: the rendered
/// manifests, or helm's error output.
pub fn render(release: &str, namespace: &str, extra: &[&str]) -> Result<String, String> {
    let chart = chart_dir();
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("template"),
        OsStr::new(release),
        chart.as_os_str(),
        OsStr::new("--namespace"),
        OsStr::new(namespace),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let out = helm(&args).map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "helm template exited {}:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The chart's ServiceAccounts, RBAC and agent admission policy as `helm install localmodel`
/// creates them in `namespace` (ServiceAccounts `localmodel-operator` and `localmodel-agent`).
pub fn render_rbac(namespace: &str) -> Result<String, String> {
    render(
        "localmodel",
        namespace,
        &[
            "--show-only",
            "templates/operator-rbac.yaml",
            "--show-only",
            "templates/agent-rbac.yaml",
            "--show-only",
            "templates/agent-node-restriction.yaml",
        ],
    )
}
