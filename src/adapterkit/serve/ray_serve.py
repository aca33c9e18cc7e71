"""Scale-out with Ray Serve: the same Engine in every replica, requests routed by adapter id.

    from ray import serve
    from adapterkit.serve.ray_serve import deployment

    app = deployment("sentence-transformers/all-MiniLM-L6-v2", "/shared/adapters", num_replicas=4).bind()
    handle = serve.run(app)
    handle.options(multiplexed_model_id="acme/sentiment").classify.remote(["great film"]).result()

Over HTTP, Ray Serve's proxy reads the adapter id from the `serve_multiplexed_model_id` header:

    curl -H 'serve_multiplexed_model_id: acme/sentiment' -d '{"inputs": ["great film"]}' localhost:8000/classify

Ray sends usage statistics to its own host by default: set RAY_USAGE_STATS_ENABLED=0 before
`ray.init` where nothing may leave the machine (the tests and CI do).

How it fits together:
* The model id is "<tenant>/<name>" (a plain name means tenant "default"). Ray Serve's model
  multiplexing sends requests for one id preferably to replicas that already hold that adapter,
  and unloads the least recently used ids of a replica beyond `max_adapters_per_replica`.
* Inside a replica the engine works as on one machine: adapters hot-load from the store, and
  concurrent requests for all ids the replica holds run as one forward with per-row routing.
* Replicas share one store on a shared filesystem. A new version uploaded through any replica's
  `put` (or written into the store by a training job) is live in every replica at its next
  request: each resolves the live version from the store per request.
* Ray Serve has no API keys: put authentication in the ingress in front of it, or run the
  FastAPI app of `adapterkit.serve.app` per replica for tenant keys (then without multiplexing).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any, TypedDict

from .engine import Engine
from .errors import ServeError
from .http_errors import as_json, error_body, status_of
from .tenants import DEFAULT_TENANT


def split_model_id(model_id: str) -> tuple[str, str]:
    tenant, _, name = model_id.rpartition("/")
    return tenant or DEFAULT_TENANT, name


class LoadedAdapter:
    """What the multiplexed loader returns; Ray Serve calls `__del__` when it unloads the id."""

    def __init__(self, engine: Engine, tenant: str, name: str) -> None:
        self.engine, self.tenant, self.name = engine, tenant, name

    def __del__(self) -> None:
        try:
            self.engine.unload(self.tenant, self.name)
        except Exception:  # noqa: BLE001 - the engine may be gone at interpreter exit
            pass


class _Limits(TypedDict, total=False):
    """Options of `serve.deployment` given only when set (Ray Serve's own default otherwise)."""

    max_ongoing_requests: int


def deployment(base: str, store: str | os.PathLike, *, num_replicas: int = 1, max_adapters_per_replica: int = 256,
               ray_actor_options: dict[str, Any] | None = None, max_ongoing_requests: int | None = None,
               **engine_options: Any) -> Any:
    """A Ray Serve deployment class (call `.bind()` on it) serving adapters of `store` on `base`.

    `max_ongoing_requests` caps the requests one replica works on at once (Ray Serve's default
    when None); the engine batches whatever a replica holds into one routed forward.
    """
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    store = str(store)

    limits: _Limits = {} if max_ongoing_requests is None else {"max_ongoing_requests": max_ongoing_requests}

    @serve.deployment(name="adapterkit", num_replicas=num_replicas, ray_actor_options=ray_actor_options or {},
                      **limits)
    class AdapterServer:
        def __init__(self) -> None:
            self.engine = Engine(base, store, **engine_options)
            self.replica = serve.get_replica_context().replica_id.unique_id

        @serve.multiplexed(max_num_models_per_replica=max_adapters_per_replica)
        async def get_adapter(self, model_id: str) -> LoadedAdapter:
            tenant, name = split_model_id(model_id)
            await asyncio.wrap_future(self.engine.preload(tenant, name))
            return LoadedAdapter(self.engine, tenant, name)

        async def _target(self) -> tuple[str | None, str]:
            model_id = serve.get_multiplexed_model_id()
            if not model_id:
                return None, DEFAULT_TENANT
            adapter = await self.get_adapter(model_id)
            return adapter.name, adapter.tenant

        # Each answer names the replica that computed it, so that a client (or a test) can see
        # how multiplexing spread the adapter ids.
        async def classify(self, inputs: list[str]) -> dict:
            name, tenant = await self._target()
            return {**await self.engine.aclassify(inputs, name, tenant), "replica": self.replica}

        async def embed(self, inputs: list[str], normalize: bool = False) -> dict:
            name, tenant = await self._target()
            return {**await self.engine.aembed(inputs, name, tenant, normalize=normalize), "replica": self.replica}

        async def generate(self, prompt: str, **options: Any) -> dict:
            name, tenant = await self._target()
            return {**await self.engine.agenerate(prompt, name, tenant, **options), "replica": self.replica}

        async def put(self, model_id: str, archive: bytes) -> dict:
            """Upload a tar/zip of an adapter folder as the new live version of `model_id`."""
            tenant, name = split_model_id(model_id)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "upload"
                path.write_bytes(archive)
                return await asyncio.to_thread(self.engine.put, tenant, name, archive=path)

        async def adapters(self, tenant: str | None = None) -> list[dict]:
            return await asyncio.to_thread(self.engine.adapters, tenant)

        async def __call__(self, request: Request) -> Any:
            route = request.url.path.rstrip("/").rsplit("/", 1)[-1]
            try:
                answer = await _dispatch(self, route, await request.json())
                if answer is not None:
                    return answer
            except ServeError as err:
                return JSONResponse(as_json(err, self.engine.redact), status_code=status_of(err))
            except (KeyError, ValueError) as err:
                return JSONResponse(error_body("bad_request", f"malformed request body: {err}", 400), status_code=400)
            return JSONResponse(error_body("not_found", f"no route {route!r}", 404), status_code=404)

    return AdapterServer


async def _dispatch(server: Any, route: str, body: dict) -> dict | None:
    """The deployment's answer to a JSON body on one of its routes (None: no such route)."""
    if route == "classify":
        return await server.classify(body["inputs"])
    if route == "embed":
        return await server.embed(body["inputs"], bool(body.get("normalize", False)))
    if route == "generate":
        options = {k: body[k] for k in ("max_new_tokens", "temperature", "seed") if k in body}
        return await server.generate(body["prompt"], **options)
    return None
