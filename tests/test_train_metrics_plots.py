"""Metrics, memory accounting and training-curve plots of adapterkit.train."""

from __future__ import annotations

import mmap
import time

import numpy as np
import pytest
import torch

from adapterkit.train.memory import (
    PeakMemory,
    current_rss_bytes,
    human_bytes,
    optimizer_state_bytes,
    peak_rss_bytes,
)
from adapterkit.train.metrics import accuracy, classification_report_dict, macro_f1
from adapterkit.train.plots import plot_curves

# Hand-checked example: per class (tp, fp, fn) = 0: (1, 1, 1), 1: (2, 1, 0), 2: (1, 0, 1)
# -> F1 = 1/2, 4/5, 2/3 and accuracy 4/6.
Y_TRUE = [0, 0, 1, 1, 2, 2]
Y_PRED = [0, 1, 1, 1, 2, 0]
NAMES = ["negative", "neutral", "positive"]


def test_accuracy_and_macro_f1_by_hand():
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    assert macro_f1(Y_TRUE, Y_PRED) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    # A class missing from this batch still counts when the label set is given.
    assert macro_f1(Y_TRUE, Y_PRED, labels=range(4)) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 4)
    assert accuracy(torch.tensor(Y_TRUE), np.array(Y_PRED)) == pytest.approx(4 / 6)
    assert macro_f1([1, 1], [1, 1]) == 1.0


def test_metric_input_validation():
    with pytest.raises(ValueError, match="zero examples"):
        accuracy([], [])
    with pytest.raises(ValueError, match="3 items"):
        macro_f1([0, 1, 2], [0, 1])


def test_classification_report_dict_ids_and_names():
    report = classification_report_dict(Y_TRUE, Y_PRED, NAMES)
    assert report["negative"]["precision"] == pytest.approx(1 / 2)
    assert report["neutral"]["precision"] == pytest.approx(2 / 3)
    assert report["neutral"]["recall"] == pytest.approx(1.0)
    assert report["positive"]["f1-score"] == pytest.approx(2 / 3)
    assert report["positive"]["support"] == 2
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["macro avg"]["f1-score"] == pytest.approx(macro_f1(Y_TRUE, Y_PRED))

    by_name = classification_report_dict([NAMES[i] for i in Y_TRUE], [NAMES[i] for i in Y_PRED], NAMES)
    assert by_name == report

    # Every listed class appears (support 0) even when absent from a small eval batch.
    partial = classification_report_dict([0, 0], [0, 1], NAMES)
    assert partial["positive"]["support"] == 0 and partial["accuracy"] == pytest.approx(0.5)
    assert "micro avg" not in partial


def test_optimizer_state_bytes_arithmetic():
    assert optimizer_state_bytes(1_000) == 8_000  # AdamW: exp_avg + exp_avg_sq, fp32
    assert optimizer_state_bytes(1_000, "adam", dtype_bytes=2) == 4_000
    assert optimizer_state_bytes(1_000, "sgd") == 0
    assert optimizer_state_bytes(1_000, "sgd_momentum") == 4_000
    assert optimizer_state_bytes(0) == 0
    with pytest.raises(ValueError, match="unknown optimizer"):
        optimizer_state_bytes(10, "lion")


def test_human_bytes():
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 1024**3) == "3.0 GiB"
    assert human_bytes(-2048) == "-2.0 KiB"
    assert human_bytes(5 * 1024**5) == "5.0 PiB"


def test_rss_readings():
    now = current_rss_bytes()
    assert now > 10 * 1024**2
    assert peak_rss_bytes() >= now


def test_peak_memory_sees_a_transient_allocation():
    size = 96 * 1024**2
    with PeakMemory(interval_s=0.005) as mem:
        # An anonymous mapping, not np.ones: whether malloc hands a freed block back to the
        # system depends on the allocator the process ended up with (CI saw one that kept it).
        block = mmap.mmap(-1, size)
        block.write(b"\x01" * size)  # touched pages, so they count in RSS
        with_block = current_rss_bytes()
        time.sleep(0.15)
        block.close()
    # Measured against RSS with the block rather than at the start: other threads of the test
    # process may free memory of their own meanwhile.
    assert with_block - mem.end_rss >= size * 0.8  # the block was transient
    assert mem.peak_rss >= with_block - 8 * 1024**2  # and the sampler saw it
    assert mem.peak_rss_delta == max(0, mem.peak_rss - mem.start_rss)
    assert mem.peak_rss >= mem.end_rss
    assert mem.cuda_peak is None or not torch.cuda.is_available() or mem.cuda_peak >= 0
    d = mem.as_dict()
    assert d["peak_rss_bytes"] == mem.peak_rss and "cuda_peak_bytes" in d


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_curves_writes_png(tmp_path):
    history = {"train_loss": [1.2 / (1 + 0.1 * i) for i in range(60)], "val_accuracy": [0.5, 0.62, 0.7]}
    out = plot_curves(history, tmp_path / "nested" / "curves.png", title="tweets / lora")
    assert out == tmp_path / "nested" / "curves.png"
    assert _is_png(out) and out.stat().st_size > 5_000
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left behind


def test_plot_curves_handles_empty_and_pairs(tmp_path):
    empty = plot_curves({}, tmp_path / "empty.png")
    assert _is_png(empty)
    lists = plot_curves({"train_loss": [], "val_accuracy": []}, tmp_path / "lists.png")
    assert _is_png(lists)
    pairs = {"train_loss": [(10, 0.9), (20, 0.7)], "val_accuracy": [(1, 0.8)], "train_step": "ignored"}
    out = plot_curves(pairs, tmp_path / "pairs.png")
    assert _is_png(out)
    plot_curves({"train_loss": [0.5, float("nan"), 0.4]}, out)  # overwrite in place, NaN skipped
    assert _is_png(out)


def test_epoch_ticks_are_whole_numbers():
    from adapterkit.train.plots import curves_figure

    fig = curves_figure({"train_loss": [1.0, 0.8, 0.7, 0.6], "val_epoch": [1, 2, 3],
                         "val_accuracy": [0.5, 0.6, 0.7]})
    fig.canvas.draw()
    ticks = fig.axes[1].get_xticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
