"""The head's start as a linear probe: the same decisions as scikit-learn's LogisticRegression."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

import adapterkit as ak
from adapterkit.train.probe import fit_probe, probe_head


def _features(classes: int, rows: int = 120, width: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % classes
    centres = rng.normal(size=(classes, width)) * 3
    x = centres[y] + rng.normal(size=(rows, width)) * 2 + 5  # off-centre and unscaled, as embeddings are
    return x, y


@pytest.mark.parametrize("classes", [2, 4])
def test_the_probe_reads_raw_features_as_sklearn_reads_standardised_ones(classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = _features(classes)
    weight, bias, facts = fit_probe(x[:80], y[:80], x[80:], y[80:], classes)
    scaler = StandardScaler().fit(x[:80])
    reference = LogisticRegression(C=facts["probe_C"], max_iter=2000).fit(scaler.transform(x[:80]), y[:80])
    ours = x @ weight.T + bias
    assert (ours.argmax(1) == reference.predict(scaler.transform(x))).all()
    if classes > 2:  # multinomial: the logits themselves
        np.testing.assert_allclose(ours, reference.decision_function(scaler.transform(x)), rtol=1e-6, atol=1e-6)
    else:  # one decision, split evenly between the two logits
        np.testing.assert_allclose(ours[:, 1] - ours[:, 0], reference.decision_function(scaler.transform(x)),
                                   rtol=1e-6, atol=1e-6)
    assert facts["probe_val_accuracy"] == reference.score(scaler.transform(x[80:]), y[80:])


def test_a_class_missing_from_training_is_never_predicted():
    x, y = _features(3)
    kept = y < 2
    weight, bias, _ = fit_probe(x[kept], y[kept], x[kept], y[kept], 3)
    assert (weight[2] == 0).all() and bias[2] < -1e3
    assert ((x @ weight.T + bias).argmax(1) < 2).all()


def test_probe_head_sets_the_adapters_head_and_leaves_the_base_alone():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    base_head = model.classifier.weight.detach().clone()
    rows = 90
    labels = [i % 3 for i in range(rows)]
    ids = [[1, 10 + label, 5 + (i % 4), 2] for i, label in enumerate(labels)]  # the label's own token
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 4] * rows, "labels": labels})

    def collate(batch):
        return {k: torch.tensor([r[k] for r in batch]) for k in ("input_ids", "attention_mask", "labels")}

    am = ak.adapt(model)
    am.add("a", ak.LoRA(r=2, targets=["query", "value"]), labels=["x", "y", "z"])
    facts = probe_head(am, "a", data.select(range(60)), data.select(range(60, 90)), collate)
    assert facts["probe_val_accuracy"] == 1.0  # the label's token separates the classes
    am.activate("a")
    with torch.no_grad():
        logits = am(**{k: v for k, v in collate([data[i] for i in range(rows)]).items() if k != "labels"}).logits
    assert (logits.argmax(-1) == torch.tensor(labels)).all()
    assert torch.equal(model.classifier.weight, base_head)  # the base's own head is untouched
