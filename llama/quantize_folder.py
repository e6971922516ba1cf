"""Write an int8 folder: ``python -m llama.quantize SRC DST --int8``.

The format is described in ``llama.quantize`` (and docs/models.md): shard k of DST is shard k of
SRC with every projection weight replaced by ``int8_transform``'s int8 values and row scales,
params.json is SRC's plus a ``"quantization"`` entry, tokenizer.model is copied, and a fresh
checklist.chk is written. ``Llama.build(DST)`` then loads int8 weights straight from disk, bit for
bit what ``Llama.build(SRC, quantize="int8")`` computes while loading, on as many ranks as DST has
files, or a multiple of them (reshard SRC first for another rank count: ``python -m llama.reshard``).

Shard k is read as rank k of N reads it (``load_state_dict``: memory-mapped, every key and shape
checked, each weight quantized as it is taken and its 16-bit pages handed back), so one shard's
int8 tensors are in memory at a time. DST is written beside itself under a hidden name and renamed
into place when complete (``atomic_folder``): it either does not exist or is finished. An existing
DST is refused before anything is read; so is too little free disk space. SRC is checked against
its ``checklist.chk`` first (``verify_checkpoint``, as ``Llama.build`` does; ``--no_verify`` skips
it), since DST gets a fresh checklist that would vouch for whatever was read; a NaN or infinite
weight is refused by name either way (int8 would turn it into finite garbage).
"""

import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from llama import quantize
from llama.checkpoint import (
    atomic_folder,
    expected_shapes,
    find_shards,
    int8_folder,
    load_params,
    load_shard_file,
    load_state_dict,
    prepare_destination,
    save_params,
    shard_dim,
    verify_checkpoint,
    write_checklist,
)
from llama.cli import NO_VERIFY_HELP, Parser, user_errors
from llama.model import ModelArgs

# Copied verbatim when SRC has them (as llama.reshard does): the tokenizer travels with the weights.
COPIED_FILES = ("tokenizer.model", "tokenizer_spec.json")


def int8_folder_bytes(args: ModelArgs, source_dtype: torch.dtype, n_shards: int) -> int:
    """Bytes of an N-shard int8 folder's tensors: 1 a quantized weight plus a float32 scale per row
    of each shard's slice (a row-parallel weight has every row in every shard), the rest at
    ``source_dtype``."""
    size = torch.empty((), dtype=source_dtype).element_size()
    total = 0
    for key, shape in expected_shapes(args).items():
        numel = int(torch.Size(shape).numel())
        if quantize.is_quantized_key(key):
            rows = shape[0] * (n_shards if shard_dim(key) == 1 else 1)
            total += numel + 4 * rows
        else:
            total += numel * size
    return total


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def quantize_folder(
    src: str | Path,
    dst: str | Path,
    log: Callable[[str], None] = _log,
    verify: Optional[bool] = None,
    skip: str = "verify=False",
) -> Path:
    """Write SRC (a 16/32-bit Meta-format folder) as an int8 folder at DST; returns DST.

    ``verify`` as ``Llama.build``'s: None checks SRC against its ``checklist.chk`` when it has one
    (files verified before are not hashed again), True always, False never; ``skip`` is how the
    messages tell the user to skip it.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists():  # before reading anything
        raise FileExistsError(f"{dst} already exists; refusing to overwrite it (remove it or choose another path)")
    args = load_params(src)
    if int8_folder(src) is not None:
        raise ValueError(f"{src} is already an int8 folder (params.json has \"quantization\"): nothing to do")
    paths = find_shards(src)
    n = len(paths)
    src_params = json.loads((src / "params.json").read_text())
    first = load_shard_file(paths[0])  # memory-mapped: its dtype, and the loader's own checks below
    source_dtype = first["tok_embeddings.weight"].dtype if "tok_embeddings.weight" in first else torch.bfloat16
    del first
    copied = [src / name for name in COPIED_FILES if (src / name).is_file()]
    need = int8_folder_bytes(args, source_dtype, n) + sum(p.stat().st_size for p in copied)
    prepare_destination(dst, need, log=log)  # a full or read-only disk, before the hashing
    verify_checkpoint(src, verify, log, skip=skip)

    with atomic_folder(dst, need, log=log) as tmp:
        for k, path in enumerate(paths):
            log(f"quantizing {path} ({path.stat().st_size / 2**20:.1f} MiB)")

            def transform(key: str, t: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
                try:
                    return quantize.int8_transform(key, t, **kw)
                except ValueError as e:  # a NaN or inf weight: name the file too
                    raise ValueError(f"{path}: {e}") from None

            # Rank k of n reads exactly file k; each projection is quantized as it is taken.
            state = load_state_dict(src, args, k, n, transform=transform)
            own = load_shard_file(path)["tok_embeddings.weight"]
            if n > 1 and own.shape != state["tok_embeddings.weight"].shape:  # Llama 2: the file's columns, as stored
                state["tok_embeddings.weight"] = own
            # A view saves its whole storage: copy the (small) tensors that are views of larger ones.
            state = {key: t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()
                     for key, t in state.items()}  # fmt: skip
            torch.save(state, tmp / path.name)
            del state, own
            log(f"wrote {dst / path.name} ({(tmp / path.name).stat().st_size / 2**20:.1f} MiB)")
        save_params(tmp, {**src_params, "quantization": quantize.folder_entry(n, source_dtype)})
        for path in copied:
            shutil.copyfile(path, tmp / path.name)
        if not (src / "tokenizer.model").is_file():
            log(f"note: {src} has no tokenizer.model; pass --tokenizer_path when loading {dst}")
        write_checklist(tmp)
    return dst


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m llama.quantize SRC DST --int8``; ``--help`` describes the flags."""
    ap = Parser(prog="python -m llama.quantize", allow_abbrev=False,
                description="Write a 16/32-bit Meta-format checkpoint folder as an int8 folder (int8 weights, a "
                            "float32 scale per row) that Llama.build loads as it is, with no quantize argument.",
                epilog="The format: docs/models.md (int8 folders). A mistake prints one line; LLAMA_DEBUG=1 "
                       "prints the traceback instead.")  # fmt: skip
    ap.add_argument("src", help="Meta-format folder of 16/32-bit weights (params.json + consolidated.NN.pth)")
    ap.add_argument("dst", help="new folder to create (must not exist)")
    ap.add_argument("--int8", action="store_true",
                    help="required, the one format: every projection (wq wk wv wo w1 w2 w3, output) as int8 with a "
                         "float32 scale per output row (per-row symmetric); the rest unchanged")  # fmt: skip
    ap.add_argument("--no_verify", "--no-verify", dest="no_verify", action="store_true", help=NO_VERIFY_HELP)
    a = ap.parse_args(argv)  # an unknown flag (--int4) is named first
    if not a.int8:
        ap.error("the format is required: --int8 (the one this version writes)")
    with user_errors(ap.prog):
        quantize_folder(a.src, a.dst, verify=False if a.no_verify else None, skip="--no_verify")
