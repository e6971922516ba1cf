"""Convert between Hugging Face Llama folders and Meta-format checkpoints.

    python -m llama.convert hf-to-meta HF_DIR META_DIR [--dtype bf16|fp16|fp32] [--shards N]
    python -m llama.convert meta-to-hf META_DIR HF_DIR [--dtype ...] [--max_shard_size GB]

The only change to the numbers is the q/k row order: Meta rotates adjacent pairs (2i, 2i+1) of each
head, Hugging Face rotates halves (i, i + head_dim/2). Meta -> HF views wq/wk as
[heads, head_dim/2, 2, dim] and swaps the middle axes; HF -> Meta is the inverse. Dtypes are kept.

params.json has two FFN knobs (multiple_of, ffn_dim_multiplier) where config.json has the width;
``meta_ffn_params`` documents how we pick them, and Meta -> HF stores the original params.json in
config.json under ``meta_params`` so that Meta -> HF -> Meta reproduces it exactly.
"""

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from llama.checkpoint import (
    atomic_folder,
    expected_shapes,
    load_params,
    load_state_dict,
    prepare_destination,
    save_params,
    save_shards,
    verify_checkpoint,
    write_checklist,
)
from llama.cli import NO_VERIFY_HELP, Parser, integer, number, user_errors
from llama.devices import DTYPES
from llama.model import ROPE_HIGH_FREQ_FACTOR, ROPE_LOW_FREQ_FACTOR, ROPE_ORIGINAL_CONTEXT, ModelArgs
from llama.params import from_dict, to_dict

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

# Meta's released (dim, FFN width) -> (multiple_of, ffn_dim_multiplier), from their params.json.
META_FFN = {
    (4096, 14336): (1024, 1.3),  # Llama 3 / 3.1 8B
    (8192, 28672): (4096, 1.3),  # 70B
    (16384, 53248): (4096, 1.2),  # 405B
    (2048, 8192): (256, 1.5),  # 3.2 1B
    (3072, 8192): (256, 1.0),  # 3.2 3B
}

# HF name -> Meta name; "{}" is the layer number.
HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}
# Tokenizer files that travel with a checkpoint (HF repos keep Meta's under original/).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_spec.json")


def meta_ffn_params(dim: int, hidden: int) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) for which ``ModelArgs.ffn_hidden_dim`` equals ``hidden``.

    In order: Meta's own values for a released size; the defaults (256, None) when they fit;
    otherwise multiple_of = hidden, which rounds any width in (0, hidden] up to exactly hidden,
    with ffn_dim_multiplier = hidden / base only when the base width 2*4*dim/3 exceeds it.
    """
    if hidden <= 0 or dim <= 0:
        raise ValueError(f"FFN width {hidden} for dim {dim}: both must be positive")
    base = int(2 * (4 * dim) / 3)
    candidates: list[tuple[int, Optional[float]]] = [(256, None), (hidden, None), (hidden, hidden / base)]
    if (dim, hidden) in META_FFN:
        candidates.insert(0, META_FFN[(dim, hidden)])
    for multiple_of, multiplier in candidates:
        args = ModelArgs(dim=dim, n_layers=1, n_heads=1, vocab_size=1, multiple_of=multiple_of,
                         ffn_dim_multiplier=multiplier)  # fmt: skip
        if args.ffn_hidden_dim == hidden:
            return multiple_of, multiplier
    raise ValueError(f"no multiple_of / ffn_dim_multiplier reproduces FFN width {hidden} for dim {dim}")


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta adjacent pairs -> HF halves: rows [heads, hd/2, 2] -> [heads, 2, hd/2]."""
    rows, dim = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def permute_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF halves -> Meta adjacent pairs: rows [heads, 2, hd/2] -> [heads, hd/2, 2]."""
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def hf_to_meta_names(n_layers: int) -> dict[str, str]:
    """Every HF tensor name of an ``n_layers`` model -> its Meta name."""
    names = {h: m for h, m in HF_NAMES.items() if "{}" not in h}
    names.update({h.format(i): m.format(i) for i in range(n_layers) for h, m in HF_NAMES.items() if "{}" in h})
    return names


# --- Hugging Face -> Meta -------------------------------------------------------------------


# config.json keys a Llama conversion needs, and the JSON type each must have.
CONFIG_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
CONFIG_OPTIONAL_INTS = ("num_key_value_heads", "head_dim")
CONFIG_NUMBERS = ("rms_norm_eps", "rope_theta")


def read_json(path: Path) -> Any:
    """A JSON file's content; invalid JSON is a ValueError naming the file, line and column."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text (JSON) file") from None


def check_config(config: Any, source: str) -> None:
    """Raise a ValueError naming every missing key or value of the wrong type in a config.json."""
    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    missing = [k for k in CONFIG_INTS if k not in config]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}: not a complete Llama config.json")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    wrong = [
        f"{k} is {config[k]!r} ({type(config[k]).__name__}), expected a positive whole number"
        for k in CONFIG_INTS + CONFIG_OPTIONAL_INTS
        if config.get(k) is not None and not (is_int(config[k]) and config[k] > 0)
    ] + [
        f"{k} is {config[k]!r} ({type(config[k]).__name__}), expected a positive number"
        for k in CONFIG_NUMBERS
        if config.get(k) is not None and not ((is_int(config[k]) or isinstance(config[k], float)) and config[k] > 0)
    ]
    if wrong:
        raise ValueError(f"{source}: " + "; ".join(wrong))


def args_from_hf_config(config: dict[str, Any], source: str = "config.json") -> tuple[ModelArgs, dict[str, Any]]:
    """``ModelArgs`` and the params.json dict to write, from a Llama ``config.json``."""
    check_config(config, source)
    arch, model_type = config.get("architectures") or [], config.get("model_type")
    if model_type != "llama" or any(a != "LlamaForCausalLM" for a in arch):
        raise ValueError(
            f"{source}: model_type {model_type!r}, architectures {arch}: only Llama "
            "(model_type 'llama', LlamaForCausalLM) can be converted"
        )
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, want) != want:
            raise ValueError(f"{source}: {key}={config[key]!r} is not supported (Llama uses {want!r})")
    # transformers 5 writes rope_parameters; older configs write rope_theta and rope_scaling.
    rope = {**(config.get("rope_parameters") or {}), **(config.get("rope_scaling") or {})}
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaled = kind == "llama3"
    if kind not in ("default", "llama3"):
        raise ValueError(f"{source}: rope scaling type {kind!r} is not supported (only 'llama3')")
    if scaled:
        ours = {"low_freq_factor": ROPE_LOW_FREQ_FACTOR, "high_freq_factor": ROPE_HIGH_FREQ_FACTOR,
                "original_max_position_embeddings": ROPE_ORIGINAL_CONTEXT}  # fmt: skip
        for key, value in ours.items():
            if float(rope.get(key, value)) != value:
                raise ValueError(f"{source}: llama3 rope scaling {key}={rope[key]} unsupported (Meta uses {value})")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"{source}: head_dim={config['head_dim']} != hidden_size / num_attention_heads")
    multiple_of, multiplier = meta_ffn_params(dim, config["intermediate_size"])
    params: dict[str, Any] = {
        "dim": dim,
        "n_layers": config["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads,
        "vocab_size": config["vocab_size"],
        "ffn_dim_multiplier": multiplier,
        "multiple_of": multiple_of,
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": theta,
    }
    if scaled:
        params["use_scaled_rope"] = True
        if float(rope.get("factor", 8.0)) != 8.0:
            params["rope_scale_factor"] = float(rope["factor"])
    args = from_dict(params, source)
    original = config.get("meta_params")
    if original is not None:  # written by meta_to_hf: reuse it when it describes the same model
        try:
            same = _same_model(from_dict(original, f"{source} meta_params"), args)
        except ValueError:
            same = False
        if same:
            return from_dict(original), original
        print(f"note: {source}: meta_params disagrees with the config; using the config", file=sys.stderr)
    return args, params


def _same_model(a: ModelArgs, b: ModelArgs) -> bool:
    derived = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps",
               "rope_theta", "use_scaled_rope")  # fmt: skip
    same = all(getattr(a, k) == getattr(b, k) for k in derived)
    return same and (not a.use_scaled_rope or a.rope_scale_factor == b.rope_scale_factor)


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in its index.

    The index is untrusted: a weight-map entry naming a file outside ``src`` is refused.
    """
    from safetensors import safe_open

    index = src / "model.safetensors.index.json"
    if index.is_file():
        content = read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: no weight_map of tensor name -> file name")
        files = sorted(set(weight_map.values()))
        root = src.resolve()
        for name in files:
            if not (src / name).resolve().is_relative_to(root):
                raise ValueError(f"{index}: weight_map names {name!r}, which is outside {src}: refused")
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{src}: no model.safetensors or model.safetensors.index.json")
    out = {}
    for name in files:
        path = src / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {index.name} but missing")
        try:
            with safe_open(path, framework="pt") as f:
                out.update({key: f.get_tensor(key) for key in f.keys()})
        except Exception as e:  # SafetensorError: truncated download, not a safetensors file...
            raise ValueError(f"{path}: not a readable safetensors file ({e}); it may be truncated: re-download it") from None
    return out


def hf_to_meta(src: str | Path, dst: str | Path, dtype: Optional[torch.dtype] = None, n_shards: int = 1) -> ModelArgs:
    """Convert a Hugging Face Llama folder into a Meta-format folder ``dst`` (must not exist).

    ``dtype`` None keeps the tensors' dtype. Tied embeddings (no ``lm_head``) give
    ``output.weight`` = a copy of the embedding. A Meta ``tokenizer.model`` (+ spec) found in
    ``src/original/`` or ``src/`` is copied. Returns the params written.
    """
    src = Path(src)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{src}: no config.json (not a Hugging Face model folder)")
    config = read_json(config_path)
    args, params = args_from_hf_config(config, str(config_path))
    if n_shards < 1:
        raise ValueError(f"n_shards={n_shards} must be at least 1")
    # Before reading gigabytes: an existing destination or a disk too small fails now (the source's
    # size is a lower bound of the output's when the dtype is kept; the exact check comes later).
    prepare_destination(dst, 0 if dtype else sum(p.stat().st_size for p in src.glob("*.safetensors")))
    hf = read_hf_weights(src)
    if config.get("tie_word_embeddings"):
        hf.pop("lm_head.weight", None)  # tied: the embedding is the output matrix
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}  # old files: unused buffer
    names = hf_to_meta_names(args.n_layers)
    unknown = sorted(set(hf) - set(names))
    if unknown:
        raise ValueError(f"{src}: unexpected tensors {unknown[:5]} ({len(unknown)}) for {args.n_layers} Llama layers")
    full = {names[k]: v for k, v in hf.items()}
    if config.get("tie_word_embeddings") and "tok_embeddings.weight" in full:
        full["output.weight"] = full["tok_embeddings.weight"].clone()  # tied: Meta's format keeps both
    shapes = expected_shapes(args)
    missing = [k for k in shapes if k not in full]
    if missing:
        raise ValueError(f"{src}: missing tensors for {missing[:5]} ({len(missing)} missing)")
    for key, shape in shapes.items():
        t = full[key]
        if tuple(t.shape) != shape:
            raise ValueError(f"{src}: {key} has shape {tuple(t.shape)}, config.json implies {shape}")
        if key.endswith("attention.wq.weight"):
            t = permute_to_meta(t, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            t = permute_to_meta(t, args.n_kv_heads)
        full[key] = t.to(dtype) if dtype is not None else t
    full = {k: full[k] for k in shapes}  # Meta's key order
    need = sum(t.numel() * t.element_size() for t in full.values())
    with atomic_folder(dst, need) as tmp:
        out_args = save_shards(tmp, full, args, n_shards)
        if out_args != args:  # KV heads duplicated for more shards than KV heads
            params = {**params, "n_kv_heads": out_args.n_kv_heads}
        save_params(tmp, params)
        for folder in (src / "original", src):
            if (folder / "tokenizer.model").is_file() and _is_tiktoken(folder / "tokenizer.model"):
                for name in TOKENIZER_FILES:
                    if (folder / name).is_file():
                        shutil.copyfile(folder / name, tmp / name)
                break
        write_checklist(tmp)
    return args


def _is_tiktoken(path: Path) -> bool:
    """A tiktoken BPE file is base64 text; a SentencePiece tokenizer.model is binary protobuf."""
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        head.decode("ascii")
    except UnicodeDecodeError:
        return False
    return b" " in head


# --- Meta -> Hugging Face -------------------------------------------------------------------


def hf_config(args: ModelArgs, params: dict[str, Any], dtype: torch.dtype, tied: bool) -> dict[str, Any]:
    """A transformers ``LlamaForCausalLM`` config.json for ``args``; ``meta_params`` keeps params.json."""
    rope_scaling = None
    if args.use_scaled_rope:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": args.rope_scale_factor,
            "low_freq_factor": ROPE_LOW_FREQ_FACTOR,
            "high_freq_factor": ROPE_HIGH_FREQ_FACTOR,
            "original_max_position_embeddings": ROPE_ORIGINAL_CONTEXT,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_context,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "vocab_size": args.vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")),
        "meta_params": params,
    }


def meta_to_hf(
    src: str | Path,
    dst: str | Path,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = 5 * 10**9,
    verify: Optional[bool] = None,
    skip: str = "verify=False",
) -> dict[str, Any]:
    """Convert a Meta-format folder (any number of shards) into a transformers folder ``dst``.

    Writes ``config.json`` and ``model.safetensors`` (or numbered shards plus
    ``model.safetensors.index.json`` above ``max_shard_bytes``); copies the tokenizer files to
    ``original/`` as Hugging Face repos do, and writes ``tokenizer.json`` / ``tokenizer_config.json``. When output equals the embedding bit for bit the
    embeddings are written tied (no ``lm_head``). Returns the config written. ``verify`` as
    ``Llama.build``'s: None checks ``src`` against its ``checklist.chk`` when it has one, True
    always, False never; ``skip`` is how the messages tell the user to skip it.
    """
    from safetensors.torch import save_file

    from llama.family import tokenizer_kind
    from llama.hf_tokenizer import write_hf_tokenizer
    from llama.tokenizer import Tokenizer

    src = Path(src)
    args = load_params(src)
    params = read_json(src / "params.json")
    prepare_destination(dst)
    # tokenizer.json + tokenizer_config.json for AutoTokenizer and llama.cpp's converter (tiktoken
    # vocabularies; a Llama 2 SentencePiece tokenizer.model is copied as it is); read first to fail fast
    tok_file = src / "tokenizer.model"
    tokenizer = Tokenizer(tok_file) if tok_file.is_file() and tokenizer_kind(tok_file) == "tiktoken" else None
    verify_checkpoint(src, verify, skip=skip)  # before reading the weights: a corrupt download is named as such
    state = load_state_dict(src, args, dtype=dtype)  # unsharded, memory-mapped
    tied = torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    to_hf = {m: h for h, m in hf_to_meta_names(args.n_layers).items()}
    hf: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key == "output.weight" and tied:
            continue
        name = to_hf[key]
        if key.endswith("attention.wq.weight"):
            t = permute_to_hf(t, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            t = permute_to_hf(t, args.n_kv_heads)
        hf[name] = t.contiguous()
    config = hf_config(args, params, state["tok_embeddings.weight"].dtype, tied)
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in hf.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes
    with atomic_folder(dst, sum(t.numel() * t.element_size() for t in hf.values())) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if len(groups) == 1:
            save_file(groups[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, group in enumerate(groups, 1):
                fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
                save_file(group, tmp / fname, metadata={"format": "pt"})
                weight_map.update({name: fname for name in group})
            total = sum(t.numel() * t.element_size() for t in hf.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                (tmp / "original").mkdir(exist_ok=True)
                shutil.copyfile(src / name, tmp / "original" / name)
        if tokenizer is not None:
            write_hf_tokenizer(tokenizer, tmp, args.max_context)
    return config


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m llama.convert``: flags as in the module docstring; ``--help`` describes them."""
    parser = Parser(prog="python -m llama.convert", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    a = sub.add_parser("hf-to-meta", help="Hugging Face Llama folder -> Meta-format folder", allow_abbrev=False)
    a.add_argument("src", type=Path, help="Hugging Face folder (config.json + model*.safetensors)")
    a.add_argument("dst", type=Path, help="Meta-format folder to create (must not exist)")
    a.add_argument("--shards", type=integer(1), default=1, help="number of consolidated.NN.pth files, >= 1 (default 1)")
    b = sub.add_parser("meta-to-hf", help="Meta-format folder -> Hugging Face (transformers) folder", allow_abbrev=False)
    b.add_argument("src", type=Path, help="Meta-format folder (params.json + consolidated.NN.pth)")
    b.add_argument("dst", type=Path, help="Hugging Face folder to create (must not exist)")
    b.add_argument("--max_shard_size", "--max-shard-size", type=number(0.0, low_open=True), default=5.0,
                   help="GB per safetensors file, > 0 (default 5)")  # fmt: skip
    b.add_argument("--no_verify", "--no-verify", dest="no_verify", action="store_true", help=NO_VERIFY_HELP)
    for p in (a, b):
        p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights: bf16, fp16 or fp32 (default: keep)")
    ns = parser.parse_args(argv)
    dtype = DTYPES[ns.dtype] if ns.dtype else None
    with user_errors(parser.prog):
        if ns.command == "hf-to-meta":
            args = hf_to_meta(ns.src, ns.dst, dtype, ns.shards)
            print(f"wrote {ns.dst}: {json.dumps(to_dict(args))}")
        else:
            meta_to_hf(ns.src, ns.dst, dtype, int(ns.max_shard_size * 10**9), False if ns.no_verify else None, "--no_verify")
            print(f"wrote {ns.dst}")


if __name__ == "__main__":
    main()
