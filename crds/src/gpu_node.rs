//! `GPUNode`: what one node-agent reports about its node (cluster-scoped, named after the node).
//!
//! Only the agent of that node writes it; the operator reads it to place replicas.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Identity of the node a GPUNode describes.
// Each printcolumn(...) repeats keys such as `type_`, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "localmodel.dev",
    version = "v1alpha1",
    kind = "GPUNode",
    plural = "gpunodes",
    shortname = "gn",
    status = "GpuNodeStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "What the LocalModel node-agent of one node reports: its GPUs and their memory, its weights cache, the model replicas it has loaded, and where to reach it. Named after the Kubernetes node; written only by that node's agent.",
    printcolumn(
        name = "GPUs",
        type_ = "integer",
        json_path = ".status.gpuCount",
        description = "Number of GPUs on the node (0: CPU only)."
    ),
    printcolumn(
        name = "Address",
        type_ = "string",
        json_path = ".status.address",
        description = "host:port of the node's agent."
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Product",
        type_ = "string",
        json_path = ".status.gpus[0].product",
        priority = 1,
        description = "Product name of the node's first GPU."
    ),
    printcolumn(
        name = "Agent",
        type_ = "string",
        json_path = ".status.agentVersion",
        priority = 1,
        description = "Version of the node-agent."
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GpuNodeSpec {
    /// Name of the Kubernetes Node this agent runs on; the same as this object's name.
    pub node_name: String,
}

/// What the node's agent last observed.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuNodeStatus {
    /// The node's GPUs, in device index order. Empty on a CPU-only node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuInfo>,

    /// Number of GPUs, the length of `gpus` (shown by `kubectl get gpunodes`).
    #[serde(default)]
    pub gpu_count: i32,

    /// The node's CPU and RAM, used when a replica runs on the CPU (no GPU, or `gpuCount: 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuInfo>,

    /// The node-local cache of model weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheStatus>,

    /// ModelReplicas loaded on this node, as `NAMESPACE/NAME`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loaded_replicas: Vec<String>,

    /// Version of the node-agent, e.g. `0.1.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,

    /// `host:port` where the agent serves the models, e.g. `10.0.3.7:8080`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

impl GpuNodeStatus {
    /// Sets `gpus` and keeps `gpuCount` in step with it.
    pub fn set_gpus(&mut self, gpus: Vec<GpuInfo>) {
        self.gpu_count = i32::try_from(gpus.len()).unwrap_or(i32::MAX);
        self.gpus = gpus;
    }
}

/// One GPU of a node.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GpuInfo {
    /// Device index on the node (as in `nvidia-smi` and `CUDA_VISIBLE_DEVICES`), from 0.
    #[schemars(transform = crate::unsigned)]
    pub index: u32,
    /// The GPU's unique id, e.g. `GPU-8c9e1f7a-…`.
    pub uuid: String,
    /// Product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub product: String,
    /// Total device memory in bytes.
    pub memory_total_bytes: i64,
    /// Device memory free when last measured, in bytes.
    pub memory_free_bytes: i64,
}

/// CPU and RAM of a node.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CpuInfo {
    /// Number of CPU cores the agent may use.
    #[schemars(transform = crate::unsigned)]
    pub cores: u32,
    /// Total RAM in bytes.
    pub memory_total_bytes: i64,
    /// RAM available when last measured, in bytes.
    pub memory_free_bytes: i64,
}

/// The node-local cache of model weights.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CacheStatus {
    /// Most bytes the cache may hold; the least recently used unpinned weights are evicted to
    /// make room.
    pub capacity_bytes: i64,
    /// Bytes the cache holds now.
    pub used_bytes: i64,
    /// SHA-256 digests (64 lowercase hex characters) of the weight files in the cache; the
    /// operator prefers nodes that already hold a model's weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub digests: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_gpus_keeps_the_count() {
        let mut s = GpuNodeStatus::default();
        s.set_gpus(vec![GpuInfo::default(), GpuInfo::default()]);
        assert_eq!(s.gpu_count, 2);
        assert_eq!(s.gpus.len(), 2);
    }
}
