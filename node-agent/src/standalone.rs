//! Standalone mode: `node-agent pull` and `node-agent serve -f model.yaml`, no Kubernetes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crds::local_model::{LocalModel, ModelFormat};
use crds::source::ModelSource;
use tokio::sync::watch;

use crate::AgentError;
use crate::api::{self, AppState, Readiness};
use crate::cache::{Cache, CachedBlob};
use crate::cli::{CacheArgs, PullArgs, ServeArgs};
use crate::engine::types::LoadSpec;
use crate::engine::{EngineConfig, EngineHost};
use crate::metrics::{DropTimer, Metrics};
use crate::puller::{PullConfig, PullProgress, Puller};

/// Sizes the engine's compute threads: `threads`, else the cores this process may use.
/// Must run before any engine work starts (the thread pool is global).
pub fn init_engine_threads(threads: Option<usize>) {
    let n = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
    {
        tracing::debug!(error = %e, "engine thread pool already initialised");
    }
}

/// The cache and puller a command works with.
pub fn open_puller(args: &CacheArgs, metrics: &Metrics) -> Result<Puller, AgentError> {
    let cache = Arc::new(Cache::open(args.dir(), args.cache_size.as_u64())?);
    if let Ok(u) = cache.usage() {
        metrics.set_cache(u.used_bytes, u.capacity_bytes);
    }
    let mut cfg = PullConfig::from_env();
    cfg.pypi_index = args.pypi_index_url.clone();
    Puller::new(cache, cfg, metrics.clone()).map_err(|error| AgentError::Pull {
        source_uri: String::new(),
        error,
    })
}

fn parse_source(s: &str) -> Result<ModelSource, AgentError> {
    s.parse::<ModelSource>()
        .map_err(|e| AgentError::Config(format!("invalid source {s:?}: {e}")))
}

/// Pulls with a progress display.
pub async fn pull_with_progress(
    puller: &Puller,
    source: &ModelSource,
    pin: Option<&str>,
    label: &str,
    quiet: bool,
) -> Result<CachedBlob, AgentError> {
    let (tx, rx) = watch::channel(PullProgress::default());
    let shown = crate::progress::show(rx, label.to_string(), quiet);
    let result = puller.pull(source, pin, &tx).await;
    drop(tx);
    let _ = shown.await;
    result.map_err(|error| AgentError::Pull {
        source_uri: source.to_string(),
        error,
    })
}

/// `node-agent pull`.
pub async fn pull(args: PullArgs) -> Result<(), AgentError> {
    let metrics = Metrics::new(prometheus::Registry::new())?;
    let puller = open_puller(&args.cache, &metrics)?;
    let source = parse_source(&args.source)?;
    let blob = pull_with_progress(
        &puller,
        &source,
        args.sha256.as_deref(),
        source.file_name(),
        args.quiet,
    )
    .await?;
    println!("{}  sha256:{}", blob.path.display(), blob.meta.sha256);
    Ok(())
}

/// Reads the manifests given with `-f`, checking each and that served names are unique.
pub fn read_manifests(files: &[std::path::PathBuf]) -> Result<Vec<LocalModel>, AgentError> {
    let mut models = Vec::new();
    for f in files {
        let file = f.display().to_string();
        let text = std::fs::read_to_string(f).map_err(|source| AgentError::ReadFile {
            file: file.clone(),
            source,
        })?;
        let parsed =
            crds::manifest::parse_local_models(&text).map_err(|source| AgentError::Manifest {
                file,
                source: Box::new(source),
            })?;
        models.extend(parsed);
    }
    if models.is_empty() {
        return Err(AgentError::Config(
            "the manifests hold no LocalModel to serve".into(),
        ));
    }
    let mut seen = HashSet::new();
    for m in &models {
        let name = served_name(m);
        if !seen.insert(name.clone()) {
            return Err(AgentError::Config(format!(
                "two LocalModels are served as {name:?}; set spec.servedName to tell them apart"
            )));
        }
        if m.spec.format == ModelFormat::Safetensors {
            return Err(AgentError::Config(format!(
                "{name}: format safetensors is not supported by this agent yet; use a GGUF file"
            )));
        }
    }
    Ok(models)
}

/// The name clients use for a LocalModel.
pub fn served_name(m: &LocalModel) -> String {
    m.spec
        .served_name
        .clone()
        .or_else(|| m.metadata.name.clone())
        .unwrap_or_else(|| "model".into())
}

/// The engine settings a LocalModel asks for.
pub fn load_spec(m: &LocalModel, blob: &CachedBlob) -> LoadSpec {
    let engine = m.spec.engine.clone().unwrap_or_default();
    LoadSpec {
        name: served_name(m),
        path: blob.path.clone(),
        sha256: blob.meta.sha256.clone(),
        context_length: engine.context_length.map(|c| c as usize),
        max_seqs: engine
            .max_concurrent_sequences
            .map(|c| c as usize)
            .unwrap_or(4),
        prefix_cache: engine.prefix_cache.unwrap_or(true),
        chat_template: engine.chat_template.clone(),
        // One machine: the first GPU when built with CUDA.
        gpu: Some(0),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// `node-agent serve`: listens at once (livez answers, readyz waits), pulls and loads every
/// model, then reports ready. Stops on SIGINT/SIGTERM, letting in-flight requests finish
/// within the drain bound.
pub async fn serve(args: ServeArgs) -> Result<(), AgentError> {
    let models = read_manifests(&args.files)?;
    let metrics = Metrics::new(prometheus::Registry::new())?;
    let puller = open_puller(&args.cache, &metrics)?;
    let drain = Duration::from_secs(args.engine.drain_seconds);
    let engine = Arc::new(EngineHost::new(EngineConfig {
        max_queue: args.engine.max_queue,
        drain,
        work_dir: args.cache.dir().join("state"),
    }));
    let readiness = Arc::new(Readiness::default());
    let state = AppState {
        engine: engine.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: args.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(AgentError::Server)?;
    tracing::info!(%addr, "listening (not ready until every model is loaded)");
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = api::spawn_server(listener, state, stop_rx.clone());
    let signal_tx = stop_tx.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = signal_tx.send(true);
    });

    let load_all = async {
        for m in &models {
            let name = served_name(m);
            let source = parse_source(&m.spec.source)?;
            let blob = pull_with_progress(
                &puller,
                &source,
                m.spec.sha256.as_deref(),
                &name,
                args.quiet,
            )
            .await?;
            puller.cache().pin(&blob.meta.sha256);
            let timer = DropTimer::new(metrics.load_seconds.with_label_values(&[name.as_str()]));
            tracing::info!(model = %name, path = %blob.path.display(), "loading");
            match engine.load(load_spec(m, &blob)).await {
                Ok(_) => drop(timer),
                Err(e) => {
                    timer.discard();
                    puller.cache().unpin(&blob.meta.sha256);
                    return Err(AgentError::Engine(e));
                }
            }
            metrics.init_model(&name);
            metrics.models_loaded.inc();
        }
        Ok::<(), AgentError>(())
    };
    let mut stop_wait = stop_rx.clone();
    tokio::select! {
        r = load_all => r?,
        _ = stop_wait.wait_for(|s| *s) => {
            return Ok(());
        }
    }
    readiness.set_ready(true);
    for card in engine.models() {
        tracing::info!(model = %card.name, "ready: http://{addr}/v1/chat/completions");
    }

    let mut stop_wait = stop_rx.clone();
    let _ = stop_wait.wait_for(|s| *s).await;
    // Bounded drain: the server stops accepting at once and gets `drain` to finish.
    match tokio::time::timeout(drain + Duration::from_secs(1), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(AgentError::Server(e)),
        Ok(Err(e)) => tracing::warn!(error = %e, "server task failed"),
        Err(_) => tracing::warn!("in-flight requests did not finish within the drain bound"),
    }
    for card in engine.models() {
        let _ = engine.unload(&card.name).await;
        puller.cache().unpin(&card.sha256);
    }
    Ok(())
}
