"""What the tests need to start a child process (torchrun ranks, a fresh interpreter): its environment and a port."""

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """os.environ plus ``extra``, with this checkout first on PYTHONPATH and the caller's entries
    kept (a venv or ``--target`` folder the parent imports from must reach the child too)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **extra, "PYTHONPATH": path}


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for torchrun's ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
