"""Load benchmark of `adapterkit serve`: mixed vs single adapter, vs PEFT, cross-talk, hot load.

    python bench/serve_load.py            # 1-2 minutes on 2 CPU cores (no new round after 150 s)
    python bench/serve_load.py --quick    # smoke run

1. 64 random LoRA adapters (r=4 on query/value, each with its own 2-label head) on the bundled
   all-MiniLM-L6-v2 go into a fresh store; the server starts on 127.0.0.1 in a subprocess.
2. 64 closed-loop httpx clients (threads, one keep-alive connection each) send single-text POST /v1/classify requests, in rounds
   that run "single" (every request on one adapter), "mixed" (a uniform random adapter per request)
   and the PEFT baseline in a shuffled order, so drift of the machine hits all alike; ratios are
   medians over rounds of the per-round ratios. Throughput and p50/p99 latency per phase, and CPU
   time per request of the server, the clients and the baseline.
3. Baseline: the same model in Hugging Face PEFT with the same 64 adapters, one request at a time,
   `set_adapter` before each (in this process, while the server idles). No HTTP on this side.
4. Every response is checked against the same text run alone through a plain AdaptedModel with that
   adapter activated (label equal, scores within 1e-4): cross-talk would show up as mismatches.
5. Hot load: median time to load one adapter from disk into an idle in-process Engine until it
   serves, and the memory of a resident adapter (accounted bytes; RSS growth per adapter).

Writes bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import httpx  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.serve import AdapterStore, Engine  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/serving.py: helpers, not installed
from tests.serving import load_minilm, make_adapter, minilm_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "serve_load.json"
WORDS = ("the a cat dog sat ran on in mat park we like green tea it rained all day long here hello world "
         "movie was great terrible service slow fast friendly food cold warm").split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, port: int, threads: int, max_batch: int, max_wait_ms: float,
                 extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "adapterkit.serve", "--base", minilm_path(), "--store", str(store),
           "--port", str(port), "--threads", str(threads), "--max-batch", str(max_batch),
           "--max-wait-ms", str(max_wait_ms), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start in 120 s")


def make_transports(concurrency: int) -> list[httpx.HTTPTransport]:
    """One httpx transport (one keep-alive connection) per client thread, made once for the whole
    bench: making one builds an SSL context, about 20 ms of CPU, even for plain http."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return [httpx.HTTPTransport(limits=limits) for _ in range(concurrency)]


def run_phase(url: str, plan: list[tuple[str, str]], transports: list[httpx.HTTPTransport]
              ) -> tuple[float, list[float], list]:
    """Send every (adapter, text) of `plan` from closed-loop httpx clients, one thread per transport.

    The clients share the 2 cores with the server, so each keeps its CPU per request low: requests go
    straight to its transport (httpx.Client's shared pool, cookie and redirect layers cost about
    twice the CPU per request) with the body encoded once."""
    latencies: list[float] = []
    answers: list = [None] * len(plan)
    cursor = iter(range(len(plan)))
    lock = threading.Lock()
    endpoint = f"{url}/v1/classify"
    headers = {"Content-Type": "application/json"}
    timeout = {"timeout": {"connect": 60.0, "read": 60.0, "write": 60.0, "pool": 60.0}}

    def worker(transport: httpx.HTTPTransport) -> None:
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            adapter, text = plan[i]
            body = json.dumps({"adapter": adapter, "inputs": [text]}).encode()
            start = time.perf_counter()
            response = transport.handle_request(
                httpx.Request("POST", endpoint, content=body, headers=headers, extensions=timeout))
            try:
                content = response.read()
            finally:
                response.close()
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {content[:200]!r}")
            answers[i] = json.loads(content)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(transports)) as pool:
        for future in [pool.submit(worker, t) for t in transports]:
            future.result()
    wall = time.perf_counter() - start
    return len(plan) / wall, latencies, answers


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def build_peft(folders: dict[str, Path]):
    """The same model in Hugging Face PEFT with the same adapters (exported to PEFT's layout)."""
    import peft

    from adapterkit.io.peft import export_peft_lora

    exporter = ak.adapt(load_minilm())
    peft_dirs = {}
    tmp = Path(tempfile.mkdtemp(prefix="peft-"))
    for name, folder in folders.items():
        exporter.load(folder, name=name)
        peft_dirs[name] = export_peft_lora(exporter, name, tmp / name)
        exporter.delete(name, collect=False)
    names = list(folders)
    model = peft.PeftModel.from_pretrained(load_minilm(), str(peft_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(peft_dirs[name]), adapter_name=name)
    return model.eval()


def run_peft(model, plan: list[tuple[str, str]], tokenizer) -> tuple[float, dict]:
    """One request at a time: set_adapter, tokenize, forward, softmax."""
    outputs = {}
    with torch.inference_mode():
        for adapter, text in plan[:3]:  # warm-up
            model.set_adapter(adapter)
            model(**tokenizer([text], return_tensors="pt"))
        start = time.perf_counter()
        for adapter, text in plan:
            model.set_adapter(adapter)
            logits = model(**tokenizer([text], return_tensors="pt")).logits
            outputs[(adapter, text)] = torch.softmax(logits[0], -1).tolist()
        wall = time.perf_counter() - start
    return len(plan) / wall, outputs


def check_answers(reference: ak.AdaptedModel, tokenizer, answers: list, plan: list[tuple[str, str]],
                  atol: float = 1e-4) -> tuple[int, int, dict]:
    cache: dict[tuple[str, str], list[float]] = {}
    mismatches = 0
    with torch.inference_mode():
        for (adapter, text), answer in zip(plan, answers, strict=True):
            if (adapter, text) not in cache:
                reference.activate(adapter)
                logits = reference(**tokenizer([text], return_tensors="pt")).logits[0]
                cache[(adapter, text)] = torch.softmax(logits, -1).tolist()
            expected = cache[(adapter, text)]
            got = answer["results"][0]
            labels = reference.adapter(adapter).meta["labels"]
            scores = [got["scores"][label] for label in labels]
            best = labels[max(range(len(expected)), key=expected.__getitem__)]
            if answer["adapter"] != adapter or got["label"] != best or max(
                abs(a - b) for a, b in zip(scores, expected, strict=True)
            ) > atol:
                mismatches += 1
    return mismatches, len(cache), cache


def hot_load(store: Path, names: list[str], threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    process = psutil.Process()
    engine = Engine(minilm_path(), store, adopt=False)
    try:
        times = []
        for i in range(repeats):
            name = names[i % len(names)]
            start = time.perf_counter()
            engine.preload("default", name).result()
            times.append((time.perf_counter() - start) * 1000)
            engine.unload("default", name)
            engine.classify(["flush"])  # the eviction happens between batches
        rss_before = process.memory_info().rss
        for name in names:
            engine.preload("default", name).result()
        engine.classify(["resident"], adapter=names[0])  # builds the routing stacks of all resident adapters
        rss_after = process.memory_info().rss
        stats = engine.stats()
        return {
            "hot_load_ms": statistics.median(times), "hot_load_ms_all": [round(t, 2) for t in times],
            "bytes_per_resident_adapter": stats["bytes"] // max(1, stats["loaded"]),
            "rss_bytes_per_resident_adapter": (rss_after - rss_before) // len(names),
        }
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--requests", type=int, default=1920, help="requests per phase (split over the rounds)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop clients (threads)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and baseline alike")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--peft-requests", type=int, default=320)
    parser.add_argument("--time-limit", type=float, default=150.0,
                        help="seconds; no new round starts after this (one round always runs)")
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.requests, args.rounds, args.peft_requests, args.concurrency = 16, 96, 1, 48, 16
    torch.set_num_threads(args.threads)
    began = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    builder = ak.adapt(load_minilm())
    names = [f"tenant-adapter-{i:03d}" for i in range(args.adapters)]
    folders = {n: make_adapter(builder, n, tmp / "src" / n, seed=i, scale=0.2) for i, n in enumerate(names)}
    store_dir = tmp / "store"
    store = AdapterStore(store_dir, fingerprint=builder.fingerprint())
    for n, folder in folders.items():
        store.add("default", n, folder)
    print(f"[{time.monotonic() - began:5.1f}s] {len(names)} adapters in {store_dir}", flush=True)

    peft_model = build_peft(folders)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(store_dir, port, args.threads, args.max_batch, args.max_wait_ms)
    transports = make_transports(args.concurrency)
    try:
        pool = texts(16)
        rng = random.Random(1)
        for n in names:  # hot-load every adapter once, so both phases run on resident adapters
            httpx.post(f"{url}/v1/classify", json={"adapter": n, "inputs": [pool[0]]}, timeout=60).raise_for_status()
        run_phase(url, [(names[0], pool[0])] * 64, transports)  # warm-up
        print(f"[{time.monotonic() - began:5.1f}s] server up on {url}, all adapters resident", flush=True)
        per_round = max(1, args.requests // args.rounds)
        phases: dict[str, dict] = {p: {"rps": [], "lat": [], "plan": [], "answers": []} for p in ("single", "mixed")}
        peft_rps: list[float] = []
        peft_out: dict = {}
        server_proc, me = psutil.Process(server.pid), psutil.Process()
        cpu: dict[str, list[float]] = {"server": [], "client": [], "peft": []}
        metrics_before = httpx.get(f"{url}/metrics", timeout=10).text
        for round_ in range(args.rounds):  # the three cases interleaved, in a shuffled order per round
            if round_ and time.monotonic() - began > args.time_limit:
                print(f"time limit: stopping after {round_} rounds", flush=True)
                break
            for phase in rng.sample(["single", "mixed", "peft"], 3):
                if phase == "peft":
                    plan = [(rng.choice(names), rng.choice(pool)) for _ in range(args.peft_requests // args.rounds)]
                    before = _cpu(me)
                    rps, out = run_peft(peft_model, plan, tokenizer)
                    cpu["peft"].append((_cpu(me) - before) / len(plan))
                    peft_rps.append(rps)
                    peft_out.update(out)
                else:
                    plan = [(names[0] if phase == "single" else rng.choice(names), rng.choice(pool))
                            for _ in range(per_round)]
                    before = _cpu(server_proc), _cpu(me)
                    rps, lat, answers = run_phase(url, plan, transports)
                    cpu["server"].append((_cpu(server_proc) - before[0]) / len(plan))
                    cpu["client"].append((_cpu(me) - before[1]) / len(plan))
                    p = phases[phase]
                    p["rps"].append(rps)
                    p["lat"] += lat
                    p["plan"] += plan
                    p["answers"] += answers
                print(f"[{time.monotonic() - began:5.1f}s] {phase}: {rps:.1f} req/s", flush=True)
        metrics_text = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        for transport in transports:
            transport.close()
        server.terminate()
        server.wait(30)
    del peft_model

    mixed_rounds, single_rounds = phases["mixed"]["rps"], phases["single"]["rps"]
    mixed_rps, single_rps, peft_median = (statistics.median(x) for x in (mixed_rounds, single_rounds, peft_rps))
    mixed_vs_single = statistics.median(m / s for m, s in zip(mixed_rounds, single_rounds, strict=True))
    vs_peft = statistics.median(m / p for m, p in zip(mixed_rounds, peft_rps, strict=True))

    for n, folder in folders.items():
        builder.load(folder, name=n)
    builder.eval()
    plan = phases["single"]["plan"] + phases["mixed"]["plan"]
    answers = phases["single"]["answers"] + phases["mixed"]["answers"]
    mismatches, checked, reference = check_answers(builder, tokenizer, answers, plan)
    peft_agrees = all(max(abs(a - b) for a, b in zip(v, reference[k], strict=True)) < 1e-4
                      for k, v in peft_out.items() if k in reference)
    print(f"[{time.monotonic() - began:5.1f}s] checked {len(answers)} answers ({checked} distinct): "
          f"{mismatches} mismatches", flush=True)
    loading = hot_load(store_dir, names, args.threads, repeats=min(20, len(names)))
    batch_sum = _metric(metrics_text, "adapterkit_batch_size_sum") - _metric(metrics_before, "adapterkit_batch_size_sum")
    batch_count = (_metric(metrics_text, "adapterkit_batch_size_count")
                   - _metric(metrics_before, "adapterkit_batch_size_count"))

    results = {
        "mixed_vs_single_throughput": round(mixed_vs_single, 3),
        "vs_peft_throughput": round(vs_peft, 2),
        "mismatches": mismatches,
        "p50_ms_mixed": round(percentile(phases["mixed"]["lat"], 50) * 1000, 1),
        "p99_ms_mixed": round(percentile(phases["mixed"]["lat"], 99) * 1000, 1),
        "p50_ms_single": round(percentile(phases["single"]["lat"], 50) * 1000, 1),
        "p99_ms_single": round(percentile(phases["single"]["lat"], 99) * 1000, 1),
        "hot_load_ms": round(loading["hot_load_ms"], 2),
        "bytes_per_resident_adapter": loading["bytes_per_resident_adapter"],
        "rss_bytes_per_resident_adapter": loading["rss_bytes_per_resident_adapter"],
        "throughput_rps": {"mixed": round(mixed_rps, 1), "single": round(single_rps, 1), "peft": round(peft_median, 1),
                           "peft_rounds": [round(x, 1) for x in peft_rps],
                           "mixed_rounds": [round(x, 1) for x in phases["mixed"]["rps"]],
                           "single_rounds": [round(x, 1) for x in phases["single"]["rps"]]},
        "mean_batch_rows": round(batch_sum / batch_count, 1) if batch_count else None,
        "cpu_ms_per_request": {k: round(statistics.median(v) * 1000, 2) for k, v in cpu.items()},
        # CPU time per request is less sensitive than wall time to other load on a shared machine
        "vs_peft_cpu_server_only": round(statistics.median(cpu["peft"]) / statistics.median(cpu["server"]), 2),
        "vs_peft_cpu_server_and_client": round(
            statistics.median(cpu["peft"]) / (statistics.median(cpu["server"]) + statistics.median(cpu["client"])), 2),
        "answers_checked": len(answers), "distinct_checked": checked, "peft_agrees_with_reference": peft_agrees,
        "hot_load_ms_all": loading["hot_load_ms_all"],
        "setup": {"adapters": len(names), "requests_per_phase": len(phases["mixed"]["plan"]), "rounds": len(mixed_rounds),
                  "concurrency": args.concurrency, "torch_threads": args.threads, "max_batch": args.max_batch,
                  "max_wait_ms": args.max_wait_ms, "peft_requests": args.peft_requests, "cpus": os.cpu_count(),
                  "torch": torch.__version__, "python": sys.version.split()[0], "seconds": round(time.monotonic() - began, 1)},
        "targets": {"mixed_vs_single_throughput": 0.85, "vs_peft_throughput": 5.0, "mismatches": 0},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict | list)}, indent=2))
    print(f"wrote {RESULTS}")


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


if __name__ == "__main__":
    main()
