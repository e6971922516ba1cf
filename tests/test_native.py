"""The native kernels (llama/native.py, llama/csrc/): bf16 matrix-vector products and one-token attention.

References we did not write: float64 products of the same (bf16-exact) numbers, and torch's own bf16
kernel. On an x86-64 Linux machine with AVX2 and a C compiler (this project's CI machine) the kernel
must build: its absence there is a failure, not a skip.
"""

import dataclasses
import shutil

import pytest
import torch

from llama import native
from llama.devices import cpu_flags
from llama.fast import FastLinear, apply_fast_paths

from test_fast_paths import ARGS, decisive_model, generate, prompts  # noqa: F401  (shared model builders)

EXPECTED = native.cpu_supported() and shutil.which("cc") is not None
AVX512 = {"avx512f", "avx512bw"} <= cpu_flags()
# Every loop this CPU runs: AVX2 forced on AVX-512 CPUs, AVX512-BF16 where the CPU has it.
VARIANTS = ["avx2"] + ["avx512"] * AVX512 + ["avx512bf16"] * (AVX512 and "avx512_bf16" in cpu_flags())


@pytest.fixture(scope="module")
def kernels():
    found = native.kernels()
    if found is None:
        assert not EXPECTED, "the native kernels should build on x86-64 Linux with AVX2 and cc"
        pytest.skip("the native kernels do not apply to this machine")
    return found


@pytest.fixture(scope="module")
def matvec(kernels):
    return kernels.matvec


@pytest.fixture(scope="module")
def attention(kernels):
    return kernels.attention


@pytest.fixture(params=VARIANTS)
def each_matvec(request, kernels, monkeypatch):
    """The bf16 kernel in each variant this CPU runs (``matvec.variant``)."""
    monkeypatch.setattr(kernels.matvec, "variant", request.param)
    return kernels.matvec


def bf16_exact(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


# Tails on both sides: N odd or not a multiple of the 2- and 4-row blocks, K not a multiple of 16
# or 32 (the AVX-512 step), K < 16 and K < 32.
@pytest.mark.parametrize("n,k", [(1, 16), (5, 7), (3, 31), (37, 45), (64, 64), (33, 95), (130, 2048), (4099, 160), (8, 8208)])
@pytest.mark.parametrize("rows", range(1, 9))
def test_matches_float64(each_matvec, n, k, rows):
    w = bf16_exact(n, k, seed=n * k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    y = each_matvec(x, w)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    if each_matvec.variant == "avx512bf16" and (rows > 1 or k > 4096):  # x rounded to bf16 but a K % 32 tail; else AVX2's loop
        x = torch.cat([x[:, : k - k % 32].bfloat16().float(), x[:, k - k % 32 :]], dim=1)
    exact = x.double() @ w.double().T
    # float32 accumulation of k products: error <~ k * eps * sum|terms|, far below it in practice.
    bound = 4 * torch.finfo(torch.float32).eps * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.skipif("avx512bf16" not in VARIANTS, reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("k", [2048, 4096, 4112, 8192, 45])
def test_avx512bf16_runs_one_row_with_the_avx2_loop(kernels, monkeypatch, k):
    """One input row whose float32 x fits in L1 (K <= 4096) is memory-bound in every loop, so the
    AVX512-BF16 variant runs AVX2's (the same bits); a longer one, and from two rows on, its own
    (x rounded to bf16: different bits for a float32 x)."""
    w, x = bf16_exact(300, k, seed=k), torch.randn(2, k, generator=torch.Generator().manual_seed(3))
    out = {}
    for variant in ("avx2", "avx512bf16"):
        monkeypatch.setattr(kernels.matvec, "variant", variant)
        out[variant] = (kernels.matvec(x[:1], w), kernels.matvec(x, w))
    assert torch.equal(out["avx2"][0], out["avx512bf16"][0]) == (k <= 4096)
    assert not torch.equal(out["avx2"][1], out["avx512bf16"][1])


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_bf16_rows_give_the_float32_sums_rounded_like_torch(each_matvec, rows):
    """bf16 in, bf16 out: the float32 result rounded to nearest even, bit for bit as torch rounds."""
    matvec = each_matvec
    w, x = bf16_exact(300, 80, seed=rows), bf16_exact(rows, 80, seed=rows + 1)
    x[0, 5] = float("nan")  # every output of row 0 is NaN
    y = matvec(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 300)
    expected = matvec(x.float(), w).to(torch.bfloat16)
    assert bool(y[0].isnan().all()) and not bool(y[1:].isnan().any())
    assert torch.equal(y[1:].view(torch.int16), expected[1:].view(torch.int16))


def test_bf16_rounding_edge_cases(each_matvec):
    """a + b summed in float32 and rounded: ties to even, overflow to inf, infinities, NaN."""
    matvec = each_matvec
    big = torch.finfo(torch.bfloat16).max  # 0x7F7F: an odd last mantissa bit
    half_ulp = 2.0 ** (127 - 8)  # half a bf16 step at the top binade
    cases = [(1.0, 2.0**-8), (1.0 + 2.0**-7, 2.0**-8), (1.0, 2.0**-8 + 2.0**-15), (big, half_ulp),
             (-big, -half_ulp), (big, half_ulp / 2), (float("inf"), 1.0), (float("inf"), float("-inf")),
             (2.0**-133, 2.0**-133)]  # fmt: skip
    w = torch.tensor(cases, dtype=torch.float32)  # [N, 2]: w[n] = (a, b), each exact in bf16
    torch.testing.assert_close(w.bfloat16().float(), w, rtol=0, atol=0, equal_nan=True)
    x = torch.ones(1, 2, dtype=torch.bfloat16)
    y = matvec(x, w.bfloat16())[0]
    expected = (w[:, 0] + w[:, 1]).to(torch.bfloat16)  # float32 sum, torch's rounding
    assert torch.equal(y.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert torch.equal(y[keep].view(torch.int16), expected[keep].view(torch.int16))
    assert y[3] == float("inf") and y[4] == float("-inf") and y[5] == big  # overflow by rounding, or not


def test_matches_torch_bf16_kernel(matvec):
    """Against torch's bf16 product of the same numbers, rounded to bf16 alike."""
    w, x = bf16_exact(1000, 2048, seed=1), bf16_exact(1, 2048, seed=2)
    ours = matvec(x, w).bfloat16()
    theirs = torch.nn.functional.linear(x, w)
    eps = torch.finfo(torch.bfloat16).eps
    assert ((ours.double() - theirs.double()).abs() <= eps * theirs.double().abs() + 1e-6).all()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_do_not_change_results(each_matvec, threads):
    """Rows are split between threads, never a sum: every thread count gives identical bits."""
    matvec = each_matvec
    w, x = bf16_exact(515, 304, seed=3), torch.randn(2, 304)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = matvec(x, w)
        torch.set_num_threads(threads)
        assert torch.equal(matvec(x, w), one)
    finally:
        torch.set_num_threads(before)


def test_variant_setting_reaches_the_loop(kernels, monkeypatch):
    """The variant set on ``kernels()``'s functions is the one the loaded functions pass to C. Where
    the CPU has both, the bf16 loops add in different orders, so their float32 sums differ in the
    last bits (so do the int8 loops)."""
    w, x = bf16_exact(64, 2048, seed=12), torch.randn(3, 2048)
    q, scale = torch.randint(-127, 128, (64, 2048), dtype=torch.int8), torch.rand(64) + 0.5
    for fn, args in ((kernels.matvec, (x, w)), (kernels.int8_matvec, (x, q, scale))):
        monkeypatch.setattr(fn, "variant", "no-such-loop")
        with pytest.raises(KeyError, match="no-such-loop"):
            fn(*args)
    results = {}
    for variant in VARIANTS:
        monkeypatch.setattr(kernels.matvec, "variant", variant)
        results[variant] = kernels.matvec(x, w)
    for other in VARIANTS[1:]:
        assert not torch.equal(results["avx2"], results[other]), other


def test_variant_from_environment(monkeypatch):
    """LLAMA_BF16_KERNEL / LLAMA_INT8_KERNEL pick a loop; unknown names, and avx512 on a CPU without
    it, are refused in one line. Unset: avx2 for both on every CPU (the AVX-512 loops measured no
    faster, benchmarks/README.md)."""
    for env in ("LLAMA_BF16_KERNEL", "LLAMA_INT8_KERNEL"):
        monkeypatch.delenv(env, raising=False)
    assert native.bf16_variant(True) == native.bf16_variant(False) == "avx2"
    assert native.int8_variant(True) == native.int8_variant(False) == "avx2"
    for env, choose in (("LLAMA_BF16_KERNEL", native.bf16_variant), ("LLAMA_INT8_KERNEL", native.int8_variant)):
        monkeypatch.setenv(env, "avx512")
        assert choose(True) == "avx512"
        with pytest.raises(ValueError, match=f"^{env}='avx512': use one of .*avx512 needs an AVX-512 CPU.$"):
            choose(False)
        monkeypatch.setenv(env, "avx2")
        assert choose(True) == choose(False) == "avx2"
        monkeypatch.setenv(env, "sse")
        with pytest.raises(ValueError, match=f"^{env}='sse': use one of \\['avx2', 'avx512'"):
            choose(True)
    monkeypatch.setenv("LLAMA_BF16_KERNEL", "avx512bf16")
    assert native.bf16_variant(True, True) == "avx512bf16"
    with pytest.raises(ValueError, match="^LLAMA_BF16_KERNEL='avx512bf16' needs a CPU with AVX512-BF16$"):
        native.bf16_variant(True, False)
    monkeypatch.setenv("LLAMA_INT8_KERNEL", "avx512bf16")
    assert native.int8_variant(True, True) == "avx512bf16"
    with pytest.raises(ValueError, match="^LLAMA_INT8_KERNEL='avx512bf16' needs a CPU with AVX512-BF16$"):
        native.int8_variant(True, False)
        monkeypatch.delenv(env)


def test_bad_arguments_are_refused(matvec):
    w = bf16_exact(8, 32, seed=4)
    with pytest.raises(ValueError, match="bf16"):
        matvec(torch.randn(1, 32), w.float())
    with pytest.raises(ValueError, match="contiguous"):
        matvec(torch.randn(1, 8), w.T)
    with pytest.raises(ValueError, match=r"\[1\.\.8, 32\]"):
        matvec(torch.randn(9, 32), w)
    with pytest.raises(ValueError, match=r"\[1\.\.8, 32\]"):
        matvec(torch.randn(1, 31), w)
    with pytest.raises(ValueError, match="float32 or bf16"):
        matvec(torch.randn(1, 32).half(), w)


def attention_float64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v per query head, query head h on KV head h // (Hq / Hkv), in float64."""
    bsz, n_q, hd = q.shape
    n_kv = k.shape[1]
    qg = q.double().reshape(bsz, n_kv, n_q // n_kv, hd)
    probs = torch.softmax(qg @ k.double().transpose(-1, -2) / hd**0.5, dim=-1)
    return (probs @ v.double()).reshape(bsz, n_q, hd)


def cache_views(bsz: int, n_kv: int, total: int, hd: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values as the model passes them: the first rows and positions of a larger bf16 cache."""
    k_cache, v_cache = bf16_exact(bsz + 1, n_kv, total + 5, hd, seed=seed), bf16_exact(bsz + 1, n_kv, total + 5, hd, seed=seed + 1)
    return k_cache[:bsz, :, :total], v_cache[:bsz, :, :total]


# Tails: positions not a multiple of 8 (and fewer than 8), head sizes not a multiple of 8 or 64;
# 1, 3, 4 and 8 query heads per KV head; several rows.
@pytest.mark.parametrize(
    "bsz,n_q,n_kv,total,hd",
    [(1, 32, 8, 521, 64), (1, 8, 8, 1, 128), (2, 9, 3, 7, 64), (3, 16, 2, 40, 100), (1, 4, 1, 9, 5), (2, 8, 1, 300, 136)],
)
def test_attention_matches_float64(attention, bsz, n_q, n_kv, total, hd):
    k, v = cache_views(bsz, n_kv, total, hd, seed=total)
    q = torch.randn(bsz, n_q, hd, generator=torch.Generator().manual_seed(hd)) * 2
    out = attention(q, k, v)
    assert out.dtype == torch.float32 and out.shape == (bsz, n_q, hd)
    exact = attention_float64(q, k, v)
    # Each output is a convex combination of values: float32 rounding is relative to max |v|.
    assert (out.double() - exact).abs().max() <= 1e-5 * v.double().abs().max()


def test_attention_softmax_across_the_float32_range(attention):
    """Scores 0 down to -100 (values = identity, so the output is the softmax itself): each weight to a few
    float32 ulps, the ones below float32's normal range (exp(-87.3)) flushed to zero."""
    scores = torch.tensor([0.0, -0.5, -1.0, -3.25, -7.0, -12.5, -20.0, -33.0, -45.5, -60.0, -70.0, -80.0, -86.0, -88.0, -95.0, -100.0])
    hd = total = len(scores)
    q = torch.zeros(1, 1, hd)
    q[0, 0, 0] = hd**0.5  # q . k_t / sqrt(hd) = k_t[0]
    k = torch.zeros(1, 1, total, hd, dtype=torch.bfloat16)
    k[0, 0, :, 0] = scores  # each exact in bf16
    v = torch.eye(total, dtype=torch.bfloat16)[None, None]  # value t is the unit vector e_t
    probs = attention(q, k, v)[0, 0].double()
    exact = torch.softmax(scores.double(), dim=0)
    normal = exact >= torch.finfo(torch.float32).tiny
    assert ((probs[normal] - exact[normal]).abs() <= 4 * torch.finfo(torch.float32).eps * exact[normal]).all()
    assert (probs[~normal] == 0).all()


def test_attention_bf16_io_rounds_like_torch(attention):
    k, v = cache_views(2, 4, 33, 64, seed=8)
    q = bf16_exact(2, 8, 64, seed=9)
    out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.view(torch.int16), attention(q.float(), k, v).bfloat16().view(torch.int16))


@pytest.mark.parametrize("threads", [1, 3])
def test_attention_threads_do_not_change_results(attention, threads):
    """Work is split by (row, KV head), never within a sum: identical bits for every thread count."""
    k, v = cache_views(2, 3, 100, 64, seed=10)
    q = torch.randn(2, 12, 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = attention(q, k, v)
        torch.set_num_threads(threads)
        assert torch.equal(attention(q, k, v), two)
    finally:
        torch.set_num_threads(before)


def test_attention_bad_arguments_are_refused(attention):
    k, v = cache_views(1, 2, 10, 16, seed=11)
    q = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="bf16 CPU keys and values"):
        attention(q, k.float(), v)
    with pytest.raises(ValueError, match="one \\[B, Hkv, T, hd\\] shape and strides"):
        attention(q, k, v.contiguous())  # the same shape, other strides
    with pytest.raises(ValueError, match="contiguous in hd"):
        attention(q, k.transpose(-1, -2), v.transpose(-1, -2))
    with pytest.raises(ValueError, match="a multiple of 2"):
        attention(torch.randn(1, 3, 16), k, v)
    with pytest.raises(ValueError, match="float32 or bf16"):
        attention(q.half(), k, v)


@pytest.mark.slow
def test_build_is_cached_and_errors_are_clear(tmp_path, monkeypatch):
    if not EXPECTED:
        pytest.skip("needs x86-64 Linux with AVX2 and cc")
    first = native.build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == mtime  # no second compile
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left
    monkeypatch.setenv("CC", "no-such-compiler")
    with pytest.raises(RuntimeError, match="no C compiler 'no-such-compiler'"):
        native.build(tmp_path / "other")
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    with pytest.raises(RuntimeError, match="false failed to compile"):
        native.build(tmp_path / "other")
    assert list((tmp_path / "other").iterdir()) == []


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LLAMA_NATIVE", "0")
    native.kernels.cache_clear()
    try:
        assert native.kernels() is None
    finally:
        monkeypatch.delenv("LLAMA_NATIVE")
        native.kernels.cache_clear()


def test_linear_uses_it_for_few_rows_only(matvec):
    layer = FastLinear(64, 40, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(bf16_exact(40, 64, seed=5))
    calls = []
    layer.compute_dtype, layer.matvec_rows = torch.float32, 8
    layer.matvec = lambda x, w: calls.append(x.shape[0]) or matvec(x, w)
    for rows in (1, 8, 9):
        x = bf16_exact(rows, 1, 64, seed=rows)
        out = layer(x)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 1, 40)
        exact = x.double() @ layer.weight.double().T
        assert ((out.double() - exact).abs() <= torch.finfo(torch.bfloat16).eps * exact.abs() + 1e-6).all()
    assert calls == [1, 8]  # 9 rows: the widened-block path


def test_apply_fast_paths_hands_them_to_bf16_layers_only(matvec, attention):
    model = decisive_model(torch.bfloat16)
    apply_fast_paths(model, torch.float32, matvec, native.MAX_ROWS, attention)
    linears = [m for m in model.modules() if isinstance(m, FastLinear)]
    assert all(m.matvec is matvec and m.matvec_rows == native.MAX_ROWS for m in linears)
    assert all(layer.attention.kernel is attention for layer in model.layers)
    # 16-bit compute (a CPU with native bf16): the kernels still take few rows (llama/fast.py's rule)
    apply_fast_paths(model, None, matvec, 2, attention)
    assert all(m.matvec is matvec and m.matvec_rows == 2 for m in linears)
    assert all(layer.attention.kernel is attention for layer in model.layers)
    model32 = decisive_model(torch.float32)
    apply_fast_paths(model32, torch.float32, matvec, native.MAX_ROWS, attention)
    assert all(m.matvec is None for m in model32.modules() if isinstance(m, FastLinear))
    assert all(layer.attention.kernel is None for layer in model32.layers)


def counting(fn, calls: list):
    """fn, appending the first argument's shape to ``calls`` at each call."""
    return lambda first, *rest: calls.append(tuple(first.shape)) or fn(first, *rest)


@pytest.mark.slow
def test_generation_with_kernels_equals_torch_kernels(tokenizer, matvec, attention):
    """Greedy tokens identical, logprobs within float32 summation-order noise (both compute in float32)."""
    from llama.generation import Llama

    model = decisive_model(torch.bfloat16)
    batch = prompts(9, 5, 14, seed=6)
    apply_fast_paths(model, torch.float32)
    plain_tokens, plain_lp = generate(Llama(model, tokenizer), batch)
    matvec_calls, attention_calls = [], []
    apply_fast_paths(model, torch.float32, counting(matvec, matvec_calls), native.MAX_ROWS, counting(attention, attention_calls))
    tokens, lp = generate(Llama(model, tokenizer), batch)
    assert matvec_calls and attention_calls, "the kernels were not used"
    # Attention: one-token steps only (prefill and multi-token steps use SDPA), every row at once.
    n_heads, hd = ARGS.n_heads, ARGS.dim // ARGS.n_heads
    assert set(attention_calls) == {(len(batch), n_heads, hd)}
    assert tokens == plain_tokens
    for a, b in zip(lp, plain_lp):
        # Rounding activations to bf16 can turn a last-bit float32 difference into one bf16 step.
        assert max(abs(x - y) for x, y in zip(a, b)) < 0.05


@pytest.mark.slow
def test_build_uses_them_for_bf16_on_cpus_without_bf16(monkeypatch, tmp_path, meta_tokenizer_path, kernels):
    """Llama.build wires the kernels in for bf16 weights on the CPU, whatever its bf16 flag says
    (speed_up measures), and not for fp32 or fp16 weights."""
    from llama.checkpoint import write_random_checkpoint
    from llama.devices import DTYPES
    from llama.generation import Llama

    monkeypatch.setattr("llama.devices.cpu_has_native_bf16", lambda: False)
    ckpt = tmp_path / "ckpt"
    write_random_checkpoint(ckpt, dataclasses.replace(ARGS, vocab_size=128256), dtype=torch.bfloat16)
    for dtype, expected in ((None, True), ("bf16", True), ("fp32", False), ("fp16", False)):  # None: the default, bf16
        llm = Llama.build(str(ckpt), meta_tokenizer_path, max_seq_len=32, max_batch_size=1, dtype=dtype, device="cpu")
        assert llm.model.output.weight.dtype == (torch.bfloat16 if dtype is None else DTYPES[dtype])
        assert (llm.model.output.matvec is not None) == expected, dtype
        assert (llm.model.layers[0].attention.kernel is not None) == expected, dtype


@pytest.mark.slow
def test_compiled_decode_calls_it_as_a_custom_op(tokenizer, matvec, attention):
    """Inside torch.compile the kernel is an opaque op in one graph: same tokens as eager, no recompiles."""
    from llama.generation import Llama
    from test_fast_paths import _compile_works

    if not _compile_works():
        pytest.skip("torch.compile cannot build kernels here")
    model = decisive_model(torch.bfloat16)
    apply_fast_paths(model, torch.float32, matvec, native.MAX_ROWS, attention)
    batch = prompts(9, 5, 14, seed=7)
    eager_tokens, eager_lp = generate(Llama(model, tokenizer), batch, n=10)
    torch._dynamo.reset()
    compiled = Llama(model, tokenizer, compile=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        tokens, lp = generate(compiled, batch, n=10)
    assert tokens == eager_tokens
    for a, b in zip(lp, eager_lp):
        assert max(abs(x - y) for x, y in zip(a, b)) < 0.05


@pytest.mark.slow
def test_installed_package_carries_the_kernel_sources(tmp_path):
    """The kernels compile from the installed package: every source and header must be in the wheel."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    # From a copy of the package's files: a build/ folder in the checkout could hold files from older builds.
    root = Path(native.__file__).parents[1]
    src = tmp_path / "src"
    shutil.copytree(root / "llama", src / "llama", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "requirements.txt"):
        shutil.copy(root / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=src)
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in native.SOURCES + native.HEADERS:
        assert f"llama/csrc/{path.name}" in names, path.name
