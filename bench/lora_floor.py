"""How cheap can unmerged LoRA be here? adapterkit's LoRA against plain-PyTorch floors.

    python bench/lora_floor.py              # about 3 minutes on 2 idle CPU cores
    python bench/lora_floor.py --rounds 40

The same model, batch and adapter as bench/overhead.py's LoRA case (bundled MiniLM, batch 32 x 128,
LoRA r=8 on all 36 Linear layers, random nonzero B), measured in one process in interleaved
rounds, each as a ratio to the base model alone:

  * adapterkit: the library as a user runs it (hooks on the frozen modules);
  * plain: no adapterkit at all. Each Linear's forward is replaced by a function that computes
    F.linear(x, W, b) + s·B(A x) with the same calls adapterkit makes (oneDNN for A x, one addmm_
    into the output), so the difference to `adapterkit` is everything the library adds;
  * plain-fused: the cheapest form found with PyTorch's own ops: x Wᵀ without the bias, then one
    addmm_ of [A x | 1] · [s·Bᵀ ; b], which adds the bias and the update in the same pass over
    the output, so the output is written as often as the base Linear writes it.

It also prints the two numbers that bound any implementation built from library GEMM calls: the
LoRA products' share of the forward's floating-point work, and the extra bytes they move (A x reads
every Linear's input once more; adding B(A x) reads and writes its output once more, unless it is
folded into the bias pass as plain-fused does).

Writes bench/results/lora_floor.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/overhead.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import inference, load_base, make_batch, measure, paired_ratio, randomize_lora_b  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.methods.kernels import down_project  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "lora_floor.json"
RANK, ALPHA = 8, 16


def adapted_linears(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers that "all-linear" adapts: every one in the encoder (not pooler or head)."""
    return [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder." in f".{n}"]


def plain_lora(base: nn.Module, fused: bool, seed: int) -> nn.Module:
    """A copy of `base` whose adapted Linears compute LoRA in their own forward, without adapterkit."""
    model = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    scale = ALPHA / RANK
    for linear in adapted_linears(model):
        d_out, d_in = linear.weight.shape
        lora_a = torch.randn(RANK, d_in, generator=gen) / d_in**0.5
        scaled_b_t = torch.randn(d_out, RANK, generator=gen).T.contiguous() * 0.02 * scale
        if fused:
            b_and_bias = torch.cat([scaled_b_t, linear.bias[None].detach()]).contiguous()
            linear.forward = _fused_forward(linear.weight, lora_a, b_and_bias)
        else:
            linear.forward = _plain_forward(linear.weight, linear.bias, lora_a, scaled_b_t)
    return model


def _plain_forward(weight, bias, lora_a, scaled_b_t):
    def forward(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2, weight, bias)
        return out.addmm_(down_project(x2, lora_a), scaled_b_t).view(*x.shape[:-1], -1)

    return forward


def _fused_forward(weight, lora_a, b_and_bias):
    def forward(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        low = down_project(x2, lora_a)
        low_and_one = torch.cat([low, low.new_ones(low.shape[0], 1)], dim=1)
        out = torch.mm(x2, weight.T)
        return out.addmm_(low_and_one, b_and_bias).view(*x.shape[:-1], -1)

    return forward


def work_and_traffic(base: nn.Module, rows: int, tokens: int) -> dict[str, float]:
    """The LoRA products' share of the forward's multiply-adds, and the bytes they move, from shapes."""
    tokens_total = rows * tokens
    cfg = base.config
    linear_macs = sum(m.weight.numel() for m in adapted_linears(base)) * tokens_total
    # attention scores and weighted values: 2 · T² · hidden per sequence and layer
    attention_macs = 2 * rows * tokens * tokens * cfg.hidden_size * cfg.num_hidden_layers
    lora_macs = sum(RANK * sum(m.weight.shape) for m in adapted_linears(base)) * tokens_total
    # float32: A x reads the input once more; a separate add of B(A x) reads and writes the output
    reads_input = 4 * tokens_total * sum(m.weight.shape[1] for m in adapted_linears(base))
    rewrites_output = 8 * tokens_total * sum(m.weight.shape[0] for m in adapted_linears(base))
    return {
        "lora_share_of_multiply_adds": lora_macs / (linear_macs + attention_macs),
        "extra_MB_per_forward": (reads_input + rewrites_output) / 1e6,
        "extra_MB_per_forward_fused": reads_input / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    base = load_base()
    batch = make_batch(base, 32, 128, seed=0)

    adapted = ak.adapt(copy.deepcopy(base))
    adapted.add("l", ak.LoRA(r=RANK, alpha=ALPHA, targets="all-linear"))
    randomize_lora_b([(n, p) for n, p in adapted.named_parameters() if n.endswith("lora_B")], seed=1)
    adapted.activate("l")
    if len(adapted.sites) != len(adapted_linears(base)):
        raise SystemExit("the plain floors would adapt other layers than adapterkit does")
    models = {
        "base": base,
        "adapterkit": adapted.eval(),
        "plain": plain_lora(base, fused=False, seed=1).eval(),
        "plain_fused": plain_lora(base, fused=True, seed=1).eval(),
    }
    with torch.no_grad():  # the floors compute what they claim: same outputs as an unfused LoRA
        ref = plain_lora(base, fused=False, seed=1)(**batch).logits
        torch.testing.assert_close(models["plain_fused"](**batch).logits, ref, rtol=1e-4, atol=1e-4)

    import time

    cases = {name: inference(model, batch) for name, model in models.items()}
    times = measure(cases, args.rounds, warmup=2, seed=0, deadline=time.monotonic() + 60 * args.max_minutes)
    bounds = work_and_traffic(base, 32, 128)
    result = {
        name: {
            "ratio": paired_ratio(t["wall"], times["base"]["wall"]),
            "median_ms": 1e3 * statistics.median(t["wall"]),
        }
        for name, t in times.items()
    }
    result["bounds"] = bounds
    result["settings"] = {
        "rounds": len(times["base"]["wall"]),
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print("\n| LoRA r=8 on 36 Linears, unmerged | median ms | ratio to base |\n|---|---:|---:|")
    for name in models:
        print(f"| {name} | {result[name]['median_ms']:.0f} | {result[name]['ratio']:.3f} |")
    print(
        f"\nLoRA products: {100 * bounds['lora_share_of_multiply_adds']:.1f}% of the forward's multiply-adds; "
        f"they move {bounds['extra_MB_per_forward']:.0f} MB more per forward "
        f"({bounds['extra_MB_per_forward_fused']:.0f} MB when fused into the bias pass). Wrote {args.out}"
    )


if __name__ == "__main__":
    main()
