"""The Transformer: components against float64 formulas, the whole model against Hugging Face's
``LlamaForCausalLM`` on the same random weights, cached decoding against the full forward, and the
released architectures built on the ``meta`` device."""

import json
import math
import random

import pytest
import torch
from hf_reference import hf_logits, hf_model, rel_err

from llama.checkpoint import random_state_dict
from llama.fast import grouped_attention
from llama.model import (
    FeedForward,
    ModelArgs,
    RMSNorm,
    Transformer,
    apply_rope,
    rope_cos_sin,
    rope_frequencies,
)

# Tiny architectures for the parity tests: head_dim 16 with theta 500000 puts RoPE indices 0-3 in
# the "keep" band, 4 in the blended band and 5-7 in the "divide" band, so every band is exercised.
TINY = {
    "mha": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=96, multiple_of=32),
    "mha-scaled": dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=96, multiple_of=32, use_scaled_rope=True
    ),
    "gqa": dict(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=96, multiple_of=32, ffn_dim_multiplier=1.3),
    "gqa-scaled": dict(
        dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=96, multiple_of=32, ffn_dim_multiplier=1.3,
        use_scaled_rope=True,
    ),
    "mqa-scaled32": dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=96, multiple_of=32, use_scaled_rope=True,
        rope_scale_factor=32.0,
    ),
}

PARITY_TOL = 1e-4  # fp32 logits, max|a-b| / max|b|
CACHE_TOL = 1e-5  # cached vs full forward of the same implementation, fp32


def tiny_model(name: str, seed: int = 0) -> tuple[ModelArgs, dict[str, torch.Tensor], Transformer]:
    args = ModelArgs(**TINY[name])
    sd = random_state_dict(args, seed=seed, dtype=torch.float32)
    model = Transformer(args)
    model.load_state_dict(sd, strict=True)
    return args, sd, model.eval()


def tokens_for(args: ModelArgs, bsz: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, args.vocab_size, (bsz, seqlen), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The whole model against Hugging Face transformers


@pytest.mark.parametrize("name", list(TINY))
@torch.no_grad()
def test_full_forward_matches_hf(name):
    args, sd, model = tiny_model(name)
    tokens = tokens_for(args, bsz=2, seqlen=24)
    ours = model(tokens)
    ref = hf_logits(hf_model(args, sd), tokens)
    assert ours.shape == ref.shape == (2, 24, args.vocab_size)
    assert rel_err(ours, ref) < PARITY_TOL


def _blocks_at(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Our blocks on a chunk whose first token sits at ``positions[0]`` with nothing before it.

    ``Transformer.forward`` cannot express that (a chunk at start_pos > 0 attends to the cache),
    so this runs the same layers with the RoPE angles of far positions: exactly what Hugging Face
    computes for explicit ``position_ids`` and no past.
    """
    cos, sin = rope_cos_sin(rope_frequencies(model.args), positions)
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h, cos, sin, 0)
    return model.output(model.norm(h)).float()


@pytest.mark.parametrize("name", list(TINY))
@torch.no_grad()
def test_far_positions_match_hf(name):
    """A chunk at positions 9000+ (past the 8192 original context): float32 angles of large
    positions agree with Hugging Face's (explicit ``position_ids``)."""
    args, sd, model = tiny_model(name)
    tokens = tokens_for(args, bsz=2, seqlen=16)
    positions = torch.arange(9000, 9016)
    hf = hf_model(args, sd)
    ref = hf(tokens, position_ids=positions[None].expand(2, -1), use_cache=False).logits.float()
    assert rel_err(_blocks_at(model, tokens, positions), ref) < PARITY_TOL


@torch.no_grad()
def test_hf_comparison_detects_wrong_rope_scaling():
    """Control: the parity tolerance is far below the effect of RoPE scaling (factor 8 vs none vs
    32) over 128 positions. (Attention only sees relative positions, so it is the distances between
    tokens, not how large the positions are, that bring the scaled bands into play.)"""
    args, sd, model = tiny_model("gqa-scaled")
    tokens = tokens_for(args, bsz=1, seqlen=128)
    ours = model(tokens)
    assert rel_err(ours, hf_logits(hf_model(args, sd), tokens)) < PARITY_TOL
    for wrong in ({"use_scaled_rope": False}, {"rope_scale_factor": 32.0}):
        ref = hf_logits(hf_model(ModelArgs(**{**TINY["gqa-scaled"], **wrong}), sd), tokens)
        assert rel_err(ours, ref) > 10 * PARITY_TOL  # measured: 2.7e-2 (unscaled), 2.9e-3 (factor 32)


# Small enough for 8200 positions in a few seconds: 1 layer, 2 query heads sharing 1 KV head.
LONG = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=32, use_scaled_rope=True)


@pytest.mark.slow
@torch.no_grad()
def test_long_context_matches_hf():
    """8200 tokens end to end, so query-key distances pass the 8192 original context, both models
    prefilled through their own KV caches in 512-token chunks (one 8200x8200 eager attention per
    model would take far longer). Here the wrong RoPE scaling gives a relative error near 0.7."""
    args = ModelArgs(**LONG)
    sd = random_state_dict(args, seed=0, dtype=torch.float32)
    model = Transformer(args)
    model.load_state_dict(sd)
    tokens = tokens_for(args, bsz=1, seqlen=8200)
    model.setup_cache(1, 8200)
    ours = torch.cat([model(tokens[:, s : s + 512], start_pos=s) for s in range(0, 8200, 512)], dim=1)
    ref = hf_logits(hf_model(args, sd), tokens, chunk=512)
    assert rel_err(ours, ref) < PARITY_TOL


# ---------------------------------------------------------------------------------------------
# Cached decoding against the full forward


@torch.no_grad()
def _decode_in_chunks(model: Transformer, tokens: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    assert sum(sizes) == tokens.shape[1]
    out, pos = [], 0
    for n in sizes:
        out.append(model(tokens[:, pos : pos + n], start_pos=pos))
        pos += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", ["gqa-scaled", "mha"])
@pytest.mark.parametrize("sizes", [[1] * 11, [3, 1, 5, 2], [11]], ids=["one-at-a-time", "3-1-5-2", "prefill"])
@torch.no_grad()
def test_cached_decoding_equals_full_forward(name, sizes):
    args, _, model = tiny_model(name)
    tokens = tokens_for(args, bsz=3, seqlen=11)
    full = model(tokens)  # no cache: one causal pass
    model.setup_cache(max_batch_size=4, max_seq_len=16)  # larger than needed: slices must be right
    assert rel_err(_decode_in_chunks(model, tokens, sizes), full) < CACHE_TOL


@torch.no_grad()
def test_tensor_start_pos_equals_full_forward():
    """The static-shape path (0-d tensor start_pos, attention over the whole masked cache) that
    ``torch.compile`` uses, run eagerly: a chunk, then one token at a time."""
    args, _, model = tiny_model("gqa-scaled")
    tokens = tokens_for(args, bsz=2, seqlen=9)
    full = model(tokens)
    model.setup_cache(2, 16)
    out = [model(tokens[:, :4], start_pos=torch.tensor(0))]
    out += [model(tokens[:, p : p + 1], start_pos=torch.tensor(p)) for p in range(4, 9)]
    assert rel_err(torch.cat(out, dim=1), full) < CACHE_TOL


@torch.no_grad()
def test_cache_reuse_for_a_new_prompt():
    """Stale entries past the new prompt's length are never attended to."""
    args, _, model = tiny_model("gqa")
    first, second = tokens_for(args, 2, 12, seed=1), tokens_for(args, 2, 7, seed=2)
    model.setup_cache(2, 16)
    _decode_in_chunks(model, first, [12])
    cached = _decode_in_chunks(model, second, [4, 1, 2])
    model.clear_cache()
    assert rel_err(cached, model(second)) < CACHE_TOL


@torch.no_grad()
def test_last_only():
    args, _, model = tiny_model("gqa-scaled")
    tokens = tokens_for(args, bsz=2, seqlen=9)
    full = model(tokens)
    # A few float32 ulps: the output matmul of 2 rows and of 18 may take different BLAS kernels
    # (seen on an AVX-512 CPU: 1.2e-6 on logits of magnitude ~1).
    assert torch.allclose(model(tokens, last_only=True), full[:, -1:], rtol=0, atol=1e-5)
    model.setup_cache(2, 12)
    last = model(tokens[:, :6], start_pos=0, last_only=True)
    assert last.shape == (2, 1, args.vocab_size)
    assert rel_err(last, full[:, 5:6]) < CACHE_TOL
    assert rel_err(model(tokens[:, 6:], start_pos=6, last_only=True), full[:, -1:]) < CACHE_TOL


def test_logits_are_float32_for_bf16_weights():
    args, sd, _ = tiny_model("gqa")
    model = Transformer(args, dtype=torch.bfloat16)
    model.load_state_dict(sd)
    with torch.no_grad():
        logits = model(tokens_for(args, 1, 5))
    assert logits.dtype == torch.float32 and logits.shape == (1, 5, args.vocab_size)


def test_cache_errors():
    args, _, model = tiny_model("mha")
    tokens = tokens_for(args, 1, 4)
    with pytest.raises(ValueError, match=r"start_pos=3 needs a KV cache: call setup_cache"):
        model(tokens, start_pos=3)
    model.setup_cache(1, 6)
    with pytest.raises(ValueError, match=r"positions 3\.\.6 exceed the KV cache \(1 x 6\)"):
        model(tokens, start_pos=3)
    with pytest.raises(ValueError, match=r"batch 2 .* exceed the KV cache \(1 x 6\)"):
        model(tokens_for(args, 2, 1), start_pos=0)


def test_cache_buffers_follow_weights():
    args = ModelArgs(**TINY["gqa"])
    model = Transformer(args, dtype=torch.bfloat16)
    model.setup_cache(3, 10)
    cache = model.layers[0].attention.cache
    # [max_batch, n_kv_heads, max_seq_len, head_dim]
    assert cache.k.shape == cache.v.shape == (3, args.n_kv_heads, 10, args.head_dim)
    assert cache.k.dtype == torch.bfloat16
    model.clear_cache()
    assert all(layer.attention.cache is None for layer in model.layers)


# ---------------------------------------------------------------------------------------------
# RoPE, RMSNorm, attention, feed-forward against float64 formulas written here


def ref_rope_frequencies(head_dim: int, theta: float, scaled: bool, factor: float = 8.0) -> torch.Tensor:
    """Float64 Llama 3.1 frequencies (facts §2), one index at a time."""
    out = []
    for i in range(head_dim // 2):
        f = theta ** (-2 * i / head_dim)
        if scaled:
            w = 2 * math.pi / f
            if w < 8192 / 4:
                pass
            elif w > 8192 / 1:
                f = f / factor
            else:
                s = (8192 / w - 1) / (4 - 1)
                f = (1 - s) * f / factor + s * f
        out.append(f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scaled,factor", [(False, 8.0), (True, 8.0), (True, 32.0)])
@pytest.mark.parametrize("head_dim,theta", [(128, 500000.0), (64, 500000.0), (16, 500000.0), (128, 10000.0)])
def test_rope_frequencies_match_float64(head_dim, theta, scaled, factor):
    args = ModelArgs(dim=head_dim * 2, n_layers=1, n_heads=2, vocab_size=8, rope_theta=theta,
                     use_scaled_rope=scaled, rope_scale_factor=factor)
    ours = rope_frequencies(args)
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    torch.testing.assert_close(ours.double(), ref_rope_frequencies(head_dim, theta, scaled, factor), rtol=2e-6, atol=0)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_rope_scaling_bands_for_head_dim_128(factor):
    """head_dim 128, theta 500000: indices 0-28 unchanged, 29-34 blended, 35-63 divided by the factor."""
    base = dict(dim=4096, n_layers=1, n_heads=32, vocab_size=8, rope_theta=500000.0)
    plain = rope_frequencies(ModelArgs(**base))
    scaled = rope_frequencies(ModelArgs(**base, use_scaled_rope=True, rope_scale_factor=factor))
    assert torch.equal(scaled[:29], plain[:29])
    assert torch.equal(scaled[35:], plain[35:] / factor)
    blended = scaled[29:35]
    assert bool(((blended < plain[29:35]) & (blended > plain[29:35] / factor)).all())
    # The band edges of the float64 formula fall at the same indices.
    ref = ref_rope_frequencies(128, 500000.0, True, factor)
    plain64 = ref_rope_frequencies(128, 500000.0, False)
    assert [i for i in range(64) if ref[i] == plain64[i]] == list(range(29))
    assert [i for i in range(64) if ref[i] == plain64[i] / factor] == list(range(35, 64))


def test_rope_cos_sin_match_float64():
    freqs = rope_frequencies(ModelArgs(dim=256, n_layers=1, n_heads=2, vocab_size=8, use_scaled_rope=True))
    positions = torch.arange(0, 2000, 7)
    cos, sin = rope_cos_sin(freqs, positions)
    angles = positions.double()[:, None] * freqs.double()[None, :]
    assert cos.shape == sin.shape == (len(positions), 64)
    # Angles are float32 (as in Meta's and HF's code): error up to ~position * 2^-24.
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=2e-4)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=2e-4)


def test_apply_rope_rotates_adjacent_pairs():
    g = torch.Generator().manual_seed(0)
    bsz, seqlen, heads, hd = 2, 5, 3, 16
    x = torch.randn(bsz, seqlen, heads, hd, generator=g)
    positions = torch.arange(9000, 9000 + seqlen, dtype=torch.float64)
    freqs = ref_rope_frequencies(hd, 500000.0, True)
    angles = positions[:, None] * freqs[None, :]  # [S, hd/2]
    ours = apply_rope(x, angles.cos().float(), angles.sin().float())
    # Pair (2i, 2i+1) as the complex number x_2i + j x_2i+1, multiplied by e^(j angle).
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * torch.polar(
        torch.ones_like(angles), angles
    )[None, :, None, :]
    ref = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    bf = apply_rope(x.bfloat16(), angles.cos().float(), angles.sin().float())
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.double(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rmsnorm_matches_float64(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 48, generator=g) * 5 + 1).to(dtype)
    norm = RMSNorm(48, eps=1e-5, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(48, generator=g))
    x64, w64 = x.double(), norm.weight.double()
    ref = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-5) * w64
    out = norm(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def naive_attention(q, k, v, start_pos):
    """Float64, K/V heads repeated for their query heads, explicit mask: query i sees key j iff j <= start_pos + i."""
    q, k, v = q.double(), k.double(), v.double()
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    seqlen, total = q.shape[2], k.shape[2]
    mask = torch.full((seqlen, total), float("-inf"), dtype=torch.float64)
    for i in range(seqlen):
        mask[i, : start_pos + i + 1] = 0.0
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("start_pos,seqlen", [(0, 6), (5, 4), (9, 1), (3, 3)])
def test_grouped_attention_matches_naive(n_heads, n_kv_heads, start_pos, seqlen):
    g = torch.Generator().manual_seed(n_heads * 100 + start_pos)
    bsz, hd, total = 2, 16, start_pos + seqlen
    q = torch.randn(bsz, n_heads, seqlen, hd, generator=g) * 2
    k = torch.randn(bsz, n_kv_heads, total, hd, generator=g) * 2
    v = torch.randn(bsz, n_kv_heads, total, hd, generator=g)
    out = grouped_attention(q, k, v, start_pos)
    assert out.shape == (bsz, n_heads, seqlen, hd)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, start_pos), rtol=1e-5, atol=1e-5)


def test_feed_forward_is_swiglu():
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=8, multiple_of=16)
    ffn = FeedForward(args)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    x64 = x.double()
    w1, w2, w3 = (m.weight.detach().double() for m in (ffn.w1, ffn.w2, ffn.w3))
    a = x64 @ w1.T
    ref = (a * torch.sigmoid(a) * (x64 @ w3.T)) @ w2.T
    with torch.no_grad():
        torch.testing.assert_close(ffn(x).double(), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The released architectures, built on the meta device (no memory)

RELEASED = {
    "3-8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.3,
                 multiple_of=1024, norm_eps=1e-05, rope_theta=500000.0),
    "3.1-8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.3,
                   multiple_of=1024, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True),
    "3.1-70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.3,
                    multiple_of=4096, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True),
    "3.1-405B": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.2,
                     multiple_of=4096, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True),
    "3.1-405B-MP16": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=16, vocab_size=128256,
                          ffn_dim_multiplier=1.2, multiple_of=4096, norm_eps=1e-05, rope_theta=500000.0,
                          use_scaled_rope=True),
    "3.2-1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.5,
                   multiple_of=256, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True),
    "3.2-3B": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.0,
                   multiple_of=256, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True),
}
FFN_WIDTH = {"3-8B": 14336, "3.1-8B": 14336, "3.1-70B": 28672, "3.1-405B": 53248, "3.1-405B-MP16": 53248,
             "3.2-1B": 8192, "3.2-3B": 8192}
HEAD_DIM = {"3.2-1B": 64}  # 128 for the others
PARAMS = {"3-8B": 8_030_261_248, "3.1-8B": 8_030_261_248, "3.1-70B": 70_553_706_496, "3.1-405B": 405_853_388_800}


def shuffled(d: dict, seed: int) -> dict:
    items = list(d.items())
    random.Random(seed).shuffle(items)
    return dict(items)


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_architectures_on_meta(name):
    args = ModelArgs.from_dict(shuffled(RELEASED[name], seed=len(name)))
    assert args.ffn_hidden_dim == FFN_WIDTH[name]
    assert args.head_dim == HEAD_DIM.get(name, 128)
    assert args.use_scaled_rope == ("use_scaled_rope" in RELEASED[name])
    model = Transformer(args, device="meta", dtype=torch.bfloat16)
    if name in PARAMS:
        assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    layer = model.layers[0]
    assert layer.feed_forward.w1.weight.shape == (FFN_WIDTH[name], args.dim)
    assert layer.attention.wk.weight.shape == (args.n_kv_heads * args.head_dim, args.dim)

    # KV cache, allocated (on meta) like the real thing: 2 * n_layers * n_kv_heads * head_dim * 2 bytes a token.
    max_seq_len = 256
    model.setup_cache(max_batch_size=1, max_seq_len=max_seq_len)
    buffers = [b for layer in model.layers for b in (layer.attention.cache.k, layer.attention.cache.v)]
    assert all(b.device.type == "meta" and b.dtype == torch.bfloat16 for b in buffers)
    per_token = sum(b.numel() * b.element_size() for b in buffers) // max_seq_len
    assert per_token == 2 * args.n_layers * args.n_kv_heads * args.head_dim * 2
    if name.endswith("8B"):
        assert per_token == 131_072  # 128 KiB: 0.125 GiB for 1k tokens, as in the 3.1 release post
        assert per_token * 1024 == 0.125 * 2**30


# ---------------------------------------------------------------------------------------------
# ModelArgs: params.json in, errors that name what is wrong


def test_model_args_accepts_released_params_in_any_order():
    for seed in range(3):
        for params in RELEASED.values():
            args = ModelArgs.from_dict(shuffled(params, seed))
            assert all(getattr(args, k) == v for k, v in params.items())


def test_llama_3_0_params_lack_use_scaled_rope():
    args = ModelArgs.from_dict(RELEASED["3-8B"])
    assert args.use_scaled_rope is False and args.max_context == 8192
    assert ModelArgs.from_dict(RELEASED["3.1-8B"]).max_context == 131072


@pytest.mark.parametrize("name", list(RELEASED))
def test_to_dict_round_trips(name, tmp_path):
    args = ModelArgs.from_dict(RELEASED[name])
    # Exactly the released file's keys and values; for 3.2 1B/3B plus the factor their shape implies,
    # written explicitly so that a tool that edits the shape (resharding: n_kv_heads) keeps it.
    extra = {"rope_scale_factor": 32.0} if name.startswith("3.2") else {}
    assert args.to_dict() == {**RELEASED[name], **extra}
    assert ModelArgs.from_dict(args.to_dict()) == args
    path = tmp_path / "params.json"
    path.write_text(json.dumps(args.to_dict()))
    assert ModelArgs.load(path) == args


def test_to_dict_keeps_a_non_default_rope_scale_factor():
    args = ModelArgs.from_dict({**RELEASED["3.2-1B"], "rope_scale_factor": 32.0})
    assert args.to_dict()["rope_scale_factor"] == 32.0
    assert ModelArgs.from_dict(args.to_dict()) == args


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_seq_length'\]"):
        ModelArgs.from_dict({**RELEASED["3.1-8B"], "max_seq_length": 2048})


# Meta's llama-models ModelArgs fields that are runtime knobs or vision tiling: no effect on the text math.
@pytest.mark.parametrize("key,value", [("max_seq_len", 2048), ("max_batch_size", 32), ("vision_max_num_chunks", 4)])
def test_keys_meta_accepts_without_math_are_ignored_with_a_note(key, value):
    args = ModelArgs.from_dict({**RELEASED["3.1-8B"], key: value}, "p.json")
    assert args == ModelArgs.from_dict(RELEASED["3.1-8B"])
    assert any(f"p.json: ignored {key}={value}" in note for note in args.notes)


@pytest.mark.parametrize(
    "key,value,what",
    [
        ("quantization_args", {"group_size": 32, "scheme": "int4_weight_int8_dynamic_activation", "spinquant": True},
         "quantized"),
        ("lora_args", {"rank": 16, "scale": 2.0}, "LoRA"),
        ("vision_chunk_size", 560, "Vision"),
        ("vision_num_cross_attention_layers", 8, "Vision"),
        ("moe_args", {"num_experts": 16}, "mixture-of-experts"),
    ],
)
def test_keys_of_checkpoints_we_cannot_run_say_what_they_are(key, value, what):
    with pytest.raises(ValueError, match=rf"p\.json: key '{key}' means this is .*{what}.*not supported"):
        ModelArgs.from_dict({**RELEASED["3.2-1B"], key: value}, "p.json")


def test_null_or_off_values_of_those_keys_are_accepted():
    # What asdict() of Meta's ModelArgs writes for a text model: no quantization, no LoRA, no vision.
    off = {"quantization_args": None, "lora_args": None, "vision_chunk_size": -1,
           "vision_num_cross_attention_layers": -1, "vision_max_num_chunks": 4}  # fmt: skip
    assert ModelArgs.from_dict({**RELEASED["3.1-8B"], **off}) == ModelArgs.from_dict(RELEASED["3.1-8B"])


@pytest.mark.parametrize("name", ["3.2-1B", "3.2-3B"])
def test_llama_3_2_shapes_get_rope_factor_32(name):
    args = ModelArgs.from_dict(RELEASED[name])  # Meta's params.json: no factor
    assert args.rope_scale_factor == 32.0
    assert any("RoPE scale factor 32" in n and "Llama 3.2" in n for n in args.notes)
    # The frequencies use it: compare with the float64 formula at factor 32 (Hugging Face's
    # config.json of Llama-3.2-1B/3B says rope_scaling factor 32.0).
    torch.testing.assert_close(rope_frequencies(args).double(), ref_rope_frequencies(args.head_dim, 500000.0, True, 32.0),
                               rtol=2e-6, atol=0)
    # An explicit key wins, and is kept when written back.
    explicit = ModelArgs.from_dict({**RELEASED[name], "rope_scale_factor": 8.0})
    assert explicit.rope_scale_factor == 8.0 and explicit.notes == []
    assert ModelArgs.from_dict(explicit.to_dict()).rope_scale_factor == 8.0


@pytest.mark.parametrize("change", [{"n_kv_heads": 16}, {"n_layers": 15}, {"use_scaled_rope": False}])
def test_other_shapes_keep_factor_8(change):
    args = ModelArgs.from_dict({**RELEASED["3.2-1B"], **change})
    assert args.rope_scale_factor == 8.0 and args.notes == []


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("use_scaled_rope", "false", r"use_scaled_rope must be true or false \(a JSON boolean\), got 'false' \(a string\)"),
        ("use_scaled_rope", 1, r"use_scaled_rope must be true or false"),
        ("rope_theta", -1, r"rope_theta must be a number > 1 \(Llama 3: 500000\.0\), got -1"),
        ("rope_theta", "5e5", r"rope_theta must be a number > 1 .*got '5e5' \(a string\)"),
        ("norm_eps", -1, r"norm_eps must be a positive number .*got -1"),
        ("norm_eps", 0, r"norm_eps must be a positive number .*got 0"),
        ("norm_eps", "abc", r"norm_eps must be a positive number .*got 'abc' \(a string\)"),
        ("norm_eps", float("nan"), r"norm_eps must be a positive number .*got nan"),
        ("rope_scale_factor", 0, r"rope_scale_factor must be a number >= 1 .*got 0"),
        ("rope_scale_factor", 0.5, r"rope_scale_factor must be a number >= 1 .*got 0\.5"),
        ("rope_scale_factor", float("inf"), r"rope_scale_factor must be a number >= 1 .*got inf"),
        ("ffn_dim_multiplier", "1.3", r"ffn_dim_multiplier must be a positive number, got '1\.3' \(a string\)"),
        ("ffn_dim_multiplier", -1.3, r"ffn_dim_multiplier must be a positive number, got -1\.3"),
        ("dim", 4096.0, r"dim must be a positive integer, got 4096\.0 \(a number\)"),
        ("n_layers", "32", r"n_layers must be a positive integer, got '32' \(a string\)"),
        ("n_kv_heads", True, r"n_kv_heads must be a positive integer, got True \(a boolean\)"),
        ("vocab_size", -2, r"vocab_size must be a positive integer, got -2"),  # -1: Llama 2, the tokenizer decides
    ],
)
def test_wrong_types_and_ranges_are_named(key, value, message):
    with pytest.raises(ValueError, match=rf"p\.json: {message}"):
        ModelArgs.from_dict({**RELEASED["3.1-8B"], key: value}, "p.json")


def test_integral_floats_become_floats():
    args = ModelArgs.from_dict({**RELEASED["3.1-8B"], "rope_theta": 500000, "ffn_dim_multiplier": 1})
    assert isinstance(args.rope_theta, float) and isinstance(args.ffn_dim_multiplier, float)


def test_missing_key_is_named():
    params = dict(RELEASED["3.1-8B"])
    del params["n_heads"]
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['n_heads'\]"):
        ModelArgs.from_dict(params)


def test_dim_not_divisible_by_n_heads():
    with pytest.raises(ValueError, match=r"dim=4096, n_heads=30 \(dim % n_heads = 16\)"):
        ModelArgs.from_dict({**RELEASED["3.1-8B"], "n_heads": 30})


def test_n_heads_not_divisible_by_n_kv_heads():
    with pytest.raises(ValueError, match=r"n_heads=32, n_kv_heads=6 \(n_heads % n_kv_heads = 2\)"):
        ModelArgs.from_dict({**RELEASED["3.1-8B"], "n_kv_heads": 6})


def test_odd_head_dim():
    with pytest.raises(ValueError, match=r"head_dim = dim / n_heads = 3 must be even"):
        ModelArgs(dim=12, n_layers=1, n_heads=4, vocab_size=8)


def test_params_json_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"params file not found: .*params\.json"):
        ModelArgs.load(tmp_path / "params.json")


def test_params_json_invalid(tmp_path):
    path = tmp_path / "params.json"
    path.write_text('{"dim": 4096,')
    with pytest.raises(ValueError, match=r"params\.json: not valid JSON"):
        ModelArgs.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"params\.json: expected a JSON object, got list"):
        ModelArgs.load(path)


def test_load_errors_name_the_file(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({**RELEASED["3.1-8B"], "bogus": 1}))
    with pytest.raises(ValueError, match=rf"{path}: unknown key\(s\) \['bogus'\]"):
        ModelArgs.load(path)
