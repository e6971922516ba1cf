"""Tokenizer: Meta's reference ids, round trips, special-token safety, long inputs, errors,
and generic mode (tokenizer_spec.json) on a synthetic vocabulary."""

import base64
import json
import random
import re
import time
from pathlib import Path

import pytest
import tiktoken

from llama.tokenizer import LLAMA3_PATTERN, Tokenizer, split_for_tiktoken


@pytest.fixture(scope="module")
def tok(meta_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(meta_tokenizer_path)


# --- Meta's Llama 3 tokenizer -------------------------------------------------------------


def test_reference_ids(tok: Tokenizer) -> None:
    ids = tok.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert tok.encode("This is a test sentence.", bos=False, eos=False) == ids[1:-1]


def test_special_tokens(tok: Tokenizer) -> None:
    named = {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002, "<|reserved_special_token_1|>": 128003,
        "<|finetune_right_pad_id|>": 128004, "<|step_id|>": 128005,
        "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008,
        "<|eot_id|>": 128009, "<|python_tag|>": 128010,
        "<|reserved_special_token_2|>": 128011, "<|reserved_special_token_246|>": 128255,
    }  # fmt: skip
    assert {name: tok.special_tokens[name] for name in named} == named
    assert len(tok.special_tokens) == 256
    assert sorted(tok.special_tokens.values()) == list(range(128000, 128256))
    assert tok.n_words == 128256 == tok.model.n_vocab
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.eom_id) == (128000, 128001, 128009, 128008)
    assert tok.python_tag_id == 128010 and tok.pad_id == -1
    assert set(tok.stop_tokens) == {128001, 128008, 128009}
    assert isinstance(tok.model, tiktoken.Encoding)
    assert tok.chat_format == "llama3" and tok.default_system_prompt is None


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! 123 4567",
        "Ça déjà vu, naïve façade, Ærøskøbing",
        "日本語のテキストと中文文本",
        "emoji 😀👍🏽 and a family 👨‍👩‍👧",
        "def f(x):\n\treturn x ** 2  # comment\n\n\nclass A: pass\r\n",
        "<|begin_of_text|><|eot_id|> not special <|python_tag|>",
        "",
        "   leading and trailing   \n",
    ],
)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, bos=False, eos=False)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert not set(ids) & set(tok.special_tokens.values())  # special text stays plain text


def test_special_text_plain_unless_allowed(tok: Tokenizer) -> None:
    text = "a<|eot_id|>b<|eom_id|>"
    plain = tok.encode(text, bos=False, eos=False)
    assert 128009 not in plain and 128008 not in plain and tok.decode(plain) == text
    assert tok.encode(text, bos=False, eos=False, allowed_special="all") == [
        64, 128009, 65, 128008
    ]
    only_eot = tok.encode(text, bos=False, eos=False, allowed_special={"<|eot_id|>"})
    assert only_eot[:3] == [64, 128009, 65] and 128008 not in only_eot
    assert tok.decode(only_eot) == text
    with pytest.raises(ValueError, match=r"'<\|eot_id\|>' at character 1.*disallowed_special"):
        tok.encode(text, bos=False, eos=False, disallowed_special="all")
    # what is allowed is not disallowed by "all"
    tok.encode("<|eot_id|>", bos=False, eos=False, allowed_special={"<|eot_id|>"},
               disallowed_special="all")  # fmt: skip
    with pytest.raises(ValueError, match="unknown special token name"):
        tok.encode(text, bos=False, eos=False, allowed_special={"<|not_a_token|>"})


def test_partial_utf8_decodes_with_replacement(tok: Tokenizer) -> None:
    ids = tok.encode("😀", bos=False, eos=False)
    assert len(ids) > 1  # the emoji spans several byte-level tokens
    assert "\ufffd" in tok.decode(ids[:1])
    assert b"".join(tok.decode_bytes([i]) for i in ids) == "😀".encode()
    with pytest.raises(ValueError, match="cannot decode ids"):
        tok.decode([5, 128256])


# --- long inputs -------------------------------------------------------------------------


def _mixed_long_text() -> str:
    rng = random.Random(0)
    parts = ["a" * 60_000, " " * 70_000, "\n" * 30_000, "é" * 26_000, "x" * 500_000]
    parts += [rng.choice(["word ", "日本 ", "42 ", "\t", "!!! "]) for _ in range(100_000)]
    rng.shuffle(parts)
    return "".join(parts)[:1_000_000]


@pytest.mark.parametrize("kind", ["spaces", "letters", "mixed"])
def test_one_million_characters(tok: Tokenizer, kind: str) -> None:
    text = {"spaces": " " * 1_000_000, "letters": "a" * 1_000_000, "mixed": None}[kind]
    text = text or _mixed_long_text()
    assert len(text) == 1_000_000
    start = time.monotonic()
    ids = tok.encode(text, bos=False, eos=False)
    assert time.monotonic() - start < 60  # hang guard only; it takes well under a second
    assert tok.decode(ids) == text
    if kind != "mixed":
        # Uniform input is cut into 40 identical pieces of 25,000 characters.
        assert ids == tok.model.encode_ordinary(text[:25_000]) * 40
    pieces = list(split_for_tiktoken(text))
    assert "".join(pieces) == text
    for piece in pieces:
        longest_run = max(len(m.group()) for m in re.finditer(r"\s+|\S+", piece))
        assert len(piece) <= 400_000 and longest_run <= 25_000


def test_windowing_is_exact_on_ordinary_text(tok: Tokenizer) -> None:
    """Window cuts land on pre-token boundaries: same ids as one tiktoken call."""
    rng = random.Random(1)
    vocab = ["the", "Don't", "we'll", "1234567", "café", "日本語", "x=y+1;", "(paren)", "...",
             "\n", "\r\n", "\t", "  ", " ", "'s", "😀", "--", "A1b2",
             "\u00a0", "\x0b", "\u2028", "\x1c", "\u200b", "'"]  # fmt: skip
    text = "".join(rng.choice(vocab) + rng.choice(["", " ", " ", "\n "]) for _ in range(300_000))
    assert len(text) > 2 * 400_000
    assert len(list(split_for_tiktoken(text))) > 2
    assert tok.encode(text, bos=False, eos=False) == tok.model.encode_ordinary(text)


# --- file errors -------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.model.*not found.*128,000 lines"):
        Tokenizer(tmp_path / "nope.model")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_text("")
    with pytest.raises(ValueError, match=r"tokenizer\.model is empty.*128,000 lines.*08292403"):
        Tokenizer(tmp_path / "tokenizer.model")


def test_malformed_line(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nnot base64!! 1\n")
    with pytest.raises(ValueError, match=r"line 2: malformed line 'not base64!! 1'"):
        Tokenizer(tmp_path / "tokenizer.model")


def test_binary_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xfe sentencepiece")
    with pytest.raises(ValueError, match="SentencePiece"):
        Tokenizer(tmp_path / "tokenizer.model")


def test_wrong_rank_count(tmp_path: Path, meta_tokenizer_path: Path) -> None:
    lines = meta_tokenizer_path.read_text().splitlines()[:1000]
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"has 1,000 ranks; expected 128,000 lines.*md5"):
        Tokenizer(tmp_path / "tokenizer.model")


def test_rank_ids_must_cover_the_vocabulary(tmp_path: Path, meta_tokenizer_path: Path) -> None:
    lines = meta_tokenizer_path.read_text().splitlines()
    lines[-1] = lines[-1].split(" ")[0] + " 0"  # rank 0 twice, rank 127999 missing
    (tmp_path / "tokenizer.model").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"repeated ids: \[0\], missing ids: \[127999\]"):
        Tokenizer(tmp_path / "tokenizer.model")


# --- generic mode: tokenizer_spec.json -------------------------------------------------------

MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world"]


def write_tiny(folder: Path, **spec_changes: object) -> Path:
    """256 byte tokens (ids 3..258) + 9 merges (259..267); specials at 0..2 and 268."""
    ranks = {bytes([b]): 3 + b for b in range(256)}
    ranks.update({m: 259 + i for i, m in enumerate(MERGES)})
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items()]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n")
    spec = {
        "format_version": 1,
        "pattern": LLAMA3_PATTERN,
        "num_base_tokens": len(ranks),
        "vocab_size": len(ranks) + 4,
        "special_tokens": {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|pad|>": 268},
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "eot_token": "<|im_end|>",
        "eom_token": None,
        "python_tag_token": None,
        "pad_token": "<|pad|>",
        "stop_tokens": ["<|im_end|>", "<|endoftext|>"],
        "chat_format": "chatml",
        "default_system_prompt": "You are a helpful AI assistant.",
    }
    spec.update(spec_changes)
    (folder / "tokenizer_spec.json").write_text(json.dumps(spec))
    return folder / "tokenizer.model"


def test_generic_mode(tmp_path: Path) -> None:
    tok = Tokenizer(write_tiny(tmp_path))
    assert tok.spec_path == tmp_path / "tokenizer_spec.json"
    assert tok.n_words == 269 and tok.num_base_tokens == 265
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id) == (None, 0, 2, 268)
    assert tok.eom_id is None and tok.python_tag_id is None
    assert tok.stop_tokens == [2, 0] and tok.chat_format == "chatml"
    assert tok.default_system_prompt == "You are a helpful AI assistant."
    assert tok.encode("hello world", bos=True, eos=True) == [262, 267, 0]  # no BOS exists
    assert tok.encode("hi", bos=False, eos=False) == [3 + ord("h"), 3 + ord("i")]
    text = "<|im_start|>hello<|pad|>"
    assert tok.encode(text, bos=False, eos=False, allowed_special="all") == [1, 262, 268]
    for s in [text, "naïve 日本 😀 hello world"]:
        assert tok.decode(tok.encode(s, bos=False, eos=False)) == s


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
        ({"vocab_size": "269"}, r"'vocab_size' must be int, got '269'"),
        ({"num_base_tokens": True}, r"'num_base_tokens' must be int, got True"),
        ({"bos_token": 5}, r"'bos_token' must be str or null, got 5"),
        ({"format_version": 2}, "format_version 2 is not supported"),
        ({"num_base_tokens": 300, "vocab_size": 304}, r"has 265 ranks; expected 300 lines"),
        ({"vocab_size": 270}, r"\+ 4 special tokens != vocab_size 270"),
        ({"eos_token": "<|nope|>"}, r"token '<\|nope\|>' is not in special_tokens"),
        ({"stop_tokens": []}, "stop_tokens must name at least one token"),
        ({"chat_format": "alpaca"}, r"chat_format 'alpaca' is not one of"),
        ({"chat_format": "llama3"}, r"needs special tokens \['<\|start_header_id\|>'"),
        ({"pattern": "(unclosed"}, "cannot build the tokenizer"),
        ({"special_tokens": {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2,
                             "<|pad|>": 300}}, r"missing ids: \[268\]"),  # fmt: skip
    ],
)
def test_bad_spec(tmp_path: Path, change: dict, message: str) -> None:
    model = write_tiny(tmp_path, **change)
    with pytest.raises(ValueError, match=message) as err:
        Tokenizer(model)
    assert str(tmp_path) in str(err.value)  # the message names the file


def test_spec_not_json(tmp_path: Path) -> None:
    model = write_tiny(tmp_path)
    (tmp_path / "tokenizer_spec.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"tokenizer_spec\.json: not valid UTF-8 JSON"):
        Tokenizer(model)
