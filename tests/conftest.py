"""Shared fixtures: Meta's tokenizer.model from the llama-models wheel (never committed), a
tokenizer on it, and one torch thread for modules of tiny models."""

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (llama/gpu_matvec_kernel.py) run in Triton's interpreter on the CPU. Set before
    # any test imports Triton: it decides at import how its own functions run.
    os.environ.setdefault("TRITON_INTERPRET", "1")

META_TOKENIZER_MD5 = "08292403f8b173e7524d7fba7bbbd2d3"


def _meta_tokenizer_file() -> Path:
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "tests need Meta's tokenizer.model from the llama-models wheel: "
            "pip install --no-deps llama-models==0.3.0 (scripts/setup.sh does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    if md5 != META_TOKENIZER_MD5:
        raise RuntimeError(f"{path} has md5 {md5}, expected {META_TOKENIZER_MD5}")
    return path


@pytest.fixture(scope="session")
def meta_tokenizer_path() -> Path:
    """Path to Meta's Llama 3 tokenizer.model (md5 checked). Fails, never skips, when missing."""
    return _meta_tokenizer_file()


@pytest.fixture(scope="session")
def tokenizer(meta_tokenizer_path):
    """A ``llama.tokenizer.Tokenizer`` on Meta's tokenizer.model (read-only in tests: shared)."""
    from llama.tokenizer import Tokenizer

    return Tokenizer(meta_tokenizer_path)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of dim-64 models (``pytestmark = pytest.mark.usefixtures("one_thread")``): they
    gain nothing from threads, and OpenMP threads on busy cores can be 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
