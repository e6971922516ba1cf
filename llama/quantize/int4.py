"""int4 weight-only quantization: group-wise asymmetric, GROUP (128) weights along a row sharing a
bf16 scale and a bf16 zero point, multiplied by torch's int4 kernels (``Llama.build(quantize="int4")``).

The formula (the convention of torch's kernels, found on the CPU by comparing
``aten._weight_int4pack_mm_for_cpu`` with float64 references of candidate formulas on random data:
this one matched to 3e-7 in float32, the others were off by 30-95%), for weight [out, in], group
g = k // GROUP, and ``sz = scales_and_zeros`` [in / GROUP, out, 2]:

    w[n, k] = (q[n, k] - 8) * sz[g, n, 0] + sz[g, n, 1],   q in 0 ... 15

Quantizing (float32, from the weight's exact values), per group: lo, hi = its min and max;
scale = (hi - lo) / 15 and zero = lo + 8 * scale, each rounded to bf16 (what the kernels read);
then q = clamp(round((w - zero) / scale + 8), 0, 15) with those rounded values, so q is the
nearest code to each weight on the grid that is stored: every weight within scale / 2 of its
dequantized value (unless the bf16 rounding of zero moved the grid by more than half a step, which
needs a group far from 0 relative to its spread; not so for trained projections). A constant group
(hi == lo) gets scale 0, zero = its value (rounded to bf16), q = 8: dequantized exactly to bf16.

Kernels and layouts (``Int4Linear.layout``):
- "nibbles": the portable form, made at load on the CPU (``int4_transform``): uint8 [out, in / 2],
  byte j of a row = q[2j] << 4 | q[2j + 1] (the even element in the high nibble: the input
  ``aten._convert_weight_to_int4pack`` takes on CUDA). A layer still in this form (on a device
  without a kernel: mps) multiplies a dequantized copy of its weight.
- "cpu": ``aten._convert_weight_to_int4pack_for_cpu`` of q as int32 [out, in] (an opaque uint8
  [out, in / 2]; rows are packed in blocks of 64, so it is made a block of rows at a time, in place
  of the nibbles), multiplied by ``aten._weight_int4pack_mm_for_cpu``.
- "cuda": ``aten._convert_weight_to_int4pack(nibbles, INNER_K_TILES)`` (int32 [out / 8, in / 128, 32,
  4]), multiplied by ``aten._weight_int4pack_mm``.
The nibble order and the formula were checked on an H200 (torch 2.11+cu130): high nibble = even
element gave 2.7e-3 relative error against float64 for every inner_k_tiles (2, 4, 8), the other
order 1.3; float32 x is refused. This module's CUDA layers then passed tests/test_cuda.py there
(2.6-3.7e-3 against float64 for 1, 7 and 64 rows), and the Llama 3 8B shape decoded at 183 tok/s
against bf16's 146 (benchmarks/RESULTS-cuda.md).
Both kernels take bf16 activations here (CUDA's takes only bf16; the CPU's wants scales_and_zeros
in x's dtype, and they are stored in bf16): x is cast to bf16 and the result back to x's dtype.
Measured on a 2-core AMD EPYC VM (Zen 4: AVX-512, avx512_bf16, no AMX; 2 threads), one row times a
[2048, 8192] weight: the CPU kernel 0.42 ms, torch's bf16 ``F.linear`` 1.31 ms (cache-warm, best of 30).

Which weights (decided): the seven projections of every layer and ``output`` (as int8: the
vocabulary projection is 13% of Llama 3.2 1B's bytes), each only where both kernels take its shape
(``fits``: in_features a multiple of GROUP, out_features a multiple of 16; every Llama 3 shape);
a weight of another shape stays in the model's dtype, and the memory plan counts it so
(``llama.memory``). Model parallelism is refused by ``Llama.build`` (one rank only): a row-parallel
slice would need its own groups and the kernels know nothing of fairscale's layers. int8 folders
(``python -m llama.quantize``) stay int8-only; there is no int4 folder format.
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama.quantize import PROJECTIONS, is_quantized_key

GROUP = 128  # weights along a row per scale and zero point (torch's kernels take 32, 64, 128, 256)
ROWS = 16  # out_features must be a multiple of this (the CPU kernel; CUDA's needs 8)
CPU_PACK_ROWS = 64  # the CPU packing is the same packed a block of this many rows at a time
INNER_K_TILES = 8  # CUDA packing: in_features a multiple of 16 * 8 = 128 = GROUP
BLOCK = 1 << 20  # weights quantized (float32 temporaries) or packed per block of rows

Empty = Callable[[torch.Size, torch.dtype], torch.Tensor]


def fits(out_features: int, in_features: int, group: int = GROUP) -> bool:
    """Whether torch's int4 kernels (CPU and CUDA) take a weight [out_features, in_features]."""
    return in_features % group == 0 and in_features >= group and out_features % ROWS == 0 and out_features > 0


def _quantize_rows(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 [rows, in] -> (q uint8 [rows, in], scale bf16 [rows, groups], zero bf16 [rows, groups])."""
    g = w.view(w.shape[0], -1, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).to(torch.bfloat16)
    constant = scale == 0
    zero = torch.where(constant, lo, lo + 8 * scale.float()).to(torch.bfloat16)
    divisor = torch.where(constant, torch.ones_like(scale), scale).float()
    q = ((g - zero.float()[..., None]) / divisor[..., None] + 8).round_().clamp_(0, 15)
    q = torch.where(constant[..., None], torch.full_like(q, 8), q)
    return q.to(torch.uint8).view(w.shape), scale, zero


def quantize_int4(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] (any float dtype, in a multiple of ``group``) -> (q uint8 [out, in] in 0 ... 15,
    scales bf16 [out, in / group], zeros bf16 [out, in / group]): the module docstring's formula."""
    out_features, in_features = weight.shape
    if in_features % group:
        raise ValueError(f"int4: in_features={in_features} is not a multiple of the group size {group}")
    q = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out_features, in_features // group, dtype=torch.bfloat16, device=weight.device)
    zeros = torch.empty_like(scales)
    step = max(1, BLOCK // max(in_features, 1))
    for start in range(0, out_features, step):
        q[start : start + step], scales[start : start + step], zeros[start : start + step] = _quantize_rows(
            weight[start : start + step].float(), group
        )
    return q, scales, zeros


def dequantize_int4(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int = GROUP, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(q [out, in], scales, zeros [out, in / group]) -> (q - 8) * scale + zero in ``dtype`` (computed
    in float64 for float64, else float32)."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    s = scales.to(wide).repeat_interleave(group, dim=1)
    z = zeros.to(wide).repeat_interleave(group, dim=1)
    return ((q.to(wide) - 8) * s + z).to(dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [out, in] (values 0 ... 15, in even) -> uint8 [out, in / 2], byte j = q[:, 2j] << 4 | q[:, 2j + 1]."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: uint8 [out, in / 2] -> uint8 [out, in]."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).view(packed.shape[0], -1)


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(scales, zeros [out, groups]) -> bf16 [groups, out, 2], the kernels' operand."""
    return torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def split_scales_and_zeros(sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [groups, out, 2] -> (scales, zeros [out, groups])."""
    return sz[..., 0].T, sz[..., 1].T


def quantize_packed(
    weight: torch.Tensor, group: int = GROUP, done: Optional[Callable[[torch.Tensor], None]] = None,
    empty: Optional[Empty] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (nibbles uint8 [out, in / 2], scales_and_zeros bf16 [in / group, out, 2]),
    a block of rows at a time (float32 temporaries of BLOCK weights); ``done`` is called with each
    block of ``weight`` once it is quantized, ``empty`` allocates the results (on the CPU)."""
    out_features, in_features = weight.shape
    if not fits(out_features, in_features, group):
        raise ValueError(f"int4: torch's kernels do not take a [{out_features}, {in_features}] weight "
                         f"(in_features a multiple of {group}, out_features of {ROWS})")  # fmt: skip
    alloc = empty if empty is not None and weight.device.type == "cpu" else (
        lambda shape, dtype: torch.empty(shape, dtype=dtype, device=weight.device))  # fmt: skip
    nibbles = alloc(torch.Size((out_features, in_features // 2)), torch.uint8)
    sz = alloc(torch.Size((in_features // group, out_features, 2)), torch.bfloat16)
    step = max(1, BLOCK // in_features)
    for start in range(0, out_features, step):
        block = weight[start : start + step]
        q, s, z = _quantize_rows(block.float(), group)
        nibbles[start : start + step] = pack_nibbles(q)
        sz[:, start : start + step, 0], sz[:, start : start + step, 1] = s.T, z.T
        if done is not None:
            done(block)
    return nibbles, sz


def pack_for_cpu(nibbles: torch.Tensor) -> torch.Tensor:
    """``nibbles`` (uint8 [out, in / 2], on the CPU) repacked for the CPU kernel, in place (a block of
    CPU_PACK_ROWS-multiple rows at a time: no int32 copy of the whole matrix); returns it."""
    out_features, half = nibbles.shape
    step = max(CPU_PACK_ROWS, BLOCK // (2 * half) // CPU_PACK_ROWS * CPU_PACK_ROWS)
    for start in range(0, out_features, step):
        rows = nibbles[start : start + step]
        q = unpack_nibbles(rows).to(torch.int32)
        rows.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))  # (inner_k_tiles: unused on CPU)
    return nibbles


def pack_for_cuda(nibbles: torch.Tensor) -> torch.Tensor:
    """``nibbles`` (uint8 [out, in / 2], on a CUDA device) -> int32 [out / 8, in / 128, 32, 4] for ``_weight_int4pack_mm``."""
    return torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), INNER_K_TILES)


def cpu_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def cuda_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm") and hasattr(torch.ops.aten, "_convert_weight_to_int4pack")


def unsupported(device: torch.device) -> Optional[str]:
    """Why ``quantize="int4"`` cannot run on ``device`` (None: it can). torch's CUDA int4 kernel is
    written for Ampere's tensor cores (compute capability 8.0 and later); elsewhere the build's
    kernels must exist. (Other devices, such as mps, multiply a dequantized copy: slow, but they run.)"""
    if device.type == "cuda":
        if not cuda_kernel_available():
            return "this torch build has no CUDA int4 kernel (aten._weight_int4pack_mm)"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 0):
            return f"torch's CUDA int4 kernel needs a GPU of compute capability 8.0 or more (Ampere), not {major}.{minor}"
    elif device.type == "cpu" and not cpu_kernel_available():
        return "this torch build has no CPU int4 kernel (aten._weight_int4pack_mm_for_cpu; torch >= 2.6 has it)"
    return None


class Int4Linear(nn.Module):
    """A bias-free linear layer with int4 weights: y = x @ ((q - 8) * scale + zero).T, in x's dtype.

    Buffers ``weight`` (the packed codes: uint8 [out, in / 2] for "nibbles" and "cpu", int32 4-D for
    "cuda"; see the module docstring) and ``scales_and_zeros`` (bf16 [in / group, out, 2]).
    ``pack()`` turns the portable nibbles into the kernel's layout for the device they are on.
    """

    def __init__(self, in_features: int, out_features: int, group: int = GROUP, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.layout = "nibbles"
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        sz = torch.zeros(in_features // group, out_features, 2, dtype=torch.bfloat16, device=device)
        self.register_buffer("scales_and_zeros", sz)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group: int = GROUP) -> "Int4Linear":
        """The int4 layer of a float weight [out, in] (not packed: call ``pack``)."""
        layer = cls(weight.shape[1], weight.shape[0], group, device="meta")
        layer.weight, layer.scales_and_zeros = quantize_packed(weight, group)
        return layer

    @property
    def local_out_features(self) -> int:
        """Output features, whatever the layout of ``weight`` (``llama.model.local_out_features``): one rank only."""
        return self.out_features

    def pack(self) -> "Int4Linear":
        """Repack the nibbles for the kernel of the device they are on (CPU, CUDA; others keep them)."""
        if self.layout != "nibbles":
            return self
        with torch.no_grad():
            device = self.weight.device.type
            if device == "cpu" and cpu_kernel_available():
                self.weight = pack_for_cpu(self.weight)
                self.layout = "cpu"
            elif device == "cuda" and cuda_kernel_available():
                self.weight = pack_for_cuda(self.weight)
                self.layout = "cuda"
        return self

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] as the kernels see it (from the nibbles only: before ``pack``)."""
        if self.layout != "nibbles":
            raise RuntimeError("Int4Linear.dequantized: the weight is packed for a kernel already")
        s, z = split_scales_and_zeros(self.scales_and_zeros)
        return dequantize_int4(unpack_nibbles(self.weight), s, z, self.group, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "nibbles":
            return F.linear(x, self.dequantized(x.dtype))
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if self.layout == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group, self.scales_and_zeros)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group} ({self.layout})"


def sz_key(weight_key: str) -> str:
    """``layers.0.attention.wq.weight`` -> ``layers.0.attention.wq.scales_and_zeros``."""
    return weight_key.removesuffix("weight") + "scales_and_zeros"


def is_int4_key(key: str, shape: tuple[int, ...]) -> bool:
    """Whether ``quantize="int4"`` stores the checkpoint tensor (key, shape) as int4."""
    return is_quantized_key(key) and len(shape) == 2 and fits(shape[0], shape[1])


def int4_transform(
    key: str, t: torch.Tensor, release: Optional[Callable[[torch.Tensor], None]] = None, empty: Optional[Empty] = None
) -> dict[str, torch.Tensor]:
    """For ``llama.checkpoint.load_state_dict(transform=...)``: a projection weight becomes its
    nibbles (``KEY``) and scales_and_zeros (``sz_key``) as it is read, a block of rows at a time
    (``release`` and ``empty`` as for ``llama.quantize.int8_transform``); other tensors pass through."""
    if not is_int4_key(key, tuple(t.shape)) or not t.is_floating_point():
        return {key: t}
    nibbles, sz = quantize_packed(t, GROUP, release, empty)
    return {key: nibbles, sz_key(key): sz}


def use_int4_layers(model: nn.Module, weight_keys: list[str]) -> None:
    """Swap the layers whose ``weight`` keys are named for ``Int4Linear``s on ``meta`` (nibbles),
    before a state dict from ``int4_transform`` is assigned."""
    for key in weight_keys:
        name = key.removesuffix(".weight")
        old = model.get_submodule(name)
        if type(old).__name__ in ("RowParallelLinear", "ColumnParallelLinear"):
            raise ValueError("int4 weights under model parallelism are not supported: run one rank")
        out_features, in_features = old.weight.shape
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Int4Linear(in_features, out_features, device="meta"))


def pack_model(model: nn.Module) -> int:
    """``pack()`` every ``Int4Linear`` of ``model`` for its device; return how many there are."""
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    for m in layers:
        m.pack()
    return len(layers)


def quantize_model_int4(model: nn.Module) -> int:
    """Swap every projection ``nn.Linear`` (and ``output``) whose shape ``fits`` for a packed
    ``Int4Linear``, in place; return how many (a loaded one-rank model, on any device)."""
    names = set(PROJECTIONS) | {"output"}
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in names and type(child) is nn.Linear and child.bias is None and fits(*child.weight.shape):
                setattr(parent, name, Int4Linear.from_float(child.weight.detach()).pack())
                swapped += 1
    return swapped
