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

/// What the kubelet would give a pod: the downward API's answers.
#[derive(Clone, Debug)]
pub struct PodFacts {
    pub node: String,
    pub pod_ip: String,
    pub namespace: String,
    pub pod_name: String,
}

/// The first container of a rendered workload (`kind`/`name` in `yaml`): its arguments and
/// environment, so a test can start the binary the way the pod would.
#[derive(Clone, Debug)]
pub struct RenderedContainer {
    pub args: Vec<String>,
    env: Vec<serde_json::Value>,
}

impl RenderedContainer {
    /// Finds the workload's pod template and reads its first container.
    pub fn from_rendered(yaml: &str, kind: &str, name: &str) -> Result<Self, String> {
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(yaml).map_err(|e| format!("rendered YAML: {e}"))?;
        let obj = docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .ok_or_else(|| format!("no {kind}/{name} in the rendered chart"))?;
        let c = &obj["spec"]["template"]["spec"]["containers"][0];
        let args = c["args"]
            .as_array()
            .ok_or_else(|| format!("{kind}/{name} has no args"))?
            .iter()
            .map(|a| a.as_str().unwrap_or_default().to_string())
            .collect();
        let env = c["env"].as_array().cloned().unwrap_or_default();
        Ok(RenderedContainer { args, env })
    }

    /// The arguments with each `(prefix, replacement)` applied to the one argument starting
    /// with `prefix` (what differs outside a pod: ports, host paths). A prefix that matches
    /// nothing is an error, so a changed chart cannot slip past.
    pub fn args_with(&self, replace: &[(&str, String)]) -> Result<Vec<String>, String> {
        let mut args = self.args.clone();
        for (prefix, with) in replace {
            let a = args
                .iter_mut()
                .find(|a| a.starts_with(prefix))
                .ok_or_else(|| format!("no argument {prefix}… in {:?}", self.args))?;
            *a = with.clone();
        }
        Ok(args)
    }

    /// The environment, with `fieldRef`s resolved from `pod` as the kubelet would. Sources the
    /// test cannot provide (Secrets, ConfigMaps, resources) are errors.
    pub fn env(&self, pod: &PodFacts) -> Result<Vec<(String, String)>, String> {
        let mut out = Vec::new();
        for e in &self.env {
            let name = e["name"].as_str().unwrap_or_default().to_string();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else {
                match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("spec.nodeName") => pod.node.clone(),
                    Some("status.podIP") => pod.pod_ip.clone(),
                    Some("metadata.namespace") => pod.namespace.clone(),
                    Some("metadata.name") => pod.pod_name.clone(),
                    _ => return Err(format!("env {name}: cannot resolve {e}")),
                }
            };
            out.push((name, value));
        }
        Ok(out)
    }
}
