//! Content-addressed weight cache on the node's disk.
//!
//! Layout under the cache root:
//! - `blobs/sha256-<hex>/<file name>` plus `blobs/sha256-<hex>/meta.json`: one directory per
//!   verified blob, moved into place with a single `rename`, so a blob is either complete and
//!   verified or absent.
//! - `refs/<sha256 of the source URI>.json`: which blob a source resolved to, so a repeated pull
//!   of the same source needs no network.
//! - `partial/`: downloads in progress, kept across restarts so they can resume.
//! - `locks/`: one lock file per source, so two processes never download the same source at once.
//!
//! The cache has a byte capacity. Making room evicts the least recently used blobs that no
//! loaded model pins.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Errors of the weight cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cache metadata {path} is corrupt: {source}")]
    Meta {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the cache cannot hold {needed} more bytes: capacity {capacity}, {pinned} bytes are in use by loaded models"
    )]
    Full {
        needed: u64,
        capacity: u64,
        pinned: u64,
    },
    #[error("{0:?} is not a sha256 digest (expected 64 lowercase hex characters)")]
    BadDigest(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the cache knows about one verified blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMeta {
    /// Lowercase hex sha256 of the content.
    pub sha256: String,
    pub size: u64,
    /// Original file name (the engine sees this name, extension included).
    pub file_name: String,
    /// Sources that resolved to this blob.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Seconds since the epoch of the last pull hit or load.
    pub last_used: u64,
}

/// A verified blob in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedBlob {
    pub meta: BlobMeta,
    /// Path of the weights file.
    pub path: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
struct SourceRef {
    source: String,
    sha256: String,
}

/// Bytes used and the capacity, for metrics and GPUNode status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheUsage {
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub digests: Vec<String>,
}

/// The node's weight cache.
#[derive(Debug)]
pub struct Cache {
    root: PathBuf,
    capacity: u64,
    /// Digest -> number of loaded models using it. Pinned blobs are never evicted.
    pins: Mutex<HashMap<String, usize>>,
    /// Serialises index changes (commit, evict) within this process.
    index: Mutex<()>,
}

/// Checks that `s` is a lowercase hex sha256.
pub fn check_digest(s: &str) -> Result<(), CacheError> {
    if s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(CacheError::BadDigest(s.to_string()))
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Hex sha256 of a string (used to name refs and partial downloads by source).
pub fn key_of(source: &str) -> String {
    hex::encode(Sha256::digest(source.as_bytes()))
}

fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), CacheError> {
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(value).map_err(|source| CacheError::Meta {
        path: path.to_path_buf(),
        source,
    })?;
    fs::write(&tmp, body).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, CacheError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| CacheError::Meta {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CacheError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

impl Cache {
    /// Opens (creating if needed) a cache at `root` holding at most `capacity` bytes.
    pub fn open(root: impl Into<PathBuf>, capacity: u64) -> Result<Self, CacheError> {
        let root = root.into();
        for sub in ["blobs", "refs", "partial", "tmp", "locks"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        // Leftovers of a commit interrupted by a crash are never valid blobs.
        let tmp = root.join("tmp");
        if let Ok(entries) = fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let p = entry.path();
                let _ = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        }
        Ok(Self {
            root,
            capacity,
            pins: Mutex::new(HashMap::new()),
            index: Mutex::new(()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn blob_dir(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(format!("sha256-{sha256}"))
    }

    fn ref_path(&self, source: &str) -> PathBuf {
        self.root
            .join("refs")
            .join(format!("{}.json", key_of(source)))
    }

    /// Where a download of `source` in progress keeps its bytes (and `.json` next to it).
    pub fn partial_path(&self, source: &str) -> PathBuf {
        self.root
            .join("partial")
            .join(format!("{}.part", key_of(source)))
    }

    /// A scratch path for staging a file before [`Cache::commit`].
    pub fn scratch_path(&self, name: &str) -> PathBuf {
        self.root.join("tmp").join(name)
    }

    /// The blob with this digest, if present and complete.
    pub fn get(&self, sha256: &str) -> Result<Option<CachedBlob>, CacheError> {
        check_digest(sha256)?;
        let dir = self.blob_dir(sha256);
        let Some(meta) = read_json::<BlobMeta>(&dir.join("meta.json"))? else {
            return Ok(None);
        };
        let path = dir.join(&meta.file_name);
        match fs::metadata(&path) {
            Ok(m) if m.len() == meta.size => Ok(Some(CachedBlob { meta, path })),
            Ok(_) | Err(_) => Ok(None),
        }
    }

    /// The blob a source resolved to before, if it is still cached.
    pub fn lookup_source(&self, source: &str) -> Result<Option<CachedBlob>, CacheError> {
        let Some(r) = read_json::<SourceRef>(&self.ref_path(source))? else {
            return Ok(None);
        };
        if r.source != source {
            return Ok(None);
        }
        self.get(&r.sha256)
    }

    /// Records that `source` resolves to an already cached blob.
    pub fn add_ref(&self, source: &str, sha256: &str) -> Result<(), CacheError> {
        check_digest(sha256)?;
        let _g = self.index.lock().unwrap_or_else(|p| p.into_inner());
        write_json_atomic(
            &self.ref_path(source),
            &SourceRef {
                source: source.to_string(),
                sha256: sha256.to_string(),
            },
        )?;
        let meta_path = self.blob_dir(sha256).join("meta.json");
        if let Some(mut meta) = read_json::<BlobMeta>(&meta_path)? {
            if !meta.sources.iter().any(|s| s == source) {
                meta.sources.push(source.to_string());
                write_json_atomic(&meta_path, &meta)?;
            }
        }
        Ok(())
    }

    /// Marks a blob as just used (LRU order).
    pub fn touch(&self, sha256: &str) -> Result<(), CacheError> {
        check_digest(sha256)?;
        let _g = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let meta_path = self.blob_dir(sha256).join("meta.json");
        if let Some(mut meta) = read_json::<BlobMeta>(&meta_path)? {
            meta.last_used = now_secs().max(meta.last_used);
            write_json_atomic(&meta_path, &meta)?;
        }
        Ok(())
    }

    /// Moves a fully written and verified file into the cache under its digest.
    ///
    /// Makes room first (evicting unpinned blobs, least recently used first). The move is one
    /// directory rename, so readers never see a partial blob.
    pub fn commit(
        &self,
        staged: &Path,
        sha256: &str,
        file_name: &str,
        source: &str,
    ) -> Result<CachedBlob, CacheError> {
        check_digest(sha256)?;
        let size = fs::metadata(staged).map_err(io_err(staged))?.len();
        if let Some(existing) = self.get(sha256)? {
            let _ = fs::remove_file(staged);
            self.add_ref(source, sha256)?;
            self.touch(sha256)?;
            return Ok(existing);
        }
        self.make_room(size)?;
        let _g = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let file_name = sanitize_file_name(file_name);
        let stage_dir = self.root.join("tmp").join(format!("commit-{sha256}"));
        let _ = fs::remove_dir_all(&stage_dir);
        fs::create_dir_all(&stage_dir).map_err(io_err(&stage_dir))?;
        let target_file = stage_dir.join(&file_name);
        fs::rename(staged, &target_file).map_err(io_err(staged))?;
        let meta = BlobMeta {
            sha256: sha256.to_string(),
            size,
            file_name: file_name.clone(),
            sources: vec![source.to_string()],
            last_used: now_secs(),
        };
        write_json_atomic(&stage_dir.join("meta.json"), &meta)?;
        let dir = self.blob_dir(sha256);
        fs::rename(&stage_dir, &dir).map_err(io_err(&dir))?;
        write_json_atomic(
            &self.ref_path(source),
            &SourceRef {
                source: source.to_string(),
                sha256: sha256.to_string(),
            },
        )?;
        Ok(CachedBlob {
            path: dir.join(&file_name),
            meta,
        })
    }

    /// All complete blobs.
    pub fn list(&self) -> Result<Vec<BlobMeta>, CacheError> {
        let dir = self.root.join("blobs");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name();
            let Some(digest) = name.to_str().and_then(|n| n.strip_prefix("sha256-")) else {
                continue;
            };
            if let Ok(Some(blob)) = self.get(digest) {
                out.push(blob.meta);
            }
        }
        out.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        Ok(out)
    }

    /// Bytes used, capacity and the digests held.
    pub fn usage(&self) -> Result<CacheUsage, CacheError> {
        let blobs = self.list()?;
        Ok(CacheUsage {
            used_bytes: blobs.iter().map(|b| b.size).sum(),
            capacity_bytes: self.capacity,
            digests: blobs.into_iter().map(|b| b.sha256).collect(),
        })
    }

    /// Marks a blob as used by a loaded model: it will not be evicted until unpinned.
    pub fn pin(&self, sha256: &str) {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        *pins.entry(sha256.to_string()).or_default() += 1;
    }

    /// Releases one pin taken by [`Cache::pin`].
    pub fn unpin(&self, sha256: &str) {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = pins.get_mut(sha256) {
            *n -= 1;
            if *n == 0 {
                pins.remove(sha256);
            }
        }
    }

    fn is_pinned(&self, sha256: &str) -> bool {
        self.pins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(sha256)
    }

    /// Evicts unpinned blobs, least recently used first, until `needed` more bytes fit.
    /// Returns the digests evicted.
    pub fn make_room(&self, needed: u64) -> Result<Vec<String>, CacheError> {
        let _g = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let blobs = self.list()?;
        let used: u64 = blobs.iter().map(|b| b.size).sum();
        if used.saturating_add(needed) <= self.capacity {
            return Ok(Vec::new());
        }
        let pinned: u64 = blobs
            .iter()
            .filter(|b| self.is_pinned(&b.sha256))
            .map(|b| b.size)
            .sum();
        if pinned.saturating_add(needed) > self.capacity {
            return Err(CacheError::Full {
                needed,
                capacity: self.capacity,
                pinned,
            });
        }
        let mut candidates: Vec<&BlobMeta> = blobs
            .iter()
            .filter(|b| !self.is_pinned(&b.sha256))
            .collect();
        candidates.sort_by_key(|b| (b.last_used, b.sha256.clone()));
        let mut used = used;
        let mut evicted = Vec::new();
        for b in candidates {
            if used.saturating_add(needed) <= self.capacity {
                break;
            }
            self.remove_blob(b)?;
            used -= b.size;
            evicted.push(b.sha256.clone());
            tracing::info!(sha256 = %b.sha256, size = b.size, "evicted cached weights");
        }
        Ok(evicted)
    }

    fn remove_blob(&self, b: &BlobMeta) -> Result<(), CacheError> {
        for source in &b.sources {
            let _ = fs::remove_file(self.ref_path(source));
        }
        let dir = self.blob_dir(&b.sha256);
        // Rename first so a concurrent reader never sees a half-deleted blob.
        let doomed = self.root.join("tmp").join(format!("evict-{}", b.sha256));
        fs::rename(&dir, &doomed).map_err(io_err(&dir))?;
        fs::remove_dir_all(&doomed).map_err(io_err(&doomed))
    }
}

/// Keeps only the last path component and replaces characters that are unsafe in file names.
fn sanitize_file_name(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    let cleaned: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() || cleaned.chars().all(|c| c == '.') {
        "model.bin".to_string()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(cache: &Cache, name: &str, bytes: &[u8]) -> (PathBuf, String) {
        let p = cache.scratch_path(name);
        fs::write(&p, bytes).expect("write staged file");
        (p, hex::encode(Sha256::digest(bytes)))
    }

    #[test]
    fn commit_then_lookup_by_source_and_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path(), 1000).expect("open");
        let (p, d) = stage(&cache, "a", b"hello weights");
        let blob = cache
            .commit(&p, &d, "m.gguf", "file:///m.gguf")
            .expect("commit");
        assert_eq!(blob.meta.size, 13);
        assert!(blob.path.ends_with("m.gguf"));
        assert_eq!(fs::read(&blob.path).expect("read"), b"hello weights");
        assert_eq!(
            cache.lookup_source("file:///m.gguf").expect("lookup"),
            Some(blob.clone())
        );
        assert_eq!(cache.get(&d).expect("get"), Some(blob));
        assert_eq!(
            cache.lookup_source("file:///other.gguf").expect("lookup"),
            None
        );
        assert!(!p.exists(), "staged file was moved");
        let usage = cache.usage().expect("usage");
        assert_eq!(usage.used_bytes, 13);
        assert_eq!(usage.digests, vec![d]);
    }

    #[test]
    fn evicts_least_recently_used_unpinned_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path(), 30).expect("open");
        let (p1, d1) = stage(&cache, "1", &[1u8; 10]);
        let (p2, d2) = stage(&cache, "2", &[2u8; 10]);
        let (p3, d3) = stage(&cache, "3", &[3u8; 10]);
        cache.commit(&p1, &d1, "1.gguf", "s1").expect("c1");
        cache.commit(&p2, &d2, "2.gguf", "s2").expect("c2");
        cache.commit(&p3, &d3, "3.gguf", "s3").expect("c3");
        // Make the order explicit: 2 oldest, then 1, then 3.
        for (d, t) in [(&d2, 100), (&d1, 200), (&d3, 300)] {
            let mp = cache.blob_dir(d).join("meta.json");
            let mut m: BlobMeta = read_json(&mp).expect("read").expect("exists");
            m.last_used = t;
            write_json_atomic(&mp, &m).expect("write");
        }
        cache.pin(&d2);
        let (p4, d4) = stage(&cache, "4", &[4u8; 15]);
        cache.commit(&p4, &d4, "4.gguf", "s4").expect("c4");
        // 15 more bytes need two evictions; 2 is pinned, so 1 and 3 go.
        assert!(cache.get(&d2).expect("get").is_some(), "pinned blob kept");
        assert!(
            cache.get(&d1).expect("get").is_none(),
            "LRU unpinned evicted"
        );
        assert!(cache.get(&d3).expect("get").is_none());
        assert!(
            cache.lookup_source("s1").expect("lookup").is_none(),
            "ref removed with blob"
        );
        assert_eq!(cache.usage().expect("usage").used_bytes, 25);
    }

    #[test]
    fn refuses_when_pinned_blobs_leave_no_room() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path(), 20).expect("open");
        let (p1, d1) = stage(&cache, "1", &[1u8; 15]);
        cache.commit(&p1, &d1, "1.gguf", "s1").expect("c1");
        cache.pin(&d1);
        let (p2, d2) = stage(&cache, "2", &[2u8; 10]);
        let err = cache
            .commit(&p2, &d2, "2.gguf", "s2")
            .expect_err("must not fit");
        assert!(
            matches!(
                err,
                CacheError::Full {
                    needed: 10,
                    capacity: 20,
                    pinned: 15
                }
            ),
            "{err}"
        );
        assert!(cache.get(&d1).expect("get").is_some());
        cache.unpin(&d1);
        cache
            .commit(&p2, &d2, "2.gguf", "s2")
            .expect("fits once unpinned");
        assert!(cache.get(&d1).expect("get").is_none());
    }

    #[test]
    fn same_content_from_two_sources_is_stored_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path(), 100).expect("open");
        let (p1, d) = stage(&cache, "1", b"same");
        let (p2, _) = stage(&cache, "2", b"same");
        cache.commit(&p1, &d, "a.gguf", "sa").expect("c1");
        cache.commit(&p2, &d, "b.gguf", "sb").expect("c2");
        assert_eq!(cache.usage().expect("usage").used_bytes, 4);
        assert_eq!(
            cache
                .lookup_source("sb")
                .expect("lookup")
                .map(|b| b.meta.sha256),
            Some(d.clone())
        );
        let meta = cache.get(&d).expect("get").expect("present").meta;
        assert_eq!(meta.sources, vec!["sa".to_string(), "sb".to_string()]);
    }

    #[test]
    fn a_blob_whose_file_is_truncated_is_not_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path(), 100).expect("open");
        let (p, d) = stage(&cache, "1", b"0123456789");
        let blob = cache.commit(&p, &d, "x.gguf", "s").expect("commit");
        fs::write(&blob.path, b"01234").expect("truncate");
        assert_eq!(cache.get(&d).expect("get"), None);
    }

    #[test]
    fn rejects_non_digests_and_sanitizes_names() {
        assert!(check_digest("abc").is_err());
        assert!(check_digest(&"A".repeat(64)).is_err());
        assert!(check_digest(&"a".repeat(64)).is_ok());
        assert_eq!(sanitize_file_name("dir/../x y.gguf"), "x_y.gguf");
        assert_eq!(sanitize_file_name(".."), "model.bin");
    }
}
