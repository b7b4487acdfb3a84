//! `node-agent chat`: one chat completion against an OpenAI-compatible endpoint, printed to
//! stdout. The chart's `helm test` hook runs it against a model's Service; people use it to
//! check a model from inside the cluster without another image.

use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::ChatArgs;

/// Why a chat request failed.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{url}: {source}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url} answered 200 without a message: {body}")]
    NoMessage { url: String, body: String },
}

/// The completions URL for a base URL given with or without `/v1`.
pub fn completions_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1") {
        format!("{base}/chat/completions")
    } else {
        format!("{base}/v1/chat/completions")
    }
}

/// The message of an OpenAI-shaped error body, else the body itself.
fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.chars().take(500).collect())
}

/// Sends the prompt and returns the assistant's reply.
pub async fn chat(args: &ChatArgs) -> Result<String, ChatError> {
    let url = completions_url(&args.url);
    let request = |source| ChatError::Request {
        url: url.clone(),
        source,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_seconds))
        .build()
        .map_err(request)?;
    let body = json!({
        "model": args.model,
        "messages": [{ "role": "user", "content": args.prompt }],
        "max_tokens": args.max_tokens,
    });
    let response = client
        .post(&url)
        .json(&body)
        .send()
        .await
        .map_err(request)?;
    let status = response.status();
    let text = response.text().await.map_err(request)?;
    if !status.is_success() {
        return Err(ChatError::Status {
            url,
            status: status.as_u16(),
            message: error_message(&text),
        });
    }
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    match v["choices"][0]["message"]["content"].as_str() {
        Some(content) => {
            let usage = &v["usage"];
            tracing::info!(
                model = %args.model,
                prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0),
                completion_tokens = usage["completion_tokens"].as_u64().unwrap_or(0),
                "chat completion"
            );
            Ok(content.to_string())
        }
        None => Err(ChatError::NoMessage {
            url,
            body: text.chars().take(500).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_url_takes_either_base() {
        assert_eq!(
            completions_url("http://smollm2.default.svc/v1"),
            "http://smollm2.default.svc/v1/chat/completions"
        );
        assert_eq!(
            completions_url("http://smollm2.default.svc/"),
            "http://smollm2.default.svc/v1/chat/completions"
        );
    }

    #[test]
    fn error_message_reads_the_openai_shape() {
        assert_eq!(
            error_message(
                r#"{"error":{"message":"model 'x' not found","type":"invalid_request_error"}}"#
            ),
            "model 'x' not found"
        );
        assert_eq!(error_message("upstream down"), "upstream down");
    }
}
