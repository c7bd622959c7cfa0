#!/usr/bin/env python3
"""Issue 19's measurements of `whittle serve`, loopback only, every run bounded. Prints one JSON report.

  encoder: offline `whittle bench` of MiniLM w8a8 (before and after), then the server under wrk (16 connections,
           DURATION s, one STS-B sentence per request) twice: on the offline bench's own 1000 sentences and on
           all 2758 test sentences: sentences/s and the ratio to the higher offline figure, non-2xx, RSS after
           warm-up and after the runs, /metrics parsed with prometheus_client and its counters against the
           request counts.
  decoder: SmolLM2 Q8_0: `whittle bench --url` with 1 and 8 concurrent streaming chats of 128 tokens
           (aggregate tokens/s and the ratio), 8 concurrent greedy chats compared with `whittle generate --chat`,
           a client killed mid-stream (in-flight back to 0), SIGTERM during a stream (it finishes, exit 0).

Usage: scripts/serve_loadtest.py [encoder|decoder|all]   (env: W=whittle binary, OUT=/tmp/serve, DURATION=60)
Needs wrk and a Python with `openai` and `prometheus_client` (scripts/test-deps.sh).
"""

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

W = os.environ.get("W", "target/release/whittle")
MODELS = os.environ.get("WHITTLE_MODELS", os.path.expanduser("~/.cache/whittle/models"))
OUT = os.environ.get("OUT", "/tmp/serve")
DURATION = int(os.environ.get("DURATION", "60"))
PORT = int(os.environ.get("PORT", "18080"))
URL = f"http://127.0.0.1:{PORT}"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
report = {}


def sh(*args, **kw):
    print("+", " ".join(map(str, args)), file=sys.stderr, flush=True)
    return subprocess.run(list(map(str, args)), check=True, capture_output=True, text=True, **kw).stdout


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def get(path, timeout=30):
    with urllib.request.urlopen(URL + path, timeout=timeout) as r:
        return r.status, r.read().decode()


def post(path, body, timeout=300):
    req = urllib.request.Request(URL + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def serve(model, *flags):
    p = subprocess.Popen([W, "serve", model, "--port", str(PORT), *flags], stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        try:
            if get("/health", timeout=5)[0] == 200:
                return p
        except Exception:
            pass
        if p.poll() is not None:
            raise SystemExit(f"whittle serve exited: {p.stderr.read()}")
        time.sleep(0.2)
    raise SystemExit("whittle serve did not become healthy")


def stop(p):
    p.send_signal(signal.SIGTERM)
    return p.wait(timeout=60)


def metrics():
    return {f.name: f for f in text_string_to_metric_families(get("/metrics")[1])}


def counter(fams, family, **labels):
    f = fams[family]
    return sum(s.value for s in f.samples if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()))


# The offline bench's corpus: the first N_SENT sentences of the STS-B test split (sentence1, sentence2, …).
N_SENT = 1000


def wrk_field(text, key):
    for line in text.splitlines():
        if key in line:
            return line
    return ""


def wrk_requests(text):
    line = wrk_field(text, "requests in")
    return int(line.split()[0]) if line else 0


def encoder():
    model = f"{OUT}/minilm-w8a8"
    if not os.path.isdir(model):
        sh(W, "quantize", f"{MODELS}/all-MiniLM-L6-v2", "--scheme", "w8a8-dynamic", "-o", model)
    # Offline before and after the served runs (this machine's speed drifts by ±15% over minutes); the ratio is
    # taken against the higher of the two.
    offline = [json.loads(sh(W, "bench", model, "--json"))]
    everything = []
    for line in open(f"{ROOT}/data/stsbenchmark/sts-test.tsv").read().splitlines()[1:]:
        c = line.split("\t")
        if len(c) >= 7:
            everything += [c[5], c[6]]
    # `same`: the offline bench's own sentences (like for like); `all`: every test sentence (26% more tokens
    # each on average: 14.2 against 11.2).
    corpora = {"same": everything[:N_SENT], "all": everything}
    files = {}
    for name, lines in corpora.items():
        files[name] = f"{OUT}/sts-test-{name}.txt"
        with open(files[name], "w") as f:
            f.write("\n".join(lines) + "\n")
    p = serve(model)
    lua = f"{ROOT}/scripts/wrk_embeddings.lua"
    warm = sh("wrk", "-t2", "-c16", "-d10s", "-s", lua, URL, "--", files["same"])
    rss_warm = rss_mb(p.pid)
    runs = {}
    for name in corpora:
        runs[name] = sh("wrk", "-t2", "-c16", f"-d{DURATION}s", "--latency", "-s", lua, URL, "--", files[name])
    rss_after = rss_mb(p.pid)
    time.sleep(1)
    fams = metrics()
    served_200 = counter(fams, "whittle_requests", route="/v1/embeddings", status="200")
    served_all = counter(fams, "whittle_requests", route="/v1/embeddings")
    # A closed-loop run of our own client: it waits for every request it sent, so counts must match exactly.
    before = served_all
    live = json.loads(sh(W, "bench", "--url", URL, "--concurrency", 16, "--duration", "10s", "--json"))
    time.sleep(0.5)
    after = counter(metrics(), "whittle_requests", route="/v1/embeddings")
    code = stop(p)
    offline.append(json.loads(sh(W, "bench", model, "--json")))
    ref = max(o["sent_per_s"] for o in offline)
    served = {}
    for name, run in runs.items():
        rps = float(wrk_field(run, "Requests/sec").split()[1])
        served[name] = {
            "sentences": len(corpora[name]),
            "wrk_sent_per_s": rps,
            "ratio": rps / ref,
            "non_2xx": wrk_field(run, "Non-2xx").strip() or "0",
            "socket_errors": wrk_field(run, "Socket errors").strip() or "0",
            "wrk_latency": [l.strip() for l in run.splitlines() if l.strip().startswith(("50%", "90%", "99%"))],
        }
    report["encoder"] = {
        "model": model,
        "offline_sent_per_s_before_after": [o["sent_per_s"] for o in offline],
        "offline_reps_before_after": [o.get("sent_per_s_reps") for o in offline],
        "served": served,
        "wrk_requests_warmup_plus_runs": wrk_requests(warm) + sum(wrk_requests(r) for r in runs.values()),
        "metrics_requests_200": served_200,
        "metrics_requests_all": served_all,
        "rss_mb_after_warmup": rss_warm,
        "rss_mb_after_run": rss_after,
        "rss_growth": rss_after / rss_warm - 1,
        "bench_url": live,
        "bench_url_requests_vs_metrics": [live["requests"], after - before],
        "exit_code_after_sigterm": code,
    }


def stream_chat(prompt, max_tokens, ignore_eos=False):
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": ignore_eos}
    req = urllib.request.Request(URL + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    text = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                c = json.loads(line[6:])
                for ch in c.get("choices", []):
                    text.append(ch["delta"].get("content") or "")
    return "".join(text)


def decoder():
    model = f"{OUT}/smol-q8.gguf"
    if not os.path.exists(model):
        sh(W, "quantize", f"{MODELS}/SmolLM2-135M-Instruct.Q4_1.gguf", "--scheme", "q8_0", "-o", model,
           "--allow-requantize")
    offline = json.loads(sh(W, "bench", model, "--json", "--reps", "2"))
    p = serve(model)
    one = json.loads(sh(W, "bench", "--url", URL, "--endpoint", "chat", "--concurrency", 1, "--duration", "20s",
                        "--max-tokens", 128, "--json"))
    eight = json.loads(sh(W, "bench", "--url", URL, "--endpoint", "chat", "--concurrency", 8, "--duration",
                          f"{max(DURATION // 2, 30)}s", "--max-tokens", 128, "--json"))
    prompts = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
               "Explain gravity to a child.", "What is 12 times 7?", "Give me a tip for learning Rust.",
               "Describe a cat in one sentence.", "Why is the sky blue?"]
    with cf.ThreadPoolExecutor(8) as ex:
        served = list(ex.map(lambda q: stream_chat(q, 128), prompts))
    same = []
    for q, got in zip(prompts, served):
        want = json.loads(sh(W, "generate", model, "--chat", "--prompt", q, "-n", 128, "--json"))["text"]
        same.append(got == want)
        if got != want:
            print(f"DIFFERENT for {q!r}:\nserver:   {got!r}\ngenerate: {want!r}", file=sys.stderr)
    # A client killed mid-stream: its sequence is freed.
    killer = subprocess.Popen([sys.executable, "-c", f"""
import json, urllib.request
req = urllib.request.Request("{URL}/v1/completions", json.dumps({{"prompt": "Once upon a time", "max_tokens": 1000,
    "ignore_eos": True, "stream": True}}).encode(), {{"Content-Type": "application/json"}})
r = urllib.request.urlopen(req)
for i, line in enumerate(r):
    if i > 10:
        print("reading", flush=True)
"""], stdout=subprocess.PIPE, text=True)
    killer.stdout.readline()
    running_before = [s.value for s in metrics()["whittle_running_sequences"].samples][0]
    killer.kill()
    killer.wait()
    time.sleep(1.0)
    fams = metrics()
    freed = {
        "running_before_kill": running_before,
        "running_after_kill": [s.value for s in fams["whittle_running_sequences"].samples][0],
        "in_flight_after_kill": [s.value for s in fams["whittle_requests_in_flight"].samples][0] - 1,  # minus this scrape
        "cancelled_client_gone": counter(fams, "whittle_cancelled", reason="client_gone"),
    }
    # SIGTERM while a stream runs: the stream completes, then the server exits 0.
    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(stream_chat, "Tell me a story.", 64, True)
        time.sleep(1.0)
        p.send_signal(signal.SIGTERM)
        drained = fut.result()
        code = p.wait(timeout=60)
    report["decoder"] = {
        "model": model,
        "offline_tg_tok_per_s": offline.get("tg_tok_s") or offline,
        "one_stream_tok_per_s": one["items_per_s"],
        "eight_streams_tok_per_s": eight["items_per_s"],
        "ratio": eight["items_per_s"] / one["items_per_s"],
        "one_stream": one,
        "eight_streams": eight,
        "greedy_identical_to_generate": same,
        "killed_client": freed,
        "sigterm": {"stream_completed_chars": len(drained), "exit_code": code},
    }


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    os.makedirs(OUT, exist_ok=True)
    if what in ("encoder", "all"):
        encoder()
    if what in ("decoder", "all"):
        decoder()
    print(json.dumps(report, indent=2))
