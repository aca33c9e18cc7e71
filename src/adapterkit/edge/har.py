"""Recipe c: activity recognition on IMU series, personalised to a new user or a new activity.

Two targets, two backbones:

- **A new user** (`har_recipe`, a TCN): a generator of wrist IMU windows (3-axis accelerometer and
  gyroscope, 50 Hz, 128 samples) for five activities. Each user has their own cadence, stride
  strength, left/right asymmetry, sensor bias and, above all, the way the device sits on the wrist
  (a rotation of all six axes). The source model is trained on twenty users worn roughly upright;
  the target user wears it turned and walks in their own way.
- **A new activity** (`basic_motions_recipe`, an LSTM): aeon's BasicMotions (a smart watch's
  accelerometer and gyroscope, 10 Hz, four students; read from the data file inside the aeon wheel,
  not through aeon's code). The source model knows standing, walking and running; the target
  adds badminton from a few recordings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..package_data import package_file
from .backbones import lstm, tcn
from .recipe import Recipe, RecipeError, frozen_copy, pretrain

FS, WINDOW = 50, 128
ACTIVITIES = ("sitting", "standing", "walking", "running", "stairs")
_CADENCE = {"walking": 1.8, "running": 2.8, "stairs": 1.4}  # steps per second
_IMPACT = {"walking": 1.0, "running": 2.6, "stairs": 1.3}


@dataclass(frozen=True)
class User:
    cadence: float  # multiplies the activity's step rate
    strength: float  # multiplies accelerations and turn rates
    asymmetry: float  # how much one step differs from the other
    tilt_deg: tuple[float, float, float]  # how the device sits on the wrist (x, y, z rotations)
    bias: tuple[float, ...]  # six sensor offsets


def _rotation(deg: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.radians(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_user(rng: np.random.Generator, tilt: float = 15.0) -> User:
    cadence, strength = float(rng.uniform(0.85, 1.15)), float(rng.uniform(0.8, 1.2))
    asymmetry = float(rng.uniform(0.0, 0.25))
    tx, ty, tz = (float(v) for v in rng.uniform(-tilt, tilt, 3))
    return User(cadence, strength, asymmetry, (tx, ty, tz), tuple(float(v) for v in rng.normal(0, 0.05, 6)))


TARGET_USER = User(cadence=0.8, strength=0.75, asymmetry=0.35, tilt_deg=(55.0, -30.0, 40.0),
                   bias=(0.1, -0.08, 0.05, 0.03, -0.02, 0.04))


def imu_window(activity: str, user: User, rng: np.random.Generator) -> np.ndarray:
    """[6, 128]: acceleration (g) then turn rate (rad/s), in the device's own axes."""
    t = np.arange(WINDOW) / FS
    gravity = {"sitting": np.array([0.3, 0.1, 0.95]), "standing": np.array([0.05, -0.98, 0.1])}.get(
        activity, np.array([0.1, -0.95, 0.2]))
    gravity = gravity / np.linalg.norm(gravity)
    acc = np.tile(gravity[:, None], (1, WINDOW))
    gyro = np.zeros((3, WINDOW))
    if activity in _CADENCE:
        f = _CADENCE[activity] * user.cadence * rng.uniform(0.93, 1.07)
        phase = 2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)
        step = 1 + user.asymmetry * np.sign(np.sin(phase / 2))  # every other step differs
        impact = _IMPACT[activity] * user.strength
        acc[1] += 0.35 * impact * step * np.sin(phase) + 0.15 * impact * np.sin(2 * phase + 0.6)  # vertical
        acc[0] += 0.2 * impact * np.sin(phase / 2 + 0.3)  # the arm swings once per stride
        acc[2] += 0.1 * impact * np.sin(phase + 1.1)
        if activity == "stairs":  # each step lifts the body: a slow asymmetric climb
            acc[1] += 0.15 * np.maximum(0, np.sin(phase)) ** 3
        gyro[2] += 1.5 * impact * np.cos(phase / 2)
        gyro[0] += 0.4 * impact * np.sin(phase + 0.4)
    else:
        gyro += rng.normal(0, 0.03, gyro.shape)
        drift = rng.normal(0, 0.02, (3, 1)) * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t)
        acc += drift
    rot = _rotation(user.tilt_deg)
    x = np.concatenate([rot @ acc, rot @ gyro]) + np.array(user.bias)[:, None]
    return (x + rng.normal(0, 0.25, x.shape)).astype(np.float32)


def imu_set(users: list[User], per_class: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for label, activity in enumerate(ACTIVITIES):
        for _ in range(per_class):
            xs.append(imu_window(activity, users[rng.integers(len(users))], rng))
            ys.append(label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def har_recipe(*, quick: bool = False, seed: int = 0, shots: int = 4) -> Recipe:
    """A TCN trained on twenty users; the target is a new user who wears the device turned."""
    if shots < 1:
        raise RecipeError(f"shots={shots}: the new user needs at least one window per activity")
    rng = np.random.default_rng(seed)
    users = [random_user(rng) for _ in range(20)]
    xs, ys = imu_set(users, 60 if quick else 200, rng)
    source = pretrain(lambda: tcn(6, len(ACTIVITIES)), xs, ys, epochs=5 if quick else 12, lr=3e-3, seed=seed)
    xt, yt = imu_set([TARGET_USER], shots, rng)
    xe, ye = imu_set([TARGET_USER], 20 if quick else 60, rng)
    return Recipe("har", frozen_copy(source.state_dict(), lambda: tcn(6, len(ACTIVITIES))), (xt, yt), (xe, ye),
                  len(ACTIVITIES), adapter_targets=r"re:blocks\.\d+$", batch_size=6, epochs=12 if quick else 25,
                  lr=3e-3, info={"labels": list(ACTIVITIES), "source_users": len(users), "shots": shots,
                                 "shared_classes": len(ACTIVITIES), "last_block_targets": r"re:blocks\.3$",
                                 "lora_targets": [r"re:blocks\.\d+\.net\.[03]$"], "bitfit_targets": ["BatchNorm1d"]})


# --- BasicMotions, read from the aeon wheel ----------------------------------------------------

def read_ts(path: str) -> tuple[np.ndarray, list[str]]:
    """A sktime/aeon .ts file of equal-length series: [cases, dimensions, length] and the labels."""
    cases, labels, in_data = [], [], False
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.lower() == "@data":
                in_data = True
                continue
            if in_data:
                *dims, label = line.split(":")
                cases.append([[float(v) for v in d.split(",")] for d in dims])
                labels.append(label)
    return np.asarray(cases, dtype=np.float32), labels


def basic_motions() -> dict[str, tuple[torch.Tensor, list[str]]]:
    out = {}
    for split in ("TRAIN", "TEST"):
        path = package_file("aeon", f"datasets/data/BasicMotions/BasicMotions_{split}.ts",
                            hint="pip install --no-deps aeon (only its data files are read)")
        x, labels = read_ts(str(path))
        out[split.lower()] = (torch.from_numpy(x), labels)
    return out


MOTIONS_SOURCE = ("Standing", "Walking", "Running")
NEW_ACTIVITY = "Badminton"


def basic_motions_recipe(*, quick: bool = False, seed: int = 0, shots: int = 3) -> Recipe:
    """An LSTM that knows three of BasicMotions' activities learns the fourth from `shots` recordings."""
    data = basic_motions()
    x_train, l_train = data["train"]
    x_test, l_test = data["test"]
    labels = (*MOTIONS_SOURCE, NEW_ACTIVITY)
    mean, std = x_train.mean(dim=(0, 2), keepdim=True), x_train.std(dim=(0, 2), keepdim=True) + 1e-6

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return ((x - mean) / std).transpose(1, 2).contiguous()  # [cases, time, channels] for the LSTM

    y_train = torch.tensor([labels.index(v) for v in l_train])
    y_test = torch.tensor([labels.index(v) for v in l_test])
    known = y_train < len(MOTIONS_SOURCE)
    source = pretrain(lambda: lstm(6, len(MOTIONS_SOURCE), hidden=32), prepare(x_train[known]), y_train[known],
                      epochs=40 if quick else 100, lr=1e-2, batch_size=8, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    new = torch.nonzero(~known).flatten()
    chosen = new[torch.randperm(len(new), generator=gen)[:shots]]
    # the target's few labelled recordings: the new activity's, and as many of each known one
    few = torch.cat([chosen] + [torch.nonzero(y_train == c).flatten()[:shots] for c in range(len(MOTIONS_SOURCE))])
    return Recipe("har_lstm", frozen_copy(source.state_dict(), lambda: lstm(6, len(MOTIONS_SOURCE), hidden=32)),
                  (prepare(x_train[few]), y_train[few]), (prepare(x_test), y_test), len(labels),
                  adapter_targets=r"re:blocks\.\d+$", batch_size=4, epochs=15 if quick else 40, lr=1e-2,
                  info={"labels": list(labels), "shots": shots, "shared_classes": len(MOTIONS_SOURCE),
                        "convolutional": False, "bitfit_targets": ["LSTM"], "last_block_targets": r"re:blocks\.1$"})
