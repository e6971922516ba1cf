"""Memory plan: bytes for weights and KV cache, checked before anything is allocated.

``python -m llama.memory CKPT_DIR_OR_PARAMS_JSON [--max_seq_len N] [--max_batch_size B]`` prints
the needs in the layout of the Llama 3.1 release post's tables (weights per dtype, KV cache for
1k / 16k / 128k tokens) plus the plan for the given run.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import fire
import torch

from llama.devices import parse_dtype
from llama.model import ModelArgs

GiB = 1024**3
GB = 1000**3


def parameter_count(args: ModelArgs) -> int:
    """Parameters of the full model (untied embedding and output), no model built."""
    hd, ffn = args.head_dim, args.ffn_hidden_dim
    attention = args.dim * args.n_heads * hd * 2 + args.dim * args.n_kv_heads * hd * 2
    per_layer = attention + 3 * args.dim * ffn + 2 * args.dim
    return 2 * args.vocab_size * args.dim + args.n_layers * per_layer + args.dim


def kv_cache_bytes(args: ModelArgs, tokens: int, bytes_per_element: int, world_size: int = 1) -> int:
    """KV cache for ``tokens`` positions (batch x seq) on one rank: 2·n_layers·n_kv_local·head_dim·bytes each.

    With more ranks than KV heads every rank still holds one whole head.
    """
    n_kv_local = max(args.n_kv_heads // world_size, 1)
    return 2 * args.n_layers * n_kv_local * args.head_dim * bytes_per_element * tokens


@dataclass
class MemoryPlan:
    """What one rank needs: weights plus a KV cache of max_batch_size x max_seq_len."""

    weight_bytes: int
    kv_cache_bytes: int
    max_seq_len: int
    max_batch_size: int
    dtype: torch.dtype
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
    args: ModelArgs, max_seq_len: int, max_batch_size: int, dtype: torch.dtype = torch.bfloat16, world_size: int = 1
) -> MemoryPlan:
    """Bytes one of ``world_size`` ranks needs for weights and KV cache, at ``dtype``."""
    size = torch.empty((), dtype=dtype).element_size()
    return MemoryPlan(
        weight_bytes=parameter_count(args) * size // world_size,
        kv_cache_bytes=kv_cache_bytes(args, max_seq_len * max_batch_size, size, world_size),
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        dtype=dtype,
        world_size=world_size,
    )


def available_bytes(device: torch.device | str) -> Optional[int]:
    """Free memory on the device (free GPU memory, or the OS's MemAvailable for CPU); None if unknown."""
    device = torch.device(device)
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
    return ModelArgs.load(path)


def report(args: ModelArgs, max_seq_len: int, max_batch_size: int, dtype: torch.dtype, world_size: int = 1) -> str:
    """The release-post style tables plus this run's plan, as text."""
    lines = [f"parameters: {parameter_count(args):,}", "", "weights          size"]
    for name, nbytes in (("fp32", 4), ("bf16/fp16", 2), ("fp8", 1), ("int4", 0.5)):
        lines.append(f"  {name:<14} {parameter_count(args) * nbytes / GB:8.1f} GB")
    lines += ["", "KV cache (16-bit)  1k tokens   16k tokens   128k tokens"]
    kv = [kv_cache_bytes(args, n, 2) / GiB for n in (1024, 16384, 131072)]
    lines.append(f"  batch 1         {kv[0]:8.4f} GiB {kv[1]:8.3f} GiB {kv[2]:9.3f} GiB")
    plan = plan_memory(args, max_seq_len, max_batch_size, dtype, world_size)
    lines += ["", f"this run: {plan.describe()}"]
    return "\n".join(lines)


def main(
    path: str, max_seq_len: int = 8192, max_batch_size: int = 1, dtype: str = "bfloat16", world_size: int = 1
) -> None:
    """Print weights and KV-cache needs for a checkpoint folder or a params.json file."""
    args = _load_args(path)
    print(report(args, max_seq_len, max_batch_size, parse_dtype(dtype), world_size))


if __name__ == "__main__":
    fire.Fire(main)
