"""Multi-tenant serving: one base model, many adapters, per-request routing, hot load.

    adapterkit serve --base <hub id or path> --store <folder> [--keys keys.json]

Python without HTTP: `Engine(base, store).classify([...], adapter="name")`.
HTTP: `create_app(engine, keys)` (FastAPI). Ray Serve: `adapterkit.serve.ray_serve.deployment`.
"""

from __future__ import annotations

import gc
import ipaddress
import socket

from .cache import AdapterCache, AdapterKey
from .engine import Engine
from .errors import ServeError
from .store import AdapterStore
from .tenants import Principal, Tenants


def create_app(*args, **kwargs):  # noqa: ANN002, ANN003 - imports FastAPI only when asked for
    from .app import create_app as factory

    return factory(*args, **kwargs)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def serve_command(
    base: str, store: str, port: int = 8000, host: str = "127.0.0.1", max_batch: int = 32,
    max_wait_ms: float = 5.0, cache_bytes: int = 512 << 20, keys: str | None = None,
    scheduling: str = "continuous", served_name: str | None = None, max_new_tokens: int = 256,
    merge_after: int = 8, quantize: str | None = None, dtype: str = "fp32", device: str = "cpu",
    capture: bool = True,
) -> None:
    """Run the HTTP server until interrupted (what `adapterkit serve` calls).

    Without `keys` the server is single-tenant and refuses to bind anything but loopback.
    """
    if keys is None and not is_loopback(host):
        raise SystemExit(
            f"refusing to bind {host}: without --keys the server has no authentication and serves loopback only; "
            "pass --keys keys.json (API key -> tenant) to serve other hosts"
        )
    import uvicorn

    from .protocol import with_header_timeout
    from .tenants import Tenants as KeyFile

    tenants = KeyFile(keys) if keys is not None else None  # a bad keys file fails before the model loads
    engine = Engine(base, store, max_batch=max_batch, max_wait_ms=max_wait_ms, cache_bytes=cache_bytes,
                    scheduling=scheduling, max_new_tokens=max_new_tokens, merge_after=merge_after, quantize=quantize,
                    dtype=dtype, device=device, capture=capture)
    app = create_app(engine, tenants, close_engine=True, served_name=served_name)
    # The base model, torch and transformers are ~400k objects that live as long as the process: an
    # automatic full collection walks them all (~0.2 s with every thread stopped, a victim's p99 in
    # bench/serve_hostile.py). Frozen, they are left out of every later collection.
    gc.collect()
    gc.freeze()
    # a deadline for request headers (uvicorn has none) and a short one for idle keep-alive connections
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, http=with_header_timeout(10.0),
                timeout_keep_alive=5)


__all__ = [
    "AdapterCache", "AdapterKey", "AdapterStore", "Engine", "Principal", "ServeError", "Tenants", "create_app",
    "is_loopback", "serve_command",
]
