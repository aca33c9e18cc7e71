"""`import adapterkit` sets OpenMP's wait policy before torch loads libgomp, and only then, and never over
the user's own settings (adapterkit/openmp.py says why a serving process needs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SHOW = "import os, json; print(json.dumps({k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}))"


def _environment_after(imports: str, **given: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(given)
    out = subprocess.run([sys.executable, "-c", f"{imports}; {SHOW}"], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("imports", "given", "expected"), [
    ("import adapterkit", {}, {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "200000"}),
    ("import adapterkit", {"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}),
    ("import torch; import adapterkit", {}, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}),
])
def test_the_wait_policy_is_set_only_before_torch_loads_and_only_when_unset(imports, given, expected):
    assert _environment_after(imports, **given) == expected
