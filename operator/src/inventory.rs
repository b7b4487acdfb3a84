//! Turns API objects (GPUNode, Node, ModelReplica, LocalModel) into the plain values placement
//! works on.

use std::collections::{BTreeMap, BTreeSet};

use crds::gpu_node::GPUNode;
use crds::local_model::{LocalModel, PlacementStrategy};
use crds::model_replica::{ModelReplica, ReplicaPhase};
use k8s_openapi::api::core::v1::Node;

use crate::placement::{BoundReplica, Gpu, ModelRequest, NodeView, Strategy, Taint, Toleration};
use crate::replicas::parse_quantity;

/// A digest in one spelling: lowercase hex without an algorithm prefix.
pub fn normalize_digest(d: &str) -> String {
    d.trim()
        .strip_prefix("sha256:")
        .unwrap_or(d.trim())
        .to_ascii_lowercase()
}

/// `namespace/name` of a LocalModel: how placement tells models apart across namespaces.
pub fn model_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The node view of `gpu_node`, with labels and taints from its `Node` when there is one.
pub fn node_view(gpu_node: &GPUNode, node: Option<&Node>, heartbeating: bool) -> NodeView {
    let status = gpu_node.status.clone().unwrap_or_default();
    let name = if gpu_node.spec.node_name.is_empty() {
        gpu_node.metadata.name.clone().unwrap_or_default()
    } else {
        gpu_node.spec.node_name.clone()
    };
    let taints = node
        .and_then(|n| n.spec.as_ref())
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|t| Taint {
            key: t.key,
            value: t.value,
            effect: t.effect,
        })
        .collect();
    NodeView {
        name,
        labels: node
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default(),
        taints,
        gpus: status
            .gpus
            .iter()
            .map(|g| Gpu {
                product: g.product.clone(),
                memory_free_bytes: u64::try_from(g.memory_free_bytes).unwrap_or(0),
            })
            .collect(),
        cpu_memory_free_bytes: status
            .cpu
            .as_ref()
            .map(|c| u64::try_from(c.memory_free_bytes).unwrap_or(0))
            .unwrap_or(0),
        heartbeating,
        cached: status
            .cache
            .as_ref()
            .map(|c| c.digests.iter().map(|d| normalize_digest(d)).collect())
            .unwrap_or_default(),
    }
}

/// Memory one replica of `lm` needs, when known: the spec's `resources.gpuMemory`, else the
/// estimate an agent reported (in the model's status or in one of its replicas').
pub fn memory_need(lm: &LocalModel, replicas: &[&ModelReplica]) -> Option<u64> {
    if let Some(q) = lm
        .spec
        .resources
        .as_ref()
        .and_then(|r| r.gpu_memory.as_ref())
    {
        if let Some(b) = parse_quantity(&q.0) {
            return Some(b);
        }
    }
    replicas
        .iter()
        .filter_map(|r| r.status.as_ref().and_then(|s| s.memory_estimate_bytes))
        .max()
        .or_else(|| lm.status.as_ref().and_then(|s| s.memory_estimate_bytes))
        .and_then(|b| u64::try_from(b).ok())
}

/// The digest of `lm`'s weights, when known: the spec's pin, else what an agent reported.
pub fn digest(lm: &LocalModel, replicas: &[&ModelReplica]) -> Option<String> {
    lm.spec
        .sha256
        .as_deref()
        .map(normalize_digest)
        .or_else(|| {
            replicas
                .iter()
                .find_map(|r| r.status.as_ref().and_then(|s| s.digest.as_deref()))
                .map(normalize_digest)
        })
        .or_else(|| {
            lm.status
                .as_ref()
                .and_then(|s| s.digest.as_deref())
                .map(normalize_digest)
        })
}

/// What `lm` asks of placement.
pub fn model_request(lm: &LocalModel, memory_bytes: u64, digest: Option<String>) -> ModelRequest {
    ModelRequest {
        name: model_key(
            lm.metadata.namespace.as_deref().unwrap_or("default"),
            lm.metadata.name.as_deref().unwrap_or(""),
        ),
        memory_bytes,
        digest,
        node_selector: lm.spec.node_selector.clone().unwrap_or_default(),
        tolerations: lm
            .spec
            .tolerations
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|t| Toleration {
                key: t.key,
                operator: t.operator,
                value: t.value,
                effect: t.effect,
            })
            .collect(),
        gpu_product: lm
            .spec
            .resources
            .as_ref()
            .and_then(|r| r.gpu_product.clone()),
        strategy: match lm.spec.placement_strategy() {
            PlacementStrategy::BinPack => Strategy::BinPack,
            PlacementStrategy::Spread => Strategy::Spread,
        },
    }
}

/// `r` as a bound replica. Its reservation counts only while its node does not report it
/// loaded: once loaded, the node's free memory already reflects it.
pub fn bound_replica(
    r: &ModelReplica,
    loaded: &BTreeMap<String, BTreeSet<String>>,
) -> BoundReplica {
    let ns = r.metadata.namespace.as_deref().unwrap_or("default");
    let name = r.metadata.name.as_deref().unwrap_or("");
    let is_loaded = r.status.as_ref().and_then(|s| s.phase) == Some(ReplicaPhase::Ready)
        && loaded
            .get(&r.spec.node_name)
            .is_some_and(|set| set.contains(name) || set.contains(&format!("{ns}/{name}")));
    let reserved = if is_loaded {
        0
    } else {
        r.spec
            .memory_reservation_bytes
            .or_else(|| r.status.as_ref().and_then(|s| s.memory_estimate_bytes))
            .and_then(|b| u64::try_from(b).ok())
            .unwrap_or(0)
    };
    BoundReplica {
        model: model_key(ns, &r.spec.model),
        node: r.spec.node_name.clone(),
        reserved_bytes: reserved,
    }
}

/// Replicas each node reports loaded (from GPUNode `status.loadedReplicas`).
pub fn loaded_by_node<'a>(
    gpu_nodes: impl IntoIterator<Item = &'a GPUNode>,
) -> BTreeMap<String, BTreeSet<String>> {
    gpu_nodes
        .into_iter()
        .map(|g| {
            (
                g.spec.node_name.clone(),
                g.status
                    .as_ref()
                    .map(|s| s.loaded_replicas.iter().cloned().collect())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::gpu_node::{CacheStatus, GpuInfo, GpuNodeSpec, GpuNodeStatus};
    use crds::local_model::{LocalModelSpec, ModelResources};
    use crds::model_replica::{ModelReplicaSpec, ModelReplicaStatus};
    use k8s_openapi::api::core::v1::{NodeSpec, Taint as K8sTaint};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn gpu_node(name: &str) -> GPUNode {
        let mut g = GPUNode::new(
            name,
            GpuNodeSpec {
                node_name: name.into(),
            },
        );
        g.status = Some(GpuNodeStatus {
            gpus: vec![GpuInfo {
                index: 0,
                uuid: "u".into(),
                product: "NVIDIA L4".into(),
                memory_total_bytes: 24 << 30,
                memory_free_bytes: 20 << 30,
            }],
            cache: Some(CacheStatus {
                capacity_bytes: 1,
                used_bytes: 1,
                digests: vec!["sha256:ABCD".into()],
            }),
            loaded_replicas: vec!["default/m-a".into()],
            ..Default::default()
        });
        g
    }

    fn replica(
        name: &str,
        node: &str,
        phase: ReplicaPhase,
        reservation: Option<i64>,
    ) -> ModelReplica {
        let mut r = ModelReplica::new(
            name,
            ModelReplicaSpec {
                model: "m".into(),
                node_name: node.into(),
                memory_reservation_bytes: reservation,
                ..Default::default()
            },
        );
        r.metadata.namespace = Some("default".into());
        r.status = Some(ModelReplicaStatus {
            phase: Some(phase),
            memory_estimate_bytes: Some(7),
            ..Default::default()
        });
        r
    }

    #[test]
    fn node_view_takes_labels_and_taints_from_the_node() {
        let node = Node {
            metadata: ObjectMeta {
                labels: Some(BTreeMap::from([("zone".into(), "a".into())])),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: Some(vec![K8sTaint {
                    key: "gpu".into(),
                    value: Some("x".into()),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        };
        let v = node_view(&gpu_node("a"), Some(&node), true);
        assert_eq!(v.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(v.taints.len(), 1);
        assert_eq!(v.free_bytes(), 20 << 30);
        assert!(
            v.cached.contains("abcd"),
            "digests are normalised: {:?}",
            v.cached
        );
        let bare = node_view(&gpu_node("a"), None, false);
        assert!(bare.labels.is_empty() && bare.taints.is_empty() && !bare.heartbeating);
    }

    #[test]
    fn loaded_replicas_reserve_nothing_more() {
        let loaded = loaded_by_node([&gpu_node("a")]);
        let ready_loaded = bound_replica(
            &replica("m-a", "a", ReplicaPhase::Ready, Some(100)),
            &loaded,
        );
        assert_eq!(ready_loaded.reserved_bytes, 0);
        assert_eq!(ready_loaded.model, "default/m");
        let pulling = bound_replica(
            &replica("m-a", "a", ReplicaPhase::Pulling, Some(100)),
            &loaded,
        );
        assert_eq!(pulling.reserved_bytes, 100);
        let elsewhere = bound_replica(&replica("m-b", "b", ReplicaPhase::Ready, None), &loaded);
        assert_eq!(
            elsewhere.reserved_bytes, 7,
            "falls back to the agent's estimate"
        );
    }

    #[test]
    fn memory_need_prefers_the_spec_then_the_agents_estimate() {
        let mut lm = LocalModel::new("m", LocalModelSpec::default());
        assert_eq!(memory_need(&lm, &[]), None);
        let r = replica("m-a", "a", ReplicaPhase::Failed, None);
        assert_eq!(memory_need(&lm, &[&r]), Some(7));
        lm.spec.resources = Some(ModelResources {
            gpu_memory: Some(Quantity("2Gi".into())),
            ..Default::default()
        });
        assert_eq!(memory_need(&lm, &[&r]), Some(2 << 30));
    }

    #[test]
    fn digest_prefers_the_pin() {
        let mut lm = LocalModel::new("m", LocalModelSpec::default());
        let mut r = replica("m-a", "a", ReplicaPhase::Ready, None);
        r.status
            .as_mut()
            .map(|s| s.digest = Some("sha256:EE".into()));
        assert_eq!(digest(&lm, &[&r]).as_deref(), Some("ee"));
        lm.spec.sha256 = Some("FF".into());
        assert_eq!(digest(&lm, &[&r]).as_deref(), Some("ff"));
    }
}
