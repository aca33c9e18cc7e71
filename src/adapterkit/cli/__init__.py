"""`adapterkit` on the command line: train, eval, predict, info, merge, export, serve, continual, edge, federated.

One module per command group; importing this package registers them all on `app`."""

from __future__ import annotations

from . import adapters, continual, edge, federated, serve  # noqa: F401 - each registers its commands
from .common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
