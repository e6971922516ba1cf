"""Every fast path against the plain path it replaces: same greedy tokens, same logprobs within dtype noise.

The fast paths (see benchmarks/README.md for what each one buys):
- ``Linear`` with ``compute_dtype=float32``: 16-bit weights multiplied in float32 (bf16 matrix-vector
  kernel for one row, blocks widened to float32 for more rows, multiply + sum under torch.compile);
- prefill attention through ``F.scaled_dot_product_attention``, one-token attention in float32;
- the static-shape decode step (``start_pos`` as a tensor, attention over the whole cache with a
  position mask) and its ``torch.compile`` (``Llama(..., compile=True)``);
- top-p without a full sort is tested in test_sampling.py.

Greedy tokens are compared on weights with clear winners (``decisive_model``): with plain random
weights the top two logits are often within bf16 rounding of each other, and any change of kernel
flips them. Logprobs are compared as numbers, within the noise of the dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from llama.checkpoint import random_state_dict
from llama.generation import Llama
from llama.model import Linear, ModelArgs, Transformer, causal_mask, grouped_attention

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, use_scaled_rope=True)
BF16_LOGPROB_TOL = 0.05  # nats; bf16 against float32 differs by up to ~0.02 on these weights


pytestmark = pytest.mark.usefixtures("one_thread")


def decisive_model(dtype: torch.dtype, max_batch: int = 3, max_seq_len: int = 48, seed: int = 0) -> Transformer:
    """Random weights whose greedy choices have margins far above bf16 rounding.

    Each token's embedding (scaled to unit variance) is also the output row of its successor in a
    random permutation, and the blocks' output projections are halved: the next token follows the
    chain, by a logit margin of ~5, while attention and the feed-forward still move every logprob.
    """
    sd = random_state_dict(ARGS, seed=seed, dtype=torch.float32)
    successor = torch.randperm(ARGS.vocab_size, generator=torch.Generator().manual_seed(seed + 1))
    sd["tok_embeddings.weight"] *= ARGS.dim**0.5
    sd["output.weight"][successor] = 0.12 * sd["tok_embeddings.weight"]
    for i in range(ARGS.n_layers):
        sd[f"layers.{i}.attention.wo.weight"] *= 0.5
        sd[f"layers.{i}.feed_forward.w2.weight"] *= 0.5
    model = Transformer(ARGS, device="meta")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    model.setup_cache(max_batch, max_seq_len)
    return model.eval()


def prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, ARGS.vocab_size, (n,), generator=g).tolist() for n in lengths]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------
# Components


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_in_float32_matches_plain(rows, dtype, monkeypatch):
    """Widened blocks (a remainder block included) and the one-row kernel: the plain product, rounded alike."""
    monkeypatch.setattr(Linear, "WIDEN_BLOCK", 7 * 96)  # 7 rows per block: 14 blocks, the last one shorter
    g = torch.Generator().manual_seed(rows)
    layer = Linear(96, 95, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(95, 96, generator=g))
    x = torch.randn(1, rows, 96, generator=g).to(dtype)  # one row: the matrix-vector kernel
    exact = x.double() @ layer.weight.double().T
    plain = layer(x)
    layer.compute_dtype = torch.float32
    fast = layer(x)
    layer.widen_buffer = torch.full((Linear.WIDEN_BLOCK,), float("nan"))  # as set_compute_dtype shares it
    assert torch.equal(layer(x), fast)
    assert fast.dtype == plain.dtype == dtype and fast.shape == (1, rows, 95)
    # Both accumulate in float32 and round once to the 16-bit dtype: at most one rounding step apart.
    eps = torch.finfo(dtype).eps
    assert ((fast.double() - exact).abs() <= eps * exact.abs() + 1e-3).all()
    assert ((fast.double() - plain.double()).abs() <= 2 * eps * exact.abs() + 1e-3).all()


def test_linear_under_compile_is_multiply_sum():
    """The compiled decode step's formulation (weights widened in registers) against the plain product."""
    layer = Linear(64, 48, dtype=torch.bfloat16)
    layer.compute_dtype = torch.float32
    x = torch.randn(3, 1, 64).bfloat16()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with torch.no_grad():
        ref = x.double() @ layer.weight.double().T
        out = compiled(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 1, 48)
    assert rel_err(out, ref) < 2 * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("start_pos,seqlen", [(0, 7), (5, 4)])
def test_sdpa_prefill_matches_grouped_attention(start_pos, seqlen):
    """Prefill attention uses SDPA (enable_gqa); the plain path is grouped_attention."""
    g = torch.Generator().manual_seed(seqlen)
    total = start_pos + seqlen
    q = torch.randn(2, 8, seqlen, 16, generator=g)
    k, v = torch.randn(2, 2, total, 16, generator=g), torch.randn(2, 2, total, 16, generator=g)
    mask = causal_mask(start_pos, seqlen, total)
    ref = grouped_attention(q, k, v, start_pos)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if start_pos == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_static_decode_step_equals_eager():
    """start_pos as a tensor (whole cache, position mask) gives the eager step's logits."""
    model = decisive_model(torch.float32)
    tokens = torch.tensor(prompts(12, 12, seed=1))
    with torch.inference_mode():
        full = model(tokens)
        model(tokens[:, :8], 0)
        steps = [model(tokens[:, p : p + 1], torch.tensor(p)) for p in range(8, 12)]
    assert rel_err(torch.cat(steps, dim=1), full[:, 8:]) < 1e-5


def test_set_compute_dtype_reaches_every_matmul():
    model = decisive_model(torch.bfloat16)
    model.set_compute_dtype(torch.float32)
    owners = [m for m in model.modules() if hasattr(m, "compute_dtype")]
    assert len(owners) == ARGS.n_layers * 8 + 1  # 7 linears + attention per block, and the output
    assert all(m.compute_dtype == torch.float32 for m in owners)
    linears = [m for m in owners if isinstance(m, Linear)]
    assert linears[0].widen_buffer is not None
    assert all(m.widen_buffer is linears[0].widen_buffer for m in linears)  # one widening buffer, shared
    model.set_compute_dtype(None)
    assert all(m.compute_dtype is None for m in owners)


# ---------------------------------------------------------------------------------------------
# Generation: fast against plain


def generate(llm: Llama, batch: list[list[int]], n: int = 12) -> tuple[list[list[int]], list[list[float]]]:
    return llm.generate(batch, max_gen_len=n, temperature=0.0, logprobs=True)


def test_bf16_in_float32_generates_like_plain_bf16(tokenizer):
    """The CPU default for bf16 weights (float32 compute) against bf16 throughout."""
    model = decisive_model(torch.bfloat16)
    batch = prompts(9, 5, 14, seed=2)
    model.set_compute_dtype(None)
    plain_tokens, plain_lp = generate(Llama(model, tokenizer), batch)
    model.set_compute_dtype(torch.float32)
    fast_tokens, fast_lp = generate(Llama(model, tokenizer), batch)
    assert fast_tokens == plain_tokens
    for a, b in zip(fast_lp, plain_lp):
        assert max(abs(x - y) for x, y in zip(a, b)) < BF16_LOGPROB_TOL


def test_fast_paths_agree_with_float32_reference(tokenizer):
    """bf16 with every fast path stays within bf16 noise of the same weights in float32."""
    batch = prompts(9, 5, 14, seed=3)
    ref_tokens, ref_lp = generate(Llama(decisive_model(torch.float32), tokenizer), batch)
    model = decisive_model(torch.bfloat16)
    model.set_compute_dtype(torch.float32)
    tokens, lp = generate(Llama(model, tokenizer), batch)
    assert tokens == ref_tokens
    for a, b in zip(lp, ref_lp):
        assert max(abs(x - y) for x, y in zip(a, b)) < BF16_LOGPROB_TOL


def _compile_works() -> bool:
    try:
        torch.compile(lambda x: x + 1, fullgraph=True)(torch.zeros(2))
        return True
    except Exception:  # no C++ compiler, unsupported platform...
        return False


@pytest.mark.skipif(not _compile_works(), reason="torch.compile cannot build kernels here (no working C++ toolchain)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_decode_generates_like_eager(tokenizer, dtype):
    """Llama(compile=True): one graph serves every position (a recompile is an error here), and
    its greedy tokens and logprobs equal eager decoding's. bf16 runs with float32 compute (the CPU
    default), which compiles ``Linear`` as multiply + sum; float32 compiles plain matmuls. Prompts
    of different lengths: rows start decoding at different positions while the shortest prefills."""
    model = decisive_model(dtype)
    if dtype == torch.bfloat16:
        model.set_compute_dtype(torch.float32)
    batch = prompts(9, 5, 14, seed=4)
    eager_tokens, eager_lp = generate(Llama(model, tokenizer), batch, n=16)
    torch._dynamo.reset()
    compiled = Llama(model, tokenizer, compile=True)
    step, calls = compiled.decode_step, []
    compiled.decode_step = lambda *args, **kwargs: calls.append(1) or step(*args, **kwargs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        tokens, lp = generate(compiled, batch, n=16)
        again, _ = generate(compiled, prompts(3, 7, 11, seed=5), n=8)  # new prompts, same graph
    assert len(calls) == 16 + 14 - 5 - 1 + 8 + 11 - 3 - 1  # every one-token step, in both calls
    assert tokens == eager_tokens
    tol = BF16_LOGPROB_TOL if dtype == torch.bfloat16 else 1e-4
    for a, b in zip(lp, eager_lp):
        assert max(abs(x - y) for x, y in zip(a, b)) < tol
    assert [len(row) for row in again] == [8, 8, 8]
