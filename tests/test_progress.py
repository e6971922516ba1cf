"""Progress lines (llama/progress.py) and where the library prints them: Llama.build's loading.

Also the OpenMP wait policy set on import (llama/openmp.py), checked in fresh interpreters.
"""

import io
import subprocess
import sys

import pytest
import torch

from child_env import child_env
from llama.checkpoint import write_random_checkpoint
from llama.generation import Llama
from llama.memory import parameter_count
from llama.model import ModelArgs
from llama.progress import Progress, format_bytes

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_build_prints_the_memory_plan_then_loading_progress(tmp_path, meta_tokenizer_path, capsys):
    ckpt = tmp_path / "two_shards"
    write_random_checkpoint(ckpt, ARGS, n_shards=2, seed=0, dtype=torch.float32, tokenizer_path=meta_tokenizer_path)
    Llama.build(str(ckpt), None, max_seq_len=32, max_batch_size=1, device="cpu", dtype="fp32")
    err = capsys.readouterr().err
    assert "\r" not in err  # stderr is not a terminal here: plain lines only
    lines = err.splitlines()
    plan = next(i for i, line in enumerate(lines) if line.startswith("Memory plan on cpu: weights"))
    loading = [i for i, line in enumerate(lines) if "loading 2 shards (consolidated.00.pth ... consolidated.01.pth)" in line]
    assert loading and plan < loading[0]
    # Bytes of every float32 tensor of the model, reported as it is taken from the two files.
    total = 4 * parameter_count(ARGS)
    # A few lines, increasing, ending at 100% (the embedding and output matrices are most of the bytes).
    percents = [int(lines[i].split("%")[0].split()[-1]) for i in loading]
    assert 2 <= len(percents) <= 4 and percents == sorted(percents) and percents[-1] == 100, percents
    assert f"{format_bytes(total)} of {format_bytes(total)}" in lines[loading[-1]]


def test_plain_lines_off_a_terminal():
    out = io.StringIO()
    bar = Progress("reading", total=1000)
    bar.stream, bar.tty = out, False
    for _ in range(100):
        bar.update(10)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in out.getvalue()
    assert lines[0].startswith("  reading:  25% (250 B of 1.0 kB") and lines[-1].startswith("  reading: 100% (1.0 kB of 1.0 kB")


def test_one_line_redrawn_on_a_terminal():
    out = FakeTerminal()
    bar = Progress("tensors", total=3, unit="tensors", stream=out)
    for _ in range(3):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("  tensors: 100% (3/3 tensors)\n")
    assert text.startswith("\r  tensors:  33% (1/3 tensors)")  # the first update draws at once


def test_format_bytes():
    assert [format_bytes(n) for n in (12, 12_300, 850e6, 16_060_522_496)] == ["12 B", "12.3 kB", "850.0 MB", "16.1 GB"]


def _omp_settings(*before: str, **env: str) -> str:
    """OMP_WAIT_POLICY and GOMP_SPINCOUNT as a fresh interpreter sees them after ``before`` imports
    and ``import llama``."""
    code = "".join(f"import {m}; " for m in before) + (
        "import llama, os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    )
    base = child_env(**env)
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LLAMA_OMP_DEFAULTS"):
        if name not in env:
            base.pop(name, None)
    return subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
def test_import_sets_a_short_spin_unless_the_user_chose():
    assert _omp_settings() == "None 10000"
    assert _omp_settings(OMP_WAIT_POLICY="active") == "active None"
    assert _omp_settings(GOMP_SPINCOUNT="5") == "None 5"
    assert _omp_settings(LLAMA_OMP_DEFAULTS="1") == "None None"
    assert _omp_settings("torch") == "None None"  # too late: torch's OpenMP runtime has read the environment
