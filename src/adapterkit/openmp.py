"""OpenMP's wait policy for a process that computes on a thread other than its main one.

libgomp, the OpenMP runtime PyTorch's CPU build loads, reads its wait policy once, when torch is
imported. Each thread that starts parallel work gets a pool of OpenMP workers of its own; when a
process holds more such workers than it has CPUs (the main thread's pool, from loading a model,
beside the serving Engine's model thread and its pool), libgomp's default cuts the time an idle
worker spins from 300,000 iterations to 1,000, so every parallel region wakes its workers through
the kernel. A decode step is hundreds of short parallel regions: the tiny Llama's captured step
took 1.3 ms on the main thread and 8 ms on another (the Engine: 210 -> 540 tokens/s for one stream
with the policy below). Spinning actively for 200,000 iterations, an idle pool still sleeps after
a fraction of a millisecond; processes that run several pools at once lose that much CPU per region.

`prefer_spinning` sets OMP_WAIT_POLICY=ACTIVE and GOMP_SPINCOUNT=200000 when the user set neither and
torch is not loaded yet (after that libgomp no longer reads them); importing this module calls it, and
`import adapterkit` imports it before anything else.
"""

from __future__ import annotations

import os
import sys

SETTINGS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "200000"}


def prefer_spinning() -> bool:
    """Set SETTINGS for libgomp if it has not read its environment yet and the user set none of them;
    returns whether they were set."""
    if "torch" in sys.modules or any(name in os.environ for name in SETTINGS):
        return False
    os.environ.update(SETTINGS)
    return True


#: whether this process's environment holds SETTINGS because of adapterkit (not the user)
applied = prefer_spinning()
