"""Server-side aggregation of the clients' travelling tensors.

`fedavg` is FedAvg weighted by examples: x = Σ_i w_i x_i, w_i = n_i / Σ n. Bottleneck, IA³,
BitFit, heads and FFA-LoRA's B are linear in what they add, so their average is the average update.

LoRA is not: the update a client learns is ΔW_i = s·B_i A_i, and the mean of the factors is not the
factor of the mean, (Σ w_i B_i)(Σ w_i A_i) ≠ Σ w_i B_i A_i. Two exact ways out:

- **FFA-LoRA** (Sun et al. 2024): A is frozen at a seeded initialisation shared by all; only B
  trains and travels, and Σ w_i B_i A = (Σ w_i B_i) A exactly (records.py freezes A).
- **`svd`**: average the products, ΔW = Σ w_i B_i A_i, then re-factor ΔW into a rank-r pair by
  truncated SVD (B = U_r √S_r, A = √S_r V_rᵀ). It is exact whenever ΔW has rank ≤ r; what it drops
  beyond rank r is reported as `refactor_error` (relative Frobenius norm).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("fedavg", "ffa", "svd")


def fedavg(tensors: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_i w_i x_i per key, the weights normalised to sum to one."""
    if not tensors or len(tensors) != len(weights):
        raise ValueError(f"fedavg needs one weight per reply, got {len(tensors)} replies and {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"fedavg needs a positive total weight, got {total}")
    out = {}
    for key in tensors[0]:
        acc = torch.zeros_like(tensors[0][key], dtype=torch.float64)
        for t, w in zip(tensors, weights, strict=True):
            acc += t[key].double() * (w / total)
        out[key] = acc.to(tensors[0][key].dtype)
    return out


def lora_pairs(keys: list[str]) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA site among `keys`."""
    return [(k, k[: -len("lora_A")] + "lora_B") for k in keys
            if k.endswith(".lora_A") and k[: -len("lora_A")] + "lora_B" in keys]


def _matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # conv LoRA: A [r, in, *k], B [out, r, 1...]; the product acts on the flattened kernel
    return b.reshape(b.shape[0], b.shape[1]).double() @ a.reshape(a.shape[0], -1).double()


def _mean_product(tensors: list[dict[str, torch.Tensor]], weights: list[float], ka: str, kb: str) -> torch.Tensor:
    total = float(sum(weights))
    # a float64 zero start (not the int 0) keeps the sum a Tensor; 0 + x is x either way
    start = torch.zeros((), dtype=torch.float64)
    return sum((_matrix(t[ka], t[kb]) * (w / total) for t, w in zip(tensors, weights, strict=True)), start)


def product_error(out: dict[str, torch.Tensor], tensors: list[dict[str, torch.Tensor]], weights: list[float]) -> float:
    """The worst relative distance, over LoRA sites, of the aggregate's B·A from the mean of B_i·A_i."""
    worst = 0.0
    for ka, kb in lora_pairs(list(tensors[0])):
        target = _mean_product(tensors, weights, ka, kb)
        worst = max(worst, float((_matrix(out[ka], out[kb]) - target).norm()) / (float(target.norm()) or 1.0))
    return worst


def svd_refactor(tensors: list[dict[str, torch.Tensor]], weights: list[float]
                 ) -> tuple[dict[str, torch.Tensor], float, float]:
    """FedAvg for every key but LoRA pairs, which average their products and re-factor them.

    Returns the tensors, the worst relative error of the re-factored product, and (for comparison)
    the worst relative error plain FedAvg's (mean B)(mean A) makes on the same replies."""
    out = fedavg(tensors, weights)
    fedavg_error = product_error(out, tensors, weights)
    refactor_error = 0.0
    for ka, kb in lora_pairs(list(tensors[0])):
        target = _mean_product(tensors, weights, ka, kb)
        norm = float(target.norm()) or 1.0
        r = tensors[0][ka].shape[0]
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        root = s[:r].sqrt()
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        refactor_error = max(refactor_error, float((b @ a - target).norm()) / norm)
        a_shape, b_shape = tensors[0][ka].shape, tensors[0][kb].shape
        out[ka] = a.reshape(a_shape).to(tensors[0][ka].dtype)
        out[kb] = b.reshape(b_shape).to(tensors[0][kb].dtype)
    return out, refactor_error, fedavg_error


def aggregate(rule: str, tensors: list[dict[str, torch.Tensor]], weights: list[float]
              ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The aggregate under `rule` and what it measured about itself."""
    if rule in ("fedavg", "ffa"):
        out = fedavg(tensors, weights)
        if not lora_pairs(list(tensors[0])):
            return out, {}
        return out, {"product_error": product_error(out, tensors, weights)}
    if rule == "svd":
        out, refactor_error, fedavg_error = svd_refactor(tensors, weights)
        return out, {"product_error": refactor_error, "fedavg_product_error": fedavg_error}
    raise ValueError(f"unknown aggregation {rule!r}; use one of {', '.join(AGGREGATIONS)}")
