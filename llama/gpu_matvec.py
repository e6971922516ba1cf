"""Products of a few activation rows on CUDA GPUs (decoding): a Triton kernel that streams each
weight once, used for a weight shape only where it measured faster than torch's product.

Why: a batch-1 decode step reads every weight once, so it is as fast as its matrix-vector products
stream memory. torch's (cuBLAS's) one-row products of the Llama 3 8B shape on an H200 streamed
4096 x 4096 at 31% of the read bandwidth, 1024 x 4096 at 7%, 6144 x 4096 (wq|wk|wv) at 52%, and
only the 14336-row and larger ones at 90-100% (benchmarks/RESULTS-cuda.md); for int8 weights
torch's weight-only kernel (``_weight_int8pack_mm``) streamed 28-218 GB/s of ~4,000.

The kernel (``_matvec_kernel``): program p computes outputs n in [p * BLOCK_N, (p + 1) * BLOCK_N)
for every activation row (up to ``MAX_ROWS``), walking the K axis in BLOCK_K steps; each weight
tile [BLOCK_N, BLOCK_K] (bf16/fp16, or int8) is loaded once, widened to float32 in registers and
multiplied by each row's x tile, summed in float32; int8 sums are then multiplied by their row's
scale (``llama.quantize``: one float32 scale per output row). The result is rounded to x's dtype:
torch's product up to the order of the float32 additions.

Which product runs: ``apply_gpu_matvec(model)`` (``llama.fast.speed_up`` on a CUDA GPU, one rank)
groups the model's linear layers by weight shape and dtype and, for each group, times torch's
product and each kernel configuration (``CONFIGS``) over the group's own weights (all its layers
in turn: more bytes than the L2 cache holds, as in decoding; replayed from a CUDA graph, as
decoding replays them), for one row; the fastest kernel
configuration is then timed for ``MAX_ROWS`` rows too. A layer gets the kernel (``matvec``, for up
to ``matvec_rows`` rows) only where it beat torch; a configuration that fails to compile, or whose
output differs from torch's by more than rounding, is never used. Under ``torch.compile`` the
layers keep torch's product. ``LLAMA_GPU_MATVEC=0`` turns it off; without Triton nothing changes.
"""

import importlib.util
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama.devices import record_cuda_graph

MAX_ROWS = 8
VERDICTS: list[str] = []  # one line per weight group ``choose`` decided, with the timings (benchmarks print them)
# (BLOCK_N, BLOCK_K, num_warps): a few shapes of tile, one of which the probe keeps per weight shape.
CONFIGS = ((8, 512, 4), (16, 256, 4), (4, 1024, 4), (32, 128, 8))


def _kernel():
    """The Triton kernel (``llama.gpu_matvec_kernel``), imported on first use: importing Triton costs
    every run that does not need it time."""
    from llama.gpu_matvec_kernel import _matvec_kernel

    return _matvec_kernel


def enabled() -> bool:
    """Triton is importable and ``LLAMA_GPU_MATVEC`` is not 0."""
    return importlib.util.find_spec("triton") is not None and os.environ.get("LLAMA_GPU_MATVEC", "1") != "0"


def matvec(
    x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None, config: tuple[int, int, int] = CONFIGS[0]
) -> torch.Tensor:
    """x [rows, K] @ weight [N, K].T (times ``scale`` [N] per output, for int8 weights) -> [rows, N]
    in x's dtype, with the kernel in ``config`` (BLOCK_N, BLOCK_K, num_warps). rows <= MAX_ROWS."""
    rows, k = x.shape
    if rows > MAX_ROWS or weight.shape[1] != k or not weight.is_contiguous():
        raise ValueError(f"matvec takes up to {MAX_ROWS} rows and a contiguous [N, {k}] weight")
    x = x.contiguous()
    n = weight.shape[0]
    y = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    block_n, block_k, warps = config
    grid = ((n + block_n - 1) // block_n,)
    _kernel()[grid](
        x, weight, scale if scale is not None else weight, y, rows, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_SCALE=scale is not None, ROWS=max(2, 1 << (rows - 1).bit_length()), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps,
    )  # fmt: skip
    return y


def torch_product(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch's product, the reference the kernel is checked and timed against: ``F.linear``, int8
    weights (with their ``scale``) widened to x's dtype first."""
    if scale is None:
        return F.linear(x, weight)
    return F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)


def _kernel_for(config: tuple[int, int, int]) -> Callable[..., torch.Tensor]:
    """A layer's ``matvec``: (x, weight) for 16-bit layers, (x, q, scale) for int8 ones, with the kernel in
    ``config``; torch's product under ``torch.compile`` (Inductor makes its own kernels)."""

    def product(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch_product(x, weight, scale)
        return matvec(x, weight, scale, config)

    return product


def _seconds(fn: Callable[[], object], reps: int = 3) -> float:
    """The best of ``reps`` CUDA-event timings of ``fn`` (after one call that compiles and warms)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def _group_seconds(fn: Callable, x: torch.Tensor, weights: list[tuple[torch.Tensor, Optional[torch.Tensor]]]) -> float:
    """Seconds of GPU time for ``fn`` to multiply ``x`` by every weight of the group in turn (int8 ones
    with their scales), replayed from a CUDA graph as decoding replays it: timed from Python, the
    launches (~10-20 us each) would hide the kernels of small products."""
    graph, _ = record_cuda_graph(lambda: [fn(x, w, s) for w, s in weights])
    return _seconds(graph.replay)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to the rounding of x's dtype and the order of float32 sums."""
    return bool(((got.float() - want.float()).abs().max() <= 1e-2 * want.float().abs().max() + 1e-6).item())


def choose(
    layers: list[nn.Module], int8: bool, log: Optional[Callable[[str], None]] = None, x_dtype: Optional[torch.dtype] = None
) -> tuple[Optional[Callable], int]:
    """(matvec, rows) for a group of layers with one weight shape and dtype: the kernel and how many
    rows it takes (1 or ``MAX_ROWS``), or (None, 0) where torch's product was as fast. ``x_dtype``:
    the activations' (default: a 16-bit weight's own dtype; bf16 for int8 weights)."""
    weights = [(m.weight, m.scale if int8 else None) for m in layers]
    w0, s0 = weights[0]
    g = torch.Generator(w0.device).manual_seed(0)
    x_dtype = x_dtype or (torch.bfloat16 if int8 else w0.dtype)
    x1 = torch.randn(1, w0.shape[1], device=w0.device, generator=g).to(x_dtype)
    x8 = torch.randn(MAX_ROWS, w0.shape[1], device=w0.device, generator=g).to(x1.dtype)

    timings = {"torch": _group_seconds(torch_product, x1, weights)}
    best, best_time, best_config = None, timings["torch"], None
    for config in CONFIGS:
        kernel = _kernel_for(config)
        try:
            if not all(_close(kernel(x, w0, s0), torch_product(x, w0, s0)) for x in (x1, x8)):
                timings[str(config)] = float("nan")  # wrong: never used
                continue
            timings[str(config)] = _group_seconds(kernel, x1, weights)
        except Exception as e:  # a configuration this GPU or Triton cannot compile
            timings[str(config)] = float("nan")
            if log is not None:
                log(f"gpu_matvec: {config} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        if timings[str(config)] < best_time:
            best, best_time, best_config = kernel, timings[str(config)], config
    rows = 0
    if best is not None:
        rows = MAX_ROWS if _group_seconds(best, x8, weights) < _group_seconds(torch_product, x8, weights) else 1
    shape = f"{len(layers)} x {tuple(w0.shape)} {str(w0.dtype).removeprefix('torch.')}"
    us = ", ".join(f"{k}: {v / len(layers) * 1e6:.1f} us" for k, v in timings.items())
    del VERDICTS[:-63]  # the last builds' only
    VERDICTS.append(f"{shape}: {us} -> {'kernel ' + str(best_config) + ' for up to ' + str(rows) + ' row(s)' if best else 'torch'}")
    if log is not None:
        log(f"gpu_matvec {VERDICTS[-1]}")
    return best, rows


def apply_gpu_matvec(model: nn.Module, linear_types: tuple[type, ...], log: Optional[Callable[[str], None]] = None) -> int:
    """Give the CUDA linear layers of ``model`` (``linear_types``: 16-bit ``matvec(x, weight)`` layers such
    as ``llama.fast.FastLinear``, and ``llama.quantize.Int8Linear``) the kernel where it measured faster
    (see the module docstring); returns how many layers got it."""
    from llama.quantize import Int8Linear

    if not enabled():
        return 0
    groups: dict[tuple, list[nn.Module]] = {}
    for module in model.modules():
        int8 = isinstance(module, Int8Linear)
        if not (int8 or isinstance(module, linear_types)) or getattr(module, "parallel", None) is not None:
            continue
        w = module.weight
        if w.device.type != "cuda" or not w.is_contiguous() or w.dtype not in (torch.bfloat16, torch.float16, torch.int8):
            continue
        groups.setdefault((tuple(w.shape), w.dtype, int8), []).append(module)
    embedding = getattr(model, "tok_embeddings", None)  # the activations' dtype: the model's (fp16 on GPUs without bf16)
    x_dtype = embedding.weight.dtype if embedding is not None and embedding.weight.is_floating_point() else None
    given = 0
    with torch.inference_mode():
        for (_, _, int8), layers in groups.items():
            kernel, rows = choose(layers, int8, log, x_dtype if int8 else None)
            for m in layers:
                m.matvec, m.matvec_rows = kernel, rows
                given += kernel is not None
    return given
