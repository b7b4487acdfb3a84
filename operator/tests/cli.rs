//! The operator binary's command line, run as a user would.

use std::process::Command;

fn operator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_operator"))
}

#[test]
fn help_lists_the_flags_a_deployment_sets() {
    let out = operator()
        .arg("--help")
        .output()
        .expect("running operator --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--metrics-listen",
        "--namespace",
        "--identity",
        "--leader-lease-seconds",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn without_an_api_server_it_exits_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = operator()
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env("KUBECONFIG", dir.path().join("missing-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("HOME", dir.path())
        .output()
        .expect("running operator");
    assert!(
        !out.status.success(),
        "it must not run without an API server"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("connecting to the API server"),
        "stderr:\n{err}"
    );
}
