"""A Flower app project whose ServerApp and ClientApp are adapterkit's, for `flwr run` on a deployment.

    adapterkit federated new-app my-fleet --task digits --clients 3

writes my-fleet/ with pyproject.toml ([tool.flwr.app]: its components and every server-side Setting
as run config, which `flwr run --run-config` overrides) and a package whose `settings.py` holds the
settings both apps build the task from (task, clients, partition, method, seed, ...).
"""

from __future__ import annotations

import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from .simulate import CLIENT_SIDE, Settings
from .tasks import FederatedError

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "Federated adapters ({task}) with adapterkit on Flower"
license = "Apache-2.0"
dependencies = ["adapterkit[federated]"]

[tool.hatch.build.targets.wheel]
packages = ["{package}"]

[tool.flwr.app]
publisher = "adapterkit"

[tool.flwr.app.components]
serverapp = "{package}.server_app:app"
clientapp = "{package}.client_app:app"

[tool.flwr.app.config]
{config}
"""

SETTINGS_PY = '''"""What both apps build the task from: the ClientApp's side of the run (a run config cannot change it)."""

from adapterkit.federated import Settings

SETTINGS = Settings({fields})
'''

SERVER_PY = '''"""The ServerApp: the run config ([tool.flwr.app.config], flwr run --run-config) sets its Settings."""

from adapterkit.federated import server_app

from .settings import SETTINGS

app = server_app(SETTINGS)
'''

CLIENT_PY = '''"""The ClientApp a SuperNode starts for every message: it imports only Flower and hands the message
to a warm worker process that keeps torch, adapterkit and the built task loaded (adapterkit_relay)."""

from adapterkit_relay import relay_app

app = relay_app("{package}.trainer:app")
'''

TRAINER_PY = '''"""The real ClientApp, run in the warm worker: each SuperNode trains partition `partition-id` of
`num-partitions` (its node config), or its own examples (`data-path`)."""

from adapterkit.federated.simulate import make_client_app

from .settings import SETTINGS

app = make_client_app(SETTINGS)
'''


def write_app(folder: str | Path, settings: Settings) -> Path:
    """Write the app project for `settings` into `folder` (new, or empty); returns it."""
    settings.validate()
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FederatedError(f"{folder} is not empty; give a new folder for the app project")
    name = re.sub(r"[^A-Za-z0-9-]+", "-", folder.resolve().name).strip("-").lower() or "adapterkit-fleet"
    package = name.replace("-", "_")
    values = asdict(settings)
    client_side = {k: values[k] for k in sorted(CLIENT_SIDE)}
    # every server field, so that `flwr run --run-config` (which overrides only keys the project has)
    # can set each one; a field that is None by default is written as "" (with_run_config reads it back)
    run_config = {f.name.replace("_", "-"): "" if values[f.name] is None else values[f.name]
                  for f in fields(Settings) if f.name not in CLIENT_SIDE}
    (folder / package).mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT.format(
        name=name, package=package, task=settings.task,
        config="\n".join(f"{key} = {toml_value(value)}" for key, value in run_config.items())))
    (folder / package / "__init__.py").write_text('"""adapterkit on Flower: the app\'s ServerApp and ClientApp."""\n')
    (folder / package / "settings.py").write_text(SETTINGS_PY.format(
        fields=", ".join(f"{k}={v!r}" for k, v in client_side.items())))
    (folder / package / "server_app.py").write_text(SERVER_PY)
    (folder / package / "client_app.py").write_text(CLIENT_PY.format(package=package))
    (folder / package / "trainer.py").write_text(TRAINER_PY)
    return folder


def toml_value(value: Any) -> str:
    """`value` as TOML (and Flower's `key=value` config parser) reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
