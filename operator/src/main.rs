//! `localmodel-operator`: the LocalModel controller behind a leader-election Lease.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use clap::Parser;
use crds::conventions::{DEFAULT_NAMESPACE, LEADER_LEASE_NAME};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use operator::controller::{self, Settings};
use operator::leader::{LeaderElector, LeaseTiming};
use operator::metrics::Metrics;
use prometheus::{Encoder, Registry, TextEncoder};

/// The LocalModel operator.
#[derive(Debug, Parser)]
#[command(name = "operator", version, about)]
struct Args {
    /// Address of the /livez, /readyz and /metrics endpoints.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_listen: SocketAddr,
    /// Namespace of the leader Lease and of the agents' heartbeat Leases.
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// This process's name in the leader Lease and in Events (defaults to host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a leader Lease stays valid without renewal; a standby takes over after about this long.
    #[arg(long, default_value_t = 10)]
    leader_lease_seconds: u64,
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

#[derive(Clone)]
struct Health {
    ready: Arc<AtomicBool>,
    registry: Registry,
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&h.registry.gather(), &mut buf) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            buf,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected to the API server yet",
        )
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let _ = rustls::crypto::ring::default_provider().install_default();

    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "operator".into());
        format!("{host}-{}", std::process::id())
    });
    let registry = Registry::new();
    let metrics_ = Metrics::new(registry.clone()).context("registering metrics")?;
    let health = Health {
        ready: Arc::new(AtomicBool::new(false)),
        registry,
    };
    let app = Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health.clone());
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding {}", args.metrics_listen))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /livez, /readyz, /metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "health server stopped");
        }
    });

    let client = Client::try_default()
        .await
        .context("connecting to the API server")?;
    health.ready.store(true, Ordering::Relaxed);

    let timing = LeaseTiming {
        duration: Duration::from_secs(args.leader_lease_seconds.max(2)),
        retry: Duration::from_secs((args.leader_lease_seconds / 5).max(1)),
    };
    let mut elector = LeaderElector::new(
        Api::<Lease>::namespaced(client.clone(), &args.namespace),
        LEADER_LEASE_NAME,
        &identity,
        timing,
    );
    tracing::info!(%identity, namespace = %args.namespace, "waiting for the leader Lease");
    tokio::select! {
        r = elector.acquire() => r.context("leader election")?,
        _ = shutdown_signal() => {
            tracing::info!("shutting down before leading");
            return Ok(());
        }
    }
    tracing::info!(%identity, "leading");
    metrics_.leader.set(1);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let settings = Settings {
        agents_namespace: args.namespace.clone(),
        instance: Some(identity.clone()),
    };
    let mut running = tokio::spawn(controller::run(
        client.clone(),
        metrics_.clone(),
        settings,
        async move {
            let _ = stop_rx.await;
        },
    ));

    tokio::select! {
        lost = elector.hold() => {
            // Another process may be leading already: stop writing at once.
            tracing::error!(error = %lost, "lost the leader Lease; exiting");
            std::process::exit(1);
        }
        r = &mut running => {
            metrics_.leader.set(0);
            let _ = elector.release().await;
            match r {
                Ok(Ok(())) => anyhow::bail!("the controller stopped"),
                Ok(Err(e)) => return Err(e).context("controller"),
                Err(e) => return Err(e).context("controller task"),
            }
        }
        _ = shutdown_signal() => {
            tracing::info!("shutting down: finishing reconciles in flight");
            let _ = stop_tx.send(());
            if tokio::time::timeout(Duration::from_secs(20), &mut running).await.is_err() {
                tracing::warn!("reconciles did not finish within 20 s");
            }
            metrics_.leader.set(0);
            if let Err(e) = elector.release().await {
                tracing::warn!(error = %e, "could not release the leader Lease");
            }
        }
    }
    Ok(())
}
