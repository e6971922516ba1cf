"""The fused decode step (llama/fused.py, llama/csrc/decode_layer.c) against the plain model.

References: the plain bf16 block (llama/model.py, no fast path), the per-operator fast paths it
replaces (llama/fast.py, the same kernels for products and attention), and a float64 block written
here. The fused step rounds to bf16 where the plain model rounds, so against the fast paths it
should agree to the bit on almost every value (only float32 summation order differs: the RMSNorm's
sum of squares), and against float64 it should be no further off than the plain bf16 block is.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from llama import fused, native
from llama.checkpoint import random_state_dict
from llama.fast import FastLinear, apply_fast_paths, speed_up
from llama.generation import Llama
from llama.model import ModelArgs, Transformer, TransformerBlock
from llama.quantize import Int8Linear, quantize_model

from test_native import EXPECTED

ARGS = {
    # Llama 3 style: grouped K/V heads, sizes multiples of 16.
    "gqa": ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=64),
    "mha": ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=256, multiple_of=64),
    # Tails everywhere: dim 90 (K % 16 = 10), head_dim 30 (not a multiple of 8), 3 query heads per
    # KV head (the demo model's group), an FFN width of 211 rows (odd: not a multiple of the 4-row block).
    "odd": ModelArgs(dim=90, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=256, multiple_of=1, ffn_dim_multiplier=1.76),
    # The demo model's block (SmolLM2-135M: 9 heads over 3 KV heads of 64), two layers.
    "demo": ModelArgs(dim=576, n_layers=2, n_heads=9, n_kv_heads=3, vocab_size=256, multiple_of=256, rope_theta=100000.0),
}


@pytest.fixture(scope="module")
def lib():
    found = native.library()
    if found is None:
        assert not EXPECTED, "the native kernels should build on x86-64 Linux with AVX2 and cc"
        pytest.skip("the native kernels do not apply to this machine")
    return found


def model_for(args: ModelArgs, max_batch: int = 3, max_seq_len: int = 40, seed: int = 0) -> Transformer:
    model = Transformer(args, device="meta")
    model.load_state_dict(random_state_dict(args, seed=seed, dtype=torch.bfloat16), strict=True, assign=True)
    model.setup_cache(max_batch, max_seq_len)
    return model.eval()


def fused_model(args: ModelArgs, **kw) -> Transformer:
    """The fast paths as ``speed_up`` sets them on a CPU with the kernels, plus the fused blocks."""
    kernels = native.kernels()
    model = apply_fast_paths(model_for(args, **kw), torch.float32, kernels.matvec, native.MAX_ROWS, kernels.attention)
    return fused.apply_fused(model, (torch.nn.Linear, FastLinear))


@pytest.fixture
def calls(monkeypatch):
    """The C calls of the fused step (``fused.run``): one entry per block run, its position; and
    ``calls.sizes``, the number of blocks in each call."""
    counted = Calls()
    real = fused.run

    def counting(workspace, layers, x, cos, sin, start_pos, head=None):
        counted.extend([start_pos] * len(layers))
        counted.sizes.append(len(layers))
        counted.heads.append(head is not None)
        return real(workspace, layers, x, cos, sin, start_pos, head)

    monkeypatch.setattr(fused, "run", counting)
    return counted


class Calls(list):
    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []  # blocks per call
        self.heads: list[bool] = []  # whether the call computed the logits too


def decode(model: Transformer, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits [B, steps, vocab] of one-token steps after a prefill of ``prompt_len`` tokens."""
    with torch.inference_mode():
        model(tokens[:, :prompt_len], 0)
        steps = [model(tokens[:, p : p + 1], p) for p in range(prompt_len, tokens.shape[1])]
    return torch.cat(steps, dim=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------
# The step against the plain model


@pytest.mark.parametrize("shape", list(ARGS))
@pytest.mark.parametrize("bsz", [1, 3])
def test_steps_match_the_unfused_model(lib, calls, shape, bsz):
    """Several steps after a prompt, up to the last position of the cache: the same logits and cache
    as the per-operator fast paths (to bf16 rounding of a few values), and within bf16 noise of the
    plain model."""
    args, max_seq = ARGS[shape], 24
    tokens = torch.randint(0, args.vocab_size, (bsz, max_seq), generator=torch.Generator().manual_seed(bsz))
    ours = fused_model(args, max_seq_len=max_seq)
    kernels = native.kernels()
    unfused = apply_fast_paths(model_for(args, max_seq_len=max_seq), torch.float32, kernels.matvec, native.MAX_ROWS, kernels.attention)
    plain = model_for(args, max_seq_len=max_seq)
    got, want, base = decode(ours, tokens, 15), decode(unfused, tokens, 15), decode(plain, tokens, 15)
    assert len(calls) == args.n_layers * (max_seq - 15)  # every block of every step took the C path
    assert calls.sizes == [args.n_layers] * (max_seq - 15) and all(calls.heads)  # one call a step, logits included
    assert calls[-1] == max_seq - 1  # the last position of the cache
    # Bit-equal but for values whose float32 sums straddle a bf16 rounding boundary.
    assert (got == want).float().mean() > 0.99 and rel_err(got, want) < 1e-2
    for a, b in zip(ours.layers, unfused.layers):
        k, k_ref = a.attention.cache.k[:bsz], b.attention.cache.k[:bsz]
        assert (k == k_ref).float().mean() > 0.99 and rel_err(k, k_ref) < 1e-2
        assert rel_err(a.attention.cache.v[:bsz], b.attention.cache.v[:bsz]) < 1e-2
    assert rel_err(got, base) < 3e-2  # the plain model: other kernels, so bf16 noise


def block_float64(block: TransformerBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int,
                  k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The block's math in float64 (no rounding): x [B, 1, dim] at ``pos``, over cached keys and
    values [B, Hkv, pos, hd] of the earlier positions."""
    attn, ffn = block.attention, block.feed_forward
    w = {n: getattr(attn, n).weight.double() for n in ("wq", "wk", "wv", "wo")}
    w |= {n: getattr(ffn, n).weight.double() for n in ("w1", "w2", "w3")}
    bsz, hd = x.shape[0], k_cache.shape[-1]

    def norm(v, weight, eps):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight.double()

    def rope(t):  # t [B, H, hd]: pairs (2i, 2i+1) rotated by the angle of pair i
        t0, t1 = t[..., 0::2], t[..., 1::2]
        c, s = cos.double().view(-1), sin.double().view(-1)
        return torch.stack((t0 * c - t1 * s, t0 * s + t1 * c), dim=-1).flatten(-2)

    xd = x.double()[:, 0]  # [B, dim]
    a = norm(xd, block.attention_norm.weight, block.attention_norm.eps)
    q = rope((a @ w["wq"].T).view(bsz, -1, hd))
    k = rope((a @ w["wk"].T).view(bsz, -1, hd))
    v = (a @ w["wv"].T).view(bsz, -1, hd)
    keys = torch.cat((k_cache.double(), k[:, :, None]), dim=2)  # [B, Hkv, pos + 1, hd]
    values = torch.cat((v_cache.double(), v[:, :, None]), dim=2)
    group = q.shape[1] // k.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    probs = torch.softmax((keys @ q[..., None])[..., 0] / math.sqrt(hd), dim=-1)  # [B, Hq, pos + 1]
    o = (probs[..., None] * values).sum(2).reshape(bsz, -1)
    h = xd + o @ w["wo"].T
    f = norm(h, block.ffn_norm.weight, block.ffn_norm.eps)
    return (h + (F.silu(f @ w["w1"].T) * (f @ w["w3"].T)) @ w["w2"].T)[:, None]


@pytest.mark.parametrize("shape", ["gqa", "odd", "demo"])
def test_block_is_as_close_to_float64_as_the_plain_block(lib, calls, shape):
    args, bsz, pos = ARGS[shape], 3, 17
    model = fused_model(args, max_seq_len=24)
    plain = model_for(args, max_seq_len=24)
    tokens = torch.randint(0, args.vocab_size, (bsz, pos), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        model(tokens, 0)
        plain(tokens, 0)
        x = (torch.randn(bsz, 1, args.dim, generator=torch.Generator().manual_seed(6))).bfloat16()
        cos, sin = model._rope_cos[pos : pos + 1], model._rope_sin[pos : pos + 1]
        block, plain_block = model.layers[1], plain.layers[1]
        cache = block.attention.cache
        ref = block_float64(block, x, cos, sin, pos, cache.k[:bsz, :, :pos], cache.v[:bsz, :, :pos])
        got = block(x, cos, sin, pos)
        base = plain_block(x, cos, sin, pos)
    assert calls == [pos] and got.dtype == torch.bfloat16 and got.shape == x.shape  # the block alone
    err, base_err = rel_err(got, ref), rel_err(base, ref)
    # bf16 rounding of ~10 chained values: a few times bf16's 2^-8; no worse than the plain block.
    assert err < 0.03 and err <= 1.5 * base_err + 1e-3, (err, base_err)
    # The step's key and value went into the cache at pos, as the plain block put its own.
    for name in ("k", "v"):
        ours, theirs = getattr(cache, name)[:bsz, :, pos], getattr(plain_block.attention.cache, name)[:bsz, :, pos]
        assert rel_err(ours, theirs) < 0.02


def test_threads_do_not_change_results(lib, calls):
    args, results = ARGS["demo"], []
    tokens = torch.randint(0, args.vocab_size, (3, 20), generator=torch.Generator().manual_seed(7))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(decode(fused_model(args, max_seq_len=20), tokens, 12))
    finally:
        torch.set_num_threads(threads)
    assert calls and torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


# ---------------------------------------------------------------------------------------------
# Generation, the switch and the fallbacks


def demo_sized(seed: int = 0) -> Transformer:
    """SmolLM2-135M's shape (30 layers, its vocabulary) with random weights."""
    args = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, rope_theta=100000.0)
    return model_for(args, max_batch=1, max_seq_len=64, seed=seed)


def test_demo_sized_greedy_tokens_equal_the_unfused_path(lib, calls, tokenizer):
    model = demo_sized()
    prompt = [[1000 + 37 * i for i in range(12)]]
    speed_up(model)
    assert isinstance(model.layers[0], fused.FusedBlock)
    ours, _ = Llama(model, tokenizer).generate(prompt, max_gen_len=32, temperature=0.0)
    assert len(calls) == 30 * 31  # every step after the prompt
    for i, block in enumerate(model.layers):  # the same model without the fused blocks
        plain = TransformerBlock.__new__(TransformerBlock)
        plain.__dict__ = dict(block.__dict__)
        model.layers[i] = plain
    theirs, _ = Llama(model, tokenizer).generate(prompt, max_gen_len=32, temperature=0.0)
    assert len(calls) == 30 * 31 and len(ours[0]) == 32
    assert ours == theirs


def test_switch_and_where_speed_up_applies_it(lib, monkeypatch):
    monkeypatch.setenv("LLAMA_FUSED", "0")
    off = speed_up(model_for(ARGS["gqa"]))
    assert type(off) is Transformer and not isinstance(off.layers[0], fused.FusedBlock)
    monkeypatch.delenv("LLAMA_FUSED")
    on = speed_up(model_for(ARGS["gqa"]))
    assert type(on) is fused.FusedTransformer and all(isinstance(b, fused.FusedBlock) for b in on.layers)
    assert not isinstance(speed_up(model_for(ARGS["gqa"]), world_size=2).layers[0], fused.FusedBlock)  # ranks
    float32 = Transformer(ARGS["gqa"])
    float32.setup_cache(1, 8)
    assert not isinstance(speed_up(float32).layers[0], fused.FusedBlock)  # not bf16


def test_speed_up_fuses_int8_models(lib, calls):
    """speed_up on an int8 model (quantize_model's): every block and the int8 output in one call."""
    model = model_for(ARGS["gqa"])
    quantize_model(model)
    speed_up(model)
    assert type(model) is fused.FusedTransformer and all(isinstance(b, fused.FusedBlock) for b in model.layers)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(8))
    got = decode(model, tokens, 8)
    assert calls.sizes == [2] * 4 and all(calls.heads) and torch.isfinite(got).all()
    assert all(b.plan.int8 for b in model.layers)


def test_other_inputs_run_the_plain_path(lib, calls):
    """Prefill, a tensor position (the compiled step's), autograd, more than 8 rows: the plain block."""
    args = ARGS["gqa"]
    model = fused_model(args, max_batch=9, max_seq_len=16)
    tokens = torch.randint(0, args.vocab_size, (9, 12), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        model(tokens[:, :8], 0)  # prefill
        model(tokens[:, 8:9], 8)  # 9 rows
        model(tokens[:3, 9:10], torch.tensor(9))  # static-shape step
    assert not calls
    with torch.no_grad():
        model(tokens[:3, 10:11], 10)
    assert calls == [10] * args.n_layers
    model(tokens[:3, 11:12], 11)  # grad mode: the plain block, which autograd can follow
    assert calls == [10] * args.n_layers


def test_compiled_step_runs_the_plain_path(lib, calls):
    """Under torch.compile (is_compiling() True while Dynamo traces) the block is the plain math."""
    args = ARGS["gqa"]
    model = fused_model(args, max_seq_len=16)
    tokens = torch.randint(0, args.vocab_size, (1, 10), generator=torch.Generator().manual_seed(10))
    with torch.inference_mode():
        model(tokens[:, :8], 0)
        original = torch.compiler.is_compiling
        torch.compiler.is_compiling = lambda: True
        try:
            out = model(tokens[:, 8:9], 8)
        finally:
            torch.compiler.is_compiling = original
    assert not calls and torch.isfinite(out).all()


def test_a_new_cache_or_weight_is_followed(lib, calls):
    """setup_cache replaces the cache, load_state_dict(assign=True) the weights: the next step uses them."""
    args = ARGS["gqa"]
    model, reference = fused_model(args, max_seq_len=16), model_for(args, max_seq_len=24, seed=1)
    model.setup_cache(3, 24)
    model.load_state_dict(reference.state_dict(), assign=True)
    tokens = torch.randint(0, args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(11))
    got, want = decode(model, tokens, 14), decode(reference, tokens, 14)
    assert len(calls) == args.n_layers * 6 and calls[-1] == 19
    assert rel_err(got, want) < 3e-2


def test_data_moved_under_the_same_tensors_is_followed(lib, calls):
    """After steps that cached the whole model's check: a weight's data replaced under the same
    Parameter (``.data =``, what ``.to()`` does) and a cache tensor replaced in the same cache module
    (a block checked by the model, and one called on its own): the next steps use the new ones, with
    the logits of a model that had them from the start."""
    args = ARGS["gqa"]
    ours, theirs = fused_model(args, max_seq_len=16), fused_model(args, max_seq_len=16)
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(27))
    decode(ours, tokens, 10)
    for model in (ours, theirs):
        w2 = model.layers[1].feed_forward.w2.weight
        w2.data = (w2.detach() * 1.5).contiguous()
        cache = model.layers[0].attention.cache
        cache.k = torch.zeros_like(cache.k)
    tokens = tokens.flip(1)  # others: the old cache holds the first run's keys
    got, want = decode(ours, tokens, 10), decode(theirs, tokens, 10)
    assert calls.sizes == [args.n_layers] * 18 and torch.equal(got, want)
    block, x = ours.layers[0], torch.randn(1, 1, args.dim, generator=torch.Generator().manual_seed(28)).bfloat16()
    angles = (ours._rope_cos[3:4], ours._rope_sin[3:4])  # position 3's
    with torch.inference_mode():
        before = block(x, *angles, 3)
        block.attention.wq.weight.data = block.attention.wq.weight.detach().flip(0).contiguous()
        after = block(x, *angles, 3)
        block.workspace, block.plan = None, None  # the plain block, for reference
        plain = block(x, *angles, 3)
    assert not torch.equal(before, after) and torch.equal(after, plain)


def test_position_past_the_cache_is_refused(lib):
    args = ARGS["gqa"]
    model = fused_model(args, max_seq_len=8)
    block = model.layers[0]
    x = torch.zeros(1, 1, args.dim, dtype=torch.bfloat16)
    cos = torch.zeros(1, args.head_dim // 2)
    with torch.inference_mode(), pytest.raises(ValueError, match="position 8"):
        block(x, cos, cos, 8)


def test_a_block_that_cannot_run_leaves_the_others_fused(lib, calls):
    """One block the C step cannot take (here a plain one): the step runs block by block, the
    others still in C, with the same logits as the unfused model."""
    args = ARGS["odd"]
    args = ModelArgs(**{**args.__dict__, "n_layers": 3})
    model, reference = fused_model(args, max_seq_len=16), model_for(args, max_seq_len=16)
    plain = TransformerBlock.__new__(TransformerBlock)
    plain.__dict__ = dict(model.layers[1].__dict__)
    model.layers[1] = plain
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(12))
    got, want = decode(model, tokens, 12), decode(reference, tokens, 12)
    assert calls.sizes == [1, 1] * 4 and rel_err(got, want) < 3e-2


def test_large_blocks_take_only_the_rows_our_products_win(lib, calls, monkeypatch):
    """Small blocks take every batch up to 8; a block over SMALL_BLOCK_BYTES only ``matvec_rows`` rows."""
    args = ARGS["gqa"]
    tokens = torch.randint(0, args.vocab_size, (3, 10), generator=torch.Generator().manual_seed(13))
    small = fused.apply_fused(model_for(args, max_seq_len=10), (torch.nn.Linear,), matvec_rows=2)
    decode(small, tokens, 9)
    assert calls.sizes == [args.n_layers]
    monkeypatch.setattr(fused, "SMALL_BLOCK_BYTES", 0)
    large = fused.apply_fused(model_for(args, max_seq_len=10), (torch.nn.Linear,), matvec_rows=2)
    decode(large, tokens, 9)  # 3 rows: the plain blocks
    assert calls.sizes == [args.n_layers]
    decode(large, tokens[:2], 9)
    assert calls.sizes == [args.n_layers] * 2


def test_an_output_layer_it_cannot_run_is_left_to_torch(lib, calls):
    """An output layer of another class (a stand-in for FP8...): the blocks still run in one
    call, the final norm and output product in torch, with the same logits."""

    class OtherLinear(torch.nn.Linear):
        pass

    args = ARGS["gqa"]
    model, reference = fused_model(args, max_seq_len=12), fused_model(args, max_seq_len=12)
    model.output.__class__ = OtherLinear
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(14))
    got = decode(model, tokens, 9)
    assert calls.heads == [False] * 3
    assert rel_err(got, decode(reference, tokens, 9)) < 1e-2 and calls.heads == [False] * 3 + [True] * 3


def test_a_module_swapped_in_after_apply_is_followed(lib, calls):
    """int8 layers swapped into half of one block after apply_fused (a mix of bf16 and int8
    projections, which the C step does not take): that block steps aside, the others stay fused."""
    args = ARGS["gqa"]
    model, reference = fused_model(args, max_seq_len=14), fused_model(args, max_seq_len=14)
    tokens = torch.randint(0, args.vocab_size, (1, 14), generator=torch.Generator().manual_seed(15))
    decode(model, tokens[:, :10], 9)
    assert calls.sizes == [args.n_layers]
    quantize_model(model.layers[1].attention)
    quantize_model(reference.layers[1].attention)
    got, want = decode(model, tokens, 10), decode(reference, tokens, 10)
    assert calls.sizes == [args.n_layers] + [1] * 8 and rel_err(got, want) < 1e-2  # layer 0 of each model alone
    assert model.layers[1].workspace is None and model.layers[0].workspace is not None


# ---------------------------------------------------------------------------------------------
# int8 models (llama.quantize): the same step with int8 products


def int8_model(args: ModelArgs, keep_output: bool = False, fuse: bool = True, **kw) -> Transformer:
    """``quantize_model``'s int8 model with the fast paths as ``speed_up`` sets them (the int8 kernel
    for up to 8 rows, our bf16 kernel for a kept bf16 output), fused or not."""
    kernels = native.kernels()
    model = model_for(args, **kw)
    quantize_model(model, keep_output=keep_output)
    apply_fast_paths(model, torch.float32, kernels.matvec, native.MAX_ROWS, kernels.attention, kernels.int8_matvec)
    return fused.apply_fused(model, (torch.nn.Linear, FastLinear)) if fuse else model


def assert_same_caches(a: Transformer, b: Transformer, bsz: int) -> None:
    for x, y in zip(a.layers, b.layers):
        assert torch.equal(x.attention.cache.k[:bsz], y.attention.cache.k[:bsz])
        assert torch.equal(x.attention.cache.v[:bsz], y.attention.cache.v[:bsz])


@pytest.mark.parametrize("shape", ["gqa", "odd", "demo"])
@pytest.mark.parametrize("bsz", [1, 3])
@pytest.mark.parametrize("keep_output", [False, True])
def test_int8_steps_equal_the_per_operator_path(lib, calls, shape, bsz, keep_output):
    """An int8 model's fused steps (int8 blocks; an int8 or bf16 output) give the per-operator int8
    path's logits and caches bit for bit, up to the last position of the cache."""
    args, max_seq = ARGS[shape], 20
    tokens = torch.randint(0, args.vocab_size, (bsz, max_seq), generator=torch.Generator().manual_seed(20 + bsz))
    ours = int8_model(args, keep_output, max_seq_len=max_seq)
    theirs = int8_model(args, keep_output, fuse=False, max_seq_len=max_seq)
    assert type(ours.output) is (FastLinear if keep_output else Int8Linear)
    got, want = decode(ours, tokens, 14), decode(theirs, tokens, 14)
    assert calls.sizes == [args.n_layers] * 6 and all(calls.heads) and calls[-1] == max_seq - 1
    assert all(b.plan.int8 for b in ours.layers)
    assert torch.equal(got, want)
    assert_same_caches(ours, theirs, bsz)


def test_int8_threads_do_not_change_results(lib, calls):
    args, results = ARGS["demo"], []
    tokens = torch.randint(0, args.vocab_size, (3, 20), generator=torch.Generator().manual_seed(21))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(decode(int8_model(args, max_seq_len=20), tokens, 12))
        want = decode(int8_model(args, fuse=False, max_seq_len=20), tokens, 12)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3 * 8 * args.n_layers
    assert all(torch.equal(r, want) for r in results)


@pytest.mark.parametrize("variant", ["avx512", "avx512bf16"])
@pytest.mark.parametrize("bsz", [1, 2])
def test_int8_variant_is_the_per_operator_kernels(lib, calls, variant, bsz):
    """With another int8 loop chosen (``int8_matvec.use_variant``), the fused step runs it too:
    still the per-operator logits bit for bit, which differ from the AVX2 loop's (the AVX512-BF16
    loop's one row is the AVX-512 loop; its 2-8 rows the bf16 dot product)."""
    kernels = native.kernels()
    if variant not in kernels.int8_matvec.variants:
        pytest.skip(f"no {variant} loop on this CPU")
    args = ARGS["demo"]
    tokens = torch.randint(0, args.vocab_size, (bsz, 16), generator=torch.Generator().manual_seed(22))
    before = kernels.int8_matvec.variant  # a process-wide setting (speed_up may have changed it)
    try:
        kernels.int8_matvec.use_variant("avx2")
        avx2 = decode(int8_model(args, max_seq_len=16), tokens, 10)
        kernels.int8_matvec.use_variant(variant)
        got = decode(int8_model(args, max_seq_len=16), tokens, 10)
        want = decode(int8_model(args, fuse=False, max_seq_len=16), tokens, 10)
    finally:
        kernels.int8_matvec.use_variant(before)
    assert len(calls) == 2 * 6 * args.n_layers
    assert torch.equal(got, want) and not torch.equal(got, avx2)


def test_a_mixed_block_runs_the_plain_path(lib, calls):
    """A block with int8 attention and a bf16 feed-forward is left to torch; the int8 block beside
    it stays in C, and the logits equal the per-operator path's."""
    args = ARGS["gqa"]
    models = []
    for fuse in (True, False):
        model = model_for(args, max_seq_len=16)
        quantize_model(model.layers[0])
        quantize_model(model.layers[1].attention)
        kernels = native.kernels()
        apply_fast_paths(model, torch.float32, kernels.matvec, native.MAX_ROWS, kernels.attention, kernels.int8_matvec)
        models.append(fused.apply_fused(model, (torch.nn.Linear, FastLinear)) if fuse else model)
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(23))
    got, want = decode(models[0], tokens, 12), decode(models[1], tokens, 12)
    assert calls.sizes == [1] * 4 and calls == [12, 13, 14, 15]  # layer 0 alone
    assert models[0].layers[1].workspace is None and models[0].layers[0].plan.int8
    assert not fused.usable(models[0].layers[1], (torch.nn.Linear, FastLinear))
    assert torch.equal(got, want)


def test_new_int8_scales_are_followed(lib, calls):
    """Row scales replaced after some steps (a block's and the output's): the next step uses them."""
    args = ARGS["gqa"]
    ours, theirs = int8_model(args, max_seq_len=16), int8_model(args, fuse=False, max_seq_len=16)
    tokens = torch.randint(0, args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(24))
    decode(ours, tokens[:, :12], 10)
    for model in (ours, theirs):
        for layer in (model.layers[1].feed_forward.w2, model.layers[0].attention.wk, model.output):
            layer.scale = layer.scale * 1.5
    got, want = decode(ours, tokens, 12), decode(theirs, tokens, 12)
    assert calls.sizes == [args.n_layers] * 6 and all(calls.heads)
    assert torch.equal(got, want)


def test_int8_layers_the_step_cannot_run(lib, calls):
    """An Int8Linear of a model-parallel rank (its output is reduced), with bf16 scales, or whose
    product is not the native int8 kernel, is not the C step's: the block (or the output layer) is
    left to torch. A struct missing a scale is refused by the C call."""
    args = ARGS["gqa"]
    model = int8_model(args, max_seq_len=8)
    assert fused.usable(model.layers[0], ())  # int8 blocks whatever linear_types says
    model.layers[0].attention.wo.parallel = "reduce"
    assert not fused.usable(model.layers[0], ())
    model.layers[0].attention.wo.parallel = None
    model.layers[0].feed_forward.w1.scale = model.layers[0].feed_forward.w1.scale.bfloat16()
    assert not fused.usable(model.layers[0], ())
    model.output.scale = model.output.scale.bfloat16()
    assert model._head()[0] is None
    block = model.layers[1]
    plan = block.current_plan()
    assert plan is not None and plan.current(block)
    block.attention.wv.matvec = lambda *a: native.kernels().int8_matvec(*a)  # another product: not the C step's
    assert not plan.current(block) and not fused.usable(block, ())
    block.attention.wv.matvec = None  # torch's product (another scheme: x not rounded to int16)
    assert not fused.usable(block, ())
    block.attention.wv.matvec = native.kernels().int8_matvec
    assert plan.current(block)
    x, cos = torch.zeros(1, 1, args.dim, dtype=torch.bfloat16), model._rope_cos
    for field, value in (("wk_scale", None), ("int8", 0)):
        bad = fused.LayerStruct.from_buffer_copy(plan.layer)
        setattr(bad, field, value)
        with torch.inference_mode(), pytest.raises(ValueError, match="refused"):
            fused.run(block.workspace, (fused.LayerStruct * 1)(bad), x, cos.data_ptr(), cos.data_ptr(), 0)


def test_int8_folder_loads_into_the_fused_step(lib, calls, tmp_path, meta_tokenizer_path):
    """Llama.build of an int8 folder (python -m llama.quantize): its Int8Linear layers run the fused
    step, with the logits of the same model's per-operator path."""
    from llama import quantize_folder
    from llama.checkpoint import write_random_checkpoint

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
    src, dst = tmp_path / "src", tmp_path / "int8"
    write_random_checkpoint(src, args, seed=3, tokenizer_path=meta_tokenizer_path)
    quantize_folder.quantize_folder(src, dst, log=lambda m: None)
    model = Llama.build(str(dst), max_seq_len=24, max_batch_size=2, device="cpu").model
    assert type(model) is fused.FusedTransformer and type(model.output) is Int8Linear
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(25))
    got = decode(model, tokens, 12)
    assert calls.sizes == [2] * 4 and all(calls.heads) and all(b.plan.int8 for b in model.layers)
    for i, block in enumerate(model.layers):  # the same model, per operator
        plain = TransformerBlock.__new__(TransformerBlock)
        plain.__dict__ = dict(block.__dict__)
        model.layers[i] = plain
    model.__class__ = Transformer
    assert torch.equal(got, decode(model, tokens, 12)) and len(calls) == 8


def test_a_large_int8_model_keeps_its_bf16_output_for_torch_beyond_matvec_rows(lib, calls, monkeypatch):
    """int8 blocks take every batch up to 8 whatever their size (the per-operator path runs the same
    int8 loop); a kept bf16 output layer beside large blocks only ``matvec_rows`` rows, as bf16
    blocks would: the logits stay those of the per-operator path."""
    args = ARGS["gqa"]
    monkeypatch.setattr(fused, "SMALL_BLOCK_BYTES", fused.weight_bytes(int8_model(args).layers[0]) - 1)
    tokens = torch.randint(0, args.vocab_size, (3, 12), generator=torch.Generator().manual_seed(26))
    kernels = native.kernels()
    models = []
    for fuse in (True, False):
        model = model_for(args, max_seq_len=12)
        quantize_model(model, keep_output=True)
        apply_fast_paths(model, torch.float32, kernels.matvec, 2, kernels.attention, kernels.int8_matvec)
        models.append(fused.apply_fused(model, (torch.nn.Linear, FastLinear), matvec_rows=2) if fuse else model)
    got, want = decode(models[0], tokens, 10), decode(models[1], tokens, 10)
    assert calls.sizes == [args.n_layers] * 2 and calls.heads == [False] * 2  # 3 rows: the output in torch
    assert torch.equal(got, want)
    got, want = decode(models[0], tokens[:2], 10), decode(models[1], tokens[:2], 10)
    assert calls.heads == [False] * 2 + [True] * 2 and torch.equal(got, want)
