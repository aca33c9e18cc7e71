"""Text generation for causal-LM bases: one decoding loop for a batch of prompts, each row routed
to its own adapter at every step, with a shared KV cache.

Prompts are padded on the left, positions count only real tokens, and each row samples with its
own seeded generator (temperature 0: greedy), so a row's tokens do not depend on its neighbours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass

import torch

from ..errors import TargetError
from ..hf_names import cache_keyword, last_logits_only, output_cache
from ..model import AdaptedModel
from ..routes import RouteEntry
from .base import pad
from .errors import RowFailure, non_finite


@dataclass
class GenerationRow:
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    on_token: Callable[[int], None] | None = None
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens with this much probability
    ignore_eos: bool = False  # decode max_new_tokens whatever comes (as vLLM's ignore_eos, for benchmarks)


@dataclass
class Generated:
    tokens: list[int]
    finish_reason: str  # "stop" (end-of-sequence token) or "length"


@torch.inference_mode()
def generate_batch(
    am: AdaptedModel, rows: Sequence[GenerationRow], names: Sequence[RouteEntry], pad_id: int, eos_id: int | None,
    routing: Callable[[list[RouteEntry]], ContextManager] | None = None,
) -> list[Generated | RowFailure]:
    n = len(rows)
    input_ids, mask = pad([r.prompt for r in rows], pad_id, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [_generator(r.seed) for r in rows]
    tokens: list[list[int]] = [[] for _ in rows]
    finish = [""] * n
    extra = last_logits_only(am.base)
    keyword = cache_keyword(am.base)
    if keyword is None:
        raise TargetError(f"{type(am.base).__name__}.forward takes no key/value cache, so it cannot generate here")
    past = None
    with (routing or am.route)(list(names)):
        for _ in range(max(r.max_new_tokens for r in rows)):
            out = am(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                     **{keyword: past}, **extra)
            past = output_cache(out)
            logits = out.logits[:, -1, :].float().cpu()  # sampled on the CPU, with its generators
            finite = torch.isfinite(logits).all(dim=-1).tolist()
            chosen = []
            for i, row in enumerate(rows):
                if not (finish[i] or finite[i]):
                    finish[i] = "error"
                if finish[i]:
                    chosen.append(pad_id)
                    continue
                token = _sample(logits[i], row.temperature, generators[i], row.top_p)
                if eos_id is not None and token == eos_id and not row.ignore_eos:
                    finish[i] = "stop"
                else:
                    tokens[i].append(token)
                    if row.on_token is not None:
                        try:
                            row.on_token(token)
                        except Exception:  # noqa: BLE001 - a gone listener must not fail the other rows
                            row.on_token = None
                    if len(tokens[i]) >= row.max_new_tokens:
                        finish[i] = "length"
                chosen.append(token)
            if all(finish):
                break
            input_ids = torch.tensor(chosen, dtype=torch.long).unsqueeze(1)
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
    return [RowFailure(non_finite()) if f == "error" else Generated(t, f or "length")
            for t, f in zip(tokens, finish, strict=True)]


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator, top_p: float = 1.0) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen
