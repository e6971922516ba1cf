"""OpenMP's wait at barriers for CPU decoding: a short spin, then sleep.

Decoding one token runs a few hundred short parallel regions (each matrix product, in torch's
kernels and in ours, llama/native.py), statically split over the threads, each ending in a
barrier. How long GNU OpenMP's threads spin there before sleeping decides the speed of a small
model: measured on an idle 2-core machine (benchmarks/README.md, ``python benchmarks/load.py
--variants``), the demo model decoded at ~44 tok/s with ``GOMP_SPINCOUNT=10000`` (a few
microseconds), ~34 with libgomp's default, ~27 with ``OMP_WAIT_POLICY=active`` (the spinning thread
takes cycles from the one that would finish the region) and ~26 with ``passive`` (every barrier a
sleep and a wake-up). A busy machine is the other half of the story: there a thread that shares
its core with another process stalls every barrier, whatever the spin; ``llama.devices.CpuThreads``
then lowers the thread count to the cores left free.

Torch and our kernels share one OpenMP runtime (torch ships ``libgomp.so.1``; our library links the
same soname, so the loader reuses it), which reads its settings once, when torch is imported.
``configure()`` runs from ``llama/__init__.py`` before anything imports torch and sets
``GOMP_SPINCOUNT=10000`` unless the user chose (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` in the
environment) or set ``LLAMA_OMP_DEFAULTS=1``. A program that imported torch before llama keeps the
runtime's default (``configure`` returns False then).
"""

import os
import sys

# Environment variables with which a user has already chosen how OpenMP threads wait.
USER_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SPIN_COUNT = "10000"  # libgomp's spin iterations at a barrier before sleeping: a few microseconds


def configure() -> bool:
    """Set ``GOMP_SPINCOUNT`` for this process and its children; True when it took effect."""
    if os.environ.get("LLAMA_OMP_DEFAULTS") == "1" or any(name in os.environ for name in USER_CHOICES):
        return False
    if "torch" in sys.modules:  # its OpenMP runtime has already read the environment
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
