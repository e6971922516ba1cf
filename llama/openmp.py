"""OpenMP's wait policy for CPU decoding: passive, so a busy machine does not stall it.

Decoding one token runs a few hundred short parallel regions (each matrix product, in torch's
kernels and in ours, llama/native.py), statically split over the threads, each ending in a
barrier. GNU OpenMP's threads spin at a barrier before sleeping. When another process holds a
core, the thread that shares a core with it is descheduled for a time slice while its partner
spins, at every barrier. Measured on a busy 2-core machine (benchmarks/README.md, ``python
benchmarks/load.py --variants``), decoding the demo model with two threads ran at 0.1-0.7 tok/s
with libgomp's default spinning, against 3-12 tok/s with one thread; with
``OMP_WAIT_POLICY=passive`` two threads ran at 7.6-13 tok/s.

Torch and our kernels share one OpenMP runtime (torch ships ``libgomp.so.1``; our library links the
same soname, so the loader reuses it), which reads its settings once, when torch is imported.
``configure()`` runs from ``llama/__init__.py`` before anything imports torch and sets
``OMP_WAIT_POLICY=passive`` unless the user chose a policy (``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` in the environment) or set ``LLAMA_OMP_DEFAULTS=1``. A program that imported
torch before llama keeps the runtime's default (``configure`` returns False then).
"""

import os
import sys

# Environment variables with which a user has already chosen how OpenMP threads wait.
USER_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def configure() -> bool:
    """Set ``OMP_WAIT_POLICY=passive`` for this process and its children; True when it took effect."""
    if os.environ.get("LLAMA_OMP_DEFAULTS") == "1" or any(name in os.environ for name in USER_CHOICES):
        return False
    if "torch" in sys.modules:  # its OpenMP runtime has already read the environment
        return False
    os.environ["OMP_WAIT_POLICY"] = "passive"
    return True
