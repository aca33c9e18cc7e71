"""Where one decode step's time goes on the CPU: the floor under bench/serve_generate.py --vs-llamacpp.

    python bench/decode_floor.py            # about 2 minutes on 2 CPU cores

On the 156M Llama-like model of that bench (random weights, fp32), one token for one stream at a
context of 96 tokens, median of many steps, 2 threads:
- `read_weights_ms`: summing every weight matrix once (what a memory-bound step cannot beat);
- `linears_ms`: F.linear of one row through every weight matrix, one after another (the matrix
  products alone, no attention, no Python model code);
- `hf_step_ms`: transformers' own forward of one token with its key/value cache (no adapterkit);
- `linears_onednn_ms`, `hf_step_onednn_ms`: the same two with the Linear layers through oneDNN
  (methods/kernels.fast_linears, as the serving Engine runs them on the CPU); the rest below too;
- `adapted_step_ms`: that step through an AdaptedModel with no adapter active;
- `routed_lora_step_ms` / `routed_lora_rows16_step_ms`: one LoRA (r=8, every projection) routed to the
  row, and 16 rows each with its own LoRA.
Ratios against `linears_ms` say how much of a step is the model's code around the products.

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
from adapterkit.methods.kernels import fast_linears, linear  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = model_156m()
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    row = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    total_bytes = sum(w.numel() * 4 for w in weights)
    with torch.inference_mode():
        out = {"read_weights_ms": median_ms(lambda: [w.sum() for w in weights], args.repeats),
               "linears_ms": median_ms(lambda: [F.linear(row[w.shape[1]], w) for w in weights], args.repeats)}
    out["hf_step_ms"] = median_ms(decode_step(model, 1), args.repeats)
    fast_linears(model)  # what the serving Engine does on the CPU: every step below runs them
    with torch.inference_mode():
        out["linears_onednn_ms"] = median_ms(lambda: [linear(row[w.shape[1]], w) for w in weights], args.repeats)
    out["hf_step_onednn_ms"] = median_ms(decode_step(model, 1), args.repeats)
    am = ak.adapt(model)
    out["adapted_step_ms"] = median_ms(decode_step(am, 1), args.repeats)
    names = [f"a{i:02d}" for i in range(16)]
    for name in names:
        am.add(name, ak.LoRA(r=8, targets=TARGETS))
        with torch.no_grad():
            for p in am.adapter_parameters(name):
                p.add_(0.02 * torch.randn(p.shape))
    with am.route(names[:1]):
        out["routed_lora_step_ms"] = median_ms(decode_step(am, 1), args.repeats)
    with am.route(names):
        out["routed_lora_rows16_step_ms"] = median_ms(decode_step(am, 16), args.repeats // 2)
    with am.route([None] * 16):
        out["base_rows16_step_ms"] = median_ms(decode_step(am, 16), args.repeats // 2)
    summary = {k: round(v, 2) for k, v in out.items()}
    summary.update({
        "weight_bytes": total_bytes,
        "read_weights_gb_s": round(total_bytes / out["read_weights_ms"] / 1e6, 1),
        "hf_step_vs_linears": round(out["hf_step_ms"] / out["linears_ms"], 3),
        "onednn_vs_default_hf_step": round(out["hf_step_onednn_ms"] / out["hf_step_ms"], 3),
        "adapted_vs_hf_step": round(out["adapted_step_ms"] / out["hf_step_onednn_ms"], 3),
        "routed_lora_vs_adapted_step": round(out["routed_lora_step_ms"] / out["adapted_step_ms"], 3),
        "lora_share_rows16": round(1 - out["base_rows16_step_ms"] / out["routed_lora_rows16_step_ms"], 3),
        "setup": {"model": "random Llama-like, hidden 1024, 8 layers, 16/4 heads, MLP 2816, vocab 32000, fp32",
                  "context": CONTEXT, "threads": args.threads, "torch": torch.__version__,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cpus"}})
    print(json.dumps(summary, indent=2))
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
