"""Start the adapter's head where a linear probe ends, then train adapter and head together (LP-FT,
Kumar et al. 2022):

    W, b = argmin_W,b  CE(W·z + b, y) + ‖W‖²/(2C·n)      z: the head's input on the training split,
                                                          the adapter still the identity
The new head is otherwise random, and its first steps push noise back through the adapter while it
learns what the frozen features already say; started from the probe, training begins at the frozen
baseline's accuracy and the adapter spends its steps on what the probe cannot separate. C is picked
on validation accuracy (the most regularised among equals); the features are standardised for the
solver and the scaling folded back into W and b, so the head reads the raw features.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from ..model import AdaptedModel
from .data import make_loader
from .step import kept_modes

C_GRID = (0.1, 1.0, 10.0, 100.0)


def probed_linear(am: AdaptedModel, name: str) -> nn.Linear | None:
    """The last Linear of adapter `name`'s own head, the layer a probe can stand in for (None if it
    has no head, or its head is more than that Linear, e.g. RoBERTa's dense-tanh-projection)."""
    head = am.adapter(name).head
    if isinstance(head, nn.Linear):
        return head
    return None


@torch.no_grad()
def linear_inputs(model: nn.Module, linear: nn.Linear, data: Dataset,
                  collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(what `linear` reads, labels) over `data`, `model` in eval mode."""
    seen: list[torch.Tensor] = []
    handle = linear.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().float()))
    labels = []
    try:
        with kept_modes(model):
            model.eval()
            for batch in make_loader(data, collate, batch_size):
                labels.append(batch.pop("labels").numpy())
                model(**batch)
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"the model never called {linear}: it is not the head of this model")
    return torch.cat(seen).numpy(), np.concatenate(labels)


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              num_labels: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(weight [num_labels, features], bias [num_labels], facts) of the best multinomial probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    z_train, z_val = scaler.transform(x_train), scaler.transform(x_val)
    fits = {c: LogisticRegression(C=c, max_iter=2000).fit(z_train, y_train) for c in C_GRID}
    scores = {c: float(fit.score(z_val, y_val)) for c, fit in fits.items()}
    best = max(C_GRID, key=lambda c: scores[c])
    fit = fits[best]
    coef, intercept = fit.coef_, fit.intercept_
    if coef.shape[0] == 1:  # two classes: sklearn keeps one row, the logit of class 1 against class 0
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((num_labels, x_train.shape[1]))
    bias = np.full(num_labels, -1e4 if len(fit.classes_) < num_labels else 0.0)  # a class never seen: never
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    weight[fit.classes_] = coef / scale
    bias[fit.classes_] = intercept - (coef / scale) @ scaler.mean_
    return weight, bias, {"probe_C": best, "probe_val_accuracy": scores[best]}


def probe_linear(model: nn.Module, linear: nn.Linear, train: Dataset, validation: Dataset,
                 collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> dict[str, float]:
    """Set `linear` (the model's last layer) to the linear probe of what it reads; {} with one class."""
    x_train, y_train = linear_inputs(model, linear, train, collate)
    x_val, y_val = linear_inputs(model, linear, validation, collate) if len(validation) else (x_train, y_train)
    if len(np.unique(y_train)) < 2:
        return {}
    weight, bias, facts = fit_probe(x_train, y_train, x_val, y_val, linear.out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weight, dtype=linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_(torch.as_tensor(bias, dtype=linear.bias.dtype))
    return facts


def probe_head(am: AdaptedModel, name: str, train: Dataset, validation: Dataset,
               collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> dict[str, float]:
    """Set adapter `name`'s head to the linear probe of its frozen inputs; {} when it has no Linear head."""
    linear = probed_linear(am, name)
    if linear is None or not len(train):
        return {}
    previous = am.active
    am.activate(name)
    try:
        return probe_linear(am, linear, train, validation, collate)
    finally:
        am.activate(previous)
