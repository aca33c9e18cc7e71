"""Generation against llama.cpp: `python bench/serve_generate.py --vs-llamacpp LLAMA_CPP_SOURCE`.

llama.cpp as the contender, on the tiny Llama of serve_generate.py and on a 156M
Llama-like model (hidden 1024, 8 layers, 16 heads / 4 kv heads, MLP 2816, llama.cpp's 32,000-token
SentencePiece vocabulary), 16 LoRAs (r=8, every projection) each, 32-token prompts, 128 greedy new
tokens, 2 threads on both sides. Cases, alternating which side goes first in every round:
- single: one stream on the base model;
- single_lora: one stream with one LoRA, ours routed (merging off) and served merged (after a warm-up
  request has merged it), llama.cpp with the adapter set on its context;
- mixed16: 16 streams at once, each with its own LoRA; llama.cpp serves them one after another;
- single_bf16 / single_lora_bf16 (156M): one stream, base and one LoRA, our bf16 base (fp32 adapters)
  against llama.cpp's f16 GGUF: half the bytes a token on both sides.
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
import tempfile
import threading
import time
from pathlib import Path

import torch

import adapterkit as ak
from adapterkit.io import export_peft_lora
from adapterkit.serve import Engine
from bench.llamacpp import Contender, OtherLoad, convert_lora, convert_model, llama_vocabulary
from bench.serve_generate import RESULTS, TARGETS
from tests.serving import gpt2_builder, make_adapter, save_model, tiny_llama

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


def quiet(run, reruns: list[int], contenders: tuple[Contender, ...]) -> dict:  # noqa: ANN001 - a callable
    """`run()` again while other processes (not ours, not the contenders') kept more than
    MAX_OTHER_CORES busy during it."""
    for attempt in range(MAX_RERUNS + 1):
        with OtherLoad(tuple(c.pid for c in contenders)) as load:
            result = run()
        if load.cores <= MAX_OTHER_CORES:
            return {**result, "other_cores": round(load.cores, 3)}
        reruns[0] += 1
        print(f"  discarded: other processes used {load.cores:.2f} cores (attempt {attempt + 1})")
    return {**result, "other_cores": round(load.cores, 3), "noisy": True}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


Case = tuple[Engine, list, "Contender | None"]  # our engine, the rows' adapters, llama.cpp's side or None


def versus_llamacpp(size: str, source: Path, root: Path, rounds: int, threads: int) -> dict:
    cases, prompts, engines, contenders = contest(size, source, root, threads)
    try:
        for engine, adapters, contended in cases.values():  # warm-up: stacks built, the merge made
            ours(engine, prompts[:len(adapters)], adapters)
            if contended is not None:
                theirs(contended, prompts[:1], adapters[:1])
        reruns, results = [0], []
        for k in range(rounds):
            results.append(play_round(size, k, cases, prompts, contenders, reruns))
    finally:
        for engine in engines:
            engine.close()
        for side in contenders:
            side.close()
    return summarise(size, results, reruns[0], rounds)


def play_round(size: str, k: int, cases: dict[str, Case], prompts: list[list[int]],
               contenders: tuple[Contender, ...], reruns: list[int]) -> dict[str, dict]:
    """Every case once, ours first in even rounds and llama.cpp first in odd ones."""
    result: dict[str, dict] = {}
    for case, (engine, adapters, contended) in cases.items():
        sides = [("ours", lambda e=engine, a=adapters: ours(e, prompts[:len(a)], a))]
        if contended is not None:
            sides.append(("llamacpp", lambda c=contended, a=adapters: theirs(c, prompts[:len(a)], a)))
        for side, run in (sides if k % 2 == 0 else sides[::-1]):
            result[f"{case}/{side}"] = quiet(run, reruns, contenders)
        line = ", ".join(f"{s.split('/')[1]} {r['tokens_s']:7.1f}" for s, r in result.items() if s.startswith(case))
        print(f"{size} round {k} {case:>18}: tok/s {line}")
    return result


def contest(size: str, source: Path, root: Path,
            threads: int) -> tuple[dict[str, Case], list[list[int]], list[Engine], tuple[Contender, ...]]:
    """The model, its 16 LoRAs, llama.cpp's GGUF files and processes, our engines, prompts and cases."""
    if size == "tiny":
        base, scale, lowest = tiny_llama(root / "model", hidden=256, layers=4, positions=512), 0.3, 3
    else:  # ids below 259 are llama's special and byte tokens
        base, scale, lowest = llama_156m(root / "model", llama_vocabulary(source)), 0.02, 259
    halves = size != "tiny"  # half precision on both sides, on the 156M model: bf16 against f16 GGUF
    contender = Contender(convert_model(source, base, root / "model.gguf"), threads)
    contender16 = Contender(convert_model(source, base, root / "model-f16.gguf", "f16"), threads) if halves else None
    builder = gpt2_builder(base)
    vocab = builder.base.config.vocab_size
    names = [f"a{i:02d}" for i in range(STREAMS)]
    folders = {}
    for i, name in enumerate(names):
        folders[name] = make_adapter(builder, name, root / name, labels=None, seed=i, scale=scale,
                                     config=ak.LoRA(r=8, targets=TARGETS))
        builder.load(folders[name], name=name)
        lora_gguf = convert_lora(source, export_peft_lora(builder, name, root / f"{name}-peft"), base,
                                 root / f"{name}.gguf")
        builder.delete(name)
        for side in (contender, contender16) if i == 0 else (contender,):
            if side is not None:
                side.add_lora(name, lora_gguf)
    settings = {"max_batch": STREAMS, "max_wait_ms": 5, "max_new_tokens": NEW_TOKENS}
    routed = Engine(base, root / "store-routed", merge_after=0, **settings)
    merged = Engine(base, root / "store-merged", **settings)
    half = Engine(base, root / "store-bf16", merge_after=0, dtype="bf16", **settings) if halves else None
    for engine, wanted in ((routed, names), (merged, names[:1]), (half, names[:1])):
        for name in wanted if engine is not None else ():
            engine.store.add("default", name, folders[name])
            engine.preload("default", name).result()
    rng = random.Random(0)
    prompts = [[rng.randrange(lowest, vocab) for _ in range(PROMPT_TOKENS)] for _ in range(STREAMS)]
    one, lora = [None], names[:1]
    cases: dict[str, Case] = {
        "single": (routed, one, contender), "single_lora": (routed, lora, contender),
        "single_lora_merged": (merged, lora, None), "mixed16": (routed, list(names), contender),
        "base16": (routed, [None] * STREAMS, None)}
    if half is not None:
        cases.update({"single_bf16": (half, one, contender16), "single_lora_bf16": (half, lora, contender16)})
    engines = [e for e in (routed, merged, half) if e is not None]
    return cases, prompts, engines, tuple(c for c in (contender, contender16) if c is not None)


def summarise(size: str, results: list[dict], reruns: int, rounds: int) -> dict:
    def med(key: str, field: str = "tokens_s") -> float:
        return statistics.median(r[key][field] for r in results)

    def ratio(case: str, contender_case: str | None = None) -> float:
        return round(statistics.median(r[f"{case}/ours"]["tokens_s"] / r[f"{contender_case or case}/llamacpp"]["tokens_s"]
                                       for r in results), 3)

    first = results[0]
    halves = {f"vs_llamacpp_{case}": ratio(case) for case in ("single_bf16", "single_lora_bf16")
              if f"{case}/ours" in first}
    return {
        **halves,
        "vs_llamacpp_single": ratio("single"), "vs_llamacpp_single_lora": ratio("single_lora"),
        "vs_llamacpp_single_lora_merged": ratio("single_lora_merged", "single_lora"),
        "vs_llamacpp_mixed16": ratio("mixed16"),
        "lora_share_of_mixed_step": round(1 - med("mixed16/ours") / med("base16/ours"), 3),
        "tokens_s": {k: round(med(k), 1) for k in first},
        "ttft_ms_p50_mixed16": {s: round(med(f"mixed16/{s}", "ttft_ms_p50"), 1) for s in ("ours", "llamacpp")},
        "token_agreement": {case: round(agreement(first[f"{case}/ours"]["token_ids"],
                                                  first[f"{case}/llamacpp"]["token_ids"]), 3)
                            for case in ("single", "single_lora", "mixed16", *[c for c in ("single_bf16",) if f"{c}/ours" in first])},
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
        "lora": "r=8 on q,k,v,o,gate,up,down", "weights": "f32 both sides (the *_bf16 cases: our bf16 against f16 GGUF), llama.cpp key/value cache f32",
        "llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus"}}
    if not args.quick:
        kept = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        # a run of some sizes replaces those sizes' results only
        summary = {**kept.get("vs_llamacpp", {}), **summary}
        RESULTS.write_text(json.dumps({**kept, "vs_llamacpp": summary}, indent=2) + "\n")
        print(f"wrote {RESULTS}")
