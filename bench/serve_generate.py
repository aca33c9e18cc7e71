"""Generation serving: continuous against static batching on the same Poisson traffic.

    python bench/serve_generate.py            # about 3 minutes on 2 CPU cores
    python bench/serve_generate.py --quick    # smoke run
    python bench/serve_generate.py --vs-llamacpp LLAMA_CPP_SOURCE   # against llama.cpp (bench/llamacpp.py)

1. A small random Llama (4 layers, hidden 256, grouped-query attention) built offline, 16 random
   LoRA adapters (r=8 on every projection) in a store, and two in-process Engines on it that differ
   only in scheduling: "continuous" (rows join and leave the decode at every step) and "static"
   (a batch decodes to its longest row; newcomers wait for it). max_batch 32 in both.
2. Traffic: Poisson arrivals of requests over the 16 adapters and the base, prompts of 4-48 tokens,
   output lengths drawn from {8, 16, 32, 64, 128} (ignore_eos, so lengths are what was asked), a
   quarter sampled (temperature 0.8, top_p 0.95, a seed each), the rest greedy. The arrival rate is
   set from the continuous engine's capacity on a burst (--load times it, default 3), so both engines
   see more work than they can do at once and throughput means capacity (the run's tail, when the
   last long requests decode nearly alone, counts in both).
3. Rounds alternate which engine goes first on the same traffic. Throughput: generated tokens over the
   time from the first arrival to the last completion; time to first token (TTFT): from submission
   to the first streamed token. Ratios are medians over rounds.
4. Every answer of both engines is compared, token for token, with the same request run alone
   (generate_batch of one row on a separate copy of the model): `token_mismatches` counts requests
   that differ.

With --vs-llamacpp, instead: llama.cpp as the contender (bench/vs_llamacpp.py says how).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import adapterkit as ak  # noqa: E402, I001 - first: it sets OpenMP's wait policy before torch loads
import torch  # noqa: E402
from adapterkit.serve import Engine  # noqa: E402
from adapterkit.serve.generate import GenerationRow, generate_batch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/serving.py: helpers, not installed
from tests.serving import WORDS, gpt2_builder, make_adapter, tiny_llama  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "serve_generate.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LENGTHS = (8, 16, 32, 64, 128)


def traffic(n: int, adapters: list[str], rate: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        sampled = rng.random() < 0.25
        out.append({"at": t, "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 48))),
                    "adapter": rng.choice([*adapters, None]), "max_new_tokens": rng.choice(LENGTHS),
                    "temperature": 0.8 if sampled else 0.0, "top_p": 0.95 if sampled else 1.0, "seed": i})
    return out


def play(engine: Engine, requests: list[dict]) -> dict:
    """Submit each request at its arrival time (open loop); wait for all of them."""
    n = len(requests)
    submitted, first, ended = [0.0] * n, [0.0] * n, [0.0] * n
    futures, done = [None] * n, threading.Semaphore(0)
    start = time.perf_counter()
    for i, r in enumerate(requests):
        delay = start + r["at"] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submitted[i] = time.perf_counter()

        def on_token(_: int, i: int = i) -> None:
            if not first[i]:
                first[i] = time.perf_counter()

        def finished(_: object, i: int = i) -> None:
            ended[i] = time.perf_counter()
            done.release()

        futures[i] = engine.submit_generate(r["prompt"], adapter=r["adapter"], max_new_tokens=r["max_new_tokens"],
                                            temperature=r["temperature"], top_p=r["top_p"], seed=r["seed"],
                                            ignore_eos=True, on_token=on_token)
        futures[i].add_done_callback(finished)
    for _ in range(n):
        if not done.acquire(timeout=900):
            raise RuntimeError("a request did not finish within 15 minutes")
    outs = [f.result() for f in futures]
    tokens = sum(o["tokens"] for o in outs)
    ttft = sorted(1000 * (f - s) for f, s in zip(first, submitted, strict=True))
    return {"throughput_tokens_s": tokens / (max(ended) - submitted[0]), "tokens": tokens,
            "ttft_p50_ms": ttft[len(ttft) // 2], "ttft_p99_ms": ttft[min(n - 1, int(0.99 * n))],
            "token_ids": [o["token_ids"] for o in outs]}


def capacity(engine: Engine, requests: list[dict]) -> float:
    """Requests per second the engine completes when all of them arrive at once (after a warm-up
    burst: the first batches build each adapter's stacked weights)."""
    burst = [{**r, "at": 0.0} for r in requests]
    play(engine, burst[:16])
    start = time.perf_counter()
    play(engine, burst)
    return len(burst) / (time.perf_counter() - start)


def alone(reference, requests: list[dict], tokenizer, pad_id: int) -> list[list[int]]:  # noqa: ANN001
    out = []
    for r in requests:
        ids = tokenizer(r["prompt"])["input_ids"]
        row = GenerationRow(ids, r["max_new_tokens"], r["temperature"], r["seed"], top_p=r["top_p"], ignore_eos=True)
        out.append(generate_batch(reference, [row], [r["adapter"]], pad_id=pad_id, eos_id=None)[0].tokens)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=240, help="requests per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--load", type=float, default=3.0, help="arrival rate / continuous capacity on a burst")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--vs-llamacpp", metavar="LLAMA_CPP_SOURCE", help="llama.cpp's source folder (see bench/llamacpp.py)")
    parser.add_argument("--sizes", default="tiny,156m", help="with --vs-llamacpp: tiny, 156m or both")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds = 24, 1
    torch.set_num_threads(args.threads)
    if args.vs_llamacpp:
        from bench.vs_llamacpp import run_versus_llamacpp

        return run_versus_llamacpp(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = tiny_llama(root / "llama", hidden=256, layers=4, positions=512)
        builder = gpt2_builder(base)
        folders = {f"a{i:02d}": make_adapter(builder, f"a{i:02d}", root / f"a{i:02d}", labels=None, seed=i,
                                             scale=0.3, config=ak.LoRA(r=8, targets=TARGETS)) for i in range(16)}
        engines = {}
        for scheduling in ("continuous", "static"):
            engine = Engine(base, root / f"store-{scheduling}", max_batch=32, max_wait_ms=5, max_new_tokens=256,
                            scheduling=scheduling)
            for name, folder in folders.items():
                engine.store.add("default", name, folder)
                engine.preload("default", name).result()
            engines[scheduling] = engine
        reference = gpt2_builder(base)
        for name, folder in folders.items():
            reference.load(folder, name=name)
        reference.eval()
        adapters = sorted(folders)

        warm = traffic(min(48, args.requests), adapters, 1.0, seed=999)
        rate = args.load * capacity(engines["continuous"], warm)
        capacity(engines["static"], warm[:8])
        print(f"continuous capacity on a burst: {rate / args.load:.2f} req/s; arrivals at {rate:.2f} req/s")
        rounds, mismatches, checked = [], 0, 0
        requests = traffic(args.requests, adapters, rate, seed=0)
        expected = alone(reference, requests, engines["static"].tokenizer, engines["static"].pad_id)
        for k in range(args.rounds):
            result = {}
            order = ("static", "continuous") if k % 2 == 0 else ("continuous", "static")
            for scheduling in order:
                res = play(engines[scheduling], requests)
                bad = sum(a != b for a, b in zip(res.pop("token_ids"), expected, strict=True))
                mismatches += bad
                checked += len(requests)
                result[scheduling] = {**res, "token_mismatches": bad}
                print(f"round {k} {scheduling:>10}: {res['throughput_tokens_s']:7.1f} tok/s, TTFT p50 "
                      f"{res['ttft_p50_ms']:7.1f} ms, p99 {res['ttft_p99_ms']:7.1f} ms, mismatches {bad}")
            rounds.append(result)
        for engine in engines.values():
            engine.close()

    def med(scheduling: str, key: str) -> float:
        return statistics.median(r[scheduling][key] for r in rounds)

    ratio = statistics.median(r["continuous"]["throughput_tokens_s"] / r["static"]["throughput_tokens_s"]
                              for r in rounds)
    summary = {
        "continuous_vs_static_throughput": round(ratio, 3),
        "ttft_p99_ms_continuous": round(med("continuous", "ttft_p99_ms"), 1),
        "ttft_p99_ms_static": round(med("static", "ttft_p99_ms"), 1),
        "ttft_p50_ms_continuous": round(med("continuous", "ttft_p50_ms"), 1),
        "ttft_p50_ms_static": round(med("static", "ttft_p50_ms"), 1),
        "throughput_tokens_s_continuous": round(med("continuous", "throughput_tokens_s"), 1),
        "throughput_tokens_s_static": round(med("static", "throughput_tokens_s"), 1),
        "token_mismatches": mismatches,
        "requests_checked": checked,
        "setup": {"model": "random Llama, 4 layers, hidden 256, 4 heads / 2 kv heads", "adapters": 16,
                  "lora": "r=8 on q,k,v,o,gate,up,down", "max_batch": 32, "requests_per_round": args.requests,
                  "rounds": args.rounds, "arrival_rate_req_s": round(rate, 2), "load": args.load,
                  "output_lengths": list(LENGTHS), "threads": args.threads, "torch": torch.__version__,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cpus"},
        "rounds": rounds,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=2))
    if not args.quick:
        kept = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        RESULTS.write_text(json.dumps({**summary, **{k: v for k, v in kept.items() if k == "vs_llamacpp"}}, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
