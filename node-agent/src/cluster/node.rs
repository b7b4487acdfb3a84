//! The agent's own GPUNode (registration and status) and its heartbeat Lease.
//!
//! Both are written by server-side apply with the agent's field manager, so the agent owns
//! exactly the fields it sends, and a field it stops sending is removed.

use crds::conventions::{AGENT_MANAGER, NODE_LEASE_DURATION_SECONDS, node_lease_name};
use crds::gpu_node::{CacheStatus, GPUNode, GpuNodeStatus};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{Patch, PatchParams};

use super::inventory::{Charge, Snapshot};
use crate::cache::CacheUsage;

fn apply_params() -> PatchParams {
    PatchParams::apply(AGENT_MANAGER).force()
}

/// The GPUNode status for what the node has and runs now.
pub fn build_status(
    snapshot: &Snapshot,
    charges: &[&Charge],
    cache: Option<&CacheUsage>,
    mut loaded_replicas: Vec<String>,
    address: &str,
) -> GpuNodeStatus {
    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    loaded_replicas.sort();
    loaded_replicas.dedup();
    let mut status = GpuNodeStatus {
        cpu: Some(snapshot.cpu_info()),
        cache: cache.map(|u| CacheStatus {
            capacity_bytes: to_i64(u.capacity_bytes),
            used_bytes: to_i64(u.used_bytes),
            digests: u.digests.clone(),
        }),
        loaded_replicas,
        agent_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        address: Some(address.to_string()),
        ..Default::default()
    };
    status.set_gpus(snapshot.gpu_infos(charges));
    status
}

/// Creates (or takes over) the GPUNode named after the node, with `spec.nodeName`.
pub async fn register(api: &Api<GPUNode>, node: &str) -> Result<(), kube::Error> {
    let body = serde_json::json!({
        "apiVersion": crds::API_VERSION,
        "kind": "GPUNode",
        "metadata": { "name": node },
        "spec": { "nodeName": node },
    });
    api.patch(node, &apply_params(), &Patch::Apply(&body))
        .await?;
    Ok(())
}

/// Writes the GPUNode status, skipping writes that would not change it.
pub struct NodeReporter {
    api: Api<GPUNode>,
    node: String,
    last: Option<GpuNodeStatus>,
}

impl NodeReporter {
    pub fn new(api: Api<GPUNode>, node: &str) -> Self {
        Self {
            api,
            node: node.to_string(),
            last: None,
        }
    }

    /// Whether `status` differs from the status last written.
    pub fn changed(&self, status: &GpuNodeStatus) -> bool {
        self.last.as_ref() != Some(status)
    }

    /// Writes `status` when it changed. `Ok(true)`: written.
    pub async fn report(&mut self, status: GpuNodeStatus) -> Result<bool, kube::Error> {
        if !self.changed(&status) {
            return Ok(false);
        }
        let body = serde_json::json!({
            "apiVersion": crds::API_VERSION,
            "kind": "GPUNode",
            "metadata": { "name": self.node },
            "status": status,
        });
        self.api
            .patch_status(&self.node, &apply_params(), &Patch::Apply(&body))
            .await?;
        tracing::debug!(node = %self.node, "GPUNode status written");
        self.last = Some(status);
        Ok(true)
    }

    /// Forgets what was written, so the next report writes (after the object was recreated).
    pub fn forget(&mut self) {
        self.last = None;
    }
}

/// The server-side apply body of the node's heartbeat Lease.
pub fn lease_body(
    node: &str,
    namespace: &str,
    acquired: &MicroTime,
    now: &MicroTime,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": { "name": node_lease_name(node), "namespace": namespace },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": NODE_LEASE_DURATION_SECONDS,
            "acquireTime": acquired,
            "renewTime": now,
        },
    })
}

/// Renews (creating when missing) the heartbeat Lease.
pub async fn heartbeat(
    api: &Api<Lease>,
    node: &str,
    namespace: &str,
    acquired: &MicroTime,
) -> Result<(), kube::Error> {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let body = lease_body(node, namespace, acquired, &now);
    api.patch(
        &node_lease_name(node),
        &apply_params(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::inventory::{Device, Inventory, parse_fake_gpus};

    const GIB: u64 = 1024 * 1024 * 1024;

    #[test]
    fn status_reports_fake_gpus_cache_and_replicas() {
        let inv = Inventory::fake(
            "n1",
            parse_fake_gpus("NVIDIA L4=24GiB,NVIDIA L4=24GiB").expect("list"),
        );
        let snap = inv.snapshot();
        let loaded = Charge {
            device: Device::Gpu(1),
            bytes: 4 * GIB,
            loaded: true,
        };
        let usage = CacheUsage {
            used_bytes: 10,
            capacity_bytes: 100,
            digests: vec!["b".repeat(64)],
        };
        let s = build_status(
            &snap,
            &[&loaded],
            Some(&usage),
            vec!["ns/b".into(), "ns/a".into()],
            "10.0.0.7:8080",
        );
        assert_eq!(s.gpu_count, 2);
        assert_eq!(s.gpus[0].product, "NVIDIA L4");
        assert_eq!(s.gpus[1].memory_free_bytes, (20 * GIB) as i64);
        assert_eq!(
            s.loaded_replicas,
            vec!["ns/a".to_string(), "ns/b".to_string()]
        );
        assert_eq!(s.address.as_deref(), Some("10.0.0.7:8080"));
        assert_eq!(s.agent_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
        let cache = s.cache.clone().expect("cache");
        assert_eq!((cache.used_bytes, cache.capacity_bytes), (10, 100));
        assert_eq!(cache.digests, vec!["b".repeat(64)]);
        assert!(s.cpu.is_some());
        // Built again from the same facts: equal, so no write.
        let again = build_status(
            &snap,
            &[&loaded],
            Some(&usage),
            vec!["ns/a".into(), "ns/b".into()],
            "10.0.0.7:8080",
        );
        assert_eq!(s, again);
        // Unloading frees the memory: a change.
        let after = build_status(&snap, &[], Some(&usage), vec![], "10.0.0.7:8080");
        assert_ne!(s, after);
        assert_eq!(after.gpus[1].memory_free_bytes, (24 * GIB) as i64);
    }

    #[test]
    fn cpu_only_status_has_no_gpus() {
        let snap = Inventory::cpu_only("n1").snapshot();
        let s = build_status(&snap, &[], None, vec![], "10.0.0.7:8080");
        assert_eq!(s.gpu_count, 0);
        assert!(s.gpus.is_empty());
        let json = serde_json::to_value(&s).expect("serializes");
        assert!(json.get("gpus").is_none());
        assert_eq!(json["gpuCount"], 0);
        assert!(json["cpu"]["cores"].as_u64().unwrap_or(0) >= 1);
    }

    #[test]
    fn lease_body_names_the_holder() {
        let t = MicroTime(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).expect("time"));
        let b = lease_body("gpu-1", "localmodel-system", &t, &t);
        assert_eq!(b["metadata"]["name"], "localmodel-node-gpu-1");
        assert_eq!(b["metadata"]["namespace"], "localmodel-system");
        assert_eq!(b["spec"]["holderIdentity"], "gpu-1");
        assert_eq!(b["spec"]["leaseDurationSeconds"], 30);
        let renew = b["spec"]["renewTime"]
            .as_str()
            .expect("renewTime is a string");
        assert!(renew.starts_with("2023-11-14T22:13:20"), "{renew}");
    }
}
