"""Federated training of adapters on Flower: only the adapter's tensors (and its head) travel.

    from adapterkit.federated import Settings, simulate
    outcome = simulate(Settings(task="tweets", clients=10, rounds=20, partition="dirichlet:0.3"))

`client_app` / `server_app` are Flower 1.42 Message-API apps (`@app.train`, `@app.evaluate`,
`@app.main` driving a strategy's `start`); `simulate` runs them on Flower's Ray simulation engine
or in this process. Nothing leaves the machine: Flower's telemetry and update check are off
unless the environment already says otherwise (set before flwr is imported).
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from .aggregate import AGGREGATIONS, aggregate, fedavg, svd_refactor  # noqa: E402
from .builtin import TASKS, build_task, method_config  # noqa: E402
from .client import client_app, evaluate, local_train, make_participant  # noqa: E402
from .faults import FaultsMod, parse_faults  # noqa: E402
from .records import ADAPTER, Participant, check_arrays  # noqa: E402
from .server import AdapterStrategy, Checkpoints, Guarded, dp_wrapped  # noqa: E402
from .simulate import (  # noqa: E402
    LocalGrid,
    Outcome,
    Settings,
    ray_backend_config,
    run_server,
    server_app,
    simulate,
    with_run_config,
)
from .tasks import ClientData, FederatedError, FederatedTask, dirichlet_split  # noqa: E402

__all__ = [
    "ADAPTER", "AGGREGATIONS", "TASKS", "AdapterStrategy", "Checkpoints", "ClientData", "FaultsMod", "FederatedError",
    "FederatedTask", "Guarded", "LocalGrid", "Outcome", "Participant", "Settings", "aggregate", "build_task",
    "check_arrays", "client_app", "dirichlet_split", "dp_wrapped", "evaluate", "fedavg", "local_train",
    "make_participant", "method_config", "parse_faults", "ray_backend_config", "run_server", "server_app",
    "simulate", "svd_refactor", "with_run_config",
]
