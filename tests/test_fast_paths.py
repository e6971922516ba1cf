"""Every fast path against the plain path it replaces: same greedy tokens, same logprobs within dtype noise.

The fast paths (see benchmarks/README.md for what each one buys):
- ``FastLinear`` with ``compute_dtype=float32`` (llama/fast.py): 16-bit weights multiplied in float32
  (torch's matrix-vector kernel for one row, blocks widened to float32 for more rows, multiply + sum
  under torch.compile);
- ``DecodeAttention``: one-token attention as two grouped matmuls, in float32; prefill attention
  stays the model's ``F.scaled_dot_product_attention``;
- the static-shape decode step (``start_pos`` as a tensor, attention over the whole cache with a
  position mask) and its ``torch.compile`` (``Llama(..., compile=True)``);
- top-p without a full sort is tested in test_sampling.py.

Greedy tokens are compared on weights with clear winners (``decisive_model``): with plain random
weights the top two logits are often within bf16 rounding of each other, and any change of kernel
flips them. Logprobs are compared as numbers, within the noise of the dtype.
"""

import dataclasses
import os
import time

import pytest
import torch
from torch import nn

from llama.checkpoint import random_state_dict
from llama.fast import DecodeAttention, FastLinear, apply_fast_paths
from llama.generation import Llama
from llama.model import (
    Attention,
    KVCache,
    ModelArgs,
    Transformer,
    apply_rope,
    causal_mask,
    rope_cos_sin,
    rope_frequencies,
)
from llama.quantize import quantize_model

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


@pytest.mark.parametrize("rows", [3, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_in_float32_matches_plain(rows, dtype, monkeypatch):
    """Widened blocks (a remainder block included): the plain product, rounded alike. (One row runs
    the plain product itself: ``test_linear_sums_in_float32`` checks what it must compute.)"""
    monkeypatch.setattr(FastLinear, "WIDEN_BLOCK", 7 * 96)  # 7 rows per block: 14 blocks, the last one shorter
    g = torch.Generator().manual_seed(rows)
    layer = FastLinear(96, 95, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(95, 96, generator=g))
    x = torch.randn(1, rows, 96, generator=g).to(dtype)
    exact = x.double() @ layer.weight.double().T
    plain = layer(x)
    layer.compute_dtype = torch.float32
    fast = layer(x)
    layer.widen_buffer = torch.full((FastLinear.WIDEN_BLOCK,), float("nan"))  # as apply_fast_paths shares it
    assert torch.equal(layer(x), fast)
    assert fast.dtype == plain.dtype == dtype and fast.shape == (1, rows, 95)
    # Both accumulate in float32 and round once to the 16-bit dtype: at most one rounding step apart.
    eps = torch.finfo(dtype).eps
    assert ((fast.double() - exact).abs() <= eps * exact.abs() + 1e-3).all()
    assert ((fast.double() - plain.double()).abs() <= 2 * eps * exact.abs() + 1e-3).all()


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_sums_in_float32(rows, dtype):
    """Every path, the one-row matrix-vector product included, sums in float32 and rounds once.

    4096 products of 1 x 1 sum to 4096 exactly in float32 (and 4096 is a 16-bit number), while a
    16-bit running sum stops growing at 256 (bf16) or 2048 (fp16). Random rows must also land
    within one rounding step of the float64 product.
    """
    layer = FastLinear(4096, 8, bias=False, dtype=dtype)
    layer.compute_dtype = torch.float32
    with torch.no_grad():
        layer.weight.fill_(1.0)
        out = layer(torch.ones(1, rows, 4096, dtype=dtype))
    assert out.dtype == dtype and torch.equal(out, torch.full((1, rows, 8), 4096.0, dtype=dtype))
    g = torch.Generator().manual_seed(rows)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 4096, generator=g))
        x = torch.randn(1, rows, 4096, generator=g).to(dtype)
        out = layer(x)
    exact = x.double() @ layer.weight.double().T
    assert ((out.double() - exact).abs() <= torch.finfo(dtype).eps * exact.abs() + 1e-3).all()


@pytest.mark.slow
def test_linear_under_compile_is_multiply_sum():
    """The compiled decode step's formulation (weights widened in registers) against the plain product."""
    layer = FastLinear(64, 48, bias=False, dtype=torch.bfloat16)
    layer.compute_dtype = torch.float32
    x = torch.randn(3, 1, 64).bfloat16()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with torch.no_grad():
        ref = x.double() @ layer.weight.double().T
        out = compiled(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 1, 48)
    assert rel_err(out, ref) < 2 * torch.finfo(torch.bfloat16).eps


def attention_reference(layer: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Causal attention of a whole sequence x [B, T, dim] in float64, K/V heads repeated for their query heads."""
    bsz, total, _ = x.shape
    hd = ARGS.head_dim
    w = {name: getattr(layer, name).weight.double() for name in ("wq", "wk", "wv", "wo")}
    q = apply_rope((x @ w["wq"].T).view(bsz, total, -1, hd), cos, sin).transpose(1, 2)  # [B, Hq, T, hd]
    k = apply_rope((x @ w["wk"].T).view(bsz, total, -1, hd), cos, sin).transpose(1, 2)  # [B, Hkv, T, hd]
    v = (x @ w["wv"].T).view(bsz, total, -1, hd).transpose(1, 2)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) / hd**0.5  # [B, Hq, T, T]
    visible = torch.ones(total, total, dtype=torch.bool).tril()
    out = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v  # [B, Hq, T, hd]
    return out.transpose(1, 2).reshape(bsz, total, -1) @ w["wo"].T


@pytest.mark.parametrize("fast", [False, True])
def test_attention_forward_matches_float64(fast):
    """``Attention.forward`` through every path Transformer uses: a prompt from position 0 (causal
    SDPA), a chunk after cached positions (SDPA with a mask), eager one-token steps (SDPA over the
    cache, or DecodeAttention's grouped matmuls) and the static-shape step (start_pos a tensor)."""
    torch.manual_seed(0)
    layer = Attention(ARGS).eval()
    if fast:
        model = Transformer(dataclasses.replace(ARGS, n_layers=1))
        model.layers[0].attention = layer
        apply_fast_paths(model)
        layer = model.layers[0].attention
        assert isinstance(layer, DecodeAttention)
    total, chunk, static = 12, (5, 9), 10  # prompt 0..4, chunk 5..8, eager steps 9, static steps 10, 11
    x = torch.randn(2, total, ARGS.dim)
    cos, sin = rope_cos_sin(rope_frequencies(ARGS), torch.arange(total))
    ref = attention_reference(layer, x.double(), cos, sin)
    with torch.inference_mode():
        whole = layer(x, cos, sin, 0)  # no cache: the whole sequence at once
        layer.cache = KVCache(2, total, ARGS.n_kv_heads, ARGS.head_dim, None, torch.float32)
        outs = [layer(x[:, : chunk[0]], cos[: chunk[0]], sin[: chunk[0]], 0)]
        mask = causal_mask(chunk[0], chunk[1] - chunk[0], chunk[1])
        outs.append(layer(x[:, chunk[0] : chunk[1]], cos[chunk[0] : chunk[1]], sin[chunk[0] : chunk[1]], chunk[0], mask))
        for p in range(chunk[1], static):
            outs.append(layer(x[:, p : p + 1], cos[p : p + 1], sin[p : p + 1], p))
        for p in range(static, total):
            mask = causal_mask(torch.tensor(p), 1, total)
            outs.append(layer(x[:, p : p + 1], cos[p : p + 1], sin[p : p + 1], torch.tensor(p), mask))
    assert rel_err(whole, ref) < 1e-5
    assert rel_err(torch.cat(outs, dim=1), ref) < 1e-5


def test_static_decode_step_equals_eager():
    """start_pos as a tensor (whole cache, position mask) gives the eager step's logits."""
    model = decisive_model(torch.float32)
    tokens = torch.tensor(prompts(12, 12, seed=1))
    with torch.inference_mode():
        full = model(tokens)
        model(tokens[:, :8], 0)
        steps = [model(tokens[:, p : p + 1], torch.tensor(p)) for p in range(8, 12)]
    assert rel_err(torch.cat(steps, dim=1), full[:, 8:]) < 1e-5


def test_apply_fast_paths_reaches_every_matmul():
    model = decisive_model(torch.bfloat16)
    apply_fast_paths(model, torch.float32)
    owners = [m for m in model.modules() if isinstance(m, (FastLinear, DecodeAttention))]
    assert len(owners) == ARGS.n_layers * 8 + 1  # 7 linears + attention per block, and the output
    assert not [m for m in model.modules() if isinstance(m, nn.Linear) and not isinstance(m, FastLinear)]
    assert all(m.compute_dtype == torch.float32 for m in owners)
    linears = [m for m in owners if isinstance(m, FastLinear)]
    assert linears[0].widen_buffer is not None
    assert all(m.widen_buffer is linears[0].widen_buffer for m in linears)  # one widening buffer, shared
    assert model.layers[0].attention.cache is not None  # the swapped attention keeps the cache
    apply_fast_paths(model, None)
    assert all(m.compute_dtype is None for m in owners)


def fake_cpu(monkeypatch, bf16_s: float, float32_s: float) -> list:
    """A CPU on which a pass of the prompt probe takes bf16_s seconds on torch's bf16 path and
    float32_s on the widened float32 path; returns the list of (path, rows) timed."""
    from llama import fast

    timed = []

    def seconds(layers, x):
        timed.append(("float32" if layers[0].compute_dtype == torch.float32 else "bf16", x.shape[0]))
        return float32_s if layers[0].compute_dtype == torch.float32 else bf16_s

    monkeypatch.setattr(fast, "PROBE_SHAPE", (256, 64))  # small weights: nothing is really timed
    monkeypatch.setattr(fast, "_product_seconds", seconds)
    return timed


@pytest.mark.parametrize("bf16_s,float32_s,expected", [(0.1, 0.6, "bf16"), (0.6, 0.1, "float32"), (0.11, 0.1, "float32")])
def test_prompt_path_is_the_faster_one(monkeypatch, bf16_s, float32_s, expected):
    """The probe picks the path that multiplies a prompt faster; a clear winner after one round
    ends it, a close race runs every round (warm-ups of 8 rows first, then PROMPT_ROWS rows)."""
    from llama import fast

    timed = fake_cpu(monkeypatch, bf16_s, float32_s)
    assert fast.measure_prompt_path(rounds=3) == expected
    rounds = 1 if max(bf16_s, float32_s) > 1.5 * min(bf16_s, float32_s) else 3
    assert timed == [("bf16", 8), ("float32", 8)] + [("bf16", fast.PROMPT_ROWS), ("float32", fast.PROMPT_ROWS)] * rounds


def test_prompt_path_kept_overridden_and_refused(tmp_path, monkeypatch):
    """The verdict is kept beside the kernels and read back without measuring; not kept when the
    machine is busier than its cores or other processes used a fifth of a core while it measured,
    nor trusted when damaged; LLAMA_PROMPT_PATH overrides it."""
    from llama import fast

    fake_cpu(monkeypatch, 0.6, 0.1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LLAMA_PROMPT_PATH", raising=False)
    folder = tmp_path / "llama" / "native"
    monkeypatch.setattr(fast.os, "getloadavg", lambda: (99.0, 0.0, 0.0))
    fast._cached_prompt_path.cache_clear()
    assert fast.prompt_compute_dtype() == torch.float32
    assert not folder.exists()  # measured on a busy machine: used, not kept
    monkeypatch.setattr(fast.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(fast, "cores_used_elsewhere", lambda fn: (fn(), 0.5))  # half a core used by others meanwhile
    fast._cached_prompt_path.cache_clear()
    assert fast.prompt_compute_dtype() == torch.float32
    assert not folder.exists()  # a quiet load average, but someone else worked during the probe
    monkeypatch.setattr(fast, "cores_used_elsewhere", lambda fn: (fn(), 0.0))  # a quiet machine (this one may not be)
    fast._cached_prompt_path.cache_clear()
    assert fast.prompt_compute_dtype() == torch.float32
    (kept,) = folder.glob("prompt-path-*.json")
    fast._cached_prompt_path.cache_clear()
    monkeypatch.setattr(fast, "measure_prompt_path", lambda: pytest.fail("measured again"))
    assert fast.prompt_compute_dtype() == torch.float32
    kept.write_text(kept.read_text().replace("float32", "float64"))  # damaged: measured again
    fast._cached_prompt_path.cache_clear()
    monkeypatch.setattr(fast, "measure_prompt_path", lambda: "bf16")
    assert fast.prompt_compute_dtype() is None
    monkeypatch.setenv("LLAMA_PROMPT_PATH", "float32")
    assert fast.prompt_compute_dtype() == torch.float32
    monkeypatch.setenv("LLAMA_PROMPT_PATH", "bf16")
    assert fast.prompt_compute_dtype() is None
    monkeypatch.setenv("LLAMA_PROMPT_PATH", "fp32")
    with pytest.raises(ValueError, match=r"^LLAMA_PROMPT_PATH='fp32': use bf16 .* or float32 [^\n]*$"):
        fast.prompt_compute_dtype()
    fast._cached_prompt_path.cache_clear()


class FakeLoops:
    """A bf16 kernel with two loops whose 8-row products take the given seconds (slept), and which
    records the loop of each call."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds, self.variants, self.variant, self.calls = seconds, ["avx2", "avx512bf16"], "avx2", []

    def use_variant(self, name: str) -> None:
        self.variant = name

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.variant, x.shape[0]))
        time.sleep(self.seconds[self.variant])
        return x.new_zeros(x.shape[0], w.shape[0])


@pytest.mark.parametrize("avx2_s,bf16_s,expected", [(0.01, 0.006, "avx512bf16"), (0.01, 0.0095, "avx2"), (0.006, 0.01, "avx2")])
def test_bf16_loop_is_the_measured_faster_one(monkeypatch, avx2_s, bf16_s, expected):
    """The AVX512-BF16 loop is taken when 8 rows run at most 0.9x the AVX2 loop's time (a measurement,
    not the CPU flag); both loops in turn each round after a warm-up round, the kernel left on the
    loop it had."""
    from llama import fast

    monkeypatch.setattr(fast, "PROBE_SHAPE", (256, 64))
    loops = FakeLoops({"avx2": avx2_s, "avx512bf16": bf16_s})
    assert fast.measure_bf16_loop(loops, reps=2) == expected and loops.variant == "avx2"
    per_round = [("avx2", 8)] * 2 + [("avx512bf16", 8)] * 2  # two probe matrices
    assert loops.calls == per_round * 3
    assert fast.pick_bf16_loop({"avx2": 1.0, "avx512bf16": 0.9}) == "avx512bf16"
    assert fast.pick_bf16_loop({"avx2": 1.0, "avx512bf16": 0.91}) == "avx2"


def test_bf16_loop_kept_forced_and_only_for_bf16_activations(tmp_path, monkeypatch):
    """Kept beside the kernels (read back without measuring); LLAMA_BF16_KERNEL wins; a CPU without
    the loop, or float32 activations (which the loop would round to bf16), get AVX2's; and the rows
    our kernel takes are measured for the loop that runs (a verdict per loop)."""
    from llama import fast

    monkeypatch.setattr(fast, "PROBE_SHAPE", (256, 64))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LLAMA_BF16_KERNEL", raising=False)
    monkeypatch.setattr(fast.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(fast, "cores_used_elsewhere", lambda fn: (fn(), 0.0))  # a quiet machine (this one may not be)
    loops = FakeLoops({"avx2": 0.004, "avx512bf16": 0.001})
    fast._cached_bf16_loop.cache_clear()
    assert fast.bf16_loop(loops, None) == "avx512bf16"
    assert len(list((tmp_path / "llama" / "native").glob("bf16-loop-*.json"))) == 1
    fast._cached_bf16_loop.cache_clear()
    monkeypatch.setattr(fast, "measure_bf16_loop", lambda *a: pytest.fail("measured again"))
    assert fast.bf16_loop(loops, None) == "avx512bf16"
    assert fast.bf16_loop(loops, torch.float32) == "avx2"
    loops.variants = ["avx2", "avx512"]
    assert fast.bf16_loop(loops, None) == "avx2"
    monkeypatch.setenv("LLAMA_BF16_KERNEL", "avx512")
    loops.variant = "avx512"  # what native.bf16_variant set at load
    assert fast.bf16_loop(loops, None) == "avx512"
    fast._cached_bf16_loop.cache_clear()
    monkeypatch.setattr(fast, "measure_matvec_rows", lambda matvec, dtype: {"avx2": 4, "avx512bf16": 8}[matvec.variant])
    fast._cached_matvec_rows.cache_clear()
    for loop, rows in (("avx2", 4), ("avx512bf16", 8), ("avx2", 4)):
        loops.variant = loop
        assert fast.matvec_rows(loops, None) == rows
    fast._cached_matvec_rows.cache_clear()


class FakeInt8Loops(FakeLoops):
    """FakeLoops with the int8 kernel's call (x, q, scale)."""

    def __call__(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        assert q.dtype == torch.int8 and scale.shape == (q.shape[0],) and x.dtype == torch.bfloat16
        return super().__call__(x, q)


@pytest.mark.parametrize("avx2_s,bf16_s,expected", [(0.01, 0.006, "avx512bf16"), (0.01, 0.0095, "avx2")])
def test_int8_loop_is_the_measured_faster_one_kept_and_forced(tmp_path, monkeypatch, avx2_s, bf16_s, expected):
    """The int8 loops race as the bf16 ones (8 bf16 rows through the probe's matrices quantized, the
    same 0.9x rule); the verdict is kept beside the kernels; LLAMA_INT8_KERNEL, or a CPU without the
    loop, keep the loop the kernels loaded with."""
    from llama import fast

    monkeypatch.setattr(fast, "PROBE_SHAPE", (256, 64))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("LLAMA_INT8_KERNEL", raising=False)
    monkeypatch.setattr(fast.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(fast, "cores_used_elsewhere", lambda fn: (fn(), 0.0))  # a quiet machine (this one may not be)
    loops = FakeInt8Loops({"avx2": avx2_s, "avx512bf16": bf16_s})
    fast._cached_int8_loop.cache_clear()
    try:
        assert fast.int8_loop(loops) == expected and loops.variant == "avx2"
        assert loops.calls == ([("avx2", 8)] * 2 + [("avx512bf16", 8)] * 2) * 6
        assert len(list((tmp_path / "llama" / "native").glob("int8-loop-*.json"))) == 1
        fast._cached_int8_loop.cache_clear()
        monkeypatch.setattr(fast, "measure_int8_loop", lambda *a: pytest.fail("measured again"))
        assert fast.int8_loop(loops) == expected
        monkeypatch.setenv("LLAMA_INT8_KERNEL", "avx512")
        loops.variant = "avx512"  # what native.int8_variant set at load
        assert fast.int8_loop(loops) == "avx512"
        monkeypatch.delenv("LLAMA_INT8_KERNEL")
        loops.variants, loops.variant = ["avx2", "avx512"], "avx2"
        assert fast.int8_loop(loops) == "avx2"
    finally:
        fast._cached_int8_loop.cache_clear()


@pytest.mark.parametrize("measured,busy", [(None, False), (torch.float32, True)])
def test_speed_up_takes_the_measured_prompt_path(monkeypatch, measured, busy):
    """bf16 weights on the CPU: the probe's verdict, whatever the CPU's bf16 flag says; the kernel's
    rows are measured against that path, both with the threads generation would use now (one
    while other processes hold every core), and torch's count is back afterwards. fp16 weights
    keep the flag rule and run no probe."""
    from llama import devices, fast

    monkeypatch.setattr(devices, "runnable_elsewhere", lambda: 64 if busy else 0)
    threads = []
    monkeypatch.setattr(fast, "prompt_compute_dtype", lambda: threads.append(torch.get_num_threads()) or measured)
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: measured is not None)  # the flag says the opposite
    asked = []
    monkeypatch.setattr(fast, "matvec_rows", lambda matvec, dtype: asked.append((dtype, torch.get_num_threads(), matvec.variant)) or 3)
    monkeypatch.setattr(fast, "bf16_loop", lambda matvec, dtype: asked.append(("loop", dtype)) or "avx2")
    monkeypatch.setattr(fast, "int8_loop", lambda int8_matvec: asked.append("int8 loop") or int8_matvec.variant)
    torch.set_num_threads(2)  # the module runs on one thread (one_thread)
    try:
        model = fast.speed_up(decisive_model(torch.bfloat16))
        assert torch.get_num_threads() == 2
        quantized = decisive_model(torch.bfloat16)
        quantize_model(quantized)
        fast.speed_up(quantized)
    finally:
        torch.set_num_threads(1)
    expected_threads = 1 if busy else min(2, os.cpu_count() or 1)
    if fast.native.kernels() is not None:  # only a model with int8 layers races the int8 loops
        assert asked[2:] == [("loop", measured), (measured, expected_threads, "avx2"), "int8 loop"]
        del asked[2:]
    threads = threads[:1]
    assert threads == [expected_threads]
    assert all(m.compute_dtype == measured for m in model.modules() if isinstance(m, (FastLinear, DecodeAttention)))
    if fast.native.kernels() is not None:
        assert asked == [("loop", measured), (measured, expected_threads, "avx2")] and model.output.matvec_rows == 3
    monkeypatch.setattr(fast, "prompt_compute_dtype", lambda: pytest.fail("probed for fp16 weights"))
    model = fast.speed_up(decisive_model(torch.float16))
    expected = None if measured is not None else torch.float32  # the flag's rule
    assert all(m.compute_dtype == expected for m in model.modules() if isinstance(m, FastLinear))


# ---------------------------------------------------------------------------------------------
# Generation: fast against plain


def generate(llm: Llama, batch: list[list[int]], n: int = 12) -> tuple[list[list[int]], list[list[float]]]:
    return llm.generate(batch, max_gen_len=n, temperature=0.0, logprobs=True)


def test_bf16_in_float32_generates_like_plain_bf16(tokenizer):
    """The CPU default for bf16 weights (float32 compute) against bf16 throughout."""
    model = decisive_model(torch.bfloat16)
    batch = prompts(9, 5, 14, seed=2)
    apply_fast_paths(model, None)
    plain_tokens, plain_lp = generate(Llama(model, tokenizer), batch)
    apply_fast_paths(model, torch.float32)
    fast_tokens, fast_lp = generate(Llama(model, tokenizer), batch)
    assert fast_tokens == plain_tokens
    for a, b in zip(fast_lp, plain_lp):
        assert max(abs(x - y) for x, y in zip(a, b)) < BF16_LOGPROB_TOL


def test_fast_paths_agree_with_float32_reference(tokenizer):
    """bf16 with every fast path stays within bf16 noise of the same weights in float32."""
    batch = prompts(9, 5, 14, seed=3)
    ref_tokens, ref_lp = generate(Llama(decisive_model(torch.float32), tokenizer), batch)
    model = decisive_model(torch.bfloat16)
    apply_fast_paths(model, torch.float32)
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


@pytest.mark.slow
@pytest.mark.skipif(not _compile_works(), reason="torch.compile cannot build kernels here (no working C++ toolchain)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_decode_generates_like_eager(tokenizer, dtype):
    """Llama(compile=True): one graph serves every position (a recompile is an error here), and
    its greedy tokens and logprobs equal eager decoding's. bf16 runs with float32 compute (the CPU
    default), which compiles ``FastLinear`` as multiply + sum; float32 compiles plain matmuls. Prompts
    of different lengths: rows start decoding at different positions while the shortest prefills."""
    model = decisive_model(dtype)
    if dtype == torch.bfloat16:
        apply_fast_paths(model, torch.float32)
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
