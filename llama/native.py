"""Optional C kernels for decoding with bf16 (and int8) weights on x86-64 CPUs with AVX2 + FMA.

Decoding a token multiplies every weight matrix by one activation row (a few at batch > 1), so it
runs at the speed the weights stream from memory. torch's bf16 kernels widen bf16 to float32 well
below the machine's read bandwidth, even on CPUs with native bf16 (AVX512-BF16: half of it for one
row); ``csrc/bf16_matvec.c`` (ours) keeps up with it. ``llama.fast`` measures for how many rows.
The attention of a one-token step is the second largest cost: ``csrc/bf16_attention.c`` (ours)
reads the bf16 KV cache in place instead of copying it to float32 for torch's matmuls. What each
buys is measured in benchmarks/README.md. Everything else in the library is plain PyTorch, and so
is every result: the kernels compute in float32 like the torch path they replace (``llama.fast``);
only the order of the additions (and the exp's last bit) differ, and tests/test_native.py checks
them against float64.

The kernels are compiled on first use with the system C compiler (``$CC``, else ``cc``) into
``$XDG_CACHE_HOME/llama/native`` (``~/.cache/llama/native``), once per source version; that takes
about a second. Where they cannot be used (not x86-64 Linux, no AVX2/FMA, no compiler, or
``LLAMA_NATIVE=0`` in the environment), ``kernels()`` returns None and the model uses torch's
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
from typing import Callable, NamedTuple, Optional

import torch

from llama.devices import cache_root, cpu_flags

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "bf16_matvec.c", CSRC / "bf16_attention.c", CSRC / "int8_matvec.c", CSRC / "decode_layer.c")  # one shared library
HEADERS = (CSRC / "bf16.h", CSRC / "kernels.h")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)
MAX_ROWS = 8  # rows of x per matvec call; bf16_matvec.c's MAX_ROWS

MatVec = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Int8MatVec = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, q, scale) -> y
VARIANTS = {"avx2": 1, "avx512": 2, "avx512bf16": 3}  # the `variant` of bf16_matvec.c and int8_matvec.c
_LIBRARY: Optional[torch.library.Library] = None  # keeps the llama:: operator registrations alive


class Kernels(NamedTuple):
    """The compiled kernels as torch functions (see ``load``)."""

    matvec: MatVec
    attention: Attend
    int8_matvec: Int8MatVec


def cpu_supported() -> bool:
    """x86-64 Linux with AVX2 and FMA (the instructions the kernel is compiled for)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    return {"avx2", "fma"} <= cpu_flags()


def source_digest(compiler: Optional[str] = None) -> str:
    """16 hex digits of the kernels' sources, headers, compiler and flags: names the compiled
    library, and keys the verdicts measured with it (``llama.fast``)."""
    compiler = compiler or os.environ.get("CC") or "cc"
    digest = hashlib.sha256(" ".join((compiler,) + FLAGS + LIBS).encode())
    for path in SOURCES + HEADERS:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build(cache_dir: Optional[Path] = None) -> Path:
    """Compile the kernels (once per source and flags) into one shared library; return its path.

    Raises RuntimeError with the compiler's message when compilation fails or no compiler exists.
    Concurrent builds (torchrun ranks) are safe: each writes a temporary file and renames it.
    """
    if cache_dir is None:
        cache_dir = cache_root() / "native"  # one cache folder for everything the library makes
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH (set CC, or LLAMA_NATIVE=0 to stop trying)")
    target = Path(cache_dir) / f"llama_native-{source_digest(compiler)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        command = [compiler, *FLAGS, *map(str, SOURCES), "-o", tmp, *LIBS]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to compile {CSRC}:\n{result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(path: Path) -> Kernels:
    """The kernels in ``path`` as torch functions (CPU tensors; sums in float32 in every case):

    - ``matvec(x, w) -> y = x @ w.T``: x [rows, K] float32 or bf16 with rows <= 8, w [N, K]
      contiguous bf16, y [rows, N] in x's dtype; ``matvec.variant`` ("avx2", "avx512" or
      "avx512bf16", see ``bf16_variant``) says which loop runs;
    - ``int8_matvec(x, q, scale) -> y = (x @ q.T) * scale``: x [rows, K] float32 or bf16 with
      rows <= 8, q [N, K] contiguous int8, scale [N] float32 (``llama.quantize``), y in x's dtype;
      ``int8_matvec.variant`` ("avx2", "avx512" or "avx512bf16", see ``int8_variant``) says which loop runs,
      ``int8_matvec.use_variant`` switches it (for the fused decode step too);
    - ``attention(q, k, v) -> out``: one query per head, q [B, Hq, hd] float32 or bf16, k and v
      [B, Hkv, T, hd] bf16 with equal strides and contiguous last dimensions (views of a KV cache),
      Hq a multiple of Hkv; out [B, Hq, hd] in q's dtype: softmax(q k^T / sqrt(hd)) v, query head
      h using KV head h // (Hq / Hkv), as ``llama.fast.grouped_attention``.

    A bf16 output is each float32 result rounded to nearest even, as ``.to(torch.bfloat16)`` rounds.
    """
    lib = ctypes.CDLL(str(path))
    c_matvec, c_attention = lib.llama_bf16_matvec_variant, lib.llama_bf16_attention
    c_matvec.restype = c_attention.restype = ctypes.c_int
    c_matvec.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 4
    c_attention.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 8 + [ctypes.c_int] * 2
    c_int8 = lib.llama_int8_matvec
    c_int8.restype = ctypes.c_int
    c_int8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 4
    has_avx512 = bool(lib.llama_int8_has_avx512())
    has_avx512_bf16 = bool(lib.llama_bf16_has_avx512_bf16())
    set_range = lib.llama_bf16_set_range_variant
    set_range.restype, set_range.argtypes = ctypes.c_int, [ctypes.c_int]
    set_int8_range = lib.llama_int8_set_range_variant
    set_int8_range.restype, set_int8_range.argtypes = ctypes.c_int, [ctypes.c_int]

    def check_io(x: torch.Tensor, name: str) -> None:
        if x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
            raise ValueError(f"{name} must be a float32 or bf16 CPU tensor, got {x.dtype} on {x.device}")

    def rows_in_out(x: torch.Tensor, n: int, k: int, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A matrix-vector kernel's checked input x [1..8, k] (contiguous), its output [rows, n] in
        x's dtype, and the C kernels' bf16_io flag."""
        if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS or x.shape[1] != k:
            raise ValueError(f"{name} needs x of [1..{MAX_ROWS}, {k}], got {list(x.shape)}")
        check_io(x, f"{name}'s x")
        return x.contiguous(), torch.empty(x.shape[0], n, dtype=x.dtype), int(x.dtype == torch.bfloat16)

    def matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if w.dtype != torch.bfloat16 or w.device.type != "cpu" or not w.is_contiguous():
            raise ValueError(f"bf16_matvec needs a contiguous bf16 CPU weight, got {w.dtype} on {w.device}")
        x, y, bf16_io = rows_in_out(x, w.shape[0], w.shape[1], "bf16_matvec")
        threads, variant = torch.get_num_threads(), VARIANTS[matvec.variant]
        if c_matvec(w.data_ptr(), x.data_ptr(), y.data_ptr(), w.shape[0], w.shape[1], x.shape[0], bf16_io, variant, threads):
            raise MemoryError("bf16_matvec could not allocate its scratch rows")
        return y

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if k.dtype != torch.bfloat16 or v.dtype != torch.bfloat16 or k.device.type != "cpu" or v.device.type != "cpu":
            raise ValueError(f"bf16_attention needs bf16 CPU keys and values, got {k.dtype} and {v.dtype}")
        if k.dim() != 4 or k.shape != v.shape or k.stride() != v.stride() or k.stride(-1) != 1:
            raise ValueError(
                f"bf16_attention needs keys and values of one [B, Hkv, T, hd] shape and strides, contiguous in hd; "
                f"got {list(k.shape)} {k.stride()} and {list(v.shape)} {v.stride()}"
            )
        bsz, n_kv, total, hd = k.shape
        if q.dim() != 3 or q.shape[0] != bsz or q.shape[2] != hd or q.shape[1] % n_kv != 0 or total < 1:
            raise ValueError(
                f"bf16_attention needs q of [{bsz}, a multiple of {n_kv}, {hd}] for keys of {list(k.shape)}, "
                f"got {list(q.shape)}"
            )
        check_io(q, "bf16_attention's q")
        q = q.contiguous()
        out = torch.empty_like(q)
        bf16_io = int(q.dtype == torch.bfloat16)
        strides = (k.stride(0), k.stride(1), k.stride(2))
        args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), bsz, q.shape[1], n_kv, total, hd)
        if c_attention(*args, *strides, bf16_io, torch.get_num_threads()):
            raise MemoryError("bf16_attention could not allocate its scratch scores")
        return out

    def int8_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if q.dtype != torch.int8 or q.device.type != "cpu" or not q.is_contiguous():
            raise ValueError(f"int8_matvec needs a contiguous int8 CPU weight, got {q.dtype} on {q.device}")
        if scale.dtype != torch.float32 or scale.shape != (q.shape[0],) or not scale.is_contiguous():
            raise ValueError(f"int8_matvec needs float32 scales of [{q.shape[0]}], got {scale.dtype} {list(scale.shape)}")
        x, y, bf16_io = rows_in_out(x, q.shape[0], q.shape[1], "int8_matvec")
        variant = VARIANTS[int8_matvec.variant]
        args = (q.data_ptr(), scale.data_ptr(), x.data_ptr(), y.data_ptr(), q.shape[0], q.shape[1], x.shape[0])
        if c_int8(*args, bf16_io, variant, torch.get_num_threads()):
            raise MemoryError("int8_matvec could not allocate its scratch rows")
        return y

    def use_bf16_variant(name: str) -> None:
        """Run the bf16 products with loop ``name`` (one of ``matvec.variants``): this function's
        calls, and the fused decode step's (``csrc/decode_layer.c``: the AVX512-BF16 loop or else
        the AVX2 one, so that both paths give the same bits for "avx2" and "avx512bf16")."""
        if name not in matvec.variants:
            raise ValueError(f"bf16 loop {name!r} is not available on this CPU; available: {matvec.variants}")
        set_range(VARIANTS[name] if name == "avx512bf16" else VARIANTS["avx2"])
        matvec.variant = name

    matvec.variants = ["avx2"] + ["avx512"] * has_avx512 + ["avx512bf16"] * has_avx512_bf16
    matvec.use_variant = use_bf16_variant
    use_bf16_variant(bf16_variant(has_avx512, has_avx512_bf16))
    def use_int8_variant(name: str) -> None:
        """Run the int8 products with loop ``name`` (one of ``int8_matvec.variants``): this
        function's calls and the fused decode step's (``csrc/decode_layer.c``), the same bits."""
        if name not in int8_matvec.variants:
            raise ValueError(f"int8 loop {name!r} is not available on this CPU; available: {int8_matvec.variants}")
        set_int8_range(VARIANTS[name])
        int8_matvec.variant = name

    int8_matvec.variants = ["avx2"] + ["avx512"] * has_avx512 + ["avx512bf16"] * has_avx512_bf16
    int8_matvec.use_variant = use_int8_variant
    use_int8_variant(int8_variant(has_avx512, has_avx512_bf16))
    return Kernels(matvec, attention, int8_matvec)


def int8_variant(has_avx512: bool, has_avx512_bf16: bool = False) -> str:
    """"avx2" on every CPU; ``LLAMA_INT8_KERNEL`` forces one ("avx512" where the CPU has AVX-512 F
    and BW, "avx512bf16" where it has AVX512-BF16 too).

    "avx2" and "avx512" multiply int8 weights by x rounded to int16 (vpmaddwd,
    llama/csrc/int8_matvec.c), AVX2 16 pairs of weights an instruction, AVX-512 32. On the one
    AVX-512 CPU measured (AMD Zen 4, 2 threads, 1 GiB of 1B-shape matrices, benchmarks/README.md)
    they ran at the same speed within 5% at 1-8 rows, one row at the speed of memory, so the
    default is the loop every x86-64 CPU runs. Their float32 sums run in different orders (8 or 16
    lanes): results differ in the last bits. "avx512bf16" multiplies two to eight bf16 rows with
    the CPU's bf16 dot product on weights made bf16 (exact), one row or float32 rows as "avx512";
    ``llama.fast.int8_loop`` switches to it where a probe measures it faster.
    """
    return _variant("LLAMA_INT8_KERNEL", has_avx512, has_avx512_bf16)


def bf16_variant(has_avx512: bool, has_avx512_bf16: bool = False) -> str:
    """The bf16 loop: ``LLAMA_BF16_KERNEL`` (avx2, avx512, or avx512bf16 where the CPU has
    AVX512-BF16), else "avx2" on every CPU (``matvec.use_variant`` switches a loaded kernel).

    "avx512bf16" multiplies with the CPU's bf16 dot product (vdpbf16ps: 32 weights in one
    instruction, against a shift, a mask and two FMAs): the activations are rounded to bf16 (a no-op
    for a bf16 model, whose activations are bf16 already) and the sums run in another order, so
    results differ from the other loops within float32 rounding. It multiplies one input row of up
    to 4096 with the AVX2 loop (memory-bound either way: same speed, same bits), two to eight rows
    and longer single rows with vdpbf16ps (8 rows 1.5x AVX2's on Zen 4, single rows of 8192
    1.25-1.35x in fast minutes: csrc/bf16_matvec.c, ONE_ROW_AVX2). The kernels load with "avx2" on every CPU;
    ``llama.fast.bf16_loop`` then switches to "avx512bf16" where a probe measures it faster.

    The AVX-512 loop widens 32 weights in two instructions (AVX2: 16 in two), but one row streams
    at memory speed either way. On the one AVX-512 CPU measured (AMD Zen 4, benchmarks/README.md,
    one thread) it was not reliably faster: one row within 2%, 3-4 rows 3-6% slower, 5-8 rows
    0-12% faster (rows that torch's native bf16 path takes on that CPU). So it is not the default.
    """
    return _variant("LLAMA_BF16_KERNEL", has_avx512, has_avx512_bf16)


def _variant(env: str, has_avx512: bool, has_avx512_bf16: bool) -> str:
    """The kernel variant ``env`` names (one of ``VARIANTS``, each only where the CPU has it), else "avx2"."""
    forced = os.environ.get(env)
    if forced is None:
        return "avx2"
    if forced == "avx512bf16" and not has_avx512_bf16:
        raise ValueError(f"{env}='avx512bf16' needs a CPU with AVX512-BF16")
    if forced not in VARIANTS or (forced == "avx512" and not has_avx512):
        raise ValueError(f"{env}={forced!r}: use one of {list(VARIANTS)} (avx512 needs an AVX-512 CPU)")
    return forced


@functools.cache
def kernels() -> Optional[Kernels]:
    """The kernels (see ``load``; inside ``torch.compile`` and torch.profiler, custom operators
    ``llama::bf16_matvec`` and ``llama::bf16_attention``), or None where they cannot be used on
    this machine (see the module docstring)."""
    if os.environ.get("LLAMA_NATIVE", "1") == "0" or not cpu_supported():
        return None
    try:
        raw = load(build())
    except (OSError, RuntimeError) as e:
        print(f"llama: using torch's bf16 kernels; the native ones are unavailable: {e}", file=sys.stderr)
        return None

    # torch.compile sees each kernel as an opaque operator, and so does torch.profiler (a ctypes
    # call is invisible to it). They are registered with torch.library's low-level API: the
    # dispatcher then adds a few us a call, several times less than @custom_op, which matters at
    # the 113 matvec calls of a 16-layer decode step (benchmarks/README.md). Other eager calls
    # skip the dispatcher.
    global _LIBRARY
    if _LIBRARY is None:  # once per process: a namespace is defined once (this function's cache can be cleared)
        _LIBRARY = torch.library.Library("llama", "DEF")
        _LIBRARY.define("bf16_matvec(Tensor x, Tensor w) -> Tensor")
        _LIBRARY.define("bf16_attention(Tensor q, Tensor k, Tensor v) -> Tensor")
        _LIBRARY.define("int8_matvec(Tensor x, Tensor q, Tensor scale) -> Tensor")
        _LIBRARY.impl("int8_matvec", raw.int8_matvec, "CPU")
        _LIBRARY.impl("int8_matvec", lambda x, q, s: x.new_empty(x.shape[0], q.shape[0]), "Meta")
        _LIBRARY.impl("bf16_matvec", raw.matvec, "CPU")
        _LIBRARY.impl("bf16_attention", raw.attention, "CPU")
        _LIBRARY.impl("bf16_matvec", lambda x, w: x.new_empty(x.shape[0], w.shape[0]), "Meta")
        _LIBRARY.impl("bf16_attention", lambda q, k, v: torch.empty_like(q), "Meta")
    ops = torch.ops.llama

    def traced() -> bool:
        return torch.compiler.is_compiling() or torch.autograd.profiler._is_profiler_enabled

    def matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return ops.bf16_matvec(x, w) if traced() else raw.matvec(x, w)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ops.bf16_attention(q, k, v) if traced() else raw.attention(q, k, v)

    def int8_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return ops.int8_matvec(x, q, scale) if traced() else raw.int8_matvec(x, q, scale)

    # One setting per kernel: a variant set on these functions (tests, benchmarks) is the one the
    # loaded functions read, so they share their attributes.
    matvec.__dict__ = raw.matvec.__dict__
    int8_matvec.__dict__ = raw.int8_matvec.__dict__
    return Kernels(matvec, attention, int8_matvec)


@functools.cache
def library() -> Optional[ctypes.CDLL]:
    """The compiled library itself, for the fused decode step of ``csrc/decode_layer.c`` (``llama.fused``
    calls it through ctypes), or None where ``kernels()`` is None."""
    return ctypes.CDLL(str(build())) if kernels() is not None else None
