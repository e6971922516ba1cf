"""An optional C kernel for decoding bf16 weights on x86 CPUs that have AVX2 but no native bf16.

Decoding a token multiplies every weight matrix by one activation row (a few at batch > 1), so it
runs at the speed the weights stream from memory. On AVX2 CPUs torch's bf16 kernels widen bf16 to
float32 at about 55% of the machine's read bandwidth; ``csrc/bf16_matvec.c`` (about 140 lines of
C, ours) keeps up with it, which makes batch-1 decoding ~1.7x faster (benchmarks/RESULTS.md).
Everything else in the library is plain PyTorch, and so is every result: the kernel accumulates in
float32 like torch's; only the order of the additions differs (tests/test_native.py checks it
against float64).

The kernel is compiled on first use with the system C compiler (``$CC``, else ``cc``) into
``$XDG_CACHE_HOME/llama/native`` (``~/.cache/llama/native``), once per source version; that takes
about a second. Where it cannot be used (not x86-64 Linux, no AVX2/FMA, no compiler, or
``LLAMA_NATIVE=0`` in the environment), ``bf16_matvec()`` returns None and the model uses torch's
kernels, with the same results. A failed compilation is reported once on stderr.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

SOURCE = Path(__file__).parent / "csrc" / "bf16_matvec.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
MAX_ROWS = 8  # rows of x per call; the C kernel's MAX_ROWS

MatVec = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_LIBRARY: Optional[torch.library.Library] = None  # keeps the llama::bf16_matvec registration alive


def cpu_supported() -> bool:
    """x86-64 Linux with AVX2 and FMA (the instructions the kernel is compiled for)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma"} <= set(flags.split())


def build(cache_dir: Optional[Path] = None) -> Path:
    """Compile the kernel (once per source and flags) and return the shared library's path.

    Raises RuntimeError with the compiler's message when compilation fails or no compiler exists.
    Concurrent builds (torchrun ranks) are safe: each writes a temporary file and renames it.
    """
    if cache_dir is None:
        from llama.demo import cache_root  # one cache folder for everything the library makes

        cache_dir = cache_root() / "native"
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH (set CC, or LLAMA_NATIVE=0 to stop trying)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler,) + FLAGS).encode()).hexdigest()[:16]
    target = Path(cache_dir) / f"bf16_matvec-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to compile {SOURCE}:\n{result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(path: Path) -> MatVec:
    """The kernel in ``path`` as ``matvec(x, w) -> y = x @ w.T``: x [rows, K] float32 or bf16 with
    rows <= 8, w [N, K] contiguous bf16 on the CPU, y [rows, N] in x's dtype. Sums are float32 in
    both cases; a bf16 y is each sum rounded to nearest even, as ``F.linear`` on bf16 rounds it."""
    fn = ctypes.CDLL(str(path)).llama_bf16_matvec
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 3

    def matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if w.dtype != torch.bfloat16 or w.device.type != "cpu" or not w.is_contiguous():
            raise ValueError(f"bf16_matvec needs a contiguous bf16 CPU weight, got {w.dtype} on {w.device}")
        if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS or x.shape[1] != w.shape[1]:
            raise ValueError(f"bf16_matvec needs x of [1..{MAX_ROWS}, {w.shape[1]}], got {list(x.shape)}")
        if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
            raise ValueError(f"bf16_matvec needs a float32 or bf16 CPU x, got {x.dtype} on {x.device}")
        x = x.contiguous()
        y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
        bf16_io = int(x.dtype == torch.bfloat16)
        threads = torch.get_num_threads()
        if fn(w.data_ptr(), x.data_ptr(), y.data_ptr(), w.shape[0], w.shape[1], x.shape[0], bf16_io, threads) != 0:
            raise MemoryError("bf16_matvec could not allocate its scratch rows")
        return y

    return matvec


@functools.cache
def bf16_matvec() -> Optional[MatVec]:
    """The kernel as ``matvec(x, w)`` (see ``load``; inside ``torch.compile`` a custom op), or None
    where it cannot be used on this machine (see the module docstring)."""
    if os.environ.get("LLAMA_NATIVE", "1") == "0" or not cpu_supported():
        return None
    try:
        matvec = load(build())
    except (OSError, RuntimeError) as e:
        print(f"llama: using torch's bf16 kernels; the native one is unavailable: {e}", file=sys.stderr)
        return None

    # torch.compile sees the kernel as an opaque operator, llama::bf16_matvec, and so does
    # torch.profiler (a ctypes call is invisible to it). It is registered with torch.library's
    # low-level API: the dispatcher then adds ~3 us a call, where @custom_op adds ~20 (a decode
    # step makes 113 calls for a 16-layer model). Other eager calls skip the dispatcher.
    global _LIBRARY
    if _LIBRARY is None:  # once per process: a namespace is defined once (this function's cache can be cleared)
        _LIBRARY = torch.library.Library("llama", "DEF")
        _LIBRARY.define("bf16_matvec(Tensor x, Tensor w) -> Tensor")
        _LIBRARY.impl("bf16_matvec", matvec, "CPU")
        _LIBRARY.impl("bf16_matvec", lambda x, w: x.new_empty(x.shape[0], w.shape[0]), "Meta")
    op = torch.ops.llama.bf16_matvec

    def dispatch(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or torch.autograd.profiler._is_profiler_enabled:
            return op(x, w)
        return matvec(x, w)

    return dispatch
