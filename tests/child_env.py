"""The environment for a child Python process (torchrun ranks, a fresh interpreter) of the tests."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """os.environ plus ``extra``, with this checkout first on PYTHONPATH and the caller's entries
    kept (a venv or ``--target`` folder the parent imports from must reach the child too)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **extra, "PYTHONPATH": path}
