"""The fast paths, applied to a built ``Transformer`` after construction (as ``llama.parallel`` applies its plan).

``llama.model`` is the plain math: ``nn.Linear`` products in the weights' dtype and one attention
call. ``apply_fast_paths`` swaps modules, in place, for subclasses that compute the same function
faster where it matters (benchmarks/README.md has the numbers):
- ``FastLinear`` (each ``nn.Linear``): 16-bit weights multiplied in float32 where that is faster
  than torch's 16-bit matmuls (CPUs without bf16 arithmetic: several times faster); the weights
  stay 16-bit in memory. A matrix-vector kernel (``llama.native``) can take over the products of a
  few rows;
- ``DecodeAttention`` (each ``Attention``): one-token steps as two small matmuls with K/V heads
  shared (``grouped_attention``), in float32 when the weights are multiplied in float32, or
  through a kernel that reads a bf16 cache in place; longer inputs keep the model's SDPA.
``speed_up`` picks them for a device and dtype, measuring on CPUs which path is faster
(``prompt_compute_dtype``, ``matvec_rows``); then joins each block's [wq; wk; wv] and [w1; w3]
where that is faster (``llama.fused_projections``), and on a GPU gives each weight shape the
products that measured faster there (``llama.gpu_matvec``). fairscale's layers (several ranks)
are left alone.
"""

import copy
import functools
import hashlib
import json
import math
import os
import platform
import time
from typing import Callable, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from llama import fused, gpu_matvec, native
from llama.fused_projections import enabled as fuse_projections_enabled, fuse_projections, keep_fused
from llama.devices import CpuThreads, cache_root, cores_used_elsewhere, cpu_flags, default_compute_dtype
from llama.model import Attention, Transformer, causal_mask
from llama.quantize import Int8Linear, Int8MatVec

MatVec = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [rows, in], weight) -> [rows, out]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # q [B, Hq, hd], k, v -> [B, Hq, hd]
M = TypeVar("M", bound=nn.Module)
T = TypeVar("T")


class FastLinear(nn.Linear):
    """``nn.Linear`` (same ``weight``) that can multiply 16-bit weights in float32.

    With ``compute_dtype = torch.float32`` each product is computed in float32 and rounded back to
    x's dtype:
    - one row (batch-1 decode), eager: torch's matrix-vector kernel, which already accumulates in
      float32 and reads half the bytes that a widened copy would;
    - a few rows inside ``torch.compile`` (the compiled decode step): written as multiply + sum,
      which Inductor fuses into one pass that widens the weights in registers, on all threads;
    - otherwise (prefill, batched decode): widen a block of rows at a time into ``widen_buffer``
      and run the float32 matmul on it. The buffer is cache-sized and allocated once, shared by
      every layer (``apply_fast_paths``): a fresh full-size float32 copy of a weight costs more in
      page faults than the matmul.
    ``compute_dtype = None`` is plain ``F.linear``.

    ``matvec``, when set, takes the products of up to ``matvec_rows`` rows, whatever the compute
    dtype: a function (x [rows, in], weight) -> [rows, out] in x's dtype that sums in float32, such
    as ``llama.native.kernels().matvec`` (``speed_up`` says when it is used).
    """

    WIDEN_BLOCK = 1 << 20  # weights widened per block: 1M elements = 4 MiB of float32, cache-sized
    COMPILED_MAX_ROWS = 16  # beyond this, the compiled step uses the blocked matmul too

    compute_dtype: Optional[torch.dtype] = None
    widen_buffer: Optional[torch.Tensor] = None  # [WIDEN_BLOCK] in compute_dtype
    matvec: Optional[MatVec] = None
    matvec_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight  # [out, in]
        rows = x.numel() // x.shape[-1]
        if self.matvec is not None and rows <= self.matvec_rows:
            return self.matvec(x.reshape(rows, -1), w).view(*x.shape[:-1], -1)  # [..., out] in x's dtype
        if self.compute_dtype is None or self.compute_dtype == w.dtype:
            return F.linear(x, w)
        if torch.compiler.is_compiling() and rows <= self.COMPILED_MAX_ROWS:
            # [out, 1, in] * [1, rows, in] summed over in -> [out, rows]: each weight row is read once.
            x2 = x.reshape(1, rows, -1).to(self.compute_dtype)
            out = (w[:, None, :].to(self.compute_dtype) * x2).sum(-1)
            return out.T.reshape(*x.shape[:-1], -1).to(x.dtype)
        if rows == 1:
            return F.linear(x, w)
        x32 = x.to(self.compute_dtype)
        out = torch.empty(*x.shape[:-1], w.shape[0], device=x.device, dtype=x.dtype)  # [..., out]
        step = max(1, self.WIDEN_BLOCK // w.shape[1])
        if self.widen_buffer is not None and self.widen_buffer.numel() >= step * w.shape[1]:
            block = self.widen_buffer[: step * w.shape[1]].view(step, w.shape[1])
        else:
            block = torch.empty(step, w.shape[1], device=w.device, dtype=self.compute_dtype)
        for start in range(0, w.shape[0], step):
            wide = block[: min(step, w.shape[0] - start)].copy_(w[start : start + step])  # [step, in]
            out[..., start : start + wide.shape[0]] = torch.matmul(x32, wide.T)
        return out


class DecodeAttention(Attention):
    """``Attention`` whose one-token steps skip SDPA: two small matmuls (``grouped_attention``) in
    ``compute_dtype`` (None: the cache's dtype), or ``kernel`` for an eager step over a bf16 cache."""

    compute_dtype: Optional[torch.dtype] = None
    kernel: Optional[Attend] = None

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int | torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        if q.shape[2] > 1:
            return super().attend(q, k, v, start_pos, mask)  # prefill: SDPA's fused kernel
        if self.kernel is not None and isinstance(start_pos, int) and k.dtype == torch.bfloat16:
            return self.kernel(q[:, :, 0], k, v)[:, :, None]  # q[:, :, 0]: [B, Hq, hd]; out [B, Hq, 1, hd]
        dtype = self.compute_dtype or q.dtype
        return grouped_attention(q.to(dtype), k.to(dtype), v.to(dtype), start_pos, mask).type_as(q)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int = 0, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + causal mask) v with each KV head serving n_heads/n_kv_heads queries.

    q: [B, Hq, S, hd]; k, v: [B, Hkv, T, hd]. ``mask`` ([S, T] bool, from ``causal_mask``) defaults
    to the causal mask of queries at start_pos ... start_pos + S - 1 over T = start_pos + S keys.
    Cached positions before start_pos are all visible, so a one-token eager decode step needs no
    mask at all. K/V are never repeated: the query heads of a group are folded into the rows of one
    matmul.
    """
    bsz, n_q, seqlen, hd = q.shape
    n_kv, total = k.shape[1], k.shape[2]
    n_rep = n_q // n_kv
    if mask is None and seqlen > 1:
        mask = causal_mask(start_pos, seqlen, total, q.device)
    # Consecutive query heads share a KV head: [B, Hkv, n_rep * S, hd].
    qg = q.reshape(bsz, n_kv, n_rep * seqlen, hd)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() / math.sqrt(hd)  # [B, Hkv, n_rep*S, T]
    if mask is not None:
        scores = scores.view(bsz, n_kv, n_rep, seqlen, total).masked_fill(~mask, float("-inf"))
        scores = scores.view(bsz, n_kv, n_rep * seqlen, total)
    probs = torch.softmax(scores, dim=-1).type_as(q)
    return torch.matmul(probs, v).view(bsz, n_q, seqlen, hd)


def _as(module: nn.Module, cls: type[M]) -> M:
    """``module`` as an instance of its subclass ``cls``: the same parameters, buffers and children."""
    if isinstance(module, cls):
        return module
    new = copy.copy(module)  # a shallow copy: the tensors and submodules are shared, not copied
    new.__class__ = cls
    return new


def apply_fast_paths(
    model: Transformer,
    compute_dtype: Optional[torch.dtype] = None,
    matvec: Optional[MatVec] = None,
    matvec_rows: int = 0,
    attend: Optional[Attend] = None,
    int8_matvec: Optional[Int8MatVec] = None,
) -> Transformer:
    """Swap ``model``'s ``nn.Linear`` and ``Attention`` modules for the fast ones, in place; returns ``model``.

    ``compute_dtype`` float32 multiplies 16-bit weights, and attends over a 16-bit cache, in
    float32 (None: in their own dtype). ``matvec`` multiplies up to ``matvec_rows`` activation rows
    by each contiguous bf16 CPU weight, and ``attend`` computes the attention of eager one-token
    steps over a bf16 CPU cache (both sum in float32 whatever ``compute_dtype``). ``int8_matvec``
    does the products of up to 8 rows of ``Int8Linear`` layers (``llama.quantize``): an int8 row is
    half a bf16 row's bytes, and widening it costs torch more than the kernel's whole product.
    Calling it again changes the settings.
    """
    device = model.tok_embeddings.weight.device
    # One widening buffer for every FastLinear: layers run one after another.
    buffer = None if compute_dtype is None else torch.empty(FastLinear.WIDEN_BLOCK, device=device, dtype=compute_dtype)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            new = _as(module, keep_fused(module, FastLinear))  # a joined layer stays joined
            new.compute_dtype, new.widen_buffer = compute_dtype, buffer
            w = new.weight
            usable = w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous()
            new.matvec = matvec if usable else None
            new.matvec_rows = matvec_rows if usable else 0
        elif isinstance(module, Int8Linear):  # llama.quantize: int8 weights, products in compute_dtype
            on_cpu = module.weight.device.type == "cpu" and module.parallel is None
            module.matvec = int8_matvec if on_cpu else None
            module.matvec_rows = native.MAX_ROWS if module.matvec is not None else 0
            module.compute_dtype = compute_dtype
            continue
        elif isinstance(module, Attention):
            new = _as(module, keep_fused(module, DecodeAttention))  # a fused attention stays fused
            new.compute_dtype = compute_dtype
            # The kernel reads a bf16 cache. The cache has the embedding's dtype (setup_cache), not
            # the projections': int8 weights keep a bf16 cache. ``attend`` checks it at each step.
            bf16_cache = model.tok_embeddings.weight.dtype == torch.bfloat16
            new.kernel = attend if bf16_cache and new.wk.weight.device.type == "cpu" else None
        else:
            continue
        if new is not module:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return model


# Two [out, in] bf16 matrices of 32 MiB, used in turn: together more than the last-level cache of
# most CPUs, so the probe streams from memory as decoding does (a matrix that fits in the cache
# measures the cache instead, and there torch's bf16 path can look twice as fast).
PROBE_SHAPE = (8192, 2048)


def _probe_weights() -> tuple[list[torch.Tensor], torch.Generator]:
    """The probes' two bf16 matrices of ``PROBE_SHAPE``, and the generator they came from (seeded
    on its own: the probes' numbers touch no global seed) for the probe's input rows."""
    rng = torch.Generator().manual_seed(0)
    return [torch.randn(PROBE_SHAPE, generator=rng).to(torch.bfloat16) for _ in range(2)], rng


def _best_time(fn: Callable[[], object], reps: int = 5) -> float:
    """The fastest of ``reps`` wall-clock runs: the run least disturbed by other processes."""
    fn()
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _probe_layers(weights: list[torch.Tensor], compute_dtype: Optional[torch.dtype]) -> list[FastLinear]:
    """A ``FastLinear`` (torch's path, no kernel) over each of the probe's bf16 matrices."""
    layers = []
    for w in weights:
        layer = FastLinear(w.shape[1], w.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(w, requires_grad=False)
        layer.compute_dtype = compute_dtype
        layers.append(layer)
    return layers


def measure_matvec_rows(matvec: MatVec, compute_dtype: Optional[torch.dtype]) -> int:
    """The largest row count r <= ``native.MAX_ROWS`` such that ``matvec`` beats torch's path
    (``FastLinear`` without it) for every row count up to r, on a bf16 matrix of ``PROBE_SHAPE``
    with torch's thread count; 0 if it never does. Takes about half a second."""
    weights, rng = _probe_weights()
    plain = _probe_layers(weights, compute_dtype)
    rows = 0
    for r in range(1, native.MAX_ROWS + 1):
        x = torch.randn(r, PROBE_SHAPE[1], generator=rng).to(torch.bfloat16)
        ours = _best_time(lambda: [matvec(x, w) for w in weights])
        if ours > _best_time(lambda: [layer(x) for layer in plain]):
            break
        rows = r
    return rows


def pick_bf16_loop(seconds: dict[str, float]) -> str:
    """The rule, from ``seconds[loop]`` (best times of ``native.MAX_ROWS`` rows through the probe's
    matrices, for "avx2" and "avx512bf16"): "avx512bf16" when it takes at most 0.9x avx2's time,
    else "avx2". A batch is compute-bound, so the race is decided by the CPU, not by the minute's
    memory bandwidth. For the bf16 loops, one row of up to 4096 runs the AVX2 loop in both
    (csrc/bf16_matvec.c, ONE_ROW_AVX2); longer single rows (w2) run vdpbf16ps in "avx512bf16":
    memory-bound, they measure the same in a slow minute and 1.25-1.35x in a fast one on Zen 4, so
    a probe of them would flip with the minute (it did: 0.95-1.09x in three runs). The int8 loops
    (``int8_loop``) follow the same rule: one row runs an integer loop in both."""
    return "avx512bf16" if seconds["avx512bf16"] <= 0.9 * seconds["avx2"] else "avx2"


def race_loops(kernel: Callable, run: Callable[[], object], reps: int = 5) -> dict[str, float]:
    """Best seconds of ``run()`` with ``kernel``'s loop set to "avx2" and to "avx512bf16"
    (``use_variant``), in turn within each of ``reps`` rounds (the same minute for both). Leaves
    ``kernel`` on the loop it ran before."""
    before, seconds = kernel.variant, {"avx2": math.inf, "avx512bf16": math.inf}
    try:
        for round_ in range(reps + 1):  # round 0 warms up (threads, pages) and is not counted
            for loop in seconds:
                kernel.use_variant(loop)
                start = time.perf_counter()
                run()
                if round_:
                    seconds[loop] = min(seconds[loop], time.perf_counter() - start)
    finally:
        kernel.use_variant(before)
    return seconds


def measure_bf16_loop(matvec: MatVec, reps: int = 5) -> str:
    """``pick_bf16_loop`` on this CPU: both loops with ``native.MAX_ROWS`` rows over the probe's two
    matrices of ``PROBE_SHAPE`` (``race_loops``). ~0.1 s."""
    weights, rng = _probe_weights()
    x = torch.randn(native.MAX_ROWS, PROBE_SHAPE[1], generator=rng).to(torch.bfloat16)
    return pick_bf16_loop(race_loops(matvec, lambda: [matvec(x, w) for w in weights], reps))


def measure_int8_loop(int8_matvec: Int8MatVec, reps: int = 5) -> str:
    """``pick_bf16_loop``'s rule for the int8 loops: "avx2" (the integer loop) against "avx512bf16"
    (the bf16 dot product from two rows on), ``native.MAX_ROWS`` bf16 rows over two matrices of the
    probe's shape in int8 (made as int8: no 16-bit copy raises the build's peak memory). ~0.1 s."""
    rng = torch.Generator().manual_seed(0)
    layers = [(torch.randint(-127, 128, PROBE_SHAPE, generator=rng, dtype=torch.int8), torch.rand(PROBE_SHAPE[0], generator=rng))
              for _ in range(2)]  # fmt: skip
    x = torch.randn(native.MAX_ROWS, PROBE_SHAPE[1], generator=rng).to(torch.bfloat16)
    return pick_bf16_loop(race_loops(int8_matvec, lambda: [int8_matvec(x, q, s) for q, s in layers], reps))


def int8_loop(int8_matvec: Int8MatVec) -> str:
    """Which int8 loop ``speed_up`` runs for a bf16 model's int8 layers: ``LLAMA_INT8_KERNEL``'s if
    set (``native.int8_variant``); else "avx512bf16" where the CPU has it and
    ``measure_int8_loop`` finds it faster; else "avx2". Its 2-8 rows multiply the bf16 activations
    exactly (the integer loop rounds them to int16 blocks first) with the CPU's bf16 dot product on
    weights made bf16 once per block of rows: 8 rows 1.4-1.6x the integer loop's speed on Zen 4
    (benchmarks/README.md; session 7 had measured 1.06-1.15x for a version that made them bf16 for
    fewer rows at a time). Kept beside ``matvec_rows``'s verdict, on the same terms."""
    if os.environ.get("LLAMA_INT8_KERNEL") is not None or "avx512bf16" not in int8_matvec.variants:
        return int8_matvec.variant
    return _cached_int8_loop(int8_matvec, torch.get_num_threads())


@functools.cache
def _cached_int8_loop(int8_matvec: Int8MatVec, threads: int) -> str:
    return _kept_verdict("int8-loop", [threads], lambda: measure_int8_loop(int8_matvec), lambda v: v in ("avx2", "avx512bf16"))


def bf16_loop(matvec: MatVec, compute_dtype: Optional[torch.dtype]) -> str:
    """Which bf16 loop ``speed_up`` runs: ``LLAMA_BF16_KERNEL``'s if set (``native.bf16_variant``);
    else "avx512bf16" where the CPU has it, the activations are bf16 (``compute_dtype`` None: the
    loop rounds x to bf16, exact only for them) and ``measure_bf16_loop`` finds it faster; else
    "avx2". Measured on Zen 4 (benchmarks/README.md): 8 rows 1.5x (the CPU's bf16 dot product
    against widening and FMAs: batches are compute-bound), a 1B batch-8 decode 47 -> 63-67 tok/s;
    one row of a long-row matrix (w2, K > 4096) 1.25-1.35x in fast minutes; other single rows run
    the AVX2 loop either way. Kept beside ``matvec_rows``'s verdict, on the same terms."""
    if os.environ.get("LLAMA_BF16_KERNEL") is not None:
        return matvec.variant
    if "avx512bf16" not in matvec.variants or compute_dtype is not None:
        return "avx2"
    return _cached_bf16_loop(matvec, torch.get_num_threads())


@functools.cache
def _cached_bf16_loop(matvec: MatVec, threads: int) -> str:
    return _kept_verdict("bf16-loop", [threads], lambda: measure_bf16_loop(matvec), lambda v: v in ("avx2", "avx512bf16"))


def matvec_rows(matvec: MatVec, compute_dtype: Optional[torch.dtype]) -> int:
    """How many activation rows ``speed_up`` gives our bf16 kernel on this machine (0 to 8).

    Measured (``measure_matvec_rows``) once per set of CPU flags, torch version, thread count
    and compute dtype, and kept in ``~/.cache/llama/native/`` beside the compiled kernels: a rule
    read off CPU flags held on the CPU it was tuned on only. A measurement taken while the machine
    is busier than its cores (load average) is used for this process but not kept.
    ``LLAMA_MATVEC_ROWS=N`` sets it instead.
    """
    forced = os.environ.get("LLAMA_MATVEC_ROWS")
    if forced is not None:
        if not forced.isdigit() or int(forced) > native.MAX_ROWS:
            raise ValueError(f"LLAMA_MATVEC_ROWS={forced!r}: use a number of rows from 0 to {native.MAX_ROWS}")
        return int(forced)
    return _cached_matvec_rows(matvec, compute_dtype, torch.get_num_threads(), getattr(matvec, "variant", ""))


@functools.cache
def _cached_matvec_rows(matvec: MatVec, compute_dtype: Optional[torch.dtype], threads: int, loop: str) -> int:
    key = [threads, str(compute_dtype), loop]  # the loop that runs: a faster one beats torch for more rows
    valid = lambda rows: type(rows) is int and 0 <= rows <= native.MAX_ROWS  # noqa: E731
    return _kept_verdict("matvec-rows", key, lambda: measure_matvec_rows(matvec, compute_dtype), valid)


# The prompt probe's rows: compute-bound on every path, as prompts are. FastLinear's float32 path
# widens each weight once for all rows, so it gains a little on longer prompts (the widening is
# ~1/4 of its time at 128 rows on one Zen 4 core, ~1/10 at 512).
PROMPT_ROWS = 128
# Settings that change which kernels torch runs on this CPU: a verdict holds for one of them only.
TORCH_ISA_SETTINGS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
PROMPT_PATHS = {"bf16": None, "float32": torch.float32}  # LLAMA_PROMPT_PATH's values -> compute dtype


def _product_seconds(layers: list[FastLinear], x: torch.Tensor) -> float:
    """Wall-clock seconds of x through every layer, one after another (what the prompt probe times)."""
    start = time.perf_counter()
    for layer in layers:
        layer(x)
    return time.perf_counter() - start


def measure_prompt_path(rounds: int = 3, clear: float = 1.5) -> str:
    """"bf16" when torch's bf16 matmul (``FastLinear`` with compute_dtype None) multiplies a prompt
    faster than float32 products of widened weights (compute_dtype float32), else "float32".

    Times ``PROMPT_ROWS`` bf16 rows by the two bf16 matrices of ``PROBE_SHAPE`` on torch's thread
    count, the paths in turn, best of ``rounds``; stops after the first when one path is ``clear``
    times faster (the usual case: 2-4x either way in benchmarks/README.md). Takes 0.5-1 s (Zen 4,
    natively and with torch's matmuls limited to AVX2, where the bf16 passes are the slow ones).
    """
    weights, rng = _probe_weights()
    x = torch.randn(PROMPT_ROWS, PROBE_SHAPE[1], generator=rng).to(torch.bfloat16)
    paths = {name: _probe_layers(weights, dtype) for name, dtype in PROMPT_PATHS.items()}
    with torch.no_grad():
        for layers in paths.values():
            _product_seconds(layers[:1], x[:8])  # warm up: threads, the widening buffer, GEMM set-up
        best = dict.fromkeys(paths, math.inf)
        for _ in range(rounds):
            for name, layers in paths.items():
                best[name] = min(best[name], _product_seconds(layers, x))
            if max(best.values()) > clear * min(best.values()):
                break
    return min(best, key=best.get)


def prompt_compute_dtype() -> Optional[torch.dtype]:
    """The compute dtype of bf16 weights' many-row products on this CPU: None (torch's bf16 matmuls)
    or float32 (float32 products of widened weights), whichever multiplies a prompt faster.

    Measured (``measure_prompt_path``) once per set of CPU flags, torch version and thread count,
    and kept beside ``matvec_rows``'s verdict, on the same terms. ``LLAMA_PROMPT_PATH=bf16`` or
    ``float32`` sets it instead. Measured (benchmarks/README.md): bf16 on Zen 4 (AVX512-BF16),
    float32 there with torch's matmuls limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``), as on AVX2 CPUs.
    """
    forced = os.environ.get("LLAMA_PROMPT_PATH")
    if forced is not None:
        if forced not in PROMPT_PATHS:
            raise ValueError(f"LLAMA_PROMPT_PATH={forced!r}: use bf16 (torch's bf16 matmuls) or float32 (widened weights)")
        return PROMPT_PATHS[forced]
    return PROMPT_PATHS[_cached_prompt_path(torch.get_num_threads())]


@functools.cache
def _cached_prompt_path(threads: int) -> str:
    return _kept_verdict("prompt-path", [threads], measure_prompt_path, lambda path: path in PROMPT_PATHS)


def _kept_verdict(kind: str, key: list, measure: Callable[[], T], valid: Callable[[object], bool]) -> T:
    """``measure()``'s result, kept in ``~/.cache/llama/native/{kind}-{hash}.json`` per CPU (flags,
    and torch's ISA settings), torch version, build of our kernels (a changed loop is measured
    again) and ``key``; not kept when the machine is busier than its cores (load average), nor
    when other processes used more than a fifth of a core while it measured (a probe beside
    another process's work once kept the slower bf16 loop: benchmarks/README.md, session 10).
    A kept verdict that is not ``valid`` (a damaged file) is measured again."""
    isa = [os.environ.get(name) for name in TORCH_ISA_SETTINGS]
    full_key = json.dumps([platform.processor(), sorted(cpu_flags()), isa, torch.__version__, native.source_digest(), *key])
    path = cache_root() / "native" / f"{kind}-{hashlib.sha256(full_key.encode()).hexdigest()[:16]}.json"
    try:
        kept = json.loads(path.read_text())["verdict"]
        if valid(kept):
            return kept
    except (OSError, ValueError, KeyError, TypeError):
        pass
    verdict, elsewhere = cores_used_elsewhere(measure)
    if os.getloadavg()[0] <= (os.cpu_count() or 1) and (elsewhere is None or elsewhere < 0.2):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"verdict": verdict, "key": json.loads(full_key)}))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache: measure again next time
    return verdict


def speed_up(model: Transformer, world_size: int = 1) -> Transformer:
    """The fast paths for the model's device and weight dtype (``Llama.build`` calls it).

    The rule, the same on every x86-64 CPU with AVX2 + FMA, each choice measured on this machine
    rather than read off a CPU flag (benchmarks/README.md has the numbers):
    - longer inputs (prompts, and batches of more rows than the kernel takes) of bf16 weights run
      whichever of torch's paths ``prompt_compute_dtype`` measured faster: its bf16 matmuls (fast
      where the CPU has AVX512-BF16 or AMX) or float32 products of widened weights (AVX2 CPUs);
    - products of a few rows (decoding) run our kernel (``llama.native``) for as many rows as it
      beats that path (``matvec_rows``: all 8 on AVX2 CPUs; fewer where torch's bf16 kernels are
      native and fast);
    - one-token attention over a bf16 cache runs our kernel; without it (torch.compile's step,
      ``LLAMA_NATIVE=0``) it computes in the prompt path's dtype, as do one-row products when the
      kernel takes none;
    - int8 weights (``llama.quantize``) run our int8 kernel for up to 8 rows, and longer inputs in
      the prompt path's dtype;
    - eager one-token steps of a bf16 (or bf16 and int8) model run every block in one C call
      (``llama.fused``) unless ``LLAMA_FUSED=0``;
    - each block's [wq; wk; wv] and [w1; w3] are joined into one product each
      (``llama.fused_projections``) on a GPU, and on the CPU where the C step does not run
      (``fuse_projections_here``), unless ``LLAMA_FUSE_PROJECTIONS=0``.
    float16 weights, GPUs, and several ranks keep the rule of ``default_compute_dtype`` (no probe).
    With several ranks fairscale's layers replace every ``nn.Linear``, and torch's kernels run
    throughout.
    """
    weight = model.tok_embeddings.weight
    int8 = any(isinstance(m, Int8Linear) for m in model.modules())
    on_cpu = weight.device.type == "cpu" and world_size == 1
    bf16 = on_cpu and weight.dtype == torch.bfloat16
    kernels = native.kernels() if on_cpu and (bf16 or int8) else None
    compute_dtype, rows = default_compute_dtype(weight.device, weight.dtype), 0
    if bf16:
        # Measured with the threads generation would run now (fewer while other processes hold
        # cores): with two threads beside a busy process, the float32 path's many short parallel
        # regions ran 13x slower than on one thread, and the probe picked the wrong path.
        threads = CpuThreads(every=1)
        threads.adjust()
        try:
            compute_dtype = prompt_compute_dtype()
            if kernels is not None:
                kernels.matvec.use_variant(bf16_loop(kernels.matvec, compute_dtype))  # for every model in the process
                rows = matvec_rows(kernels.matvec, compute_dtype)
                if int8:  # its batches on the bf16 dot product where faster (float32 rows keep the integer loop)
                    kernels.int8_matvec.use_variant(int8_loop(kernels.int8_matvec))
        finally:
            threads.restore()
    if kernels is None:
        apply_fast_paths(model, compute_dtype)
    else:
        # The int8 kernel takes float32 or bf16 rows; a float16 model's int8 layers widen in torch.
        int8_matvec = kernels.int8_matvec if weight.dtype in (torch.float32, torch.bfloat16) else None
        apply_fast_paths(model, compute_dtype, kernels.matvec, rows, kernels.attention, int8_matvec)
        if bf16 and fused.enabled():  # whole blocks of a decode step in C, bf16 or int8 (llama.fused)
            fused.apply_fused(model, (nn.Linear, FastLinear), rows)
    if fuse_projections_here(model, world_size):
        fuse_projections(model, (nn.Linear, FastLinear))
    if weight.device.type == "cuda" and world_size == 1:  # few-row products: a Triton kernel where faster
        gpu_matvec.apply_gpu_matvec(model, (FastLinear,))
    return model


def fuse_projections_here(model: Transformer, world_size: int = 1) -> bool:
    """Whether ``speed_up`` joins [wq; wk; wv] and [w1; w3] (``llama.fused_projections``): not where
    ``LLAMA_FUSE_PROJECTIONS=0``, nor with several ranks (fairscale's layers are left alone); on a
    GPU always (batch-1 steps are memory-bound, and one big matrix streams nearer to the bandwidth
    than several small ones: 8B shape on an H200, 7.43 -> 6.90 ms a step); on the CPU where the C step of
    ``llama.fused`` does not run (it reads the separate bf16 layers) and the weights are bf16 or
    int8, where it measured faster. Measured on a 2-core AMD EPYC VM (Zen 4: AVX-512, avx512_bf16,
    no AMX; two Llama 3.2 1B-shaped blocks, 2 threads, ``LLAMA_FUSED=0``, best of 8 rounds): bf16 one-token step 7.67 -> 6.64 ms and
    8.37 -> 7.01 ms (two runs), 128-token prefill 91.6 -> 90.3 ms; int8 step 3.94 -> 3.36 ms,
    prefill 97.2 -> 96.9 ms; float32 a wash (step 26.7 -> 25.8 ms, prefill 251 -> 256 ms), so
    float32 (and float16, not measured) CPU models stay unfused."""
    weight = model.tok_embeddings.weight
    if not fuse_projections_enabled() or world_size != 1:
        return False
    if weight.device.type != "cpu":
        return weight.device.type != "meta"
    if any(isinstance(block, fused.FusedBlock) for block in model.layers):
        return False
    int8 = any(isinstance(m, Int8Linear) for m in model.modules())
    return int8 or weight.dtype == torch.bfloat16
