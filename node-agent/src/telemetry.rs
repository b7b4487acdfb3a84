//! Logging setup: `tracing` with an `EnvFilter` (`RUST_LOG`), plain or JSON lines.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// Installs the global subscriber. The default filter keeps the engine's own chatter at warn.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,mistralrs_core=warn,mistralrs_core::pipeline::gguf=error,mistralrs_quant=warn,candle_core=warn,hyper=warn")
    });
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Plain => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init(),
    };
    if let Err(e) = result {
        eprintln!("logging was already initialised: {e}");
    }
}
