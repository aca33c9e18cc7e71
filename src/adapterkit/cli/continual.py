"""`adapterkit continual`: one frozen adapter per task."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from .common import clear_errors, command_group, console, err_console

continual_app = command_group("continual", "Continual learning: one frozen adapter per task.")


@continual_app.command("run")
@clear_errors
def continual_run(
    tasks: Annotated[str, typer.Option(help="Task stream: split-mnist | text (four domains on MiniLM) | sensor (a drifting vibration sensor)")] = "split-mnist",
    out: Annotated[str, typer.Option(help="Folder for results.json and the heat maps of R")] = "runs/continual",
    epochs: Annotated[int | None, typer.Option(help="Epochs per task (default 5; --quick 2)")] = None,
    baselines: Annotated[list[str] | None, typer.Option(
        help="naive | ewc | replay | joint | naive_full; repeat (default: all)")] = None,
    quick: Annotated[bool, typer.Option(help="Fewer examples and epochs: a smoke run")] = False,
) -> None:
    """Learn a stream task by task with per-task adapters and the baselines; write R, the metrics and plots."""
    from pathlib import Path

    from ..continual.run import BASELINES, run_stream

    folder = Path(out)
    results = run_stream(tasks, quick=quick, epochs=epochs, baselines=tuple(baselines or BASELINES), plots=folder,
                         log=lambda line: err_console.print(line))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    table = Table("method", "accuracy (task id)", "BWT", "forgetting")
    for name in ("adapters", *[b for b in (baselines or BASELINES) if b != "joint"]):
        r = results[name]
        table.add_row(name, f"{r['average_accuracy']:.3f}", f"{r['bwt']:+.3f}", f"{r['forgetting']:.3f}")
    if "joint" in results:
        table.add_row("joint (upper bound)", f"{results['joint']['accuracy']:.3f}", "", "")
    console.print(table)
    free = results["adapters"]["task_free_prototype"]
    console.print(f"adapters without a task id: accuracy {free['accuracy']:.3f}, routing {free['routing_accuracy']:.3f}")
    console.print(f"written to {folder}")
