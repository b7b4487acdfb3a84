//! The operator's Prometheus metrics, in one registry passed in explicitly.

use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Errors registering metrics (a name registered twice).
#[derive(Debug, thiserror::Error)]
#[error("registering metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Every metric the operator exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles finished, by `result` (`ok` or `error`).
    pub reconciles: IntCounterVec,
    /// Reconcile errors by `reason` (the error's category).
    pub reconcile_errors: IntCounterVec,
    /// How long one reconcile took.
    pub reconcile_duration: Histogram,
    /// Placement decisions by `outcome`: `placed` (a replica was bound to a node) or
    /// `unschedulable` (a wanted replica fits no node).
    pub placements: IntCounterVec,
    /// LocalModels by `phase`.
    pub models: IntGaugeVec,
    /// 1 for each LocalModel, labelled with its `namespace`, `model` (name), `served_name` (the
    /// `model_name` label of the agents' serving metrics) and `phase`: what dashboards join on.
    pub model_info: IntGaugeVec,
    /// 1 while this process holds the leader Lease.
    pub leader: IntGauge,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: Registry) -> Result<Self, MetricsError> {
        let reconciles = IntCounterVec::new(
            Opts::new(
                "localmodel_operator_reconciles_total",
                "LocalModel reconciles finished, by result.",
            ),
            &["result"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "localmodel_operator_reconcile_errors_total",
                "LocalModel reconciles that failed, by reason.",
            ),
            &["reason"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "localmodel_operator_reconcile_duration_seconds",
                "Time one LocalModel reconcile took.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let placements = IntCounterVec::new(
            Opts::new(
                "localmodel_operator_placements_total",
                "Placement decisions: replicas bound to a node (placed) or that fit no node (unschedulable).",
            ),
            &["outcome"],
        )?;
        let models = IntGaugeVec::new(
            Opts::new("localmodel_operator_models", "LocalModels by phase."),
            &["phase"],
        )?;
        let model_info = IntGaugeVec::new(
            Opts::new(
                "localmodel_operator_model_info",
                "1 per LocalModel, with its namespace, name, served name and phase.",
            ),
            &["namespace", "model", "served_name", "phase"],
        )?;
        let leader = IntGauge::new(
            "localmodel_operator_leader",
            "1 while this operator process holds the leader Lease and writes.",
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(placements.clone()))?;
        registry.register(Box::new(models.clone()))?;
        registry.register(Box::new(model_info.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            placements,
            models,
            model_info,
            leader,
        })
    }

    /// The registry to expose at `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Starts timing a reconcile; the duration is recorded when the timer drops.
    pub fn time_reconcile(&self) -> ReconcileTimer {
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.reconcile_duration.clone(),
        }
    }
}

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}
