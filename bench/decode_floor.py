"""Where one decode step's time goes on the CPU: the floor under bench/serve_generate.py --vs-llamacpp.

    python bench/decode_floor.py            # about 2 minutes on 2 CPU cores

On the 156M Llama-like model of that bench (random weights, fp32), one token for one stream at a
context of 96 tokens, median of many steps, 2 threads:
- `read_weights_ms`: summing every weight matrix once (what a memory-bound step cannot beat);
- `linears_ms`: F.linear of one row through every weight matrix, one after another (the matrix
  products alone, no attention, no Python model code);
- `hf_step_ms`: transformers' own forward of one token with its key/value cache (no adapterkit);
- `linears_onednn_ms`, `hf_step_onednn_ms`: the same two with the Linear layers through oneDNN
  (methods/kernels.fast_linears with its one-row kernel off);
- `linears_row_kernel_ms`, `hf_step_row_kernel_ms`: through kernels.linear as the serving Engine runs
  them on the CPU (one row: the compiled multiply-and-sum of kernels.RowProduct); the rest below too;
- the `*_bf16_*` keys: the same with the weights in bf16 (PyTorch's own bf16 GEMM, then the kernel);
- `adapted_step_ms`: that step through an AdaptedModel with 16 LoRAs loaded, none routed;
- `routed_lora_step_ms` / `routed_lora_rows16_step_ms`: one LoRA (r=8, every projection) routed to the
  row, and 16 rows each with its own LoRA (`base_rows16_step_ms`: the same 16 rows on the base).
- `captured_step_ms` / `captured_lora_step_ms`: the Engine's captured one-stream step
  (serve/captured.py: the forward compiled over fixed caches of 256 and 512 tokens, the row in the
  first; LoRA through its slots),
  base and one LoRA, interleaved with the two eager steps above;
- `captured_rows16_step_ms` / `captured_lora_rows16_step_ms`: the Engine's captured step of 16 rows,
  base and 16 LoRAs in its slots, interleaved with the eager 16-row steps; `lora_share_captured_rows16`
  compares it with the eager base step (the base's own rows take the captured step too when served);
- `tiny_step_eager_ms` / `tiny_step_compiled_ms`: the tiny Llama of serve_generate.py (hidden 256,
  4 layers), one token, the eager step with transformers' growing cache against the captured step:
  the per-step Python and dispatch overhead it saves.
Ratios against `linears_ms` say how much of a step is the model's code around the products. The pairs
behind the ratios of the kernels, of one LoRA and of 16 are measured interleaved, round by round (this
machine's speed drifts); the default-GEMM rows come first, on their own. Summing bf16 weights runs
slower per byte than fp32 (`read_weights_bf16_gb_s`): it is not a floor for the bf16 products.

Writes bench/results/decode_floor.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.hf_names import cache_keyword, last_logits_only  # noqa: E402
from adapterkit.methods.kernels import fast_linears, linear, row_product  # noqa: E402
from adapterkit.serve.captured import CapturedStep  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.serve_generate import TARGETS  # noqa: E402
from bench.vs_llamacpp import llama_156m_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "decode_floor.json"
CONTEXT = 96


def median_ms(step: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def model_156m() -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_156m_config()).eval()


def decode_step(model: torch.nn.Module, rows: int) -> Callable[[], object]:
    """A closure running one token for `rows` rows on a cache of CONTEXT tokens (the cache is cut back
    after each step, so every step sees the same context)."""
    from transformers import DynamicCache

    base = model.base if isinstance(model, ak.AdaptedModel) else model
    keyword, last, vocab = cache_keyword(base), last_logits_only(base), base.config.vocab_size
    with torch.inference_mode():
        cache = DynamicCache()
        ids = torch.randint(3, vocab, (rows, CONTEXT))
        model(input_ids=ids, use_cache=True, **{keyword: cache})
    token = torch.randint(3, vocab, (rows, 1))
    position = torch.full((rows, 1), CONTEXT)

    @torch.inference_mode()
    def step() -> object:
        out = model(input_ids=token, position_ids=position, use_cache=True, **{keyword: cache}, **last)
        cache.crop(-1)
        return out.logits

    return step


def interleaved(cases: dict[str, tuple[Callable[[], object], bool]], repeats: int, rounds: int = 4) -> dict[str, float]:
    """Median ms of each case (a step, and whether the one-row kernel is on), round by round."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for _ in range(rounds):
            for name, (step, row_kernel) in cases.items():
                row_product.enabled = row_kernel
                times[name].append(median_ms(step, max(3, repeats // rounds)))
    finally:
        row_product.enabled = True
    return {name: statistics.median(t) for name, t in times.items()}


def routed(am: ak.AdaptedModel, names: list[str | None], step: Callable[[], object]) -> Callable[[], object]:
    """`step` with `names` routed to its rows."""
    def run() -> object:
        with am.route(names):
            return step()

    return run


def products(weights: list[torch.Tensor], product: Callable[..., torch.Tensor]) -> Callable[[], object]:
    rows = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights}

    @torch.inference_mode()
    def step() -> object:
        return [product(rows[w.shape[1]], w) for w in weights]

    return step


def captured(step: CapturedStep, am: ak.AdaptedModel, names: list[str | None]) -> Callable[[], object]:
    """A closure running the captured step (serve/captured.py) for rows with adapters `names` (one per
    row, None: the base) on CONTEXT tokens of keys and values, rewound after each step as
    `decode_step` crops its cache."""
    from transformers import DynamicCache

    vocab, rows = am.base.config.vocab_size, len(names)
    with torch.inference_mode():
        cache = DynamicCache()
        am.base(input_ids=torch.randint(3, vocab, (rows, CONTEXT)), use_cache=True, **{cache_keyword(am.base): cache})
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    mask = torch.ones((rows, CONTEXT), dtype=torch.long)
    slots = list(range(rows))

    @torch.inference_mode()
    def run() -> object:
        if step.column != CONTEXT + 1:
            step.load(layers, mask)
        for layer in step.cache.layers:  # back to CONTEXT tokens (transformers' StaticLayer counter)
            layer.cumulative_length.fill_(CONTEXT)
        step.column = CONTEXT
        return step.step([5] * rows, [CONTEXT] * rows, names, slots)

    return run


def tiny_steps(repeats: int) -> dict[str, float]:
    """The tiny Llama's decode step, eager with a growing cache against the Engine's captured step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    fast_linears(model)
    am = ak.AdaptedModel(model)
    eager = decode_step(am, 1)
    step = CapturedStep(am, 512, rank=16)
    step.build(list(range(3, 19)))
    return interleaved({"tiny_step_eager_ms": (eager, True),
                        "tiny_step_compiled_ms": (captured(step, am, [None]), True)}, repeats)


def main() -> None:
    import copy

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = model_156m()
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    total_bytes = sum(w.numel() * 4 for w in weights)
    with torch.inference_mode():
        out = {"read_weights_ms": median_ms(lambda: [w.sum() for w in weights], args.repeats),
               "linears_ms": median_ms(products(weights, F.linear), args.repeats)}
    out["hf_step_ms"] = median_ms(decode_step(model, 1), args.repeats)
    half = copy.deepcopy(model).to(torch.bfloat16)
    half_weights = [m.weight for m in half.modules() if isinstance(m, torch.nn.Linear)]
    with torch.inference_mode():
        out["read_weights_bf16_ms"] = median_ms(lambda: [w.sum() for w in half_weights], args.repeats)
    fast_linears(model)  # what the serving Engine does on the CPU: every step below runs them
    fast_linears(half)
    out.update(interleaved({
        "linears_onednn_ms": (products(weights, linear), False),
        "linears_row_kernel_ms": (products(weights, linear), True),
        "hf_step_onednn_ms": (decode_step(model, 1), False),
        "hf_step_row_kernel_ms": (decode_step(model, 1), True),
        "linears_bf16_ms": (products(half_weights, linear), False),
        "linears_bf16_row_kernel_ms": (products(half_weights, linear), True),
        "hf_step_bf16_ms": (decode_step(half, 1), False),
        "hf_step_bf16_row_kernel_ms": (decode_step(half, 1), True),
    }, args.repeats))
    am = ak.adapt(model)
    names = [f"a{i:02d}" for i in range(16)]
    for name in names:
        am.add(name, ak.LoRA(r=8, targets=TARGETS))
        with torch.no_grad():
            for p in am.adapter_parameters(name):
                p.add_(0.02 * torch.randn(p.shape))
    one, rows16 = decode_step(am, 1), decode_step(am, 16)  # (built with no route: the base fills the cache)
    step = CapturedStep(am, 512, rank=16)  # as the Engine builds it for this model (512 positions)
    step.build(list(range(300, 316)))
    out.update(interleaved({
        "adapted_step_ms": (routed(am, [None], one), True),
        "routed_lora_step_ms": (routed(am, names[:1], one), True),
        "captured_step_ms": (captured(step, am, [None]), True),
        "captured_lora_step_ms": (captured(step, am, names[:1]), True),
    }, args.repeats))
    step16 = CapturedStep(am, 512, rank=16, rows=16)  # the Engine's step of 16 rows
    step16.build(list(range(300, 316)))
    out.update(interleaved({
        "base_rows16_step_ms": (routed(am, [None] * 16, rows16), True),
        "routed_lora_rows16_step_ms": (routed(am, names, rows16), True),
        "captured_rows16_step_ms": (captured(step16, am, [None] * 16), True),
        "captured_lora_rows16_step_ms": (captured(step16, am, names), True),
    }, args.repeats // 2))
    out.update(tiny_steps(args.repeats * 4))
    summary = {k: round(v, 3 if k.startswith("tiny") else 2) for k, v in out.items()}
    summary.update({
        "weight_bytes": total_bytes,
        "read_weights_gb_s": round(total_bytes / out["read_weights_ms"] / 1e6, 1),
        "hf_step_vs_linears": round(out["hf_step_ms"] / out["linears_ms"], 3),
        "onednn_vs_default_hf_step": round(out["hf_step_onednn_ms"] / out["hf_step_ms"], 3),
        "row_kernel_vs_onednn_hf_step": round(out["hf_step_row_kernel_ms"] / out["hf_step_onednn_ms"], 3),
        "row_kernel_vs_default_bf16_hf_step": round(out["hf_step_bf16_row_kernel_ms"] / out["hf_step_bf16_ms"], 3),
        "read_weights_bf16_gb_s": round(total_bytes / 2 / out["read_weights_bf16_ms"] / 1e6, 1),
        "adapted_vs_hf_step": round(out["adapted_step_ms"] / out["hf_step_row_kernel_ms"], 3),
        "tiny_compiled_vs_eager_step": round(out["tiny_step_compiled_ms"] / out["tiny_step_eager_ms"], 3),
        "routed_lora_vs_adapted_step": round(out["routed_lora_step_ms"] / out["adapted_step_ms"], 3),
        "captured_vs_adapted_step": round(out["captured_step_ms"] / out["adapted_step_ms"], 3),
        "captured_lora_vs_routed_lora_step": round(out["captured_lora_step_ms"] / out["routed_lora_step_ms"], 3),
        "lora_share_rows16": round(1 - out["base_rows16_step_ms"] / out["routed_lora_rows16_step_ms"], 3),
        "captured_vs_routed_lora_rows16_step": round(out["captured_lora_rows16_step_ms"] / out["routed_lora_rows16_step_ms"], 3),
        "lora_share_captured_rows16": round(1 - out["base_rows16_step_ms"] / out["captured_lora_rows16_step_ms"], 3),
        "setup": {"model": "random Llama-like, hidden 1024, 8 layers, 16/4 heads, MLP 2816, vocab 32000, fp32",
                  "context": CONTEXT, "threads": args.threads, "torch": torch.__version__,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cpus"}})
    print(json.dumps(summary, indent=2))
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
