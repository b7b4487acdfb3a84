use std::path::PathBuf;
use std::time::Duration;

/// Why the control plane could not be built, started or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The control-plane binaries could not be found or built.
    #[error("control-plane binaries: {0}")]
    Binaries(String),

    /// Generating keys or certificates failed.
    #[error("generating certificates: {0}")]
    Pki(#[from] rcgen::Error),

    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// A control-plane process exited while it was starting.
    #[error(
        "{binary} (port {port}) exited with {status} while starting; last lines of {}:\n{log_tail}",
        log.display()
    )]
    Died {
        binary: String,
        port: u16,
        status: String,
        log: PathBuf,
        log_tail: String,
    },

    /// Something was not ready or true before its deadline.
    #[error("timed out after {waited:?} waiting for {what}; last seen: {last}")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },

    /// The API server answered with an error.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    /// Anything else (bad kubeconfig, bad input).
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
