"""Rewrite a Meta-format checkpoint with a different number of model-parallel shards.

    python -m llama.reshard SRC DST --mp M [--dtype bf16]

DST gets ``consolidated.00.pth`` ... ``consolidated.{M-1}.pth``, ``params.json`` (``n_kv_heads``
raised to M when M exceeds it: each KV head is duplicated, as in Meta's 405B MP16 files),
``tokenizer.model`` (and ``tokenizer_spec.json``) copied from SRC, and a fresh ``checklist.chk``.

Llama 1/2 folders (``"vocab_size": -1`` in params.json, or tok_embeddings split along dim 1 in
the shards) stay in their own format: DST's shards split tok_embeddings along dim 1 as Meta's
Llama 2 code expects, and its params.json keeps Meta's Llama 2 keys.

Each output shard is exactly what rank r of M would load from SRC (``load_state_dict``: the source
files are memory-mapped and only the needed slices read), so only one output shard is in memory
at a time. Everything is written into a hidden folder beside DST and renamed into place at the
end (``llama.checkpoint.atomic_folder``): DST either does not exist or is complete. An existing,
non-empty DST is never touched; hidden folders left by a killed run are removed by the next one.
SRC is first checked against its ``checklist.chk`` (``verify_checkpoint``, as ``Llama.build`` does;
``--no_verify`` skips it): DST's fresh checklist would otherwise vouch for a corrupt download.
"""

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from llama.checkpoint import (
    atomic_folder,
    check_layout,
    expected_shapes,
    find_shards,
    load_params,
    load_state_dict,
    prepare_destination,
    save_params,
    shard_dim,
    shard_state_dict,
    state_bytes,
    verify_checkpoint,
    write_checklist,
)
from llama.cli import NO_VERIFY_HELP, Parser, integer, user_errors
from llama.devices import DTYPES
from llama.model import ModelArgs
from llama.params import to_dict


# Copied verbatim when SRC has them; the tokenizer travels with the weights.
COPIED_FILES = ("tokenizer.model", "tokenizer_spec.json")


def reshard(
    src: str | Path,
    dst: str | Path,
    mp: int,
    dtype: Optional[torch.dtype] = None,
    log=print,
    verify: Optional[bool] = None,
    skip: str = "verify=False",
) -> Path:
    """Write SRC as an M-shard checkpoint at DST (see the module docstring); returns DST.

    ``verify`` as ``Llama.build``'s: None checks SRC against its ``checklist.chk`` when it has one
    (files verified before are not hashed again), True always, False never; ``skip`` is how the
    messages tell the user to skip it.
    """
    src, dst = Path(src), Path(dst)
    if mp < 1:
        raise ValueError(f"--mp must be at least 1, got {mp}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not an empty folder: refusing to overwrite it")
    args = load_params(src)
    shards = find_shards(src)
    check_layout(args, len(shards), mp)  # before writing anything: the error names N, M, n_heads, n_kv_heads
    # shard_state_dict is the one place deciding the params of an M-shard checkpoint (n_kv_heads
    # raised to M when KV heads are duplicated); given no tensors it only returns those params.
    _, out_args = shard_state_dict({}, args, mp)
    src_params = json.loads((src / "params.json").read_text())
    llama2 = src_params.get("vocab_size") == -1 or embedding_split_dim(src, args) == 1
    if llama2:  # Meta's Llama 2 keys as they were; only a KV-head duplication changes them
        out_params = dict(src_params)
        if out_args.n_kv_heads != args.n_kv_heads:
            out_params["n_kv_heads"] = out_args.n_kv_heads
    else:
        out_params = to_dict(out_args)

    # Disk needed: the source's size (its dtype) or the tensors in the new dtype, with duplicated KV heads.
    need = state_bytes(expected_shapes(out_args), dtype) if dtype else sum(p.stat().st_size for p in shards)
    prepare_destination(dst, need, replace_empty=True, log=log)  # a full or read-only disk, before the hashing
    verify_checkpoint(src, verify, log, skip=skip)

    embedding: Optional[torch.Tensor] = None
    with atomic_folder(dst, need, replace_empty=True, log=log) as tmp:
        for rank in range(mp):
            state = load_state_dict(src, args, rank, mp, dtype)
            # clone: a slice of a memory-mapped source tensor would otherwise drag its whole
            # storage (the full source tensor) into the saved file.
            state = {k: v.clone() for k, v in state.items()}
            if llama2 and mp > 1:  # Llama 2 layout: this rank's columns of the embedding, not its rows
                if embedding is None:  # read once, after load_state_dict has checked the shapes
                    embedding = load_full_tensor(src, args, "tok_embeddings.weight")  # [vocab, dim]
                state["tok_embeddings.weight"] = embedding.chunk(mp, dim=1)[rank].to(dtype or embedding.dtype).clone()
            path = tmp / f"consolidated.{rank:02d}.pth"
            torch.save(state, path)
            del state
            log(f"wrote {dst / path.name} ({path.stat().st_size / 2**20:.1f} MiB)")
        save_params(tmp, out_params)
        for name in COPIED_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        if not (src / "tokenizer.model").is_file():
            log(f"note: {src} has no tokenizer.model; pass --tokenizer_path when loading {dst}")
        write_checklist(tmp)
    return dst


def embedding_split_dim(ckpt_dir: Path, args: ModelArgs) -> int:
    """How the shards of ``ckpt_dir`` split tok_embeddings: 1 (Llama 2, [vocab, dim/N]) or 0 (rows).

    Read from the first shard's shape (memory-mapped); a single shard says nothing and gives 0.
    """
    paths = find_shards(ckpt_dir)
    if len(paths) == 1:
        return 0
    shape = torch.load(paths[0], map_location="cpu", weights_only=True, mmap=True)["tok_embeddings.weight"].shape
    return 1 if tuple(shape) == (args.vocab_size, args.dim // len(paths)) else 0


def load_full_tensor(ckpt_dir: Path, args: ModelArgs, key: str) -> torch.Tensor:
    """One full tensor, concatenated from every shard along the dim the files split it."""
    paths = find_shards(ckpt_dir)
    parts = [torch.load(p, map_location="cpu", weights_only=True, mmap=True)[key] for p in paths]
    dim = embedding_split_dim(ckpt_dir, args) if key == "tok_embeddings.weight" else shard_dim(key)
    return parts[0] if len(parts) == 1 or dim is None else torch.cat(parts, dim=dim)


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m llama.reshard SRC DST --mp M [--dtype bf16]``; ``--help`` describes the flags."""
    ap = Parser(prog="python -m llama.reshard", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("src", help="Meta-format checkpoint folder (params.json + consolidated.NN.pth)")
    ap.add_argument("dst", help="new folder to create (must not exist, or be empty)")
    ap.add_argument("--mp", "--shards", dest="mp", type=integer(1), required=True,
                    help="number of shards (model-parallel ranks) to write, >= 1")  # fmt: skip
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights: bf16, fp16 or fp32 (default: keep)")
    ap.add_argument("--no_verify", "--no-verify", dest="no_verify", action="store_true", help=NO_VERIFY_HELP)
    a = ap.parse_args(argv)
    with user_errors(ap.prog):
        reshard(a.src, a.dst, a.mp, DTYPES[a.dtype] if a.dtype else None, verify=False if a.no_verify else None,
                skip="--no_verify")  # fmt: skip


if __name__ == "__main__":
    main()
