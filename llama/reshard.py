"""Rewrite a Meta-format checkpoint with a different number of model-parallel shards.

    python -m llama.reshard SRC DST --mp M [--dtype bf16]

DST gets ``consolidated.00.pth`` ... ``consolidated.{M-1}.pth``, ``params.json`` (``n_kv_heads``
raised to M when M exceeds it: each KV head is duplicated, as in Meta's 405B MP16 files),
``tokenizer.model`` (and ``tokenizer_spec.json``) copied from SRC, and a fresh ``checklist.chk``.

Each output shard is exactly what rank r of M would load from SRC (``load_state_dict``: the source
files are memory-mapped and only the needed slices read), so only one output shard is in memory
at a time. Everything is written into a hidden folder beside DST and renamed into place at the
end: DST either does not exist or is complete. An existing, non-empty DST is never touched.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from llama.checkpoint import check_layout, find_shards, load_params, load_state_dict, shard_state_dict, write_checklist
from llama.devices import DTYPES

# Copied verbatim when SRC has them; the tokenizer travels with the weights.
COPIED_FILES = ("tokenizer.model", "tokenizer_spec.json")


def reshard(src: str | Path, dst: str | Path, mp: int, dtype: Optional[torch.dtype] = None, log=print) -> Path:
    """Write SRC as an M-shard checkpoint at DST (see the module docstring); returns DST."""
    src, dst = Path(src), Path(dst)
    if mp < 1:
        raise ValueError(f"--mp must be at least 1, got {mp}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not an empty folder: refusing to overwrite it")
    args = load_params(src)
    n = len(find_shards(src))
    check_layout(args, n, mp)  # before writing anything: the error names N, M, n_heads, n_kv_heads
    # shard_state_dict is the one place deciding the params of an M-shard checkpoint (n_kv_heads
    # raised to M when KV heads are duplicated); given no tensors it only returns those params.
    _, out_args = shard_state_dict({}, args, mp)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        for rank in range(mp):
            state = load_state_dict(src, args, rank, mp, dtype)
            # clone: a slice of a memory-mapped source tensor would otherwise drag its whole
            # storage (the full source tensor) into the saved file.
            state = {k: v.clone() for k, v in state.items()}
            path = tmp / f"consolidated.{rank:02d}.pth"
            torch.save(state, path)
            del state
            log(f"wrote {dst / path.name} ({path.stat().st_size / 2**20:.1f} MiB)")
        (tmp / "params.json").write_text(json.dumps(out_args.to_dict(), indent=2) + "\n")
        for name in COPIED_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        if not (src / "tokenizer.model").is_file():
            log(f"note: {src} has no tokenizer.model; pass --tokenizer_path when loading {dst}")
        write_checklist(tmp)
        if dst.exists():  # an empty folder the user made: replace it
            dst.rmdir()
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m llama.reshard", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="checkpoint folder (params.json + consolidated.NN.pth)")
    ap.add_argument("dst", help="new folder to create (must not exist, or be empty)")
    ap.add_argument("--mp", type=int, required=True, help="number of shards (model-parallel ranks) to write")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep)")
    a = ap.parse_args(argv)
    try:
        reshard(a.src, a.dst, a.mp, DTYPES[a.dtype] if a.dtype else None)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"llama.reshard: error: {e}")


if __name__ == "__main__":
    main()
