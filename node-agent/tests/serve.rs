//! The agent over real HTTP with the real SmolLM2 model (downloaded once through the package
//! index into a cache that outlives test runs).

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Agent, SMOLLM2, metric};
use futures::StreamExt;
use serde_json::{Value, json};

const MODEL: &str = "smollm2";

fn agent() -> &'static Agent {
    static AGENT: OnceLock<Agent> = OnceLock::new();
    // Started on a plain thread: the readiness wait blocks, and tests run inside tokio.
    AGENT.get_or_init(|| {
        std::thread::spawn(start_shared_agent)
            .join()
            .expect("agent starts")
    })
}

fn start_shared_agent() -> Agent {
    {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        let m = common::manifest(
            &dir,
            "smollm2.yaml",
            &format!(
                "apiVersion: localmodel.dev/v1alpha1\nkind: LocalModel\nmetadata:\n  name: {MODEL}\nspec:\n  source: {SMOLLM2}\n  engine:\n    contextLength: 512\n    maxConcurrentSequences: 4\n"
            ),
        );
        Agent::start(
            &m,
            &common::shared_cache_dir(),
            &[],
            Duration::from_secs(900),
        )
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("client")
}

async fn post(path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(agent().url(path))
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, v)
}

async fn post_raw(path: &str, body: &'static str) -> (u16, Value) {
    let r = client()
        .post(agent().url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, v)
}

async fn get(path: &str) -> (u16, String) {
    let r = client()
        .get(agent().url(path))
        .send()
        .await
        .expect("request");
    (r.status().as_u16(), r.text().await.expect("body"))
}

#[tokio::test]
async fn chat_completion_answers_with_usage() {
    let (status, v) = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
               "max_tokens": 24, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(!content.trim().is_empty(), "empty answer: {v}");
    // Greedy decoding is deterministic: the same request gives the same answer.
    let (_, again) = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
               "max_tokens": 24, "temperature": 0}),
    )
    .await;
    assert_eq!(
        again["choices"][0]["message"]["content"], content,
        "{again}"
    );
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    let usage = &v["usage"];
    assert!(usage["prompt_tokens"].as_u64().expect("prompt") > 5, "{v}");
    let completion = usage["completion_tokens"].as_u64().expect("completion");
    assert!((1..=24).contains(&completion), "{v}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap_or(0) + completion)
    );
    let reason = v["choices"][0]["finish_reason"].as_str().expect("finish");
    assert!(reason == "stop" || reason == "length", "{v}");
}

#[tokio::test]
async fn max_tokens_limits_and_reports_length() {
    let (status, v) = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Count from 1 to 100, separated by commas."}],
               "max_completion_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
}

#[tokio::test]
async fn sse_stream_is_framed_and_ends_with_usage_and_done() {
    let r = client()
        .post(agent().url("/v1/chat/completions"))
        .json(
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}],
                      "max_tokens": 12, "stream": true, "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .starts_with("text/event-stream")
    );
    let body = r.text().await.expect("body");
    let events: Vec<&str> = body
        .split("\n\n")
        .map(str::trim)
        .filter(|e| !e.is_empty() && !e.starts_with(':'))
        .collect();
    assert!(events.iter().all(|e| e.starts_with("data: ")), "{body}");
    assert_eq!(*events.last().expect("events"), "data: [DONE]", "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e["data: ".len()..]).expect("chunk JSON"))
        .collect();
    assert!(chunks.len() >= 3, "role chunk, content, finish: {body}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk = chunks.last().expect("usage chunk");
    assert_eq!(usage_chunk["choices"], json!([]), "{usage_chunk}");
    assert!(
        usage_chunk["usage"]["completion_tokens"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    );
    for c in &chunks[..chunks.len() - 1] {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(
            c["usage"].is_null(),
            "only the last chunk carries usage: {c}"
        );
    }
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1, "{body}");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.trim().is_empty(), "{body}");
}

#[tokio::test]
async fn text_completion_works() {
    let (status, v) = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "The sky is", "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(
        !v["choices"][0]["text"].as_str().unwrap_or("").is_empty(),
        "{v}"
    );
    assert!(
        v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) >= 3,
        "{v}"
    );
}

#[tokio::test]
async fn json_schema_response_format_yields_matching_json() {
    let schema =
        json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
    let (status, v) = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Name a city in JSON."}],
               "max_tokens": 40, "temperature": 0,
               "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    let parsed: Value = serde_json::from_str(content)
        .unwrap_or_else(|e| panic!("constrained output is not JSON ({e}): {content:?}"));
    assert!(parsed["city"].is_string(), "{parsed}");
}

#[tokio::test]
async fn models_are_listed() {
    let (status, body) = get("/v1/models").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["max_model_len"], 512);
}

#[tokio::test]
async fn ollama_chat_streams_ndjson_with_timings() {
    let r = client()
        .post(agent().url("/api/chat"))
        .json(
            &json!({"model": "smollm2:latest", "messages": [{"role": "user", "content": "Say hi."}],
                      "options": {"num_predict": 8}}),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let body = r.text().await.expect("body");
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("bad NDJSON line {l:?}")))
        .collect();
    assert!(lines.len() >= 2, "{body}");
    for l in &lines[..lines.len() - 1] {
        assert_eq!(l["done"], false);
        assert_eq!(l["message"]["role"], "assistant");
        assert_eq!(l["model"], MODEL);
    }
    let last = lines.last().expect("last");
    assert_eq!(last["done"], true, "{last}");
    assert!(
        matches!(last["done_reason"].as_str(), Some("stop" | "length")),
        "{last}"
    );
    assert!(last["eval_count"].as_u64().unwrap_or(0) >= 1, "{last}");
    assert!(
        last["prompt_eval_count"].as_u64().unwrap_or(0) >= 1,
        "{last}"
    );
    let total = last["total_duration"].as_u64().unwrap_or(0);
    assert!(
        total > 0 && total >= last["eval_duration"].as_u64().unwrap_or(u64::MAX),
        "{last}"
    );
}

#[tokio::test]
async fn ollama_generate_and_metadata_endpoints() {
    let (status, v) = post(
        "/api/generate",
        json!({"model": MODEL, "prompt": "Why is the sky blue?", "stream": false, "options": {"num_predict": 6}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["done"], true);
    assert!(!v["response"].as_str().unwrap_or("").is_empty(), "{v}");

    let (s, tags) = get("/api/tags").await;
    assert_eq!(s, 200);
    let tags: Value = serde_json::from_str(&tags).expect("json");
    assert_eq!(tags["models"][0]["name"], "smollm2:latest");
    assert_eq!(tags["models"][0]["details"]["quantization_level"], "Q4_1");
    assert_eq!(tags["models"][0]["details"]["family"], "llama");
    assert_eq!(tags["models"][0]["digest"].as_str().map(str::len), Some(64));

    let (s, ps) = get("/api/ps").await;
    assert_eq!(s, 200);
    assert!(ps.contains("smollm2:latest"), "{ps}");

    let (s, show) = post("/api/show", json!({"model": "smollm2"})).await;
    assert_eq!(s, 200, "{show}");
    assert_eq!(show["model_info"]["general.architecture"], "llama");
    assert_eq!(show["model_info"]["llama.context_length"], 512);

    let (s, missing) = post("/api/show", json!({"model": "nope"})).await;
    assert_eq!(s, 404);
    assert!(
        missing["error"].as_str().unwrap_or("").contains("nope"),
        "{missing}"
    );

    let (s, ver) = get("/api/version").await;
    assert_eq!(s, 200);
    assert!(ver.contains("version"), "{ver}");
}

fn assert_openai_error(status: u16, v: &Value, want_status: u16, param: Option<&str>) {
    assert_eq!(status, want_status, "{v}");
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
    }
}

#[tokio::test]
async fn errors_have_the_right_status_and_shape() {
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let (s, v) = post(
        "/v1/chat/completions",
        json!({"model": "gpt-9", "messages": msgs}),
    )
    .await;
    assert_openai_error(s, &v, 404, Some("model"));
    assert_eq!(v["error"]["code"], "model_not_found");

    let (s, v) = post_raw(
        "/v1/chat/completions",
        "{\"model\": \"smollm2\", \"messages\": [",
    )
    .await;
    assert_openai_error(s, &v, 400, None);

    let (s, v) = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": msgs, "temperature": 7}),
    )
    .await;
    assert_openai_error(s, &v, 400, Some("temperature"));

    let (s, v) = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": msgs, "max_tokens": "ten"}),
    )
    .await;
    assert_openai_error(s, &v, 400, Some("max_tokens"));

    let (s, v) = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": []}),
    )
    .await;
    assert_openai_error(s, &v, 400, Some("messages"));

    // Prompt plus max_tokens beyond the 512-token context: refused, never truncated.
    let (s, v) = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": msgs, "max_tokens": 600}),
    )
    .await;
    assert_openai_error(s, &v, 400, None);
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    let long = "word ".repeat(700);
    let (s, v) = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_openai_error(s, &v, 400, None);
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");

    let (s, v) = get("/v1/nothing-here").await;
    assert_eq!(s, 404, "{v}");
    let r = client()
        .get(agent().url("/v1/chat/completions"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn hostile_bodies_never_break_the_server() {
    let bodies: [&'static str; 10] = [
        "null",
        "[]",
        "\"x\"",
        "{\"model\": 5}",
        "{\"model\": \"smollm2\", \"messages\": {\"role\": \"user\"}}",
        "{\"model\": \"smollm2\", \"messages\": [{\"role\": \"user\", \"content\": null}]}",
        "{\"model\": \"smollm2\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"max_tokens\": 1e308}",
        "{\"model\": \"smollm2\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stop\": [1,2]}",
        "{\"model\": \"smollm2\", \"messages\": [{\"role\": \"user\", \"content\": \"\\ud800\"}]}",
        "{\"model\": \"smollm2\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{\"type\": \"function\"}]}",
    ];
    let ollama_bodies: [&'static str; 7] = [
        "null",
        "[]",
        "\"x\"",
        "{\"model\": 5}",
        "{\"model\": \"smollm2\", \"messages\": {\"role\": \"user\"}, \"prompt\": 5}",
        "{\"model\": \"smollm2\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"prompt\": \"x\", \"options\": {\"temperature\": \"hot\"}}",
        "{\"model\": \"smollm2\", \"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}], \"prompt\": \"x\", \"options\": {\"num_predict\": -7}}",
    ];
    let cases = bodies
        .iter()
        .flat_map(|b| ["/v1/chat/completions", "/v1/completions"].map(|p| (p, *b)))
        .chain(
            ollama_bodies
                .iter()
                .flat_map(|b| ["/api/chat", "/api/generate"].map(|p| (p, *b))),
        );
    for (path, body) in cases {
        let r = client()
            .post(agent().url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        assert!(
            (400..500).contains(&status),
            "{path} {body} -> {status} {text}"
        );
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{path} {body}: not JSON: {text}"));
        assert!(v.get("error").is_some(), "{path} {body}: {v}");
    }
    let (s, _) = get("/livez").await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn metrics_move_after_requests() {
    let before = get("/metrics").await.1;
    let (s, v) = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "One word: yes or no?"}], "max_tokens": 3}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let prompt = v["usage"]["prompt_tokens"].as_f64().unwrap_or(0.0);
    let gen_tokens = v["usage"]["completion_tokens"].as_f64().unwrap_or(0.0);
    let after = get("/metrics").await.1;
    let m = [("model_name", MODEL)];
    let d = |name: &str| metric(&after, name, &m) - metric(&before, name, &m);
    // Other tests run at the same time: this request's share is a lower bound.
    assert!(d("vllm:prompt_tokens_total") >= prompt, "{after}");
    assert!(d("vllm:generation_tokens_total") >= gen_tokens, "{after}");
    assert!(d("vllm:request_success_total") >= 1.0, "{after}");
    assert!(
        d("vllm:e2e_request_latency_seconds_count") >= 1.0,
        "{after}"
    );
    assert!(
        d("vllm:time_to_first_token_seconds_count") >= 1.0,
        "{after}"
    );
    assert!(d("vllm:request_queue_time_seconds_count") >= 1.0, "{after}");
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:inter_token_latency_seconds_count",
        "localmodel_cache_used_bytes",
        "localmodel_cache_capacity_bytes",
        "localmodel_models_loaded",
        "localmodel_model_load_seconds_count",
    ] {
        assert!(after.contains(name), "{name} missing:\n{after}");
    }
    assert_eq!(metric(&after, "localmodel_models_loaded", &[]), 1.0);
    assert!(
        metric(&after, "localmodel_cache_used_bytes", &[]) > 90e6,
        "{after}"
    );
}

/// A second agent with room for one running request and none waiting: the next request is
/// refused with 429 and Retry-After; a client that disconnects frees its place.
#[tokio::test]
async fn full_queue_is_429_and_disconnect_frees_the_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = common::manifest(
        dir.path(),
        "tight.yaml",
        &format!(
            "apiVersion: localmodel.dev/v1alpha1\nkind: LocalModel\nmetadata:\n  name: tight\nspec:\n  source: {SMOLLM2}\n  engine:\n    contextLength: 1024\n    maxConcurrentSequences: 1\n---\napiVersion: localmodel.dev/v1alpha1\nkind: LocalModel\nmetadata:\n  name: second\nspec:\n  source: {SMOLLM2}\n  servedName: second\n"
        ),
    );
    let cache = common::shared_cache_dir();
    let tight = std::thread::spawn(move || {
        Agent::start(&m, &cache, &["--max-queue", "0"], Duration::from_secs(600))
    })
    .join()
    .expect("agent starts");
    let c = client();
    // Two models in one process, each with its own line.
    let models: Value = c
        .get(tight.url("/v1/models"))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["second", "tight"]);
    let long = json!({"model": "tight", "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                      "max_tokens": 900, "stream": true, "temperature": 0.9});
    let first = c
        .post(tight.url("/v1/chat/completions"))
        .json(&long)
        .send()
        .await
        .expect("first");
    assert_eq!(first.status(), 200);
    let mut stream = first.bytes_stream();
    // Wait for the first bytes: the generation is running.
    let _ = stream.next().await.expect("first chunk").expect("bytes");
    let second = c
        .post(tight.url("/v1/chat/completions"))
        .json(&json!({"model": "tight", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        .send()
        .await
        .expect("second");
    assert_eq!(second.status(), 429);
    let retry = second
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    assert!(
        retry
            .as_deref()
            .and_then(|r| r.parse::<u64>().ok())
            .is_some(),
        "Retry-After: {retry:?}"
    );
    let body: Value = second.json().await.expect("json");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");

    // Disconnect the first client: its slot frees and the abort is counted.
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = String::new();
    loop {
        let text = c
            .get(tight.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let running = metric(
            &text,
            "vllm:num_requests_running",
            &[("model_name", "tight")],
        );
        let aborted = metric(
            &text,
            "vllm:request_success_total",
            &[("model_name", "tight"), ("finished_reason", "abort")],
        );
        if running == 0.0 && aborted >= 1.0 {
            break;
        }
        seen = format!("running={running} aborted={aborted}");
        assert!(
            Instant::now() < deadline,
            "slot not freed after disconnect: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = seen;
    let third = c
        .post(tight.url("/v1/chat/completions"))
        .json(&json!({"model": "tight", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        .send()
        .await
        .expect("third");
    assert_eq!(third.status(), 200, "the freed slot takes a new request");
    drop(third);

    // SIGTERM while a generation streams: it finishes, then the agent exits cleanly.
    let mut tight = tight;
    let last = c
        .post(tight.url("/v1/chat/completions"))
        .json(&json!({"model": "second", "messages": [{"role": "user", "content": "Tell me about the sea."}],
                      "max_tokens": 40, "stream": true}))
        .send()
        .await
        .expect("last");
    assert_eq!(last.status(), 200);
    let mut stream = last.bytes_stream();
    let mut body =
        String::from_utf8_lossy(&stream.next().await.expect("chunk").expect("bytes")).to_string();
    tight.terminate();
    while let Some(chunk) = stream.next().await {
        body.push_str(&String::from_utf8_lossy(
            &chunk.expect("stream survives shutdown"),
        ));
    }
    assert!(
        body.trim_end().ends_with("data: [DONE]"),
        "in-flight stream was cut: {body}"
    );
    let code = tokio::task::spawn_blocking(move || tight.wait_exit(Duration::from_secs(60)))
        .await
        .expect("join");
    assert_eq!(code, Some(0));
}

/// The `openai` and `ollama` Python packages, unchanged, against the agent. They are installed
/// into a virtualenv kept beside the build (from the package index).
#[test]
fn real_python_clients_work() {
    let venv = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("clients-venv");
    let python = venv.join("bin/python");
    let ready = std::process::Command::new(&python)
        .args(["-c", "import openai, ollama"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ready {
        let ok = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 runs")
            .success();
        assert!(ok, "python3 -m venv failed");
        let out = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "openai==2.54.0", "ollama==0.6.3"])
            .output()
            .expect("pip runs");
        assert!(
            out.status.success(),
            "pip install failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = std::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/check_clients.py"
        ))
        .arg(&agent().base)
        .arg(MODEL)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "client check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
