"""The Llama 3 / 3.1 Transformer in plain PyTorch.

Reads top to bottom like the paper: ModelArgs -> RMSNorm -> RoPE -> attention -> feed-forward
-> block -> Transformer. Module names equal the checkpoint keys (``layers.N.attention.wq`` ...), so
weights load with no renaming. This file imports only torch: no ranks, no devices picked for you,
no process groups, no speed tricks. Model parallelism is applied afterwards by ``llama.parallel``
(the math reshapes heads with ``-1`` so it never needs to know how many heads live on this rank),
and the fast paths of ``Llama.build`` by ``llama.fast``, both by swapping modules.
"""

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

# Llama 3.1 RoPE scaling constants (the factor is a parameter: 8 for 3.1, 32 for 3.2 1B/3B).
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_ORIGINAL_CONTEXT = 8192
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
DEFAULT_ROPE_SCALE_FACTOR = 8.0

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


@dataclass
class ModelArgs:
    """The architecture, mirroring ``params.json`` key for key.

    ``rope_scale_factor`` is ours (Meta hard-codes 8): None (absent from params.json) means 32 for
    the released Llama 3.2 1B/3B shapes (``LLAMA_3_2_SHAPES``), whose params.json omits it, and 8
    otherwise; an explicit value wins. Runtime knobs (max_seq_len, max_batch_size) are not
    architecture and live in ``Transformer.setup_cache``. Every value is checked for type and
    range (a string "false" is not a boolean). ``notes`` holds one line per thing the load should
    tell the user (a factor chosen for them, a key ignored).
    """

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    rope_scale_factor: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of"):
            _positive_int(name, getattr(self, name))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _positive_int("n_kv_heads", self.n_kv_heads)
        if self.ffn_dim_multiplier is not None:
            self.ffn_dim_multiplier = _positive_real("ffn_dim_multiplier", self.ffn_dim_multiplier)
        self.norm_eps = _positive_real("norm_eps", self.norm_eps, what="a positive number (Llama 3: 1e-05)")
        self.rope_theta = _positive_real("rope_theta", self.rope_theta, 1.0, "a number > 1 (Llama 3: 500000.0)")
        if not isinstance(self.use_scaled_rope, bool):
            raise ValueError(
                f"use_scaled_rope must be true or false (a JSON boolean), got {self.use_scaled_rope!r} "
                f"({_json_type(self.use_scaled_rope)})"
            )
        self.notes: list[str] = []
        if self.rope_scale_factor is None:
            self.rope_scale_factor, release = self.default_rope_scale_factor()
            if release is not None:
                self.notes.append(
                    f"{release} shape: RoPE scale factor {self.rope_scale_factor:g} (Meta's params.json omits it; "
                    f'a "rope_scale_factor" key overrides)'
                )
        else:
            what = "a number >= 1 (3.1: 8, 3.2 1B/3B: 32)"
            self.rope_scale_factor = _positive_real("rope_scale_factor", self.rope_scale_factor, what=what)
            if self.rope_scale_factor < 1:
                raise ValueError(f"rope_scale_factor must be {what}, got {self.rope_scale_factor!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(
                f"dim % n_heads must be 0: dim={self.dim}, n_heads={self.n_heads} "
                f"(dim % n_heads = {self.dim % self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads % n_kv_heads must be 0: n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads} "
                f"(n_heads % n_kv_heads = {self.n_heads % self.n_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim = dim / n_heads = {self.head_dim} must be even for RoPE")
        if self.ffn_hidden_dim <= 0:
            raise ValueError(f"ffn_dim_multiplier={self.ffn_dim_multiplier} makes the FFN width 0")

    def default_rope_scale_factor(self) -> tuple[float, Optional[str]]:
        """(factor, release name): 32 for a released Llama 3.2 1B/3B shape, else (8, None)."""
        for release, shape in LLAMA_3_2_SHAPES.items():
            if all(getattr(self, k) == v for k, v in shape.items()):
                return LLAMA_3_2_ROPE_SCALE_FACTOR, release
        return DEFAULT_ROPE_SCALE_FACTOR, None

    # Derived sizes, computed in this one place.
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def max_context(self) -> int:
        """Longest sequence the checkpoint was trained for: 131072 with 3.1 scaled RoPE, else 8192."""
        return 131072 if self.use_scaled_rope else ROPE_ORIGINAL_CONTEXT

    @classmethod
    def from_dict(cls, params: dict[str, Any], source: str = "params", vocab_size: Optional[int] = None) -> "ModelArgs":
        """Build from a ``params.json`` dict; errors name the key and ``source``.

        Llama 1/2 files: an absent ``rope_theta`` is 10000 (Llama 3 files always state theirs), and
        ``"vocab_size": -1`` means "the tokenizer decides": pass ``vocab_size`` (tokenizer.n_words).

        Accepted besides our fields: ``IGNORED_KEYS`` (max_batch_size, max_seq_len,
        vision_max_num_chunks: Meta's loaders take them, they do not change the math; each gives a
        note). ``UNSUPPORTED_KEYS`` (quantization_args, lora_args, vision_chunk_size,
        vision_num_cross_attention_layers, vision_model, moe_args) mean a checkpoint we cannot run
        correctly: an error saying what it is, unless null (or -1, Meta's "no vision"). Any other
        key is an error naming it.
        """
        params = {"rope_theta": LLAMA2_ROPE_THETA, **params}
        if params.get("vocab_size") == -1:
            if vocab_size is None:
                raise ValueError(f"{source}: vocab_size is -1 (Llama 2: the tokenizer decides); give the tokenizer's size")
            params["vocab_size"] = vocab_size
        known = {f.name for f in fields(cls)}
        params = dict(params)
        notes = []
        for key in IGNORED_KEYS:
            if key in params:
                value = params.pop(key)
                runtime = key in ("max_batch_size", "max_seq_len")
                notes.append(
                    f"{source}: ignored {key}={value!r} ("
                    + (f"a runtime setting: pass {key} to Llama.build)" if runtime else "no vision model here)")
                )
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
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [k for k in required if k not in params]
        if missing:
            raise ValueError(f"{source}: missing required key(s) {missing}")
        try:
            args = cls(**params)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        args.notes[:0] = notes
        return args

    @classmethod
    def load(cls, path: str | Path, vocab_size: Optional[int] = None) -> "ModelArgs":
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
        return cls.from_dict(params, source=str(path), vocab_size=vocab_size)

    def to_dict(self) -> dict[str, Any]:
        """The params.json form: Meta's keys, plus ``rope_scale_factor`` unless it is 8 and the shape's default.

        A factor that the shape implies (32 for Llama 3.2 1B/3B) is written too: explicit is safer
        for a file that tools may edit (resharding changes n_kv_heads, and with it the shape).
        """
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["rope_scale_factor"] == DEFAULT_ROPE_SCALE_FACTOR and self.default_rope_scale_factor()[1] is None:
            del out["rope_scale_factor"]
        if not out["use_scaled_rope"]:
            del out["use_scaled_rope"]
        return out


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in float32 and cast back."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """RoPE frequencies f_i = theta^(-2i/head_dim), with Llama 3.1 scaling bands; [head_dim/2] fp32."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32)[: hd // 2] / hd))
    if not args.use_scaled_rope:
        return freqs
    factor = args.rope_scale_factor
    wavelen = 2 * math.pi / freqs
    low_wavelen = ROPE_ORIGINAL_CONTEXT / ROPE_LOW_FREQ_FACTOR  # longer than this: divide by factor
    high_wavelen = ROPE_ORIGINAL_CONTEXT / ROPE_HIGH_FREQ_FACTOR  # shorter than this: keep
    smooth = (ROPE_ORIGINAL_CONTEXT / wavelen - ROPE_LOW_FREQ_FACTOR) / (ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    return torch.where(wavelen < high_wavelen, freqs, torch.where(wavelen > low_wavelen, freqs / factor, blended))


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles position * f_i in float32 -> (cos, sin), each [len(positions), head_dim/2]."""
    angles = torch.outer(positions.float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of each head (Meta's layout). x: [B, S, H, hd]; cos/sin: [S, hd/2].

    Each pair (x0, x1) becomes (x0 cos - x1 sin, x0 sin + x1 cos): the complex product
    (x0 + i x1)(cos + i sin). Eager runs it as one complex multiply, faster than four real ones on
    a decode step's small tensors (benchmarks/README.md); Inductor generates no code for complex
    tensors, so compiled graphs get the real form, which it fuses.
    """
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads: [S, 1, hd/2]
    if torch.compiler.is_compiling():
        pairs = x.float().unflatten(-1, (-1, 2))  # [B, S, H, hd/2, 2]
        x0, x1 = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return rotated.flatten(-2).type_as(x)
    pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))  # [B, S, H, hd/2]
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values for one layer: [max_batch, n_kv_heads_local, max_seq_len, head_dim].

    Heads come before positions (unlike Meta's [B, S, H, hd]) so attention reads the cache with no
    transpose or copy. Fixed-size buffers keep shapes static for ``torch.compile``.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, device, dtype):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(
        self, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v ([B, H, S, hd]) at start_pos; return the cached keys and values to attend over.

        An int start_pos (eager) returns positions [0, start_pos + S) only. A 0-d tensor start_pos
        (the compiled decode step) returns the whole cache, so every step has the same shapes; the
        caller's mask hides the positions not written yet.
        """
        bsz, _, seqlen, _ = k.shape
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos + torch.arange(seqlen, device=k.device)  # [S]
            self.k[:bsz].index_copy_(2, positions, k)
            self.v[:bsz].index_copy_(2, positions, v)
            return self.k[:bsz], self.v[:bsz]  # [B, H, max_seq_len, hd]
        end = start_pos + seqlen
        self.k[:bsz, :, start_pos:end] = k
        self.v[:bsz, :, start_pos:end] = v
        return self.k[:bsz, :, :end], self.v[:bsz, :, :end]


class Attention(nn.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        hd, kw = args.head_dim, {"device": device, "dtype": dtype}
        self.head_dim = hd
        self.wq = nn.Linear(args.dim, args.n_heads * hd, bias=False, **kw)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * hd, bias=False, **kw)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * hd, bias=False, **kw)
        self.wo = nn.Linear(args.n_heads * hd, args.dim, bias=False, **kw)
        self.cache: Optional[KVCache] = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start_pos: int | torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        # -1: the number of heads on this rank (all of them without model parallelism).
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)  # [B, S, Hq, hd]
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)  # [B, S, Hkv, hd]
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, hd]
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # [B, Hkv, T, hd]: T = start_pos + S, or max_seq_len
        out = self.attend(q, k, v, start_pos, mask)  # [B, Hq, S, hd]
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int | torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd) + mask) v. q: [B, Hq, S, hd]; k, v: [B, Hkv, T, hd] -> [B, Hq, S, hd].

        ``mask`` ([S, T] bool, from ``causal_mask``) None means causal attention for a prompt from
        position 0 (S = T), and every cached position for one query (a decode step: nothing it
        may not see is cached yet). SDPA lets consecutive query heads share a K/V head without
        copying it (``enable_gqa``). ``llama.fast`` replaces this for one-token steps.
        """
        seqlen, total = q.shape[2], k.shape[2]
        if mask is None and seqlen > 1 and seqlen != total:
            mask = causal_mask(start_pos, seqlen, total, q.device)
        causal = mask is None and seqlen > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)


def causal_mask(start_pos: int | torch.Tensor, seqlen: int, total: int, device=None) -> torch.Tensor:
    """[S, T] bool: query i, at position start_pos + i, may see key j iff j <= start_pos + i."""
    query_pos = start_pos + torch.arange(seqlen, device=device)
    return torch.arange(total, device=device)[None, :] <= query_pos[:, None]


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        hidden, kw = args.ffn_hidden_dim, {"device": device, "dtype": dtype}
        self.w1 = nn.Linear(args.dim, hidden, bias=False, **kw)
        self.w2 = nn.Linear(hidden, args.dim, bias=False, **kw)
        self.w3 = nn.Linear(args.dim, hidden, bias=False, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.attention = Attention(args, device, dtype)
        self.feed_forward = FeedForward(args, device, dtype)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, device, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, device, dtype)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start_pos: int | torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Token ids [B, S] -> float32 logits [B, S, vocab] (or [B, 1, vocab] with ``last_only``)."""

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.args = args
        kw = {"device": device, "dtype": dtype}
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, **kw)
        self.layers = nn.ModuleList(TransformerBlock(args, **kw) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, **kw)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False, **kw)
        self.max_batch_size = 0
        self.max_seq_len = 0
        # RoPE tables for every cache position, made by setup_cache: [max_seq_len, head_dim/2] fp32.
        self._rope_cos: Optional[torch.Tensor] = None
        self._rope_sin: Optional[torch.Tensor] = None

    @property
    def params(self) -> SimpleNamespace:
        """Meta's ``model.params``: a read-only copy of ``args`` plus the cache's max_seq_len and max_batch_size."""
        return SimpleNamespace(**asdict(self.args), max_seq_len=self.max_seq_len, max_batch_size=self.max_batch_size)

    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate the KV cache (and RoPE tables) on the model's device and dtype."""
        weight = self.tok_embeddings.weight
        hd = self.args.head_dim
        for layer in self.layers:
            # Local KV heads from the (possibly sharded) wk weight: [n_kv_local * hd, dim].
            n_kv_local = layer.attention.wk.weight.shape[0] // hd
            layer.attention.cache = KVCache(max_batch_size, max_seq_len, n_kv_local, hd, weight.device, weight.dtype)
        freqs = rope_frequencies(self.args, device=weight.device)
        self._rope_cos, self._rope_sin = rope_cos_sin(freqs, torch.arange(max_seq_len, device=weight.device))
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def clear_cache(self) -> None:
        """Free the KV cache; forward then runs full sequences only."""
        for layer in self.layers:
            layer.attention.cache = None
        self._rope_cos = self._rope_sin = None
        self.max_batch_size = self.max_seq_len = 0

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, last_only: bool = False) -> torch.Tensor:
        """Prefill (S tokens) or decode (S = 1) at positions start_pos ... start_pos+S-1.

        Without a cache (no ``setup_cache``), ``start_pos`` must be 0 and the whole sequence is given.
        ``last_only`` computes logits for the final position only (what sampling needs).

        ``start_pos`` as a 0-d long tensor selects the static-shape path that ``torch.compile``
        needs: attention runs over the whole cache with a position mask, so every decode step has
        the same shapes and one compiled graph serves them all. Its bounds are not checked (that
        would need the value on the host); ``Llama`` checks them before decoding.
        """
        bsz, seqlen = tokens.shape
        device = tokens.device
        if self._rope_cos is None:
            if not isinstance(start_pos, int) or start_pos != 0:
                raise ValueError(f"start_pos={start_pos} needs a KV cache: call setup_cache() first")
            freqs = rope_frequencies(self.args, device=device)
            cos, sin = rope_cos_sin(freqs, torch.arange(seqlen, device=device))
        elif isinstance(start_pos, torch.Tensor):
            positions = start_pos + torch.arange(seqlen, device=device)
            cos, sin = self._rope_cos[positions], self._rope_sin[positions]
        else:
            if bsz > self.max_batch_size or start_pos + seqlen > self.max_seq_len:
                raise ValueError(
                    f"batch {bsz} x positions {start_pos}..{start_pos + seqlen - 1} exceed the KV cache "
                    f"({self.max_batch_size} x {self.max_seq_len})"
                )
            cos, sin = self._rope_cos[start_pos : start_pos + seqlen], self._rope_sin[start_pos : start_pos + seqlen]
        # One mask for all layers. An eager one-token step sees every cached position, and a
        # prefill from position 0 is plain causal attention: neither needs a mask.
        mask = None
        if isinstance(start_pos, torch.Tensor):
            mask = causal_mask(start_pos, seqlen, self.max_seq_len, device)  # [S, max_seq_len]
        elif seqlen > 1 and start_pos > 0:
            mask = causal_mask(start_pos, seqlen, start_pos + seqlen, device)  # [S, start_pos + S]
        h = self.tok_embeddings(tokens)  # [B, S, dim]
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos, mask)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()  # [B, S or 1, vocab]
