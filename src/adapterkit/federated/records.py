"""What travels: one participant's trainable tensors as a Flower ArrayRecord, and the checks on a reply.

A *participant* is the model one side holds (server or client) plus the tensors that travel, by
name. For an adapter these are its trainable parameters (and its head's), under the keys its file
uses (`sites.<module>.lora_B`, `head.weight`); the frozen base never moves. FFA-LoRA keeps every
`lora_A` frozen at a seeded initialisation, so A stays out of the record too. Full-model FedAvg
(the baseline) sends every parameter.

The fingerprint covers what both sides must share but never send: the frozen base's names, shapes
and dtypes, and the values of the adapter's frozen tensors (FFA's A). A reply made on another base
fails the check instead of being averaged in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from ..adapter import tensor_fingerprint
from ..model import AdaptedModel

#: the adapter's name on every participant
ADAPTER = "federated"


@dataclass
class Participant:
    model: nn.Module  # what the forward runs: an AdaptedModel, or the plain model for full FedAvg
    params: dict[str, nn.Parameter]  # key -> the parameter it names; these travel
    fingerprint: str

    def arrays(self) -> ArrayRecord:
        return ArrayRecord({k: Array(p.detach().cpu().numpy().copy()) for k, p in self.params.items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def load(self, record: ArrayRecord) -> None:
        """Copy a checked record into the travelling parameters (every key must be there)."""
        problem = check_arrays(record, self.template())
        if problem:
            raise ValueError(f"arrays do not fit this participant: {problem}")
        for key, p in self.params.items():
            p.copy_(torch.from_numpy(np.asarray(record[key].numpy())).to(p.dtype))

    def template(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {k: (tuple(p.shape), str(p.dtype).removeprefix("torch.")) for k, p in self.params.items()}

    def count_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params.values())


def adapter_participant(am: AdaptedModel, *, freeze_lora_a: bool = False) -> Participant:
    """The adapter `ADAPTER` of `am`, trainable, with its travelling parameters (FFA: A frozen)."""
    am.train_adapter(ADAPTER)
    record = am.adapter(ADAPTER)
    params: dict[str, nn.Parameter] = {}
    frozen: dict[str, torch.Tensor] = {}
    for prefix, module in record.parts():
        for key, p in module.named_parameters():
            if freeze_lora_a and key.rsplit(".", 1)[-1] == "lora_A":
                p.requires_grad_(False)
            if p.requires_grad:
                params[f"{prefix}.{key}"] = p
            else:
                frozen[f"{prefix}.{key}"] = p.detach()
    if not params:
        raise ValueError(f"adapter {ADAPTER!r} has no trainable tensors to federate")
    return Participant(am, params, _fingerprint(am.fingerprint(), frozen))


def full_participant(model: nn.Module) -> Participant:
    """Every parameter of a plain model trains and travels (full-model FedAvg)."""
    for p in model.parameters():
        p.requires_grad_(True)
    params = dict(model.named_parameters())
    shapes = hashlib.sha256("".join(f"{k}:{tuple(p.shape)};" for k, p in params.items()).encode()).hexdigest()[:16]
    return Participant(model, params, _fingerprint(shapes, {}))


def _fingerprint(base: str, frozen: dict[str, torch.Tensor]) -> str:
    return f"{base}-{tensor_fingerprint(frozen)}" if frozen else base


def check_arrays(record: ArrayRecord, template: dict[str, tuple[tuple[int, ...], str]]) -> str | None:
    """None when `record` holds exactly the template's tensors, each of its shape and finite;
    otherwise the first reason it does not, in words."""
    keys = set(record.keys())
    missing, unexpected = sorted(set(template) - keys), sorted(keys - set(template))
    if missing or unexpected:
        return f"tensor names differ: missing {missing[:3]}, unexpected {unexpected[:3]}"
    for key, (shape, _dtype) in template.items():
        array = record[key]
        if tuple(array.shape) != shape:
            return f"{key} has shape {tuple(array.shape)}, expected {shape}"
        values = array.numpy()
        if not np.issubdtype(values.dtype, np.floating):
            return f"{key} has dtype {values.dtype}, expected a float"
        if not np.isfinite(values).all():
            return f"{key} holds non-finite values"
    return None

