"""Meta's FP8 checkpoints (Llama 3.1 405B and 405B-Instruct "FP8", 8 shards).

In those folders the feed-forward weights ``w1``, ``w3`` and ``w2`` of every layer except the first
and the last are stored in ``consolidated.NN.pth`` as FP8 e4m3 values (``torch.float8_e4m3fn``);
every other tensor is bf16. Each shard ``NN`` comes with ``fp8_scales_{NN}.pt``: one scale per
output row of each of its FP8 weights, under the key ``"{layer}_feed_forward.{w1|w3|w2}_{NN}"``,
shape ``[out]`` or ``[out, 1]``. The weight is ``value[o, i] x scale[o]``.

The scales belong to the file's own slice: ``w2`` is split by columns, so every shard has its own
scale for the same output rows. Dequantizing therefore happens per file, on the piece a rank takes
from it, before pieces of several files are joined (``dequantize``, called by
``llama.checkpoint.load_state_dict`` for each piece: layer by layer, straight from the
memory-mapped shard, never a whole dequantized shard in memory).

Meta multiplies these weights in FP8 on GPUs that have it, quantizing each activation row on the
fly with an upper bound of ``ACTIVATION_SCALE_UB`` on its scale (``quantize_rows``, ``fp8_linear``).
``Llama.build`` does the same on CUDA GPUs of compute capability >= 8.9 when each rank reads one
whole file (``Fp8Linear``, loaded with ``load_state_dict(..., keep_fp8=True)``); everywhere else
the loader dequantizes to the model dtype.
"""

import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# Meta's bound on an activation row's absolute maximum before it is scaled into FP8 (a row with a
# larger maximum saturates at +-448 instead of squeezing the rest of the row towards zero).
ACTIVATION_SCALE_UB = 1200.0

SCALES_FILE = "fp8_scales_{}.pt"
SCALES_PATTERN = re.compile(r"^fp8_scales_(\d+)\.pt$")
_SCALE_KEY = re.compile(r"^(\d+)_feed_forward\.(w1|w2|w3)_(\d+)$")
_WEIGHT_KEY = re.compile(r"^layers\.(\d+)\.feed_forward\.(w1|w2|w3)\.weight$")

# Rows per block when dequantizing: bounds the float64 temporary (16M elements, 128 MiB).
_BLOCK_ELEMENTS = 1 << 24


def scale_key(weight_key: str, shard: int) -> Optional[str]:
    """``layers.5.feed_forward.w1.weight`` in shard 3 -> ``5_feed_forward.w1_3``; None for other keys."""
    m = _WEIGHT_KEY.match(weight_key)
    return f"{m.group(1)}_feed_forward.{m.group(2)}_{shard}" if m else None


def weight_key(key: str) -> Optional[tuple[str, int]]:
    """``5_feed_forward.w1_3`` -> (``layers.5.feed_forward.w1.weight``, 3); None if not a scale key."""
    m = _SCALE_KEY.match(key)
    return (f"layers.{m.group(1)}.feed_forward.{m.group(2)}.weight", int(m.group(3))) if m else None


def check_scale_files(ckpt_dir: str | Path, n_shards: int) -> None:
    """Raise for an ``fp8_scales_N.pt`` without its ``consolidated.N.pth`` (N >= the shard count)."""
    for path in Path(ckpt_dir).iterdir():
        m = SCALES_PATTERN.match(path.name)
        if m and int(m.group(1)) >= n_shards:
            raise ValueError(
                f"{path}: FP8 scales for shard {int(m.group(1))}, but the folder has {n_shards} "
                f"consolidated.NN.pth file(s): a file from another download?"
            )


def shard_scales(ckpt_dir: str | Path, shard: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The row scales of one shard's FP8 weights: {weight key: scale [out] float32}; {} if it has none.

    Strict, like the rest of loading: every FP8 weight needs its scale (shape ``[out]`` or
    ``[out, 1]``), and ``fp8_scales_{shard}.pt`` may hold nothing else. Errors name the key and file.
    """
    path = Path(ckpt_dir) / SCALES_FILE.format(shard)
    shard_file = Path(ckpt_dir) / f"consolidated.{shard:02d}.pth"
    fp8_keys = [k for k, t in state.items() if t.dtype == FP8]
    if not fp8_keys:
        if path.exists():
            raise ValueError(f"{path}: FP8 scales, but {shard_file} holds no FP8 ({FP8}) weights")
        return {}
    for k in fp8_keys:
        if scale_key(k, shard) is None:
            raise ValueError(
                f"{shard_file}: {k} is FP8, but Meta's FP8 format quantizes only feed_forward.w1/w2/w3 weights"
            )
    if not path.is_file():
        raise FileNotFoundError(
            f"{shard_file} holds {len(fp8_keys)} FP8 weight(s) ({fp8_keys[0]}, ...) but {path} is missing: "
            f"FP8 checkpoints need fp8_scales_N.pt beside every consolidated.NN.pth (download it again)"
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated download, pickle with code objects...
        raise ValueError(f"cannot load {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(raw).__name__}")
    scales: dict[str, torch.Tensor] = {}
    for key, scale in raw.items():
        target = weight_key(key) if isinstance(key, str) else None
        if target is None or target[1] != shard:
            raise ValueError(
                f"{path}: unexpected key {key!r}; scales of this shard are named "
                f"'{{layer}}_feed_forward.{{w1|w3|w2}}_{shard}'"
            )
        if target[0] not in state or state[target[0]].dtype != FP8:
            raise ValueError(f"{path}: stray scale {key!r}: {target[0]} in {shard_file} is not an FP8 weight")
        rows = state[target[0]].shape[0]
        if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or tuple(scale.shape) not in (
            (rows,),
            (rows, 1),
        ):
            got = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
            raise ValueError(f"{path}: scale {key!r} is {got}, expected floats of shape ({rows},) or ({rows}, 1)")
        scales[target[0]] = scale.reshape(rows)
    missing = [scale_key(k, shard) for k in fp8_keys if k not in scales]
    if missing:
        raise ValueError(
            f"{path}: missing scale(s) {missing[:4]}{' ...' if len(missing) > 4 else ''} ({len(missing)}) "
            f"for the FP8 weights of {shard_file}"
        )
    return scales


def dequantize(value: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` [out, in] FP8 x ``scale`` [out] (one per row) -> [out, in] in ``dtype``, rounded once.

    The product is formed in float64, where it is exact (an e4m3 value has 4 significant bits, a
    float32 scale 24), then rounded to ``dtype``: the nearest ``dtype`` value to the true weight.
    Row blocks keep the float64 temporary small.
    """
    rows, cols = value.shape
    out = torch.empty((rows, cols), dtype=dtype, device=value.device)
    scale = scale.reshape(rows, 1)
    step = max(1, _BLOCK_ELEMENTS // max(cols, 1))
    for r in range(0, rows, step):
        out[r : r + step] = value[r : r + step].to(torch.float64) * scale[r : r + step].to(torch.float64)
    return out


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (any float dtype) -> (FP8 values [out, in], float32 scales [out]), per row.

    Meta's recipe for weights: a row's scale is its largest |w| / 448, so that entry becomes 448;
    an all-zero row gets scale 1. Computed in float64 (row blocks) from the weight's exact values.
    """
    rows, cols = weight.shape
    value = torch.empty((rows, cols), dtype=FP8, device=weight.device)
    scale = torch.empty(rows, dtype=torch.float32, device=weight.device)
    step = max(1, _BLOCK_ELEMENTS // max(cols, 1))
    for r in range(0, rows, step):
        w = weight[r : r + step].to(torch.float64)
        amax = w.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        value[r : r + step] = (w / s[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        scale[r : r + step] = s.to(torch.float32)
    return value, scale


def quantize_rows(x: torch.Tensor, scale_ub: float = ACTIVATION_SCALE_UB) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [rows, in] -> (FP8 values [rows, in], float32 scales [rows, 1]); x ~ values x scales.

    Each row's scale is min(max |x|, ``scale_ub``) / 448, so that row's largest entry maps to the
    largest FP8 value; entries beyond the bound saturate at +-448. An all-zero row gets a tiny
    scale (its values are all zero anyway).
    """
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(max=scale_ub)
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(
    x: torch.Tensor,
    value: torch.Tensor,
    scale: torch.Tensor,
    scale_ub: float = ACTIVATION_SCALE_UB,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """x [..., in] @ (value [out, in] FP8 x scale [out]).T, multiplied in FP8 (``torch._scaled_mm``).

    Activations are quantized per row (``quantize_rows``); the FP8 product is accumulated in
    float32 and scaled by both row scales, rounded to ``out_dtype`` (None: bf16 on CUDA, whose
    row-wise kernel writes only bf16; float32 elsewhere), then returned in x's dtype. This is the
    arithmetic of Meta's FP8 inference; ``torch._scaled_mm`` runs it on CUDA GPUs of compute
    capability >= 8.9 and, in recent torch, on CPU (slowly: for checking the math, not for speed).
    """
    lead, k = x.shape[:-1], x.shape[-1]
    xq, x_scale = quantize_rows(x.reshape(-1, k), scale_ub)
    w_scale = scale.reshape(1, -1).float()
    if out_dtype is None:
        out_dtype = torch.bfloat16 if x.device.type == "cuda" else torch.float32
    # mat2 must be column-major: value [out, in] row-major, transposed, is exactly that.
    y = torch._scaled_mm(xq, value.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)
    return y.reshape(*lead, -1).to(x.dtype)


class Fp8Linear(nn.Module):
    """A bias-free linear layer kept in FP8: y = fp8_linear(x, weight, scale), in x's dtype.

    Buffers ``weight`` (FP8 [out, in], the checkpoint key's name) and ``scale`` (float32 [out]).
    ``reduce``: the layer is one rank's row-parallel slice (``w2``), whose partial outputs are summed
    over the model-parallel group, as fairscale's ``RowParallelLinear`` does.
    """

    def __init__(self, in_features: int, out_features: int, reduce: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.reduce = in_features, out_features, reduce
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.scale)
        if self.reduce:
            from fairscale.nn.model_parallel.mappings import reduce_from_model_parallel_region

            y = reduce_from_model_parallel_region(y)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-row scales"


def fp8_supported(device: torch.device | str) -> bool:
    """True on CUDA GPUs of compute capability >= 8.9 (Ada, Hopper and later), whose tensor cores
    multiply FP8: there Meta's FP8 weights are kept and multiplied as FP8 (``Fp8Linear``)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def is_fp8_folder(ckpt_dir: str | Path) -> bool:
    """Whether the folder has Meta's ``fp8_scales_N.pt`` files (checked strictly when it loads)."""
    return any(SCALES_PATTERN.match(p.name) for p in Path(ckpt_dir).iterdir())


def use_fp8_layers(model: nn.Module, scale_keys: list[str]) -> None:
    """Swap the layers named by ``scale_keys`` (``layers.5.feed_forward.w1.scale``) for ``Fp8Linear``s
    on ``meta``, before the weights are assigned; row-parallel layers (fairscale's) keep their all-reduce."""
    for key in scale_keys:
        name = key.removesuffix(".scale")
        old = model.get_submodule(name)
        out_features, in_features = old.weight.shape  # this rank's slice
        reduce = type(old).__name__ == "RowParallelLinear"
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Fp8Linear(in_features, out_features, reduce, device="meta"))


def keep_fp8(ckpt_dir: str | Path, device: torch.device | str, world_size: int) -> bool:
    """Whether to load ``ckpt_dir`` keeping its FP8 weights: an FP8 folder, an FP8 GPU, and one file
    per rank (each rank's scales are its file's own; other rank counts dequantize while loading)."""
    if not fp8_supported(device) or not is_fp8_folder(ckpt_dir):
        return False
    shards = [p for p in Path(ckpt_dir).iterdir() if re.fullmatch(r"consolidated\.\d+\.pth", p.name)]
    return len(shards) == world_size


def quantize_feed_forward(model: nn.Module) -> int:
    """``quantize="fp8"`` for any loaded model: w1, w3, w2 of every layer but the first and the last
    become ``Fp8Linear`` (``quantize_weight``), as in Meta's FP8 folders; returns how many layers.

    ``model`` is a ``llama.model.Transformer`` with its weights loaded, on one rank or parallelized
    (each rank quantizes its own slice; row-parallel ``w2`` keeps its all-reduce). Each float weight
    is released as soon as its FP8 copy exists.
    """
    swapped = 0
    layers = list(model.layers)
    for block in layers[1:-1]:
        ffn = block.feed_forward
        for name in ("w1", "w3", "w2"):
            old = getattr(ffn, name)
            if isinstance(old, Fp8Linear):
                continue
            w = old.weight.detach()
            new = Fp8Linear(w.shape[1], w.shape[0], type(old).__name__ == "RowParallelLinear", device=w.device)
            new.weight, new.scale = quantize_weight(w)
            setattr(ffn, name, new)
            swapped += 1
    return swapped
