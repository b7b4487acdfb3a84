//! End-to-end test harness for LocalModel: a real control plane (etcd + kube-apiserver, built
//! from upstream by `e2e/controlplane/build.sh`) started on free loopback ports in a temporary
//! directory, with a CA, TLS serving and admin client certificates, a service-account signing
//! key, RBAC, and a kubeconfig usable by kube-rs and `kubectl`.
//!
//! Most tests use [`shared()`]: one control plane per test binary run, torn down when the test
//! process exits (normally or after failed tests), each test in its own namespace made with
//! [`ControlPlane::create_namespace`]. [`ControlPlane::builder`] starts a private one that is
//! torn down on drop.
//!
//! Environment:
//! * `LOCALMODEL_CONTROLPLANE_BIN`: directory holding `kube-apiserver`, `etcd` (and `helm`);
//!   unset: `e2e/controlplane/build.sh` is run (it reuses its cache) to find or build them.
//! * `LOCALMODEL_E2E_KEEP=1`: keep the control plane running after the tests, print its
//!   kubeconfig path and how to stop it.
//! * `LOCALMODEL_KUBECTL`: the kubectl to run (default: `kubectl` on `PATH`).
//! * `LOCALMODEL_E2E_START_TIMEOUT`: seconds to wait for the control plane (default 180).
//! * `LOCALMODEL_PROMETHEUS_BIN`: directory holding `prometheus` and `promtool`; unset:
//!   `e2e/prometheus/install.sh` finds them on `PATH` or unpacks Debian's package into the cache.

mod binaries;
mod control_plane;
pub mod daemon;
mod error;
pub mod helm;
mod pki;
mod process;
pub mod prometheus;
pub mod wait;

pub use binaries::{Binaries, find_binaries};
pub use control_plane::{Builder, ControlPlane, shared};
pub use daemon::{Daemon, workspace_binary};
pub use error::Error;
pub use prometheus::Prometheus;

/// Result with the harness [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The workspace root (the directory holding `crds/`, `examples/`, `e2e/`).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e crate lives inside the workspace")
        .to_path_buf()
}

/// A finished command's exit status, stdout and stderr, for assertion messages.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Selects rustls' ring back end for this process. Dependencies enable both of rustls' crypto
/// back ends, and then rustls refuses to guess.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
