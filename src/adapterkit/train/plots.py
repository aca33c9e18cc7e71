"""Training-curve figure: loss per step (left) and validation accuracy per epoch (right)."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The object-oriented Figure + Agg canvas never touches pyplot's global backend or figure registry,
# so plotting is safe from worker threads and leaks no figures.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_LOSS_KEYS = ("train_loss", "loss")
_ACC_KEYS = ("val_accuracy", "val_acc", "eval_accuracy")


def _series(history: Mapping[str, Any], keys: Sequence[str], x_key: str | None) -> tuple[list, list]:
    """Points from a list of values (x = 1, 2, ...; or ``history[x_key]``) or of (x, y) pairs."""
    values: list[Any] = list(next((history[k] for k in keys if k in history and history[k] is not None), []))
    if values and isinstance(values[0], (tuple, list)):
        xs, ys = [v[0] for v in values], [v[1] for v in values]
    else:
        ys = values
        given = history.get(x_key) if x_key else None
        given = list(given) if isinstance(given, Sequence) and not isinstance(given, str) else []
        xs = given if len(given) == len(ys) else list(range(1, len(ys) + 1))
    keep = [(x, float(y)) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(float(y))]
    return [x for x, _ in keep], [y for _, y in keep]


def _running_mean(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_curves(history: Mapping[str, Any], path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Write a two-panel PNG (or any format matplotlib knows from the suffix) and return its path.

    ``history["train_loss"]``: per-step losses (steps taken from ``history["train_step"]`` if the same
    length, else 1..n) or (step, loss) pairs. ``history["val_accuracy"]``: per-epoch accuracies (epochs from
    ``history["val_epoch"]`` if given) or (epoch, accuracy) pairs. Missing/empty series draw a "no ... recorded" placeholder.
    The file is replaced atomically so a reader never sees a half-written image.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = curves_figure(history, title)
    fmt = out.suffix.lstrip(".").lower() or "png"
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format=fmt, dpi=120)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the plot is meant to be shared
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out


def curves_figure(history: Mapping[str, Any], title: str | None = None) -> Figure:
    """The two panels `plot_curves` writes: loss per step, validation accuracy per (whole) epoch."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)

    steps, losses = _series(history, _LOSS_KEYS, "train_step")
    if losses:
        ax_loss.plot(steps, losses, color="tab:blue", linewidth=1, label="per step")
        if len(losses) >= 20:  # raw per-step loss is noisy; a running mean shows the trend
            window = max(5, len(losses) // 20)
            ax_loss.plot(
                steps,
                _running_mean(losses, window),
                color="tab:orange",
                linewidth=2,
                label=f"mean of {window}",
            )
            ax_loss.legend(loc="upper right")
    else:
        _empty(ax_loss, "training loss")
    ax_loss.set_title("Training loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(True, alpha=0.3)

    epochs, accs = _series(history, _ACC_KEYS, "val_epoch")
    if accs:
        ax_acc.plot(epochs, accs, marker="o", color="tab:green")
        ax_acc.set_ylim(0, 1.02 if max(accs) <= 1 else None)
    else:
        _empty(ax_acc, "validation accuracy")
    ax_acc.set_title("Validation accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.25 ticks
    ax_acc.set_ylabel("accuracy")
    ax_acc.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig
