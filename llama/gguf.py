"""Import a llama-architecture GGUF file as a Meta-format checkpoint folder.

    python -m llama.gguf MODEL.gguf OUT_DIR [--dtype bf16|fp16|fp32]
    python -m llama.gguf export SRC OUT.gguf [--type bf16|q8_0]   (see llama/gguf_export.py)

writes ``OUT_DIR`` with ``consolidated.00.pth``, ``params.json``, ``tokenizer.model`` (tiktoken
BPE), ``tokenizer_spec.json`` (the vocabulary's special tokens, pattern and chat format) and
``checklist.chk``. Everything comes from the file's metadata, nothing from its name.

Three facts make the import a renaming plus dequantization:
- ggml lists dims fastest-first, the reverse of torch: a ``[576, 1536]`` ggml tensor is a torch
  ``[1536, 576]`` weight, which is what ``GGUFReader`` already hands out.
- llama.cpp's converter permutes wq/wk from Hugging Face's "rotate half" layout back to Meta's
  adjacent-pair layout, so GGUF q/k rows are already in Meta's order (transformers un-permutes them
  when it loads a GGUF; tests/test_gguf.py checks our logits against it).
- A GGUF byte-level BPE vocabulary lists tokens in merge order, so "rank = token id" is a valid
  tiktoken rank table (checked below against the merges in the file).
"""

import base64
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from llama.checkpoint import (
    atomic_folder,
    expected_shapes,
    prepare_destination,
    save_params,
    save_shards,
    state_bytes,
    write_checklist,
)
from llama.cli import Parser, user_errors
from llama.convert import meta_ffn_params
from llama.devices import DTYPES
from llama.model import ModelArgs
from llama.params import from_dict, to_dict
from llama.gguf_export import TENSOR_NAMES
from llama.tokenizer import DIGITS_PATTERN, LLAMA3_PATTERN

# Pre-tokenizer regexes (tokenizer.ggml.pre) for tiktoken, which applies one regex.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZER_PATTERNS = {
    "smollm": DIGITS_PATTERN,
    "starcoder": DIGITS_PATTERN,
    "refact": DIGITS_PATTERN,
    "gpt-2": GPT2_PATTERN,
    "gpt2": GPT2_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
    "llama3": LLAMA3_PATTERN,
    "llama-v3": LLAMA3_PATTERN,
}

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Tokens that end a generation wherever a vocabulary has them as control tokens.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")
CHATML_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>")

Progress = Callable[[int, int, str], None]


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf==0.19.0") from None
    return gguf


def read_metadata(reader: Any) -> dict[str, Any]:
    """All key/value fields as Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def model_args(meta: dict[str, Any]) -> ModelArgs:
    """``ModelArgs`` from GGUF metadata; raises for anything our Llama cannot represent."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"GGUF architecture is {arch!r}; only 'llama' (Llama-architecture decoders) can be imported"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return value

    if get("expert_count", 0):
        raise ValueError(f"GGUF has llama.expert_count={get('expert_count')} (mixture of experts): not supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"GGUF RoPE scaling {scaling!r} is not supported (only Llama 3.1 scaling via rope_freqs)")
    dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    vocab = int(meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", [])))
    ffn = int(get("feed_forward_length"))
    multiple_of, multiplier = meta_ffn_params(dim, ffn)
    params = dict(
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        vocab_size=vocab,
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        # GGUF stores float32: keep the shortest decimal that is that float32 (1e-05, not 9.99999974e-06).
        norm_eps=float(str(np.float32(get("attention.layer_norm_rms_epsilon")))),
        rope_theta=float(str(np.float32(get("rope.freq_base", 10000.0)))),
    )
    args = from_dict(params, "GGUF metadata")  # values checked like a params.json's
    rot = int(get("rope.dimension_count", args.head_dim))
    if rot != args.head_dim:
        raise ValueError(f"GGUF rotates {rot} dims per head but head_dim is {args.head_dim}: partial RoPE unsupported")
    for key in ("attention.key_length", "attention.value_length"):
        if int(get(key, args.head_dim)) != args.head_dim:
            raise ValueError(f"GGUF llama.{key}={get(key)} differs from dim / n_heads = {args.head_dim}: unsupported")
    return args


def scaled_rope_args(args: ModelArgs, meta: dict[str, Any], rope_freqs: np.ndarray) -> ModelArgs:
    """Llama 3.1 files carry ``rope_freqs.weight`` (per-frequency divisors): map it to use_scaled_rope."""
    from llama.model import rope_frequencies

    # llama.cpp's converter writes no factor key (llama.cpp would read it as linear scaling): the
    # largest divisor, that of the lowest frequencies, is the factor (8 for 3.1, 32 for 3.2)
    factor = float(meta.get("llama.rope.scaling.factor") or np.max(np.asarray(rope_freqs, dtype=np.float32)))
    scaled = from_dict({**to_dict(args), "use_scaled_rope": True, "rope_scale_factor": factor}, "GGUF metadata")
    ours = rope_frequencies(args) / rope_frequencies(scaled)
    theirs = torch.tensor(np.asarray(rope_freqs, dtype=np.float32).reshape(-1))
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-3):
        raise ValueError("GGUF rope_freqs is not Llama 3.1 RoPE scaling (low 1, high 4, context 8192): unsupported")
    return scaled


def read_weights(reader: Any, args: ModelArgs, dtype: torch.dtype, progress: Optional[Progress] = None):
    """Dequantized Meta-named tensors in ``dtype``; every expected key, no unknown GGUF tensor."""
    gguf = _require_gguf()
    names = {}
    for i in range(args.n_layers):
        names.update({g.format(i): m.format(i) for g, m in TENSOR_NAMES.items() if "{}" in g})
    names.update({g: m for g, m in TENSOR_NAMES.items() if "{}" not in g})
    shapes = expected_shapes(args)
    out: dict[str, torch.Tensor] = {}
    tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]
    for n, t in enumerate(tensors, 1):
        if t.name not in names:
            raise ValueError(f"GGUF tensor {t.name!r} has no place in a Llama checkpoint")
        key = names[t.name]
        # GGUFReader already reverses ggml's fastest-first dims: quantized rows come out as torch rows.
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        tensor = torch.from_numpy(np.array(array, dtype=np.float32)).to(dtype)  # a writable copy
        if tuple(tensor.shape) != shapes[key]:
            raise ValueError(f"GGUF {t.name} has shape {tuple(tensor.shape)}; params imply {shapes[key]} for {key}")
        out[key] = tensor
        if progress:
            progress(n, len(tensors), t.name)
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"].clone()  # tied embeddings: the model keeps two
    missing = [k for k in shapes if k not in out]
    if missing:
        raise ValueError(f"GGUF lacks tensors for {missing[:5]} ({len(missing)} missing)")
    return {k: out[k] for k in shapes}  # Meta's key order


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: printable Latin-1 bytes stand for themselves, the other
    bytes (controls, space, 0x7f-0xa0, 0xad) are spelled U+0100, U+0101, ... in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


def tokenizer_files(meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``tokenizer.model`` text and ``tokenizer_spec.json`` dict for a byte-level BPE vocabulary."""
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer {model!r} is not supported: only byte-level BPE ('gpt2') maps to tiktoken")
    if pre not in PRE_TOKENIZER_PATTERNS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(PRE_TOKENIZER_PATTERNS)}")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    decoder = byte_decoder()
    lines, specials = [], {}
    for tid, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (CONTROL, USER_DEFINED):
            specials[token] = tid
        elif kind in (NORMAL, UNUSED):
            try:
                raw = bytes(decoder[c] for c in token)
            except KeyError:
                raise ValueError(f"GGUF token {tid} {token!r} is not spelled in the byte-level alphabet") from None
            lines.append(f"{base64.b64encode(raw).decode()} {tid}\n")
        else:
            raise ValueError(f"GGUF token {tid} {token!r} has type {kind}, which a byte-level BPE does not use")
    _check_merge_order(tokens, meta.get("tokenizer.ggml.merges", []))

    def name(key: str) -> Optional[str]:
        """The special token an id key names (None when absent or not a special token)."""
        tid = meta.get(f"tokenizer.ggml.{key}")
        return tokens[tid] if tid is not None and 0 <= tid < len(tokens) and tokens[tid] in specials else None

    # llama.cpp adds BOS for the Llama 3 pre-tokenizers when the file has no add_bos_token key
    # (llama.cpp's own Llama 3 vocabulary has none); otherwise only when the file asks for it.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", PRE_TOKENIZER_PATTERNS[pre] == LLAMA3_PATTERN)
    template = meta.get("tokenizer.chat_template") or ""
    if "<|im_start|>" in specials and "<|im_end|>" in specials and "<|start_header_id|>" not in template:
        chat_format, eot = "chatml", "<|im_end|>"
    elif "<|start_header_id|>" in specials and "<|eot_id|>" in specials:
        chat_format, eot = "llama3", "<|eot_id|>"
    else:
        raise ValueError("GGUF vocabulary has neither ChatML (<|im_start|>) nor Llama 3 header tokens")
    eos = name("eos_token_id") or eot
    found = CHATML_SYSTEM.search(template) if chat_format == "chatml" else None
    spec = {
        "format_version": 1,
        "pattern": PRE_TOKENIZER_PATTERNS[pre],
        "num_base_tokens": len(lines),
        "vocab_size": len(tokens),
        "special_tokens": specials,
        # BOS only when the file asks for it (SmolLM2 names <|im_start|> as BOS but never adds it).
        "bos_token": name("bos_token_id") if add_bos else None,
        "eos_token": eos,
        "eot_token": eot,
        "eom_token": "<|eom_id|>" if chat_format == "llama3" and "<|eom_id|>" in specials else None,
        "python_tag_token": "<|python_tag|>" if chat_format == "llama3" and "<|python_tag|>" in specials else None,
        "pad_token": name("padding_token_id"),
        "stop_tokens": list(dict.fromkeys([eos, eot, *(t for t in END_TOKENS if specials.get(t) is not None)])),
        "chat_format": chat_format,
        # The template's built-in system turn, used when a dialog has none (SmolLM2 has one).
        "default_system_prompt": found.group(1) if found else None,
    }
    return "".join(lines), spec


def _check_merge_order(tokens: list[str], merges: list[str]) -> None:
    """tiktoken merges by rank; the file's BPE merges in list order. Rank = id is the same BPE only
    if the merges create token ids in non-decreasing order. Equal ids are splits of one token
    (Llama 3 lists "Ġ ĠĠĠ", "ĠĠ ĠĠ", "ĠĠĠ Ġ" for id 257, as Hugging Face's tiktoken converter
    writes them), which tiktoken ranks alike. Two splits of one token that overlap are the same
    pair (xy = yz forces x = z); only two disjoint, different splits present at once could be
    merged in another order (tiktoken: leftmost first; llama.cpp: list order first), which
    tests/test_gguf_export.py checks does not happen on Llama 3 text."""
    ids = {t: i for i, t in enumerate(tokens)}
    last = -1
    for i, merge in enumerate(merges):
        a, _, b = merge.partition(" ")
        tid = ids.get(a + b)
        if tid is None or tid < last:
            raise ValueError(f"GGUF merge {i} ({merge!r}) breaks id order: token ids are not BPE ranks")
        last = tid


def import_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    progress: Optional[Progress] = None,
) -> ModelArgs:
    """Convert a llama-architecture GGUF into a Meta-format folder ``out_dir`` (must not exist).

    The folder is written under a temporary name and renamed when complete, so a crash never
    leaves a folder that looks finished. Returns the params written.
    """
    gguf = _require_gguf()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    prepare_destination(out_dir)  # an existing destination fails before the file is even parsed
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # a truncated download fails inside numpy (reshape, index) or mmap
        raise ValueError(
            f"{gguf_path}: not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated: re-download it"
        ) from None
    meta = read_metadata(reader)
    args = model_args(meta)
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is not None:
        args = scaled_rope_args(args, meta, rope_freqs.data)
    bpe, spec = tokenizer_files(meta)  # before the heavy part: a bad vocabulary fails fast
    if spec["vocab_size"] != args.vocab_size:
        raise ValueError(f"GGUF vocabulary has {spec['vocab_size']} tokens but llama.vocab_size is {args.vocab_size}")
    need = state_bytes(expected_shapes(args), dtype) + len(bpe)
    prepare_destination(out_dir, need)  # disk space, before dequantizing
    weights = read_weights(reader, args, dtype, progress)
    with atomic_folder(out_dir, need) as tmp:
        save_shards(tmp, weights, args)  # one shard: no resharding copies
        save_params(tmp, args)
        (tmp / "tokenizer.model").write_text(bpe)
        (tmp / "tokenizer_spec.json").write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
        write_checklist(tmp)
    return args


def print_progress(n: int, total: int, name: str) -> None:
    """A percentage on stderr: rewritten in place every 10% on a terminal, a plain line every 25% elsewhere."""
    steps, tty = (10, True) if sys.stderr.isatty() else (4, False)
    if n == total or n * steps // total != (n - 1) * steps // total:
        end = "\n" if n == total or not tty else ""
        start = "\r" if tty else ""
        print(f"{start}  dequantizing: {100 * n // total:3d}% ({n}/{total} tensors)", end=end, file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:  # python -m llama.gguf export SRC OUT.gguf: the other direction
        from llama.gguf_export import main as export_main

        return export_main(argv[1:])
    """``python -m llama.gguf MODEL.gguf OUT_DIR [--dtype fp32]``; ``--help`` describes the flags."""
    parser = Parser(prog="python -m llama.gguf", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("gguf", type=Path, help="a llama-architecture .gguf file")
    parser.add_argument("out_dir", type=Path, help="Meta-format folder to create (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype: bf16, fp16 or fp32 (default fp32)")
    a = parser.parse_args(argv)
    with user_errors(parser.prog):
        args = import_gguf(a.gguf, a.out_dir, DTYPES[a.dtype], progress=print_progress)
    print(f"wrote {a.out_dir}: {json.dumps(to_dict(args))}")


if __name__ == "__main__":
    main()
