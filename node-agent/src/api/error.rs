//! Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered to an HTTP client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }

    /// 400 naming the offending field.
    pub fn bad_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        let message = format!("{param}: {}", message.into());
        Self {
            param: Some(param),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400 for a body that is not the JSON the endpoint takes.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 404 for a model this server does not serve.
    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "The model `{model}` does not exist or is not served here; GET /v1/models lists the models served."
                ),
            )
        }
    }

    /// 400 when prompt plus the tokens asked for exceed the model's context.
    pub fn context_exceeded(prompt: usize, max_tokens: usize, context: usize) -> Self {
        Self {
            param: Some("messages".into()),
            code: Some("context_length_exceeded"),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!(
                    "This model's maximum context length is {context} tokens. However, you requested {} tokens ({prompt} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion.",
                    prompt + max_tokens
                ),
            )
        }
    }

    /// 429 when the model's queue is full.
    pub fn queue_full(model: &str, retry_after_secs: u64) -> Self {
        Self {
            code: Some("rate_limit_exceeded"),
            retry_after_secs: Some(retry_after_secs),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("The queue of model `{model}` is full; retry after {retry_after_secs} s."),
            )
        }
    }

    /// 503 while a model is not loaded yet or is shutting down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after_secs: Some(5),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    /// 500 for an engine failure.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// 404 for a path no handler serves.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown request URL: {path}"),
        )
    }

    /// 405 for a known path with the wrong method.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "Method not allowed for this URL",
        )
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_secs {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// Parses a JSON body, naming the field on a type error.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::malformed(
            "The request body is empty; send a JSON object.",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::malformed(format!("The request body is not valid JSON: {inner}"))
        } else if path == "." || path.is_empty() {
            ApiError::malformed(format!("Invalid request: {inner}"))
        } else {
            ApiError::bad_param(path, inner.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct T {
        #[allow(dead_code)]
        temperature: Option<f64>,
        #[allow(dead_code)]
        model: String,
    }

    #[test]
    fn names_the_field_of_a_type_error() {
        let e = parse_json::<T>(br#"{"model":"m","temperature":"hot"}"#).expect_err("bad type");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = parse_json::<T>(br#"{"model":"#).expect_err("bad json");
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse_json::<T>(br#"{"temperature":1}"#).expect_err("missing");
        assert!(e.message.contains("model"), "{}", e.message);
    }

    #[test]
    fn error_shape_is_openai() {
        let b = ApiError::model_not_found("x").body();
        assert_eq!(b["error"]["code"], "model_not_found");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["param"], "model");
    }
}
