//! Prometheus metrics of the agent: one registry, passed explicitly.
//!
//! Serving metrics use vLLM's names and its `model_name` label, so dashboards and gateways
//! written for vLLM read them unchanged. Pull, load and cache metrics are `localmodel_*`.

use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// All metrics of one agent process.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub num_requests_running: IntGaugeVec,
    pub num_requests_waiting: IntGaugeVec,
    pub prompt_tokens: IntCounterVec,
    pub generation_tokens: IntCounterVec,
    pub request_success: IntCounterVec,
    pub request_prompt_tokens: HistogramVec,
    pub request_generation_tokens: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: HistogramVec,
    pub e2e_request_latency: HistogramVec,
    pub request_queue_time: HistogramVec,
    pub request_errors: IntCounterVec,
    pub pull_bytes: IntCounter,
    pub pull_seconds: Histogram,
    pub pull_failures: IntCounterVec,
    pub pulls_in_progress: IntGauge,
    pub load_seconds: HistogramVec,
    pub models_loaded: IntGauge,
    pub cache_used_bytes: IntGauge,
    pub cache_capacity_bytes: IntGauge,
    pub gpu_memory_total_bytes: IntGaugeVec,
    pub gpu_memory_free_bytes: IntGaugeVec,
}

/// Errors building the metrics (a name clash, which is a programming error surfaced at start).
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5,
];
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0,
];
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];
const LOAD_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: Registry) -> Result<Self, MetricsError> {
        let model = &["model_name"];
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                registry.register(Box::new(m.clone()))?;
                m
            }};
        }
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                model,
            )
        };
        Ok(Self {
            num_requests_running: reg!(IntGaugeVec::new(
                Opts::new("vllm:num_requests_running", "Requests being generated now."),
                model
            )?),
            num_requests_waiting: reg!(IntGaugeVec::new(
                Opts::new(
                    "vllm:num_requests_waiting",
                    "Requests admitted and waiting for the engine."
                ),
                model
            )?),
            prompt_tokens: reg!(IntCounterVec::new(
                Opts::new("vllm:prompt_tokens_total", "Prompt tokens processed."),
                model
            )?),
            generation_tokens: reg!(IntCounterVec::new(
                Opts::new("vllm:generation_tokens_total", "Tokens generated."),
                model
            )?),
            request_success: reg!(IntCounterVec::new(
                Opts::new(
                    "vllm:request_success_total",
                    "Requests finished, by finish reason (stop, length, tool_calls, abort)."
                ),
                &["model_name", "finished_reason"]
            )?),
            request_prompt_tokens: reg!(hist(
                "vllm:request_prompt_tokens",
                "Prompt tokens per request.",
                TOKEN_BUCKETS
            )?),
            request_generation_tokens: reg!(hist(
                "vllm:request_generation_tokens",
                "Generated tokens per request.",
                TOKEN_BUCKETS
            )?),
            time_to_first_token: reg!(hist(
                "vllm:time_to_first_token_seconds",
                "Seconds from arrival to the first generated token.",
                LATENCY_BUCKETS
            )?),
            inter_token_latency: reg!(hist(
                "vllm:inter_token_latency_seconds",
                "Seconds between consecutive generated tokens.",
                ITL_BUCKETS
            )?),
            e2e_request_latency: reg!(hist(
                "vllm:e2e_request_latency_seconds",
                "Seconds from arrival to the last token.",
                E2E_BUCKETS
            )?),
            request_queue_time: reg!(hist(
                "vllm:request_queue_time_seconds",
                "Seconds a request waited before the engine started it.",
                LATENCY_BUCKETS
            )?),
            request_errors: reg!(IntCounterVec::new(
                Opts::new(
                    "localmodel_request_errors_total",
                    "Requests answered with an error, by HTTP status code."
                ),
                &["model_name", "code"]
            )?),
            pull_bytes: reg!(IntCounter::new(
                "localmodel_pull_bytes_total",
                "Bytes of model weights downloaded."
            )?),
            pull_seconds: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "localmodel_pull_duration_seconds",
                    "Seconds a successful pull took (cache hits included)."
                )
                .buckets(LOAD_BUCKETS.to_vec())
            )?),
            pull_failures: reg!(IntCounterVec::new(
                Opts::new(
                    "localmodel_pull_failures_total",
                    "Pulls that failed, by reason (not_found, checksum, network, io, cache_full, invalid)."
                ),
                &["reason"]
            )?),
            pulls_in_progress: reg!(IntGauge::new(
                "localmodel_pulls_in_progress",
                "Pulls running now."
            )?),
            load_seconds: reg!(hist(
                "localmodel_model_load_seconds",
                "Seconds to load a model into the engine.",
                LOAD_BUCKETS
            )?),
            models_loaded: reg!(IntGauge::new(
                "localmodel_models_loaded",
                "Models loaded and serving."
            )?),
            cache_used_bytes: reg!(IntGauge::new(
                "localmodel_cache_used_bytes",
                "Bytes of verified weights in the node cache."
            )?),
            cache_capacity_bytes: reg!(IntGauge::new(
                "localmodel_cache_capacity_bytes",
                "Capacity of the node cache in bytes."
            )?),
            gpu_memory_total_bytes: reg!(IntGaugeVec::new(
                Opts::new(
                    "localmodel_gpu_memory_total_bytes",
                    "Memory of each GPU of the node in bytes."
                ),
                &["gpu", "product"]
            )?),
            gpu_memory_free_bytes: reg!(IntGaugeVec::new(
                Opts::new(
                    "localmodel_gpu_memory_free_bytes",
                    "Free memory of each GPU in bytes, as the GPUNode reports it (measured, or the total less what the agent placed there)."
                ),
                &["gpu", "product"]
            )?),
            registry,
        })
    }

    /// Records one GPU's memory.
    pub fn set_gpu(&self, index: u32, product: &str, total: i64, free: i64) {
        let gpu = index.to_string();
        let l = &[gpu.as_str(), product];
        self.gpu_memory_total_bytes.with_label_values(l).set(total);
        self.gpu_memory_free_bytes.with_label_values(l).set(free);
    }

    /// The registry, for the `/metrics` handler.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Creates every per-model series at zero, so dashboards and alerts see the model from the
    /// moment it loads rather than after its first request.
    pub fn init_model(&self, model: &str) {
        let l = &[model];
        self.num_requests_running.with_label_values(l).set(0);
        self.num_requests_waiting.with_label_values(l).set(0);
        self.prompt_tokens.with_label_values(l);
        self.generation_tokens.with_label_values(l);
        for reason in ["stop", "length", "tool_calls", "abort"] {
            self.request_success.with_label_values(&[model, reason]);
        }
        for h in [
            &self.request_prompt_tokens,
            &self.request_generation_tokens,
            &self.time_to_first_token,
            &self.inter_token_latency,
            &self.e2e_request_latency,
            &self.request_queue_time,
        ] {
            h.with_label_values(l);
        }
    }

    /// Records the cache's state.
    pub fn set_cache(&self, used: u64, capacity: u64) {
        self.cache_used_bytes
            .set(i64::try_from(used).unwrap_or(i64::MAX));
        self.cache_capacity_bytes
            .set(i64::try_from(capacity).unwrap_or(i64::MAX));
    }
}

/// Increments a gauge and decrements it again when dropped.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(g: IntGauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Observes the seconds since its creation into a histogram when dropped.
pub struct DropTimer {
    hist: Histogram,
    start: Instant,
    armed: bool,
}

impl DropTimer {
    pub fn new(hist: Histogram) -> Self {
        Self {
            hist,
            start: Instant::now(),
            armed: true,
        }
    }

    /// Drops without recording (for failures that must not count as durations).
    pub fn discard(mut self) {
        self.armed = false;
    }
}

impl Drop for DropTimer {
    fn drop(&mut self) {
        if self.armed {
            self.hist.observe(self.start.elapsed().as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_vllm_ones() {
        let m = Metrics::new(Registry::new()).expect("metrics");
        m.prompt_tokens.with_label_values(&["smollm2"]).inc_by(3);
        m.request_success
            .with_label_values(&["smollm2", "stop"])
            .inc();
        m.time_to_first_token
            .with_label_values(&["smollm2"])
            .observe(0.2);
        let text = m.render();
        assert!(
            text.contains("vllm:prompt_tokens_total{model_name=\"smollm2\"} 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "vllm:request_success_total{finished_reason=\"stop\",model_name=\"smollm2\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("vllm:time_to_first_token_seconds_bucket"),
            "{text}"
        );
    }

    #[test]
    fn gpu_memory_is_labelled_by_device() {
        let m = Metrics::new(Registry::new()).expect("metrics");
        m.set_gpu(1, "NVIDIA L4", 24 << 30, 20 << 30);
        let text = m.render();
        assert!(
            text.contains(
                "localmodel_gpu_memory_free_bytes{gpu=\"1\",product=\"NVIDIA L4\"} 21474836480"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "localmodel_gpu_memory_total_bytes{gpu=\"1\",product=\"NVIDIA L4\"} 25769803776"
            ),
            "{text}"
        );
    }

    #[test]
    fn guards_restore_gauges() {
        let m = Metrics::new(Registry::new()).expect("metrics");
        {
            let _g = GaugeGuard::new(m.pulls_in_progress.clone());
            assert_eq!(m.pulls_in_progress.get(), 1);
        }
        assert_eq!(m.pulls_in_progress.get(), 0);
    }
}
