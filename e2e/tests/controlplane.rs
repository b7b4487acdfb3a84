//! Tests against a real kube-apiserver + etcd (see `e2e/controlplane/`): the CRDs under
//! `crds/` install and behave as a user would see them (validation messages, printer columns,
//! `kubectl explain`, field selectors, RBAC), and the examples under `examples/` are accepted.
//!
//! All tests share one control plane ([`e2e::shared`]), each in its own namespace.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use e2e::{ControlPlane, output_text, shared, wait, workspace_root};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, ObjectMeta, PostParams,
    WatchEvent, WatchParams,
};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Helpers

/// `crds/localmodel.dev_*.yaml`, sorted (`LOCALMODEL_E2E_CRDS_DIR` names another folder, e.g.
/// the output of `cargo run -p crds --bin crdgen -- --out-dir DIR`).
fn crd_files() -> Vec<PathBuf> {
    let dir = std::env::var_os("LOCALMODEL_E2E_CRDS_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("crds"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("localmodel.dev_") && n.ends_with(".yaml"))
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no CRD files crds/localmodel.dev_*.yaml in {} (generate them with `cargo run -p crds --bin crdgen`)",
        dir.display()
    );
    files
}

fn read_yaml(path: &Path) -> Value {
    let raw =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_saphyr::from_str(&raw).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The CRD (as YAML from `crds/`) whose `spec.names.kind` is `kind`.
fn crd_yaml(kind: &str) -> Value {
    crd_files()
        .iter()
        .map(|p| read_yaml(p))
        .find(|crd| crd["spec"]["names"]["kind"] == kind)
        .unwrap_or_else(|| panic!("no CRD for kind {kind} in crds/localmodel.dev_*.yaml"))
}

/// The OpenAPI schema of `.spec` of the first version of a CRD.
fn spec_schema(crd: &Value) -> &Value {
    &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
}

/// The `message` of the `x-kubernetes-validations` rule of `schema` whose rule mentions
/// `needle`.
fn cel_message(schema: &Value, needle: &str) -> String {
    schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["rule"].as_str().is_some_and(|r| r.contains(needle)))
        .and_then(|v| v["message"].as_str())
        .unwrap_or_else(|| {
            panic!(
                "no x-kubernetes-validations rule mentioning {needle:?} with a message in {}",
                serde_json::to_string_pretty(&schema["x-kubernetes-validations"]).unwrap()
            )
        })
        .to_string()
}

fn collapse_ws(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Applies every CRD once per test run and waits until all are Established.
fn ensure_crds(cp: &ControlPlane) {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let done = DONE.get_or_init(|| {
        for file in crd_files() {
            let out = cp.kubectl([
                "apply",
                "--server-side",
                "--field-manager=e2e",
                "-f",
                file.to_str().unwrap(),
            ]);
            if !out.status.success() {
                return Err(format!(
                    "kubectl apply -f {}: {}",
                    file.display(),
                    output_text(&out)
                ));
            }
        }
        for file in crd_files() {
            let name = read_yaml(&file)["metadata"]["name"]
                .as_str()
                .unwrap()
                .to_string();
            let out = cp.kubectl([
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                &format!("crd/{name}"),
            ]);
            if !out.status.success() {
                return Err(format!("kubectl wait crd/{name}: {}", output_text(&out)));
            }
        }
        Ok(())
    });
    if let Err(e) = done {
        panic!("installing the CRDs failed: {e}");
    }
}

fn gvk_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("localmodel.dev", "v1alpha1", kind),
        plural,
    )
}

fn local_model(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "localmodel.dev/v1alpha1",
        "kind": "LocalModel",
        "metadata": { "name": name },
        "spec": spec,
    })
}

fn model_replica(name: &str, node: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "localmodel.dev/v1alpha1",
        "kind": "ModelReplica",
        "metadata": { "name": name },
        "spec": {
            "model": "smollm2",
            "source": "hf://org/repo/model.Q4_K_M.gguf",
            "format": "gguf",
            "nodeName": node,
            "servedName": "smollm2",
        },
    }))
    .unwrap()
}

fn names(list: &[DynamicObject]) -> BTreeSet<String> {
    list.iter()
        .filter_map(|o| o.metadata.name.clone())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The control plane itself

#[tokio::test]
async fn apiserver_reports_its_real_version_and_kubectl_works() {
    let cp = shared();
    let version = cp.client().apiserver_version().await.unwrap();
    assert_eq!(version.major, "1", "{version:?}");
    assert!(
        version.git_version.starts_with("v1.")
            && version.git_version != "v0.0.0-master+$Format:%H$",
        "the build sets the version ldflags: {version:?}"
    );
    let out = cp.kubectl(["version", "-o", "json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["serverVersion"]["gitVersion"],
        version.git_version.as_str()
    );
    let out = cp.kubectl([
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "admin");
}

#[tokio::test]
async fn namespaces_are_unique_per_test() {
    let cp = shared();
    let a = cp.create_namespace("Unique Name!").await.unwrap();
    let b = cp.create_namespace("Unique Name!").await.unwrap();
    assert_ne!(a, b);
    assert!(a.starts_with("unique-name-"), "{a}");
}

// ---------------------------------------------------------------------------------------------
// CRDs

#[tokio::test]
async fn crds_apply_and_become_established() {
    let cp = shared();
    ensure_crds(cp);
    let crds = Api::<CustomResourceDefinition>::all(cp.client());
    for file in crd_files() {
        let name = read_yaml(&file)["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_string();
        let crd = crds.get(&name).await.unwrap();
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        for wanted in ["Established", "NamesAccepted"] {
            assert!(
                conditions
                    .iter()
                    .any(|c| c.type_ == wanted && c.status == "True"),
                "{name}: condition {wanted} is not True: {conditions:?}"
            );
        }
    }
}

#[tokio::test]
async fn examples_apply_with_server_dry_run() {
    let cp = shared();
    ensure_crds(cp);
    let root = workspace_root().join("examples");
    let mut manifests = Vec::new();
    collect_yaml(&root, &mut manifests);
    manifests.sort();
    if manifests.is_empty() {
        eprintln!(
            "note: no *.yaml under {} yet; nothing to dry-run",
            root.display()
        );
        return;
    }
    // A dry run creates nothing, so namespaces the manifests name must exist beforehand.
    let ns = cp.create_namespace("examples").await.unwrap();
    let mut wanted_namespaces = BTreeSet::new();
    for file in &manifests {
        let raw = std::fs::read_to_string(file).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&raw)
            .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", file.display()));
        for doc in docs {
            if let Some(n) = doc["metadata"]["namespace"].as_str() {
                wanted_namespaces.insert(n.to_string());
            }
            if doc["kind"] == "Namespace"
                && let Some(n) = doc["metadata"]["name"].as_str()
            {
                wanted_namespaces.insert(n.to_string());
            }
        }
    }
    for n in &wanted_namespaces {
        let out = cp.kubectl_stdin(
            ["apply", "-f", "-"],
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}).to_string(),
        );
        assert!(
            out.status.success(),
            "creating namespace {n}: {}",
            output_text(&out)
        );
    }
    let mut failures = Vec::new();
    for file in &manifests {
        let out = cp.kubectl([
            "apply",
            "--dry-run=server",
            "-n",
            &ns,
            "-f",
            file.to_str().unwrap(),
        ]);
        if !out.status.success() {
            failures.push(format!("{}: {}", file.display(), output_text(&out)));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} example manifests were refused:\n{}",
        failures.len(),
        manifests.len(),
        failures.join("\n")
    );
}

/// `*.yaml` under `dir`, recursively, skipping directories named `dashboards`.
fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "dashboards") {
                collect_yaml(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

#[tokio::test]
async fn invalid_local_models_are_refused_with_the_cel_message() {
    let cp = shared();
    ensure_crds(cp);
    let ns = cp.create_namespace("invalid-lm").await.unwrap();
    let crd = crd_yaml("LocalModel");
    let spec = spec_schema(&crd);
    let source_msg = cel_message(&spec["properties"]["source"], "startsWith");
    let sha_msg = cel_message(&spec["properties"]["sha256"], "matches");
    let quant_msg = cel_message(spec, "quantization");

    let cases = [
        ("bad-source", json!({"source": "ftp://x"}), source_msg),
        (
            "short-sha",
            json!({"source": "hf://org/repo/m.gguf", "sha256": "0123456789ab"}),
            sha_msg,
        ),
        (
            "gguf-quant",
            json!({"source": "hf://org/repo/m.gguf", "format": "gguf", "quantization": "Q4K"}),
            quant_msg,
        ),
    ];
    for (name, spec, message) in cases {
        let manifest = local_model(name, spec).to_string();
        let out = cp.kubectl_stdin(["apply", "-n", &ns, "-f", "-"], &manifest);
        assert!(
            !out.status.success(),
            "{name} was accepted: {}",
            output_text(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&message),
            "{name}: kubectl's error does not contain the CEL message {message:?}:\n{stderr}"
        );
    }

    // And a valid one is accepted, so the refusals above are about the fields.
    let ok = local_model("fine", json!({"source": "hf://org/repo/m.gguf"})).to_string();
    let out = cp.kubectl_stdin(["apply", "-n", &ns, "-f", "-"], &ok);
    assert!(out.status.success(), "{}", output_text(&out));
}

#[tokio::test]
async fn kubectl_shows_printer_columns_and_explains_fields() {
    let cp = shared();
    ensure_crds(cp);
    let ns = cp.create_namespace("printer").await.unwrap();
    let manifest = local_model("smollm2", json!({"source": "hf://org/repo/m.gguf"})).to_string();
    let out = cp.kubectl_stdin(["apply", "-n", &ns, "-f", "-"], &manifest);
    assert!(out.status.success(), "{}", output_text(&out));

    let out = cp.kubectl(["get", "lm", "-n", &ns]);
    assert!(out.status.success(), "{}", output_text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = stdout
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "READY", "REPLICAS", "PHASE", "PROGRESS", "AGE"],
        "kubectl get lm:\n{stdout}"
    );
    assert!(stdout.contains("smollm2"), "{stdout}");

    let crd = crd_yaml("LocalModel");
    let description = spec_schema(&crd)["properties"]["source"]["description"]
        .as_str()
        .expect("spec.source has a description")
        .to_string();
    // The API server publishes the CRD's OpenAPI a moment after it is Established.
    let explained = wait::until_seen("kubectl explain localmodel.spec.source", DEADLINE, || {
        let out = cp.kubectl(["explain", "localmodel.spec.source"]);
        let seen = output_text(&out);
        let ok = out.status.success()
            && collapse_ws(&String::from_utf8_lossy(&out.stdout))
                .contains(&collapse_ws(&description));
        async move { if ok { Ok(()) } else { Err(seen) } }
    })
    .await;
    if let Err(e) = explained {
        panic!("kubectl explain does not print the description {description:?}: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// ModelReplica field selector

#[tokio::test]
async fn model_replicas_select_by_node_name() {
    let cp = shared();
    ensure_crds(cp);
    let ns = cp.create_namespace("field-selector").await.unwrap();
    let client = cp.client();
    let ar = gvk_resource("ModelReplica", "modelreplicas");
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &ar);
    let pp = PostParams::default();
    for (name, node) in [("a-1", "node-a"), ("a-2", "node-a"), ("b-1", "node-b")] {
        api.create(&pp, &model_replica(name, node)).await.unwrap();
    }

    let list = api
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .unwrap();
    assert_eq!(
        names(&list.items),
        BTreeSet::from(["a-1".to_string(), "a-2".to_string()]),
        "list with spec.nodeName=node-a"
    );
    let out = cp.kubectl([
        "get",
        "modelreplicas",
        "-n",
        &ns,
        "--field-selector=spec.nodeName=node-b",
        "-o",
        "name",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "modelreplica.localmodel.dev/b-1"
    );

    // A watch from the list's resourceVersion sees node-a's new replica and never node-b's,
    // although node-b's is created first.
    let rv = list.metadata.resource_version.clone().unwrap();
    let mut stream = api
        .watch(&WatchParams::default().fields("spec.nodeName=node-a"), &rv)
        .await
        .unwrap()
        .boxed();
    api.create(&pp, &model_replica("b-2", "node-b"))
        .await
        .unwrap();
    api.create(&pp, &model_replica("a-3", "node-a"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let result = tokio::time::timeout(DEADLINE, async {
        while let Some(event) = stream.try_next().await.unwrap() {
            match event {
                WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => {
                    let name = o.metadata.name.clone().unwrap_or_default();
                    let node = o.data["spec"]["nodeName"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    seen.push(format!("{name}@{node}"));
                    if name == "a-3" {
                        return;
                    }
                }
                WatchEvent::Bookmark(_) => {}
                WatchEvent::Error(e) => panic!("watch error: {e:?}"),
            }
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "watch did not deliver a-3 within {DEADLINE:?}; saw {seen:?}"
    );
    assert!(
        seen.iter().all(|s| s.ends_with("@node-a")),
        "the watch delivered other nodes' replicas: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// RBAC with ServiceAccount tokens

#[tokio::test]
async fn service_account_needs_a_role_binding_to_list_model_replicas() {
    let cp = shared();
    ensure_crds(cp);
    let ns = cp.create_namespace("rbac").await.unwrap();
    let token = cp.token_for_service_account(&ns, "reader").await.unwrap();
    let ar = gvk_resource("ModelReplica", "modelreplicas");
    let as_reader: Api<DynamicObject> =
        Api::namespaced_with(cp.client_with_token(&token), &ns, &ar);

    match as_reader.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status
                    .message
                    .contains(&format!("system:serviceaccount:{ns}:reader")),
                "{status:?}"
            );
        }
        other => panic!("expected 403 Forbidden before any RoleBinding, got {other:?}"),
    }

    let admin = cp.client();
    let role = Role {
        metadata: ObjectMeta {
            name: Some("replica-reader".into()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["localmodel.dev".into()]),
            resources: Some(vec!["modelreplicas".into()]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..Default::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("replica-reader".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "replica-reader".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "reader".into(),
            namespace: Some(ns.clone()),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin, &ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    let listed = wait::until_seen(
        "the RoleBinding to let reader list modelreplicas",
        DEADLINE,
        || {
            let api = as_reader.clone();
            async move {
                match api.list(&ListParams::default()).await {
                    Ok(list) => Ok(list.items.len()),
                    Err(e) => Err(format!("{e}")),
                }
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(listed, 0);

    // Still read-only: creating is forbidden.
    match as_reader
        .create(&PostParams::default(), &model_replica("x", "node-a"))
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403 creating with a read-only Role, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Harness faults (private control planes)

#[test]
fn a_binary_that_dies_while_starting_is_named_with_port_and_log() {
    let dir = tempfile::tempdir().unwrap();
    let script = "#!/bin/sh\necho \"fake etcd: cannot start, args: $*\" >&2\nexit 3\n";
    for name in ["etcd", "kube-apiserver"] {
        let path = dir.path().join(name);
        std::fs::write(&path, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let port = free_port();
    let err = ControlPlane::builder()
        .bin_dir(dir.path())
        .etcd_port(port)
        .keep(false)
        .start_timeout(Duration::from_secs(20))
        .start()
        .expect_err("a control plane whose etcd exits at once cannot start");
    let msg = err.to_string();
    assert!(msg.contains("etcd"), "{msg}");
    assert!(msg.contains(&format!("port {port}")), "{msg}");
    assert!(msg.contains("fake etcd: cannot start"), "{msg}");
    assert!(msg.contains("exit status: 3"), "{msg}");
}

#[test]
fn a_taken_port_is_retried_on_another_and_teardown_leaves_nothing() {
    // Hold a port so the API server cannot bind it.
    let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let cp = ControlPlane::builder()
        .apiserver_port(port)
        .keep(false)
        .start()
        .unwrap_or_else(|e| panic!("starting with port {port} taken: {e}"));
    assert_ne!(cp.apiserver_port(), port);
    let log = std::fs::read_to_string(cp.dir().join("kube-apiserver.log")).unwrap();
    assert!(
        log.contains("address already in use"),
        "the first API server should have failed on port {port}:\n{log}"
    );
    let out = cp.kubectl(["get", "--raw", "/readyz"]);
    assert!(out.status.success(), "{}", output_text(&out));

    let pids = cp.pids();
    let dir = cp.dir().to_path_buf();
    let apiserver_port = cp.apiserver_port();
    let etcd_port = cp.etcd_port();
    assert_eq!(pids.len(), 2, "{pids:?}");
    drop(cp);
    for (name, pid) in &pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{name} (pid {pid}) still runs after drop"
        );
    }
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
    for p in [apiserver_port, etcd_port] {
        std::net::TcpListener::bind(("127.0.0.1", p))
            .unwrap_or_else(|e| panic!("port {p} still taken after drop: {e}"));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
