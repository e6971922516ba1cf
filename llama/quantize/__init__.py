"""int8 weight-only quantization: each projection weight stored as int8 with one float32 scale per
output row (symmetric). Activations are not quantized to int8: torch's paths (prompts, GPUs)
multiply them in their own dtype, and the CPU decode kernel (llama/csrc/int8_matvec.c) rounds each
block of 32 to int16 with its own step, at most 1/65534 of the block's largest |x| off (256 times
finer than the weights' int8 rounding), so that integer products keep up with memory.

Decoding reads every weight once per token, so halving the bytes read halves the time a
memory-bound step takes. Per-row symmetric scales are the simplest scheme that keeps the error of
a row's dot product proportional to that row's largest weight:

    scale[n] = max_k |w[n, k]| / 127,   q[n, k] = round(w[n, k] / scale[n]) in [-127, 127],
    y[b, n]  = scale[n] * sum_k q[n, k] x[b, k]

The scale multiplies each output once, after the sum, so the product needs no dequantized copy
of the matrix. ``Llama.build(quantize="int8")`` quantizes each weight as it is read from the
checkpoint (``int8_transform``) into ``Int8Linear`` layers swapped in on ``meta``
(``use_int8_layers``), the way ``llama.parallel`` applies its plan; ``quantize_model`` does the same
to a model already loaded. The model file knows nothing of it.

Which weights: the seven projections of every layer (wq, wk, wv, wo, w1, w2, w3). The token
embedding is a table lookup (one row a token, nothing to gain) and stays in the checkpoint's
dtype; ``output`` (the vocabulary projection, 13% of Llama 3.2 1B's bytes) is quantized too unless
``keep_output=True`` (see docs/models.md for the measured effect of each choice).

**int8 folders** (``python -m llama.quantize SRC DST --int8``, written by ``llama.quantize_folder``)
store that result on disk, in Meta's folder layout, so it is computed once:

- ``consolidated.NN.pth``: shard k is shard k of SRC with every key ``is_quantized_key`` selects
  replaced by exactly what ``int8_transform`` makes of it: the int8 values [out, in] under the
  checkpoint key (``layers.0.attention.wq.weight``) and their float32 row scales [out] under the
  same key ending in ``scale`` (``layers.0.attention.wq.scale``). Every other tensor (the token
  embedding, the norms) is SRC's, unchanged. A row-parallel weight (wo, w2) split over several
  shards has one scale per row in each shard: each shard's slice is quantized on its own, as each
  rank's slice is by ``Llama.build(quantize="int8")``.
- ``params.json``: SRC's, plus ``"quantization": folder_entry(...)``: ``format`` "int8",
  ``scheme`` "per-row symmetric" (the formula above), ``weights`` (the module names quantized:
  wq wk wv wo w1 w2 w3 output), ``shards`` (how many files, hence ranks, it was quantized for) and
  ``source_dtype`` (the dtype the weights were quantized from, which the other tensors keep).
- ``tokenizer.model`` copied from SRC, and a fresh ``checklist.chk``.

``Llama.build(DST)`` loads such a folder into ``Int8Linear`` layers with no ``quantize`` argument,
strictly (``check_int8_shard``), bit for bit what ``quantize="int8"`` makes of SRC on N ranks for
an N-shard folder. On kN ranks each rank takes its slice of one file with that file's scales (the
same numbers, split further: the N-rank model up to the order of float additions). Fewer ranks, or
a count that is not a multiple of N, are refused: wo and w2 are split by columns, so files have
their own scales for the same rows and cannot be joined (reshard the 16-bit SRC, quantize again).
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

QMAX = 127  # symmetric: -127 ... 127 (the code -128 is never used, so negation is exact)
PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")

# (x [rows, in], q [out, in] int8, scale [out] float32) -> [rows, out] in x's dtype
Int8MatVec = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


Empty = Callable[[torch.Size, torch.dtype], torch.Tensor]  # an allocator: (shape, dtype) -> CPU tensor


def quantize_int8(
    weight: torch.Tensor,
    done: Optional[Callable[[torch.Tensor], None]] = None,
    empty: Optional[Empty] = None,
    name: str = "the weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (any float dtype) -> (q [out, in] int8, scale [out] float32), per-row symmetric.

    Computed in float32 from the weight's exact values, a block of rows at a time (the float32
    temporaries of a whole 128K-row output matrix would be 2 GB); an all-zero row gets scale 1.
    ``done``, if given, is called with each block of ``weight``'s rows once it is quantized;
    ``empty``, if given, allocates q (a CPU weight's). A NaN or infinity raises ``ValueError``
    naming ``name`` and the row: int8 has no such value, and would turn a corrupt weight into
    finite garbage.
    """
    if empty is not None and weight.device.type == "cpu":
        q = empty(weight.shape, torch.int8)
    else:
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    step = max(1, Int8Linear.BLOCK // max(weight.shape[1], 1))
    # One float32 block reused, worked in place: no allocation per block, whose freed memory the C
    # heap may keep (a 1B model quantized at load ended ~80 MB larger with a fresh one each time).
    buf = torch.empty(min(step, weight.shape[0]) * weight.shape[1], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], step):
        block = weight[start : start + step]
        w = buf[: block.numel()].view(block.shape).copy_(block)  # [step, in] float32, exact
        amax = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_())  # max |w| per row
        s = torch.where(amax == 0, torch.ones_like(amax), amax / QMAX)  # a NaN or inf row keeps its NaN or inf
        q[start : start + step] = w.div_(s[:, None]).round_().clamp_(-QMAX, QMAX)
        scale[start : start + step] = s
        if done is not None:
            done(weight[start : start + step])
    if not torch.isfinite(scale).all():  # one check (one GPU sync) per weight
        row = int((~torch.isfinite(scale)).nonzero()[0])
        raise ValueError(
            f"{name} has a non-finite value (NaN or inf) in row {row}: a corrupt checkpoint cannot be quantized "
            f"(int8 would hide it); re-download it"
        )
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q [out, in] int8, scale [out]) -> q * scale[:, None] in ``dtype`` (computed in float32)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


_WIDE: dict[torch.dtype, torch.Tensor] = {}  # Int8Linear's widening buffers, one per dtype, shared by all layers


def widening_buffer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of ``shape`` and ``dtype`` (contents undefined) in a buffer kept for the next
    call: valid until the next call for the same dtype."""
    numel = shape.numel()
    if dtype not in _WIDE or _WIDE[dtype].numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            _WIDE[dtype] = torch.empty(max(numel, Int8Linear.BLOCK), dtype=dtype)
    return _WIDE[dtype][:numel].view(shape)


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights: y = (x @ q.T) * scale, in x's dtype.

    Buffers ``weight`` (int8 [out, in], the checkpoint key's name) and ``scale`` (float32 [out]).
    ``matvec``, when set (``llama.fast``, ``llama.gpu_matvec``), multiplies up to ``matvec_rows`` rows with a kernel that
    streams the int8 bytes (``llama.native`` on CPUs, ``llama.gpu_matvec`` on GPUs: torch's own
    weight-only int8 kernel streamed 3-5% of an H200's bandwidth); otherwise the product is computed
    in ``compute_dtype``
    (default: x's dtype) a block of rows at a time, each block's int8 weights widened once.
    """

    BLOCK = 1 << 20  # weights widened per block: 1M elements (4 MiB of float32)

    def __init__(self, in_features: int, out_features: int, device=None, parallel: Optional[str] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Under model parallelism this is one rank's slice: "reduce" sums the partial outputs of a
        # row-parallel layer over the group, "gather" joins a column-parallel layer's outputs
        # (``output``), as fairscale's RowParallelLinear / ColumnParallelLinear(gather_output) do.
        self.parallel = parallel
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.matvec: Optional[Int8MatVec] = None
        self.matvec_rows = 0
        self.compute_dtype: Optional[torch.dtype] = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, parallel: Optional[str] = None) -> "Int8Linear":
        """The int8 layer of a float weight [out, in] (quantized with ``quantize_int8``)."""
        layer = cls(weight.shape[1], weight.shape[0], device="meta", parallel=parallel)
        layer.weight, layer.scale = quantize_int8(weight)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x)
        if self.parallel is not None:
            from fairscale.nn.model_parallel import mappings

            combine = mappings.reduce_from_model_parallel_region if self.parallel == "reduce" else mappings.gather_from_model_parallel_region
            y = combine(y)
        return y

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ (q * scale).T for this rank's slice, in x's dtype."""
        rows = x.numel() // x.shape[-1]
        if self.matvec is not None and rows <= self.matvec_rows:
            return self.matvec(x.reshape(rows, -1), self.weight, self.scale).view(*x.shape[:-1], -1)
        dtype = self.compute_dtype or x.dtype
        xc = x.to(dtype)
        if torch.compiler.is_compiling() or x.device.type != "cpu":
            # One expression: Inductor fuses it (the widened copy never reaches memory); on a GPU it
            # is the prompt path (decoding runs llama.gpu_matvec's kernel), a widened temporary per layer.
            return (F.linear(xc, self.weight.to(dtype)) * self.scale.to(dtype)).to(x.dtype)
        out = torch.empty(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)  # [..., out]
        step = max(1, self.BLOCK // self.in_features)
        # Widened into one reused buffer: .to() would allocate each block afresh, and the page
        # faults of new memory cost more than the widening (1B layer, 512 tokens: 937 -> 394 ms;
        # bf16 weights 312 ms). Autograd may keep a block for backward, so then a fresh copy.
        reuse = not (torch.is_grad_enabled() and xc.requires_grad)
        for start in range(0, self.out_features, step):
            end = min(start + step, self.out_features)
            block = self.weight[start:end]  # [step, in] int8
            wide = widening_buffer(block.shape, dtype).copy_(block) if reuse else block.to(dtype)
            out[..., start:end] = F.linear(xc, wide) * self.scale[start:end].to(dtype)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


def is_quantized_key(key: str, keep_output: bool = False) -> bool:
    """Whether the checkpoint key is one ``quantize="int8"`` stores as int8 (see the module docstring)."""
    parts = key.split(".")
    return parts[-1] == "weight" and len(parts) >= 2 and (
        parts[-2] in PROJECTIONS or (parts[-2] == "output" and len(parts) == 2 and not keep_output)
    )


def int8_transform(
    key: str, t: torch.Tensor, release: Optional[Callable[[torch.Tensor], None]] = None, empty: Optional[Empty] = None
) -> dict[str, torch.Tensor]:
    """For ``llama.checkpoint.load_state_dict(transform=...)``: a projection weight becomes its int8
    values and row scales (``KEY`` and ``....scale``) as it is read, so the 16-bit matrix never
    lives in memory beside the rest; other tensors pass through. ``release`` (the loader's) is
    called with each block of rows once it is quantized: its file pages leave memory at once, so
    the 525 MB bf16 output matrix of Llama 3.2 1B is never resident whole. ``empty`` (shape, dtype)
    allocates the int8 values (``llama.hugepages.after``: straight into huge pages, no copy after).
    Llama 3.2 1B shape, peak RSS of ``Llama.build(quantize="int8")``: 2.30 GB -> 1.61 GB."""
    if not is_quantized_key(key) or t.dtype == torch.int8:  # int8 already (an int8 folder): its scale comes with it
        return {key: t}
    q, scale = quantize_int8(t, release, empty, name=key)
    return {key: q, scale_key(key): scale}


# The "quantization" entry of an int8 folder's params.json (checked by ``llama.params``).
FOLDER_FORMAT = "int8"
FOLDER_SCHEME = "per-row symmetric"
FOLDER_WEIGHTS = [*PROJECTIONS, "output"]
FOLDER_KEYS = ("format", "scheme", "weights", "shards", "source_dtype")


def folder_entry(shards: int, source_dtype: torch.dtype) -> dict:
    """The params.json ``"quantization"`` entry of an int8 folder of ``shards`` files quantized from
    ``source_dtype`` weights (see the module docstring)."""
    return {"format": FOLDER_FORMAT, "scheme": FOLDER_SCHEME, "weights": list(FOLDER_WEIGHTS), "shards": shards,
            "source_dtype": str(source_dtype).removeprefix("torch.")}  # fmt: skip


def scale_key(weight_key: str) -> str:
    """``layers.0.attention.wq.weight`` -> ``layers.0.attention.wq.scale``: where its row scales are stored."""
    return weight_key.removesuffix("weight") + "scale"


def check_int8_shard(path: str, state: dict[str, torch.Tensor]) -> None:
    """Raise, naming the key and ``path``, unless the shard holds int8 weights exactly where an int8
    folder has them: every ``is_quantized_key`` int8 [out, in] with float32 row scales [out], finite
    and > 0, under ``scale_key``; no other tensor int8, no other ``.scale``. (Keys and shapes against
    params.json are the loader's checks.)"""
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        if key.endswith(".scale"):
            weight = key.removesuffix("scale") + "weight"
            if not is_quantized_key(weight):  # (a missing weight is named by the loader's key check)
                raise ValueError(
                    f"{path}: unexpected key {key}: only the quantized weights ({', '.join(FOLDER_WEIGHTS)}) have row scales"
                )
            continue
        if is_quantized_key(key):
            if t.dtype != torch.int8:
                raise ValueError(
                    f"{path}: {key} has dtype {str(t.dtype).removeprefix('torch.')}, but an int8 folder stores it as "
                    f"int8 (params.json says \"quantization\": int8): a file from another folder? quantize SRC again"
                )
            scale = state.get(scale_key(key))
            if scale is None:
                raise ValueError(f"{path}: {key} is int8, but its row scales {scale_key(key)} are missing")
            rows = t.shape[0] if t.dim() == 2 else -1
            if not isinstance(scale, torch.Tensor):
                raise ValueError(f"{path}: {scale_key(key)} is a {type(scale).__name__}, expected a tensor of row scales")
            if scale.dtype != torch.float32 or tuple(scale.shape) != (rows,):
                got = f"{str(scale.dtype).removeprefix('torch.')} {tuple(scale.shape)}"
                raise ValueError(
                    f"{path}: {scale_key(key)} is {got}, expected float32 of shape ({rows},): one scale per row of {key}"
                )
            bad = ~(torch.isfinite(scale) & (scale > 0))
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"{path}: {scale_key(key)} has {scale[row].item()} at row {row}: row scales must be finite and > 0"
                )
        elif t.dtype == torch.int8:
            raise ValueError(
                f"{path}: {key} is int8, but an int8 folder quantizes only {', '.join(FOLDER_WEIGHTS)}; "
                f"the other tensors keep their float dtype"
            )


def use_int8_layers(model: nn.Module, weight_keys: list[str]) -> None:
    """Swap the layers whose ``weight`` keys are named for ``Int8Linear``s on ``meta``, before an int8
    state dict is assigned; model-parallel layers (fairscale's) keep their reduce or gather."""
    for key in weight_keys:
        name = key.removesuffix(".weight")
        old = model.get_submodule(name)
        out_features, in_features = old.weight.shape  # this rank's slice
        parent, _, child = name.rpartition(".")
        layer = Int8Linear(in_features, out_features, device="meta", parallel=_parallel_kind(old))
        setattr(model.get_submodule(parent) if parent else model, child, layer)


def _parallel_kind(module: nn.Module) -> Optional[str]:
    """How an Int8Linear replacing ``module`` combines ranks' outputs: see ``Int8Linear.parallel``."""
    kind = type(module).__name__
    if kind == "RowParallelLinear":
        return "reduce"
    if kind == "ColumnParallelLinear" and module.gather_output:
        return "gather"
    return None


def quantize_model(model: nn.Module, keep_output: bool = False) -> int:
    """Swap every projection ``nn.Linear`` of a loaded model for an ``Int8Linear``; return how many.

    ``model`` is a ``llama.model.Transformer`` with its weights loaded (on any device); each weight
    is quantized on its own device and its float copy released before the next. Under model
    parallelism each rank quantizes its own slice of fairscale's layers (a row of a row-parallel
    layer gets one scale per rank's slice: each rank's partial product is exact to its own
    rounding, and the all-reduce sums them as before).
    """
    names = set(PROJECTIONS) | ({"output"} if not keep_output else set())
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name not in names or isinstance(child, Int8Linear):
                continue
            if not isinstance(child, nn.Linear) and type(child).__name__ not in ("RowParallelLinear", "ColumnParallelLinear"):
                continue
            setattr(parent, name, Int8Linear.from_float(child.weight.detach(), _parallel_kind(child)))
            swapped += 1
    return swapped
