"""Export a Meta-format checkpoint folder as a GGUF file for llama.cpp (and Ollama).

    python -m llama.gguf export SRC OUT.gguf [--type bf16|q8_0]

The file holds what llama.cpp's own converter writes for a Llama 3 model:
- ``llama.*`` hyperparameters and, for Llama 3.1 RoPE scaling, a ``rope_freqs.weight`` tensor
  (the per-frequency divisor: 1, blended, or the scale factor);
- tensors named ``token_embd``, ``blk.N.attn_q`` ... (``TENSOR_NAMES``) with q/k rows in
  Meta's adjacent-pair order, which is llama.cpp's RoPE layout (its converter un-permutes
  Hugging Face's rotate-half rows back to this order); ``output`` is left out when it equals the
  embedding bit for bit (llama.cpp then reuses the embedding);
- the vocabulary as byte-level BPE (``tokenizer.ggml.model`` "gpt2", ``pre`` "llama-bpe"): tokens,
  token types (special tokens are CONTROL), merges (see ``llama.hf_tokenizer``), BOS/EOS/EOT/EOM
  ids and the chat template.
Weights are 2-D BF16 or Q8_0 (blocks of 32 values: an fp16 scale ``d = max|x| / 127`` and 32 int8
``round(x / d)``); norms and ``rope_freqs`` stay F32, as llama.cpp keeps them.

As the other folder tools: SRC is checked against its ``checklist.chk`` first (``--no_verify``
skips it); an existing OUT, a read-only or full disk are refused before that; the file is written
in a hidden partial folder beside OUT and renamed into place when complete, and a partial left by a
killed run is removed by the next export to the same OUT (``llama.checkpoint.atomic_file``).
"""

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from llama.checkpoint import (
    atomic_file,
    check_free_space,
    expected_shapes,
    find_shards,
    load_params,
    load_state_dict,
    prepare_destination,
    shard_dim,
    verify_checkpoint,
)
from llama.cli import NO_VERIFY_HELP, Parser, user_errors
from llama.hf_tokenizer import base_tokens, bpe_merges, chat_template
from llama.model import ModelArgs, rope_frequencies
from llama.params import to_dict
from llama.tokenizer import DIGITS_PATTERN, LLAMA3_PATTERN, Tokenizer

# GGUF tensor names -> Meta names; "{}" is the layer number.
TENSOR_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
}

EXPORT_TYPES = ("bf16", "q8_0")
Progress = Callable[[int, int, str], None]


def _gguf_names(args: ModelArgs) -> dict[str, str]:
    """Meta name -> GGUF name for every tensor of ``args``."""
    names = {m: g for g, m in TENSOR_NAMES.items() if "{}" not in g}
    names.update({m.format(i): g.format(i) for i in range(args.n_layers) for g, m in TENSOR_NAMES.items() if "{}" in g})
    return names


# llama.cpp's names for the pre-tokenizers we can write (llama/gguf.py maps them back). llama.cpp
# skips the merges for a pre-token that is a whole token, as tiktoken does, for Llama 3's only; for
# SmolLM's it applies the merges, which ``bpe_merges`` orders so that they make the same tokens.
EXPORTABLE_PRE_TOKENIZERS = {LLAMA3_PATTERN: "llama-bpe", DIGITS_PATTERN: "smollm"}


def _pre_tokenizer(pattern: str) -> str:
    """llama.cpp's name for the pre-tokenizer of ``pattern``: Llama 3's, or SmolLM's (the demo model)."""
    if pattern not in EXPORTABLE_PRE_TOKENIZERS:
        raise ValueError(
            "only Llama 3 vocabularies (pre-tokenizer 'llama-bpe') and SmolLM's ('smollm', the demo model) "
            "can be exported to GGUF"
        )
    return EXPORTABLE_PRE_TOKENIZERS[pattern]


def add_vocabulary(writer: Any, tokenizer: Tokenizer) -> None:
    """The ``tokenizer.*`` keys of a byte-level BPE vocabulary (llama.cpp's BPE tokenizer)."""
    import gguf

    vocab = base_tokens(tokenizer)
    tokens = [""] * tokenizer.n_words
    types = [int(gguf.TokenType.NORMAL)] * tokenizer.n_words
    for token, tid in vocab.items():
        tokens[tid] = token
    for name, tid in tokenizer.special_tokens.items():
        tokens[tid], types[tid] = name, int(gguf.TokenType.CONTROL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer.spec.pattern))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(bpe_merges(vocab))
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_add_bos_token(tokenizer.bos_id is not None)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_add_eos_token(False)
    if tokenizer.eot_id is not None:
        writer.add_eot_token_id(tokenizer.eot_id)
    if tokenizer.eom_id is not None:
        writer.add_eom_token_id(tokenizer.eom_id)
    if tokenizer.pad_id is not None and tokenizer.pad_id >= 0:
        writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_chat_template(chat_template(tokenizer))


def add_hyperparameters(writer: Any, args: ModelArgs, name: str, file_type: int) -> None:
    """``general.*`` and ``llama.*`` keys (the names llama.cpp reads for the llama architecture)."""
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)
    writer.add_context_length(args.max_context)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)


def full_tensors(src: Path, args: ModelArgs) -> dict[str, Callable[[], torch.Tensor]]:
    """Meta name -> a function giving the full tensor, assembled from the shards only when called.

    The shards are memory-mapped, so exporting holds one full tensor at a time, not the model
    (70B: 8 shards). Layouts with KV heads repeated across shards are read whole instead.
    """
    n = len(find_shards(src))
    if n == 1 or args.n_kv_heads % n or args.n_heads % n:
        state = load_state_dict(src, args)  # one memory-mapped file, or the resharding reader
        return {k: (lambda t=t: t) for k, t in state.items()}
    files = [load_state_dict(src, args, rank=r, world_size=n) for r in range(n)]  # file r's tensors, mapped

    def full(key: str) -> torch.Tensor:
        d = shard_dim(key)
        return files[0][key] if d is None else torch.cat([f[key] for f in files], dim=d)

    return {k: (lambda k=k: full(k)) for k in files[0]}


def _encode(t: torch.Tensor, qtype: Any) -> np.ndarray:
    """One tensor's GGUF bytes as a numpy array: F32 for 1-D, else BF16 (raw bits) or Q8_0 blocks."""
    import gguf

    if t.dim() == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return t.to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return gguf.quants.quantize(t.to(torch.float32).contiguous().numpy(), qtype)


def gguf_bytes(args: ModelArgs, out_type: str, vocabulary_bytes: int, tied: bool = False) -> int:
    """Bytes of the GGUF file: the tensors (2-D BF16 2 a value or Q8_0 34 per 32, 1-D F32, the RoPE
    divisors; no ``output`` when ``tied``) plus ``vocabulary_bytes`` for the tokens and merges."""
    total = vocabulary_bytes + (2 * args.head_dim if args.use_scaled_rope else 0)
    for key, shape in expected_shapes(args).items():
        numel = int(np.prod(shape))
        if key == "output.weight" and tied:
            continue
        total += 4 * numel if len(shape) == 1 else 2 * numel if out_type == "bf16" else numel // 32 * 34
    return total


# The tokens and merges of a GGUF vocabulary take about 3.6 times tokenizer.model's bytes (Llama 3's:
# 2.2 MB -> 7.8 MB); the free-space check counts 4 times.
VOCABULARY_PER_TOKENIZER_BYTE = 4


def export_gguf(
    src: str | Path,
    out: str | Path,
    out_type: str = "bf16",
    progress: Optional[Progress] = None,
    verify: Optional[bool] = None,
    skip: str = "verify=False",
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> ModelArgs:
    """Write the Meta-format folder ``src`` (any number of shards) as the GGUF file ``out``.

    ``out_type`` is "bf16" or "q8_0". ``out`` must not exist; it is written in a hidden partial
    folder beside it and renamed when complete (``atomic_file``). ``verify`` as ``Llama.build``'s:
    None checks ``src`` against its ``checklist.chk`` when it has one, True always, False never;
    ``skip`` is how the messages tell the user to skip it. Returns the params of the model written.
    """
    import gguf

    src, out = Path(src), Path(out)
    if out_type not in EXPORT_TYPES:
        raise ValueError(f"unknown GGUF type {out_type!r}; choose one of {list(EXPORT_TYPES)}")
    parent = prepare_destination(out, log=log)  # exists, unwritable: before reading anything; stale partials go
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {src}")
    if not (src / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{src}: no tokenizer.model (a GGUF carries the vocabulary)")
    args = load_params(src)
    tokenizer = Tokenizer(src / "tokenizer.model")
    _pre_tokenizer(tokenizer.spec.pattern)  # before the heavy part
    if tokenizer.n_words != args.vocab_size:
        raise ValueError(f"{src}: tokenizer has {tokenizer.n_words} tokens but params.json vocab_size is {args.vocab_size}")
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[out_type]
    file_type = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    if out_type == "q8_0":
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        widths = {"dim": args.dim, "FFN width": args.ffn_hidden_dim, "n_heads * head_dim": args.n_heads * args.head_dim}
        if bad := {k: v for k, v in widths.items() if v % block}:
            raise ValueError(f"Q8_0 needs rows that are multiples of {block} values; {bad} are not: export bf16")
    vocabulary = VOCABULARY_PER_TOKENIZER_BYTE * (src / "tokenizer.model").stat().st_size
    # Whether output is tied is known only once read: the smaller size now, the exact one below.
    check_free_space(parent, gguf_bytes(args, out_type, vocabulary, tied=True), str(out))
    verify_checkpoint(src, verify, log, skip=skip)
    state = full_tensors(src, args)
    tied = torch.equal(state["output.weight"](), state["tok_embeddings.weight"]())
    if tied:
        del state["output.weight"]  # llama.cpp uses token_embd when output is absent
    need = gguf_bytes(args, out_type, vocabulary, tied)
    check_free_space(parent, need, str(out))
    names = _gguf_names(args)
    tensors: dict[str, Callable[[], np.ndarray]] = {}
    if args.use_scaled_rope:
        # llama.cpp divides each RoPE frequency by rope_freqs[i]: unscaled / scaled frequencies
        unscaled = replace(args, use_scaled_rope=False)
        divisors = (rope_frequencies(unscaled) / rope_frequencies(args)).to(torch.float32)
        tensors["rope_freqs.weight"] = lambda: divisors.numpy()
    for key, get in state.items():
        tensors[names[key]] = lambda get=get: _encode(get(), qtype)

    with atomic_file(out, need, log=log) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        add_hyperparameters(writer, args, src.resolve().name, int(file_type))
        add_vocabulary(writer, tokenizer)
        shapes = expected_shapes(args)
        for name, key in ((n, k) for k, n in names.items() if k in state):
            shape, numel = shapes[key], int(np.prod(shapes[key]))
            if len(shape) == 1:
                writer.add_tensor_info(name, shape, np.dtype(np.float32), numel * 4)
            elif qtype == gguf.GGMLQuantizationType.BF16:
                writer.add_tensor_info(name, shape, np.dtype(np.uint16), numel * 2, raw_dtype=qtype)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        if "rope_freqs.weight" in tensors:
            writer.add_tensor_info("rope_freqs.weight", (args.head_dim // 2,), np.dtype(np.float32), args.head_dim * 2)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # tensors in the order of their infos, one at a time: memory holds one full tensor and its encoding
        order = [n for k, n in names.items() if k in state] + (["rope_freqs.weight"] * ("rope_freqs.weight" in tensors))
        for n, name in enumerate(order, 1):
            writer.write_tensor_data(tensors[name]())
            if progress:
                progress(n, len(order), name)
        writer.close()
    return args


def print_progress(n: int, total: int, name: str) -> None:
    """A percentage on stderr: rewritten in place every 10% on a terminal, a plain line every 25% elsewhere."""
    steps, tty = (10, True) if sys.stderr.isatty() else (4, False)
    if n == total or n * steps // total != (n - 1) * steps // total:
        end = "\n" if n == total or not tty else ""
        start = "\r" if tty else ""
        print(f"{start}  writing: {100 * n // total:3d}% ({n}/{total} tensors)", end=end, file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m llama.gguf export SRC OUT.gguf [--type bf16|q8_0]``; ``--help`` describes the flags."""
    import json

    parser = Parser(prog="python -m llama.gguf export", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("src", type=Path, help="Meta-format checkpoint folder (params.json, consolidated.*.pth, tokenizer.model)")
    parser.add_argument("out", type=Path, help="the .gguf file to create (must not exist)")
    parser.add_argument("--type", choices=EXPORT_TYPES, default="bf16", help="weight type (default bf16)")
    parser.add_argument("--no_verify", "--no-verify", dest="no_verify", action="store_true", help=NO_VERIFY_HELP)
    a = parser.parse_args(argv)
    with user_errors(parser.prog):
        args = export_gguf(a.src, a.out, a.type, print_progress, False if a.no_verify else None, "--no_verify")
    print(f"wrote {a.out} ({a.type}): {json.dumps(to_dict(args))}")
