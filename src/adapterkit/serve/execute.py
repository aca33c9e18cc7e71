"""What the model thread runs for one batch: each row routed to its adapter, its mixture or the base,
and each row's answer (or its own failure) read from the outputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..hf_names import last_logits_only
from ..model import AdaptedModel
from ..routes import RouteEntry
from ..task import Task
from .base import length_groups, pad
from .batcher import Items, Request, RequestKind
from .cache import AdapterCache, AdapterKey, Resident
from .errors import BadRequest, NotFound, RowFailure, Unmixable, non_finite
from .generate import GenerationRow, generate_batch


class BatchRunner:
    def __init__(self, am: AdaptedModel, cache: AdapterCache, task: Task, pad_id: int, eos_id: int | None,
                 padding_cost: int, base_labels: list[str] | None,
                 routing: Callable[[Sequence[RouteEntry]], AbstractContextManager]) -> None:
        self.am, self.cache, self.task = am, cache, task
        self.pad_id, self.eos_id, self.padding_cost = pad_id, eos_id, padding_cost
        self.base_labels, self.routing = base_labels, routing

    def names(self, items: Items) -> list[RouteEntry]:
        return [self.name(req) for req, _ in items]

    def name(self, req: Request) -> RouteEntry:
        """The model's name(s) of a request's adapter, or its mixture as {internal name: weight}."""
        if req.mixture is not None:
            self.labels(req)  # Unmixable before the forward: the batch runs again without this request
            return {self.entry(k).internal: w for k, w in req.mixture}
        return self.entry(req.key).internal if req.key is not None else None

    def entry(self, key: AdapterKey) -> Resident:
        entry = self.cache.get(key)
        if entry is None:  # cannot happen: queued rows pin their adapters
            raise NotFound(f"adapter {key.name!r} is no longer loaded")
        return entry

    def describe(self, item: tuple[Request, int]) -> tuple[GenerationRow, RouteEntry]:
        return item[0].options["row"], self.name(item[0])

    def execute(self, kind: str, items: Items) -> list[Any]:
        names = self.names(items)
        if kind == "generate":
            rows = [req.options["row"] for req, _ in items]
            return generate_batch(self.am, rows, names, self.pad_id, self.eos_id, self.routing)
        results: list[Any] = [None] * len(items)
        for group in length_groups([len(req.rows[i]) for req, i in items], self.padding_cost):
            part = self.encode([items[k] for k in group], [names[k] for k in group])
            for k, result in zip(group, part, strict=True):
                results[k] = result
        return results

    def encode(self, items: Items, names: list[RouteEntry]) -> list[Any]:
        """One forward of classify/embed rows, each routed to its own adapter."""
        input_ids, mask = pad([req.rows[i] for req, i in items], self.pad_id)
        embed = any(req.kind == RequestKind.EMBED for req, _ in items)
        extra = last_logits_only(self.am.base) if self.task == Task.CAUSAL_LM else {}
        with torch.inference_mode(), self.routing(names):
            out = self.am(input_ids=input_ids, attention_mask=mask, output_hidden_states=embed, **extra)
        finite = [True] * len(items)
        if embed:
            hidden = out.hidden_states[-1].float()
            weights = mask.unsqueeze(-1).to(hidden.device, hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            finite = [a and b for a, b in zip(finite, torch.isfinite(pooled).all(-1).tolist(), strict=True)]
        if any(req.kind == RequestKind.CLASSIFY for req, _ in items):
            logits_ok = torch.isfinite(out.logits.flatten(1)).all(-1).tolist()
            finite = [a and b for a, b in zip(finite, logits_ok, strict=True)]
        results: list[Any] = []
        for j, (req, _) in enumerate(items):
            if not finite[j]:  # this row's adapter overflowed: its request fails, its neighbours answer
                results.append(RowFailure(non_finite()))
            elif req.kind == RequestKind.EMBED:
                vector = pooled[j]
                if req.options.get("normalize"):
                    vector = torch.nn.functional.normalize(vector, dim=-1)
                results.append(vector.tolist())
            else:
                try:
                    results.append(self.label(out.logits[j].float(), req))
                except Unmixable as err:
                    results.append(RowFailure(err))
        return results

    def labels(self, req: Request) -> list[str] | None:
        """The labels a request's scores are named by: its adapter's, else the base's; a mixture's
        adapters must share one label set (Unmixable)."""
        keys = req.keys
        sets = {tuple(self.entry(k).labels or self.base_labels or ()) for k in keys}
        if len(sets) > 1:
            raise Unmixable(f"the adapters of this mixture ({', '.join(k.name for k in keys)}) have different label "
                            "sets; a mixture of classifiers needs one", param="adapters")
        labels = list(sets.pop()) if sets else self.base_labels
        return labels or None

    def label(self, logits: torch.Tensor, req: Request) -> dict[str, Any]:
        labels = self.labels(req)
        if labels is None:  # only a classifier base has labels, and only such a base takes classify requests
            raise BadRequest(f"this server's base is a {self.task} model: it has no labels to classify with")
        probs = torch.softmax(logits[: len(labels)], dim=-1).tolist()
        best = max(range(len(labels)), key=probs.__getitem__)
        return {"label": labels[best], "scores": dict(zip(labels, probs, strict=True))}
