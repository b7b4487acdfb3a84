//! The agent's HTTP surface on one port: OpenAI and Ollama APIs, health and metrics.

pub mod admission;
pub mod error;
pub mod ollama;
pub mod openai;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::mpsc;

use self::admission::Slot;
use self::error::ApiError;
use crate::engine::types::{Event, FinishReason, Prompt, Sampling, ToolCall, Usage};
use crate::engine::{EngineError, EngineHost, LoadedModel};
use crate::metrics::Metrics;

/// Whether the agent serves everything it was asked to serve.
#[derive(Debug, Default)]
pub struct Readiness {
    ready: AtomicBool,
    shutting_down: AtomicBool,
}

impl Readiness {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.shutting_down.load(Ordering::SeqCst)
    }

    /// From now on `/readyz` fails, so load balancers stop sending new requests.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }
}

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<EngineHost>,
    pub metrics: Metrics,
    pub readiness: Arc<Readiness>,
}

impl AppState {
    /// Answers an error, counting it.
    pub fn fail(&self, model: Option<&str>, e: ApiError) -> Response {
        let model = model.filter(|m| self.engine.get(m).is_some()).unwrap_or("");
        self.metrics
            .request_errors
            .with_label_values(&[model, e.status.as_str()])
            .inc();
        tracing::debug!(model, status = %e.status, message = %e.message, "request refused");
        e.into_response()
    }

    /// Finds the model, checks the context, waits for a place and starts generating.
    pub async fn start(
        &self,
        model: &str,
        prompt: Prompt,
        mut sampling: Sampling,
    ) -> Result<Generation, ApiError> {
        let arrival = Instant::now();
        let loaded = self
            .engine
            .get(model)
            .ok_or_else(|| ApiError::model_not_found(model))?;
        let prompt_tokens = self
            .engine
            .count_prompt_tokens(&loaded, &prompt)
            .await
            .map_err(api_error)?;
        let context = loaded.card.context_length;
        match sampling.max_tokens {
            Some(max) if prompt_tokens + max > context => {
                return Err(ApiError::context_exceeded(prompt_tokens, max, context));
            }
            Some(_) => {}
            None if prompt_tokens >= context => {
                return Err(ApiError::context_exceeded(prompt_tokens, 1, context));
            }
            None => sampling.max_tokens = Some(context - prompt_tokens),
        }
        let slot = loaded.admission.admit(&self.metrics).await?;
        let name = loaded.card.name.clone();
        self.metrics
            .request_queue_time
            .with_label_values(&[name.as_str()])
            .observe(slot.queued_secs);
        let rx = self
            .engine
            .generate(&loaded, prompt, sampling)
            .await
            .map_err(api_error)?;
        Ok(Generation {
            model: loaded,
            _slot: slot,
            rx,
            arrival,
            prompt_tokens,
            metrics: self.metrics.clone(),
        })
    }
}

/// Maps engine failures to HTTP answers.
pub fn api_error(e: EngineError) -> ApiError {
    match e {
        EngineError::Validation(m) => ApiError::malformed(m),
        EngineError::NotLoaded(m) => ApiError::model_not_found(&m),
        other => ApiError::internal(other.to_string()),
    }
}

/// A generation in flight, holding its place in the model's line.
pub struct Generation {
    model: Arc<LoadedModel>,
    _slot: Slot,
    rx: mpsc::Receiver<Result<Event, EngineError>>,
    arrival: Instant,
    /// Prompt tokens counted before admission (streamed text completions report none).
    prompt_tokens: usize,
    metrics: Metrics,
}

impl Generation {
    pub fn model_name(&self) -> &str {
        &self.model.card.name
    }

    /// Wraps the events with latency and token accounting.
    pub fn tracked(self) -> Tracked {
        Tracked {
            g: self,
            last_token_at: None,
            finished: false,
        }
    }
}

/// Reads a generation's events, recording vLLM-style metrics as they pass. Dropped before the
/// end (the client went away), it counts the request as aborted; dropping the receiver
/// cancels the generation in the engine.
pub struct Tracked {
    g: Generation,
    last_token_at: Option<Instant>,
    finished: bool,
}

impl Tracked {
    pub async fn next(&mut self) -> Option<Result<Event, ApiError>> {
        let mut item = self.g.rx.recv().await?;
        if let Ok(Event::Finished { usage, .. }) = &mut item {
            if usage.prompt_tokens == 0 {
                usage.prompt_tokens = self.g.prompt_tokens;
            }
        }
        let name = self.g.model.card.name.as_str();
        let m = &self.g.metrics;
        match &item {
            Ok(Event::Delta { .. }) => {
                let now = Instant::now();
                match self.last_token_at {
                    None => m
                        .time_to_first_token
                        .with_label_values(&[name])
                        .observe((now - self.g.arrival).as_secs_f64()),
                    Some(prev) => m
                        .inter_token_latency
                        .with_label_values(&[name])
                        .observe((now - prev).as_secs_f64()),
                }
                self.last_token_at = Some(now);
            }
            Ok(Event::Finished { reason, usage }) => {
                self.finished = true;
                self.record_end(reason.as_str(), *usage);
            }
            Err(_) => {
                self.finished = true;
                m.request_errors.with_label_values(&[name, "500"]).inc();
            }
        }
        Some(item.map_err(api_error))
    }

    fn record_end(&self, reason: &str, usage: Usage) {
        let name = self.g.model.card.name.as_str();
        let m = &self.g.metrics;
        m.prompt_tokens
            .with_label_values(&[name])
            .inc_by(usage.prompt_tokens as u64);
        m.generation_tokens
            .with_label_values(&[name])
            .inc_by(usage.completion_tokens as u64);
        m.request_prompt_tokens
            .with_label_values(&[name])
            .observe(usage.prompt_tokens as f64);
        m.request_generation_tokens
            .with_label_values(&[name])
            .observe(usage.completion_tokens as f64);
        m.e2e_request_latency
            .with_label_values(&[name])
            .observe(self.g.arrival.elapsed().as_secs_f64());
        m.request_success.with_label_values(&[name, reason]).inc();
    }

    /// Reads to the end: text, tool calls, finish reason and usage.
    pub async fn collect(
        &mut self,
    ) -> Result<(String, Vec<ToolCall>, FinishReason, Usage), ApiError> {
        let mut text = String::new();
        let mut calls = Vec::new();
        while let Some(ev) = self.next().await {
            match ev? {
                Event::Delta {
                    text: t,
                    tool_calls,
                } => {
                    text.push_str(&t);
                    calls.extend(tool_calls);
                }
                Event::Finished { reason, usage } => return Ok((text, calls, reason, usage)),
            }
        }
        Err(ApiError::internal(
            "the engine ended the generation without finishing it",
        ))
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if !self.finished {
            let name = self.g.model.card.name.as_str();
            self.g
                .metrics
                .request_success
                .with_label_values(&[name, FinishReason::Abort.as_str()])
                .inc();
            tracing::debug!(model = name, "client went away; generation cancelled");
        }
    }
}

async fn livez() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found(uri: Uri) -> Response {
    ApiError::no_route(uri.path()).into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::method_not_allowed().into_response()
}

/// Serves the agent's routes on `listener` until `stop` turns true; then `/readyz` fails, new
/// connections are refused and requests in flight finish.
pub fn spawn_server(
    listener: tokio::net::TcpListener,
    state: AppState,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let readiness = state.readiness.clone();
    tokio::spawn(async move {
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
                readiness.begin_shutdown();
            })
            .await
    })
}

/// All routes of the agent.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/show", post(ollama::show))
        .route("/api/version", get(ollama::version))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(|| async { "LocalModel node-agent is running" }))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found);
    api.layer(tower_http::catch_panic::CatchPanicLayer::custom(
        |_: Box<dyn std::any::Any + Send + 'static>| {
            ApiError::internal("internal error").into_response()
        },
    ))
    .with_state(state)
}
