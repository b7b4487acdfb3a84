//! The Service and EndpointSlices of a LocalModel, built as pure values.
//!
//! One selectorless Service per LocalModel (port 80) and one EndpointSlice per address family
//! and agent port, listing the addresses of the Ready replicas only.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crds::conventions::MODEL_LABEL;
use crds::local_model::LocalModel;
use crds::model_replica::{ModelReplica, ReplicaPhase};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// `endpointslice.kubernetes.io/managed-by` value on our slices.
pub const MANAGED_BY: &str = "operator.localmodel.dev";
/// Port of the Service.
pub const SERVICE_PORT: i32 = 80;
const PORT_NAME: &str = "http";

fn labels(lm: &LocalModel) -> BTreeMap<String, String> {
    let name = lm.metadata.name.clone().unwrap_or_default();
    BTreeMap::from([
        (MODEL_LABEL.to_string(), name),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "localmodel-operator".to_string(),
        ),
    ])
}

/// The in-cluster URL of the model's Service.
pub fn service_url(lm: &LocalModel) -> String {
    format!(
        "http://{}.{}.svc:{}",
        lm.metadata.name.as_deref().unwrap_or(""),
        lm.metadata.namespace.as_deref().unwrap_or("default"),
        SERVICE_PORT
    )
}

/// The selectorless Service for `lm`.
pub fn service(lm: &LocalModel, owner: OwnerReference) -> Service {
    Service {
        metadata: ObjectMeta {
            name: lm.metadata.name.clone(),
            namespace: lm.metadata.namespace.clone(),
            labels: Some(labels(lm)),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.into()),
                port: SERVICE_PORT,
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::String(PORT_NAME.into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The EndpointSlices for `lm`: Ready replicas with a parseable `status.endpoint`, grouped by
/// address family and port. Replicas that are not Ready are left out.
pub fn endpoint_slices(
    lm: &LocalModel,
    replicas: &[ModelReplica],
    owner: &OwnerReference,
) -> Vec<EndpointSlice> {
    let name = lm.metadata.name.clone().unwrap_or_default();
    let mut groups: BTreeMap<(&'static str, u16), Vec<Endpoint>> = BTreeMap::new();
    let mut ready: Vec<&ModelReplica> = replicas
        .iter()
        .filter(|r| r.status.as_ref().and_then(|s| s.phase) == Some(ReplicaPhase::Ready))
        .collect();
    ready.sort_by(|a, b| a.spec.node_name.cmp(&b.spec.node_name));
    for r in ready {
        let Some(addr) = r
            .status
            .as_ref()
            .and_then(|s| s.endpoint.as_deref())
            .and_then(|e| e.parse::<SocketAddr>().ok())
        else {
            tracing::warn!(replica = ?r.metadata.name, "Ready replica without a valid endpoint");
            continue;
        };
        let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
        groups
            .entry((family, addr.port()))
            .or_default()
            .push(Endpoint {
                addresses: vec![addr.ip().to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: Some(r.spec.node_name.clone()),
                ..Default::default()
            });
    }
    groups
        .into_iter()
        .map(|((family, port), endpoints)| {
            let mut l = labels(lm);
            l.insert("kubernetes.io/service-name".into(), name.clone());
            l.insert(
                "endpointslice.kubernetes.io/managed-by".into(),
                MANAGED_BY.into(),
            );
            EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(slice_name(&name, family, port)),
                    namespace: lm.metadata.namespace.clone(),
                    labels: Some(l),
                    owner_references: Some(vec![owner.clone()]),
                    ..Default::default()
                },
                address_type: family.into(),
                endpoints,
                ports: Some(vec![EndpointPort {
                    name: Some(PORT_NAME.into()),
                    port: Some(i32::from(port)),
                    protocol: Some("TCP".into()),
                    app_protocol: Some("http".into()),
                }]),
            }
        })
        .collect()
}

fn slice_name(model: &str, family: &str, port: u16) -> String {
    let suffix = if family == "IPv6" {
        format!("-v6-{port}")
    } else {
        format!("-{port}")
    };
    // Names are at most 253 characters; keep the suffix.
    let room = 253usize.saturating_sub(suffix.len());
    let base: String = model.chars().take(room).collect();
    format!("{base}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::local_model::LocalModelSpec;
    use crds::model_replica::{ModelReplicaSpec, ModelReplicaStatus};

    fn replica(node: &str, phase: ReplicaPhase, endpoint: &str) -> ModelReplica {
        ModelReplica {
            metadata: ObjectMeta {
                name: Some(format!("m-{node}")),
                ..Default::default()
            },
            spec: ModelReplicaSpec {
                node_name: node.into(),
                ..Default::default()
            },
            status: Some(ModelReplicaStatus {
                phase: Some(phase),
                endpoint: Some(endpoint.into()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn only_ready_replicas_get_endpoints_grouped_by_port() {
        let mut lm = LocalModel::new("m", LocalModelSpec::default());
        lm.metadata.namespace = Some("ns".into());
        let owner = OwnerReference::default();
        let rs = vec![
            replica("a", ReplicaPhase::Ready, "10.0.0.1:8080"),
            replica("b", ReplicaPhase::Pulling, "10.0.0.2:8080"),
            replica("c", ReplicaPhase::Ready, "10.0.0.3:8080"),
            replica("d", ReplicaPhase::Ready, "10.0.0.4:9000"),
            replica("e", ReplicaPhase::Ready, "[fd00::5]:8080"),
            replica("f", ReplicaPhase::Ready, "not an address"),
        ];
        let slices = endpoint_slices(&lm, &rs, &owner);
        let summary: Vec<(String, String, Vec<String>)> = slices
            .iter()
            .map(|s| {
                (
                    s.metadata.name.clone().unwrap_or_default(),
                    s.address_type.clone(),
                    s.endpoints.iter().map(|e| e.addresses[0].clone()).collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "m-8080".to_string(),
                    "IPv4".to_string(),
                    vec!["10.0.0.1".to_string(), "10.0.0.3".to_string()]
                ),
                (
                    "m-9000".to_string(),
                    "IPv4".to_string(),
                    vec!["10.0.0.4".to_string()]
                ),
                (
                    "m-v6-8080".to_string(),
                    "IPv6".to_string(),
                    vec!["fd00::5".to_string()]
                ),
            ]
        );
        let labels = slices[0].metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get("kubernetes.io/service-name").map(String::as_str),
            Some("m")
        );
        assert_eq!(service_url(&lm), "http://m.ns.svc:80");
        assert!(endpoint_slices(&lm, &rs[1..2], &owner).is_empty());
    }
}
