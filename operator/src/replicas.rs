//! Pure helpers about a LocalModel's ModelReplicas: names, the spec they should have, and which
//! of the existing ones to keep, delete or wait on.

use std::time::Duration;

use crds::conventions::reason;
use crds::local_model::LocalModel;
use crds::model_replica::{ModelReplica, ModelReplicaSpec, ReplicaPhase, condition_type};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Bytes in a Kubernetes quantity such as `6Gi`, `24G`, `1.5Gi` or `1000000`; `None` when it is
/// not a memory quantity.
pub fn parse_quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return None,
    };
    let bytes = n * mult;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then(|| bytes.ceil() as u64)
}

/// The name of `model`'s replica on `node`: `MODEL-NODE`, unique because a model has at most one
/// replica per node. Both parts are DNS subdomains already; too long names are shortened with a
/// hash so they stay within 253 characters.
pub fn replica_name(model: &str, node: &str) -> String {
    let name = format!("{model}-{node}");
    if name.len() <= 253 {
        return name;
    }
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    let suffix = format!("-{h:016x}");
    let keep: String = name.chars().take(253 - suffix.len()).collect();
    format!("{}{suffix}", keep.trim_end_matches(['-', '.']))
}

/// The spec a replica of `lm` on `node` should have.
pub fn desired_spec(lm: &LocalModel, node: &str, reservation: Option<i64>) -> ModelReplicaSpec {
    ModelReplicaSpec {
        model: lm.metadata.name.clone().unwrap_or_default(),
        source: lm.spec.source.clone(),
        sha256: lm.spec.sha256.clone(),
        format: lm.spec.format,
        quantization: lm.spec.quantization.clone(),
        node_name: node.to_string(),
        memory_reservation_bytes: reservation,
        engine: lm.spec.engine.clone(),
        served_name: lm.served_name().to_string(),
    }
}

/// Whether `r` was made from an older spec of `lm` (other weights or engine settings), so it
/// must be replaced. Node and reservation do not count.
pub fn is_stale(lm: &LocalModel, r: &ModelReplica) -> bool {
    let want = desired_spec(lm, &r.spec.node_name, r.spec.memory_reservation_bytes);
    want != r.spec
}

/// What to do with one existing replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Counts towards the wanted replicas.
    Live,
    /// Its node stopped heartbeating: delete it, place a new one elsewhere.
    NodeLost,
    /// Built from an older spec: delete it, place a new one.
    Stale,
    /// Failed for a reason no node can fix: keep it (it says why) and place nothing.
    FailedPermanently { reason: String, message: String },
    /// Failed for a reason another node may not have: keep it until `retry_in` passed (its node
    /// is not used for this model meanwhile), then delete it.
    FailedRetryLater { retry_in: Duration },
    /// Failed long enough ago: delete it so the node may be tried again.
    FailedExpired,
}

/// When `r` failed: the Ready condition's transition, else its creation.
fn failed_at(r: &ModelReplica) -> Option<&Time> {
    r.status
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == condition_type::READY)
        })
        .map(|c| &c.last_transition_time)
        .or(r.metadata.creation_timestamp.as_ref())
}

/// Classifies one replica of `lm`.
pub fn verdict(
    lm: &LocalModel,
    r: &ModelReplica,
    node_alive: bool,
    now: &Time,
    retry_after: Duration,
) -> Verdict {
    if is_stale(lm, r) {
        return Verdict::Stale;
    }
    let status = r.status.clone().unwrap_or_default();
    if status.phase == Some(ReplicaPhase::Failed) {
        let why = status.reason.clone().unwrap_or_default();
        if reason::is_permanent(&why) {
            return Verdict::FailedPermanently {
                message: format!(
                    "replica {} on {} failed: {}",
                    r.metadata.name.as_deref().unwrap_or(""),
                    r.spec.node_name,
                    status.message.unwrap_or_else(|| why.clone())
                ),
                reason: why,
            };
        }
        let since = failed_at(r)
            .map(|t| now.0.duration_since(t.0).as_secs_f64())
            .unwrap_or(f64::MAX);
        let left = retry_after.as_secs_f64() - since.max(0.0);
        return if left > 0.0 {
            Verdict::FailedRetryLater {
                retry_in: Duration::from_secs_f64(left),
            }
        } else {
            Verdict::FailedExpired
        };
    }
    if !node_alive {
        return Verdict::NodeLost;
    }
    Verdict::Live
}

/// Which of the live replicas to delete when there are more than wanted: those not Ready
/// first, then by name from the end. Returns indexes into `live`.
pub fn scale_down(live: &[&ModelReplica], wanted: usize) -> Vec<usize> {
    if live.len() <= wanted {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..live.len()).collect();
    let ready =
        |r: &ModelReplica| r.status.as_ref().and_then(|s| s.phase) == Some(ReplicaPhase::Ready);
    idx.sort_by(|&a, &b| {
        ready(live[a])
            .cmp(&ready(live[b]))
            .then_with(|| live[b].metadata.name.cmp(&live[a].metadata.name))
    });
    idx.truncate(live.len() - wanted);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::local_model::{EngineSpec, LocalModelSpec};
    use crds::model_replica::ModelReplicaStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use kube::api::ObjectMeta;

    fn t(s: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(s).expect("valid timestamp"))
    }

    fn lm() -> LocalModel {
        LocalModel::new(
            "m",
            LocalModelSpec {
                source: "hf://o/r/f.gguf".into(),
                ..Default::default()
            },
        )
    }

    fn replica(
        lm: &LocalModel,
        node: &str,
        phase: ReplicaPhase,
        reason: Option<&str>,
        failed_at: i64,
    ) -> ModelReplica {
        ModelReplica {
            metadata: ObjectMeta {
                name: Some(replica_name("m", node)),
                ..Default::default()
            },
            spec: desired_spec(lm, node, Some(1)),
            status: Some(ModelReplicaStatus {
                phase: Some(phase),
                reason: reason.map(str::to_string),
                message: Some("it broke".into()),
                conditions: vec![Condition {
                    type_: "Ready".into(),
                    status: "False".into(),
                    reason: "x".into(),
                    message: String::new(),
                    observed_generation: None,
                    last_transition_time: t(failed_at),
                }],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("6Gi"), Some(6 << 30));
        assert_eq!(parse_quantity("24G"), Some(24_000_000_000));
        assert_eq!(parse_quantity("1.5Gi"), Some(3 << 29));
        assert_eq!(parse_quantity("1000"), Some(1000));
        assert_eq!(parse_quantity("12Mi"), Some(12 << 20));
        assert_eq!(parse_quantity("lots"), None);
        assert_eq!(parse_quantity("5Xi"), None);
        assert_eq!(parse_quantity(""), None);
    }

    #[test]
    fn names_stay_valid() {
        assert_eq!(replica_name("smollm2", "node-a"), "smollm2-node-a");
        let long = replica_name(&"m".repeat(200), &"n".repeat(200));
        assert!(long.len() <= 253, "{}", long.len());
        assert_ne!(long, replica_name(&"m".repeat(200), &"n".repeat(199)));
    }

    #[test]
    fn verdicts() {
        let m = lm();
        let now = t(1000);
        let retry = Duration::from_secs(60);
        let live = replica(&m, "a", ReplicaPhase::Ready, None, 0);
        assert_eq!(verdict(&m, &live, true, &now, retry), Verdict::Live);
        assert_eq!(verdict(&m, &live, false, &now, retry), Verdict::NodeLost);

        let arch = replica(
            &m,
            "a",
            ReplicaPhase::Failed,
            Some("UnsupportedArchitecture"),
            990,
        );
        assert!(matches!(
            verdict(&m, &arch, true, &now, retry),
            Verdict::FailedPermanently { ref reason, ref message }
                if reason == "UnsupportedArchitecture" && message == "replica m-a on a failed: it broke"
        ));
        let oom = replica(&m, "a", ReplicaPhase::Failed, Some("OutOfMemory"), 990);
        assert_eq!(
            verdict(&m, &oom, true, &now, retry),
            Verdict::FailedRetryLater {
                retry_in: Duration::from_secs(50)
            }
        );
        let old = replica(&m, "a", ReplicaPhase::Failed, Some("OutOfMemory"), 900);
        assert_eq!(verdict(&m, &old, true, &now, retry), Verdict::FailedExpired);

        let mut changed = m.clone();
        changed.spec.engine = Some(EngineSpec {
            context_length: Some(1024),
            ..Default::default()
        });
        assert_eq!(verdict(&changed, &arch, true, &now, retry), Verdict::Stale);
    }

    #[test]
    fn scale_down_prefers_replicas_not_ready() {
        let m = lm();
        let a = replica(&m, "a", ReplicaPhase::Ready, None, 0);
        let b = replica(&m, "b", ReplicaPhase::Pulling, None, 0);
        let c = replica(&m, "c", ReplicaPhase::Ready, None, 0);
        let live = vec![&a, &b, &c];
        assert_eq!(scale_down(&live, 2), vec![1]);
        assert_eq!(scale_down(&live, 1), vec![1, 2]);
        assert!(scale_down(&live, 3).is_empty());
    }
}
