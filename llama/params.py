"""params.json <-> ModelArgs: the checks a checkpoint's ``params.json`` gets before the model sees it.

``from_dict`` and ``load`` turn a params.json into ``ModelArgs`` (every value checked for type and
range, Meta's extra keys accepted or refused with what they mean, the Llama 2 and Llama 3.2
defaults applied, one note per thing the user should be told); ``to_dict`` writes one back.
``llama.model`` keeps only the dataclass and the checks its math needs.
"""

import json
import math
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Optional

import torch

from llama import quantize
from llama.model import ModelArgs

# Llama 1/2 params.json files carry no rope_theta: Meta's Llama 2 code fixes theta at 10000.
LLAMA2_ROPE_THETA = 10000.0

# Llama 3.2 1B/3B as released: Meta's params.json omits the RoPE factor they were trained with
# (32, not 3.1's 8). Matched on every architecture key of the facts table
# (shared/docs/llama3-facts.md); an explicit ``rope_scale_factor`` key wins.
LLAMA_3_2_SHAPES = {
    "Llama 3.2 1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                         ffn_dim_multiplier=1.5, multiple_of=256, rope_theta=500000.0, use_scaled_rope=True),
    "Llama 3.2 3B": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256,
                         ffn_dim_multiplier=1.0, multiple_of=256, rope_theta=500000.0, use_scaled_rope=True),
}  # fmt: skip
LLAMA_3_2_ROPE_SCALE_FACTOR = 32.0
DEFAULT_ROPE_SCALE_FACTOR = ModelArgs.rope_scale_factor  # 8: Llama 3.1's, the dataclass default

# params.json keys that Meta's loaders accept and that do not change the math: the runtime knobs
# max_batch_size and max_seq_len (arguments of Llama.build here), and vision_max_num_chunks (an
# image-tiling limit, meaningless without the vision keys below). Accepted and ignored, with a note.
IGNORED_KEYS = ("max_batch_size", "max_seq_len", "vision_max_num_chunks")

# Keys that mean a checkpoint this library cannot run correctly, with what such a checkpoint is.
# A null value (or Meta's "off" default, -1, for the vision sizes) means no such part: accepted.
UNSUPPORTED_KEYS = {
    "quantization_args": "a quantized checkpoint (QAT / SpinQuant int4 weights)",
    "lora_args": "a checkpoint with LoRA adapters (QLoRA)",
    "vision_chunk_size": "a Llama 3.2 Vision (multimodal) checkpoint",
    "vision_num_cross_attention_layers": "a Llama 3.2 Vision (multimodal) checkpoint",
    "vision_model": "a Llama 3.2 Vision (multimodal) checkpoint",
    "moe_args": "a Llama 4 (mixture-of-experts) checkpoint",
}


# Our own key: an int8 folder written by ``python -m llama.quantize`` (``llama.quantize``'s docstring).
QUANTIZATION_KEY = "quantization"
SOURCE_DTYPES = ("bfloat16", "float16", "float32", "float64")


def check_quantization(entry: Any, source: str = "params") -> dict[str, Any]:
    """The ``"quantization"`` entry of an int8 folder's params.json, checked field by field; errors
    name the field and the value. Only ``format`` "int8" with ``scheme`` "per-row symmetric" exists."""
    where = f"{source}: {QUANTIZATION_KEY!r}"
    if not isinstance(entry, dict):
        example = quantize.folder_entry(1, torch.bfloat16)
        raise ValueError(f"{where} must be an object like {example}, got {entry!r} ({_json_type(entry)})")
    if entry.get("format") != quantize.FOLDER_FORMAT:
        raise ValueError(
            f"{where} has format {entry.get('format')!r}: not supported; this library reads int8 folders written by "
            f"python -m llama.quantize (format {quantize.FOLDER_FORMAT!r}); Meta's QAT / SpinQuant folders say "
            f"quantization_args"
        )
    unknown = sorted(set(entry) - set(quantize.FOLDER_KEYS))
    missing = [k for k in quantize.FOLDER_KEYS if k not in entry]
    if unknown or missing:
        problems = [f"unknown field(s) {unknown}"] if unknown else []
        problems += [f"missing field(s) {missing}"] if missing else []
        raise ValueError(f"{where}: {'; '.join(problems)} (an int8 entry has {list(quantize.FOLDER_KEYS)})")
    if entry["scheme"] != quantize.FOLDER_SCHEME:
        raise ValueError(
            f"{where} has scheme {entry['scheme']!r}: not supported (int8 folders are {quantize.FOLDER_SCHEME!r})"
        )
    if entry["weights"] != quantize.FOLDER_WEIGHTS:
        raise ValueError(
            f"{where} has weights {entry['weights']!r}: not supported (int8 folders quantize {quantize.FOLDER_WEIGHTS})"
        )
    _positive_int(f"{where} shards", entry["shards"])
    if entry["source_dtype"] not in SOURCE_DTYPES:
        raise ValueError(f"{where} has source_dtype {entry['source_dtype']!r}: expected one of {list(SOURCE_DTYPES)}")
    return dict(entry)


def read_quantization(path: str | Path) -> Optional[dict[str, Any]]:
    """The checked ``"quantization"`` entry of a params.json file; None when it has none (or cannot be
    read: ``load`` reports that)."""
    try:
        params = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(params, dict) or QUANTIZATION_KEY not in params:
        return None
    return check_quantization(params[QUANTIZATION_KEY], str(path))


def _json_type(value: Any) -> str:
    """How a value reads in params.json terms, for error messages."""
    names = {bool: "a boolean", str: "a string", int: "an integer", float: "a number", list: "a list",
             dict: "an object"}  # fmt: skip
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r} ({_json_type(value)})")
    return value


def _positive_real(name: str, value: Any, minimum: float = 0.0, what: str = "a positive number") -> float:
    """A finite number > minimum (an int is accepted and made a float); strings and booleans are errors."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {what}, got {value!r} ({_json_type(value)})")
    if not math.isfinite(value) or value <= minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def _checked(params: dict[str, Any]) -> dict[str, Any]:
    """The values' types and ranges (a string "false" is not a boolean); numbers made floats where Meta's are."""
    p = dict(params)
    for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of"):
        if name in p:
            _positive_int(name, p[name])
    if p.get("n_kv_heads") is not None:  # None: as many as n_heads
        _positive_int("n_kv_heads", p["n_kv_heads"])
    if p.get("ffn_dim_multiplier") is not None:
        p["ffn_dim_multiplier"] = _positive_real("ffn_dim_multiplier", p["ffn_dim_multiplier"])
    if "norm_eps" in p:
        p["norm_eps"] = _positive_real("norm_eps", p["norm_eps"], what="a positive number (Llama 3: 1e-05)")
    if "rope_theta" in p:
        p["rope_theta"] = _positive_real("rope_theta", p["rope_theta"], 1.0, "a number > 1 (Llama 3: 500000.0)")
    if "use_scaled_rope" in p and not isinstance(p["use_scaled_rope"], bool):
        raise ValueError(
            f"use_scaled_rope must be true or false (a JSON boolean), got {p['use_scaled_rope']!r} "
            f"({_json_type(p['use_scaled_rope'])})"
        )
    if p.get("rope_scale_factor") is not None:
        what = "a number >= 1 (3.1: 8, 3.2 1B/3B: 32)"
        p["rope_scale_factor"] = _positive_real("rope_scale_factor", p["rope_scale_factor"], what=what)
        if p["rope_scale_factor"] < 1:
            raise ValueError(f"rope_scale_factor must be {what}, got {p['rope_scale_factor']!r}")
    return p


def default_rope_scale_factor(args: ModelArgs) -> tuple[float, Optional[str]]:
    """(factor, release name): 32 for a released Llama 3.2 1B/3B shape, else (8, None)."""
    for release, shape in LLAMA_3_2_SHAPES.items():
        if all(getattr(args, k) == v for k, v in shape.items()):
            return LLAMA_3_2_ROPE_SCALE_FACTOR, release
    return DEFAULT_ROPE_SCALE_FACTOR, None


def from_dict(params: dict[str, Any], source: str = "params", vocab_size: Optional[int] = None) -> ModelArgs:
    """Build ``ModelArgs`` from a ``params.json`` dict; errors name the key and ``source``.

    Llama 1/2 files: an absent ``rope_theta`` is 10000 (Llama 3 files always state theirs), and
    ``"vocab_size": -1`` means "the tokenizer decides": pass ``vocab_size`` (tokenizer.n_words).

    An absent (or null) ``rope_scale_factor`` is 32 for the released Llama 3.2 1B/3B shapes
    (``LLAMA_3_2_SHAPES``), whose params.json omits it, and 8 otherwise; an explicit value wins.

    Accepted besides the fields: ``IGNORED_KEYS`` (max_batch_size, max_seq_len,
    vision_max_num_chunks: Meta's loaders take them, they do not change the math; each gives a
    note). ``UNSUPPORTED_KEYS`` (quantization_args, lora_args, vision_chunk_size,
    vision_num_cross_attention_layers, vision_model, moe_args) mean a checkpoint we cannot run
    correctly: an error saying what it is, unless null (or -1, Meta's "no vision"). Our own
    ``"quantization"`` entry (an int8 folder, ``llama.quantize``) is accepted when
    ``check_quantization`` accepts it. Any other key is an error naming it. The returned args'
    ``notes`` hold one line per thing the load should tell the user (a factor chosen for them, a
    key ignored).
    """
    params = {"rope_theta": LLAMA2_ROPE_THETA, **params}
    if params.get("vocab_size") == -1:
        if vocab_size is None:
            raise ValueError(f"{source}: vocab_size is -1 (Llama 2: the tokenizer decides); give the tokenizer's size")
        params["vocab_size"] = vocab_size
    known = {f.name for f in fields(ModelArgs)} - set(IGNORED_KEYS)  # the cache size: Llama.build's arguments
    notes = []
    for key in IGNORED_KEYS:
        if key in params:
            value = params.pop(key)
            runtime = key in ("max_batch_size", "max_seq_len")
            notes.append(
                f"{source}: ignored {key}={value!r} ("
                + (f"a runtime setting: pass {key} to Llama.build)" if runtime else "no vision model here)")
            )
    if QUANTIZATION_KEY in params:  # our int8 folders: the loader reads the weights as int8
        check_quantization(params.pop(QUANTIZATION_KEY), source)
    for key, what in UNSUPPORTED_KEYS.items():
        if key in params:
            if params[key] is None or params[key] == -1:
                params.pop(key)
                continue
            raise ValueError(
                f"{source}: key {key!r} means this is {what}, which this library cannot run "
                f"(it runs Llama 3 / 3.1 / 3.2 text models with 16/32-bit weights): not supported"
            )
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    missing = [f.name for f in fields(ModelArgs) if f.default is MISSING and f.name not in params]
    if missing:
        raise ValueError(f"{source}: missing required key(s) {missing}")
    try:
        params = _checked(params)
        factor = params.pop("rope_scale_factor", None)
        args = ModelArgs(**params)  # the shape checks of the math (dim % n_heads ...)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if factor is None:
        factor, release = default_rope_scale_factor(args)
        if release is not None:
            notes.append(
                f"{release} shape: RoPE scale factor {factor:g} (Meta's params.json omits it; "
                f'a "rope_scale_factor" key overrides)'
            )
    args.rope_scale_factor = factor
    args.notes = notes
    return args


def load(path: str | Path, vocab_size: Optional[int] = None) -> ModelArgs:
    """Read a ``params.json`` file (``vocab_size``: the tokenizer's, for Llama 2's -1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path} (a checkpoint folder holds params.json)")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(params).__name__}")
    return from_dict(params, source=str(path), vocab_size=vocab_size)


def to_dict(args: ModelArgs) -> dict[str, Any]:
    """The params.json form: Meta's keys, plus ``rope_scale_factor`` unless it is 8 and the shape's default.

    A factor that the shape implies (32 for Llama 3.2 1B/3B) is written too: explicit is safer
    for a file that tools may edit (resharding changes n_kv_heads, and with it the shape).
    """
    out = {f.name: getattr(args, f.name) for f in fields(args) if f.name not in IGNORED_KEYS}  # no cache size
    if out["rope_scale_factor"] == DEFAULT_ROPE_SCALE_FACTOR and default_rope_scale_factor(args)[1] is None:
        del out["rope_scale_factor"]
    if not out["use_scaled_rope"]:
        del out["use_scaled_rope"]
    return out
