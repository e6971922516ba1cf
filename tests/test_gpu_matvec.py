"""The GPU products kernel (llama/gpu_matvec_kernel.py) and the rule that picks it (llama/gpu_matvec.py).

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py
before Triton is imported): the same program, element by element on the CPU, so its indexing,
masks, row loop and int8 scaling are checked against float64 formulas here; tests/test_cuda.py runs
it compiled. The rule is tested with stand-in timings.
"""

import pytest
import torch
import torch.nn.functional as F

# Without a GPU, conftest.py sets TRITON_INTERPRET=1 before any test imports Triton.
pytest.importorskip("triton", reason="Triton is not installed (requirements-dev.txt installs it on Linux x86-64)")

from llama import gpu_matvec  # noqa: E402
from llama.quantize import Int8Linear, quantize_int8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# A GPU rounds the float32 sums to bf16 to nearest (half a unit: 2^-8 relative); Triton 3.6's
# interpreter truncates (a whole unit: 2^-7). Index or mask mistakes are far larger than either.
ROUNDING = 2**-8 if DEVICE == "cuda" else 2**-7


@pytest.mark.parametrize("config", gpu_matvec.CONFIGS)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_bf16_product_matches_float64(config, rows):
    """Odd sizes (N, K not multiples of any block) so every mask matters; bf16 output: within its rounding."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(37, 1100, generator=g).bfloat16()
    x = torch.randn(rows, 1100, generator=g).bfloat16()
    y = gpu_matvec.matvec(x.to(DEVICE), w.to(DEVICE), None, config).cpu()
    ref = x.double() @ w.double().T
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 37)
    assert ((y.double() - ref).abs() <= ROUNDING * ref.abs() + 1e-3).all()


@pytest.mark.parametrize("rows", [1, 5])
def test_fp16_product_matches_float64(rows):
    """fp16 weights and activations (GPUs without bf16): fp16's finer rounding bounds the error."""
    g = torch.Generator().manual_seed(20 + rows)
    w, x = torch.randn(29, 300, generator=g).half(), torch.randn(rows, 300, generator=g).half()
    y = gpu_matvec.matvec(x.to(DEVICE), w.to(DEVICE)).cpu()
    ref = x.double() @ w.double().T
    assert y.dtype == torch.float16
    assert ((y.double() - ref).abs() <= ROUNDING * ref.abs() + 1e-3).all()


@pytest.mark.parametrize("config", gpu_matvec.CONFIGS[:2])
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_product_matches_float64(config, rows):
    g = torch.Generator().manual_seed(10 + rows)
    q, scale = quantize_int8(torch.randn(45, 700, generator=g))
    x = torch.randn(rows, 700, generator=g).bfloat16()
    y = gpu_matvec.matvec(x.to(DEVICE), q.to(DEVICE), scale.to(DEVICE), config).cpu()
    ref = (x.double() @ q.double().T) * scale.double()
    assert ((y.double() - ref).abs() <= ROUNDING * ref.abs() + 1e-3).all()


def test_a_strided_row_block_and_too_many_rows():
    """x may be a view with a row stride (a batch's rows); more than MAX_ROWS rows, or a weight that
    is not contiguous, is refused rather than read wrongly."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(20, 64, generator=g)
    big = torch.randn(4, 128, generator=g)
    x = big[:, :64]  # row stride 128
    y = gpu_matvec.matvec(x.to(DEVICE), w.to(DEVICE)).cpu()
    assert torch.allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="up to 8 rows"):
        gpu_matvec.matvec(torch.randn(9, 64), w)
    with pytest.raises(ValueError, match="contiguous"):
        gpu_matvec.matvec(torch.randn(1, 20), w.T)


class Layer(torch.nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.weight = w
        self.matvec, self.matvec_rows = None, 0


def test_the_rule_keeps_the_fastest_correct_kernel(monkeypatch):
    """Stand-in kernels and timings: the fastest configuration wins; one that is faster but wrong,
    and one that fails to compile, are never used; torch's product stays where no kernel beats it;
    the kernel takes 8 rows only where it beat torch for 8 rows too."""
    wrong, broken, good, slow = gpu_matvec.CONFIGS
    seconds = {"torch": 10.0, wrong: 1.0, broken: 0.5, good: 5.0, slow: 7.0}
    eight_rows = {"torch": 10.0}

    def kernel_for(config):
        def product(x, w, scale=None):
            if config == broken:
                raise RuntimeError("does not compile")
            return F.linear(x, w) + (1.0 if config == wrong else 0.0)

        product.config = config
        return product

    def group_seconds(fn, x, weights):
        key = getattr(fn, "config", "torch")
        return (eight_rows if x.shape[0] == 8 else seconds).get(key, seconds[key])

    monkeypatch.setattr(gpu_matvec, "_kernel_for", kernel_for)
    monkeypatch.setattr(gpu_matvec, "_group_seconds", group_seconds)
    layers = [Layer(torch.randn(16, 32)) for _ in range(3)]
    kernel, rows = gpu_matvec.choose(layers, int8=False)
    assert kernel.config == good and rows == 8
    assert f"kernel {good} for up to 8 row(s)" in gpu_matvec.VERDICTS[-1]
    eight_rows[good] = 15.0  # slower than torch for 8 rows: the kernel takes one row only
    assert gpu_matvec.choose(layers, int8=False)[1] == 1
    seconds[good] = seconds[slow] = 20.0  # nothing correct beats torch
    assert gpu_matvec.choose(layers, int8=False) == (None, 0)
    assert gpu_matvec.VERDICTS[-1].endswith("-> torch")


def test_int8_layers_and_switch(monkeypatch):
    """apply_gpu_matvec considers CUDA layers only (CPU ones keep llama.native's kernels), and
    LLAMA_GPU_MATVEC=0 turns it off."""
    model = torch.nn.Sequential(Layer(torch.randn(8, 8)), Int8Linear.from_float(torch.randn(8, 8)))
    monkeypatch.setattr(gpu_matvec, "choose", lambda *a, **k: pytest.fail("CPU layers must not be probed"))
    assert gpu_matvec.apply_gpu_matvec(model, (Layer,)) == 0
    monkeypatch.setenv("LLAMA_GPU_MATVEC", "0")
    assert not gpu_matvec.enabled()
