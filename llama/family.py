"""Which tokenizer a checkpoint uses (and so which chat format), decided by the tokenizer file's content.

- Llama 3 / 3.1 (and generic BPE with ``tokenizer_spec.json``): ``tokenizer.model`` is text, one
  ``base64-token rank`` line per token -> ``llama.tokenizer.Tokenizer``, Llama 3 (or ChatML) chat.
- Llama 2: ``tokenizer.model`` is a binary SentencePiece protobuf -> ``SentencePieceTokenizer``,
  the ``[INST]`` chat format.

Never the file name or folder name: both kinds are called ``tokenizer.model``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

from llama.sp_tokenizer import SentencePieceTokenizer
from llama.tokenizer import Tokenizer

AnyTokenizer = Union[Tokenizer, SentencePieceTokenizer]

# First line of a tiktoken BPE file: base64 of the token bytes, one space, the rank.
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=*[ ][0-9]+\r?")


def tokenizer_kind(path: str | os.PathLike) -> str:
    """``"tiktoken"`` or ``"sentencepiece"`` from the first bytes of ``path``; ValueError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} not found (or not a file)")
    with open(path, "rb") as f:
        head = f.read(4096)
    first_line = head.split(b"\n", 1)[0]
    if _TIKTOKEN_LINE.fullmatch(first_line):
        return "tiktoken"
    # A SentencePiece ModelProto starts with field 1 (its pieces), wire type 2: byte 0x0A, then a
    # varint length and the first SentencePiece message, whose own field 1 (the piece text) is 0x0A.
    if head[:1] == b"\x0a" and b"\x0a" in head[2:6]:
        return "sentencepiece"
    what = "empty" if not head else f"starts with {head[:16]!r}"
    hint = " (a Hugging Face tokenizer.json? use the tokenizer.model of Meta's folder)" if head.lstrip()[:1] == b"{" else ""
    raise ValueError(
        f"tokenizer file {path} is neither a tiktoken BPE file (Llama 3: 'base64 rank' lines) nor a "
        f"SentencePiece model (Llama 2: binary protobuf): it {what}{hint}"
    )


def load_tokenizer(path: str | os.PathLike) -> AnyTokenizer:
    """The tokenizer for ``path``, of the kind its content says (see the module docstring)."""
    if tokenizer_kind(path) == "sentencepiece":
        return SentencePieceTokenizer(path)
    return Tokenizer(path)
