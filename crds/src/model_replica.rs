//! `ModelReplica`: one placed copy of a LocalModel, bound to one node.
//!
//! The operator creates it (owned by its LocalModel) and writes its spec; the agent on
//! `spec.nodeName` watches the replicas bound to its node
//! (`--field-selector spec.nodeName=NODE`) and writes their status.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::local_model::{EngineSpec, ModelFormat};

/// The condition types a ModelReplica's `status.conditions` carries.
pub mod condition_type {
    /// The weights are in this node's cache and match their digest.
    pub const WEIGHTS_READY: &str = "WeightsReady";
    /// The model is loaded and this replica answers requests.
    pub const READY: &str = "Ready";
}

/// Desired state of one copy of a LocalModel on one node, written by the operator: what to
/// load, where, and with which settings.
// Each printcolumn(...) repeats keys such as `type_`, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "localmodel.dev",
    version = "v1alpha1",
    kind = "ModelReplica",
    namespaced,
    shortname = "mr",
    status = "ModelReplicaStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "One copy of a LocalModel placed on one node. Created and deleted by the operator (owned by its LocalModel); the node-agent of spec.nodeName pulls the weights, loads them and reports progress in the status. Users normally read these (kubectl get mr) rather than write them.",
    selectable = ".spec.nodeName",
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.model",
        description = "The LocalModel this replica belongs to."
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".spec.nodeName",
        description = "The node that runs this replica."
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Pulling, Loading, Ready, Failed or Terminating."
    ),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress.percent",
        description = "Download progress of the weights, e.g. 42%."
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        priority = 1,
        description = "host:port of the agent that serves this replica."
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.reason",
        priority = 1,
        description = "Why the replica is in its phase, e.g. ChecksumMismatch."
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelReplicaSpec {
    /// Name of the LocalModel (in the same namespace) this replica is a copy of.
    pub model: String,

    /// Where the weights come from, copied from the LocalModel's `spec.source`, e.g.
    /// `hf://org/repo/model.Q4_K_M.gguf`.
    pub source: String,

    /// SHA-256 the weights must have (64 lowercase hex characters): the LocalModel's pin, or the
    /// digest the operator resolved. Unset: whatever the source publishes is checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,

    /// Format of the weights: `gguf` or `safetensors`. Default: `gguf`.
    #[serde(default)]
    pub format: ModelFormat,

    /// In-situ quantization for `safetensors` weights, e.g. `Q4K`. Unset: as stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,

    /// The node that runs this replica. Set when the replica is created and never changed: to
    /// move a replica the operator deletes it and creates another.
    #[x_kube(validation = Rule::new("self == oldSelf").message("nodeName cannot be changed: delete this ModelReplica and create a new one on the other node"))]
    pub node_name: String,

    /// Memory, in bytes, the operator reserved for this replica on the node (accelerator memory
    /// on a GPU node, RAM on a CPU node). Unset: nothing reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_reservation_bytes: Option<i64>,

    /// Engine settings, copied from the LocalModel's `spec.engine`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineSpec>,

    /// The name clients use in the `model` field of their requests (the LocalModel's
    /// `spec.servedName`, or its name).
    pub served_name: String,
}

/// Observed state of a ModelReplica, written by the node-agent of `spec.nodeName`.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelReplicaStatus {
    /// Where the replica is: `Pending` (not picked up by the agent yet), `Pulling` (weights
    /// downloading), `Loading` (engine loading), `Ready` (answers requests), `Failed` (see
    /// reason and message), `Terminating` (unloading).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ReplicaPhase>,

    /// Download progress while the phase is `Pulling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<PullProgress>,

    /// Memory, in bytes, the loaded model actually uses on the node, measured after loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_footprint_bytes: Option<i64>,

    /// SHA-256 of the weights file in the node's cache (64 lowercase hex characters), once
    /// pulled and verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Memory, in bytes, the agent estimated this replica needs (weights + KV cache for the
    /// context length and sequences + overhead), read from the weights' header before loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_estimate_bytes: Option<i64>,
    /// `host:port` of the agent serving this replica, e.g. `10.0.3.7:8080`; set once Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// Why the replica is in its phase, one CamelCase word, e.g. `ChecksumMismatch`,
    /// `SourceNotFound`, `OutOfMemory`, `UnsupportedArchitecture`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,

    /// What happened, for people, e.g. `https://host/m.gguf answered 404 Not Found`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// Detailed state, one entry per type: `WeightsReady`, `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Where a ModelReplica is: `Pending` (not picked up by the node's agent yet), `Pulling`
/// (weights downloading), `Loading` (engine loading), `Ready` (answers requests), `Failed` (see
/// reason and message), `Terminating` (unloading).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ReplicaPhase {
    /// Created, not yet picked up by the node's agent.
    #[default]
    Pending,
    /// Weights are downloading into the node's cache.
    Pulling,
    /// The engine is loading the weights.
    Loading,
    /// The replica answers requests.
    Ready,
    /// The replica cannot run; `reason` and `message` say why.
    Failed,
    /// The replica is being unloaded.
    Terminating,
}

impl ReplicaPhase {
    /// The value as written in the status, e.g. `Ready`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaPhase::Pending => "Pending",
            ReplicaPhase::Pulling => "Pulling",
            ReplicaPhase::Loading => "Loading",
            ReplicaPhase::Ready => "Ready",
            ReplicaPhase::Failed => "Failed",
            ReplicaPhase::Terminating => "Terminating",
        }
    }
}

impl fmt::Display for ReplicaPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Download progress of a replica's weights.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PullProgress {
    /// Bytes downloaded so far.
    #[serde(default)]
    pub bytes: i64,

    /// Size of the download in bytes, when the source tells it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<i64>,

    /// Recent download rate in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<i64>,

    /// Estimated seconds until the download completes, from the total and the rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,

    /// `bytes` as a share of `total`, rounded down, e.g. `42%` (shown by `kubectl get mr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<String>,
}

impl PullProgress {
    /// Progress with `percent` and `eta_seconds` derived from the three measured values.
    pub fn new(bytes: i64, total: Option<i64>, bytes_per_second: Option<i64>) -> Self {
        let eta_seconds = match (total, bytes_per_second) {
            (Some(total), Some(rate)) if rate > 0 => {
                let left = total.saturating_sub(bytes).max(0);
                Some(left / rate + i64::from(left % rate != 0))
            }
            _ => None,
        };
        Self {
            bytes,
            total,
            bytes_per_second,
            eta_seconds,
            percent: total.and_then(|t| percent(bytes, t)),
        }
    }
}

/// `done` as a share of `total`, rounded down and clamped to 0..=100, e.g. `Some("42%")`;
/// `None` when `total` is not positive. `100%` only once `done >= total`.
pub fn percent(done: i64, total: i64) -> Option<String> {
    if total <= 0 {
        return None;
    }
    let done = i128::from(done.clamp(0, total));
    let pct = done * 100 / i128::from(total);
    Some(format!("{pct}%"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_rounds_down_and_clamps() {
        assert_eq!(percent(0, 100).as_deref(), Some("0%"));
        assert_eq!(percent(42, 100).as_deref(), Some("42%"));
        assert_eq!(percent(999, 1000).as_deref(), Some("99%"));
        assert_eq!(percent(1000, 1000).as_deref(), Some("100%"));
        assert_eq!(percent(2000, 1000).as_deref(), Some("100%"));
        assert_eq!(percent(-5, 1000).as_deref(), Some("0%"));
        assert_eq!(percent(5, 0), None);
        assert_eq!(percent(i64::MAX - 1, i64::MAX).as_deref(), Some("99%"));
    }

    #[test]
    fn pull_progress_derives_eta_and_percent() {
        let p = PullProgress::new(250, Some(1000), Some(100));
        assert_eq!(p.percent.as_deref(), Some("25%"));
        assert_eq!(p.eta_seconds, Some(8), "750 bytes at 100/s, rounded up");
        let unknown = PullProgress::new(250, None, Some(100));
        assert_eq!((unknown.percent, unknown.eta_seconds), (None, None));
        let stalled = PullProgress::new(250, Some(1000), Some(0));
        assert_eq!(stalled.eta_seconds, None);
    }

    #[test]
    fn status_serializes_minimally() {
        let status = ModelReplicaStatus {
            phase: Some(ReplicaPhase::Pulling),
            progress: Some(PullProgress::new(1, Some(4), None)),
            ..Default::default()
        };
        let json = serde_json::to_value(&status).expect("status serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "phase": "Pulling",
                "progress": {"bytes": 1, "total": 4, "percent": "25%"}
            })
        );
    }
}
