"""Continual-learning metrics from the accuracy matrix R, where R[i][j] is the accuracy on task j
after learning task i (j > i: before task j was learned).

    average accuracy  A = 1/T Σ_j R[T-1][j]
    backward transfer BWT = 1/(T-1) Σ_{j<T-1} (R[T-1][j] - R[j][j])        (Lopez-Paz & Ranzato 2017)
    forgetting        F = 1/(T-1) Σ_{j<T-1} max_{l<T-1} (R[l][j] - R[T-1][j])  (Chaudhry et al. 2018)
    forward transfer  FWT = 1/(T-1) Σ_{j>0} (R[j-1][j] - b_j)   b_j: accuracy on j of the untrained model
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def summarize(matrix: Sequence[Sequence[float | None]], untrained: Sequence[float] | None = None) -> dict[str, Any]:
    """A, BWT, forgetting and (when R above the diagonal and `untrained` are known) FWT."""
    r = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    t = r.shape[0]
    if r.shape != (t, t) or np.isnan(np.diag(r)).any() or np.isnan(r[-1]).any():
        raise ValueError("R must be square, with its diagonal and last row filled")
    out: dict[str, Any] = {"average_accuracy": float(r[-1].mean()), "bwt": None, "forgetting": None, "fwt": None}
    if t > 1:
        out["bwt"] = float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]))
        out["forgetting"] = float(np.mean([np.nanmax(r[: t - 1, j]) - r[-1, j] for j in range(t - 1)]))
        above = [r[j - 1, j] for j in range(1, t)]
        if untrained is not None and not np.isnan(above).any():
            out["fwt"] = float(np.mean([above[j - 1] - untrained[j] for j in range(1, t)]))
    return out


def plot_matrix(matrix: Sequence[Sequence[float | None]], tasks: Sequence[str], path: str | Path,
                title: str = "accuracy after each task") -> Path:
    """A heat map of R (rows: after learning task i; columns: evaluated on task j)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(tasks), 1.0 + 0.8 * len(tasks)))
    im = ax.imshow(r, vmin=0, vmax=1, cmap="viridis")
    for i in range(r.shape[0]):
        for j in range(r.shape[1]):
            if not np.isnan(r[i, j]):
                ax.text(j, i, f"{r[i, j]:.2f}", ha="center", va="center", color="w" if r[i, j] < 0.6 else "k", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks], fontsize=8)
    ax.set_xlabel("evaluated on")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
