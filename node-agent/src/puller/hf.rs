//! `hf://ORG/REPO/PATH[@REV]`: a file of a Hugging Face model repository.
//!
//! Honours `HF_ENDPOINT` (a mirror or a local server in the hub's layout) and `HF_TOKEN`. The
//! hub publishes the sha256 of large files in `X-Linked-Etag`; the download is checked against it.

use reqwest::header::{self, HeaderMap, HeaderValue};
use tokio::sync::watch;

use super::{PullError, PullProgress, Puller};
use crate::cache::CachedBlob;

/// The public hub, used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// URL of a file at a revision, in the hub's `resolve` layout.
pub fn resolve_url(endpoint: &str, repo: &str, path: &str, revision: Option<&str>) -> String {
    let rev = revision.unwrap_or("main");
    let rev: String = rev
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!(
        "{}/{repo}/resolve/{rev}/{path}",
        endpoint.trim_end_matches('/')
    )
}

/// The sha256 the hub publishes for a file: `X-Linked-Etag` (large files), else an `ETag` that
/// is a sha256.
pub fn published_digest(h: &HeaderMap) -> Option<String> {
    for name in ["x-linked-etag", header::ETAG.as_str()] {
        if let Some(v) = h.get(name).and_then(|v| v.to_str().ok()) {
            let v = v.trim().trim_start_matches("W/").trim_matches('"');
            if crate::cache::check_digest(v).is_ok() {
                return Some(v.to_string());
            }
        }
    }
    None
}

pub(crate) async fn pull(
    p: &Puller,
    key: &str,
    repo: &str,
    path: &str,
    revision: Option<&str>,
    pin: Option<&str>,
    progress: &watch::Sender<PullProgress>,
) -> Result<CachedBlob, PullError> {
    let cfg = p.config();
    let url = resolve_url(&cfg.hf_endpoint, repo, path, revision);
    let mut headers = HeaderMap::new();
    if let Some(token) = &cfg.hf_token {
        let v = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| PullError::Invalid("HF_TOKEN contains invalid characters".into()))?;
        headers.insert(header::AUTHORIZATION, v);
    }
    // The hub answers `resolve` of a large file with a redirect that carries the digest; the
    // redirected download does not. Ask for the headers first without following redirects.
    let head_client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|source| PullError::Network {
            url: url.clone(),
            source,
        })?;
    let mut published = None;
    match head_client.head(&url).headers(headers.clone()).send().await {
        Ok(resp) if resp.status() == reqwest::StatusCode::NOT_FOUND => {
            return Err(PullError::NotFound { url });
        }
        Ok(resp)
            if resp.status() == reqwest::StatusCode::UNAUTHORIZED
                || resp.status() == reqwest::StatusCode::FORBIDDEN =>
        {
            return Err(PullError::Unauthorized {
                url,
                status: resp.status(),
            });
        }
        Ok(resp) => published = published_digest(resp.headers()),
        Err(e) => tracing::debug!(%url, error = %e, "HEAD failed; continuing with GET"),
    }
    let d = p
        .download_with_retries(key, &url, headers, progress)
        .await?;
    let published = published.or_else(|| published_digest(&d.headers));
    let file_name = path.rsplit('/').next().unwrap_or(path).to_string();
    p.verify_and_commit(d, key, &file_name, pin, published.as_deref(), progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_resolve_urls() {
        assert_eq!(
            resolve_url("http://127.0.0.1:9/", "org/repo", "dir/m.gguf", None),
            "http://127.0.0.1:9/org/repo/resolve/main/dir/m.gguf"
        );
        assert_eq!(
            resolve_url("https://hub.example", "o/r", "m.gguf", Some("refs/pr/1")),
            "https://hub.example/o/r/resolve/refs%2Fpr%2F1/m.gguf"
        );
    }

    #[test]
    fn reads_linked_etag() {
        let d = "a".repeat(64);
        let mut h = HeaderMap::new();
        h.insert("etag", HeaderValue::from_static("\"abc\""));
        assert_eq!(published_digest(&h), None);
        h.insert(
            "x-linked-etag",
            HeaderValue::from_str(&format!("\"{d}\"")).expect("header"),
        );
        assert_eq!(published_digest(&h), Some(d));
    }
}
