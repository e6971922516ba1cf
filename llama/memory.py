"""Memory plan: bytes for weights and KV cache, checked before anything is allocated.

``python -m llama.memory CKPT_DIR_OR_PARAMS_JSON [--max_seq_len N] [--max_batch_size B]
[--dtype bf16] [--world_size M]`` prints the needs in the layout of the Llama 3.1 release post's
tables (weights per dtype, KV cache for 1k / 16k / 128k tokens) plus the plan for the given run.
Every size is in GiB (2^30 bytes): the post's "16 GB" for the 8B in 16-bit is 16.1e9 bytes, 14.96 GiB.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from llama.checkpoint import check_layout, find_shards, int8_folder
from llama.devices import check_device, parse_dtype
from llama.model import ModelArgs
from llama.quantize import int4
from llama.params import load as read_params

GiB = 1024**3
GB = 1000**3

# Bytes per weight by dtype name. A local table until the library has one shared dtype table;
# fp8 / int8 / int4 are sizes to plan with (this library loads 16- and 32-bit weights).
WEIGHT_BYTES = {
    "fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
    "fp8": 1, "int8": 1, "int4": 0.5,
}  # fmt: skip


def parameter_count(args: ModelArgs, tied: bool = False) -> int:
    """Parameters of the model, no model built; ``tied``: the output layer is the embedding, counted once."""
    hd, ffn = args.head_dim, args.ffn_hidden_dim
    attention = args.dim * args.n_heads * hd * 2 + args.dim * args.n_kv_heads * hd * 2
    per_layer = attention + 3 * args.dim * ffn + 2 * args.dim
    return (1 if tied else 2) * args.vocab_size * args.dim + args.n_layers * per_layer + args.dim


def kv_cache_bytes(args: ModelArgs, tokens: int, bytes_per_element: int, world_size: int = 1) -> int:
    """KV cache for ``tokens`` positions (batch x seq) on one rank: 2·n_layers·n_kv_local·head_dim·bytes each.

    With more ranks than KV heads every rank still holds one whole head.
    """
    n_kv_local = max(args.n_kv_heads // world_size, 1)
    return 2 * args.n_layers * n_kv_local * args.head_dim * bytes_per_element * tokens


# Quantized weights, exact bytes with their scales. int8 and int4 quantize every projection (wq wk
# wv wo w1 w2 w3) and the output layer; the embedding and norms keep the model dtype. int8: 1 byte
# a weight + a float32 scale per output row. int4: half a byte a weight + a bf16 scale and a bf16
# zero point per group of INT4_GROUP weights along a row (the layout of torch's int4 kernels,
# llama.quantize.int4); a matrix whose shape those kernels do not take (``int4.fits``: never in
# Llama 3) stays at the model dtype, as ``Llama.build(quantize="int4")`` leaves it.
# fp8: Meta's FP8 folders, where only w1 w3 w2 of every layer but the first and the last are FP8:
# 1 byte a weight + a float32 scale per output row of each rank's slice.
INT4_GROUP = int4.GROUP
QUANTIZATIONS = ("int8", "int4", "fp8")


def quantized_weight_bytes(
    args: ModelArgs, quantize: str, dtype: torch.dtype = torch.bfloat16, world_size: int = 1
) -> int:
    """Bytes of one rank's weights with ``quantize`` ("int8", "int4" or "fp8"), the rest at ``dtype``."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANTIZATIONS)}")
    hd, ffn, dim = args.head_dim, args.ffn_hidden_dim, args.dim
    ffn_mats = [(ffn, dim, False), (ffn, dim, False), (dim, ffn, True)]  # w1, w3, w2: (out, in, row-parallel)
    if quantize == "fp8":
        mats = [(o, i, row, max(args.n_layers - 2, 0)) for o, i, row in ffn_mats]
    else:
        attention = [(args.n_heads * hd, dim, False), (args.n_kv_heads * hd, dim, False),
                     (args.n_kv_heads * hd, dim, False), (dim, args.n_heads * hd, True)]  # fmt: skip
        mats = [(o, i, row, args.n_layers) for o, i, row in attention + ffn_mats] + [(args.vocab_size, dim, False, 1)]
    if quantize == "int4":  # one rank (Llama.build refuses int4 on more); the shapes the kernels take
        mats = [m for m in mats if int4.fits(m[0] // (1 if m[2] else world_size), m[1] // (world_size if m[2] else 1))]
    quantized = sum(o * i * count for o, i, _row, count in mats)
    rest = (parameter_count(args) - quantized) * torch.empty((), dtype=dtype).element_size() // world_size
    if quantize == "int4":
        groups = sum(o * -(-i // INT4_GROUP) * count for o, i, _row, count in mats)  # a partial group counts
        return rest + quantized // 2 // world_size + 4 * groups // world_size
    # One float32 scale per output row of the rank's slice: a row-parallel slice keeps every row.
    rows = sum((o if row else o // world_size) * count for o, _i, row, count in mats)
    return rest + quantized // world_size + 4 * rows



def quantized_lines(args: ModelArgs, dtype: torch.dtype, world_size: int = 1) -> list[str]:
    """Report lines: the weights as loaded quantized here (scales included, the rest at ``dtype``)."""
    per = " per rank" if world_size > 1 else ""
    lines = ["", f"quantized, as loaded (scales included, the rest {dtype}){per}"]
    for name, what in (("int8", "per-row scales"), ("int4", f"group {INT4_GROUP}"), ("fp8", "Meta's FP8 folders")):
        nbytes = quantized_weight_bytes(args, name, dtype, world_size)
        lines.append(f"  {name:<5} {what:<19} {nbytes / GiB:8.2f} GiB")
    return lines

@dataclass
class MemoryPlan:
    """What one rank needs: weights plus a KV cache of max_batch_size x max_seq_len."""

    weight_bytes: int
    kv_cache_bytes: int
    max_seq_len: int
    max_batch_size: int
    dtype: torch.dtype | str
    world_size: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes

    def describe(self) -> str:
        return (
            f"weights {self.weight_bytes / GiB:.2f} GiB + KV cache {self.kv_cache_bytes / GiB:.2f} GiB "
            f"({self.max_batch_size} x {self.max_seq_len} tokens, {self.dtype}) = {self.total_bytes / GiB:.2f} GiB"
            + (f" per rank ({self.world_size} ranks)" if self.world_size > 1 else "")
        )


def plan_memory(
    args: ModelArgs,
    max_seq_len: int,
    max_batch_size: int,
    dtype: torch.dtype | str = torch.bfloat16,
    world_size: int = 1,
    tied: bool = False,
    quantize: Optional[str] = None,
) -> MemoryPlan:
    """Bytes one of ``world_size`` ranks needs for weights and KV cache, at ``dtype``.

    ``dtype`` is a torch dtype or a name of ``WEIGHT_BYTES``; the names of quantized weights
    ("int8", "int4", "fp8") mean ``quantize`` with the rest in bf16. ``quantize`` counts the
    weights exactly as loaded, scales included (``quantized_weight_bytes``); the KV cache stays
    16-bit or wider. ``tied`` counts the output layer once.
    """
    if isinstance(dtype, str):
        if dtype not in WEIGHT_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(WEIGHT_BYTES)}")
        if dtype in QUANTIZATIONS:
            quantize, dtype = quantize or dtype, torch.bfloat16
        else:
            dtype = parse_dtype(dtype)
    size = torch.empty((), dtype=dtype).element_size()
    weights = quantized_weight_bytes(args, quantize, dtype, world_size) if quantize else parameter_count(args, tied) * size // world_size
    return MemoryPlan(
        weight_bytes=weights,
        kv_cache_bytes=kv_cache_bytes(args, max_seq_len * max_batch_size, size, world_size),
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        dtype=dtype,
        world_size=world_size,
    )


def available_bytes(device: torch.device | str) -> Optional[int]:
    """Free memory on the device (free GPU memory, or the OS's MemAvailable for CPU); None if unknown."""
    device = check_device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:  # macOS and other POSIX systems: total physical memory is the best bound we have
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_fits(plan: MemoryPlan, device: torch.device | str, available: Optional[int] = None) -> None:
    """Raise MemoryError, before allocating, when the plan exceeds free memory on the device."""
    available = available_bytes(device) if available is None else available
    if available is None or plan.total_bytes <= available:
        return
    kv_per_token = plan.kv_cache_bytes // max(plan.max_seq_len * plan.max_batch_size, 1)
    fit_tokens = max(available - plan.weight_bytes, 0) // max(kv_per_token, 1)
    advice = (
        f"lower max_seq_len or max_batch_size (the KV cache fits about {fit_tokens} tokens in total, "
        f"batch x length)"
        if plan.weight_bytes < available
        else "the weights alone do not fit: use a 16-bit dtype, more model-parallel ranks, or a larger device"
    )
    raise MemoryError(
        f"not enough memory on {device}: need {plan.describe()}, but only {available / GiB:.2f} GiB is free; {advice}"
    )


def _load_args(path: str | Path) -> ModelArgs:
    path = Path(path)
    if path.is_dir():  # load_params resolves Llama 2's vocab_size -1 from the folder's tokenizer
        from llama.checkpoint import load_params

        return load_params(path)
    return read_params(path)


def report(
    args: ModelArgs, max_seq_len: int, max_batch_size: int, dtype: torch.dtype | str, world_size: int = 1,
    tied: bool = False, quantize: Optional[str] = None,
) -> str:
    """The release-post style tables plus this run's plan, as text; every size in GiB.

    ``tied``: the model's parameters count the output layer once; the run's plan counts it twice,
    because a Meta-format checkpoint stores it and ``Llama.build`` loads both copies. ``quantize``:
    the run's weights are quantized so ("int8" for an int8 folder, which loads as int8).
    """
    count = parameter_count(args, tied)
    lines = [f"parameters: {count:,}"]
    if tied:
        lines[0] += f" (output layer tied to the embedding; loaded as two copies: {parameter_count(args):,})"
    lines += ["", "weights          size (GiB = 2^30 bytes)"]
    for name, nbytes in (("fp32", 4), ("bf16/fp16", 2), ("fp8/int8", 1), ("int4", 0.5)):
        lines.append(f"  {name:<14} {count * nbytes / GiB:8.2f} GiB")
    base = torch.bfloat16 if isinstance(dtype, str) and dtype in QUANTIZATIONS else parse_dtype(dtype)
    lines += quantized_lines(args, base, world_size)
    lines += ["", "KV cache (16-bit)  1k tokens   16k tokens   128k tokens"]
    kv = [kv_cache_bytes(args, n, 2) / GiB for n in (1024, 16384, 131072)]
    lines.append(f"  batch 1         {kv[0]:8.4f} GiB {kv[1]:8.3f} GiB {kv[2]:9.3f} GiB")
    plan = plan_memory(args, max_seq_len, max_batch_size, dtype, world_size, quantize=quantize)
    lines += ["", f"this run: {plan.describe()}" + (f" ({quantize} weights, scales included)" if quantize else "")]
    return "\n".join(lines)


def is_tied(path: str | Path) -> bool:
    """True when a checkpoint folder's output layer equals its embedding (read from the
    memory-mapped first shard; both are split the same way, so shard 0 decides)."""
    shard = Path(path) / "consolidated.00.pth"
    if not shard.is_file():
        return False
    try:
        sd = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        return torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
    except Exception:  # unreadable or odd shard: count both layers (the loader will say what is wrong)
        return False


def main(
    path: str, max_seq_len: int = 8192, max_batch_size: int = 1, dtype: str = "bf16", world_size: int = 1
) -> None:
    """Print weights and KV-cache needs for a checkpoint folder or a params.json file."""
    args = _load_args(path)
    for name, value in (("max_batch_size", max_batch_size), ("world_size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} {value!r} must be a whole number >= 1")
    if not isinstance(max_seq_len, int) or not 2 <= max_seq_len <= args.max_context:
        raise ValueError(
            f"--max_seq_len {max_seq_len!r} must be between 2 and the model's context of {args.max_context} tokens"
            + ("" if args.use_scaled_rope else " (Llama 3.0; 3.1 checkpoints with use_scaled_rope allow 131072)")
        )
    if world_size > 1:
        folder = Path(path) if Path(path).is_dir() else None
        check_layout(args, len(find_shards(folder)) if folder and any(folder.glob("consolidated.*.pth")) else 1, world_size)
    tied = Path(path).is_dir() and is_tied(path)
    quantize = "int8" if Path(path).is_dir() and int8_folder(path) is not None else None  # loads as int8
    print(report(args, max_seq_len, max_batch_size, dtype, world_size, tied, quantize))


HELP = {
    "path": "checkpoint folder (with params.json) or a params.json file",
    "max_seq_len": "tokens per sequence in the KV cache, 2 ... the model's context",
    "max_batch_size": "sequences in the KV cache, >= 1",
    "dtype": f"weight dtype: {', '.join(WEIGHT_BYTES)} (KV cache 16-bit below 16-bit weights)",
    "world_size": "model-parallel ranks the weights and KV heads are split over, >= 1",
}

if __name__ == "__main__":
    from llama.cli import integer, run_fire

    run_fire(main, "python -m llama.memory", HELP, types={"max_seq_len": integer(2), "world_size": integer(1)},
             choices={"dtype": list(WEIGHT_BYTES)}, description=__doc__)  # fmt: skip
