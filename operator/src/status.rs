//! A LocalModel's status computed from its replicas, as a pure function.
//!
//! Conditions keep their `lastTransitionTime` unless their status flips, so recomputing the
//! status of an unchanged model gives an equal value and the controller writes nothing.

use std::collections::BTreeMap;

use crds::local_model::{LocalModel, LocalModelStatus, ModelPhase, ReplicaSummary, condition_type};
use crds::model_replica::{ModelReplica, ReplicaPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// What the controller learnt while reconciling, besides the replicas themselves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// Set when wanted replicas fit no node: the placement's sentence.
    pub unschedulable: Option<String>,
    /// Set when a replica failed for a reason that no other node can fix: `(reason, message)`.
    pub permanent_failure: Option<(String, String)>,
    /// The Service URL, once the Service exists.
    pub endpoint: Option<String>,
    /// Digest of the weights (pin or learnt from an agent).
    pub digest: Option<String>,
    /// Memory one replica needs (override or learnt from an agent).
    pub memory_estimate_bytes: Option<i64>,
}

/// Sets condition `type_` in `conds`, keeping `lastTransitionTime` when the status is unchanged.
pub fn set_condition(
    conds: &mut Vec<Condition>,
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    conds.retain(|c| c.type_ != type_);
    conds.push(Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time,
    });
}

fn phase_of(r: &ModelReplica) -> ReplicaPhase {
    r.status
        .as_ref()
        .and_then(|s| s.phase)
        .unwrap_or(ReplicaPhase::Pending)
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// The status of `lm` given its current `replicas` (already cleaned up by the controller:
/// replicas on dead nodes are gone) and what the controller observed.
pub fn model_status(
    lm: &LocalModel,
    replicas: &[ModelReplica],
    observed: &Observed,
    now: &Time,
) -> LocalModelStatus {
    let previous = lm.status.clone().unwrap_or_default();
    let generation = lm.metadata.generation;
    let wanted = usize::try_from(lm.spec.replicas.max(0)).unwrap_or(0);

    let mut sorted: Vec<&ModelReplica> = replicas.iter().collect();
    sorted.sort_by(|a, b| a.spec.node_name.cmp(&b.spec.node_name));
    let count = |p: ReplicaPhase| sorted.iter().filter(|r| phase_of(r) == p).count();
    let ready = count(ReplicaPhase::Ready);
    let failed: Vec<&&ModelReplica> = sorted
        .iter()
        .filter(|r| phase_of(r) == ReplicaPhase::Failed)
        .collect();
    let pulling = count(ReplicaPhase::Pulling);
    let loading = count(ReplicaPhase::Loading);
    let live = sorted.len() - failed.len();

    // Progress across pulling replicas.
    let (mut done, mut total) = (0i64, 0i64);
    for r in &sorted {
        if phase_of(r) != ReplicaPhase::Pulling {
            continue;
        }
        if let Some(p) = r.status.as_ref().and_then(|s| s.progress.as_ref()) {
            if let Some(t) = p.total {
                done = done.saturating_add(p.bytes);
                total = total.saturating_add(t);
            }
        }
    }
    let progress = if pulling > 0 {
        crds::model_replica::percent(done, total)
    } else {
        None
    };

    let replica_statuses: Vec<ReplicaSummary> = sorted
        .iter()
        .map(|r| ReplicaSummary {
            name: r.metadata.name.clone().unwrap_or_default(),
            node: r.spec.node_name.clone(),
            phase: phase_of(r),
            progress: r
                .status
                .as_ref()
                .and_then(|s| s.progress.as_ref())
                .filter(|_| phase_of(r) == ReplicaPhase::Pulling)
                .and_then(|p| p.percent.clone()),
        })
        .collect();
    let first_failure = failed.first().map(|r| {
        let s = r.status.clone().unwrap_or_default();
        (
            s.reason.unwrap_or_else(|| "ReplicaFailed".into()),
            format!(
                "replica {} on {} failed: {}",
                r.metadata.name.as_deref().unwrap_or(""),
                r.spec.node_name,
                s.message.unwrap_or_else(|| "no message".into())
            ),
        )
    });

    let phase = if let Some(_) = &observed.permanent_failure {
        ModelPhase::Failed
    } else if wanted > 0 && ready >= wanted {
        ModelPhase::Ready
    } else if ready > 0 || (!failed.is_empty() && live == 0 && observed.unschedulable.is_some()) {
        ModelPhase::Degraded
    } else if loading > 0 {
        ModelPhase::Loading
    } else if pulling > 0 {
        ModelPhase::Pulling
    } else if !failed.is_empty() {
        ModelPhase::Degraded
    } else if live == 0 && wanted > 0 {
        ModelPhase::Pending
    } else {
        ModelPhase::Scheduled
    };

    let prev = &previous.conditions;
    let mut conditions = Vec::new();
    let nodes: Vec<&str> = sorted
        .iter()
        .filter(|r| phase_of(r) != ReplicaPhase::Failed)
        .map(|r| r.spec.node_name.as_str())
        .collect();
    match (&observed.permanent_failure, &observed.unschedulable) {
        (Some((reason, message)), _) => set_condition(
            &mut conditions,
            prev,
            condition_type::SCHEDULED,
            false,
            reason,
            format!(
                "{message}; placing it on another node cannot help, so no replica is placed until the spec changes"
            ),
            generation,
            now,
        ),
        (None, Some(msg)) => set_condition(
            &mut conditions,
            prev,
            condition_type::SCHEDULED,
            false,
            "Unschedulable",
            msg.clone(),
            generation,
            now,
        ),
        (None, None) => set_condition(
            &mut conditions,
            prev,
            condition_type::SCHEDULED,
            true,
            "Placed",
            if wanted == 0 {
                "no replicas wanted (spec.replicas is 0)".to_string()
            } else {
                format!(
                    "{} of {} placed on: {}",
                    live,
                    plural(wanted, "replica"),
                    nodes.join(", ")
                )
            },
            generation,
            now,
        ),
    }
    let weights_ready = live > 0 && pulling == 0 && count(ReplicaPhase::Pending) == 0;
    set_condition(
        &mut conditions,
        prev,
        condition_type::WEIGHTS_READY,
        weights_ready,
        if weights_ready {
            "Cached"
        } else if pulling > 0 {
            "Pulling"
        } else {
            "NotPulled"
        },
        if weights_ready {
            format!("weights are in the cache of {}", plural(live, "node"))
        } else if pulling > 0 {
            format!(
                "{} downloading{}",
                plural(pulling, "replica"),
                progress
                    .as_ref()
                    .map(|p| format!(", {p}"))
                    .unwrap_or_default()
            )
        } else {
            "no replica has its weights yet".to_string()
        },
        generation,
        now,
    );
    let (ready_reason, ready_message) = if ready > 0 {
        (
            "ReplicasReady",
            format!("{ready} of {} ready", plural(wanted, "replica")),
        )
    } else if wanted == 0 {
        ("ScaledToZero", "spec.replicas is 0".to_string())
    } else if let Some((reason, message)) = &observed.permanent_failure {
        (reason.as_str(), message.clone())
    } else if let Some(msg) = &observed.unschedulable {
        ("Unschedulable", msg.clone())
    } else if loading > 0 {
        ("Loading", "the engine is loading the weights".to_string())
    } else if pulling > 0 {
        ("Pulling", "the weights are downloading".to_string())
    } else if let Some((reason, message)) = &first_failure {
        (reason.as_str(), message.clone())
    } else {
        (
            "Pending",
            "waiting for the node agents to pick up the replicas".to_string(),
        )
    };
    set_condition(
        &mut conditions,
        prev,
        condition_type::READY,
        ready > 0,
        ready_reason,
        ready_message,
        generation,
        now,
    );
    let degraded = (ready > 0 && ready < wanted) || !failed.is_empty();
    let (deg_reason, deg_message) = if let Some((reason, message)) = &first_failure {
        (reason.clone(), message.clone())
    } else if degraded {
        (
            "ReplicasNotReady".to_string(),
            format!("{ready} of {} ready", plural(wanted, "replica")),
        )
    } else {
        ("AsExpected".to_string(), "no replica failed".to_string())
    };
    set_condition(
        &mut conditions,
        prev,
        condition_type::DEGRADED,
        degraded,
        &deg_reason,
        deg_message,
        generation,
        now,
    );
    conditions.sort_by_key(|c| order(&c.type_));

    LocalModelStatus {
        phase: Some(phase),
        conditions,
        replicas: i32::try_from(live).unwrap_or(i32::MAX),
        ready_replicas: i32::try_from(ready).unwrap_or(i32::MAX),
        progress,
        replica_statuses,
        endpoint: observed.endpoint.clone(),
        digest: observed.digest.clone(),
        memory_estimate_bytes: observed.memory_estimate_bytes,
        observed_generation: generation,
    }
}

fn order(t: &str) -> usize {
    [
        condition_type::SCHEDULED,
        condition_type::WEIGHTS_READY,
        condition_type::READY,
        condition_type::DEGRADED,
    ]
    .iter()
    .position(|x| *x == t)
    .unwrap_or(usize::MAX)
}

/// The phase transitions worth an Event: `(from, to)` when the phase changed.
pub fn phase_change(
    before: Option<&LocalModelStatus>,
    after: &LocalModelStatus,
) -> Option<(Option<ModelPhase>, ModelPhase)> {
    let from = before.and_then(|s| s.phase);
    let to = after.phase?;
    (from != Some(to)).then_some((from, to))
}

/// Counts models by phase name (for the `localmodel_operator_models` gauge).
pub fn count_phases<'a>(
    phases: impl Iterator<Item = &'a ModelPhase>,
) -> BTreeMap<&'static str, i64> {
    let mut m = BTreeMap::new();
    for p in phases {
        *m.entry(p.as_str()).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::local_model::LocalModelSpec;
    use crds::model_replica::{ModelReplicaSpec, ModelReplicaStatus, PullProgress};
    use kube::api::ObjectMeta;

    fn t(s: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(s).expect("valid timestamp"))
    }

    fn lm(replicas: i32) -> LocalModel {
        let mut m = LocalModel::new(
            "m",
            LocalModelSpec {
                source: "hf://o/r/f.gguf".into(),
                replicas,
                ..Default::default()
            },
        );
        m.metadata.generation = Some(3);
        m
    }

    fn mr(node: &str, phase: ReplicaPhase) -> ModelReplica {
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
                ..Default::default()
            }),
        }
    }

    fn cond<'a>(s: &'a LocalModelStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap_or_else(|| panic!("no {t} condition in {:?}", s.conditions))
    }

    #[test]
    fn phases_follow_the_replicas() {
        let o = Observed::default();
        let cases: Vec<(i32, Vec<ReplicaPhase>, ModelPhase)> = vec![
            (1, vec![], ModelPhase::Pending),
            (1, vec![ReplicaPhase::Pending], ModelPhase::Scheduled),
            (1, vec![ReplicaPhase::Pulling], ModelPhase::Pulling),
            (
                2,
                vec![ReplicaPhase::Pulling, ReplicaPhase::Loading],
                ModelPhase::Loading,
            ),
            (1, vec![ReplicaPhase::Ready], ModelPhase::Ready),
            (
                2,
                vec![ReplicaPhase::Ready, ReplicaPhase::Pulling],
                ModelPhase::Degraded,
            ),
            (1, vec![ReplicaPhase::Failed], ModelPhase::Degraded),
            (0, vec![], ModelPhase::Scheduled),
        ];
        for (want, phases, expect) in cases {
            let rs: Vec<_> = phases
                .iter()
                .enumerate()
                .map(|(i, p)| mr(&format!("n{i}"), *p))
                .collect();
            let s = model_status(&lm(want), &rs, &o, &t(100));
            assert_eq!(s.phase, Some(expect), "want {want}, replicas {phases:?}");
        }
    }

    #[test]
    fn ready_counts_and_conditions() {
        let rs = vec![mr("a", ReplicaPhase::Ready), mr("b", ReplicaPhase::Loading)];
        let s = model_status(&lm(2), &rs, &Observed::default(), &t(100));
        assert_eq!((s.replicas, s.ready_replicas), (2, 1));
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "Ready").message, "1 of 2 replicas ready");
        assert_eq!(cond(&s, "Degraded").status, "True");
        assert_eq!(
            cond(&s, "Scheduled").message,
            "2 of 2 replicas placed on: a, b"
        );
        assert_eq!(s.observed_generation, Some(3));
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let rs = vec![mr("a", ReplicaPhase::Loading)];
        let mut m = lm(1);
        let first = model_status(&m, &rs, &Observed::default(), &t(100));
        m.status = Some(first.clone());
        let again = model_status(&m, &rs, &Observed::default(), &t(200));
        assert_eq!(first, again, "nothing changed, so nothing to write");
        let rs = vec![mr("a", ReplicaPhase::Ready)];
        let ready = model_status(&m, &rs, &Observed::default(), &t(300));
        assert_eq!(cond(&ready, "Ready").last_transition_time, t(300));
        assert_eq!(cond(&ready, "Scheduled").last_transition_time, t(100));
    }

    #[test]
    fn unschedulable_and_permanent_failure_say_why() {
        let o = Observed {
            unschedulable: Some("1 of 1 replicas fit no node: 500.0 GiB needed".into()),
            ..Default::default()
        };
        let s = model_status(&lm(1), &[], &o, &t(1));
        assert_eq!(s.phase, Some(ModelPhase::Pending));
        let c = cond(&s, "Scheduled");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "Unschedulable")
        );
        assert!(c.message.contains("500.0 GiB"), "{}", c.message);

        let mut failed = mr("a", ReplicaPhase::Failed);
        failed.status.as_mut().expect("status").reason = Some("UnsupportedArchitecture".into());
        let o = Observed {
            permanent_failure: Some((
                "UnsupportedArchitecture".into(),
                "replica m-a on a failed: architecture mamba is not supported".into(),
            )),
            ..Default::default()
        };
        let s = model_status(&lm(1), &[failed], &o, &t(1));
        assert_eq!(s.phase, Some(ModelPhase::Failed));
        assert_eq!(cond(&s, "Ready").reason, "UnsupportedArchitecture");
        assert_eq!(cond(&s, "Scheduled").status, "False");
    }

    #[test]
    fn progress_sums_pulling_replicas() {
        let mut a = mr("a", ReplicaPhase::Pulling);
        a.status.as_mut().expect("status").progress = Some(PullProgress::new(30, Some(100), None));
        let mut b = mr("b", ReplicaPhase::Pulling);
        b.status.as_mut().expect("status").progress = Some(PullProgress::new(50, Some(100), None));
        let s = model_status(&lm(2), &[a, b], &Observed::default(), &t(1));
        assert_eq!(s.progress.as_deref(), Some("40%"));
        assert_eq!(s.replica_statuses[0].progress.as_deref(), Some("30%"));
        assert_eq!(
            cond(&s, "WeightsReady").message,
            "2 replicas downloading, 40%"
        );
    }
}
