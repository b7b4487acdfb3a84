//! LocalModel node agent: pulls model weights into a node-local cache, runs them with
//! mistral.rs, and serves OpenAI- and Ollama-compatible HTTP with Prometheus metrics.
//!
//! `main.rs` only parses arguments; everything here is testable as a library.

pub mod api;
pub mod cache;
pub mod chat;
pub mod cli;
pub mod cluster;
pub mod engine;
pub mod metrics;
pub mod progress;
pub mod puller;
pub mod standalone;
pub mod telemetry;

/// Errors that end an agent command.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{file}: {source}")]
    Manifest {
        file: String,
        #[source]
        source: Box<crds::Error>,
    },
    #[error("cannot read {file}: {source}")]
    ReadFile {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("pulling {source_uri}: {error}")]
    Pull {
        source_uri: String,
        #[source]
        error: puller::PullError,
    },
    #[error(transparent)]
    Cache(#[from] cache::CacheError),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error("server: {0}")]
    Server(std::io::Error),
    #[error("--fake-gpus: {0}")]
    FakeGpus(#[from] cluster::inventory::FakeGpuError),
    #[error(transparent)]
    Chat(#[from] chat::ChatError),
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: Box<kube::Error>,
    },
}
