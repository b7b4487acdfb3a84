//! The Helm chart, checked by the real tools: `helm lint` and `helm template` (helm from the
//! control-plane build) with default and non-default values (`charts/localmodel/ci/`), the
//! values schema refusing bad input, the rendered objects' contents, the agent's and operator's
//! rendered arguments parsed by the real binaries, `kubectl apply --dry-run=server` of the
//! rendered chart (with the Prometheus operator's CRDs for the monitors) and `helm install
//! --dry-run=server` with its NOTES against a real API server, and a real release installed,
//! upgraded to the custom values and uninstalled.

use std::path::Path;

use e2e::helm::{chart_dir, helm, render};
use e2e::{output_text, shared, workspace_binary, workspace_root};
use serde_json::Value;

const NS: &str = "localmodel-system";
const CUSTOM: &str = "ci/custom-values.yaml";

fn custom_values() -> String {
    chart_dir().join(CUSTOM).display().to_string()
}

/// The rendered objects, by `Kind/name`.
fn objects(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{yaml}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| {
            let have: Vec<String> = objs
                .iter()
                .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]))
                .collect();
            panic!("no {kind}/{name} among {have:?}")
        })
}

fn count(objs: &[Value], kind: &str) -> usize {
    objs.iter().filter(|o| o["kind"] == kind).count()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().unwrap_or_default().to_string())
        .collect()
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("no env {name} in {}", container["env"]))
}

/// The downward-API field an env variable of `container` reads.
fn field_ref<'a>(container: &'a Value, name: &str) -> &'a Value {
    &env(container, name)["valueFrom"]["fieldRef"]["fieldPath"]
}

/// The hardened securityContext the chart promises wherever the workload allows it.
fn assert_hardened(what: &str, sc: &Value) {
    assert_eq!(sc["runAsNonRoot"], true, "{what}: {sc}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}: {sc}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}: {sc}");
    assert_eq!(
        strings(&sc["capabilities"]["drop"]),
        ["ALL"],
        "{what}: {sc}"
    );
    assert_eq!(
        sc["seccompProfile"]["type"], "RuntimeDefault",
        "{what}: {sc}"
    );
}

/// The pod's volume named `name`.
fn volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("no volume {name} in {}", pod["volumes"]))
}

fn render_ok(extra: &[&str]) -> String {
    render("localmodel", NS, extra).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn helm_lint_passes_with_default_and_custom_values() {
    let chart = chart_dir();
    for extra in [vec![], vec!["-f".to_string(), custom_values()]] {
        let mut args = vec![
            "lint".to_string(),
            "--strict".to_string(),
            chart.display().to_string(),
        ];
        args.extend(extra);
        let out = helm(&args).expect("helm");
        println!(
            "helm {}:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            out.status.success(),
            "helm {}: {}",
            args.join(" "),
            output_text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("0 chart(s) failed"),
            "{}",
            output_text(&out)
        );
    }
}

#[test]
fn default_values_render_a_hardened_leader_elected_operator_and_a_gpu_daemonset() {
    let objs = objects(&render_ok(&[]));

    let op = find(&objs, "Deployment", "localmodel-operator");
    assert_eq!(op["spec"]["replicas"], 2);
    let pod = &op["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "localmodel-operator");
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "localmodel/operator:0.1.0");
    assert!(strings(&c["args"]).contains(&"--leader-lease-seconds=10".to_string()));
    assert_eq!(field_ref(c, "POD_NAME"), "metadata.name");
    assert_eq!(field_ref(c, "POD_NAMESPACE"), "metadata.namespace");
    assert_hardened("operator", &c["securityContext"]);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        find(&objs, "PodDisruptionBudget", "localmodel-operator")["spec"]["maxUnavailable"],
        1
    );

    let ds = find(&objs, "DaemonSet", "localmodel-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "localmodel-agent");
    assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
    assert_eq!(pod["tolerations"][0]["key"], "nvidia.com/gpu");
    assert!(pod["runtimeClassName"].is_null(), "{pod}");
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "localmodel/node-agent:0.1.0-cuda");
    assert_eq!(field_ref(c, "NODE_NAME"), "spec.nodeName");
    assert_eq!(field_ref(c, "POD_IP"), "status.podIP");
    assert_eq!(env(c, "NVIDIA_VISIBLE_DEVICES")["value"], "all");
    assert_eq!(
        env(c, "NVIDIA_DRIVER_CAPABILITIES")["value"],
        "compute,utility"
    );
    assert!(strings(&c["args"]).contains(&"--cache-size=100Gi".to_string()));
    assert_hardened("agent", &c["securityContext"]);
    let cache = volume(pod, "cache");
    assert_eq!(cache["hostPath"]["path"], "/var/lib/localmodel/models");
    // The hostPath is created root-owned: only the chown init container runs as root, with
    // CAP_CHOWN alone.
    let init = &pod["initContainers"][0];
    assert_eq!(strings(&init["command"])[0], "chown");
    assert_eq!(
        strings(&init["securityContext"]["capabilities"]["add"]),
        ["CHOWN"]
    );
    assert_eq!(init["securityContext"]["readOnlyRootFilesystem"], true);

    let hook = find(&objs, "Pod", "localmodel-test-chat");
    assert_eq!(hook["metadata"]["annotations"]["helm.sh/hook"], "test");
    let hc = &hook["spec"]["containers"][0];
    assert_eq!(hc["image"], "localmodel/node-agent:0.1.0-cpu");
    assert!(strings(&hc["args"]).contains(&"--url=http://smollm2.default.svc/v1".to_string()));
    assert_hardened("helm test", &hc["securityContext"]);

    // Off by default: monitors (they need the Prometheus operator's CRDs) and policies.
    for kind in [
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "NetworkPolicy",
    ] {
        assert_eq!(count(&objs, kind), 0, "{kind} rendered by default");
    }
    assert_eq!(count(&objs, "ValidatingAdmissionPolicy"), 1);
    let agent_svc = find(&objs, "Service", "localmodel-agent");
    assert_eq!(agent_svc["spec"]["clusterIP"], "None");
    find(&objs, "Service", "localmodel-operator-metrics");
}

#[test]
fn custom_values_turn_on_monitors_policies_and_other_choices() {
    let objs = objects(&render_ok(&["-f", &custom_values()]));

    let op = find(&objs, "Deployment", "localmodel-operator");
    assert_eq!(op["spec"]["replicas"], 3);
    assert_eq!(op["metadata"]["labels"]["team"], "platform");
    let c = &op["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        c["image"],
        "registry.example.com/ml/localmodel/operator:0.1.0"
    );
    assert!(strings(&c["args"]).contains(&"--metrics-listen=0.0.0.0:9443".to_string()));

    let pod = &find(&objs, "DaemonSet", "localmodel-agent")["spec"]["template"]["spec"];
    assert_eq!(pod["runtimeClassName"], "nvidia");
    assert_eq!(pod["imagePullSecrets"][0]["name"], "registry-credentials");
    assert!(
        pod["nodeSelector"].get("nvidia.com/gpu.present").is_none(),
        "a null value removes the default selector: {}",
        pod["nodeSelector"]
    );
    assert_eq!(pod["nodeSelector"]["localmodel.dev/gpu"], "true");
    assert!(
        pod["initContainers"].is_null(),
        "no chown without hostPath: {pod}"
    );
    let c = &pod["containers"][0];
    assert_eq!(
        c["image"],
        "registry.example.com/ml/localmodel/node-agent:0.1.0-cpu"
    );
    let args = strings(&c["args"]);
    for want in [
        "--listen=0.0.0.0:11434",
        "--cache-size=500Gi",
        "--threads=8",
        "--fake-gpus=NVIDIA L4=24GiB",
    ] {
        assert!(args.contains(&want.to_string()), "{want} in {args:?}");
    }
    assert_eq!(
        env(c, "HF_TOKEN")["valueFrom"]["secretKeyRef"]["name"],
        "hf"
    );
    let mount = c["volumeMounts"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "cache"))
        .expect("cache mount");
    assert_eq!(mount["subPathExpr"], "$(NODE_NAME)");
    let cache = volume(pod, "cache");
    assert_eq!(cache["persistentVolumeClaim"]["claimName"], "model-cache");

    for kind in ["ServiceMonitor", "PodMonitor"] {
        assert_eq!(count(&objs, kind), 2, "{kind}: operator and agents");
        for o in objs.iter().filter(|o| o["kind"] == kind) {
            let text = o.to_string();
            assert!(
                text.contains("__meta_kubernetes_pod_node_name") && text.contains("\"node\""),
                "{kind} labels series with the node: {text}"
            );
        }
    }
    assert_eq!(
        find(&objs, "ServiceMonitor", "localmodel-agent")["metadata"]["labels"]["release"],
        "prometheus"
    );
    // The alerting rules are the rule file as is (the e2e Prometheus loads that file).
    let rule = find(&objs, "PrometheusRule", "localmodel");
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
    let file = chart_dir().join("rules/localmodel.rules.yaml");
    let want: Value = serde_saphyr::from_str(&std::fs::read_to_string(&file).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert_eq!(
        rule["spec"],
        want,
        "the PrometheusRule holds {}",
        file.display()
    );

    let np = find(&objs, "NetworkPolicy", "localmodel-agent");
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["localmodel.dev/clients"],
        "true"
    );
    find(&objs, "NetworkPolicy", "localmodel-operator");

    let dash = find(&objs, "ConfigMap", "localmodel-dashboard-fleet");
    assert_eq!(dash["metadata"]["namespace"], "monitoring");
    assert_eq!(
        dash["metadata"]["labels"]["grafana_dashboard_localmodel"],
        "yes"
    );
    assert_eq!(
        dash["metadata"]["annotations"]["grafana_folder"],
        "LocalModel"
    );

    let hook = find(&objs, "Pod", "localmodel-test-chat");
    let args = strings(&hook["spec"]["containers"][0]["args"]);
    assert!(
        args.contains(&"--url=http://llama-3-1-8b.team-a.svc/v1".to_string()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--model=llama-3.1-8b".to_string()),
        "{args:?}"
    );
}

#[test]
fn an_ephemeral_cache_claims_the_cache_size() {
    let objs = objects(&render_ok(&[
        "--set",
        "agent.cache.type=ephemeral,agent.cache.size=250Gi,agent.cache.ephemeral.storageClassName=fast",
    ]));
    let pod = &find(&objs, "DaemonSet", "localmodel-agent")["spec"]["template"]["spec"];
    let cache = volume(pod, "cache");
    let spec = &cache["ephemeral"]["volumeClaimTemplate"]["spec"];
    assert_eq!(spec["resources"]["requests"]["storage"], "250Gi", "{cache}");
    assert_eq!(spec["storageClassName"], "fast", "{cache}");
}

#[test]
fn the_values_schema_refuses_wrong_types_unknown_keys_and_bad_choices() {
    let cases: &[(&str, &str)] = &[
        ("operator.replicas=two", "/operator/replicas"),
        ("operator.replica=2", "'replica' not allowed"),
        ("agnet.port=8080", "'agnet' not allowed"),
        ("agent.cache.type=nfs", "/agent/cache/type"),
        ("agent.cache.size=lots", "/agent/cache/size"),
        ("agent.image.flavor=rocm", "/agent/image/flavor"),
        ("agent.port=70000", "/agent/port"),
        ("operator.logFormat=xml", "/operator/logFormat"),
        (
            "metrics.serviceMonitor.interval=often",
            "/metrics/serviceMonitor/interval",
        ),
        ("networkPolicy.enabled=maybe", "/networkPolicy/enabled"),
    ];
    for (set, want) in cases {
        let err = render("localmodel", NS, &["--set", set])
            .err()
            .unwrap_or_else(|| panic!("--set {set} was accepted"));
        println!(
            "--set {set}: {}",
            err.lines()
                .filter(|l| l.contains("at '"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        assert!(
            err.contains(want),
            "--set {set}: expected {want:?} in:\n{err}"
        );
    }
    let err = render(
        "localmodel",
        NS,
        &["--set", "agent.cache.type=persistentVolumeClaim"],
    )
    .expect_err("a claim type without a claim name");
    assert!(err.contains("claimName is required"), "{err}");
}

/// `BIN ARGS… --help` exits 0 only when every argument before `--help` parses.
fn assert_args_parse(bin: &str, args: &[String]) {
    let out = std::process::Command::new(workspace_binary(bin).unwrap())
        .args(args)
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    assert!(
        out.status.success(),
        "{bin} refuses the chart's arguments {args:?}: {}",
        output_text(&out)
    );
}

#[test]
fn the_binaries_accept_the_arguments_the_chart_renders() {
    for extra in [vec![], vec!["-f".to_string(), custom_values()]] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let objs = objects(&render_ok(&extra));
        let agent = &find(&objs, "DaemonSet", "localmodel-agent")["spec"]["template"]["spec"]["containers"]
            [0];
        assert_args_parse("node-agent", &strings(&agent["args"]));
        let op = &find(&objs, "Deployment", "localmodel-operator")["spec"]["template"]["spec"]["containers"]
            [0];
        assert_args_parse("operator", &strings(&op["args"]));
        let hook = &find(&objs, "Pod", "localmodel-test-chat")["spec"]["containers"][0];
        assert_args_parse("node-agent", &strings(&hook["args"]));
    }
}

#[test]
fn the_chart_ships_the_example_dashboards_unchanged() {
    let examples = workspace_root().join("examples/dashboards");
    let chart = chart_dir().join("dashboards");
    let names = |dir: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&examples), names(&chart));
    let objs = objects(&render_ok(&[]));
    for name in names(&examples) {
        let want = std::fs::read_to_string(examples.join(&name)).unwrap();
        let have = std::fs::read_to_string(chart.join(&name)).unwrap();
        assert!(
            want == have,
            "charts/localmodel/dashboards/{name} differs from examples/dashboards/{name}: copy it"
        );
        let d: Value = serde_json::from_str(&want).unwrap();
        for var in ["namespace", "model", "node"] {
            assert!(
                d["templating"]["list"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|v| v["name"] == var)),
                "{name} has the {var} variable"
            );
        }
        let base = name.trim_end_matches(".json");
        let cm = find(&objs, "ConfigMap", &format!("localmodel-dashboard-{base}"));
        assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
        let data: Value = serde_json::from_str(
            cm["data"][format!("localmodel-{base}.json")]
                .as_str()
                .expect("dashboard JSON in the ConfigMap"),
        )
        .expect("the ConfigMap holds valid JSON");
        assert_eq!(data, d, "the ConfigMap holds {name}");
    }
}

#[tokio::test]
async fn the_api_server_accepts_the_chart_dry_run_install_upgrade_and_uninstall() {
    let cp = shared();
    let ns = cp.create_namespace("chart").await.expect("namespace");
    let _ = cp.kubectl(["create", "namespace", "monitoring"]);
    // The Prometheus operator's own CRDs, so the monitors are checked against their schemas.
    let crds =
        e2e::prometheus::prometheus_operator_crds_dir().expect("the Prometheus operator's CRDs");
    for f in ["servicemonitors", "podmonitors", "prometheusrules"] {
        let path = crds.join(format!("monitoring.coreos.com_{f}.yaml"));
        let out = cp.kubectl(["apply", "--server-side", "-f", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            output_text(&out)
        );
    }
    let out = cp.kubectl([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/podmonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));

    let custom = custom_values();
    let renders: Vec<(&str, Vec<&str>)> = vec![
        ("default values", vec!["--include-crds"]),
        (
            "custom values",
            vec!["--include-crds", "-f", custom.as_str()],
        ),
    ];
    for (what, extra) in renders {
        let yaml = render("localmodel", &ns, &extra).unwrap_or_else(|e| panic!("{e}"));
        let kinds = objects(&yaml).len();
        let out = cp.kubectl_stdin(["apply", "--dry-run=server", "-f", "-"], &yaml);
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!("{what}: {kinds} objects\n{stdout}");
        assert!(out.status.success(), "{what}: {}", output_text(&out));
        assert_eq!(
            stdout
                .lines()
                .filter(|l| l.contains("(server dry run)"))
                .count(),
            kinds,
            "{what}: every object went through the API server"
        );
    }

    // `helm install --dry-run=server`: Helm's own install path against the API server, and the
    // NOTES it prints tell how to apply a first model and reach it.
    let chart = chart_dir();
    let out = cp.helm([
        "install",
        "localmodel",
        chart.to_str().unwrap(),
        "--namespace",
        ns.as_str(),
        "--dry-run=server",
    ]);
    assert!(
        out.status.success(),
        "helm install --dry-run=server: {}",
        output_text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let notes = stdout
        .split("NOTES:")
        .nth(1)
        .unwrap_or_else(|| panic!("no NOTES in:\n{stdout}"));
    println!("NOTES:{notes}");
    for want in [
        "kubectl get gpunodes",
        "kind: LocalModel",
        "kubectl wait --for=condition=Ready localmodel/smollm2",
        "http://smollm2.default.svc/v1",
        &format!("helm test localmodel -n {ns}"),
    ] {
        assert!(notes.contains(want), "NOTES lack {want:?}:\n{notes}");
    }
    // The first model of the NOTES is a manifest the API server accepts (with the chart's CRDs
    // installed for real).
    let crds = chart.join("crds");
    let out = cp.kubectl(["apply", "--server-side", "-f", crds.to_str().unwrap()]);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = cp.kubectl([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/localmodels.localmodel.dev",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let manifest: String = notes
        .lines()
        .skip_while(|l| !l.contains("apiVersion: localmodel.dev"))
        .take_while(|l| !l.trim().starts_with("YAML"))
        .map(|l| l.strip_prefix("     ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let out = cp.kubectl_stdin(["apply", "--dry-run=server", "-f", "-"], &manifest);
    assert!(
        out.status.success(),
        "the NOTES' model:\n{manifest}\n{}",
        output_text(&out)
    );

    // A real release: install with default values, upgrade to the custom ones, uninstall.
    // (No kubelet or controller-manager runs here, so pods never start; the API objects do.)
    let real = cp.create_namespace("release").await.expect("namespace");
    let release = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--namespace", real.as_str()]);
        let out = cp.helm(&all);
        assert!(
            out.status.success(),
            "helm {}: {}",
            all.join(" "),
            output_text(&out)
        );
    };
    let chart_path = chart.to_str().unwrap();
    release(&["install", "lm-real", chart_path]);
    let names = |kind: &str| {
        let out = cp.kubectl(["get", kind, "-n", real.as_str(), "-o", "name"]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        names("deployment"),
        "deployment.apps/lm-real-localmodel-operator"
    );
    assert_eq!(
        names("daemonset"),
        "daemonset.apps/lm-real-localmodel-agent"
    );
    release(&["upgrade", "lm-real", chart_path, "-f", custom.as_str()]);
    let replicas = cp.kubectl([
        "get",
        "deployment",
        "lm-real-localmodel-operator",
        "-n",
        real.as_str(),
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&replicas.stdout),
        "3",
        "{}",
        output_text(&replicas)
    );
    assert_eq!(
        names("servicemonitor").lines().count(),
        2,
        "the upgrade added the monitors"
    );
    release(&["uninstall", "lm-real", "--wait"]);
    for kind in [
        "deployment",
        "daemonset",
        "servicemonitor",
        "serviceaccount",
    ] {
        assert_eq!(names(kind), "", "{kind} left after uninstall");
    }
    let out = cp.kubectl(["get", "clusterrole", "lm-real-localmodel-operator"]);
    assert!(
        !out.status.success(),
        "the ClusterRole is gone: {}",
        output_text(&out)
    );

    // The monitors' schemas are enforced: a relabelling with a bad action is refused.
    let bad = render(
        "localmodel",
        &ns,
        &[
            "--show-only",
            "templates/monitoring.yaml",
            "--set",
            "metrics.podMonitor.enabled=true",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .replace(
        "targetLabel: node",
        "targetLabel: node\n          action: explode",
    );
    let out = cp.kubectl_stdin(["apply", "--dry-run=server", "-f", "-"], &bad);
    assert!(
        !out.status.success(),
        "a bad relabel action was accepted: {}",
        output_text(&out)
    );
}
