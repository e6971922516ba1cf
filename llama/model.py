"""The Llama 3 / 3.1 Transformer in plain PyTorch.

Reads top to bottom like the paper: ModelArgs -> RMSNorm -> RoPE -> attention -> feed-forward
-> block -> Transformer. Module names equal the checkpoint keys (``layers.N.attention.wq`` ...), so
weights load with no renaming. This file imports only torch: no ranks, no devices picked for you,
no process groups, no speed tricks. Model parallelism is applied afterwards by ``llama.parallel``
(the math reshapes heads with ``-1`` so it never needs to know how many heads live on this rank),
and the fast paths of ``Llama.build`` by ``llama.fast``, both by swapping modules.
"""

import math
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Llama 3.1 RoPE scaling constants (the factor is a parameter: 8 for 3.1, 32 for 3.2 1B/3B).
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_ORIGINAL_CONTEXT = 8192
# Where a step starts: an int (eager), or a 0-d long tensor (the static-shape compiled decode step).
Position = int | Tensor
Zeros = Callable[..., Tensor]  # torch.zeros's signature: (shape, device=, dtype=) -> a zero tensor


@dataclass
class ModelArgs:
    """The architecture, mirroring ``params.json`` key for key (read and checked by ``llama.params``).

    ``rope_scale_factor`` is ours (Meta hard-codes 8; Llama 3.2 1B/3B were trained with 32). The
    cache size (max_batch_size, max_seq_len) is not architecture (``Transformer.setup_cache``), but
    Meta's ModelArgs carries it, so it may be given here too: then ``Transformer(args)`` allocates
    its cache when built, as Meta's does (params.json and ``Llama.build`` leave both None).
    """

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None  # None: as many as n_heads (multi-head attention)
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    rope_scale_factor: float = 8.0
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    # What loading params.json should tell the user (a factor chosen, a key ignored): llama.params sets it.
    notes: ClassVar[Sequence[str]] = ()

    def __post_init__(self) -> None:
        # The shapes the math needs: whole heads, whole K/V groups, (cos, sin) pairs, a non-empty FFN.
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
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


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in float32 and cast back."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device=None) -> Tensor:
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


def rope_cos_sin(freqs: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Angles position * f_i in float32 -> (cos, sin), each [len(positions), head_dim/2]."""
    angles = torch.outer(positions.float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
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

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, device, dtype,
                 zeros: Zeros = torch.zeros):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, start_pos: Position, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
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
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, start_pos: Position, mask: Tensor | None = None) -> Tensor:
        bsz, seqlen, _ = x.shape
        # -1: the number of heads on this rank (all of them without model parallelism).
        q, k, v = self.project(x)
        q = q.view(bsz, seqlen, -1, self.head_dim)  # [B, S, Hq, hd]
        k = k.view(bsz, seqlen, -1, self.head_dim)  # [B, S, Hkv, hd]
        v = v.view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, hd]
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # [B, Hkv, T, hd]: T = start_pos + S, or max_seq_len
        out = self.attend(q, k, v, start_pos, mask)  # [B, Hq, S, hd]
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, S, dim] -> q [B, S, Hq * hd], k and v [B, S, Hkv * hd]. (``llama.fused_projections``
        computes the three as one product.)"""
        return self.wq(x), self.wk(x), self.wv(x)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, start_pos: Position, mask: Tensor | None) -> Tensor:
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


def causal_mask(start_pos: Position, seqlen: int, total: int, device=None) -> Tensor:
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

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.attention = Attention(args, device, dtype)
        self.feed_forward = FeedForward(args, device, dtype)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, device, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, device, dtype)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, start_pos: Position, mask: Tensor | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


def local_out_features(linear: nn.Module) -> int:
    """Output features of this rank's slice of a linear layer: its weight's rows ([out, in]). A layer
    that stores its weight in another layout (packed int4, ``llama.quantize.int4``) says it itself."""
    return getattr(linear, "local_out_features", None) or linear.weight.shape[0]


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
        self._rope_cos: Tensor | None = None
        self._rope_sin: Tensor | None = None
        if args.max_batch_size is not None and args.max_seq_len is not None:  # Meta's way: sized by its args
            self.setup_cache(args.max_batch_size, args.max_seq_len)

    @property
    def params(self) -> SimpleNamespace:
        """Meta's ``model.params``: a read-only copy of ``args`` plus the cache's max_seq_len and max_batch_size."""
        return SimpleNamespace(**{**asdict(self.args), "max_seq_len": self.max_seq_len, "max_batch_size": self.max_batch_size})

    def setup_cache(self, max_batch_size: int, max_seq_len: int, zeros: Zeros = torch.zeros) -> None:
        """Allocate the KV cache (and RoPE tables) on the model's device and dtype; ``zeros(shape,
        device=, dtype=)`` makes each cache tensor (``llama.hugepages.zeros_on_demand``: resident
        only where written)."""
        weight = self.tok_embeddings.weight
        hd = self.args.head_dim
        for layer in self.layers:
            # Local KV heads from the (possibly sharded) wk weight: [n_kv_local * hd, dim].
            n_kv_local = local_out_features(layer.attention.wk) // hd
            layer.attention.cache = KVCache(max_batch_size, max_seq_len, n_kv_local, hd, weight.device, weight.dtype, zeros)
        freqs = rope_frequencies(self.args, device=weight.device)
        self._rope_cos, self._rope_sin = rope_cos_sin(freqs, torch.arange(max_seq_len, device=weight.device))
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def clear_cache(self) -> None:
        """Free the KV cache; forward then runs full sequences only."""
        for layer in self.layers:
            layer.attention.cache = None
        self._rope_cos = self._rope_sin = None
        self.max_batch_size = self.max_seq_len = 0

    def forward(self, tokens: Tensor, start_pos: Position = 0, last_only: bool = False) -> Tensor:
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
