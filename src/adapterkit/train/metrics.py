"""Classification metrics over label ids or names (thin, validated wrappers around sklearn)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, f1_score


def _as_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensors, possibly on GPU
        values = values.detach().cpu().numpy()
    return np.asarray(values).reshape(-1)


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = _as_array(y_true), _as_array(y_pred)
    if len(t) != len(p):
        raise ValueError(f"y_true has {len(t)} items but y_pred has {len(p)}")
    if len(t) == 0:
        raise ValueError("cannot compute a metric on zero examples")
    return t, p


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of exact matches."""
    t, p = _pair(y_true, y_pred)
    return float(accuracy_score(t, p))


def macro_f1(y_true: Any, y_pred: Any, labels: Sequence[Any] | None = None) -> float:
    """Unweighted mean of per-class F1.

    Pass ``labels`` (e.g. ``range(num_labels)``) so that a class absent from a small eval batch still
    counts (as F1 0) instead of silently dropping out of the mean.
    """
    t, p = _pair(y_true, y_pred)
    return float(
        f1_score(t, p, labels=None if labels is None else list(labels), average="macro", zero_division=0)
    )


def classification_report_dict(y_true: Any, y_pred: Any, labels: Sequence[str]) -> dict[str, Any]:
    """sklearn's report as a dict keyed by label name (plus accuracy, macro avg, weighted avg).

    ``y_true``/``y_pred`` may be integer ids into ``labels`` or the label names themselves.
    """
    t, p = _pair(y_true, y_pred)
    names = [str(n) for n in labels]
    ids: list[int] | list[str]
    if np.issubdtype(t.dtype, np.integer) and np.issubdtype(p.dtype, np.integer):
        ids = list(range(len(names)))
    else:
        ids = names
        t, p = t.astype(str), p.astype(str)
    report = classification_report(t, p, labels=ids, target_names=names, output_dict=True, zero_division=0)
    # With every class listed sklearn reports "micro avg" instead of "accuracy" when some
    # prediction falls outside `labels`; always expose plain accuracy under one key.
    report["accuracy"] = float(np.mean(t == p))
    report.pop("micro avg", None)
    return report
