//! Cluster mode: `node-agent run`.
//!
//! The agent of node N registers the cluster-scoped GPUNode `N` (inventory, cache, loaded
//! replicas, address), heartbeats through the Lease `localmodel-node-N`, and watches the
//! ModelReplicas whose `spec.nodeName` is N (field selector). Each replica is pulled through the
//! same puller and cache as `serve`, checked against the node's free memory, loaded into the
//! same engine host, and served on the same HTTP port; its status follows every step. A deleted
//! replica is unloaded once its in-flight requests finish; its weights stay cached.

pub mod inventory;
pub mod node;
pub mod replica;
pub mod status;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crds::conventions::NODE_LEASE_RENEW_SECONDS;
use crds::gpu_node::{GPUNode, GpuNodeStatus};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use self::inventory::{Charge, Inventory};
use self::replica::ReplicaTable;
use crate::AgentError;
use crate::api::{self, AppState, Readiness};
use crate::cli::RunArgs;
use crate::engine::{EngineConfig, EngineHost};
use crate::metrics::Metrics;
use crate::puller::Puller;

/// How often the GPUNode status is recomputed when nothing else asked for it (free memory and
/// the cache change on their own).
const NODE_REFRESH: Duration = Duration::from_secs(30);

/// Everything the agent's tasks share.
pub struct Agent {
    pub node: String,
    pub namespace: String,
    /// `IP:PORT` other pods reach this agent at: the replicas' endpoint and the GPUNode address.
    pub endpoint: String,
    pub client: kube::Client,
    pub puller: Puller,
    pub engine: Arc<EngineHost>,
    pub metrics: Metrics,
    pub inventory: Inventory,
    /// The replicas this agent works on.
    pub table: Mutex<ReplicaTable>,
    /// Asks the GPUNode reporter to recompute the status now.
    pub node_dirty: Notify,
    /// Cancelled when the agent stops: every replica unloads.
    pub shutdown: CancellationToken,
}

impl Agent {
    /// Locks the replica table (a poisoned lock still holds consistent data: every change is
    /// made in one step).
    pub fn table(&self) -> std::sync::MutexGuard<'_, ReplicaTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The GPUNode status for now.
    pub fn node_status(&self) -> GpuNodeStatus {
        let snapshot = self.inventory.snapshot();
        let usage = match self.puller.cache().usage() {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cache usage");
                None
            }
        };
        let table = self.table();
        let charges: Vec<&Charge> = table.charges().collect();
        let status = node::build_status(
            &snapshot,
            &charges,
            usage.as_ref(),
            table.loaded_replicas(),
            &self.endpoint,
        );
        if let Some(u) = &usage {
            self.metrics.set_cache(u.used_bytes, u.capacity_bytes);
        }
        for g in &status.gpus {
            self.metrics.set_gpu(
                g.index,
                &g.product,
                g.memory_total_bytes,
                g.memory_free_bytes,
            );
        }
        status
    }
}

/// `IP:PORT` of the agent as others reach it: `--advertise-address` (else the listen IP when it
/// is a concrete address) with the port actually listened on.
pub fn endpoint(
    listen: SocketAddr,
    bound_port: u16,
    advertise: Option<IpAddr>,
) -> Result<String, AgentError> {
    let ip = match advertise {
        Some(ip) if ip.is_unspecified() => {
            return Err(AgentError::Config(format!(
                "--advertise-address {ip} is not an address other pods can reach; give the pod IP"
            )));
        }
        Some(ip) => ip,
        None if !listen.ip().is_unspecified() => listen.ip(),
        None => {
            return Err(AgentError::Config(format!(
                "--advertise-address (or POD_IP) is needed when listening on {listen}: it is the address the operator gives clients"
            )));
        }
    };
    Ok(SocketAddr::new(ip, bound_port).to_string())
}

/// Checks a node name: a DNS subdomain (lowercase letters, digits, '-' and '.'), as Kubernetes
/// names nodes.
pub fn check_node_name(name: &str) -> Result<(), AgentError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name
            .split('.')
            .all(|part| !part.is_empty() && !part.starts_with('-') && !part.ends_with('-'));
    if ok {
        Ok(())
    } else {
        Err(AgentError::Config(format!(
            "--node-name {name:?} is not a Kubernetes node name (lowercase letters, digits, '-' and '.', at most 253 characters)"
        )))
    }
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> AgentError {
    let action = action.into();
    move |source| AgentError::Kube {
        action,
        source: Box::new(source),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// `node-agent run`: cluster mode. Returns after SIGTERM/SIGINT, once in-flight requests had
/// their drain time and the replicas are unloaded.
pub async fn run(args: RunArgs) -> Result<(), AgentError> {
    check_node_name(&args.node_name)?;
    let fake = match args.fake_gpus.as_deref() {
        Some(spec) => Some(inventory::parse_fake_gpus(spec)?),
        None => None,
    };
    let metrics = Metrics::new(prometheus::Registry::new())?;
    let puller = crate::standalone::open_puller(&args.cache, &metrics)?;
    let drain = Duration::from_secs(args.engine.drain_seconds);
    let engine = Arc::new(EngineHost::new(EngineConfig {
        max_queue: args.engine.max_queue,
        drain,
        work_dir: args.cache.dir().join("state"),
    }));
    let client = kube::Client::try_default().await.map_err(kube_err(
        "connecting to the Kubernetes API (in-cluster ServiceAccount or KUBECONFIG)",
    ))?;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: args.listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(AgentError::Server)?;
    let endpoint = endpoint(args.listen, bound.port(), args.advertise_address)?;
    let inventory = Inventory::detect(&args.node_name, fake);

    let agent = Arc::new(Agent {
        node: args.node_name.clone(),
        namespace: args.namespace.clone(),
        endpoint: endpoint.clone(),
        client: client.clone(),
        puller,
        engine: engine.clone(),
        metrics: metrics.clone(),
        inventory,
        table: Mutex::new(ReplicaTable::default()),
        node_dirty: Notify::new(),
        shutdown: CancellationToken::new(),
    });

    let readiness = Arc::new(Readiness::default());
    let state = AppState {
        engine: engine.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
    };
    tracing::info!(addr = %bound, %endpoint, node = %agent.node, namespace = %agent.namespace,
        "listening (ready once the GPUNode is registered and the heartbeat runs)");
    let (stop_http_tx, stop_http_rx) = watch::channel(false);
    let server = api::spawn_server(listener, state, stop_http_rx);

    let signal = CancellationToken::new();
    {
        let signal = signal.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutting down: no new replicas, finishing in-flight requests");
            signal.cancel();
        });
    }

    // Registration and heartbeat make the agent ready; the watch starts after registration,
    // so replicas never report an endpoint the operator cannot find on a GPUNode.
    let registered = Arc::new(AtomicBool::new(false));
    let beating = Arc::new(AtomicBool::new(false));
    let background = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat_loop(
        agent.clone(),
        beating.clone(),
        readiness.clone(),
        registered.clone(),
        background.clone(),
    ));
    let reporter = tokio::spawn(report_loop(
        agent.clone(),
        registered.clone(),
        beating.clone(),
        readiness.clone(),
        background.clone(),
    ));

    let watch_stop = signal.clone();
    let watch_agent = agent.clone();
    let watch_registered = registered.clone();
    let watcher = tokio::spawn(async move {
        // Wait for the GPUNode first.
        while !watch_registered.load(Ordering::SeqCst) {
            tokio::select! {
                () = watch_stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        replica::watch_replicas(watch_agent, watch_stop).await;
    });

    signal.cancelled().await;
    readiness.begin_shutdown();
    let _ = watcher.await;

    // In-flight requests get the drain time; new connections are refused at once.
    let _ = stop_http_tx.send(true);
    match tokio::time::timeout(drain + Duration::from_secs(1), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server task failed"),
        Err(_) => tracing::warn!("in-flight requests did not finish within the drain bound"),
    }

    // Every replica reports Terminating and unloads; weights stay cached for the next start.
    agent.shutdown.cancel();
    let waiting = agent.table().all_done();
    let all = async {
        for mut done in waiting {
            let _ = done.wait_for(|d| *d).await;
        }
    };
    if tokio::time::timeout(drain + Duration::from_secs(10), all)
        .await
        .is_err()
    {
        tracing::warn!("some replicas were still loading or unloading at exit");
    }

    background.cancel();
    let _ = reporter.await;
    let _ = heartbeat.await;
    tracing::info!("stopped");
    Ok(())
}

/// Renews the heartbeat Lease every `NODE_LEASE_RENEW_SECONDS`.
async fn heartbeat_loop(
    agent: Arc<Agent>,
    beating: Arc<AtomicBool>,
    readiness: Arc<Readiness>,
    registered: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(agent.client.clone(), &agent.namespace);
    let acquired = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let every = Duration::from_secs(NODE_LEASE_RENEW_SECONDS);
    loop {
        match node::heartbeat(&api, &agent.node, &agent.namespace, &acquired).await {
            Ok(()) => {
                if !beating.swap(true, Ordering::SeqCst) {
                    tracing::info!(lease = %crds::conventions::node_lease_name(&agent.node),
                        namespace = %agent.namespace, "heartbeat Lease renewed");
                }
                if registered.load(Ordering::SeqCst) {
                    readiness.set_ready(true);
                }
            }
            Err(e) => tracing::warn!(error = %e, namespace = %agent.namespace,
                "renewing the heartbeat Lease failed; retrying"),
        }
        // Retry a failed renewal sooner than a successful one.
        let wait = if beating.load(Ordering::SeqCst) {
            every
        } else {
            Duration::from_secs(2)
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Registers the GPUNode, then keeps its status current: at once when a replica loads or
/// unloads, else every `NODE_REFRESH`; a status equal to the last written one is not written.
async fn report_loop(
    agent: Arc<Agent>,
    registered: Arc<AtomicBool>,
    beating: Arc<AtomicBool>,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
) {
    let api: Api<GPUNode> = Api::all(agent.client.clone());
    let mut backoff = Duration::from_secs(1);
    loop {
        match node::register(&api, &agent.node).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, node = %agent.node, "registering the GPUNode failed; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    let mut reporter = node::NodeReporter::new(api.clone(), &agent.node);
    let mut first = true;
    loop {
        let status = agent.node_status();
        match reporter.report(status).await {
            Ok(_) if first => {
                first = false;
                registered.store(true, Ordering::SeqCst);
                if beating.load(Ordering::SeqCst) {
                    readiness.set_ready(true);
                }
                tracing::info!(node = %agent.node, "GPUNode registered");
            }
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {
                // Someone deleted the GPUNode: create it again.
                tracing::warn!(node = %agent.node, "the GPUNode was deleted; registering it again");
                reporter.forget();
                if let Err(e) = node::register(&api, &agent.node).await {
                    tracing::warn!(error = %e, "registering the GPUNode failed");
                }
                continue_after(&stop, Duration::from_secs(1)).await;
                if stop.is_cancelled() {
                    break;
                }
                continue;
            }
            Err(e) => tracing::warn!(error = %e, "writing the GPUNode status failed; retrying"),
        }
        let wait = if first {
            Duration::from_secs(2)
        } else {
            NODE_REFRESH
        };
        tokio::select! {
            () = stop.cancelled() => break,
            () = agent.node_dirty.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
    // Last word: nothing loaded any more (bounded, best effort).
    let status = agent.node_status();
    match tokio::time::timeout(Duration::from_secs(5), reporter.report(status)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "final GPUNode status not written"),
        Err(_) => tracing::debug!("final GPUNode status timed out"),
    }
}

async fn continue_after(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(d) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_uses_the_advertised_ip_and_the_bound_port() {
        let listen: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        let ip: IpAddr = "10.0.3.7".parse().expect("ip");
        assert_eq!(
            endpoint(listen, 8080, Some(ip)).expect("ok"),
            "10.0.3.7:8080"
        );
        let any_port: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        assert_eq!(
            endpoint(any_port, 41234, None).expect("ok"),
            "127.0.0.1:41234"
        );
        let v6: IpAddr = "fd00::5".parse().expect("ip");
        assert_eq!(
            endpoint(listen, 8080, Some(v6)).expect("ok"),
            "[fd00::5]:8080"
        );
        let e = endpoint(listen, 8080, None).expect_err("needs an address");
        assert!(e.to_string().contains("--advertise-address"), "{e}");
        let unspecified: IpAddr = "0.0.0.0".parse().expect("ip");
        assert!(endpoint(listen, 8080, Some(unspecified)).is_err());
    }

    #[test]
    fn node_names_are_checked() {
        assert!(check_node_name("gpu-node-1").is_ok());
        assert!(check_node_name("ip-10-0-3-7.ec2.internal").is_ok());
        assert!(check_node_name("").is_err());
        assert!(check_node_name("Node_1").is_err());
        assert!(check_node_name("-a").is_err());
        assert!(check_node_name("a..b").is_err());
    }
}
