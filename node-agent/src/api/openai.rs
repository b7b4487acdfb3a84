//! OpenAI-compatible endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::{ApiError, parse_json};
use super::{AppState, Generation, Tracked};
use crate::engine::types::{ChatTurn, Event, OutputFormat, Prompt, Sampling, ToolCall, Usage};

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `response_format`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaSpec },
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaSpec {
    #[allow(dead_code)]
    pub name: Option<String>,
    pub schema: Value,
}

/// Message content: text, or parts of which only text parts are accepted.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    pub name: Option<String>,
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<String>,
}

/// Sampling fields shared by chat and text completions.
#[derive(Debug, Deserialize, Default)]
pub struct CommonParams {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<Value>,
    pub response_format: Option<ResponseFormat>,
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    /// Parsed separately from the same body, so type errors name their field.
    #[serde(skip)]
    pub common: CommonParams,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Value,
    pub suffix: Option<String>,
    pub echo: Option<bool>,
    #[serde(skip)]
    pub common: CommonParams,
}

fn positive(field: &str, v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(n) if n >= 1 => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
        Some(n) => Err(ApiError::bad_param(
            field,
            format!("must be at least 1, got {n}"),
        )),
    }
}

fn in_range(field: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => Err(ApiError::bad_param(
            field,
            format!("must be between {lo} and {hi}, got {x}"),
        )),
        _ => Ok(()),
    }
}

/// Validates the shared parameters and turns them into [`Sampling`].
pub fn sampling_from(c: &CommonParams) -> Result<Sampling, ApiError> {
    let max_tokens = match (
        positive("max_completion_tokens", c.max_completion_tokens)?,
        positive("max_tokens", c.max_tokens)?,
    ) {
        (Some(a), _) => Some(a),
        (None, b) => b,
    };
    in_range("temperature", c.temperature, 0.0, 2.0)?;
    match c.top_p {
        Some(p) if !(p > 0.0 && p <= 1.0) => {
            return Err(ApiError::bad_param(
                "top_p",
                format!("must be greater than 0 and at most 1, got {p}"),
            ));
        }
        _ => {}
    }
    in_range("min_p", c.min_p, 0.0, 1.0)?;
    in_range("presence_penalty", c.presence_penalty, -2.0, 2.0)?;
    in_range("frequency_penalty", c.frequency_penalty, -2.0, 2.0)?;
    in_range("repetition_penalty", c.repetition_penalty, 0.0, 10.0)?;
    if let Some(n) = c.n {
        if n != 1 {
            return Err(ApiError::bad_param(
                "n",
                format!("only 1 choice per request is supported, got {n}"),
            ));
        }
    }
    match &c.logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(_) => {
            return Err(ApiError::bad_param(
                "logprobs",
                "log probabilities are not supported",
            ));
        }
    }
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
        Some(k) => {
            return Err(ApiError::bad_param(
                "top_k",
                format!("must be positive, got {k}"),
            ));
        }
    };
    let stop = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 4 {
        return Err(ApiError::bad_param(
            "stop",
            format!("at most 4 sequences, got {}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_param("stop", "sequences must not be empty"));
    }
    let seed = match c.seed {
        None => None,
        Some(s) => Some(
            u64::try_from(s).map_err(|_| ApiError::bad_param("seed", "must not be negative"))?,
        ),
    };
    let format = match &c.response_format {
        None | Some(ResponseFormat::Text) => OutputFormat::Text,
        Some(ResponseFormat::JsonObject) => OutputFormat::JsonObject,
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            if !json_schema.schema.is_object() {
                return Err(ApiError::bad_param(
                    "response_format.json_schema.schema",
                    "must be a JSON Schema object",
                ));
            }
            OutputFormat::JsonSchema(json_schema.schema.clone())
        }
    };
    Ok(Sampling {
        max_tokens,
        temperature: c.temperature,
        top_p: c.top_p,
        top_k,
        min_p: c.min_p,
        stop,
        seed,
        presence_penalty: c.presence_penalty.map(|v| v as f32),
        frequency_penalty: c.frequency_penalty.map(|v| v as f32),
        repeat_penalty: c.repetition_penalty.map(|v| v as f32),
        format,
    })
}

/// Validates chat messages and flattens their content to text.
pub fn chat_turns(messages: &[ChatMessage]) -> Result<Vec<ChatTurn>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "must contain at least one message",
        ));
    }
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = m.role.as_str();
        if !matches!(role, "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(ApiError::bad_param(
                format!("messages[{i}].role"),
                format!("must be one of system, developer, user, assistant, tool; got {role:?}"),
            ));
        }
        let content = match &m.content {
            None => {
                if role == "assistant" && m.tool_calls.is_some() {
                    String::new()
                } else {
                    return Err(ApiError::bad_param(
                        format!("messages[{i}].content"),
                        "is required",
                    ));
                }
            }
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        ("text", None) => {
                            return Err(ApiError::bad_param(
                                format!("messages[{i}].content[{j}].text"),
                                "is required for a text part",
                            ));
                        }
                        (other, _) => {
                            return Err(ApiError::bad_param(
                                format!("messages[{i}].content[{j}].type"),
                                format!("{other:?} parts are not supported by this text model"),
                            ));
                        }
                    }
                }
                text
            }
        };
        if role == "tool" && m.tool_call_id.is_none() {
            return Err(ApiError::bad_param(
                format!("messages[{i}].tool_call_id"),
                "is required for tool messages",
            ));
        }
        let role = if role == "developer" { "system" } else { role };
        turns.push(ChatTurn {
            role: role.to_string(),
            content,
            tool_calls: m.tool_calls.clone(),
            tool_call_id: m.tool_call_id.clone(),
            name: m.name.clone(),
        });
    }
    Ok(turns)
}

fn validate_tools(tools: &Option<Vec<Value>>) -> Result<(), ApiError> {
    for (i, t) in tools.iter().flatten().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::bad_param(
                format!("tools[{i}].type"),
                "must be \"function\"",
            ));
        }
        if t.pointer("/function/name")
            .and_then(Value::as_str)
            .is_none()
        {
            return Err(ApiError::bad_param(
                format!("tools[{i}].function.name"),
                "is required",
            ));
        }
    }
    Ok(())
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

fn tool_calls_json(calls: &[ToolCall], with_index: bool) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut v = json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                });
                if with_index {
                    v["index"] = json!(i);
                }
                v
            })
            .collect(),
    )
}

/// `POST /v1/chat/completions`.
/// Parses a request body and, separately, its sampling fields.
fn parse_with_common<T: serde::de::DeserializeOwned>(
    body: &[u8],
    set: impl FnOnce(&mut T, CommonParams),
) -> Result<T, ApiError> {
    let mut req: T = parse_json(body)?;
    let common: CommonParams = parse_json(body)?;
    set(&mut req, common);
    Ok(req)
}

pub async fn chat_completions(State(state): State<AppState>, body: Bytes) -> Response {
    let req: ChatCompletionRequest =
        match parse_with_common(&body, |r: &mut ChatCompletionRequest, c| r.common = c) {
            Ok(r) => r,
            Err(e) => return state.fail(None, e),
        };
    let model = req.model.clone();
    let prepared = (|| {
        let sampling = sampling_from(&req.common)?;
        let messages = chat_turns(&req.messages)?;
        validate_tools(&req.tools)?;
        Ok::<_, ApiError>((
            Prompt::Chat {
                messages,
                tools: req.tools.clone(),
                tool_choice: req.tool_choice.clone(),
            },
            sampling,
        ))
    })();
    let (prompt, sampling) = match prepared {
        Ok(p) => p,
        Err(e) => return state.fail(Some(&model), e),
    };
    let generation = match state.start(&model, prompt, sampling).await {
        Ok(g) => g,
        Err(e) => return state.fail(Some(&model), e),
    };
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let served = generation.model_name().to_string();
    if req.common.stream.unwrap_or(false) {
        let include_usage = req
            .common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        return Sse::new(chat_stream(generation, id, served, include_usage))
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    let mut tracked = generation.tracked();
    let (text, calls, reason, usage) = match tracked.collect().await {
        Ok(r) => r,
        Err(e) => return state.fail(Some(&model), e),
    };
    let mut message = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        message["tool_calls"] = tool_calls_json(&calls, false);
    }
    axum::Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": now_unix(),
        "model": served,
        "choices": [{"index": 0, "message": message, "finish_reason": reason.as_str(), "logprobs": null}],
        "usage": usage_json(&usage),
    }))
    .into_response()
}

fn chat_stream(
    generation: Generation,
    id: String,
    model: String,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream::stream! {
        let created = now_unix();
        let chunk = |delta: Value, finish: Option<&str>, usage: Option<Value>| {
            let mut v = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
            });
            if include_usage {
                v["usage"] = usage.unwrap_or(Value::Null);
            }
            SseEvent::default().data(v.to_string())
        };
        yield Ok(chunk(json!({"role": "assistant", "content": ""}), None, None));
        let mut tracked: Tracked = generation.tracked();
        loop {
            match tracked.next().await {
                Some(Ok(Event::Delta { text, tool_calls })) => {
                    let mut delta = json!({"content": text});
                    if !tool_calls.is_empty() {
                        delta["tool_calls"] = tool_calls_json(&tool_calls, true);
                    }
                    yield Ok(chunk(delta, None, None));
                }
                Some(Ok(Event::Finished { reason, usage })) => {
                    yield Ok(chunk(json!({}), Some(reason.as_str()), None));
                    if include_usage {
                        let v = json!({
                            "id": id, "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": [], "usage": usage_json(&usage),
                        });
                        yield Ok(SseEvent::default().data(v.to_string()));
                    }
                    break;
                }
                Some(Err(e)) => {
                    yield Ok(SseEvent::default().data(e.body().to_string()));
                    break;
                }
                None => break,
            }
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    }
}

/// The prompt of a text completion: a string, or a list holding one string.
fn completion_prompt(v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            Ok(a[0].as_str().unwrap_or_default().to_string())
        }
        Value::Array(a) if a.len() > 1 => Err(ApiError::bad_param(
            "prompt",
            "only one prompt per request is supported",
        )),
        _ => Err(ApiError::bad_param("prompt", "must be a string")),
    }
}

/// `POST /v1/completions`.
pub async fn completions(State(state): State<AppState>, body: Bytes) -> Response {
    let req: CompletionRequest =
        match parse_with_common(&body, |r: &mut CompletionRequest, c| r.common = c) {
            Ok(r) => r,
            Err(e) => return state.fail(None, e),
        };
    let model = req.model.clone();
    let prepared = (|| {
        if req.suffix.is_some() {
            return Err(ApiError::bad_param("suffix", "is not supported"));
        }
        let prompt = completion_prompt(&req.prompt)?;
        Ok((prompt, sampling_from(&req.common)?))
    })();
    let (prompt_text, sampling) = match prepared {
        Ok(p) => p,
        Err(e) => return state.fail(Some(&model), e),
    };
    let echo = req.echo.unwrap_or(false);
    let generation = match state
        .start(&model, Prompt::Text(prompt_text.clone()), sampling)
        .await
    {
        Ok(g) => g,
        Err(e) => return state.fail(Some(&model), e),
    };
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let served = generation.model_name().to_string();
    if req.common.stream.unwrap_or(false) {
        let include_usage = req
            .common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        let stream = async_stream::stream! {
            let created = now_unix();
            let mut tracked = generation.tracked();
            let chunk = |text: String, finish: Option<&str>| json!({
                "id": id, "object": "text_completion", "created": created, "model": served,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}],
            });
            if echo {
                yield Ok::<_, Infallible>(SseEvent::default().data(chunk(prompt_text.clone(), None).to_string()));
            }
            loop {
                match tracked.next().await {
                    Some(Ok(Event::Delta { text, .. })) => {
                        yield Ok(SseEvent::default().data(chunk(text, None).to_string()));
                    }
                    Some(Ok(Event::Finished { reason, usage })) => {
                        yield Ok(SseEvent::default().data(chunk(String::new(), Some(reason.as_str())).to_string()));
                        if include_usage {
                            let v = json!({"id": id, "object": "text_completion", "created": created,
                                "model": served, "choices": [], "usage": usage_json(&usage)});
                            yield Ok(SseEvent::default().data(v.to_string()));
                        }
                        break;
                    }
                    Some(Err(e)) => {
                        yield Ok(SseEvent::default().data(e.body().to_string()));
                        break;
                    }
                    None => break,
                }
            }
            yield Ok(SseEvent::default().data("[DONE]"));
        };
        return Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    let mut tracked = generation.tracked();
    let (text, _calls, reason, usage) = match tracked.collect().await {
        Ok(r) => r,
        Err(e) => return state.fail(Some(&model), e),
    };
    let text = if echo {
        format!("{prompt_text}{text}")
    } else {
        text
    };
    axum::Json(json!({
        "id": id,
        "object": "text_completion",
        "created": now_unix(),
        "model": served,
        "choices": [{"index": 0, "text": text, "finish_reason": reason.as_str(), "logprobs": null}],
        "usage": usage_json(&usage),
    }))
    .into_response()
}

/// `GET /v1/models`.
pub async fn models(State(state): State<AppState>) -> Response {
    let data: Vec<Value> = state
        .engine
        .models()
        .into_iter()
        .map(|m| {
            json!({
                "id": m.name,
                "object": "model",
                "created": m.loaded_at,
                "owned_by": "localmodel",
                "max_model_len": m.context_length,
                "root": m.file_name,
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(v: Value) -> CommonParams {
        serde_json::from_value(v).expect("params")
    }

    #[test]
    fn validates_sampling_and_names_fields() {
        let s = sampling_from(&common(
            json!({"max_tokens": 5, "temperature": 0.5, "stop": "x"}),
        ))
        .expect("valid");
        assert_eq!(s.max_tokens, Some(5));
        assert_eq!(s.stop, vec!["x".to_string()]);
        let s = sampling_from(&common(
            json!({"max_tokens": 5, "max_completion_tokens": 7}),
        ))
        .expect("valid");
        assert_eq!(s.max_tokens, Some(7));
        for (body, field) in [
            (json!({"temperature": 3.0}), "temperature"),
            (json!({"top_p": 0.0}), "top_p"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (
                json!({"max_completion_tokens": -1}),
                "max_completion_tokens",
            ),
            (json!({"n": 2}), "n"),
            (json!({"stop": ["a","b","c","d","e"]}), "stop"),
            (json!({"presence_penalty": 5}), "presence_penalty"),
            (json!({"seed": -1}), "seed"),
            (json!({"logprobs": true}), "logprobs"),
        ] {
            let e = sampling_from(&common(body.clone())).expect_err("invalid");
            assert_eq!(e.param.as_deref(), Some(field), "{body}");
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn response_format_json_schema() {
        let s = sampling_from(&common(json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object"}}}})))
        .expect("valid");
        assert_eq!(
            s.format,
            OutputFormat::JsonSchema(json!({"type": "object"}))
        );
    }

    #[test]
    fn validates_messages() {
        let msgs: Vec<ChatMessage> = serde_json::from_value(json!([
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}
        ]))
        .expect("messages");
        let turns = chat_turns(&msgs).expect("valid");
        assert_eq!(turns[0].role, "system");
        assert_eq!(turns[1].content, "hi there");
        let bad: Vec<ChatMessage> =
            serde_json::from_value(json!([{"role": "wizard", "content": "x"}])).expect("parse");
        assert_eq!(
            chat_turns(&bad).expect_err("role").param.as_deref(),
            Some("messages[0].role")
        );
        let img: Vec<ChatMessage> =
            serde_json::from_value(json!([{"role": "user", "content": [{"type": "image_url"}]}]))
                .expect("parse");
        assert_eq!(
            chat_turns(&img).expect_err("image").param.as_deref(),
            Some("messages[0].content[0].type")
        );
        assert!(chat_turns(&[]).is_err());
    }
}
