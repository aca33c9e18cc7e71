"""Serving at scale: 1,000 adapters through a 64-adapter cache, the dominant adapter merged, an int8 base.

    python bench/serve_scale.py            # about 6 minutes on 2 CPU cores
    python bench/serve_scale.py --quick    # smoke run

All on the bundled all-MiniLM-L6-v2 with in-process Engines (no HTTP: the scheduling and the cache
are measured, not the sockets), 32 closed-loop client threads sending single-text classify requests.
Phases alternate between rounds; ratios are medians over rounds.

1. Thousands of adapters: 1,000 LoRA adapters (r=4 on query/value, each with its own 2-label head)
   in the store, requests Zipf-distributed over all of them (s=1.0). "resident": every adapter
   loaded; "evicting": a cache of 64 adapters' bytes, so a request for a cold adapter parks while an
   I/O thread reads it (prefetch), and the model thread only installs it between two batches.
   `evicting_vs_resident_throughput`, `evicting_p99_ratio` (p99 latency, evicting over resident).
2. The dominant adapter merged: all traffic on one LoRA adapter, served merged after 8 forwards
   (`merge_after=8`), against the base model with no adapter on the same engine, and the same
   adapter routed unmerged (`merge_after=0`). `merged_single_vs_base_throughput`.
3. What merging costs the rest (`--only merge_cost`): 8 LoRA adapters of rank 32 on every Linear
   through a 48 MB cache (4 resident), one engine with `merge_after=8` and one with merging off,
   on mixed Zipf traffic (32 clients, and one client: one-row batches, where streaks and so merges
   and unmerges happen) and on single-adapter traffic. `merge_on_vs_off_mixed_throughput` (target
   >= 0.95), `merge_on_vs_off_mixed_one_client_throughput`, `merge_on_vs_off_single_throughput`
   (target >= 1.0).
4. An int8 base (`quantize="int8"`: torchao int8 weight-only Linear layers): top-1 label agreement
   with the fp32 base over 16 adapters and 480 texts, the bytes of the base's Linear weights, and
   throughput; and on a small random Llama with 4 LoRA adapters, greedy-token agreement with fp32.

Writes bench/results/serve_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.edge.memory import tensor_bytes  # noqa: E402
from adapterkit.serve import Engine  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/serving.py: helpers, not installed
from tests.serving import (  # noqa: E402
    WORDS,
    engine_with,
    gpt2_builder,
    load_minilm,
    make_adapter,
    tiny_llama,
)

RESULTS = Path(__file__).resolve().parent / "results" / "serve_scale.json"
#: the keys of each part that the results file also holds at its top level
FLAT = {"scale": ("evicting_vs_resident_throughput", "evicting_p99_ratio"),
        "merged": ("merged_single_vs_base_throughput",),
        "merge_cost": ("merge_on_vs_off_mixed_throughput", "merge_on_vs_off_mixed_one_client_throughput",
                       "merge_on_vs_off_single_throughput"),
        "int8": ("int8_label_agreement",)}
CLIENTS = 32


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def many_adapters(root: Path, n: int, config: ak.LoRA | None = None, scale: float = 0.3) -> list[Path]:
    """n distinct adapters: one made and saved by adapterkit, then copies with their own weights."""
    first = make_adapter(ak.adapt(load_minilm()), "z0000", root / "z0000", seed=0, scale=scale, config=config)
    tensors = load_file(first / "adapter.safetensors")
    folders = [first]
    gen = torch.Generator().manual_seed(1)
    for i in range(1, n):
        folder = root / f"z{i:04d}"
        folder.mkdir()
        shutil.copy(first / "adapter.json", folder / "adapter.json")
        save_file({k: (v + scale * torch.randn(v.shape, generator=gen)).contiguous() for k, v in tensors.items()},
                  folder / "adapter.safetensors")
        folders.append(folder)
    return folders


def closed_loop(engine: Engine, plan: list[tuple[str, str | None]], clients: int = CLIENTS) -> dict:
    """`clients` threads send the plan's (text, adapter) requests one after another; throughput and latency."""
    latencies: list[float] = []
    lock, position = threading.Lock(), [0]

    def client() -> None:
        while True:
            with lock:
                if position[0] >= len(plan):
                    return
                text, adapter = plan[position[0]]
                position[0] += 1
            start = time.perf_counter()
            engine.submit("classify", [text], adapter).result(timeout=300)
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"throughput_rps": len(plan) / elapsed, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]}


def zipf_plan(names: list[str], n: int, seed: int, s: float = 1.0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    order = rng.sample(names, len(names))  # which adapter is popular: random
    weights = [1.0 / (rank + 1) ** s for rank in range(len(order))]
    return list(zip(texts(n, seed), rng.choices(order, weights=weights, k=n), strict=True))


def with_store(root: Path, folders: dict[str, Path], **options) -> Engine:  # noqa: ANN003
    return engine_with(folders, root, max_wait_ms=2, **options)


def alternate(rounds: int, phases: dict) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in phases}
    for k in range(rounds):
        for name in (list(phases) if k % 2 == 0 else list(reversed(phases))):
            results[name].append(phases[name]())
            r = results[name][-1]
            print(f"  round {k} {name:>10}: {r['throughput_rps']:6.1f} req/s, p50 {r['p50_ms']:6.1f} ms, "
                  f"p99 {r['p99_ms']:6.1f} ms")
    return results


def median_ratio(results: dict, a: str, b: str, key: str) -> float:
    return statistics.median(x[key] / y[key] for x, y in zip(results[a], results[b], strict=True))


def scale(root: Path, args: argparse.Namespace) -> dict:
    folders = dict(zip([f"z{i:04d}" for i in range(args.adapters)], many_adapters(root / "src", args.adapters),
                       strict=True))
    resident = with_store(root / "resident", folders, cache_bytes=8 << 30, merge_after=0)
    for name in folders:
        resident.preload("default", name).result()
    one = resident.cache.stats()["bytes"] / resident.cache.stats()["loaded"]
    evicting = with_store(root / "evicting", folders, cache_bytes=int(64.5 * one), merge_after=0)
    names = sorted(folders)
    closed_loop(evicting, zipf_plan(names, 400, seed=99))  # fill the cache
    plan = zipf_plan(names, args.requests, seed=0)
    evicting.cache.hits = evicting.cache.misses = 0
    print(f"thousands of adapters: {len(folders)} in the store, cache of {int(64.5 * one) >> 10} KiB (64 adapters)")
    results = alternate(args.rounds, {"resident": lambda: closed_loop(resident, plan),
                                      "evicting": lambda: closed_loop(evicting, plan)})
    stats = evicting.cache.stats()
    resident.close()
    evicting.close()
    return {"evicting_vs_resident_throughput": round(median_ratio(results, "evicting", "resident", "throughput_rps"), 3),
            "evicting_p99_ratio": round(median_ratio(results, "evicting", "resident", "p99_ms"), 3),
            "cache_hit_rate": round(stats["hits"] / max(1, stats["hits"] + stats["misses"]), 3),
            "resident_adapters_evicting": stats["loaded"], "adapters": len(folders), "phases": results}


def merged(root: Path, args: argparse.Namespace) -> dict:
    folder = make_adapter(ak.adapt(load_minilm()), "hot", root / "hot", seed=5, scale=0.3)
    merging = with_store(root / "merging", {"hot": folder}, merge_after=8)
    routed = with_store(root / "routed", {"hot": folder}, merge_after=0)
    base_plan = [(t, None) for t in texts(args.requests, 1)]
    hot_plan = [(t, "hot") for t, _ in base_plan]
    print("the dominant adapter:")
    results = alternate(args.rounds, {"base": lambda: closed_loop(merging, base_plan),
                                      "merged": lambda: closed_loop(merging, hot_plan),
                                      "unmerged": lambda: closed_loop(routed, hot_plan)})
    merges = merging.merging.merges
    merging.close()
    routed.close()
    return {"merged_single_vs_base_throughput": round(median_ratio(results, "merged", "base", "throughput_rps"), 3),
            "unmerged_single_vs_base_throughput": round(median_ratio(results, "unmerged", "base", "throughput_rps"), 3),
            "merges": merges, "phases": results}


def merge_cost(root: Path, args: argparse.Namespace) -> dict:
    """Merging must not cost the traffic it does not serve merged (issue 34): large adapters (LoRA r=32
    on every Linear) through a small cache, the same engine settings with merging on and off."""
    config = ak.LoRA(r=32, targets="all-linear")
    folders = dict(zip([f"z{i:04d}" for i in range(8)], many_adapters(root / "src", 8, config, scale=0.01),
                       strict=True))
    cache = 48 << 20
    on = with_store(root / "on", folders, cache_bytes=cache, merge_after=8)
    off = with_store(root / "off", folders, cache_bytes=cache, merge_after=0)
    names = sorted(folders)
    mixed = zipf_plan(names, args.requests // 2, seed=3)
    serial = zipf_plan(names, args.requests // 8, seed=4)
    single = [(t, names[0]) for t, _ in zipf_plan(names, args.requests // 2, seed=5)]
    for engine in (on, off):
        closed_loop(engine, mixed[:64])  # warm up: fill the cache
    print(f"merge cost: 8 LoRA r=32 all-Linear adapters, {cache >> 20} MB cache, merging on and off")
    results = alternate(args.rounds, {
        "on_mixed": lambda: closed_loop(on, mixed), "off_mixed": lambda: closed_loop(off, mixed),
        "on_serial": lambda: closed_loop(on, serial, clients=1), "off_serial": lambda: closed_loop(off, serial, clients=1),
        "on_single": lambda: closed_loop(on, single), "off_single": lambda: closed_loop(off, single)})
    counts = {"merges": on.merging.merges, "unmerges": on.merging.unmerges, "refused": len(on.merging.refused),
              "resident": on.cache.stats()["loaded"]}
    on.close()
    off.close()
    return {
        "merge_on_vs_off_mixed_throughput": round(median_ratio(results, "on_mixed", "off_mixed", "throughput_rps"), 3),
        "merge_on_vs_off_mixed_one_client_throughput": round(
            median_ratio(results, "on_serial", "off_serial", "throughput_rps"), 3),
        "merge_on_vs_off_single_throughput": round(median_ratio(results, "on_single", "off_single", "throughput_rps"), 3),
        "merge_on_vs_off_mixed_p99": round(median_ratio(results, "on_mixed", "off_mixed", "p99_ms"), 3),
        **counts, "phases": results}


def linear_bytes(model: nn.Module) -> int:
    return sum(tensor_bytes(m.weight) for m in model.modules() if type(m) is nn.Linear)


def int8(root: Path, args: argparse.Namespace) -> dict:
    builder = ak.adapt(load_minilm())
    folders = {f"q{i:02d}": make_adapter(builder, f"q{i:02d}", root / f"q{i:02d}", seed=100 + i, scale=0.3)
               for i in range(16)}
    fp32 = with_store(root / "fp32", folders, merge_after=0)
    quant = with_store(root / "int8", folders, merge_after=0, quantize="int8")
    rng = random.Random(3)
    plan = [(t, rng.choice(sorted(folders))) for t in texts(480, 3)]
    agree = 0
    for text, name in plan:
        a = fp32.classify([text], adapter=name)["results"][0]["label"]
        agree += a == quant.classify([text], adapter=name)["results"][0]["label"]
    print("int8 base:")
    results = alternate(args.rounds, {"fp32": lambda: closed_loop(fp32, plan), "int8": lambda: closed_loop(quant, plan)})
    out = {"int8_label_agreement": round(agree / len(plan), 4),
           "int8_vs_fp32_throughput": round(median_ratio(results, "int8", "fp32", "throughput_rps"), 3),
           "linear_weight_bytes_fp32": linear_bytes(fp32.am.base), "linear_weight_bytes_int8": linear_bytes(quant.am.base),
           "quantized_linears": quant.quantized, "phases": results}
    fp32.close()
    quant.close()
    out["int8_greedy_token_agreement"] = generation_agreement(root)
    return out


def generation_agreement(root: Path) -> dict:
    base = tiny_llama(root / "llama", hidden=256, layers=4, positions=256)
    builder = gpt2_builder(base)
    lora = ak.LoRA(r=8, targets=["q_proj", "v_proj", "up_proj", "down_proj"])
    folders = {f"g{i}": make_adapter(builder, f"g{i}", root / f"g{i}", config=lora, labels=None, seed=i, scale=0.3)
               for i in range(4)}
    engines = {}
    for kind in ("fp32", "int8"):
        engines[kind] = Engine(base, root / f"gen-{kind}", max_new_tokens=32, merge_after=0,
                               quantize="int8" if kind == "int8" else None)
        for name, folder in folders.items():
            engines[kind].store.add("default", name, folder)
    rng = random.Random(4)
    prompts = [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))), rng.choice([*folders, None]))
               for _ in range(40)]
    outs = {kind: [f.result()["token_ids"] for f in [e.submit_generate(p, a, max_new_tokens=16, ignore_eos=True)
                                                      for p, a in prompts]] for kind, e in engines.items()}
    for e in engines.values():
        e.close()
    same = sum(a == b for a, b in zip(outs["fp32"], outs["int8"], strict=True))
    positions = sum(x == y for a, b in zip(outs["fp32"], outs["int8"], strict=True) for x, y in zip(a, b, strict=True))
    total = sum(len(a) for a in outs["fp32"])
    return {"identical_outputs": round(same / len(prompts), 3), "tokens_equal_by_position": round(positions / total, 3),
            "requests": len(prompts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=2000, help="requests per phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["scale", "merged", "merge_cost", "int8"],
                        help="run one part (its keys are updated in the results file)")
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.requests, args.rounds = 120, 300, 1
    torch.set_num_threads(args.threads)
    parts = {"scale": scale, "merged": merged, "merge_cost": merge_cost, "int8": int8}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.only:
            part = parts[args.only](root / args.only, args)
            print(json.dumps({k: v for k, v in part.items() if k != "phases"}, indent=2))
            if not args.quick and RESULTS.exists():
                summary = json.loads(RESULTS.read_text())
                summary[args.only] = part
                summary.update({k: part[k] for k in FLAT.get(args.only, ())})
                RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
                print(f"updated {args.only} in {RESULTS}")
            return
        summary = {name: part(root / name, args) for name, part in parts.items()}
    flat = {k: summary[name][k] for name, keys in FLAT.items() for k in keys}
    summary = {**flat, **summary, "setup": {"clients": CLIENTS, "requests_per_phase": args.requests,
                                            "rounds": args.rounds, "threads": args.threads, "torch": torch.__version__,
                                            "machine": f"{platform.machine()}, {os.cpu_count()} cpus"}}
    print(json.dumps(flat, indent=2))
    print(json.dumps({k: {m: v for m, v in part.items() if m != "phases"} for k, part in summary.items()
                      if k in parts}, indent=2))
    if not args.quick:
        RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
