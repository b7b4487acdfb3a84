//! Placement as pure functions: `(model, nodes, bound replicas) -> decisions`, no API server.
//!
//! A node can take a replica when its agent is heartbeating, the model's `nodeSelector` matches
//! the node's labels, the model tolerates the node's `NoSchedule`/`NoExecute` taints, a GPU of
//! the requested product is present (when asked), and free memory — minus what replicas already
//! bound there reserve — covers the model's estimate. Replicas of one model are spread across
//! nodes. Among fitting nodes, those that already cache the weights come first, then bin-pack
//! (least free memory left) or spread (most left).

use std::collections::{BTreeMap, BTreeSet};

/// A taint as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

/// A toleration of the model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Toleration {
    pub key: Option<String>,
    /// `Exists` or `Equal` (the default).
    pub operator: Option<String>,
    pub value: Option<String>,
    pub effect: Option<String>,
}

impl Toleration {
    fn tolerates(&self, t: &Taint) -> bool {
        if let Some(e) = &self.effect {
            if !e.is_empty() && *e != t.effect {
                return false;
            }
        }
        let exists = self.operator.as_deref() == Some("Exists");
        match &self.key {
            None => exists,
            Some(k) if k.is_empty() => exists,
            Some(k) if *k != t.key => false,
            Some(_) => exists || self.value == t.value,
        }
    }
}

/// One GPU of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    pub product: String,
    pub memory_free_bytes: u64,
}

/// What the operator knows of one node (from its GPUNode, Node and heartbeat Lease).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub gpus: Vec<Gpu>,
    /// Memory for CPU-only nodes (no GPU): the agent's free RAM.
    pub cpu_memory_free_bytes: u64,
    /// Whether the agent's Lease was renewed recently.
    pub heartbeating: bool,
    /// Digests in the node's weight cache.
    pub cached: BTreeSet<String>,
}

impl NodeView {
    /// Free memory on the device that would hold a replica: the largest GPU, else RAM.
    pub fn free_bytes(&self) -> u64 {
        self.gpus
            .iter()
            .map(|g| g.memory_free_bytes)
            .max()
            .unwrap_or(self.cpu_memory_free_bytes)
    }
}

/// A replica already bound to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundReplica {
    pub model: String,
    pub node: String,
    /// Memory reserved and not yet reflected in the node's free memory (still pulling or
    /// loading). Zero once loaded: the node's reported free memory already counts it.
    pub reserved_bytes: u64,
}

/// Bin-pack (fill nodes) or spread (emptiest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    #[default]
    BinPack,
    Spread,
}

/// What one model asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelRequest {
    pub name: String,
    /// Bytes the model needs (weights + KV cache + overhead, or the spec's override).
    pub memory_bytes: u64,
    pub digest: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    pub gpu_product: Option<String>,
    pub strategy: Strategy,
}

/// Why a node was passed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    NotHeartbeating,
    SelectorMismatch,
    Taint(String),
    NoMatchingGpu(String),
    InsufficientMemory { free: u64, needed: u64 },
    AlreadyHostsReplica,
}

/// A node chosen for one replica, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub node: String,
    pub cached: bool,
    pub free_after: u64,
}

impl Placement {
    /// A sentence for the Scheduled event.
    pub fn reason(&self, needed: u64) -> String {
        format!(
            "placed on {}: {}{} GiB free after reserving {} GiB",
            self.node,
            if self.cached {
                "weights already cached, "
            } else {
                ""
            },
            gib(self.free_after),
            gib(needed)
        )
    }
}

/// The result of trying to place `want` more replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub placements: Vec<Placement>,
    /// Set when fewer than asked could be placed: a human message.
    pub unschedulable: Option<String>,
}

fn gib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1u64 << 30) as f64)
}

/// Free memory of `node` once bound replicas' reservations are taken out.
pub fn available(node: &NodeView, bound: &[BoundReplica]) -> u64 {
    let reserved: u64 = bound
        .iter()
        .filter(|r| r.node == node.name)
        .map(|r| r.reserved_bytes)
        .sum();
    node.free_bytes().saturating_sub(reserved)
}

/// Checks one node against the model; `Ok(free memory left after placing)`.
pub fn fits(m: &ModelRequest, node: &NodeView, bound: &[BoundReplica]) -> Result<u64, Rejection> {
    if !node.heartbeating {
        return Err(Rejection::NotHeartbeating);
    }
    if m.node_selector
        .iter()
        .any(|(k, v)| node.labels.get(k) != Some(v))
    {
        return Err(Rejection::SelectorMismatch);
    }
    for t in &node.taints {
        if (t.effect == "NoSchedule" || t.effect == "NoExecute")
            && !m.tolerations.iter().any(|tol| tol.tolerates(t))
        {
            return Err(Rejection::Taint(t.key.clone()));
        }
    }
    if let Some(p) = &m.gpu_product {
        if !node.gpus.iter().any(|g| &g.product == p) {
            return Err(Rejection::NoMatchingGpu(p.clone()));
        }
    }
    if bound
        .iter()
        .any(|r| r.node == node.name && r.model == m.name)
    {
        return Err(Rejection::AlreadyHostsReplica);
    }
    let free = available(node, bound);
    if free < m.memory_bytes {
        return Err(Rejection::InsufficientMemory {
            free,
            needed: m.memory_bytes,
        });
    }
    Ok(free - m.memory_bytes)
}

/// Why `missing` of `want` replicas fit no node, in the manner of the Kubernetes scheduler:
/// nodes counted by the first reason each was passed over, then the memory needed and the most
/// free memory on any node that passed the other checks.
fn unschedulable_message(
    m: &ModelRequest,
    nodes: &[NodeView],
    bound: &[BoundReplica],
    missing: usize,
    want: usize,
) -> String {
    let live = nodes.iter().filter(|n| n.heartbeating).count();
    if live == 0 {
        return format!(
            "no node can take {} (no live node agents among {} GPUNodes)",
            m.name,
            nodes.len()
        );
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut most_free: Option<u64> = None;
    for n in nodes {
        let why = match fits(m, n, bound) {
            Ok(_) => continue,
            Err(Rejection::NotHeartbeating) => "agent not heartbeating".to_string(),
            Err(Rejection::SelectorMismatch) => "nodeSelector does not match".to_string(),
            Err(Rejection::Taint(t)) => format!("untolerated taint {t}"),
            Err(Rejection::NoMatchingGpu(p)) => format!("no {p} GPU"),
            Err(Rejection::AlreadyHostsReplica) => {
                "already hosts a replica of this model".to_string()
            }
            Err(Rejection::InsufficientMemory { free, .. }) => {
                most_free = Some(most_free.map_or(free, |f| f.max(free)));
                "not enough free memory".to_string()
            }
        };
        *counts.entry(why).or_insert(0) += 1;
    }
    let mut reasons: Vec<(String, usize)> = counts.into_iter().collect();
    reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let list: Vec<String> = reasons
        .iter()
        .map(|(why, n)| {
            format!(
                "{n} {why}",
                n = if *n == 1 {
                    "1 node:".to_string()
                } else {
                    format!("{n} nodes:")
                }
            )
        })
        .collect();
    let memory = match most_free {
        Some(free) => format!(
            "; {} GiB needed, the most free on any of {live} live nodes is {} GiB",
            gib(m.memory_bytes),
            gib(free)
        ),
        None => String::new(),
    };
    format!(
        "{missing} of {want} replicas fit no node ({} GPUNodes, {live} live): {}{memory}",
        nodes.len(),
        list.join(", ")
    )
}

/// Places `want` more replicas of `m`, one per node, updating reservations as it goes.
pub fn place(
    m: &ModelRequest,
    nodes: &[NodeView],
    bound: &[BoundReplica],
    want: usize,
) -> Decision {
    let mut bound = bound.to_vec();
    let mut placements = Vec::new();
    for _ in 0..want {
        let mut candidates: Vec<(bool, u64, &NodeView)> = nodes
            .iter()
            .filter_map(|n| {
                fits(m, n, &bound).ok().map(|left| {
                    let cached = m.digest.as_ref().is_some_and(|d| n.cached.contains(d));
                    (cached, left, n)
                })
            })
            .collect();
        candidates.sort_by(|a, b| {
            b.0.cmp(&a.0)
                .then_with(|| match m.strategy {
                    Strategy::BinPack => a.1.cmp(&b.1),
                    Strategy::Spread => b.1.cmp(&a.1),
                })
                .then_with(|| a.2.name.cmp(&b.2.name))
        });
        let Some((cached, left, node)) = candidates.first().copied() else {
            break;
        };
        bound.push(BoundReplica {
            model: m.name.clone(),
            node: node.name.clone(),
            reserved_bytes: m.memory_bytes,
        });
        placements.push(Placement {
            node: node.name.clone(),
            cached,
            free_after: left,
        });
    }
    let unschedulable = (placements.len() < want)
        .then(|| unschedulable_message(m, nodes, &bound, want - placements.len(), want));
    Decision {
        placements,
        unschedulable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(name: &str, free_gib: u64) -> NodeView {
        NodeView {
            name: name.into(),
            gpus: vec![Gpu {
                product: "NVIDIA-L4".into(),
                memory_free_bytes: free_gib * GIB,
            }],
            heartbeating: true,
            ..Default::default()
        }
    }

    fn model(gib_needed: u64) -> ModelRequest {
        ModelRequest {
            name: "m".into(),
            memory_bytes: gib_needed * GIB,
            digest: Some("d".into()),
            ..Default::default()
        }
    }

    fn names(d: &Decision) -> Vec<&str> {
        d.placements.iter().map(|p| p.node.as_str()).collect()
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            model: ModelRequest,
            nodes: Vec<NodeView>,
            bound: Vec<BoundReplica>,
            want: usize,
            expect: Vec<&'static str>,
            unschedulable: bool,
        }
        let cached = |mut n: NodeView| {
            n.cached.insert("d".into());
            n
        };
        let labelled = |mut n: NodeView| {
            n.labels.insert("pool".into(), "gpu".into());
            n
        };
        let tainted = |mut n: NodeView| {
            n.taints.push(Taint {
                key: "nvidia.com/gpu".into(),
                value: None,
                effect: "NoSchedule".into(),
            });
            n
        };
        let dead = |mut n: NodeView| {
            n.heartbeating = false;
            n
        };
        let cases = vec![
            Case {
                name: "bin-pack picks the tightest fit",
                model: model(4),
                nodes: vec![node("a", 20), node("b", 6), node("c", 10)],
                bound: vec![],
                want: 1,
                expect: vec!["b"],
                unschedulable: false,
            },
            Case {
                name: "spread picks the emptiest",
                model: ModelRequest {
                    strategy: Strategy::Spread,
                    ..model(4)
                },
                nodes: vec![node("a", 20), node("b", 6), node("c", 10)],
                bound: vec![],
                want: 1,
                expect: vec!["a"],
                unschedulable: false,
            },
            Case {
                name: "cached weights win over a tighter fit",
                model: model(4),
                nodes: vec![node("a", 6), cached(node("b", 20))],
                bound: vec![],
                want: 1,
                expect: vec!["b"],
                unschedulable: false,
            },
            Case {
                name: "replicas of one model go to different nodes",
                model: model(4),
                nodes: vec![node("a", 40), node("b", 40)],
                bound: vec![],
                want: 3,
                expect: vec!["a", "b"],
                unschedulable: true,
            },
            Case {
                name: "reservations of replicas still loading count",
                model: model(4),
                nodes: vec![node("a", 6), node("b", 9)],
                bound: vec![BoundReplica {
                    model: "other".into(),
                    node: "b".into(),
                    reserved_bytes: 7 * GIB,
                }],
                want: 1,
                expect: vec!["a"],
                unschedulable: false,
            },
            Case {
                name: "selector, taint and dead agents filter",
                model: ModelRequest {
                    node_selector: [("pool".to_string(), "gpu".to_string())].into(),
                    ..model(1)
                },
                nodes: vec![
                    node("a", 10),
                    tainted(labelled(node("b", 10))),
                    dead(labelled(node("c", 10))),
                    labelled(node("d", 2)),
                ],
                bound: vec![],
                want: 1,
                expect: vec!["d"],
                unschedulable: false,
            },
            Case {
                name: "a toleration admits the tainted node",
                model: ModelRequest {
                    tolerations: vec![Toleration {
                        key: Some("nvidia.com/gpu".into()),
                        operator: Some("Exists".into()),
                        ..Default::default()
                    }],
                    ..model(1)
                },
                nodes: vec![tainted(node("b", 10))],
                bound: vec![],
                want: 1,
                expect: vec!["b"],
                unschedulable: false,
            },
            Case {
                name: "GPU product is honoured",
                model: ModelRequest {
                    gpu_product: Some("NVIDIA-H100".into()),
                    ..model(1)
                },
                nodes: vec![node("a", 80), {
                    let mut n = node("h", 10);
                    n.gpus[0].product = "NVIDIA-H100".into();
                    n
                }],
                bound: vec![],
                want: 1,
                expect: vec!["h"],
                unschedulable: false,
            },
            Case {
                name: "fits nowhere",
                model: model(50),
                nodes: vec![node("a", 20), node("b", 40)],
                bound: vec![],
                want: 1,
                expect: vec![],
                unschedulable: true,
            },
        ];
        for c in cases {
            let d = place(&c.model, &c.nodes, &c.bound, c.want);
            assert_eq!(names(&d), c.expect, "{}", c.name);
            assert_eq!(
                d.unschedulable.is_some(),
                c.unschedulable,
                "{}: {:?}",
                c.name,
                d.unschedulable
            );
        }
    }

    #[test]
    fn fits_nowhere_names_the_largest_free_memory() {
        let d = place(&model(50), &[node("a", 20), node("b", 40)], &[], 1);
        let msg = d.unschedulable.expect("unschedulable");
        assert!(msg.contains("50.0 GiB needed"), "{msg}");
        assert!(msg.contains("40.0 GiB"), "{msg}");
        let none = place(&model(1), &[], &[], 1)
            .unschedulable
            .expect("no nodes");
        assert!(none.contains("no live node agents"), "{none}");
    }

    #[test]
    fn fits_nowhere_counts_the_reasons() {
        let mut tainted = node("t", 80);
        tainted.taints = vec![Taint {
            key: "node.kubernetes.io/not-ready".into(),
            value: None,
            effect: "NoSchedule".into(),
        }];
        let mut dead = node("d", 80);
        dead.heartbeating = false;
        let d = place(
            &model(50),
            &[tainted.clone(), tainted, dead, node("s", 10)],
            &[],
            1,
        );
        let msg = d.unschedulable.expect("unschedulable");
        assert_eq!(
            msg,
            "1 of 1 replicas fit no node (4 GPUNodes, 3 live): 2 nodes: untolerated taint node.kubernetes.io/not-ready, 1 node: agent not heartbeating, 1 node: not enough free memory; 50.0 GiB needed, the most free on any of 3 live nodes is 10.0 GiB"
        );
    }

    #[test]
    fn reason_reads_well() {
        let p = Placement {
            node: "a".into(),
            cached: true,
            free_after: 2 * GIB,
        };
        assert_eq!(
            p.reason(4 * GIB),
            "placed on a: weights already cached, 2.0 GiB free after reserving 4.0 GiB"
        );
    }
}
