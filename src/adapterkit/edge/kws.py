"""Recipe a: keyword spotting, personalised to a new speaker who also brings a custom wake word.

Source: a DS-CNN trained on ten keywords plus silence and unknown words, spoken by espeak-ng in
five English accents and seven voice variants at random rates and pitches, each clip through a
microphone and room drawn at random. Target: one new speaker (German-accented, in a voice variant
the source never heard) on one device in one room, with a 13th class, their wake word, and only a
few examples of each class.
"""

from __future__ import annotations

import numpy as np
import torch

from .backbones import ds_cnn
from .recipe import Recipe, RecipeError, frozen_copy, pretrain
from .speech import Channel, Speaker, clip, mfcc, synthesize

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN_WORDS = ("cat", "dog", "bed", "bird", "house", "tree", "happy", "wow", "nine", "zero", "three",
                 "learn", "follow", "forward", "visual", "sheila")
SILENCE, UNKNOWN = "_silence_", "_unknown_"
SOURCE_LABELS = (*KEYWORDS, SILENCE, UNKNOWN)
WAKE_WORD = "hey kit"
TARGET_LABELS = (*SOURCE_LABELS, WAKE_WORD)

SOURCE_ACCENTS = ("en", "en-US", "en-GB-x-rp", "en-GB-scotland", "en-029")
SOURCE_VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2", "f3")
TARGET_SPEAKER = Speaker(language="de", variant="f4", rate=140, pitch=62)
TARGET_CHANNEL = Channel(low_hz=250, high_hz=3_800, reverb_s=0.25, snr_db=(10, 20))  # one device in one room


def utterances(labels: tuple[str, ...], per_class: int, speakers: list[Speaker] | None, channel: Channel | None,
               rng: np.random.Generator, fixed: Speaker | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MFCCs [N, 1, 49, 10] and labels: each keyword said `per_class` times by a random speaker
    (or by `fixed`, with a little variation), through `channel` (None: a random one per clip)."""
    waves, ys = [], []
    for index, label in enumerate(labels):
        for _ in range(per_class):
            if fixed is None:
                if speakers is None:
                    raise RecipeError("utterances needs `speakers` to draw from, or a `fixed` speaker")
                speaker = speakers[rng.integers(len(speakers))]
            else:  # one person still varies a little from one take to the next
                speaker = Speaker(fixed.language, fixed.variant, int(fixed.rate + rng.integers(-15, 16)),
                                  int(np.clip(fixed.pitch + rng.integers(-6, 7), 0, 99)))
            if label == SILENCE:
                wave = np.zeros(16_000, np.float32)
            else:
                word = UNKNOWN_WORDS[rng.integers(len(UNKNOWN_WORDS))] if label == UNKNOWN else label
                wave = clip(synthesize(word, speaker), rng)
            waves.append((channel or Channel.random(rng)).apply(wave, rng))
            ys.append(index)
    x = mfcc(torch.from_numpy(np.stack(waves)))
    return x, torch.tensor(ys)


def source_speakers(rng: np.random.Generator, count: int = 40) -> list[Speaker]:
    return [Speaker(SOURCE_ACCENTS[rng.integers(len(SOURCE_ACCENTS))], SOURCE_VARIANTS[rng.integers(len(SOURCE_VARIANTS))],
                    int(rng.integers(120, 200)), int(rng.integers(30, 70))) for _ in range(count)]


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


def kws_recipe(*, quick: bool = False, seed: int = 0, shots: int = 8) -> Recipe:
    """The keyword recipe: a pre-trained 12-class DS-CNN and a 13-class target speaker."""
    if shots < 1:
        raise RecipeError(f"shots={shots}: the target needs at least one example per class")
    rng = np.random.default_rng(seed)
    speakers = source_speakers(rng)
    xs, ys = utterances(SOURCE_LABELS, 40 if quick else 150, speakers, None, rng)
    mean, std = xs.mean(dim=(0, 2), keepdim=True)[0], xs.std(dim=(0, 2), keepdim=True)[0] + 1e-5
    xs = normalise(xs, mean, std)
    source = pretrain(lambda: ds_cnn(len(SOURCE_LABELS)), xs, ys, epochs=6 if quick else 20, lr=3e-3, seed=seed)
    xt, yt = utterances(TARGET_LABELS, shots, None, TARGET_CHANNEL, rng, fixed=TARGET_SPEAKER)
    xe, ye = utterances(TARGET_LABELS, 10 if quick else 30, None, TARGET_CHANNEL, rng, fixed=TARGET_SPEAKER)
    return Recipe("kws", frozen_copy(source.state_dict(), lambda: ds_cnn(len(SOURCE_LABELS))),
                  (normalise(xt, mean, std), yt), (normalise(xe, mean, std), ye), len(TARGET_LABELS),
                  adapter_targets=r"re:blocks\.\d+$", batch_size=8, epochs=15 if quick else 30, lr=3e-3,
                  info={"labels": list(TARGET_LABELS), "source_examples": len(ys), "source_speakers": len(speakers),
                        "target_speaker": TARGET_SPEAKER.voice, "shots": shots, "shared_classes": len(SOURCE_LABELS),
                        "last_block_targets": r"re:blocks\.3$", "lora_targets": [r"re:blocks\.\d+\.1\.0$"],
                        "bitfit_targets": ["BatchNorm2d"],
                        # DS-CNN's blocks are narrow (64 channels): a branch of 16 channels in 4 groups
                        "lite_residual": {"group_width": 4, "expansion": 0.25}})
