//! Starting, using and tearing down one etcd + kube-apiserver control plane.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::config::AuthInfo;
use kube::{Api, Client, Config};

use crate::binaries::{Binaries, find_binaries};
use crate::pki::Pki;
use crate::process::{Proc, log_says_port_taken, log_tail};
use crate::{Error, Result};

/// How many times a process is restarted on new ports when its port turns out to be taken.
const PORT_ATTEMPTS: usize = 5;
/// How long a stopped process gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);

static SHARED: OnceLock<std::result::Result<ControlPlane, String>> = OnceLock::new();

/// The control plane shared by every test of this test binary run, started on first use (from
/// any thread, inside or outside a tokio runtime). It is torn down when the process exits
/// (after the last test, whether tests failed or not), or kept with `LOCALMODEL_E2E_KEEP=1`.
///
/// Panics when it cannot be started, with the reason (binary, port, log lines).
pub fn shared() -> &'static ControlPlane {
    let started = SHARED.get_or_init(|| {
        let started = ControlPlane::builder().start();
        if started.is_ok() {
            // SAFETY: registering a plain extern "C" function.
            unsafe { libc::atexit(teardown_shared) };
        }
        started.map_err(|e| e.to_string())
    });
    match started {
        Ok(cp) => cp,
        Err(e) => panic!("the shared e2e control plane could not be started: {e}"),
    }
}

extern "C" fn teardown_shared() {
    if let Some(Ok(cp)) = SHARED.get() {
        cp.teardown();
    }
}

/// Options for [`ControlPlane::builder`].
#[derive(Clone, Debug)]
pub struct Builder {
    bin_dir: Option<PathBuf>,
    apiserver_port: Option<u16>,
    etcd_port: Option<u16>,
    start_timeout: Duration,
    keep: bool,
}

impl Default for Builder {
    fn default() -> Self {
        let start_timeout = std::env::var("LOCALMODEL_E2E_START_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(180));
        Builder {
            bin_dir: None,
            apiserver_port: None,
            etcd_port: None,
            start_timeout,
            keep: std::env::var("LOCALMODEL_E2E_KEEP").is_ok_and(|v| v == "1" || v == "true"),
        }
    }
}

impl Builder {
    /// Use the binaries in `dir` instead of `LOCALMODEL_CONTROLPLANE_BIN` / build.sh.
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// Try this secure port for the API server first (another free one is used if it is taken).
    pub fn apiserver_port(mut self, port: u16) -> Self {
        self.apiserver_port = Some(port);
        self
    }

    /// Try this client port for etcd first (another free one is used if it is taken).
    pub fn etcd_port(mut self, port: u16) -> Self {
        self.etcd_port = Some(port);
        self
    }

    /// Deadline for each of etcd and the API server to become ready.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Keep the control plane running when it is dropped (prints how to reach and stop it).
    pub fn keep(mut self, keep: bool) -> Self {
        self.keep = keep;
        self
    }

    /// Starts etcd and the API server and waits until `/readyz` answers `ok`. Blocks; may be
    /// called from inside a tokio runtime (the waiting happens on a thread of its own).
    pub fn start(self) -> Result<ControlPlane> {
        std::thread::scope(|s| {
            s.spawn(move || self.start_blocking())
                .join()
                .unwrap_or_else(|_| Err(Error::Other("control-plane start panicked".into())))
        })
    }

    fn start_blocking(self) -> Result<ControlPlane> {
        let binaries = match &self.bin_dir {
            Some(dir) => Binaries::in_dir(dir)?,
            None => find_binaries()?,
        };
        let kubectl = std::env::var_os("LOCALMODEL_KUBECTL")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("kubectl"));
        let dir = make_run_dir()?;
        let pki = match Pki::generate(&dir.join("pki")) {
            Ok(pki) => pki,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut cp = ControlPlane {
            kubeconfig: dir.join("kubeconfig"),
            kubectl_cache: dir.join("kubectl-cache"),
            dir,
            keep: self.keep,
            procs: Mutex::new(Vec::new()),
            torn_down: AtomicBool::new(false),
            apiserver_port: 0,
            etcd_port: 0,
            kubectl,
            ca_pem: pki.ca_pem.clone(),
            ca_der: pki.ca_der.clone(),
            admin_crt_b64: B64.encode(&pki.admin_crt_pem),
            admin_key_b64: B64.encode(&pki.admin_key_pem),
            binaries,
            namespaces: AtomicU32::new(0),
        };
        if let Err(e) = cp.boot(&pki, &self) {
            // Dropping `cp` kills what was started and removes the directory, kept or not.
            cp.keep = false;
            return Err(e);
        }
        tracing::info!(
            apiserver = %cp.apiserver_url(),
            kubeconfig = %cp.kubeconfig.display(),
            "e2e control plane ready"
        );
        Ok(cp)
    }
}

/// A running etcd + kube-apiserver pair, with the files to reach it.
pub struct ControlPlane {
    dir: PathBuf,
    keep: bool,
    procs: Mutex<Vec<Proc>>,
    torn_down: AtomicBool,
    apiserver_port: u16,
    etcd_port: u16,
    kubeconfig: PathBuf,
    kubectl_cache: PathBuf,
    kubectl: PathBuf,
    ca_pem: String,
    ca_der: Vec<u8>,
    admin_crt_b64: String,
    admin_key_b64: String,
    binaries: Binaries,
    namespaces: AtomicU32,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("apiserver", &self.apiserver_url())
            .field("etcd_port", &self.etcd_port)
            .field("dir", &self.dir)
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Options for a private control plane (torn down on drop). See also [`shared()`].
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Starts a private control plane with the default options.
    pub fn start() -> Result<ControlPlane> {
        Builder::default().start()
    }

    /// `https://127.0.0.1:PORT`.
    pub fn apiserver_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    pub fn apiserver_port(&self) -> u16 {
        self.apiserver_port
    }

    pub fn etcd_port(&self) -> u16 {
        self.etcd_port
    }

    /// The kubeconfig (admin, O=system:masters) for kube-rs, `kubectl` and `helm`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The temporary directory holding certificates, data and logs
    /// (`etcd.log`, `kube-apiserver.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM) that signed the serving and client certificates.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// The process ids of etcd and kube-apiserver (empty after teardown).
    pub fn pids(&self) -> Vec<(String, u32)> {
        lock(&self.procs)
            .iter()
            .map(|p| (p.name.clone(), p.pid()))
            .collect()
    }

    /// Last lines of the API server's log, for test failure messages.
    pub fn apiserver_log_tail(&self, lines: usize) -> String {
        log_tail(&self.dir.join("kube-apiserver.log"), lines)
    }

    fn base_config(&self) -> Config {
        let mut config = Config::new(
            self.apiserver_url()
                .parse()
                .expect("a https://127.0.0.1:PORT URL parses"),
        );
        config.root_cert = Some(vec![self.ca_der.clone()]);
        config.read_timeout = Some(Duration::from_secs(30));
        config
    }

    /// kube-rs config for the admin (client certificate, O=system:masters).
    pub fn admin_config(&self) -> Config {
        let mut config = self.base_config();
        config.auth_info = auth_info(serde_json::json!({
            "client-certificate-data": self.admin_crt_b64,
            "client-key-data": self.admin_key_b64,
        }));
        config
    }

    /// A new admin client. Must be called inside a tokio runtime; make one per runtime (one
    /// per `#[tokio::test]`), since a client's connections belong to the runtime it was made in.
    pub fn client(&self) -> Client {
        crate::install_crypto_provider();
        Client::try_from(self.admin_config()).expect("building the admin kube client")
    }

    /// A client that authenticates with a bearer `token` only (e.g. from
    /// [`token_for_service_account`](Self::token_for_service_account)).
    pub fn client_with_token(&self, token: &str) -> Client {
        crate::install_crypto_provider();
        let mut config = self.base_config();
        config.auth_info = auth_info(serde_json::json!({ "token": token }));
        Client::try_from(config).expect("building a token kube client")
    }

    /// A `kubectl` command set up for this control plane (kubeconfig, its own discovery cache).
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--cache-dir={}", self.kubectl_cache.display()))
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `kubectl ARGS` against this control plane and returns its output (whatever its exit
    /// status). Panics only when kubectl cannot be run at all.
    pub fn kubectl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.kubectl_command();
        cmd.args(args);
        cmd.output().unwrap_or_else(|e| {
            panic!(
                "running {} (set LOCALMODEL_KUBECTL to choose another): {e}",
                self.kubectl.display()
            )
        })
    }

    /// Like [`kubectl`](Self::kubectl), with `stdin` fed to the command (`-f -`).
    pub fn kubectl_stdin<I, S>(&self, args: I, stdin: &str) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.kubectl_command();
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "running {} (set LOCALMODEL_KUBECTL to choose another): {e}",
                self.kubectl.display()
            )
        });
        let mut input = child.stdin.take().expect("piped stdin");
        let stdin = stdin.to_string();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(stdin.as_bytes());
        });
        let out = child.wait_with_output().expect("waiting for kubectl");
        let _ = writer.join();
        out
    }

    /// Runs `helm ARGS` against this control plane (panics when there is no helm binary).
    pub fn helm<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let helm = self
            .binaries
            .helm
            .as_ref()
            .unwrap_or_else(|| panic!("no helm in {}", self.binaries.dir.display()));
        let home = self.dir.join("helm");
        Command::new(helm)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", helm.display()))
    }

    /// Creates a namespace named after `unique` (lowercased, other characters turned into
    /// `-`) plus a counter, so every test gets its own. Returns its name. No controller-manager
    /// runs, so it has no `default` ServiceAccount and is never garbage-collected; the whole
    /// control plane goes away at teardown.
    pub async fn create_namespace(&self, unique: &str) -> Result<String> {
        let n = self.namespaces.fetch_add(1, Ordering::Relaxed);
        let mut base: String = unique
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        base.truncate(50);
        let base = base.trim_matches('-');
        let name = if base.is_empty() {
            format!("e2e-{n}")
        } else {
            format!("{base}-{n}")
        };
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("e2e.localmodel.dev/test".to_string(), base.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.client())
            .create(&PostParams::default(), &ns)
            .await?;
        Ok(name)
    }

    /// Creates ServiceAccount `ns/name` if it does not exist and returns a one-hour token for
    /// it, minted with the TokenRequest API.
    pub async fn token_for_service_account(&self, ns: &str, name: &str) -> Result<String> {
        let sas = self.ensure_service_account(ns, name).await?;
        request_token(&sas, ns, name, None).await
    }

    /// The ServiceAccounts of `ns`, after creating `ns/name` if it does not exist.
    async fn ensure_service_account(&self, ns: &str, name: &str) -> Result<Api<ServiceAccount>> {
        let sas = Api::<ServiceAccount>::namespaced(self.client(), ns);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        match sas.create(&PostParams::default(), &sa).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        Ok(sas)
    }

    /// Writes a kubeconfig that authenticates with `token` only, as `name` in this control
    /// plane's directory, and returns its path (for processes run as a ServiceAccount).
    pub fn token_kubeconfig(&self, name: &str, token: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("kubeconfig-{name}"));
        let kubeconfig = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: localmodel-e2e
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {name}
  user:
    token: {token}
contexts:
- name: {name}
  context:
    cluster: localmodel-e2e
    user: {name}
    namespace: default
current-context: {name}
",
            server = self.apiserver_url(),
            ca = B64.encode(&self.ca_pem),
        );
        write_private(&path, &kubeconfig)?;
        Ok(path)
    }

    /// A one-hour token for ServiceAccount `ns/sa` bound to Pod `ns/pod`: the API server puts
    /// the Pod's node into the token's user info (`authentication.kubernetes.io/node-name`),
    /// as it does for the tokens a kubelet mounts. The Pod is created with `spec.nodeName`
    /// `node` if it does not exist (nothing runs it: there is no kubelet).
    pub async fn token_bound_to_pod(
        &self,
        ns: &str,
        sa: &str,
        pod: &str,
        node: &str,
    ) -> Result<String> {
        let sas = self.ensure_service_account(ns, sa).await?;
        let pods = Api::<Pod>::namespaced(self.client(), ns);
        let wanted: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": pod },
            "spec": {
                "nodeName": node,
                "serviceAccountName": sa,
                "containers": [{ "name": "agent", "image": "localmodel/node-agent" }],
            },
        }))
        .map_err(|e| Error::Other(format!("building Pod {pod}: {e}")))?;
        let created = match pods.create(&PostParams::default(), &wanted).await {
            Ok(p) => p,
            Err(kube::Error::Api(status)) if status.code == 409 => pods.get(pod).await?,
            Err(e) => return Err(e.into()),
        };
        let pod_ref = BoundObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: created.metadata.name.clone(),
            uid: created.metadata.uid.clone(),
        };
        request_token(&sas, ns, sa, Some(pod_ref)).await
    }

    /// Stops both processes and removes the temporary directory (unless kept). Idempotent.
    pub fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.keep {
            say(&format!(
                "e2e: control plane kept at {} (pids {:?})\n  export KUBECONFIG={}\n  stop it with: sh {}",
                self.apiserver_url(),
                self.pids(),
                self.kubeconfig.display(),
                self.dir.join("stop.sh").display()
            ));
            return;
        }
        let mut procs = lock(&self.procs);
        // API server first, so it does not log etcd errors while shutting down.
        while let Some(mut p) = procs.pop() {
            p.kill(KILL_GRACE);
        }
        drop(procs);
        let _ = fs::remove_dir_all(&self.dir);
    }

    fn boot(&mut self, pki: &Pki, opts: &Builder) -> Result<()> {
        self.etcd_port = self.start_etcd(opts.etcd_port, opts.start_timeout)?;
        self.apiserver_port = self.start_apiserver(pki, opts.apiserver_port, opts.start_timeout)?;
        self.write_kubeconfig()?;
        if self.keep {
            self.write_stop_script()?;
            fs::write(self.dir.join("keep"), "")
                .map_err(|e| Error::io("writing keep marker", e))?;
            say(&format!(
                "e2e: LOCALMODEL_E2E_KEEP: the control plane stays up after the tests.\n  \
                 export KUBECONFIG={}\n  stop it with: sh {}",
                self.kubeconfig.display(),
                self.dir.join("stop.sh").display()
            ));
        }
        Ok(())
    }

    /// Ends one start attempt of `name`: keeps the process when it came up (`true`), kills it
    /// and asks for another port when its port was taken (`false`), or fails with its log.
    fn settle(
        &self,
        name: &str,
        mut proc: Proc,
        waited: std::result::Result<(), StartError>,
        attempt: usize,
        log: &Path,
        ports: &str,
    ) -> Result<bool> {
        match waited {
            Ok(()) => {
                lock(&self.procs).push(proc);
                Ok(true)
            }
            Err(StartError::PortTaken) if attempt < PORT_ATTEMPTS => {
                proc.kill(KILL_GRACE);
                say(&format!(
                    "e2e: {name} could not bind port {ports}; retrying on another port"
                ));
                Ok(false)
            }
            Err(StartError::PortTaken) => {
                proc.kill(KILL_GRACE);
                Err(Error::Other(format!(
                    "{name} could not bind a port in {PORT_ATTEMPTS} attempts; last lines of {}:\n{}",
                    log.display(),
                    log_tail(log, 30)
                )))
            }
            Err(StartError::Fatal(e)) => {
                proc.kill(KILL_GRACE);
                Err(e)
            }
        }
    }

    fn start_etcd(&mut self, first_port: Option<u16>, timeout: Duration) -> Result<u16> {
        let log = self.dir.join("etcd.log");
        let data = self.dir.join("etcd-data");
        let mut first_port = first_port;
        for attempt in 1..=PORT_ATTEMPTS {
            let client_port = first_port.take().unwrap_or_else(free_port);
            let peer_port = free_port();
            let client = format!("http://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{peer_port}");
            let _ = fs::remove_dir_all(&data);
            let args = vec![
                "--name=e2e".to_string(),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls={client}"),
                format!("--advertise-client-urls={client}"),
                format!("--listen-peer-urls={peer}"),
                format!("--initial-advertise-peer-urls={peer}"),
                format!("--initial-cluster=e2e={peer}"),
                "--initial-cluster-state=new".to_string(),
                "--unsafe-no-fsync=true".to_string(),
                "--log-level=warn".to_string(),
            ];
            let mut proc = Proc::spawn(
                "etcd",
                &self.binaries.etcd,
                &args,
                &log,
                client_port,
                !self.keep,
            )?;
            let waited = wait_etcd(&mut proc, timeout);
            let ports = format!("{client_port} or {peer_port}");
            if self.settle("etcd", proc, waited, attempt, &log, &ports)? {
                return Ok(client_port);
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    fn start_apiserver(
        &mut self,
        pki: &Pki,
        first_port: Option<u16>,
        timeout: Duration,
    ) -> Result<u16> {
        let log = self.dir.join("kube-apiserver.log");
        let p = |path: &Path| path.display().to_string();
        let mut first_port = first_port;
        for attempt in 1..=PORT_ATTEMPTS {
            let port = first_port.take().unwrap_or_else(free_port);
            self.apiserver_port = port;
            let args = vec![
                format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
                "--bind-address=127.0.0.1".to_string(),
                "--advertise-address=127.0.0.1".to_string(),
                format!("--secure-port={port}"),
                format!("--cert-dir={}", p(&self.dir.join("apiserver-certs"))),
                format!("--tls-cert-file={}", p(&pki.serving_crt)),
                format!("--tls-private-key-file={}", p(&pki.serving_key)),
                format!("--client-ca-file={}", p(&pki.ca_crt)),
                "--authorization-mode=Node,RBAC".to_string(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
                format!("--service-account-key-file={}", p(&pki.sa_pub)),
                format!("--service-account-signing-key-file={}", p(&pki.sa_key)),
                "--service-cluster-ip-range=10.96.0.0/16".to_string(),
                // No controller-manager runs: no token controller, no default ServiceAccounts.
                "--disable-admission-plugins=ServiceAccount".to_string(),
                // The endpoints of the `kubernetes` Service cannot be a loopback address.
                "--endpoint-reconciler-type=none".to_string(),
                "--enable-priority-and-fairness=false".to_string(),
                "--profiling=false".to_string(),
                "--v=1".to_string(),
            ];
            let mut proc = Proc::spawn(
                "kube-apiserver",
                &self.binaries.kube_apiserver,
                &args,
                &log,
                port,
                !self.keep,
            )?;
            let waited = wait_apiserver(&mut proc, self.admin_config(), timeout);
            if self.settle(
                "kube-apiserver",
                proc,
                waited,
                attempt,
                &log,
                &port.to_string(),
            )? {
                return Ok(port);
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    fn write_kubeconfig(&self) -> Result<()> {
        let kubeconfig = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: localmodel-e2e
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    client-certificate-data: {crt}
    client-key-data: {key}
contexts:
- name: localmodel-e2e
  context:
    cluster: localmodel-e2e
    user: admin
    namespace: default
current-context: localmodel-e2e
",
            server = self.apiserver_url(),
            ca = B64.encode(&self.ca_pem),
            crt = self.admin_crt_b64,
            key = self.admin_key_b64,
        );
        write_private(&self.kubeconfig, &kubeconfig)
    }

    fn write_stop_script(&self) -> Result<()> {
        // API server first; `kill -SIG -PGID` (no `--`: dash's kill does not take it).
        let groups: Vec<String> = self
            .pids()
            .iter()
            .rev()
            .map(|(_, pid)| format!("-{pid}"))
            .collect();
        let script = format!(
            "#!/bin/sh\n# Stops the kept LocalModel e2e control plane and removes its files.\n\
             kill -TERM {groups} 2>/dev/null\nsleep 2\nkill -KILL {groups} 2>/dev/null\nrm -rf '{dir}'\n",
            groups = groups.join(" "),
            dir = self.dir.display()
        );
        write_private(&self.dir.join("stop.sh"), &script)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.teardown();
    }
}

enum StartError {
    PortTaken,
    Fatal(Error),
}

fn wait_etcd(proc: &mut Proc, timeout: Duration) -> std::result::Result<(), StartError> {
    let start = Instant::now();
    loop {
        if let Some(status) = proc.exited() {
            return Err(if log_says_port_taken(&proc.log) {
                StartError::PortTaken
            } else {
                StartError::Fatal(proc.died(status))
            });
        }
        let last = match etcd_health(proc.port) {
            Ok(body) if body.contains("\"health\":\"true\"") => return Ok(()),
            Ok(body) => body,
            Err(e) => e.to_string(),
        };
        if start.elapsed() >= timeout {
            return Err(StartError::Fatal(Error::Timeout {
                what: format!(
                    "etcd (pid {}) on 127.0.0.1:{} to be healthy; last lines of {}:\n{}\n",
                    proc.pid(),
                    proc.port,
                    proc.log.display(),
                    log_tail(&proc.log, 20)
                ),
                waited: start.elapsed(),
                last,
            }));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `GET /health` on etcd's client port, answering the response body.
fn etcd_health(port: u16) -> std::io::Result<String> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or(answer))
}

fn wait_apiserver(
    proc: &mut Proc,
    config: Config,
    timeout: Duration,
) -> std::result::Result<(), StartError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StartError::Fatal(Error::io("building a tokio runtime", e)))?;
    runtime.block_on(async move {
        let mut config = config;
        config.read_timeout = Some(Duration::from_secs(5));
        config.connect_timeout = Some(Duration::from_secs(2));
        crate::install_crypto_provider();
        let client = Client::try_from(config).map_err(|e| StartError::Fatal(e.into()))?;
        let start = Instant::now();
        loop {
            if let Some(status) = proc.exited() {
                return Err(if log_says_port_taken(&proc.log) {
                    StartError::PortTaken
                } else {
                    StartError::Fatal(proc.died(status))
                });
            }
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a GET request builds");
            let last = match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => body,
                Err(kube::Error::Api(status)) => format!("{}: {}", status.code, status.message),
                Err(e) => e.to_string(),
            };
            if start.elapsed() >= timeout {
                return Err(StartError::Fatal(Error::Timeout {
                    what: format!(
                        "kube-apiserver (pid {}) on 127.0.0.1:{} to answer /readyz ok; last lines of {}:\n{}\n",
                        proc.pid(),
                        proc.port,
                        proc.log.display(),
                        log_tail(&proc.log, 20)
                    ),
                    waited: start.elapsed(),
                    last,
                }));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

fn auth_info(value: serde_json::Value) -> AuthInfo {
    serde_json::from_value(value).expect("a kubeconfig user entry deserializes")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A port that was free a moment ago (the OS picks it; a race is handled by retrying).
fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    f.write_all(contents.as_bytes())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Prints to the real stderr, past the test harness's output capture (which only sees
/// `print!`/`eprint!`), so that messages about kept control planes are always visible.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// The run directory `$TMPDIR/localmodel-e2e/cp-XXXX`, after removing the directories of
/// earlier runs whose process is gone (left behind by a SIGKILLed test process) and that were
/// not kept on purpose.
fn make_run_dir() -> Result<PathBuf> {
    let root = std::env::temp_dir().join("localmodel-e2e");
    fs::create_dir_all(&root).map_err(|e| Error::io(format!("creating {}", root.display()), e))?;
    if let Ok(entries) = fs::read_dir(&root) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.join("keep").exists() {
                continue;
            }
            let owner = fs::read_to_string(path.join("owner.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            if let Some(pid) = owner
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = fs::remove_dir_all(&path);
            }
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("cp-")
        .tempdir_in(&root)
        .map_err(|e| Error::io(format!("creating a directory in {}", root.display()), e))?
        .keep();
    fs::write(dir.join("owner.pid"), std::process::id().to_string())
        .map_err(|e| Error::io("writing owner.pid", e))?;
    Ok(dir)
}

/// A one-hour token for ServiceAccount `ns/name`, bound to `bound` when given.
async fn request_token(
    sas: &Api<ServiceAccount>,
    ns: &str,
    name: &str,
    bound: Option<BoundObjectReference>,
) -> Result<String> {
    let what = match &bound {
        Some(b) => format!(
            "{ns}/{name} bound to {} {}",
            b.kind.as_deref().unwrap_or(""),
            b.name.as_deref().unwrap_or("")
        ),
        None => format!("{ns}/{name}"),
    };
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            bound_object_ref: bound,
        },
        ..Default::default()
    };
    let answer = sas
        .create_token_request(name, &PostParams::default(), &request)
        .await?;
    answer
        .status
        .map(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::Other(format!("TokenRequest for {what} returned no token")))
}
