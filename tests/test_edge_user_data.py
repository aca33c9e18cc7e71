"""`adapterkit edge` on the user's own data and model: a folder per class of recorded audio (spoken by
espeak-ng here, written as .wav at two rates), their pre-trained weights, fit, run, export; arrays; and
the clear errors before any step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.io import wavfile
from typer.testing import CliRunner

from adapterkit.cli import app
from adapterkit.edge.backbones import ds_cnn, tcn
from adapterkit.edge.recipe import RecipeError
from adapterkit.edge.user_data import class_folders, user_recipe

WORDS = ("left", "right", "stop")


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """Three spoken words, six recordings each in two voices; half written at 8 kHz, half at 16 kHz."""
    from adapterkit.edge.speech import Speaker, synthesize

    root = tmp_path_factory.mktemp("recordings")
    for word in WORDS:
        (root / word).mkdir()
        for i in range(6):
            wave = synthesize(word, Speaker(variant=("m1", "f2")[i % 2], rate=140 + 10 * i, pitch=40 + 5 * i))
            pcm = (np.clip(wave, -1, 1) * 32767).astype(np.int16)
            if i % 2:
                wavfile.write(root / word / f"{i}.wav", 8000, pcm[::2])
            else:
                wavfile.write(root / word / f"{i}.wav", 16000, pcm)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "kws.safetensors"
    save_file({k: v.contiguous() for k, v in ds_cnn(5, channels=16, blocks=2).state_dict().items()}, str(path))
    return path


@pytest.mark.slow
def test_fit_run_and_export_on_recorded_audio_and_the_users_model(recordings, weights, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["edge", "fit", "--data", str(recordings), "--backbone", "ds_cnn", "--weights",
                                 str(weights), "--method", "bottleneck", "--epochs", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["user"]["labels"] == list(WORDS) and report["user"]["input_shape"] == [1, 49, 10]
    assert report["user"]["preprocess"]["kind"] == "audio" and len(report["user"]["preprocess"]["mean"]) == 10
    files = [str(recordings / word / "1.wav") for word in WORDS]
    result = runner.invoke(app, ["edge", "run", str(out), *files])
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.output.strip().splitlines()]
    assert [line[0] for line in lines] == files and all(line[1] in WORDS for line in lines)
    result = runner.invoke(app, ["edge", "export", str(out), "--out", str(tmp_path / "export"), "--train",
                                 "--batch", "2"])
    assert result.exit_code == 0, result.output
    assert "max |onnx - PyTorch|" in result.output and (tmp_path / "export" / "train-run.pte").exists()


def test_arrays_in_class_folders_make_a_recipe_split_per_class(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "tcn.safetensors"
    save_file({k: v.contiguous() for k, v in tcn(6, 4, channels=16, levels=2).state_dict().items()}, str(weights))
    rng = np.random.default_rng(0)
    for c, name in enumerate(("idle", "walk", "run")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(5):
            window = rng.normal(c, 1, (6, 32)).astype(np.float32)
            if i % 2:
                np.save(tmp_path / "data" / name / f"{i}.npy", window)
            else:
                np.savetxt(tmp_path / "data" / name / f"{i}.csv", window, delimiter=",")
    (tmp_path / "data" / "idle" / ".DS_Store").write_bytes(b"\0")  # what a file manager leaves: not data
    (tmp_path / "data" / "__MACOSX").mkdir()
    (tmp_path / "data" / "__MACOSX" / "x.npy").write_bytes(b"\0")
    recipe = user_recipe(tmp_path / "data", backbone="tcn", weights=weights, test_split=0.4)
    assert recipe.num_labels == 3 and recipe.input_shape == (6, 32)
    assert torch.bincount(recipe.test[1]).tolist() == [2, 2, 2] and torch.bincount(recipe.train[1]).tolist() == [3, 3, 3]
    assert recipe.make_source()(recipe.train[0][:2]).shape == (2, 4)  # the user's model, its own 4 classes


def test_bad_data_and_models_are_refused_before_any_step_with_what_is_wrong(recordings, weights, tmp_path):
    (tmp_path / "one" / "only").mkdir(parents=True)
    np.save(tmp_path / "one" / "only" / "a.npy", np.zeros((6, 32)))
    with pytest.raises(RecipeError, match="1 class folder"):
        class_folders(tmp_path / "one")
    broken = tmp_path / "broken"
    for word in ("yes", "no"):
        (broken / word).mkdir(parents=True)
        (broken / word / "a.wav").write_bytes(b"RIFF not really a wave")
    with pytest.raises(RecipeError, match=r"cannot read .*broken/no/a\.wav"):
        user_recipe(broken, backbone="ds_cnn", weights=weights)
    mixed = tmp_path / "mixed"
    for word, shape in (("a", (6, 32)), ("b", (6, 40))):
        (mixed / word).mkdir(parents=True)
        np.save(mixed / word / "x.npy", np.zeros(shape, np.float32))
    with pytest.raises(RecipeError, match=r"mixed/b/x\.npy gives an input of shape \[6, 40\], but .* gives \[6, 32\]"):
        user_recipe(mixed, backbone="ds_cnn", weights=weights)
    other = tmp_path / "tcn.safetensors"
    save_file({k: v.contiguous() for k, v in tcn(3, 4, channels=8, levels=2).state_dict().items()}, str(other))
    with pytest.raises(RecipeError, match=r"the tcn cannot take the data's inputs: .* gives \[1, 49, 10\], and a tcn "
                                          r"reads \[channels, time\]"):
        user_recipe(recordings, backbone="tcn", weights=other)
    with pytest.raises(RecipeError, match="needs --weights"):
        user_recipe(recordings, backbone="ds_cnn")
    with pytest.raises(RecipeError, match=r"--weights .*tcn\.safetensors are not a ds_cnn's: KeyError"):
        user_recipe(recordings, backbone="ds_cnn", weights=other)
    result = CliRunner().invoke(app, ["edge", "fit", "--data", str(tmp_path / "one"), "--backbone", "ds_cnn",
                                      "--weights", str(weights)])
    assert result.exit_code != 0 and "training needs at least two" in " ".join(result.output.split())


def _series(root, classes=("idle", "walk", "run"), shape=(6, 32), per_class=6):  # noqa: ANN001, ANN202
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            np.save(root / name / f"{i}.npy", rng.normal(c, 1, shape).astype(np.float32))
    return root


def _program(model: torch.nn.Module, path, shape, dynamic: bool = True):  # noqa: ANN001, ANN202
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, *shape)
    dims = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=dims), str(path))
    return x


def test_a_torch_export_program_is_the_model_rebuilt_with_its_own_layers(tmp_path):
    from adapterkit.edge.program_model import load_program

    torch.manual_seed(0)
    original = tcn(6, 4, channels=16, levels=2)
    x = _program(original, tmp_path / "tcn.pt2", (6, 32))
    model, shape = load_program(tmp_path / "tcn.pt2")
    assert shape == [None, 6, 32]
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x))
        assert model(x[:1]).shape == (1, 4)  # the batch is free
    kinds = {type(m) for m in model.modules()}
    assert {torch.nn.Conv1d, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear} <= kinds
    convs = [m for m in original.modules() if isinstance(m, torch.nn.Conv1d)]
    rebuilt = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [(c.dilation, c.padding) for c in rebuilt] == [(c.dilation, c.padding) for c in convs]


@pytest.mark.slow
def test_the_cli_trains_plans_runs_and_exports_on_a_program_model(tmp_path):
    runner = CliRunner()
    torch.manual_seed(0)
    _program(tcn(6, 4, channels=16, levels=2), tmp_path / "tcn.pt2", (6, 32))
    data = _series(tmp_path / "data")
    out = tmp_path / "run"
    common = ["--data", str(data), "--model", str(tmp_path / "tcn.pt2"), "--method", "lora"]
    result = runner.invoke(app, ["edge", "plan", *common, "--activation-bits", "4"])
    assert result.exit_code == 0, result.output
    assert "writable" in result.output
    result = runner.invoke(app, ["edge", "fit", *common, "--epochs", "8", "--out", str(out), "--activation-bits", "8"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["user"]["backbone"] == "program" and (out / "model.pt2").exists()
    assert report["losses"][-1] < report["losses"][0] and report["steps"] > 0
    files = [str(data / name / "0.npy") for name in ("idle", "walk", "run")]
    result = runner.invoke(app, ["edge", "run", str(out), *files])
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.output.strip().splitlines()] == files
    result = runner.invoke(app, ["edge", "export", str(out), "--out", str(tmp_path / "export"), "--train", "--batch",
                                 "2", "--activation-bits", "8"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "export" / "train-run.pte").exists() and "less than full fine-tuning" in result.output


def test_a_program_model_that_does_not_fit_the_data_is_refused_naming_both_shapes(tmp_path):
    torch.manual_seed(0)
    _program(tcn(6, 4, channels=16, levels=2), tmp_path / "dynamic.pt2", (6, 32))
    _program(tcn(6, 4, channels=16, levels=2), tmp_path / "static.pt2", (6, 32), dynamic=False)
    wide = _series(tmp_path / "wide", shape=(6, 40))
    with pytest.raises(RecipeError, match=r"exported for inputs of shape \[6, 32\]; the data's files give \[6, 40\]"):
        user_recipe(wide, model=tmp_path / "dynamic.pt2")
    narrow = _series(tmp_path / "narrow")
    with pytest.raises(RecipeError, match="batches of exactly 2: export it with a dynamic batch"):
        user_recipe(narrow, model=tmp_path / "static.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a program")
    with pytest.raises(RecipeError, match=r"junk\.pt2 is not a torch.export program"):
        user_recipe(narrow, model=tmp_path / "junk.pt2")
    with pytest.raises(RecipeError, match="give the pre-trained model once"):
        user_recipe(narrow, model=tmp_path / "dynamic.pt2", backbone="tcn")
