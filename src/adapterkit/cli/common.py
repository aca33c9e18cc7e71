"""What every command shares: the Typer app, the consoles, the option types and the error rule."""

from __future__ import annotations

import functools
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Adapter layers on a frozen model: train, inspect, merge, export and serve them.")
console = Console()
err_console = Console(stderr=True)

Data = Annotated[str | None, typer.Option(help="CSV/JSONL/Parquet path or hf:name[:split]; default: the bundled tweets")]
TextCol = Annotated[str | None, typer.Option(help="Column with the text (guessed when left out)")]
LabelCol = Annotated[str | None, typer.Option(help="Column with the label (guessed when left out)")]
Base = Annotated[str | None, typer.Option(help="Base model: a hub id or a local folder; default: the adapter's own base")]
DType = Annotated[str | None, typer.Option(
    help="fp32 | bf16 | fp16: the dtype the base is loaded in (adapters keep fp32); default: as the adapter was "
         "trained, else fp32")]
Quantize = Annotated[str | None, typer.Option(
    help="nf4 (bitsandbytes) | int8 | int4 (torchao): the base's frozen Linear layers quantized; none: not; "
         "default: as the adapter was trained")]


@app.callback()
def quiet() -> None:
    """Adapter layers on a frozen model: train, inspect, merge, export and serve them."""
    from ..hf_names import import_torchao_quietly

    import_torchao_quietly()  # before anything imports transformers' models, which import torchao
    from ..train.job import environment_quiet

    environment_quiet()


def clear_errors(command):
    """Turn known failures into one red line and exit code 2, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from ..errors import AdapterError
        from ..train.data import DataError
        from ..train.trainer import TrainingInterrupted

        try:
            return command(*args, **kwargs)
        except TrainingInterrupted as err:
            err_console.print(f"[yellow]interrupted:[/] {err}")
            raise typer.Exit(130) from None
        except (AdapterError, DataError, ValueError, FileNotFoundError, OSError) as err:
            err_console.print(f"[red]error:[/] {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            raise typer.Exit(2) from None

    return wrapper


def command_group(name: str, help: str) -> typer.Typer:
    """A group of subcommands (`adapterkit <name> ...`), registered on the main app."""
    group = typer.Typer(no_args_is_help=True, help=help)
    app.add_typer(group, name=name)
    return group

