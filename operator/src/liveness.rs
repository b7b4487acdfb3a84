//! Which node agents are alive, judged from their heartbeat Leases.
//!
//! Like the kube-controller-manager's node lifecycle controller, a Lease is judged by when this
//! process last saw it change, on its own monotonic clock, never by comparing `renewTime` with
//! the local wall clock: clock skew between nodes cannot make a healthy agent look dead. A
//! freshly started operator therefore gives every agent one full lease duration to show a
//! renewal.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crds::conventions::NODE_LEASE_DURATION_SECONDS;
use k8s_openapi::api::coordination::v1::Lease;

/// The node a heartbeat Lease belongs to: its holder, else the part of the name after the
/// `localmodel-node-` prefix. `None` for Leases that are not agent heartbeats.
pub fn lease_node(lease: &Lease) -> Option<String> {
    let name = lease.metadata.name.as_deref()?;
    let from_name = name.strip_prefix("localmodel-node-")?;
    let holder = lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty());
    Some(holder.unwrap_or_else(|| from_name.to_string()))
}

#[derive(Debug, Clone, PartialEq)]
struct Seen {
    renew: Option<String>,
    duration: Duration,
    changed_at: Instant,
}

/// Heartbeats seen so far.
#[derive(Debug, Default)]
pub struct Liveness {
    seen: HashMap<String, Seen>,
}

impl Liveness {
    /// Records the current set of heartbeat Leases, as seen at `now`. Nodes whose Lease is gone
    /// are forgotten.
    pub fn observe<'a>(&mut self, leases: impl IntoIterator<Item = &'a Lease>, now: Instant) {
        let mut present = BTreeSet::new();
        for lease in leases {
            let Some(node) = lease_node(lease) else {
                continue;
            };
            let spec = lease.spec.clone().unwrap_or_default();
            let renew = spec.renew_time.map(|t| t.0.to_string());
            let secs = spec
                .lease_duration_seconds
                .unwrap_or(NODE_LEASE_DURATION_SECONDS)
                .max(1);
            let duration = Duration::from_secs(u64::try_from(secs).unwrap_or(1));
            present.insert(node.clone());
            match self.seen.get_mut(&node) {
                Some(s) if s.renew == renew => s.duration = duration,
                _ => {
                    self.seen.insert(
                        node,
                        Seen {
                            renew,
                            duration,
                            changed_at: now,
                        },
                    );
                }
            }
        }
        self.seen.retain(|n, _| present.contains(n));
    }

    /// Whether `node`'s agent renewed its Lease within the Lease's duration before `now`.
    pub fn alive(&self, node: &str, now: Instant) -> bool {
        self.seen
            .get(node)
            .is_some_and(|s| now.saturating_duration_since(s.changed_at) < s.duration)
    }

    /// The nodes alive at `now`.
    pub fn alive_set(&self, now: Instant) -> BTreeSet<String> {
        self.seen
            .keys()
            .filter(|n| self.alive(n, now))
            .cloned()
            .collect()
    }

    /// When the next node would expire if nothing changes (to re-check then).
    pub fn next_expiry(&self, now: Instant) -> Option<Duration> {
        self.seen
            .values()
            .map(|s| (s.changed_at + s.duration).saturating_duration_since(now))
            .filter(|d| !d.is_zero())
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

    fn lease(node: &str, renew_secs: i64, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(format!("localmodel-node-{node}")),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.into()),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(
                    k8s_openapi::jiff::Timestamp::from_second(renew_secs).expect("valid"),
                )),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn other_leases_are_not_heartbeats() {
        let mut l = lease("a", 1, 30);
        l.metadata.name = Some("localmodel-operator".into());
        assert_eq!(lease_node(&l), None);
        assert_eq!(lease_node(&lease("gpu-1", 1, 30)).as_deref(), Some("gpu-1"));
    }

    #[test]
    fn a_node_dies_when_its_lease_stops_changing() {
        let t0 = Instant::now();
        let mut live = Liveness::default();
        live.observe([&lease("a", 100, 30), &lease("b", 100, 30)], t0);
        assert!(live.alive("a", t0 + Duration::from_secs(29)));
        // b renews at t0+20, a does not.
        live.observe(
            [&lease("a", 100, 30), &lease("b", 120, 30)],
            t0 + Duration::from_secs(20),
        );
        let t = t0 + Duration::from_secs(31);
        assert!(!live.alive("a", t), "a stopped renewing 31 s ago");
        assert!(live.alive("b", t), "b renewed 11 s ago");
        assert_eq!(live.alive_set(t), BTreeSet::from(["b".to_string()]));
        assert_eq!(live.next_expiry(t), Some(Duration::from_secs(19)));
    }

    #[test]
    fn a_renewal_brings_a_node_back_and_a_deleted_lease_is_forgotten() {
        let t0 = Instant::now();
        let mut live = Liveness::default();
        live.observe([&lease("a", 100, 10)], t0);
        assert!(!live.alive("a", t0 + Duration::from_secs(11)));
        live.observe([&lease("a", 200, 10)], t0 + Duration::from_secs(12));
        assert!(live.alive("a", t0 + Duration::from_secs(13)));
        live.observe([], t0 + Duration::from_secs(14));
        assert!(!live.alive("a", t0 + Duration::from_secs(14)));
        assert!(!live.alive("never-seen", t0));
    }
}
