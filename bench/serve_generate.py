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

With --vs-llamacpp, instead: llama.cpp as the contender, on the tiny Llama above and on a 156M
Llama-like model (hidden 1024, 8 layers, 16 heads / 4 kv heads, MLP 2816, llama.cpp's 32,000-token
SentencePiece vocabulary), 16 LoRAs (r=8, every projection) each, 32-token prompts, 128 greedy new
tokens, 2 threads on both sides. Cases, alternating which side goes first in every round:
- single: one stream on the base model;
- single_lora: one stream with one LoRA, ours routed (merging off) and served merged (after a warm-up
  request has merged it), llama.cpp with the adapter set on its context;
- mixed16: 16 streams at once, each with its own LoRA; llama.cpp serves them one after another.
Ratios are ours / llama.cpp's tokens per second (medians over rounds), `token_agreement` the share of
greedy tokens equal to llama.cpp's, position by position. A case during which other processes kept
more than 0.2 cores busy is discarded and run again (`reruns` counts them).
Writes the `vs_llamacpp` part of bench/results/serve_generate.json, keeping the rest.
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

import torch  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.io import export_peft_lora  # noqa: E402
from adapterkit.serve import Engine  # noqa: E402
from adapterkit.serve.generate import GenerationRow, generate_batch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/serving.py: helpers, not installed
from bench.llamacpp import Contender, OtherLoad, convert_lora, convert_model, llama_vocabulary  # noqa: E402
from tests.serving import WORDS, gpt2_builder, make_adapter, save_model, tiny_llama  # noqa: E402

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


PROMPT_TOKENS, NEW_TOKENS, STREAMS, MAX_OTHER_CORES, MAX_RERUNS = 32, 128, 16, 0.2, 4


def llama_156m_config(vocab: int = 32000, bos: int | None = None, eos: int | None = None):  # noqa: ANN201
    """A Llama-like model of 156M parameters (623 MB in fp32) with a 32,000-token vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=512, bos_token_id=bos,
                       eos_token_id=eos, tie_word_embeddings=False)


def llama_156m(folder: Path, tokenizer, seed: int = 0) -> Path:  # noqa: ANN001 - a transformers tokenizer
    """The 156M model, random, saved with llama.cpp's Llama vocabulary."""
    from transformers import LlamaForCausalLM

    config = llama_156m_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    return save_model(LlamaForCausalLM, config, tokenizer, folder, seed)


def ours(engine: Engine, prompts: list[list[int]], adapters: list[str | None]) -> dict:
    """Every request submitted at once; tokens per second from the first submission to the last token."""
    n = len(prompts)
    first, ended, done = [0.0] * n, [0.0] * n, threading.Semaphore(0)
    start = time.perf_counter()
    futures = []
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        def on_token(_: int, i: int = i) -> None:
            first[i] = first[i] or time.perf_counter()

        def finished(_: object, i: int = i) -> None:
            ended[i] = time.perf_counter()
            done.release()

        futures.append(engine.submit_generate("", adapter=adapter, max_new_tokens=NEW_TOKENS, prompt_ids=prompt,
                                              ignore_eos=True, on_token=on_token))
        futures[-1].add_done_callback(finished)
    for _ in range(n):
        if not done.acquire(timeout=900):
            raise RuntimeError("a request did not finish within 15 minutes")
    tokens = [f.result()["token_ids"] for f in futures]
    return _timed(tokens, start, first, max(ended))


def theirs(contender: Contender, prompts: list[list[int]], adapters: list[str | None]) -> dict:
    """The same requests through llama.cpp, one after another (its batches cannot mix adapters)."""
    start = time.perf_counter()
    answers = [contender.generate(p, NEW_TOKENS, a) for p, a in zip(prompts, adapters, strict=True)]
    return _timed([t for t, _ in answers], start, [f for _, f in answers], time.perf_counter())


def _timed(tokens: list[list[int]], start: float, first: list[float], end: float) -> dict:
    if any(len(t) != NEW_TOKENS for t in tokens):
        raise RuntimeError(f"a stream stopped early: {[len(t) for t in tokens]} tokens")
    ttft = sorted(1000 * (f - start) for f in first)
    return {"tokens_s": sum(map(len, tokens)) / (end - start), "ttft_ms_p50": ttft[len(ttft) // 2],
            "ttft_ms_max": ttft[-1], "token_ids": tokens}


def quiet(run, reruns: list[int], contender: Contender) -> dict:  # noqa: ANN001 - a no-argument callable
    """`run()` again while other processes (not ours, not the contender's) kept more than
    MAX_OTHER_CORES busy during it."""
    for attempt in range(MAX_RERUNS + 1):
        with OtherLoad((contender.pid,)) as load:
            result = run()
        if load.cores <= MAX_OTHER_CORES:
            return {**result, "other_cores": round(load.cores, 3)}
        reruns[0] += 1
        print(f"  discarded: other processes used {load.cores:.2f} cores (attempt {attempt + 1})")
    return {**result, "other_cores": round(load.cores, 3), "noisy": True}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


def versus_llamacpp(size: str, source: Path, root: Path, rounds: int, threads: int) -> dict:
    if size == "tiny":
        base, scale, lowest = tiny_llama(root / "model", hidden=256, layers=4, positions=512), 0.3, 3
    else:  # ids below 259 are llama's special and byte tokens
        base, scale, lowest = llama_156m(root / "model", llama_vocabulary(source)), 0.02, 259
    builder = gpt2_builder(base)
    vocab = builder.base.config.vocab_size
    names = [f"a{i:02d}" for i in range(STREAMS)]
    contender = Contender(convert_model(source, base, root / "model.gguf"), threads)
    folders = {}
    for i, name in enumerate(names):
        folders[name] = make_adapter(builder, name, root / name, labels=None, seed=i, scale=scale,
                                     config=ak.LoRA(r=8, targets=TARGETS))
        builder.load(folders[name], name=name)
        peft = export_peft_lora(builder, name, root / f"{name}-peft")
        builder.delete(name)
        contender.add_lora(name, convert_lora(source, peft, base, root / f"{name}.gguf"))
    del builder
    routed = Engine(base, root / "store-routed", max_batch=STREAMS, max_wait_ms=5, max_new_tokens=NEW_TOKENS,
                    merge_after=0)
    merged = Engine(base, root / "store-merged", max_batch=STREAMS, max_wait_ms=5, max_new_tokens=NEW_TOKENS)
    for engine, wanted in ((routed, names), (merged, names[:1])):
        for name in wanted:
            engine.store.add("default", name, folders[name])
            engine.preload("default", name).result()
    rng = random.Random(0)
    prompts = [[rng.randrange(lowest, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(STREAMS)]
    one, lora, mixed = [None], names[:1], list(names)
    cases = {  # name: (our engine, adapters, whether llama.cpp runs it)
        "single": (routed, one, True), "single_lora": (routed, lora, True), "single_lora_merged": (merged, lora, False),
        "mixed16": (routed, mixed, True), "base16": (routed, [None] * STREAMS, False)}
    for engine, adapters, _ in cases.values():  # warm-up: stacks built, the merge made, caches allocated
        ours(engine, prompts[:len(adapters)], adapters)
    theirs(contender, prompts[:1], lora)
    reruns, results = [0], []
    for k in range(rounds):
        result: dict[str, dict] = {}
        for case, (engine, adapters, contended) in cases.items():
            sides = [("ours", lambda e=engine, a=adapters: ours(e, prompts[:len(a)], a))]
            if contended:
                sides.append(("llamacpp", lambda a=adapters: theirs(contender, prompts[:len(a)], a)))
            for side, run in (sides if k % 2 == 0 else sides[::-1]):
                result[f"{case}/{side}"] = quiet(run, reruns, contender)
            line = ", ".join(f"{s.split('/')[1]} {r['tokens_s']:7.1f}" for s, r in result.items() if s.startswith(case))
            print(f"{size} round {k} {case:>18}: tok/s {line}")
        results.append(result)
    routed.close()
    merged.close()
    contender.close()
    return summarise(size, results, reruns[0], rounds)


def summarise(size: str, results: list[dict], reruns: int, rounds: int) -> dict:
    def med(key: str, field: str = "tokens_s") -> float:
        return statistics.median(r[key][field] for r in results)

    def ratio(case: str, contender_case: str | None = None) -> float:
        return round(statistics.median(r[f"{case}/ours"]["tokens_s"] / r[f"{contender_case or case}/llamacpp"]["tokens_s"]
                                       for r in results), 3)

    first = results[0]
    return {
        "vs_llamacpp_single": ratio("single"), "vs_llamacpp_single_lora": ratio("single_lora"),
        "vs_llamacpp_single_lora_merged": ratio("single_lora_merged", "single_lora"),
        "vs_llamacpp_mixed16": ratio("mixed16"),
        "lora_share_of_mixed_step": round(1 - med("mixed16/ours") / med("base16/ours"), 3),
        "tokens_s": {k: round(med(k), 1) for k in first},
        "ttft_ms_p50_mixed16": {s: round(med(f"mixed16/{s}", "ttft_ms_p50"), 1) for s in ("ours", "llamacpp")},
        "token_agreement": {case: round(agreement(first[f"{case}/ours"]["token_ids"],
                                                  first[f"{case}/llamacpp"]["token_ids"]), 3)
                            for case in ("single", "single_lora", "mixed16")},
        "reruns": reruns, "rounds": rounds,
        "noisy_runs": sum(bool(v.get("noisy")) for r in results for v in r.values()),
    }


def run_versus_llamacpp(args: argparse.Namespace) -> None:
    import llama_cpp

    source = Path(args.vs_llamacpp).resolve()
    out = {}
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            out[size] = versus_llamacpp(size, source, Path(tmp), args.rounds, args.threads)
        print(json.dumps({size: out[size]}, indent=2))
    summary = {**out, "setup": {
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "streams": STREAMS, "threads": args.threads,
        "lora": "r=8 on q,k,v,o,gate,up,down", "weights": "f32 both sides, llama.cpp key/value cache f32",
        "llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus"}}
    if not args.quick:
        kept = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        RESULTS.write_text(json.dumps({**kept, "vs_llamacpp": summary}, indent=2) + "\n")
        print(f"wrote {RESULTS}")


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
