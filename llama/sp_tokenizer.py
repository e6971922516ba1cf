"""Llama 2 tokenizer: Meta's SentencePiece ``tokenizer.model`` through the ``sentencepiece`` package.

The file is a serialized SentencePiece ``ModelProto`` (binary protobuf), not tiktoken's text
lines. Llama 2's model: 32,000 pieces, ``<unk>`` 0, BOS ``<s>`` 1, EOS ``</s>`` 2, no pad (-1),
byte fallback for characters outside the vocabulary. Meta's semantics, kept here:
``encode(s, bos, eos)`` is ``[BOS] + sp.encode(s) + [EOS]``; ``decode`` is ``sp.decode``, which
drops the space SentencePiece put in front of the text. Control-token text in ``s`` ("</s>") is
encoded as plain characters, so user content cannot inject BOS/EOS.

``sentencepiece`` is imported when a SentencePiece file is loaded, so Llama 3 users never need it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import AbstractSet, Collection, Literal, Optional, Sequence

from llama.tokenizer import split_special

INSTALL_HINT = "pip install sentencepiece (Llama 2's tokenizer.model is a SentencePiece model)"


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise ImportError(f"the sentencepiece package is not installed: {INSTALL_HINT}") from None
    return sentencepiece


class SentencePieceTokenizer:
    """Meta's Llama 2 tokenizer; the same interface as ``llama.tokenizer.Tokenizer``."""

    chat_format = "llama2"

    def __init__(self, model_path: str | os.PathLike):
        """Load a SentencePiece ``tokenizer.model``; a ValueError names the file if it is not one."""
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer file {model_path} not found (or not a file)")
        spm = _sentencepiece()
        self.sp_model = spm.SentencePieceProcessor()
        try:
            self.sp_model.LoadFromSerializedProto(model_path.read_bytes())
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad protobuf
            raise ValueError(f"tokenizer file {model_path} is not a valid SentencePiece model: {e}") from None
        sp = self.sp_model
        self.path = model_path
        self.n_words: int = sp.vocab_size()
        self.bos_id: Optional[int] = sp.bos_id() if sp.bos_id() >= 0 else None
        if sp.eos_id() < 0:
            raise ValueError(f"tokenizer file {model_path}: the SentencePiece model defines no EOS piece")
        self.eos_id: int = sp.eos_id()
        self.pad_id: int = sp.pad_id()  # -1 for Llama 2 (no pad piece), as Meta reports it
        # Llama 2 has no end-of-turn / end-of-message / python tag tokens: EOS ends a chat answer.
        self.eot_id: Optional[int] = None
        self.eom_id: Optional[int] = None
        self.python_tag_id: Optional[int] = None
        self.default_system_prompt: Optional[str] = None
        self.stop_tokens: list[int] = [self.eos_id]
        # Control pieces (<s>, </s>) by name: text that spells them is only special when allowed.
        self.special_tokens: dict[str, int] = {
            sp.id_to_piece(i): i for i in range(self.n_words) if sp.is_control(i)
        }
        # Per-id bytes for streaming: "▁" is a space; <0xNN> byte pieces are that byte.
        self._bytes: list[bytes] = []
        for i in range(self.n_words):
            piece = sp.id_to_piece(i)
            if sp.is_control(i):
                self._bytes.append(b"")
            elif sp.is_byte(i):
                self._bytes.append(bytes([int(piece[3:5], 16)]))
            elif sp.is_unknown(i):
                self._bytes.append(sp.decode([i]).encode("utf-8"))
            else:
                self._bytes.append(piece.replace("\u2581", " ").encode("utf-8"))

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Encode ``s``, optionally framed by BOS / EOS (Meta: ``[BOS] + sp.encode(s) + [EOS]``).

        Control-token text ("<s>", "</s>") is plain text unless named in ``allowed_special``
        ("all" or a set); then each allowed occurrence becomes its id and the text between is
        encoded piece by piece. Text naming a token in ``disallowed_special`` raises ValueError.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode expects str, got {type(s).__name__}")
        tokens = [self.bos_id] if bos and self.bos_id is not None else []
        for piece in split_special(s, self.special_tokens, allowed_special, disallowed_special):
            tokens += [piece] if isinstance(piece, int) else self.sp_model.encode(piece)
        if eos:
            tokens.append(self.eos_id)
        return tokens

    def decode(self, tokens: Sequence[int]) -> str:
        """Decode ids to text, as SentencePiece does (control ids vanish, the leading space goes)."""
        self._check_ids(tokens)
        return self.sp_model.decode(list(tokens))

    def decode_bytes(self, tokens: Sequence[int]) -> bytes:
        """Raw bytes of ``tokens`` for streaming, one token at a time.

        Unlike ``decode`` the space SentencePiece adds in front of a text is kept (a piece alone
        cannot know it starts the text), so a streamed Llama 2 answer may begin with one space.
        """
        self._check_ids(tokens)
        return b"".join(self._bytes[t] for t in tokens)

    def _check_ids(self, tokens: Sequence[int]) -> None:
        if bad := [t for t in tokens if not 0 <= t < self.n_words][:5]:
            raise ValueError(f"cannot decode ids {bad}: valid ids are 0..{self.n_words - 1}")
