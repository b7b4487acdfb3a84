//! The LocalModel API (`localmodel.dev/v1alpha1`), shared by the operator and the node-agent.
//!
//! - [`local_model::LocalModel`] (`lm`): what a user applies — one model, served under one name,
//!   with `spec.replicas` copies.
//! - [`model_replica::ModelReplica`] (`mr`): one placed copy, bound to `spec.nodeName`; the
//!   operator writes its spec, the agent of that node its status.
//! - [`gpu_node::GPUNode`] (`gn`, cluster-scoped): what one agent reports about its node.
//!
//! [`source::ModelSource`] parses `spec.source`; [`validate::validate_spec`] applies the same
//! rules the API server enforces (CEL) where there is no API server; [`manifest`] reads
//! LocalModel YAML for the standalone agent. [`crds`] and [`crd_yamls`] give the
//! CustomResourceDefinitions, whose YAML is checked in under `crds/` (regenerate with
//! `cargo run -p crds --bin crdgen`).

pub mod conventions;
pub mod gpu_node;
pub mod local_model;
pub mod manifest;
pub mod model_replica;
pub mod source;
pub mod validate;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use gpu_node::{GPUNode, GpuNodeSpec, GpuNodeStatus};
pub use local_model::{LocalModel, LocalModelSpec, LocalModelStatus, ModelFormat};
pub use manifest::{DocumentRef, parse_local_models};
pub use model_replica::{ModelReplica, ModelReplicaSpec, ModelReplicaStatus};
pub use source::{ModelSource, ParseSourceError};
pub use validate::{FieldError, ValidationErrors, validate_spec};

/// API group of every resource here.
pub const GROUP: &str = "localmodel.dev";
/// API version of every resource here.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every resource here: `localmodel.dev/v1alpha1`.
pub const API_VERSION: &str = "localmodel.dev/v1alpha1";

/// Errors of this crate: reading LocalModel manifests.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text is not valid YAML.
    #[error("invalid YAML: {0}")]
    Yaml(#[from] serde_saphyr::Error),

    /// A document has the wrong shape (not a mapping, no name, ...).
    #[error("{doc}: {message}")]
    Document {
        /// Which document.
        doc: DocumentRef,
        /// What is wrong.
        message: String,
    },

    /// A document is not a `localmodel.dev/v1alpha1` `LocalModel`.
    #[error(
        "{doc}: expected apiVersion localmodel.dev/v1alpha1 and kind LocalModel, found {found}"
    )]
    WrongKind {
        /// Which document.
        doc: DocumentRef,
        /// The apiVersion and kind it has, e.g. `apiVersion apps/v1, kind Deployment`.
        found: String,
    },

    /// A document has fields the LocalModel schema does not know (often a typo).
    #[error("{doc}: {}", unknown_fields_message(.fields))]
    UnknownFields {
        /// Which document.
        doc: DocumentRef,
        /// Paths of the unknown fields, e.g. `spec.replica`.
        fields: Vec<String>,
    },

    /// A field has the wrong type or a value the type does not allow.
    #[error("{doc}: {path}: {message}")]
    Decode {
        /// Which document.
        doc: DocumentRef,
        /// Path of the field, e.g. `spec.engine.contextLength`.
        path: String,
        /// What is wrong with it.
        message: String,
    },

    /// The spec breaks a validation rule.
    #[error("{doc}: {errors}")]
    Invalid {
        /// Which document.
        doc: DocumentRef,
        /// Every rule it breaks.
        errors: ValidationErrors,
    },

    /// Two documents declare LocalModels with the same namespace and name.
    #[error("{doc}: a LocalModel with this name is already declared by document {first}")]
    Duplicate {
        /// The second document.
        doc: DocumentRef,
        /// Index of the first one.
        first: usize,
    },
}

/// Schema transform for unsigned fields: drops `format: uint32`, which the API server does not
/// know (it warns on every apply); the `minimum` keeps values non-negative.
pub(crate) fn unsigned(schema: &mut schemars::Schema) {
    schema.remove("format");
}

fn unknown_fields_message(fields: &[String]) -> String {
    let s = if fields.len() == 1 { "" } else { "s" };
    format!("unknown field{s} {}", fields.join(", "))
}

/// The three CustomResourceDefinitions, as the API server should receive them: the derived
/// CRDs with doc-comment line wraps joined back into paragraphs, so `kubectl explain` wraps
/// the text itself. Use these (not `LocalModel::crd()`) to install the CRDs.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        tidy(LocalModel::crd()),
        tidy(ModelReplica::crd()),
        tidy(GPUNode::crd()),
    ]
}

/// Header written above each generated CRD file.
pub const GENERATED_HEADER: &str = "# Generated from the Rust types in crds/src by `cargo run -p crds --bin crdgen`.\n# Do not edit by hand: a test fails when this file and the types disagree.\n";

/// `(file name, YAML)` for each CRD, e.g. `("localmodel.dev_localmodels.yaml", "...")`: what
/// `crdgen` writes into `crds/` and what the drift test compares with the checked-in files.
pub fn crd_yamls() -> Vec<(&'static str, String)> {
    let names = [
        "localmodel.dev_localmodels.yaml",
        "localmodel.dev_modelreplicas.yaml",
        "localmodel.dev_gpunodes.yaml",
    ];
    names
        .into_iter()
        .zip(crds())
        .map(|(name, crd)| {
            // Serializing a CRD struct to YAML has no input-dependent failure mode.
            let body = serde_saphyr::to_string(&crd).expect("a CRD serializes to YAML");
            (name, format!("{GENERATED_HEADER}{body}"))
        })
        .collect()
}

/// Joins the hard line wraps of doc comments in every `description` of a CRD.
fn tidy(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    reflow_descriptions(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
}

fn reflow_descriptions(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    serde_json::Value::String(text) if key == "description" => {
                        *text = reflow(text);
                    }
                    _ => reflow_descriptions(v),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(reflow_descriptions),
        _ => {}
    }
}

/// Joins lines wrapped inside a paragraph with spaces; keeps blank-line paragraph breaks and
/// list items. Text with tabs or code fences (upstream Kubernetes descriptions) is kept as is.
fn reflow(text: &str) -> String {
    if text.contains('\t') || text.contains("```") {
        return text.to_string();
    }
    text.split("\n\n")
        .map(|para| {
            let mut out = String::new();
            for line in para.lines() {
                let trimmed = line.trim();
                if out.is_empty() {
                    out.push_str(trimmed);
                } else if trimmed.starts_with("- ") || trimmed.starts_with("* ") {
                    out.push('\n');
                    out.push_str(trimmed);
                } else if !trimmed.is_empty() {
                    out.push(' ');
                    out.push_str(trimmed);
                }
            }
            out
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflow_joins_wrapped_lines_only() {
        assert_eq!(reflow("one\ntwo\n\nthree"), "one two\n\nthree");
        assert_eq!(reflow("list:\n- a\n- b"), "list:\n- a\n- b");
        assert_eq!(reflow("keep\n\tgrammar"), "keep\n\tgrammar");
        assert_eq!(reflow("single line"), "single line");
    }
}
