"""`adapterkit serve`: the HTTP server."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import app, clear_errors


@app.command()
@clear_errors
def serve(
    store: Annotated[str, typer.Option(help="Folder of adapters")],
    base: Annotated[str | None, typer.Option(help="Base model (default: bundled MiniLM)")] = None,
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    host: Annotated[str, typer.Option(help="Bind address (loopback unless --keys is given)")] = "127.0.0.1",
    max_batch: Annotated[int, typer.Option(help="Rows per batched forward")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="How long the batcher waits to fill a batch")] = 5.0,
    cache_bytes: Annotated[int, typer.Option(help="Byte budget of resident adapters")] = 512 << 20,
    keys: Annotated[str | None, typer.Option(help="keys.json mapping API keys to tenants")] = None,
    scheduling: Annotated[str, typer.Option(help="generation: continuous (rows join and leave at every step) | static")] = "continuous",
    served_model_name: Annotated[str | None, typer.Option(help="The base model's name in the OpenAI API")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="The most tokens one generation may ask for")] = 256,
    merge_after: Annotated[int, typer.Option(help="Forwards in a row for one mergeable adapter before it is served merged (0: never)")] = 8,
    quantize: Annotated[str | None, typer.Option(
        help="nf4 (bitsandbytes) | int8 | int4 (torchao): the base's frozen Linear layers quantized")] = None,
    dtype: Annotated[str, typer.Option(help="fp32 | bf16 | fp16: the base's dtype (adapters keep fp32)")] = "fp32",
    device: Annotated[str, typer.Option(help="cpu | cuda | cuda:N | auto: where the base and the adapters live")] = "cpu",
    capture: Annotated[bool, typer.Option(
        help="Compile a one-stream decode step at start (a causal LM on the CPU; --no-capture: eager steps only)")] = True,
) -> None:
    """Serve many adapters on one base model over HTTP (FastAPI), with an OpenAI-compatible API."""
    from ..quantize import Precision
    from ..serve import serve_command
    from ..train.job import default_base

    Precision(dtype=dtype, quantize=quantize, device=device)  # a bad value fails before the model loads
    serve_command(base=base or default_base(), store=store, port=port, host=host, max_batch=max_batch,
                  max_wait_ms=max_wait_ms, cache_bytes=cache_bytes, keys=keys, scheduling=scheduling,
                  served_name=served_model_name, max_new_tokens=max_new_tokens, merge_after=merge_after,
                  quantize=quantize, dtype=dtype, device=device, capture=capture)
