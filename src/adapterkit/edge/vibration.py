"""Recipe d: bearing-fault vibration, from the lab where the model was trained to an installation site.

A generated accelerometer signal (12 kHz, 4096 samples) of a rolling bearing:

- shaft harmonics at 1×, 2×, 3× the running speed f_r (imbalance and misalignment);
- a fault's impacts at its characteristic frequency, each ringing a structural resonance as a
  damped sine: outer race BPFO = n/2·f_r·(1 − d/D·cos φ), inner race BPFI = n/2·f_r·(1 + d/D·cos φ)
  (amplitude-modulated by the shaft, as the fault turns through the load zone), rolling element
  BSF = D/(2d)·f_r·(1 − (d/D·cos φ)²) (modulated at the cage frequency);
- the machine's transfer function to the sensor (resonances and gains of the mounting) and noise.

Lab and site differ in that last part and in their speeds: the same faults, heard through another
machine. Classes: normal, outer race, inner race, ball.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import signal

from .backbones import cnn1d
from .recipe import Recipe, frozen_copy, pretrain

FS, LENGTH = 12_000, 4096
CLASSES = ("normal", "outer_race", "inner_race", "ball")
BALLS, BALL_RATIO, CONTACT = 9, 0.2, 0.0  # n, d/D, contact angle φ (a 6205-like deep-groove bearing)


@dataclass(frozen=True)
class Machine:
    """Where the bearing sits: running speeds (Hz), structural resonances (Hz), their damping and noise."""

    speed_hz: tuple[float, float]
    resonances_hz: tuple[float, ...]
    damping: float
    noise: float
    mount_gain_db: tuple[float, ...]  # a gain per resonance: the path from bearing to sensor
    spread: float = 0.03  # how much resonances and noise vary from one recording to the next


# the lab's test rigs vary (several rigs, sensors re-mounted); the site is one machine
LAB = Machine(speed_hz=(20, 30), resonances_hz=(3_000.0, 4_500.0), damping=0.05, noise=0.15, mount_gain_db=(0, -6),
              spread=0.15)
SITE = Machine(speed_hz=(24, 36), resonances_hz=(2_600.0, 4_000.0, 5_200.0), damping=0.08, noise=0.2,
               mount_gain_db=(0, -3, -9))


def fault_frequency(kind: str, shaft_hz: float) -> float:
    ratio = BALL_RATIO * np.cos(CONTACT)
    return {"outer_race": BALLS / 2 * shaft_hz * (1 - ratio), "inner_race": BALLS / 2 * shaft_hz * (1 + ratio),
            "ball": 1 / (2 * BALL_RATIO) * shaft_hz * (1 - ratio**2)}[kind]


def bearing_signal(kind: str, machine: Machine, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(LENGTH) / FS
    shaft = rng.uniform(*machine.speed_hz)
    out = sum(rng.uniform(0.05, 0.3) / k * np.sin(2 * np.pi * k * shaft * t + rng.uniform(0, 2 * np.pi))
              for k in (1, 2, 3))
    impacts = np.zeros(LENGTH)
    if kind != "normal":
        period = 1 / fault_frequency(kind, shaft)
        times = np.arange(rng.uniform(0, period), t[-1], period)
        times = times + rng.normal(0, 0.01 * period, times.size)  # rolling elements slip a little
        strength = rng.uniform(0.6, 1.4)
        for when in times:
            i = int(when * FS)
            if 0 <= i < LENGTH:
                if kind == "inner_race":  # the fault turns with the shaft through the load zone
                    gain = 0.6 + 0.4 * np.cos(2 * np.pi * shaft * when)
                elif kind == "ball":  # the ball turns with the cage
                    gain = 0.6 + 0.4 * np.cos(2 * np.pi * shaft / 2 * (1 - BALL_RATIO) * when)
                else:
                    gain = 1.0
                impacts[i] += strength * gain
    # every resonance of the structure rings on the impacts: the machine's transfer function
    ring = np.zeros(LENGTH)
    tail = np.arange(int(0.004 * FS)) / FS
    for f, gain_db in zip(machine.resonances_hz, machine.mount_gain_db, strict=True):
        f = f * rng.uniform(1 - machine.spread, 1 + machine.spread)
        kernel = np.exp(-machine.damping * 2 * np.pi * f * tail) * np.sin(2 * np.pi * f * tail)
        ring += 10 ** (gain_db / 20) * signal.fftconvolve(impacts, kernel)[:LENGTH]
    noise = rng.standard_normal(LENGTH) * machine.noise * rng.uniform(1 - 3 * machine.spread, 1 + 3 * machine.spread)
    wave = out + ring + noise
    return (wave / (wave.std() + 1e-8)).astype(np.float32)


def bearing_set(machine: Machine, per_class: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.stack([bearing_signal(kind, machine, rng) for kind in CLASSES for _ in range(per_class)])
    y = np.repeat(np.arange(len(CLASSES)), per_class)
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)


def vibration_recipe(*, quick: bool = False, seed: int = 0, shots: int = 10) -> Recipe:
    """A 1-D CNN trained on lab signals; the target is the same four conditions at the site."""
    rng = np.random.default_rng(seed)
    xs, ys = bearing_set(LAB, 60 if quick else 250, rng)
    source = pretrain(lambda: cnn1d(len(CLASSES)), xs, ys, epochs=5 if quick else 15, lr=3e-3, seed=seed)
    xt, yt = bearing_set(SITE, shots, rng)
    xe, ye = bearing_set(SITE, 15 if quick else 60, rng)
    return Recipe("vibration", frozen_copy(source.state_dict(), lambda: cnn1d(len(CLASSES))), (xt, yt), (xe, ye),
                  len(CLASSES), adapter_targets=r"re:blocks\.\d+$", batch_size=8, epochs=10 if quick else 25,
                  lr=3e-3, info={"labels": list(CLASSES), "source_examples": len(ys), "shots": shots,
                                 "shared_classes": len(CLASSES), "last_block_targets": r"re:blocks\.3$",
                                 "lora_targets": [r"re:blocks\.\d+\.0$"], "bitfit_targets": ["BatchNorm1d"]})
