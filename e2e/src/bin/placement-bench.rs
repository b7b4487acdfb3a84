//! Placement benchmark (not a test): N GPUNodes × M LocalModels in a real API server, one
//! operator process, and the time until every model is Scheduled, the operator's peak RSS and
//! the API requests it made.
//!
//! ```text
//! cargo run --release -p e2e --bin placement-bench -- --nodes 1000 --models 300
//! ```
//!
//! Nodes get a heterogeneous inventory (1-8 GPUs of L4 24 GiB, A100 80 GiB, H100 80 GiB, T4
//! 16 GiB), each a heartbeat Lease valid for an hour; models ask 4-60 GiB with 1-3 replicas, a
//! tenth of them pinned to a GPU product (and then at most 20 GiB, so every model fits somewhere). The operator runs with the ServiceAccount token and
//! RBAC of the Helm chart (`charts/localmodel`). API requests are counted from kube-apiserver's
//! `apiserver_request_total`, minus the benchmark's own.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use e2e::{ControlPlane, Daemon, workspace_binary, workspace_root};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

const NS: &str = "localmodel-system";

struct Args {
    nodes: usize,
    models: usize,
    timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        nodes: 1000,
        models: 300,
        timeout: Duration::from_secs(900),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--nodes" => {
                a.nodes = value("--nodes")?
                    .parse()
                    .map_err(|e| format!("--nodes: {e}"))?
            }
            "--models" => {
                a.models = value("--models")?
                    .parse()
                    .map_err(|e| format!("--models: {e}"))?
            }
            "--timeout-seconds" => {
                a.timeout = Duration::from_secs(
                    value("--timeout-seconds")?
                        .parse()
                        .map_err(|e| format!("--timeout-seconds: {e}"))?,
                )
            }
            "-h" | "--help" => {
                return Err(
                    "usage: placement-bench [--nodes N] [--models M] [--timeout-seconds S]".into(),
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn kubectl_ok(cp: &ControlPlane, args: &[&str]) -> Result<(), String> {
    let out = cp.kubectl(args);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `apiserver_request_total` summed by (verb, resource), from the API server's /metrics.
async fn request_counts(client: &kube::Client) -> Result<BTreeMap<(String, String), f64>, String> {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
    let text = client.request_text(req).await.map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let (labels, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let get = |k: &str| {
            labels
                .split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        let v: f64 = value.parse().unwrap_or(0.0);
        *out.entry((get("verb"), get("resource"))).or_insert(0.0) += v;
    }
    Ok(out)
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

const GPUS: [(&str, i64); 4] = [
    ("NVIDIA L4", 24 << 30),
    ("NVIDIA A100-SXM4-80GB", 80 << 30),
    ("NVIDIA H100 80GB HBM3", 80 << 30),
    ("Tesla T4", 16 << 30),
];

async fn run(args: Args) -> Result<(), String> {
    e2e::install_crypto_provider();
    let cp = tokio::task::spawn_blocking(ControlPlane::start)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let client = cp.client();
    let root = workspace_root();
    for f in std::fs::read_dir(root.join("crds"))
        .map_err(|e| e.to_string())?
        .flatten()
    {
        if f.path().extension().is_some_and(|e| e == "yaml") {
            kubectl_ok(
                &cp,
                &[
                    "apply",
                    "--server-side",
                    "-f",
                    f.path().to_str().unwrap_or(""),
                ],
            )?;
        }
    }
    kubectl_ok(
        &cp,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ],
    )?;
    let _ = Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}}))
                .map_err(|e| e.to_string())?,
        )
        .await;
    let rbac = e2e::helm::render_rbac(NS)?;
    let out = cp.kubectl_stdin(["apply", "-f", "-"], &rbac);
    if !out.status.success() {
        return Err(format!(
            "applying the chart's RBAC: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }

    // Nodes: GPUNode with status + heartbeat Lease.
    let gvk = |k: &str, p: &str| {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("localmodel.dev", "v1alpha1", k),
            p,
        )
    };
    let gpunodes: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("GPUNode", "gpunodes"));
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let t = Instant::now();
    let pp = PatchParams::apply("placement-bench").force();
    futures::stream::iter(0..args.nodes)
        .map(|i| {
            let gpunodes = gpunodes.clone();
            let leases = leases.clone();
            let pp = pp.clone();
            async move {
                let name = format!("bench-node-{i:05}");
                let (product, mem) = GPUS[i % GPUS.len()];
                let count = 1 + (i * 7 % 8);
                let gpus: Vec<_> = (0..count)
                    .map(|g| json!({"index": g, "uuid": format!("GPU-{name}-{g}"), "product": product,
                                    "memoryTotalBytes": mem, "memoryFreeBytes": mem - (i as i64 % 5) * (1 << 30)}))
                    .collect();
                let obj = json!({"apiVersion": "localmodel.dev/v1alpha1", "kind": "GPUNode",
                                 "metadata": {"name": name}, "spec": {"nodeName": name}});
                gpunodes.patch(&name, &pp, &Patch::Apply(&obj)).await.map_err(|e| format!("GPUNode {name}: {e}"))?;
                let status = json!({"apiVersion": "localmodel.dev/v1alpha1", "kind": "GPUNode",
                                    "status": {"gpus": gpus, "gpuCount": count}});
                gpunodes.patch_status(&name, &pp, &Patch::Apply(&status)).await.map_err(|e| format!("GPUNode status {name}: {e}"))?;
                let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                   "metadata": {"name": format!("localmodel-node-{name}")},
                                   "spec": {"holderIdentity": name, "leaseDurationSeconds": 3600,
                                            "renewTime": serde_json::to_value(MicroTime(k8s_openapi::jiff::Timestamp::now())).map_err(|e| e.to_string())?}});
                leases.patch(&format!("localmodel-node-{name}"), &pp, &Patch::Apply(&lease)).await.map_err(|e| format!("Lease {name}: {e}"))?;
                Ok::<(), String>(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    eprintln!(
        "created {} GPUNodes and Leases in {:.1} s",
        args.nodes,
        t.elapsed().as_secs_f64()
    );

    // Models, all created before the operator starts: the time measured is placement only.
    let models: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &gvk("LocalModel", "localmodels"));
    let mut wanted_replicas = 0;
    for i in 0..args.models {
        let replicas = 1 + i % 3;
        wanted_replicas += replicas;
        let mut spec = json!({
            "source": format!("hf://bench/model-{i}/model.Q4_K_M.gguf"),
            "replicas": replicas,
            "resources": {"gpuMemory": format!("{}Gi", 4 + (i * 13) % 57)},
        });
        if i % 10 == 0 {
            // Pinned to a product: small enough for the smallest of them (L4, 24 GiB).
            spec["resources"]["gpuProduct"] = json!(GPUS[(i / 10) % 3].0);
            spec["resources"]["gpuMemory"] = json!(format!("{}Gi", 4 + i % 17));
        }
        if i % 2 == 1 {
            spec["placement"] = json!("Spread");
        }
        let obj: DynamicObject = serde_json::from_value(
            json!({"apiVersion": "localmodel.dev/v1alpha1", "kind": "LocalModel",
            "metadata": {"name": format!("model-{i:04}")}, "spec": spec}),
        )
        .map_err(|e| e.to_string())?;
        models
            .create(&PostParams::default(), &obj)
            .await
            .map_err(|e| format!("LocalModel {i}: {e}"))?;
    }
    eprintln!(
        "created {} LocalModels ({wanted_replicas} replicas wanted)",
        args.models
    );

    // Count API requests from here on; the benchmark itself makes one watch.
    let before = request_counts(&client).await?;
    let token = cp
        .token_for_service_account(NS, "localmodel-operator")
        .await
        .map_err(|e| e.to_string())?;
    let kubeconfig = cp
        .token_kubeconfig("operator", &token)
        .map_err(|e| e.to_string())?;
    let bin = workspace_binary("operator").map_err(|e| e.to_string())?;
    let log = cp.dir().join("operator.log");
    let start = Instant::now();
    let mut op = Daemon::spawn(
        "operator",
        &bin,
        &[
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--namespace".into(),
            NS.into(),
        ],
        &[
            ("KUBECONFIG", kubeconfig.display().to_string()),
            ("RUST_LOG", "warn".into()),
        ],
        &log,
    )
    .map_err(|e| e.to_string())?;

    let mut scheduled: BTreeMap<String, bool> = BTreeMap::new();
    let stream = watcher(models.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(stream);
    let deadline = tokio::time::sleep(args.timeout);
    tokio::pin!(deadline);
    let mut peak = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let elapsed = loop {
        tokio::select! {
            ev = stream.next() => {
                let Some(ev) = ev else { return Err("watch ended".into()) };
                let m = match ev {
                    Ok(m) => m,
                    Err(e) => {
                        // The watcher backs off and resumes.
                        eprintln!("watch: {e}");
                        continue;
                    }
                };
                let ok = m.data["status"]["conditions"].as_array().is_some_and(|cs| cs.iter().any(|c| c["type"] == "Scheduled" && c["status"] == "True"));
                scheduled.insert(m.metadata.name.clone().unwrap_or_default(), ok);
                if scheduled.len() == args.models && scheduled.values().all(|v| *v) {
                    break start.elapsed();
                }
            }
            _ = tick.tick() => {
                peak = peak.max(peak_rss_kib(op.pid()).unwrap_or(0));
                if let Some(s) = op.exited() {
                    return Err(format!("the operator exited: {s}\n{}", op.log_tail(30)));
                }
            }
            _ = &mut deadline => {
                let done = scheduled.values().filter(|v| **v).count();
                return Err(format!("only {done} of {} models Scheduled after {:?}\n{}", args.models, args.timeout, op.log_tail(30)));
            }
        }
    };
    peak = peak.max(peak_rss_kib(op.pid()).unwrap_or(0));
    let after = request_counts(&client).await?;
    let mut by_kind: BTreeMap<String, f64> = BTreeMap::new();
    for (k, v) in &after {
        let d = v - before.get(k).copied().unwrap_or(0.0);
        if d > 0.0 {
            *by_kind.entry(format!("{} {}", k.0, k.1)).or_insert(0.0) += d;
        }
    }
    // The benchmark's own: the LocalModel watch (list + watch) and two /metrics reads.
    let total: f64 = by_kind.values().sum::<f64>() - 3.0;
    let mrs: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &gvk("ModelReplica", "modelreplicas"),
    );
    let placed = mrs
        .list(&Default::default())
        .await
        .map_err(|e| e.to_string())?
        .items
        .len();
    op.terminate(Duration::from_secs(10));

    println!(
        "| GPUNodes | LocalModels | replicas placed | time to all Scheduled | operator peak RSS | API requests by the operator |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {placed} of {wanted_replicas} | {:.1} s | {:.0} MiB | {:.0} |",
        args.nodes,
        args.models,
        elapsed.as_secs_f64(),
        peak as f64 / 1024.0,
        total
    );
    println!();
    println!("Requests by verb and resource (including the benchmark's watch):");
    for (k, v) in by_kind.iter().filter(|(_, v)| **v >= 1.0) {
        println!("- {k}: {v:.0}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("placement-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
