"""int8 weight-only quantization (llama/quantize/__init__.py) and its kernel (llama/csrc/int8_matvec.c).

References are float64 formulas written here: per-row symmetric quantization, and y = x @ (q * s).T.
"""

import torch
import pytest

from llama import native, quantize
from llama.checkpoint import load_transformer, write_random_checkpoint
from llama.devices import cpu_flags
from llama.fast import FastLinear, apply_fast_paths, speed_up
from llama.generation import Llama
from llama.model import ModelArgs
from llama.quantize import QMAX, Int8Linear, dequantize_int8, quantize_int8, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")

KERNELS = native.kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="native kernels unavailable (not x86-64 Linux with AVX2, or no compiler)")
AVX512 = {"avx512f", "avx512bw"} <= cpu_flags()
VARIANTS = ["avx2"] + ["avx512"] * AVX512 + ["avx512bf16"] * (AVX512 and "avx512_bf16" in cpu_flags())


def reference_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64: scale = max|row| / 127 (1 for a zero row), q = round-half-even(w / scale)."""
    w = w.double()
    amax = w.abs().amax(1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(w / scale[:, None]).clamp(-127, 127), scale


def test_quantize_matches_float64_formula():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(67, 130, generator=g).to(torch.bfloat16)
    w[3] = 0  # an all-zero row: scale 1, q 0
    q, s = quantize_int8(w)
    ref_q, ref_s = reference_quantize(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.allclose(s.double(), ref_s, rtol=1e-7, atol=0)
    # float32 arithmetic may round the other way than float64 only next to a .5 boundary.
    diff = q.double() != ref_q
    ratio = w.double() / ref_s[:, None]
    assert (q.double() - ref_q).abs().max() <= 1
    assert torch.all((ratio[diff] - ratio[diff].floor() - 0.5).abs() < 1e-4), "a mismatch away from a tie"
    assert diff.double().mean() < 1e-3
    assert q.abs().max() <= QMAX and torch.all(q.abs().amax(1)[torch.arange(67) != 3] == QMAX)
    # Round trip: every weight within half a step of its row's scale.
    err = (dequantize_int8(q, s, torch.float64) - w.double()).abs()
    assert torch.all(err <= ref_s[:, None] / 2 * (1 + 1e-5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_quantize_refuses_non_finite_weights_by_name(bad):
    """int8 has no NaN: a NaN row used to get scale 1 and int8 zeros (finite garbage), an inf row an
    inf scale. Refused, naming the tensor and the row, at load (quantize="int8") and in int8 folders."""
    step = Int8Linear.BLOCK // 70  # rows quantized per block
    w = torch.randn(2 * step + 5, 70, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for row in (2 * step + 1, 3):  # in the last block, then (with it) in the first
        w[row, 5] = bad
        with pytest.raises(ValueError, match=rf"^layers\.0\.attention\.wq\.weight has a non-finite value \(NaN or inf\) in row {row}: .*re-download it$"):
            quantize.int8_transform("layers.0.attention.wq.weight", w)
    with pytest.raises(ValueError, match=r"^the weight has a non-finite value .* in row 3"):
        quantize_int8(w)
    norm = w[3]
    passed = quantize.int8_transform("norm.weight", norm)  # not quantized: passed through, as it is
    assert list(passed) == ["norm.weight"] and passed["norm.weight"] is norm


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_torch_path_matches_float64(dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 70, generator=g)
    layer = Int8Linear.from_float(w)
    layer.BLOCK = 1000  # several row blocks
    x = torch.randn(2, 5, 70, generator=g).to(dtype)
    ref = x.double() @ dequantize_int8(layer.weight, layer.scale, torch.float64).T
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 5, 300)
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # bf16 output: its own rounding
    assert (out.double() - ref).abs().max() / ref.abs().max() < tol


def test_int8_linear_torch_path_gradients_survive_the_shared_buffer(monkeypatch):
    """Blocks widened into the shared buffer are overwritten by the next block and the next layer;
    with autograd recording, each block is a fresh copy, so x's gradient is the float64 formula's."""
    g = torch.Generator().manual_seed(4)
    a, b = Int8Linear.from_float(torch.randn(300, 70, generator=g)), Int8Linear.from_float(torch.randn(50, 300, generator=g))
    a.BLOCK = b.BLOCK = 1000
    monkeypatch.setattr(quantize, "_WIDE", {})  # no buffer yet: the first is made in inference mode
    with torch.inference_mode():  # the shared buffer made here must stay usable outside inference mode
        a(torch.randn(3, 70, generator=g))
    with torch.no_grad():
        a(torch.randn(3, 70, generator=g))
    x = torch.randn(3, 70, generator=g, requires_grad=True)
    b(a(x)).sum().backward()
    wa, wb = (dequantize_int8(m.weight, m.scale, torch.float64) for m in (a, b))
    expected = (torch.ones(3, 50, dtype=torch.float64) @ wb) @ wa
    assert (x.grad.double() - expected).abs().max() / expected.abs().max() < 1e-5


@pytest.mark.slow
@torch.no_grad()
def test_int8_linear_compiled_path_matches_float64():
    """The one-expression product that GPUs and torch.compile run (no blocks, no kernel), compiled
    on this CPU by Inductor: the path a CUDA run takes, checked where no GPU is lent."""
    g = torch.Generator().manual_seed(2)
    layer = Int8Linear.from_float(torch.randn(96, 64, generator=g))
    layer.compute_dtype = torch.float32
    x = torch.randn(3, 64, generator=g)
    ref = x.double() @ dequantize_int8(layer.weight, layer.scale, torch.float64).T
    out = torch.compile(layer, fullgraph=True)(x)
    assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-6


def reference_int16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's rounding of x [B, K] (float32) per 32-element block, in the same float32 steps:
    m = max |block|, xi = round-half-even(x * (32767 / m)), step = m / 32767 (0 for a zero block).
    Returns xi [B, K32] and step [B, K32 / 32], both float64."""
    b, k = x.shape
    blocks = x[:, : k - k % 32].reshape(b, -1, 32)
    m = blocks.abs().amax(-1)
    inv = torch.where(m > 0, torch.tensor(32767.0) / m, torch.zeros_like(m))
    xi = torch.round(blocks * inv[..., None])
    assert xi.abs().max() <= 32767
    return xi.reshape(b, -1).double(), (m / 32767.0).double()


def reference_kernel(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """float64 of the kernel's formula: blocks of 32 through int16 x, the K % 32 tail in float."""
    k32 = x.shape[1] - x.shape[1] % 32
    xi, step = reference_int16(x.float())
    x_used = torch.cat([(xi.reshape(x.shape[0], -1, 32) * step[..., None]).reshape(x.shape[0], -1), x[:, k32:].double()], 1)
    return (x_used @ q.double().T) * s.double()


@needs_kernels
@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows", range(1, 9))
def test_int8_kernel_matches_float64(variant, rows, monkeypatch):
    """Every row count and every variant present on this CPU (AVX2 forced on AVX-512 machines), with
    N and K that leave tails (not multiples of the blocks), float32 and bf16 in/out: equal to the
    float64 formula of the documented scheme up to float32 summation, and within the stated bound
    of the exact product with x unrounded: half a step of each x's own 32-element block. One large
    activation in the first block (Llama's residual stream has some) must not coarsen the others.
    The AVX512-BF16 loop's scheme for 2-8 bf16 rows is the exact product (nothing rounded before the
    float32 sums); its one row and float32 rows are the int16 blocks'."""
    g = torch.Generator().manual_seed(rows)
    n, k = 37, 32 * 5 + 7
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) * 0.01
    monkeypatch.setattr(KERNELS.int8_matvec, "variant", variant)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 8e-3)):
        x = torch.randn(rows, k, generator=g)
        x[0, 3] = 300.0  # an outlier in block 0 of row 0
        x[-1, 32:64] = 0  # a zero block
        x = x.to(dtype)
        y = KERNELS.int8_matvec(x, q, s)
        assert y.dtype == dtype and y.shape == (rows, n)
        dot = variant == "avx512bf16" and dtype == torch.bfloat16 and rows > 1
        ref = (x.double() @ q.double().T) * s.double() if dot else reference_kernel(x, q, s)
        assert ((y.double() - ref).abs() / ref.abs().max()).max() < tol, (dtype, variant, rows)
        if dot:  # float32 sums of exact products, then the bf16 output's rounding: within half its ulp
            assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-6 * ref.abs().max()).all()
        if dtype == torch.float32:
            exact = (x.double() @ q.double().T) * s.double()
            _, step = reference_int16(x)
            half_steps = torch.cat([step.repeat_interleave(32, 1) / 2, torch.zeros(rows, k % 32, dtype=torch.float64)], 1)
            bound = (half_steps @ q.double().abs().T) * s.double()
            assert torch.all((y.double() - exact).abs() <= bound * (1 + 1e-5) + 1e-6 * exact.abs().max())
            # The bound is per block: with one step for the whole row (the outlier's), row 0's bound
            # would be the outlier's half step times all of |q|; only block 0 (32 of 167) has it.
            assert bound[0].max() < ((300.0 / 32767 / 2) * q.double().abs().sum(1) * s.double()).max() / 3


@needs_kernels
@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_int8_kernel_non_finite_and_zero_inputs(variant, monkeypatch):
    """A NaN or an infinity in a row of x makes that row's outputs NaN (never a finite number that
    hides it); a zero row gives zeros; other rows are untouched."""
    monkeypatch.setattr(KERNELS.int8_matvec, "variant", variant)
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-127, 128, (9, 70), generator=g, dtype=torch.int8)
    s = torch.rand(9, generator=g)
    x = torch.randn(4, 70, generator=g)
    clean, clean_bf16 = KERNELS.int8_matvec(x, q, s), KERNELS.int8_matvec(x.bfloat16(), q, s)
    x[1, 40], x[2, 5], x[3] = float("nan"), float("inf"), 0.0
    y = KERNELS.int8_matvec(x, q, s)
    assert torch.equal(y[0], clean[0])
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    assert torch.equal(y[3], torch.zeros(9))
    xb = x.bfloat16()  # bf16 rows (the AVX512-BF16 loop's dot product): non-finite, never a finite number
    yb = KERNELS.int8_matvec(xb, q, s)
    assert torch.equal(yb[0], clean_bf16[0])
    assert not torch.isfinite(yb[1]).any() and not torch.isfinite(yb[2]).any() and torch.equal(yb[3], torch.zeros(9, dtype=torch.bfloat16))


@needs_kernels
def test_int8_kernel_refuses_bad_input():
    q, s = torch.zeros(4, 16, dtype=torch.int8), torch.ones(4)
    with pytest.raises(ValueError, match="x of \\[1..8, 16\\]"):
        KERNELS.int8_matvec(torch.zeros(9, 16), q, s)
    with pytest.raises(ValueError, match="contiguous int8"):
        KERNELS.int8_matvec(torch.zeros(1, 16), q.float(), s)
    with pytest.raises(ValueError, match="float32 scales"):
        KERNELS.int8_matvec(torch.zeros(1, 16), q, s.double())


def tiny_args() -> ModelArgs:
    return ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=64)


@torch.no_grad()
def test_quantized_model_close_to_float_model_and_formula(tmp_path):
    """Logits of the int8 model equal a float64 forward of the dequantized weights (up to float32
    rounding), and stay within a stated distance of the unquantized model (random weights)."""
    args = tiny_args()
    write_random_checkpoint(tmp_path, args, seed=3, dtype=torch.float32)
    ref = load_transformer(tmp_path, "cpu", torch.float32)
    model = load_transformer(tmp_path, "cpu", torch.float32)
    assert quantize_model(model) == 2 * 7 + 1  # seven projections a layer, and output
    dequant = load_transformer(tmp_path, "cpu", torch.float64)
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            dequant.get_submodule(name).weight.copy_(dequantize_int8(module.weight, module.scale, torch.float64))
    tokens = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    out, exact, full = model(tokens), dequant(tokens), ref(tokens)
    assert (out.double() - exact).abs().max() / exact.abs().max() < 1e-5
    # The quantization itself: random Gaussian weights lose ~1% of each logit's scale.
    rel = ((out - full).norm() / full.norm()).item()
    assert rel < 0.03, rel


def int8_model_and_plain_logits(folder, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    """A tiny int8 model in ``dtype`` (no fast paths yet), 11 tokens, and its last logits after a
    10-token prompt and after one more step, computed by torch alone."""
    args = tiny_args()
    write_random_checkpoint(folder, args, seed=4, dtype=torch.bfloat16)
    model = load_transformer(folder, "cpu", dtype)
    quantize_model(model)
    model.setup_cache(1, 16)
    tokens = torch.randint(0, args.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    return model, tokens, [model(tokens[:, :10], 0)[:, -1], model(tokens[:, 10:11], 10)[:, -1]]


@needs_kernels
@torch.no_grad()
def test_fast_paths_use_the_int8_kernel_for_decode(tmp_path):
    model, tokens, plain = int8_model_and_plain_logits(tmp_path, torch.bfloat16)
    speed_up(model)
    wq = model.layers[0].attention.wq
    # native.kernels() now: other tests clear its cache, so compare with the current kernels
    assert isinstance(wq, Int8Linear) and wq.matvec is native.kernels().int8_matvec and wq.matvec_rows == native.MAX_ROWS
    calls = []
    original = wq.matvec
    wq.matvec = lambda *a: calls.append(1) or original(*a)
    fast = [model(tokens[:, :10], 0)[:, -1], model(tokens[:, 10:11], 10)[:, -1]]
    assert calls == [1]  # the one-token step only: the 10-token prompt (> 8 rows) takes torch's path
    attention = model.layers[0].attention  # int8 projections, bf16 cache: the attention kernel reads it
    assert attention.kernel is native.kernels().attention and attention.cache.k.dtype == torch.bfloat16
    for a, b in zip(plain, fast):
        assert (a - b).abs().max() / a.abs().max() < 2e-2  # bf16 activations, summed in another order


@needs_kernels
@torch.no_grad()
def test_a_float16_int8_model_on_the_cpu_decodes_in_torch(tmp_path):
    """The int8 kernel takes float32 or bf16 rows: a float16 model (--dtype fp16 --quantize int8 on
    a CPU) keeps torch's widening product instead of failing at its first decode step."""
    model, tokens, plain = int8_model_and_plain_logits(tmp_path, torch.float16)
    speed_up(model)
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert int8 and all(m.matvec is None for m in int8)
    fast = [model(tokens[:, :10], 0)[:, -1], model(tokens[:, 10:11], 10)[:, -1]]
    for a, b in zip(plain, fast):  # torch's product both times; only the fast paths around it differ
        assert torch.isfinite(b).all() and (a - b).abs().max() / a.abs().max() < 2e-2


@needs_kernels
@torch.no_grad()
def test_bf16_kernel_runs_for_few_rows_whatever_the_compute_dtype():
    """The rule of llama/fast.py: our kernel takes up to matvec_rows rows even where torch
    multiplies bf16 natively (compute_dtype None); more rows go to torch."""
    layer = FastLinear(64, 32, bias=False)
    layer.weight.data = torch.randn(32, 64).to(torch.bfloat16)
    calls = []
    layer.matvec = lambda x, w: calls.append(x.shape[0]) or KERNELS.matvec(x, w)
    layer.matvec_rows, layer.compute_dtype = 2, None
    for rows in (1, 2, 3):
        layer(torch.randn(rows, 64).to(torch.bfloat16))
    assert calls == [1, 2]


def test_build_quantize_int8(tmp_path, meta_tokenizer_path):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
    write_random_checkpoint(tmp_path, args, seed=5, dtype=torch.bfloat16, tokenizer_path=meta_tokenizer_path)
    llama = Llama.build(str(tmp_path), max_seq_len=32, max_batch_size=1, device="cpu", quantize="int8", verify=False)
    assert isinstance(llama.model.layers[1].feed_forward.w2, Int8Linear)
    assert isinstance(llama.model.output, Int8Linear)
    out = llama.text_completion(["The capital of France is"], temperature=0.0, max_gen_len=4)
    assert isinstance(out[0]["generation"], str)
    with pytest.raises(ValueError, match="quantize='int5' is not supported"):
        Llama.build(str(tmp_path), max_seq_len=32, max_batch_size=1, device="cpu", quantize="int5")


PEAK_SCRIPT = """
import json, sys
from llama.generation import Llama

def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

base = kib("VmRSS:")
llama = Llama.build(sys.argv[1], max_seq_len=16, max_batch_size=1, device="cpu", quantize=sys.argv[2] or None, verify=False)
print(json.dumps({"base": base, "peak": kib("VmHWM:"), "final": kib("VmRSS:")}))
"""


@pytest.mark.slow
def test_quantize_at_load_streams_the_weights(tmp_path, meta_tokenizer_path):
    """Quantizing while loading holds one block of a 16-bit weight at a time, and writes the int8
    values where they stay: the peak RSS of the build is its final RSS, not the final plus the bf16
    output matrix (262 MB here) and a copy of its int8 values (131 MB), as it was (339 MB above).
    The same for a bf16 build, whose weights are copied into huge pages a block at a time (it was
    180 MB above)."""
    import json
    import subprocess
    import sys

    from child_env import child_env

    args = ModelArgs(dim=1024, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128256, multiple_of=256)
    write_random_checkpoint(tmp_path, args, seed=6, dtype=torch.bfloat16, tokenizer_path=meta_tokenizer_path)
    env = child_env(LLAMA_MATVEC_ROWS="4", LLAMA_PROMPT_PATH="bf16")  # no probes: their buffers are not the load's
    final = {}
    for quantize in ("int8", ""):
        run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), quantize], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        m = json.loads(run.stdout.strip().splitlines()[-1])
        assert m["peak"] - m["final"] < 48 << 10, (quantize, m)  # KiB: blocks of a few MiB, not hundreds of MB
        final[quantize] = m["final"] - m["base"]
    assert final["int8"] < final[""] - (100 << 10), final  # int8 layers and output (~190 MB less)


def test_apply_fast_paths_leaves_int8_layers_int8():
    args = tiny_args()
    from llama.model import Transformer

    model = Transformer(args)
    quantize_model(model)
    apply_fast_paths(model, torch.float32)
    assert isinstance(model.layers[0].feed_forward.w1, Int8Linear)
    assert model.layers[0].feed_forward.w1.compute_dtype == torch.float32


def test_matvec_rows_measured_kept_and_overridden(tmp_path, monkeypatch):
    """The kernel rule of llama/fast.py is a measurement, not a CPU flag: a fake kernel that is
    instant up to 3 rows and slow beyond gets 3 rows; the verdict is kept in the cache folder
    (and read back without measuring, but measured again for another build of the kernels);
    LLAMA_MATVEC_ROWS overrides it."""
    import time

    from llama import fast

    def fake(x, w):
        if x.shape[0] > 3:
            time.sleep(0.02)
        return x.new_zeros(x.shape[0], w.shape[0])

    monkeypatch.setattr(fast, "PROBE_SHAPE", (256, 64))
    assert fast.measure_matvec_rows(fake, torch.float32) == 3
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(fast.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(fast, "cores_used_elsewhere", lambda fn: (fn(), 0.0))  # a quiet machine (this one may not be)
    fast._cached_matvec_rows.cache_clear()
    assert fast.matvec_rows(fake, torch.float32) == 3
    assert len(list((tmp_path / "llama" / "native").glob("matvec-rows-*.json"))) == 1
    fast._cached_matvec_rows.cache_clear()
    monkeypatch.setattr(fast, "measure_matvec_rows", lambda *a: pytest.fail("measured again"))
    assert fast.matvec_rows(fake, torch.float32) == 3
    # Another build of the kernels (a changed loop) is measured again, into a file of its own.
    fast._cached_matvec_rows.cache_clear()
    monkeypatch.setattr(fast.native, "source_digest", lambda: "another-build")
    monkeypatch.setattr(fast, "measure_matvec_rows", lambda *a: 5)
    assert fast.matvec_rows(fake, torch.float32) == 5
    assert len(list((tmp_path / "llama" / "native").glob("matvec-rows-*.json"))) == 2
    monkeypatch.setenv("LLAMA_MATVEC_ROWS", "0")
    assert fast.matvec_rows(fake, torch.float32) == 0
    monkeypatch.setenv("LLAMA_MATVEC_ROWS", "nine")
    with pytest.raises(ValueError, match="LLAMA_MATVEC_ROWS"):
        fast.matvec_rows(fake, torch.float32)
    fast._cached_matvec_rows.cache_clear()


@torch.no_grad()
def test_quantized_while_loading_equals_quantized_after(tmp_path):
    """Llama.build's path (int8_transform while reading, 2 shards) gives exactly the layers that
    quantize_model gives on the loaded model: same int8 values, same scales, same logits."""
    from llama.quantize import int8_transform

    args = tiny_args()
    write_random_checkpoint(tmp_path, args, n_shards=2, seed=6, dtype=torch.bfloat16)
    after = load_transformer(tmp_path, "cpu", torch.bfloat16)
    quantize_model(after)
    during = load_transformer(tmp_path, "cpu", torch.bfloat16, transform=int8_transform)
    for name, module in after.named_modules():
        if isinstance(module, Int8Linear):
            other = during.get_submodule(name)
            assert isinstance(other, Int8Linear), name
            assert torch.equal(module.weight, other.weight) and torch.equal(module.scale, other.scale), name
    assert not isinstance(during.tok_embeddings, Int8Linear)
    tokens = torch.randint(0, args.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(after(tokens), during(tokens))


def test_release_pages_only_inside_file_mappings(tmp_path):
    """load_state_dict releases pages only inside the checkpoint files' own mappings (ordinary
    memory would read back as zeros); file pages read back from the file unchanged."""
    from llama.checkpoint import file_mappings, release_pages

    path = tmp_path / "t.pth"
    torch.save({"w": torch.arange(1 << 20, dtype=torch.float32)}, path)
    w = torch.load(path, mmap=True, weights_only=True)["w"]
    mapped = file_mappings(path)
    assert mapped and any(a <= w.data_ptr() < b for a, b in mapped)
    assert w.sum().item() == sum(range(1 << 20))
    release_pages(w, mapped)
    assert w.sum().item() == sum(range(1 << 20))  # re-read from the file
    assert file_mappings(tmp_path / "missing.pth") == []
    ordinary = torch.arange(1 << 20, dtype=torch.float32)
    assert not any(a <= ordinary.data_ptr() < b for a, b in mapped)
    release_pages(ordinary, mapped)  # outside every mapping given: nothing happens
    assert ordinary.sum().item() == sum(range(1 << 20))

