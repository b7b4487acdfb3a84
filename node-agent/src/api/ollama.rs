//! Ollama-compatible endpoints, so Ollama clients and UIs work unchanged: `/api/chat`,
//! `/api/generate` (NDJSON streaming with Ollama's timing fields), `/api/tags`, `/api/ps`,
//! `/api/show`, `/api/version`. Errors use Ollama's shape, `{"error": "..."}`.

use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::{ApiError, parse_json};
use crate::engine::types::{ChatTurn, Event, ModelCard, OutputFormat, Prompt, Sampling};

/// The Ollama API level implemented here (clients gate features on it).
pub const OLLAMA_API_VERSION: &str = "0.12.0";

/// Ollama's `options`.
#[derive(Debug, Deserialize, Default)]
pub struct Options {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub num_predict: Option<i64>,
    pub stop: Option<Vec<String>>,
    pub seed: Option<i64>,
    pub repeat_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub num_ctx: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: String,
    pub images: Option<Vec<Value>>,
    pub tool_calls: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    #[serde(default)]
    pub messages: Vec<Message>,
    pub stream: Option<bool>,
    pub format: Option<Value>,
    #[serde(default)]
    pub options: Options,
    pub tools: Option<Vec<Value>>,
    #[allow(dead_code)]
    pub keep_alive: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct GenerateRequest {
    pub model: String,
    #[serde(default)]
    pub prompt: String,
    pub system: Option<String>,
    pub raw: Option<bool>,
    pub stream: Option<bool>,
    pub format: Option<Value>,
    #[serde(default)]
    pub options: Options,
    pub images: Option<Vec<Value>>,
    pub suffix: Option<String>,
    #[allow(dead_code)]
    pub keep_alive: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ShowRequest {
    pub model: Option<String>,
    pub name: Option<String>,
}

/// An error in Ollama's shape.
fn ollama_error(state: &AppState, model: Option<&str>, e: ApiError) -> Response {
    let model_label = model
        .filter(|m| state.engine.get(m).is_some())
        .unwrap_or("");
    state
        .metrics
        .request_errors
        .with_label_values(&[model_label, e.status.as_str()])
        .inc();
    let mut resp = (e.status, axum::Json(json!({"error": e.message}))).into_response();
    if let Some(s) = e.retry_after_secs {
        if let Ok(v) = s.to_string().parse() {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}

/// Resolves an Ollama model name: exact, or without the `:latest` tag.
fn resolve(state: &AppState, name: &str) -> Result<String, ApiError> {
    if state.engine.get(name).is_some() {
        return Ok(name.to_string());
    }
    if let Some(base) = name.strip_suffix(":latest") {
        if state.engine.get(base).is_some() {
            return Ok(base.to_string());
        }
    }
    Err(ApiError {
        message: format!("model '{name}' not found"),
        ..ApiError::model_not_found(name)
    })
}

fn sampling_from(o: &Options, format: &Option<Value>) -> Result<Sampling, ApiError> {
    let field = |f: &str| format!("options.{f}");
    let max_tokens = match o.num_predict {
        None | Some(-1) | Some(-2) => None,
        Some(n) if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        Some(n) => {
            return Err(ApiError::bad_param(
                field("num_predict"),
                format!("must be positive (or -1 for no limit), got {n}"),
            ));
        }
    };
    if let Some(t) = o.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::bad_param(
                field("temperature"),
                format!("must be between 0 and 2, got {t}"),
            ));
        }
    }
    if let Some(p) = o.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::bad_param(
                field("top_p"),
                format!("must be in (0, 1], got {p}"),
            ));
        }
    }
    let top_k = match o.top_k {
        None | Some(0) => None,
        Some(k) if k > 0 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
        Some(k) => {
            return Err(ApiError::bad_param(
                field("top_k"),
                format!("must be positive, got {k}"),
            ));
        }
    };
    let seed = match o.seed {
        None => None,
        Some(s) => Some(
            u64::try_from(s)
                .map_err(|_| ApiError::bad_param(field("seed"), "must not be negative"))?,
        ),
    };
    let format = match format {
        None | Some(Value::Null) => OutputFormat::Text,
        Some(Value::String(s)) if s.is_empty() => OutputFormat::Text,
        Some(Value::String(s)) if s == "json" => OutputFormat::JsonObject,
        Some(v @ Value::Object(_)) => OutputFormat::JsonSchema(v.clone()),
        Some(other) => {
            return Err(ApiError::bad_param(
                "format",
                format!("must be \"json\" or a JSON schema object, got {other}"),
            ));
        }
    };
    Ok(Sampling {
        max_tokens,
        temperature: o.temperature,
        top_p: o.top_p,
        top_k,
        min_p: o.min_p,
        stop: o.stop.clone().unwrap_or_default(),
        seed,
        presence_penalty: o.presence_penalty.map(|v| v as f32),
        frequency_penalty: o.frequency_penalty.map(|v| v as f32),
        repeat_penalty: o.repeat_penalty.map(|v| v as f32),
        format,
    })
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Runs a generation and answers it as Ollama does: NDJSON lines when streaming, one object
/// otherwise. `chat` selects `message` (chat) or `response` (generate) fields.
async fn respond(
    state: AppState,
    model: String,
    prompt: Prompt,
    sampling: Sampling,
    stream: bool,
    chat: bool,
) -> Response {
    let arrival = Instant::now();
    let generation = match state.start(&model, prompt, sampling).await {
        Ok(g) => g,
        Err(e) => return ollama_error(&state, Some(&model), e),
    };
    let name = generation.model_name().to_string();
    let piece = move |text: &str, tool_calls: Option<Value>| -> Value {
        if chat {
            let mut msg = json!({"role": "assistant", "content": text});
            if let Some(tc) = tool_calls {
                msg["tool_calls"] = tc;
            }
            json!({"message": msg})
        } else {
            json!({"response": text})
        }
    };
    let finish = move |name: &str,
                       reason: &str,
                       usage: crate::engine::types::Usage,
                       first: Option<Instant>,
                       text: &str| {
        let end = Instant::now();
        let first = first.unwrap_or(end);
        let mut v = piece(text, None);
        v["model"] = json!(name);
        v["created_at"] = json!(now_rfc3339());
        v["done"] = json!(true);
        v["done_reason"] = json!(reason);
        v["total_duration"] = json!(nanos(end - arrival));
        v["load_duration"] = json!(0);
        v["prompt_eval_count"] = json!(usage.prompt_tokens);
        v["prompt_eval_duration"] = json!(nanos(first - arrival));
        v["eval_count"] = json!(usage.completion_tokens);
        v["eval_duration"] = json!(nanos(end - first));
        v
    };
    let tool_json = |calls: &[crate::engine::types::ToolCall]| -> Option<Value> {
        if calls.is_empty() {
            return None;
        }
        Some(Value::Array(
            calls
                .iter()
                .map(|c| {
                    let args: Value = serde_json::from_str(&c.arguments)
                        .unwrap_or(Value::String(c.arguments.clone()));
                    json!({"function": {"name": c.name, "arguments": args}})
                })
                .collect(),
        ))
    };
    if !stream {
        let mut tracked = generation.tracked();
        let mut first = None;
        let mut text = String::new();
        let mut calls = Vec::new();
        loop {
            match tracked.next().await {
                Some(Ok(Event::Delta {
                    text: t,
                    tool_calls,
                })) => {
                    first.get_or_insert_with(Instant::now);
                    text.push_str(&t);
                    calls.extend(tool_calls);
                }
                Some(Ok(Event::Finished { reason, usage })) => {
                    let mut v = finish(&name, reason.as_str(), usage, first, &text);
                    if chat {
                        if let Some(tc) = tool_json(&calls) {
                            v["message"]["tool_calls"] = tc;
                        }
                    }
                    return axum::Json(v).into_response();
                }
                Some(Err(e)) => return ollama_error(&state, Some(&name), e),
                None => {
                    return ollama_error(
                        &state,
                        Some(&name),
                        ApiError::internal("generation ended early"),
                    );
                }
            }
        }
    }
    let body = async_stream::stream! {
        let mut tracked = generation.tracked();
        let mut first = None;
        loop {
            let line = match tracked.next().await {
                Some(Ok(Event::Delta { text, tool_calls })) => {
                    first.get_or_insert_with(Instant::now);
                    let mut v = piece(&text, tool_json(&tool_calls));
                    v["model"] = json!(name);
                    v["created_at"] = json!(now_rfc3339());
                    v["done"] = json!(false);
                    v
                }
                Some(Ok(Event::Finished { reason, usage })) => {
                    let v = finish(&name, reason.as_str(), usage, first, "");
                    yield Ok::<_, std::convert::Infallible>(Bytes::from(format!("{v}\n")));
                    break;
                }
                Some(Err(e)) => json!({"error": e.message}),
                None => break,
            };
            let is_err = line.get("error").is_some();
            yield Ok(Bytes::from(format!("{line}\n")));
            if is_err {
                break;
            }
        }
    };
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response()
}

/// `POST /api/chat`.
pub async fn chat(State(state): State<AppState>, body: Bytes) -> Response {
    let req: ChatRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return ollama_error(&state, None, e),
    };
    let model = match resolve(&state, &req.model) {
        Ok(m) => m,
        Err(e) => return ollama_error(&state, None, e),
    };
    let prepared = (|| {
        let sampling = sampling_from(&req.options, &req.format)?;
        let mut turns = Vec::with_capacity(req.messages.len());
        for (i, m) in req.messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
                return Err(ApiError::bad_param(
                    format!("messages[{i}].role"),
                    format!(
                        "must be one of system, user, assistant, tool; got {:?}",
                        m.role
                    ),
                ));
            }
            if m.images.as_ref().is_some_and(|v| !v.is_empty()) {
                return Err(ApiError::bad_param(
                    format!("messages[{i}].images"),
                    "this model takes text only",
                ));
            }
            turns.push(ChatTurn {
                role: m.role.clone(),
                content: m.content.clone(),
                tool_calls: m.tool_calls.clone(),
                tool_call_id: None,
                name: None,
            });
        }
        Ok((turns, sampling))
    })();
    let (turns, sampling) = match prepared {
        Ok(p) => p,
        Err(e) => return ollama_error(&state, Some(&model), e),
    };
    if turns.is_empty() {
        // Ollama answers an empty chat by loading the model.
        return axum::Json(json!({
            "model": model, "created_at": now_rfc3339(),
            "message": {"role": "assistant", "content": ""},
            "done": true, "done_reason": "load",
        }))
        .into_response();
    }
    let prompt = Prompt::Chat {
        messages: turns,
        tools: req.tools.clone(),
        tool_choice: None,
    };
    respond(
        state,
        model,
        prompt,
        sampling,
        req.stream.unwrap_or(true),
        true,
    )
    .await
}

/// `POST /api/generate`.
pub async fn generate(State(state): State<AppState>, body: Bytes) -> Response {
    let req: GenerateRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return ollama_error(&state, None, e),
    };
    let model = match resolve(&state, &req.model) {
        Ok(m) => m,
        Err(e) => return ollama_error(&state, None, e),
    };
    if req.images.as_ref().is_some_and(|v| !v.is_empty()) {
        return ollama_error(
            &state,
            Some(&model),
            ApiError::bad_param("images", "this model takes text only"),
        );
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return ollama_error(
            &state,
            Some(&model),
            ApiError::bad_param("suffix", "fill-in-the-middle is not supported"),
        );
    }
    let sampling = match sampling_from(&req.options, &req.format) {
        Ok(s) => s,
        Err(e) => return ollama_error(&state, Some(&model), e),
    };
    if req.prompt.is_empty() {
        return axum::Json(json!({
            "model": model, "created_at": now_rfc3339(), "response": "",
            "done": true, "done_reason": "load",
        }))
        .into_response();
    }
    let prompt = if req.raw.unwrap_or(false) {
        Prompt::Text(req.prompt.clone())
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &req.system {
            messages.push(ChatTurn {
                role: "system".into(),
                content: system.clone(),
                tool_calls: None,
                tool_call_id: None,
                name: None,
            });
        }
        messages.push(ChatTurn {
            role: "user".into(),
            content: req.prompt.clone(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        });
        Prompt::Chat {
            messages,
            tools: None,
            tool_choice: None,
        }
    };
    respond(
        state,
        model,
        prompt,
        sampling,
        req.stream.unwrap_or(true),
        false,
    )
    .await
}

fn parameter_size(n: Option<u64>) -> String {
    match n {
        Some(n) if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        Some(n) if n >= 1_000_000 => format!("{:.0}M", n as f64 / 1e6),
        Some(n) => n.to_string(),
        None => String::new(),
    }
}

fn details(m: &ModelCard) -> Value {
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": m.architecture,
        "families": [m.architecture],
        "parameter_size": parameter_size(m.parameter_count),
        "quantization_level": m.quantization,
    })
}

fn ollama_name(name: &str) -> String {
    if name.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

fn modified_at(m: &ModelCard) -> String {
    chrono::DateTime::from_timestamp(m.loaded_at, 0)
        .unwrap_or_default()
        .to_rfc3339()
}

/// `GET /api/tags`.
pub async fn tags(State(state): State<AppState>) -> Response {
    let models: Vec<Value> = state
        .engine
        .models()
        .iter()
        .map(|m| {
            json!({
                "name": ollama_name(&m.name),
                "model": ollama_name(&m.name),
                "modified_at": modified_at(m),
                "size": m.size_bytes,
                "digest": m.sha256,
                "details": details(m),
            })
        })
        .collect();
    axum::Json(json!({"models": models})).into_response()
}

/// `GET /api/ps`.
pub async fn ps(State(state): State<AppState>) -> Response {
    let models: Vec<Value> = state
        .engine
        .models()
        .iter()
        .map(|m| {
            json!({
                "name": ollama_name(&m.name),
                "model": ollama_name(&m.name),
                "size": m.size_bytes,
                "digest": m.sha256,
                "details": details(m),
                "expires_at": "9999-12-31T23:59:59Z",
                "size_vram": state.engine.vram_bytes(m),
                "context_length": m.context_length,
            })
        })
        .collect();
    axum::Json(json!({"models": models})).into_response()
}

/// `POST /api/show`.
pub async fn show(State(state): State<AppState>, body: Bytes) -> Response {
    let req: ShowRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => return ollama_error(&state, None, e),
    };
    let Some(name) = req.model.or(req.name) else {
        return ollama_error(&state, None, ApiError::bad_param("model", "is required"));
    };
    let model = match resolve(&state, &name) {
        Ok(m) => m,
        Err(e) => return ollama_error(&state, None, e),
    };
    let Some(loaded) = state.engine.get(&model) else {
        return ollama_error(&state, None, ApiError::model_not_found(&name));
    };
    let m = &loaded.card;
    let arch = m.architecture.as_str();
    axum::Json(json!({
        "license": "",
        "modelfile": format!("FROM {}\n", m.file_name),
        "parameters": "",
        "template": "",
        "details": details(m),
        "model_info": {
            "general.architecture": arch,
            "general.parameter_count": m.parameter_count,
            format!("{arch}.context_length"): m.context_length,
        },
        "capabilities": ["completion"],
        "modified_at": modified_at(m),
    }))
    .into_response()
}

/// `GET /api/version`.
pub async fn version() -> Response {
    axum::Json(json!({"version": OLLAMA_API_VERSION})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_map_to_sampling() {
        let o: Options =
            serde_json::from_value(json!({"num_predict": 8, "temperature": 0.0, "stop": ["\n"]}))
                .expect("options");
        let s = sampling_from(&o, &Some(json!("json"))).expect("valid");
        assert_eq!(s.max_tokens, Some(8));
        assert_eq!(s.format, OutputFormat::JsonObject);
        let o: Options = serde_json::from_value(json!({"num_predict": -1})).expect("options");
        assert_eq!(sampling_from(&o, &None).expect("valid").max_tokens, None);
        let o: Options = serde_json::from_value(json!({"temperature": 9})).expect("options");
        assert_eq!(
            sampling_from(&o, &None).expect_err("bad").param.as_deref(),
            Some("options.temperature")
        );
        assert!(sampling_from(&Options::default(), &Some(json!(3))).is_err());
    }

    #[test]
    fn sizes_read_like_ollama() {
        assert_eq!(parameter_size(Some(134_515_008)), "135M");
        assert_eq!(parameter_size(Some(7_241_732_096)), "7.2B");
        assert_eq!(ollama_name("smollm2"), "smollm2:latest");
        assert_eq!(ollama_name("llama3:8b"), "llama3:8b");
    }
}
