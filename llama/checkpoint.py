"""Meta-format checkpoints: ``params.json`` + ``consolidated.NN.pth`` shards.

Loading is strict (every expected key, no unexpected key except the known-unused ``rope.freqs``,
every shape checked against ``params.json``) and reshards on the fly: a checkpoint saved as N shards
loads on M model-parallel ranks when M is a multiple of N or N a multiple of M (an int8 folder,
``llama.quantize``, on a multiple of N). Each rank memory-maps the shard files and copies only its own
slice, so peak RAM per rank stays near its share.
"""

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from llama import fp8, quantize
from llama.quantize import int4
from llama.model import ModelArgs, Transformer
from llama.params import load as read_params, read_quantization, to_dict
from llama.progress import Progress

# Keys present in old (Llama 1/2) checkpoints that the model does not use; dropped by name.
UNUSED_KEYS = ("rope.freqs",)

# The model-parallel plan: how each module is split across shards (and ranks), keyed by its name
# with ``layers.N.`` stripped; modules not named (the norms) are replicated. Meta's files are split
# this way, and ``llama.parallel`` swaps each module for the fairscale layer of its kind:
# - "colwise": rows of the weight (output features) split; "colwise_kv" the same, but never less than
#   one whole KV head per rank; "colwise_gathered" the same, with the output all-gathered;
# - "rowwise": columns (input features) split; "vocab": rows of the embedding table split.
PLAN: dict[str, str] = {
    "tok_embeddings": "vocab",
    "attention.wq": "colwise",
    "attention.wk": "colwise_kv",
    "attention.wv": "colwise_kv",
    "attention.wo": "rowwise",
    "feed_forward.w1": "colwise",
    "feed_forward.w3": "colwise",
    "feed_forward.w2": "rowwise",
    "output": "colwise_gathered",
}
REPLICATED = ("attention_norm", "ffn_norm", "norm")

# Which dim each tensor is split along across model-parallel shards (None: replicated), from PLAN.
SHARD_DIMS: dict[str, Optional[int]] = {
    **{f"{name}.weight": 1 if kind == "rowwise" else 0 for name, kind in PLAN.items()},
    **{f"{name}.weight": None for name in REPLICATED},
}

SHARD_PATTERN = re.compile(r"^consolidated\.(\d+)\.pth$")


def layer_suffix(name: str) -> str:
    """``layers.3.attention.wq`` -> ``attention.wq``: a module or key name as ``PLAN`` and ``SHARD_DIMS`` use it."""
    return re.sub(r"^layers\.\d+\.", "", name)


def shard_dim(key: str) -> Optional[int]:
    """The split dim of a checkpoint key (``layers.3.attention.wq.weight`` -> 0)."""
    suffix = layer_suffix(key)
    if suffix not in SHARD_DIMS:
        raise KeyError(key)
    return SHARD_DIMS[suffix]


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every checkpoint key, in the model's order."""
    hd, ffn = args.head_dim, args.ffn_hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (args.n_heads * hd, args.dim)
        shapes[p + "attention.wk.weight"] = (args.n_kv_heads * hd, args.dim)
        shapes[p + "attention.wv.weight"] = (args.n_kv_heads * hd, args.dim)
        shapes[p + "attention.wo.weight"] = (args.dim, args.n_heads * hd)
        shapes[p + "feed_forward.w1.weight"] = (ffn, args.dim)
        shapes[p + "feed_forward.w2.weight"] = (args.dim, ffn)
        shapes[p + "feed_forward.w3.weight"] = (ffn, args.dim)
        shapes[p + "attention_norm.weight"] = (args.dim,)
        shapes[p + "ffn_norm.weight"] = (args.dim,)
    shapes["norm.weight"] = (args.dim,)
    shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


def load_params(ckpt_dir: str | Path, vocab_size: Optional[int] = None) -> ModelArgs:
    """``ModelArgs`` from ``ckpt_dir/params.json``, with errors that name the folder.

    Llama 2's ``"vocab_size": -1`` becomes ``vocab_size`` (the tokenizer's size) or, when that is
    not given, the size of the folder's own ``tokenizer.model``.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt_dir}")
    path = ckpt_dir / "params.json"
    if vocab_size is None and _says_vocab_minus_one(path):
        tokenizer_path = ckpt_dir / "tokenizer.model"
        if not tokenizer_path.is_file():
            raise FileNotFoundError(
                f"{path} has vocab_size -1 (Llama 2: the tokenizer decides), but {ckpt_dir} has no tokenizer.model"
            )
        from llama.family import load_tokenizer  # imported here: checkpoint.py needs no tokenizer otherwise

        vocab_size = load_tokenizer(tokenizer_path).n_words
    return read_params(path, vocab_size)


def _says_vocab_minus_one(path: Path) -> bool:
    try:
        params = json.loads(path.read_text())
    except (OSError, ValueError):  # read_params reports these
        return False
    return isinstance(params, dict) and params.get("vocab_size") == -1


def find_shards(ckpt_dir: str | Path) -> list[Path]:
    """``consolidated.00.pth`` ... in rank order; a gap in the numbering is an error naming it."""
    ckpt_dir = Path(ckpt_dir)
    found = {}
    for path in ckpt_dir.iterdir():
        m = SHARD_PATTERN.match(path.name)
        if m:
            found[int(m.group(1))] = path
    if not found:
        raise FileNotFoundError(f"no consolidated.NN.pth files in {ckpt_dir}")
    n = max(found) + 1
    missing = [f"consolidated.{i:02d}.pth" for i in range(n) if i not in found]
    if missing:
        raise FileNotFoundError(
            f"{ckpt_dir}: shard(s) {missing} missing; found {sorted(p.name for p in found.values())}. "
            f"A checkpoint with {n} shards needs all of consolidated.00.pth ... consolidated.{n - 1:02d}.pth"
        )
    return [found[i] for i in range(n)]


def check_layout(args: ModelArgs, n_shards: int, world_size: int) -> None:
    """Raise unless N shards can run on M ranks with whole heads on every rank."""
    why = _layout_problems(args, n_shards, world_size)
    if why:
        works = [m for m in range(1, args.n_heads + 1) if not _layout_problems(args, n_shards, m)]
        raise ValueError(
            f"cannot run a checkpoint of N={n_shards} shards on M={world_size} ranks "
            f"(n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}): " + "; ".join(why)
            + f". Rank counts that work: {', '.join(map(str, works))}"
        )


def _layout_problems(args: ModelArgs, n_shards: int, world_size: int) -> list[str]:
    why = []
    if world_size % n_shards and n_shards % world_size:
        why.append("M must be a multiple of N or N a multiple of M")
    for name, value in (("n_heads", args.n_heads), ("FFN width", args.ffn_hidden_dim), ("vocab_size", args.vocab_size)):
        if value % world_size:
            why.append(f"{name}={value} is not divisible by M")
    if args.n_kv_heads % world_size and world_size % args.n_kv_heads:
        why.append(f"n_kv_heads={args.n_kv_heads} must divide M or be divisible by it")
    return why


def rank_range(key: str, args: ModelArgs, rank: int, world_size: int) -> Optional[tuple[int, int]]:
    """Rows/columns [start, end) of a full tensor that ``rank`` of ``world_size`` holds (None: all).

    wk/wv with more ranks than KV heads: each rank holds the one whole KV head its query heads use
    (rank r's first query head is r*n_heads/M, which belongs to KV head r*n_kv_heads/M).
    """
    dim = shard_dim(key)
    if dim is None or world_size == 1:
        return None
    full = expected_shapes(args)[key][dim]
    if key.endswith(("attention.wk.weight", "attention.wv.weight")) and world_size > args.n_kv_heads:
        head = rank * args.n_kv_heads // world_size
        return head * args.head_dim, (head + 1) * args.head_dim
    size = full // world_size
    return rank * size, (rank + 1) * size


def _take(t: torch.Tensor, dim: Optional[int], rng: Optional[tuple[int, int]]) -> torch.Tensor:
    return t if rng is None else t.narrow(dim, rng[0], rng[1] - rng[0])


# The dtypes weights may have on disk; anything else (int8 from a bad re-save, float8 without its
# scales, bool) would be cast to garbage, so it is an error.
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _not_a_checkpoint(path: Path, error: Exception) -> str:
    """The one-line reason ``torch.load`` failed on ``path``, judged from the file's first bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return f"{path} is empty (0 bytes), not a PyTorch checkpoint: re-download it"
    if head.startswith(b"PK\x03\x04"):  # a zip: torch.save's format, but unreadable
        if "eights only load failed" in str(error):
            return f"cannot load {path}: {error}"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"{path} is a truncated or corrupt PyTorch checkpoint ({size:,} bytes; {first}): re-download it"
    low = head.lstrip().lower()
    if low.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<error")) or b"<html" in low or b"<body" in low:
        title = re.search(rb"<title>(.*?)</title>|<code>(.*?)</code>", head, re.I | re.S)
        words = (title.group(1) or title.group(2)).decode("utf-8", "replace").strip()[:80] if title else ""
        said = f', saying "{words}"' if words else ""
        return f"{path} is not a PyTorch checkpoint (looks like an HTML page{said}; {size:,} bytes): re-download it"
    if all(32 <= b < 127 or b in b"\r\n\t" for b in head):
        return f"{path} is not a PyTorch checkpoint (looks like a text file; {size:,} bytes): re-download it"
    return f"{path} is not a PyTorch checkpoint (unknown data; {size:,} bytes): re-download it"


def load_shard_file(path: str | Path, int8: bool = False) -> dict[str, torch.Tensor]:
    """``torch.load`` of one shard, memory-mapped, ``weights_only`` (checkpoints are untrusted).

    Errors say what the file is when it is not a PyTorch checkpoint (an HTML error page saved by
    a failed download, random bytes), and name a tensor of an integer dtype (``int8``: a shard of
    an int8 folder, whose int8 tensors ``llama.quantize.check_int8_shard`` checks).
    """
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt file, pickle with code objects, truncated download...
        with open(path, "rb") as f:
            legacy = f.read(1) == b"\x80"  # torch's pre-1.6 pickle format: loadable, but not memory-mappable
        try:
            if not legacy:
                raise e
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e2:
            raise ValueError(_not_a_checkpoint(path, e2)) from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    fp8_folder: Optional[bool] = None
    for k, t in sd.items():
        if isinstance(t, torch.Tensor) and t.dtype == fp8.FP8:  # Meta's FP8 folders (scales checked by llama.fp8)
            fp8_folder = fp8.is_fp8_folder(path.parent) if fp8_folder is None else fp8_folder
            if fp8_folder:
                continue
        if int8 and isinstance(t, torch.Tensor) and t.dtype == torch.int8:
            continue
        if isinstance(t, torch.Tensor) and t.dtype not in WEIGHT_DTYPES:
            raise ValueError(
                f"{path}: {k} has dtype {str(t.dtype).replace('torch.', '')}, not a float type: integer or "
                f"quantized weights (a shard re-saved as {str(t.dtype).replace('torch.', '')}?) cannot be "
                f"loaded; use the original float16/bfloat16/float32 checkpoint"
            )
    return sd


def _check_shard_count(ckpt_dir: Path, path: Path, sd: dict[str, torch.Tensor], args: ModelArgs, n: int) -> None:
    """A shard's slice of the embedding tells how many shards the checkpoint has: name missing ones."""
    t = sd.get("tok_embeddings.weight")
    if t is None or t.dim() != 2 or t.shape[0] == 0 or args.vocab_size % t.shape[0]:
        return
    expected = args.vocab_size // t.shape[0]
    if expected > n:
        missing = [f"consolidated.{i:02d}.pth" for i in range(n, expected)]
        raise FileNotFoundError(
            f"{ckpt_dir}: shard(s) {missing} missing: {path.name} holds {t.shape[0]} of the {args.vocab_size} "
            f"embedding rows of params.json, so the checkpoint has {expected} shards, but only "
            + ("consolidated.00.pth is" if n == 1 else f"{n} (consolidated.00.pth ... consolidated.{n - 1:02d}.pth) are")
            + " here: download the missing file(s)"
        )


def mappings() -> list[tuple[int, int, int, str]]:
    """This process's memory mappings (Linux /proc/self/maps): (start, end, inode, path) each, inode
    0 and path "" for anonymous memory; empty elsewhere."""
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((start, end, int(fields[4]), fields[5].rstrip("\n") if len(fields) == 6 else ""))
    except (OSError, ValueError, IndexError):
        return []
    return found


def file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges [start, end) of this process's memory mappings of ``path`` (Linux
    /proc/self/maps); empty elsewhere or when the file was read into ordinary memory."""
    target = str(Path(path).resolve())
    return [(start, end) for start, end, _, name in mappings() if name == target]


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The addresses [start, end) from ``t``'s first byte to just past its last (strides included)."""
    start = t.data_ptr()
    return start, start + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def whole_pages(start: int, end: int) -> tuple[int, int]:
    """The range of the whole pages inside [start, end) (empty when last <= first)."""
    page = mmap.PAGESIZE
    return -(-start // page) * page, end // page * page


def release_pages(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Tell the OS this process no longer needs the pages of ``t``, a view into a memory-mapped
    checkpoint file that has been copied (cast, quantized, moved): they leave this process's
    resident memory, and a later read of a page it shares with a neighbour reads the file again.
    Only inside ``mapped`` (file mappings, whose pages the file backs); a no-op elsewhere.
    """
    if t.device.type != "cpu" or not mapped or t.numel() == 0:
        return
    first, last = whole_pages(*byte_span(t))
    if last <= first or not any(a <= first and last <= b for a, b in mapped):
        return
    _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


MADV_DONTNEED = 4  # Linux


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def int8_folder(ckpt_dir: str | Path, world_size: Optional[int] = None) -> Optional[dict[str, Any]]:
    """The checked ``"quantization"`` entry of an int8 folder (``llama.quantize``); None for others.

    With ``world_size``: raise unless the folder has the shard count its entry says, N, and
    ``world_size`` is a multiple of N: each rank's slice then lies inside one file and keeps that
    file's row scales, while fewer ranks would have to join files whose scales differ for the same
    rows (``wo``, ``w2``; see ``llama.quantize``).
    """
    entry = read_quantization(Path(ckpt_dir) / "params.json")
    if entry is None or world_size is None:
        return entry
    n = len(find_shards(ckpt_dir))
    if n != entry["shards"]:
        raise FileNotFoundError(
            f"{ckpt_dir}: params.json says its int8 weights were written as {entry['shards']} shard(s), but the "
            f"folder has {n} consolidated.NN.pth file(s): an incomplete copy? copy or quantize it again"
        )
    if world_size % n:
        raise ValueError(
            f"{ckpt_dir} holds int8 weights quantized as {n} shards (each file's row scales belong to its own "
            f"slice), so it loads on {n} rank(s) or a multiple of {n}, not {world_size}: to run on {world_size}, "
            f"reshard the 16-bit folder it was made from (python -m llama.reshard SRC SRC-mp{world_size} --mp "
            f"{world_size}) and quantize that (python -m llama.quantize SRC-mp{world_size} DST --int8)"
        )
    return entry


# Replaces one loaded tensor by entries of the state dict (llama.quantize.int8_transform: a weight
# by its int8 values and row scales), applied on the CPU before the tensor moves to its device.
# Called as transform(key, t, release=...): ``release(piece)`` hands the file pages of a piece of t
# that the transform has copied back to the OS at once (a no-op where t is not the file's memory),
# so a transform that works a block of rows at a time holds one block of the source, not all of it.
Transform = Callable[..., dict[str, torch.Tensor]]


def load_state_dict(
    ckpt_dir: str | Path,
    args: ModelArgs,
    rank: int = 0,
    world_size: int = 1,
    dtype: Optional[torch.dtype] = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    keep_fp8: bool = False,
    transform: Optional[Transform] = None,
    int8_folders: bool = False,
) -> dict[str, torch.Tensor]:
    """This rank's tensors for ``world_size`` ranks, resharded from however many files there are.

    Files are memory-mapped (``weights_only=True``: a checkpoint is untrusted input); only the
    slices this rank needs are read, and each is cast to ``dtype`` and moved to ``device`` as it
    is taken. ``progress`` prints bytes taken and the rate on stderr (llama/progress.py). FP8
    weights (``llama.fp8``) are dequantized, or with ``keep_fp8`` and one file per rank kept as
    they are, each with its row scales under ``KEY.scale`` (``layers.5.feed_forward.w1.scale``).
    ``transform`` replaces each tensor as it is taken (``Transform``). A tensor that ends up copied
    hands its file pages back at once (``release_pages``), so converting or quantizing while
    loading never holds the whole file in memory besides the result.

    ``int8_folders``: an int8 folder (``llama.quantize``) loads as it is stored, its int8 weights
    with their row scales under ``KEY.scale``, on N ranks or a multiple of N for N files; without
    it such a folder is refused (tools that read 16/32-bit weights need the folder it came from).
    """
    paths = find_shards(ckpt_dir)
    n = len(paths)
    int8 = int8_folder(ckpt_dir) is not None
    if int8 and not int8_folders:
        raise ValueError(
            f"{ckpt_dir} is an int8 folder (params.json has \"quantization\"; written by python -m llama.quantize): "
            f"Llama.build and load_transformer load it; tools that read 16/32-bit weights (reshard, convert, "
            f"GGUF export, quantize) need the folder it was quantized from"
        )
    if int8:
        int8_folder(ckpt_dir, world_size)  # its shard count, and a multiple of it as ranks
    check_layout(args, n, world_size)
    fp8.check_scale_files(ckpt_dir, n)
    shapes = expected_shapes(args)
    cache: dict[int, dict[str, torch.Tensor]] = {}
    scales: dict[int, dict[str, torch.Tensor]] = {}  # Meta's FP8 folders: per file, key -> row scales
    file_dims: dict[str, int] = {}  # split dims of the files where they differ from SHARD_DIMS
    mapped: list[tuple[int, int]] = []  # address ranges of the files' memory mappings
    sources: list[torch.Tensor] = []  # the file views the current key was taken from
    int8_scales: list[torch.Tensor] = []  # int8 folders: the row scales of the current key's pieces

    def split_dim(k: str, shape: torch.Size) -> Optional[int]:
        # Llama 2 split tok_embeddings along dim 1 ([vocab, dim/N] per file), Llama 3 along dim 0:
        # the first shard's shape decides, and every other shard is then checked against it.
        d = shard_dim(k)
        if k == "tok_embeddings.weight" and n > 1:
            if tuple(shape) == (shapes[k][0], shapes[k][1] // n) and shapes[k][1] % n == 0:
                d = 1
            d = file_dims.setdefault(k, d)
        return d

    def shard(i: int) -> dict[str, torch.Tensor]:
        if i not in cache:
            sd = load_shard_file(paths[i], int8)
            for k in UNUSED_KEYS:
                sd.pop(k, None)
            _check_shard_count(Path(ckpt_dir), paths[i], sd, args, n)
            if int8:  # dtypes and scales first: the most specific message
                quantize.check_int8_shard(str(paths[i]), sd)
            expected = set(shapes) | set(int8_scale_keys)
            missing = [k for k in [*shapes, *int8_scale_keys] if k not in sd]
            unexpected = [k for k in sd if k not in expected]
            if missing or unexpected:
                raise ValueError(
                    f"{paths[i]} does not match {Path(ckpt_dir) / 'params.json'}: "
                    f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), "
                    f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
                )
            for k, full in shapes.items():
                d = split_dim(k, sd[k].shape)
                want = list(full)
                if d is not None:
                    if full[d] % n:
                        raise ValueError(f"{k}: size {full[d]} along dim {d} cannot be split into {n} shards")
                    want[d] //= n
                if tuple(sd[k].shape) != tuple(want):
                    raise ValueError(
                        f"{paths[i]}: {k} has shape {tuple(sd[k].shape)}, but params.json implies "
                        f"{tuple(want)} for shard {i} of {n} (full shape {full})"
                    )
            scales[i] = fp8.shard_scales(ckpt_dir, i, sd)
            mapped.extend(file_mappings(paths[i]))
            cache[i] = sd
        return cache[i]

    def take(i: int, key: str, d: Optional[int], rng: Optional[tuple[int, int]]) -> torch.Tensor:
        # One file's piece; an FP8 piece is dequantized with its own file's row scales (sliced with
        # the rows when split by rows; w2 is split by columns and keeps every row's scale).
        t = _take(shard(i)[key], d, rng)
        sources.append(t)
        if int8 and t.dtype == torch.int8:  # an int8 folder's weight: its values, and its file's row scales
            s = shard(i)[quantize.scale_key(key)]
            int8_scales.append(_take(s, 0, rng) if d == 0 and rng is not None else s)
            return t
        if key not in scales[i]:
            return t
        if keep_fp8 and n == world_size:  # rank i reads file i whole: its values and scales as they are
            out[key.removesuffix("weight") + "scale"] = scales[i][key]
            return t
        scale = _take(scales[i][key], 0, rng) if d == 0 else scales[i][key]
        return fp8.dequantize(t, scale, dtype or shard(0)["tok_embeddings.weight"].dtype)

    int8_scale_keys = [quantize.scale_key(k) for k in shapes if int8 and quantize.is_quantized_key(k)]
    out: dict[str, torch.Tensor] = {}
    first = shard(0)  # validates the first file and finds its layout (file_dims)
    bar = _progress_bar(paths, shapes, args, rank, world_size, first, int8) if progress else None
    for key, full in shapes.items():
        d = shard_dim(key)
        rng = rank_range(key, args, rank, world_size)
        sources.clear()
        int8_scales.clear()
        if d is None or (rng is None and n == 1):
            t = take(0, key, None, None)
        elif file_dims.get(key, d) != d:  # Llama 2 embedding: this rank's rows, from every file's columns
            pieces = [take(i, key, d, rng) for i in range(n)]
            t = torch.cat(pieces, dim=file_dims[key]).contiguous()
        else:
            lo, hi = rng if rng is not None else (0, full[d])
            per = full[d] // n
            pieces = []
            for i in range(lo // per, (hi - 1) // per + 1):  # only the files this range touches
                a, b = max(lo, i * per) - i * per, min(hi, (i + 1) * per) - i * per
                pieces.append(take(i, key, d, (a, b)))
            t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=d)
            if not t.is_contiguous():
                t = t.contiguous()
        if int8_scales:  # a multiple of the files as ranks (int8_folder checked it): one piece, one file's scales
            if len(int8_scales) != 1:
                raise ValueError(f"{key}: int8 slices of {len(int8_scales)} files cannot be joined (their scales differ)")
            out[quantize.scale_key(key)] = int8_scales[0].to(device=device)
        if dtype is not None and t.dtype not in (fp8.FP8, torch.int8):
            t = t.to(dtype)
        nbytes = t.numel() * t.element_size()
        taken = transform(key, t, release=lambda piece: release_pages(piece, mapped)) if transform is not None else {key: t}
        for name, value in taken.items():
            out[name] = value.to(device=device)
        kept = {v.untyped_storage().data_ptr() for v in taken.values() if v.device.type == "cpu"}
        if mapped and not any(src.untyped_storage().data_ptr() in kept for src in sources):
            for src in sources:  # copied (cast, quantized, moved): its pages of the file are not needed
                release_pages(src, mapped)
        if bar is not None:  # bytes read from the files, counted once they are cast and moved
            bar.update(nbytes)
    if bar is not None:
        bar.close()
    return out


def _progress_bar(
    paths: list[Path], shapes: dict[str, tuple[int, ...]], args: ModelArgs, rank: int, world_size: int,
    first_shard: dict[str, torch.Tensor], int8: bool = False,
) -> Progress:
    """A progress line over the bytes this rank takes from ``paths`` (sizes from the shapes; in an
    int8 folder a quantized weight is 1 byte an element)."""
    total = 0
    for key, full in shapes.items():
        itemsize = 1 if int8 and quantize.is_quantized_key(key) else first_shard["tok_embeddings.weight"].element_size()
        rng = rank_range(key, args, rank, world_size)
        numel = math.prod(full)
        total += itemsize * (numel if rng is None else numel // full[shard_dim(key)] * (rng[1] - rng[0]))
    names = paths[0].name if len(paths) == 1 else f"{len(paths)} shards ({paths[0].name} ... {paths[-1].name})"
    return Progress(f"loading {names}", total)


def load_transformer(
    ckpt_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: Optional[torch.dtype] = None,
    rank: int = 0,
    world_size: int = 1,
    parallelize: Optional[Callable[[Transformer], Transformer]] = None,
    args: Optional[ModelArgs] = None,
    progress: bool = False,
    keep_fp8: bool = False,
    transform: Optional[Transform] = None,
) -> Transformer:
    """Construct on ``meta`` (no memory), shard (``parallelize``), load this rank's weights, move.

    ``dtype`` None keeps the checkpoint's dtype. The weights are assigned, not copied, so a
    checkpoint that is already in the requested dtype stays memory-mapped on CPU. ``keep_fp8``: the
    FP8 weights of Meta's FP8 folders stay FP8 in ``llama.fp8.Fp8Linear`` layers (one file per rank).
    ``transform``: see ``load_state_dict``; int8 weights with scales (``transform=int8_transform``,
    or an int8 folder, ``llama.quantize``) load into ``llama.quantize.Int8Linear``; int4 nibbles with
    scales and zeros (``transform=llama.quantize.int4.int4_transform``) into ``Int4Linear``s, not yet
    packed for a kernel (``llama.quantize.int4.pack_model``).
    """
    args = args or load_params(ckpt_dir)
    state = load_state_dict(
        ckpt_dir, args, rank, world_size, dtype, device, progress, keep_fp8, transform, int8_folders=True
    )
    model = Transformer(args, device="meta")
    if parallelize is not None:
        model = parallelize(model)
    scaled = [k.removesuffix("scale") + "weight" for k in state if k.endswith(".scale")]
    fp8.use_fp8_layers(model, [k.removesuffix("weight") + "scale" for k in scaled if state[k].dtype == fp8.FP8])
    quantize.use_int8_layers(model, [k for k in scaled if state[k].dtype == torch.int8])  # transform=int8_transform
    int4.use_int4_layers(model, [k.removesuffix("scales_and_zeros") + "weight" for k in state if k.endswith(".scales_and_zeros")])
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device)


# Files of a folder that passed verification, so the hash (16 GB for an 8B model) is paid once:
# one line per file, "size mtime_ns md5 name"; a file whose size or mtime changed is hashed again.
VERIFIED_RECORD = ".llama-verified"
PROGRESS_EVERY_S = 5.0


def read_checklist(path: Path, skip: str = "verify=False") -> dict[str, str]:
    """``checklist.chk`` as {name: hex digest}: md5sum or sha256sum lines ("HASH  name" or "HASH
    *name", a leading ``./`` allowed), md5 in Meta's Llama 3 links, sha256 in the ``llama`` CLI's
    (Llama 3.1 on, 3.2, 3.3: shared/docs/download-layouts.md); the digest's length says which.
    ``skip`` names the way to skip verification in the error message (a tool's flag)."""
    listed: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}|[0-9a-fA-F]{32}) [ *](?:\./)?(.+)", line.strip())
        if m is None:
            raise ValueError(
                f"{path}, line {lineno}: {line[:60]!r} is not an md5sum or sha256sum line (hash, two spaces, "
                f"file name): re-download checklist.chk, or pass {skip}"
            )
        listed[m.group(2)] = m.group(1).lower()
    return listed


def _hash_for(digest: str) -> "hashlib._Hash":
    """The hash a checklist digest was made with: sha256 for 64 hex digits, md5 for 32."""
    return hashlib.sha256() if len(digest) == 64 else hashlib.md5()


def _read_record(ckpt_dir: Path) -> dict[str, tuple[int, int, str]]:
    try:
        lines = (ckpt_dir / VERIFIED_RECORD).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    record = {}
    for line in lines:
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[0].isdigit() and parts[1].isdigit():
            record[parts[3]] = (int(parts[0]), int(parts[1]), parts[2])
    return record


def verify_checkpoint(
    ckpt_dir: str | Path,
    verify: Optional[bool] = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
    rank: int = 0,
    world_size: int = 1,
    skip: str = "verify=False",
) -> None:
    """Check the folder's files against its ``checklist.chk``; raise naming the first that differs.

    ``verify`` None (auto): when a checklist is present, hash the files not verified before (the
    record ``.llama-verified`` keeps size, mtime and digest of each verified file; a changed file is
    hashed again). True: hash every listed file (an error without a checklist). False: nothing.
    Listed files that are absent are skipped (a tokenizer kept elsewhere), except shards and
    params.json. With several ranks, rank r hashes every world_size-th file. Progress goes to ``log``.
    ``skip`` is how the caller's user skips the check (``--no_verify`` for the folder tools), named
    in the messages.
    """
    if verify is False:
        return
    ckpt_dir = Path(ckpt_dir)
    chk = ckpt_dir / "checklist.chk"
    if not chk.is_file():
        if verify:
            raise FileNotFoundError(f"verify=True, but {ckpt_dir} has no checklist.chk to verify against")
        return
    listed = read_checklist(chk, skip)
    record = _read_record(ckpt_dir)
    todo: list[tuple[str, str, os.stat_result]] = []
    for name, md5 in listed.items():
        path = ckpt_dir / name
        if not path.is_file():
            if SHARD_PATTERN.match(name) or name == "params.json":
                raise FileNotFoundError(f"{path} is missing, but {chk} lists it: download it (an incomplete download?)")
            continue
        st = path.stat()
        if verify is None and record.get(name) == (st.st_size, st.st_mtime_ns, md5):
            continue
        todo.append((name, md5, st))
    mine = todo[rank::world_size]
    if not mine:
        return
    total = sum(st.st_size for _, _, st in mine)
    log(f"Verifying {len(mine)} file(s) of {ckpt_dir} against checklist.chk ({total / 1e9:.2f} GB; once: "
        f"recorded in {VERIFIED_RECORD}; {skip} skips it)")  # fmt: skip
    start = last = time.monotonic()
    done = 0
    verified = {}
    for name, md5, st in mine:
        h = _hash_for(md5)
        with open(ckpt_dir / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
                done += len(block)
                if time.monotonic() - last >= PROGRESS_EVERY_S:
                    last = time.monotonic()
                    log(f"  {name}: {done / 1e9:.1f} of {total / 1e9:.1f} GB verified ({last - start:.0f} s)")
        if h.hexdigest() != md5:
            raise ValueError(
                f"{ckpt_dir / name} does not match checklist.chk: {h.name} {h.hexdigest()}, expected {md5} "
                f"(a corrupt or incomplete download): re-download it, or pass {skip} to load it anyway"
            )
        verified[name] = (st.st_size, st.st_mtime_ns, md5)
    log(f"Verified {len(mine)} file(s) in {time.monotonic() - start:.1f} s")
    record = {**_read_record(ckpt_dir), **verified}  # re-read: another rank may have added its files
    text = "".join(f"{size} {mtime} {md5} {name}\n" for name, (size, mtime, md5) in sorted(record.items()))
    tmp = ckpt_dir / f"{VERIFIED_RECORD}.{os.getpid()}.tmp"
    try:
        tmp.write_text(text)
        os.replace(tmp, ckpt_dir / VERIFIED_RECORD)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        log(f"note: cannot record the verification in {ckpt_dir} ({e.strerror}): it will be repeated next "
            f"time; pass {skip} to skip it")  # fmt: skip


def shard_state_dict(
    full: dict[str, torch.Tensor], args: ModelArgs, n_shards: int
) -> tuple[list[dict[str, torch.Tensor]], ModelArgs]:
    """Split full tensors into Meta-format shards; returns the shards and the params to write.

    With more shards than KV heads each KV head is duplicated (as in Meta's 405B MP16 files), and
    the returned params say so (``n_kv_heads = n_shards``): the model computes the same function.
    """
    check_layout(args, 1, n_shards)
    out_args = args
    if n_shards > args.n_kv_heads:
        out_args = replace(args, n_kv_heads=n_shards)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for key, t in full.items():
        d = shard_dim(key)
        for r in range(n_shards):
            rng = rank_range(key, args, r, n_shards)
            shards[r][key] = _take(t, d, rng).clone() if rng is not None else t.clone()
    return shards, out_args


# --- Writing checkpoint folders (convert, reshard, gguf and the demo write through here) --------
#
# A folder is written under a hidden sibling name (``.DST.partial-XXXX``) and renamed into place
# when complete, so DST either does not exist or is finished. The partial folder holds an owner
# file ("host pid") until the rename: a later run for the same DST removes partial folders whose
# writer is gone (killed by kill -9 or a power cut), and leaves a live writer's alone. A single
# file (a GGUF export) is written the same way, inside such a folder (``atomic_file``); earlier
# versions wrote it as a bare ``.DST.partial-XXXXXXXX`` file, which is removed the same way.

PARTIAL_OWNER = ".partial-owner"


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _partial_prefix(dst: Path) -> str:
    return f".{dst.name}.partial-"


def _is_partial_file(path: Path, dst: Path) -> bool:
    """Whether ``path`` is a partial file of ``dst`` left by an earlier version's GGUF export:
    exactly ``tempfile.mkstemp``'s name for our prefix (8 of its characters), a plain file."""
    suffix = path.name[len(_partial_prefix(dst)) :]
    return (path.name.startswith(_partial_prefix(dst)) and re.fullmatch(r"[a-z0-9_]{8}", suffix) is not None
            and path.is_file() and not path.is_symlink())  # fmt: skip


def _writer_alive(folder: Path) -> Optional[str]:
    """"pid N" when the process writing ``folder`` still runs on this host; None when it is gone."""
    try:
        host, pid = (folder / PARTIAL_OWNER).read_text().split()
    except (OSError, ValueError):
        return None  # no owner file: written by an older version, or killed before it wrote one
    if host != socket.gethostname():
        return f"process {pid} on {host}"  # cannot tell from here: leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return None
    except (PermissionError, ValueError):
        pass
    return f"process {pid}"


def remove_stale_partials(dst: str | Path, log: Callable[[str], None]) -> None:
    """Delete hidden ``.DST.partial-*`` folders of ``dst`` whose writer is gone, and the partial
    files of ``dst`` an earlier version's GGUF export left (they have no owner: as a folder without
    an owner file, they count as gone), saying so."""
    dst = Path(dst)
    if not dst.parent.is_dir():
        return
    for folder in sorted(dst.parent.iterdir()):
        if _is_partial_file(folder, dst):
            size = folder.stat().st_size
            folder.unlink(missing_ok=True)
            log(f"removed {folder} ({_size(size)}), left by an interrupted run")
            continue
        if not folder.name.startswith(_partial_prefix(dst)) or not folder.is_dir():
            continue
        writer = _writer_alive(folder)
        if writer:
            log(f"note: {folder} is being written by {writer}; left alone")
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        log(f"removed {folder} ({_size(size)}), left by an interrupted run")


def check_free_space(folder: str | Path, need_bytes: int, what: str = "") -> None:
    """Raise ``OSError(ENOSPC)`` naming the filesystem when ``folder``'s has less than ``need_bytes`` free."""
    free = shutil.disk_usage(folder).free
    if need_bytes > free:
        raise OSError(
            errno.ENOSPC,
            f"no space left on {_mount_point(Path(folder))} (need {_size(need_bytes)}, {_size(free)} free)"
            + (f" to write {what}" if what else "")
            + ": free some space or choose another destination",
        )


def prepare_destination(
    dst: str | Path, need_bytes: int = 0, replace_empty: bool = False, log: Optional[Callable[[str], None]] = None
) -> Path:
    """Check, before any long work, that ``dst`` can be written: it does not exist (or is an empty
    folder, with ``replace_empty``), its parent is writable and has ``need_bytes`` free. Removes
    stale partial folders of ``dst``. Returns ``dst``'s parent."""
    dst = Path(dst)
    if dst.exists() and not (replace_empty and dst.is_dir() and not any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists; refusing to overwrite it (remove it or choose another path)")
    parent = dst.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
        if blocker == parent:
            raise OSError(e.errno, f"cannot write {dst}: {parent} is a file, not a folder") from None
        why = f"{blocker} is a file, not a folder" if blocker is not None else e.strerror
        raise OSError(e.errno, f"cannot create {parent}: {why}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(parent) else "no write permission"
        raise OSError(errno.EROFS if why[0] == "r" else errno.EACCES, f"cannot write in {parent}: {why}")
    remove_stale_partials(dst, log or _stderr)
    check_free_space(parent, need_bytes, str(dst))
    return parent


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def atomic_folder(
    dst: str | Path, need_bytes: int = 0, replace_empty: bool = False, log: Optional[Callable[[str], None]] = None
) -> Iterator[Path]:
    """Yield a hidden sibling folder of ``dst``, renamed to ``dst`` only when the block succeeds.

    ``prepare_destination`` runs first. A crash or error leaves no ``dst`` and no partial folder
    (a kill -9 leaves one, which the next run removes); an existing ``dst`` is never overwritten. The
    folder gets the permissions of a normal new folder (``mkdtemp`` makes it private). A write that
    fails because the disk filled up is reported as ``OSError(ENOSPC)`` naming the filesystem.
    """
    with _partial(Path(dst), need_bytes, replace_empty, log, file=False) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(dst: str | Path, need_bytes: int = 0, log: Optional[Callable[[str], None]] = None) -> Iterator[Path]:
    """Yield a path to write the file ``dst`` at, renamed to ``dst`` only when the block succeeds.

    As ``atomic_folder``: the path lies in a hidden partial folder of ``dst`` with an owner file,
    so a run killed by kill -9 leaves a folder that the next run for ``dst`` removes (a running
    writer's is left alone); the file gets the permissions of a normal new file.
    """
    dst = Path(dst)
    with _partial(dst, need_bytes, False, log, file=True) as tmp:
        yield tmp / dst.name


@contextlib.contextmanager
def _partial(
    dst: Path, need_bytes: int, replace_empty: bool, log: Optional[Callable[[str], None]], file: bool
) -> Iterator[Path]:
    """The partial folder of ``atomic_folder`` and ``atomic_file``; at the end, renames the folder
    (or, with ``file``, the file ``dst.name`` in it) to ``dst``."""
    parent = prepare_destination(dst, need_bytes, replace_empty, log)
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(dst), dir=parent))
    try:
        (tmp / PARTIAL_OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        yield tmp
        (tmp / PARTIAL_OWNER).unlink()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / dst.name if file else tmp, (0o666 if file else 0o777) & ~umask)
        if dst.exists():
            if file or not (replace_empty and dst.is_dir() and not any(dst.iterdir())):  # appeared meanwhile: keep theirs
                raise FileExistsError(f"{dst} appeared while writing it; refusing to overwrite it")
            dst.rmdir()
        os.rename(tmp / dst.name if file else tmp, dst)  # atomic within one filesystem
        if file:
            tmp.rmdir()  # empty now; a kill before this leaves an ownerless folder, removed next time
    except BaseException as e:
        free = shutil.disk_usage(parent).free
        shutil.rmtree(tmp, ignore_errors=True)
        # torch.save and safetensors report a full disk as RuntimeError ("file write failed",
        # "iostream error") or their own error types: name the real cause.
        full = getattr(e, "errno", None) == errno.ENOSPC or (isinstance(e, Exception) and free < 2**20)
        if full and not (isinstance(e, OSError) and "no space left on" in str(e)):
            raise OSError(
                errno.ENOSPC,
                f"no space left on {_mount_point(parent)} while writing {dst} ({_size(free)} free; "
                f"{_size(need_bytes)} needed): free some space or choose another destination",
            ) from e
        raise


def save_shards(folder: str | Path, full: dict[str, torch.Tensor], args: ModelArgs, n_shards: int = 1) -> ModelArgs:
    """``consolidated.NN.pth`` files of ``full`` in ``folder``; returns the params to write
    (``n_kv_heads`` raised when KV heads are duplicated). One shard is saved without copies."""
    folder = Path(folder)
    if n_shards == 1:  # no resharding copies: an 8B fits in RAM once, not twice
        torch.save(full, folder / "consolidated.00.pth")
        return args
    shards, out_args = shard_state_dict(full, args, n_shards)
    for i, sd in enumerate(shards):
        torch.save(sd, folder / f"consolidated.{i:02d}.pth")
    return out_args


def save_params(folder: str | Path, params: ModelArgs | dict[str, Any]) -> None:
    """``params.json`` as Meta writes it (indented, trailing newline)."""
    params = to_dict(params) if isinstance(params, ModelArgs) else params
    (Path(folder) / "params.json").write_text(json.dumps(params, indent=2) + "\n")


def state_bytes(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """Bytes of tensors of these shapes in ``dtype``: what their shards take on disk, give or take headers."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(size * int(torch.Size(shape).numel()) for shape in shapes.values())


def md5_file(path: str | Path) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checklist(ckpt_dir: str | Path) -> None:
    """``checklist.chk`` in md5sum format over every file in the folder (as Meta ships it), hidden
    files (our .llama-verified record, a partial folder's owner file) left out."""
    ckpt_dir = Path(ckpt_dir)
    names = sorted(p.name for p in ckpt_dir.iterdir() if p.is_file() and p.name != "checklist.chk" and not p.name.startswith("."))
    lines = [f"{md5_file(ckpt_dir / name)}  {name}\n" for name in names]
    (ckpt_dir / "checklist.chk").write_text("".join(lines))


def write_checkpoint(
    ckpt_dir: str | Path, full: dict[str, torch.Tensor], args: ModelArgs, n_shards: int = 1
) -> ModelArgs:
    """Write full tensors as a Meta-format folder with ``n_shards`` files; returns params written."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    shards, out_args = shard_state_dict(full, args, n_shards)  # copies: views of larger tensors save small
    for i, sd in enumerate(shards):
        torch.save(sd, ckpt_dir / f"consolidated.{i:02d}.pth")
    save_params(ckpt_dir, out_args)
    return out_args


# --- end of the writing section ------------------------------------------------------------------


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random full-size weights with a scale that keeps activations and logits well conditioned."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in expected_shapes(args).items():
        if len(shape) == 1:  # norm weights near 1, not exactly 1, so a missed norm weight shows
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[1] ** 0.5
        out[key] = t.to(dtype)
    return out


def write_random_checkpoint(
    ckpt_dir: str | Path,
    args: ModelArgs,
    n_shards: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_path: Optional[str | Path] = None,
) -> ModelArgs:
    """A random-weight checkpoint in Meta's exact on-disk format (tests, benchmarks, examples).

    Copies ``tokenizer_path`` in as ``tokenizer.model`` when given, and writes ``checklist.chk``.
    """
    ckpt_dir = Path(ckpt_dir)
    out_args = write_checkpoint(ckpt_dir, random_state_dict(args, seed, dtype), args, n_shards)
    if tokenizer_path is not None:
        (ckpt_dir / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    write_checklist(ckpt_dir)
    return out_args
