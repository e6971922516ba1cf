"""Llama 3 tokenizer: a tiktoken BPE over `tokenizer.model` plus 256 special tokens.

A `tokenizer_spec.json` next to `tokenizer.model` switches to a generic BPE tokenizer (other
vocabularies, e.g. SmolLM2 imported from GGUF); see `TokenizerSpec` for its schema.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Collection, Iterator, Literal, Mapping, NoReturn, Optional, Sequence

import tiktoken

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# SmolLM / StarCoder: every numeric character is its own piece, then GPT-2's regex runs on the text
# between them (HF: Digits(individual_digits) then ByteLevel; llama.cpp: "\p{N}" then GPT-2). In one
# regex, a whitespace run just before a digit ends its piece, so `\s+(?!\S)` becomes
# `\s+(?![^\s\p{N}])`: "a   1" splits "a", "   ", "1" as the two-stage split does.
DIGITS_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
LLAMA3_NUM_BASE_TOKENS = 128_000
LLAMA3_NUM_SPECIAL_TOKENS = 256
LLAMA3_TOKENIZER_MD5 = "08292403f8b173e7524d7fba7bbbd2d3"
SPEC_FILENAME = "tokenizer_spec.json"

# tiktoken can crash or stall on huge inputs: encode windows of at most this many characters,
# and cut runs of whitespace / non-whitespace longer than MAX_RUN_CHARS.
MAX_WINDOW_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def llama3_special_tokens() -> dict[str, int]:
    """The 256 Llama 3.1 special tokens (name -> id), ids 128000 ... 128255."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    reserved = [
        f"<|reserved_special_token_{i}|>"
        for i in range(2, 2 + LLAMA3_NUM_SPECIAL_TOKENS - len(named))
    ]
    return {name: LLAMA3_NUM_BASE_TOKENS + i for i, name in enumerate(named + reserved)}


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything that differs between BPE vocabularies; `tokenizer_spec.json` (format_version 1).

    JSON keys are the field names plus `"format_version": 1`. Required: pattern, num_base_tokens
    (lines in tokenizer.model), vocab_size, special_tokens (name -> id; ids may sit below, between
    or after the base ranks), eos_token, stop_tokens (names), chat_format ("llama3" | "chatml").
    Optional (default null): bos_token, eot_token, eom_token, python_tag_token, pad_token,
    default_system_prompt (the system turn ChatML prepends when a dialog has none). Base ranks
    and special ids together must be exactly 0 .. vocab_size-1.
    """

    pattern: str
    num_base_tokens: int
    vocab_size: int
    special_tokens: dict[str, int]
    eos_token: str
    stop_tokens: tuple[str, ...]
    chat_format: str
    bos_token: Optional[str] = None
    eot_token: Optional[str] = None
    eom_token: Optional[str] = None
    python_tag_token: Optional[str] = None
    pad_token: Optional[str] = None
    default_system_prompt: Optional[str] = None

    @classmethod
    def llama3(cls) -> "TokenizerSpec":
        """Meta's Llama 3 / 3.1 tokenizer."""
        specials = llama3_special_tokens()
        return cls(
            pattern=LLAMA3_PATTERN,
            num_base_tokens=LLAMA3_NUM_BASE_TOKENS,
            vocab_size=LLAMA3_NUM_BASE_TOKENS + len(specials),
            special_tokens=specials,
            bos_token="<|begin_of_text|>",
            eos_token="<|end_of_text|>",
            eot_token="<|eot_id|>",
            eom_token="<|eom_id|>",
            python_tag_token="<|python_tag|>",
            stop_tokens=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
            chat_format="llama3",
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenizerSpec":
        """Read and strictly validate a `tokenizer_spec.json`; errors are ValueErrors naming it."""
        path = Path(path)

        def fail(msg: str) -> NoReturn:
            raise ValueError(f"{path}: {msg}")

        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid UTF-8 JSON ({e})") from e
        if not isinstance(raw, dict):
            fail(f"expected a JSON object, got {type(raw).__name__}")
        name_or_null = (str, type(None))
        schema: dict[str, tuple[type, ...]] = {
            "format_version": (int,), "pattern": (str,), "num_base_tokens": (int,),
            "vocab_size": (int,), "special_tokens": (dict,), "eos_token": (str,),
            "stop_tokens": (list,), "chat_format": (str,), "bos_token": name_or_null,
            "eot_token": name_or_null, "eom_token": name_or_null,
            "python_tag_token": name_or_null, "pad_token": name_or_null,
            "default_system_prompt": name_or_null,
        }  # fmt: skip
        required = {"format_version", "pattern", "num_base_tokens", "vocab_size",
                    "special_tokens", "eos_token", "stop_tokens", "chat_format"}  # fmt: skip
        if unknown := sorted(set(raw) - set(schema)):
            fail(f"unknown key(s) {unknown}; valid keys: {sorted(schema)}")
        if missing := sorted(required - set(raw)):
            fail(f"missing key(s) {missing}")
        for key, value in raw.items():
            # bool is a subclass of int in Python; a JSON true is never a valid count
            if isinstance(value, bool) or not isinstance(value, schema[key]):
                want = " or ".join("null" if t is type(None) else t.__name__ for t in schema[key])
                fail(f"{key!r} must be {want}, got {value!r}")
        if raw["format_version"] != 1:
            fail(f"format_version {raw['format_version']} is not supported (only 1)")
        specials = raw["special_tokens"]
        for name, tid in specials.items():
            if not name or isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                fail(f"special_tokens entry {name!r}: {tid!r} must be a non-empty name -> id >= 0")
        if len(set(specials.values())) != len(specials):
            fail("special_tokens has repeated ids")
        if raw["num_base_tokens"] + len(specials) != raw["vocab_size"]:
            fail(
                f"num_base_tokens {raw['num_base_tokens']} + {len(specials)} special tokens "
                f"!= vocab_size {raw['vocab_size']}"
            )
        stop = raw["stop_tokens"]
        if not all(isinstance(name, str) for name in stop):
            fail(f"stop_tokens must be a list of special-token names, got {stop!r}")
        named = [raw.get(k) for k in schema if k.endswith("_token")] + list(stop)
        for name in named:
            if name is not None and name not in specials:
                fail(f"token {name!r} is not in special_tokens")
        if not stop:
            fail("stop_tokens must name at least one token")
        # the chat format's framing tokens must exist
        needed = {"llama3": ["<|start_header_id|>", "<|end_header_id|>"],
                  "chatml": ["<|im_start|>", "<|im_end|>"]}  # fmt: skip
        if raw["chat_format"] not in needed:
            fail(f"chat_format {raw['chat_format']!r} is not one of {sorted(needed)}")
        if absent := [n for n in needed[raw["chat_format"]] if n not in specials]:
            fail(f"chat_format {raw['chat_format']!r} needs special tokens {absent}")
        if raw["chat_format"] == "llama3" and raw.get("eot_token") is None:
            fail("chat_format 'llama3' needs eot_token (it ends every message)")
        fields = {k: v for k, v in raw.items() if k != "format_version"}
        fields["stop_tokens"] = tuple(stop)
        return cls(**fields)


def load_ranks(path: Path, expected_lines: int, what: str) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one `base64(token bytes) rank` per line."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} not found (or not a file); expected {what}")
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"tokenizer file {path} is empty; expected {what}")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(
            f"tokenizer file {path} is not a tiktoken BPE text file (binary content; "
            f"a Llama 2 SentencePiece model?); expected {what}"
        ) from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.split(" ")
        try:
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError
            token = base64.b64decode(parts[0], validate=True)
        except (ValueError, binascii.Error):
            raise ValueError(
                f"tokenizer file {path}, line {lineno}: malformed line {line[:80]!r}; "
                f"expected 'base64-token rank' lines, {what}"
            ) from None
        if token in ranks:
            raise ValueError(f"tokenizer file {path}, line {lineno}: token {token!r} repeats")
        ranks[token] = int(parts[1])
    if len(ranks) != expected_lines:
        raise ValueError(f"tokenizer file {path} has {len(ranks):,} ranks; expected {what}")
    return ranks


class Tokenizer:
    """tiktoken BPE tokenizer with Meta's Llama 3 special tokens and encode/decode semantics."""

    def __init__(self, model_path: str | os.PathLike):
        """Load `model_path`; a `tokenizer_spec.json` beside it selects generic mode."""
        model_path = Path(model_path)
        spec_path = model_path.parent / SPEC_FILENAME
        self.spec_path: Optional[Path] = spec_path if spec_path.is_file() else None
        if self.spec_path is None:
            spec = TokenizerSpec.llama3()
            what = (
                f"{LLAMA3_NUM_BASE_TOKENS:,} lines (Meta's Llama 3 tokenizer.model, "
                f"md5 {LLAMA3_TOKENIZER_MD5})"
            )
        else:
            spec = TokenizerSpec.load(self.spec_path)
            what = f"{spec.num_base_tokens:,} lines (num_base_tokens in {self.spec_path})"
        ranks = load_ranks(model_path, spec.num_base_tokens, what)
        _check_ids(model_path, ranks, spec)
        if self.spec_path is None:  # 128,000 ranks: it claims to be Meta's file, so check that it is
            md5 = hashlib.md5(model_path.read_bytes()).hexdigest()
            if md5 != LLAMA3_TOKENIZER_MD5:
                warnings.warn(
                    f"{model_path} has Meta's 128,000 ranks but md5 {md5}, not {LLAMA3_TOKENIZER_MD5} of Meta's "
                    f"Llama 3 tokenizer.model: an edited or corrupt file gives wrong token ids; re-download it",
                    stacklevel=2,
                )
        # Some byte-level vocabularies (SmolLM2's) lack a few single bytes. tiktoken panics on
        # them, so characters that contain one are dropped before encoding, as transformers does.
        self.missing_bytes: bytes = bytes(b for b in range(256) if bytes([b]) not in ranks)
        try:
            self.model = tiktoken.Encoding(
                name=model_path.name,
                pat_str=spec.pattern,
                mergeable_ranks=ranks,
                special_tokens=spec.special_tokens,
            )
        except Exception as e:  # a bad regex surfaces here from tiktoken's Rust core
            raise ValueError(f"cannot build the tokenizer from {model_path}: {e}") from e

        def tid(name: Optional[str]) -> Optional[int]:
            return None if name is None else spec.special_tokens[name]

        self.spec = spec
        self.pat_str: str = spec.pattern  # Meta's names for the split regex and the special-token count
        self.num_reserved_special_tokens: int = len(spec.special_tokens)
        self.special_tokens: dict[str, int] = dict(spec.special_tokens)
        self.num_base_tokens = spec.num_base_tokens
        self.n_words: int = spec.vocab_size
        self.bos_id: Optional[int] = tid(spec.bos_token)
        self.eos_id: int = spec.special_tokens[spec.eos_token]
        self.eot_id: Optional[int] = tid(spec.eot_token)
        self.eom_id: Optional[int] = tid(spec.eom_token)
        self.python_tag_id: Optional[int] = tid(spec.python_tag_token)
        # Meta's Llama 3 tokenizer has no pad token and reports -1; a spec says so explicitly.
        self.pad_id: Optional[int] = -1 if self.spec_path is None else tid(spec.pad_token)
        self.stop_tokens: list[int] = [spec.special_tokens[n] for n in spec.stop_tokens]
        self.chat_format: str = spec.chat_format
        self.default_system_prompt: Optional[str] = spec.default_system_prompt

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Encode `s` to token ids, optionally framed by BOS / EOS.

        Text that looks like a special token is plain text by default, so user content cannot
        inject control tokens. Names in `allowed_special` ("all" or a set of names) become their
        special ids; special text named by `disallowed_special` ("all" = every special token not
        allowed) raises ValueError.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode expects str, got {type(s).__name__}")
        tokens = [self.bos_id] if bos and self.bos_id is not None else []
        for piece in split_special(s, self.special_tokens, allowed_special, disallowed_special):
            tokens += [piece] if isinstance(piece, int) else self._encode_plain(piece)
        if eos:
            tokens.append(self.eos_id)
        return tokens

    def decode(self, tokens: Sequence[int]) -> str:
        """Decode ids to text; incomplete UTF-8 becomes U+FFFD instead of raising."""
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def decode_bytes(self, tokens: Sequence[int]) -> bytes:
        """Decode ids to raw bytes (a streaming decoder can hold back incomplete UTF-8)."""
        try:
            return self.model.decode_bytes(list(tokens))
        except (KeyError, OverflowError) as e:
            bad = [t for t in tokens if not 0 <= t < self.n_words][:5]
            raise ValueError(f"cannot decode ids {bad}: valid ids are 0..{self.n_words - 1}") from e

    def _encode_plain(self, s: str) -> list[int]:
        if self.missing_bytes:
            data = s.encode("utf-8", errors="surrogatepass")
            if len(data.translate(None, self.missing_bytes)) != len(data):
                # Such a character ends the pre-token before it and is dropped (transformers does the same).
                missing = set(self.missing_bytes)
                dropped = [c for c in set(s) if missing & set(c.encode("utf-8", errors="surrogatepass"))]
                parts = re.split("|".join(map(re.escape, dropped)), s)  # the text between them
                return [t for part in parts for t in self._encode_plain(part)]
        # Each piece is tokenized on its own; see split_for_tiktoken for why that is exact.
        out: list[int] = []
        for piece in split_for_tiktoken(s):
            out += self.model.encode_ordinary(piece)
        return out


def split_for_tiktoken(s: str) -> Iterator[str]:
    """Yield pieces of `s`: windows of <= 400,000 characters, long runs cut at 25,000.

    A window ends, when possible, just before a space that follows a non-whitespace character.
    The pre-tokenizer pattern always starts a new pre-token there (no alternative joins a
    non-space character with a following space), so for ordinary text the windowed encoding
    equals encoding the whole string. Cuts inside runs > 25,000 characters do change tokens,
    but only for such degenerate input.
    """
    n = len(s)
    start = 0
    while start < n:
        end = min(start + MAX_WINDOW_CHARS, n)
        if end < n:
            cut = None
            for cut in _GOOD_CUT.finditer(s, start + MAX_WINDOW_CHARS // 2, end):
                pass
            if cut is not None:
                end = cut.start()
        yield from _split_long_runs(s[start:end])
        start = end


def _split_long_runs(window: str) -> Iterator[str]:
    cuts = [0]
    for run in _LONG_RUN.finditer(window):
        cuts += range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS)
    cuts.append(len(window))
    for a, b in zip(cuts, cuts[1:]):
        yield window[a:b]


# Python's \s is str.isspace(), a superset of Unicode White_Space used by tiktoken's regex, so a
# Python \S is also non-whitespace for tiktoken.
_GOOD_CUT = re.compile(r"(?<=\S) ")
# The lookbehinds anchor each match at the start of a run, keeping the search linear.
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}|(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}")


def split_special(
    s: str,
    special_tokens: Mapping[str, int],
    allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
    disallowed_special: Literal["all"] | Collection[str] = (),
) -> list[str | int]:
    """``s`` as plain-text pieces (str) and the ids (int) of the special tokens ``allowed_special``
    lets through, in order; empty pieces are left out. Shared by both tokenizers' ``encode``.

    ``allowed_special`` / ``disallowed_special``: "all" or names of ``special_tokens`` ("all"
    disallowed = every special token not allowed). Raises ValueError for an unknown name, or when
    ``s`` contains the text of a disallowed special token.
    """
    names = frozenset(special_tokens)
    allowed = names if allowed_special == "all" else frozenset(allowed_special)
    disallowed = names - allowed if disallowed_special == "all" else frozenset(disallowed_special)
    if unknown := sorted((allowed | disallowed) - names):
        raise ValueError(f"unknown special token name(s) {unknown[:5]}; this tokenizer has {len(names)} special tokens")
    if disallowed and (match := _alternation(disallowed).search(s)):
        raise ValueError(
            f"text contains the special token {match.group()!r} at character "
            f"{match.start()}, which disallowed_special forbids"
        )
    pieces: list[str | int] = []
    start = 0
    if allowed:
        for match in _alternation(allowed).finditer(s):
            if match.start() > start:
                pieces.append(s[start : match.start()])
            pieces.append(special_tokens[match.group()])
            start = match.end()
    if start < len(s):
        pieces.append(s[start:])
    return pieces


@functools.lru_cache(maxsize=64)
def _alternation(names: frozenset[str]) -> re.Pattern[str]:
    # Longest first, so a name that prefixes another cannot shadow it.
    return re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))


def _check_ids(path: Path, ranks: dict[bytes, int], spec: TokenizerSpec) -> None:
    """Base ranks and special ids must be distinct and cover 0 .. vocab_size-1 exactly."""
    ids = sorted([*ranks.values(), *spec.special_tokens.values()])
    if ids != list(range(spec.vocab_size)):
        counts = Counter(ids)
        repeated = sorted(i for i, c in counts.items() if c > 1)[:5]
        missing = [i for i in range(spec.vocab_size) if i not in counts][:5]
        raise ValueError(
            f"tokenizer file {path}: base ranks plus special-token ids must be exactly "
            f"0..{spec.vocab_size - 1}; repeated ids: {repeated}, missing ids: {missing}"
        )


def __getattr__(name: str):
    """`from llama.tokenizer import ChatFormat` (and `Dialog`, `Message`, `Role`), as in Meta's llama3
    (ours live in chat_format.py and datatypes.py; imported lazily because chat_format imports this module)."""
    if name == "ChatFormat":
        from .chat_format import ChatFormat

        return ChatFormat
    if name in ("Dialog", "Message", "Role"):
        from . import datatypes

        return getattr(datatypes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
