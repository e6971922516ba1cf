"""Our tiktoken vocabulary as a byte-level BPE: Hugging Face ``tokenizer.json`` files and the token
and merge lists a GGUF carries.

tiktoken and a byte-level BPE with merges are the same tokenizer when three facts hold:
- tokens are spelled in GPT-2's byte-level alphabet (every byte a printable character);
- the merge list holds every split of every token into two tokens, ordered by the rank of the
  token they make: tiktoken merges the adjacent pair whose concatenation has the lowest rank, so
  all splits of one token share that token's priority (Hugging Face's tiktoken converter writes
  merges this way, and llama.cpp's Llama 3 vocabulary has them in this order);
- a pre-token that is itself a token is emitted whole (tiktoken looks it up before merging;
  Hugging Face's ``ignore_merges``, llama.cpp's Llama 3 rule).
The pre-tokenizer regex is the tokenizer's own pattern.
"""

import json
from pathlib import Path
from typing import Any

from llama.tokenizer import Tokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"


def byte_encoder() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the others
    (controls, space, 0x7f-0xa0, 0xad) are spelled U+0100, U+0101, ... in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(others)})
    return dict(sorted(chars.items()))


def base_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    """Byte-level spelling -> rank of every non-special token, in rank order."""
    enc = byte_encoder()
    special_ids = set(tokenizer.special_tokens.values())
    out = {}
    for tid in range(tokenizer.n_words):
        if tid not in special_ids:
            out["".join(enc[b] for b in tokenizer.model.decode_single_token_bytes(tid))] = tid
    return out


def bpe_merges(vocab: dict[str, int]) -> list[str]:
    """``"left right"`` merges: every split of every token into two tokens, by the made token's
    rank, then (within one token) by the ranks of left and right."""
    merges = []
    for token, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(a, b) for a, b in splits if a in vocab and b in vocab]
        merges += [f"{a} {b}" for a, b in sorted(splits, key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))]
    return merges


def chat_template(tokenizer: Tokenizer) -> str:
    """A Jinja chat template that renders a dialog exactly as ``ChatFormat.encode_dialog_prompt``
    (text messages; tool calls are not templated)."""
    if tokenizer.chat_format == "llama3":
        return (
            "{{- bos_token }}"
            "{%- for message in messages %}"
            "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
            " + message['content'] | trim + '<|eot_id|>' }}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
        )
    default = tokenizer.default_system_prompt
    system = (
        "{%- if messages and messages[0]['role'] != 'system' %}"
        f"{{{{- '<|im_start|>system\\n' + {json.dumps(default)} + '<|im_end|>\\n' }}}}"
        "{%- endif %}"
    ) if default else ""  # fmt: skip
    return (
        system + "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """A Hugging Face ``tokenizers`` file that encodes like ``tokenizer`` (BOS added as ours does)."""
    vocab = base_tokens(tokenizer)
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    bos = next((name for name, tid in specials if tid == tokenizer.bos_id), None)
    single: list[dict[str, Any]] = [{"Sequence": {"id": "A", "type_id": 0}}]
    pair: list[dict[str, Any]] = [*single, {"Sequence": {"id": "B", "type_id": 1}}]
    if bos is not None:
        single = [{"SpecialToken": {"id": bos, "type_id": 0}}, *single]
        pair = [*single, {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": tid, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for name, tid in specials
        ],  # fmt: skip
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tokenizer.spec.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": single,
            "pair": pair,
            "special_tokens": {} if bos is None else {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,  # tiktoken emits a pre-token that is a token as is
            "vocab": vocab,
            "merges": bpe_merges(vocab),
        },
    }


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json``: special tokens, the chat template, no decode-time space cleanup."""

    def name(tid: int | None) -> str | None:
        return next((n for n, i in tokenizer.special_tokens.items() if i == tid), None)

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(tokenizer.bos_id),
        "eos_token": name(tokenizer.eos_id),
        "pad_token": name(tokenizer.pad_id),
        "add_bos_token": tokenizer.bos_id is not None,
        "add_eos_token": False,
        # our decode returns the bytes as they are; the cleanup would turn " ." into "."
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "chat_template": chat_template(tokenizer),
    }


def write_hf_tokenizer(tokenizer: Tokenizer, folder: str | Path, model_max_length: int) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``."""
    folder = Path(folder)
    (folder / TOKENIZER_JSON).write_text(json.dumps(tokenizer_json(tokenizer), ensure_ascii=False) + "\n")
    config = tokenizer_config(tokenizer, model_max_length)
    (folder / TOKENIZER_CONFIG_JSON).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
