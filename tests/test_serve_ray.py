"""The engine inside a Ray Serve deployment with model multiplexing (runs where ray[serve] installs)."""

from __future__ import annotations

import pytest

serve = pytest.importorskip("ray.serve")

import ray  # noqa: E402

import adapterkit as ak  # noqa: E402
from adapterkit.serve.ray_serve import deployment  # noqa: E402
from adapterkit.serve.store import AdapterStore  # noqa: E402

from .serving import Reference, load_minilm, make_adapter, minilm_path  # noqa: E402


@pytest.mark.slow
def test_ray_serve_multiplexed_by_adapter_id(tmp_path, minilm_tokenizer):
    """Two replicas of at most one adapter and one request each: every answer is right, whichever
    replica multiplexing sent it to, and both replicas answer."""
    builder = ak.adapt(load_minilm())
    store = AdapterStore(tmp_path / "store", fingerprint=builder.fingerprint())
    folders = {}
    for i, (tenant, name) in enumerate([("acme", "s"), ("globex", "s")]):
        folders[f"{tenant}/{name}"] = make_adapter(builder, name, tmp_path / f"src{i}", seed=i, scale=0.3)
        store.add(tenant, name, folders[f"{tenant}/{name}"])
    reference = Reference(ak.adapt(load_minilm()), minilm_tokenizer)
    expected = {model_id: reference.scores(folder, "hello there") for model_id, folder in folders.items()}
    # Bounded for a 2-core machine: two replicas of one CPU each, a small object store, no dashboard.
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, ignore_reinit_error=True,
             log_to_driver=False)
    try:
        app = deployment(minilm_path(), store.root, num_replicas=2, max_adapters_per_replica=1, threads=1,
                         max_ongoing_requests=1, ray_actor_options={"num_cpus": 1}).bind()
        handle = serve.run(app, name="adapterkit-test", route_prefix="/adapterkit")

        def check(model_id: str, out: dict) -> str:
            got = list(out["results"][0]["scores"].values())
            assert max(abs(a - b) for a, b in zip(got, expected[model_id], strict=True)) < 1e-4, model_id
            return out["replica"]

        replicas = set()
        for model_id in ("acme/s", "globex/s", "acme/s"):  # one at a time: each switch may unload the other
            out = handle.options(multiplexed_model_id=model_id).classify.remote(["hello there"]).result(timeout_s=120)
            replicas.add(check(model_id, out))
        # Four at once, while each replica takes one request at a time: both replicas must work.
        ids = ["acme/s", "globex/s"] * 2
        pending = [handle.options(multiplexed_model_id=m).classify.remote(["hello there"]) for m in ids]
        replicas |= {check(m, p.result(timeout_s=120)) for m, p in zip(ids, pending, strict=True)}
        assert len(replicas) == 2, replicas
        base = handle.classify.remote(["hello there"]).result(timeout_s=60)
        assert base["adapter"] is None
    finally:
        serve.shutdown()
        ray.shutdown()
