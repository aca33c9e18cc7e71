"""What an adapter is worth: the two baselines a user could have had without training one.

- the majority class of the training split, scored on the test split;
- the frozen base's sentence embeddings (last hidden state, mean over the real tokens) and
  scikit-learn's LogisticRegression, its C chosen on the validation split: ten lines a user could
  write instead of training an adapter.
Both are computed on the same splits the adapter saw, in the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from ..model import AdaptedModel
from ..pooling import Pooling
from .data import make_loader
from .probe import fit_probe
from .step import kept_modes

MEAN = Pooling("mean")  # the baseline a user would write: the masked mean, not normalised


def majority_accuracy(train_labels: list[int], test_labels: list[int]) -> float:
    """Accuracy on `test_labels` of always answering the training split's most frequent class."""
    if not train_labels or not test_labels:
        raise ValueError("majority accuracy needs labelled training and test rows")
    majority = int(np.bincount(np.asarray(train_labels)).argmax())
    return float(np.mean(np.asarray(test_labels) == majority))


@torch.no_grad()
def mean_embeddings(am: AdaptedModel, data: Dataset, collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
                    batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, labels): the frozen base's last hidden state, mean-pooled over the attention mask,
    with no adapter active (the adapter that was active is active again afterwards)."""
    previous = am.active
    features, labels = [], []
    with kept_modes(am):
        am.activate(None)
        am.eval()
        try:
            for batch in make_loader(data, collate, batch_size):
                labels.append(batch.pop("labels").numpy())
                hidden = _last_hidden(am.base, batch)
                features.append(MEAN(hidden, batch["attention_mask"]).float().numpy())
        finally:
            am.activate(previous)
    return np.concatenate(features), np.concatenate(labels)


def _last_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch, output_hidden_states=True)
    hidden_states = out.hidden_states
    if not hidden_states:
        raise ValueError(f"{type(model).__name__} returns no hidden states to pool for the embedding baseline")
    return hidden_states[-1]


def embed_logreg_accuracy(am: AdaptedModel, train: Dataset, validation: Dataset, test: Dataset,
                          collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> dict[str, float]:
    """Test accuracy of LogisticRegression on the frozen mean-pooled embeddings, C picked on validation
    (the training split when there is no validation split)."""
    x_train, y_train = mean_embeddings(am, train, collate)
    x_val, y_val = mean_embeddings(am, validation, collate) if len(validation) else (x_train, y_train)
    x_test, y_test = mean_embeddings(am, test, collate)
    classes = int(max(y_train.max(), y_test.max())) + 1
    weight, bias, facts = fit_probe(x_train, y_train, x_val, y_val, classes)  # the head's probe, on embeddings
    accuracy = float(np.mean((x_test @ weight.T + bias).argmax(1) == y_test))
    return {"embed_logreg_accuracy": accuracy, "embed_logreg_C": facts["probe_C"]}
