"""int4 weight-only quantization (llama/quantize/int4.py) on the CPU: the formula against float64,
the packings, torch's CPU kernel, the memory plan, and Llama.build(quantize="int4").

References are float64 formulas written here: scale = (max - min) / 15, zero = min + 8 * scale
(both rounded to bf16), q = clamp(round((w - zero) / scale + 8), 0, 15), w' = (q - 8) * scale + zero.
"""

import pytest
import torch

from llama import fused
from llama.checkpoint import load_transformer, write_random_checkpoint
from llama.generation import Llama
from llama.memory import plan_memory, quantized_weight_bytes
from llama.model import ModelArgs
from llama.quantize import int4
from llama.quantize.int4 import (
    Int4Linear, dequantize_int4, pack_nibbles, quantize_int4, quantize_model_int4, scales_and_zeros, unpack_nibbles,
)  # fmt: skip

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not int4.cpu_kernel_available(), reason="this torch has no CPU int4 kernel"),
]


def reference(w: torch.Tensor, group: int = 128):
    """float64 of the formula above: (q, scale, zero [out, groups])."""
    g = w.double().view(w.shape[0], -1, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).to(torch.bfloat16).double()
    zero = torch.where(scale == 0, lo, lo + 8 * scale).to(torch.bfloat16).double()
    div = torch.where(scale == 0, 1.0, scale)
    q = ((g - zero[..., None]) / div[..., None] + 8).round().clamp(0, 15)
    q = torch.where(scale[..., None] == 0, 8.0, q)
    return q.view(w.shape), scale, zero


def test_quantize_matches_float64_formula_and_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 384, generator=g).to(torch.bfloat16)
    w[5, 128:256] = 0.25  # a constant group: scale 0, dequantized exactly
    q, s, z = quantize_int4(w)
    ref_q, ref_s, ref_z = reference(w)
    assert q.dtype == torch.uint8 and s.dtype == z.dtype == torch.bfloat16 and s.shape == (48, 3)
    assert torch.equal(s.double(), ref_s) and torch.equal(z.double(), ref_z)
    diff = q.double() != ref_q  # float32 vs float64 may round differently next to a .5 tie only
    assert diff.double().mean() < 1e-3 and (q.double() - ref_q).abs().max() <= 1
    assert q.max() <= 15 and s[5, 1] == 0 and torch.all(q[5, 128:256] == 8)
    back = dequantize_int4(q, s, z, dtype=torch.float64)
    err = (back - w.double()).abs()
    bound = s.double().repeat_interleave(128, 1) / 2
    assert torch.all(err <= bound * (1 + 1e-3) + 1e-7), (err - bound).max()
    assert torch.all(back[5, 128:256] == 0.25)


def test_values_on_the_grid_are_exact():
    g = torch.Generator().manual_seed(1)
    q0 = torch.randint(0, 16, (16, 256), generator=g)
    q0[:, ::128], q0[:, 1::128] = 0, 15  # every group spans the whole grid: its min and max are codes 0 and 15
    s0 = (torch.rand(16, 2, generator=g) * 0.01 + 0.01).to(torch.bfloat16)
    z0 = (torch.rand(16, 2, generator=g) * 0.2 - 0.1).to(torch.bfloat16)
    w = dequantize_int4(q0, s0, z0, dtype=torch.float64)
    assert torch.equal(w.float().double(), w)  # representable in float32
    q, s, z = quantize_int4(w.float())
    assert torch.equal(q, q0.to(torch.uint8)) and torch.equal(s, s0) and torch.equal(z, z0)
    assert torch.equal(dequantize_int4(q, s, z, dtype=torch.float64), w)


def test_nibble_layout_is_cudas_documented_one():
    """uint8 [out, in / 2], byte j = q[2j] << 4 | q[2j + 1] (torch's CUDA _convert_weight_to_int4pack input)."""
    q = torch.tensor([[1, 2, 15, 0, 7, 9], [0, 15, 3, 3, 8, 8]])
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x12, 0xF0, 0x79], [0x0F, 0x33, 0x88]]
    q = torch.randint(0, 16, (32, 256), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)


def test_cpu_packing_in_row_blocks_equals_whole(monkeypatch):
    q = torch.randint(0, 16, (208, 256), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    monkeypatch.setattr(int4, "BLOCK", 64 * 256)  # blocks of 64 rows, and a tail of 16
    assert torch.equal(int4.pack_for_cpu(pack_nibbles(q)), whole)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_matches_float64(dtype):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(96, 512, generator=g)
    layer = Int4Linear.from_float(w)
    exact = layer.dequantized(torch.float64)
    x = torch.randn(3, 5, 512, generator=g).to(dtype)
    ref = x.double() @ exact.T
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # nibbles: F.linear of the dequantized weight in x's dtype
    assert ((layer(x).double() - ref).abs().max() / ref.abs().max()).item() < tol
    layer.pack()
    assert layer.layout == "cpu"
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 5, 96)
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-2, err  # the kernel takes bf16 activations (2^-9 relative each)


def small_args(vocab_size: int = 256) -> ModelArgs:
    return ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=128)


@torch.no_grad()
def test_int4_model_close_to_float_and_formula(tmp_path):
    """Logits within 3e-2 (max, relative) of a float64 forward of the dequantized weights (bf16
    activations in the kernel; measured 1.1e-2), and within 0.45 (norm, relative) of the float model:
    random Gaussian weights lose ~10% of each weight matrix's norm to int4 (group 128) and the two
    random layers amplify that (measured 0.30; int8's 0.4% gives 2%)."""
    args = small_args()
    write_random_checkpoint(tmp_path, args, seed=3, dtype=torch.float32)
    full = load_transformer(tmp_path, "cpu", torch.float32)
    model = load_transformer(tmp_path, "cpu", torch.float32)
    dequant = load_transformer(tmp_path, "cpu", torch.float64)
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear:
            dequant.get_submodule(name).weight.copy_(Int4Linear.from_float(module.weight).dequantized(torch.float64))
    assert quantize_model_int4(model) == 2 * 7 + 1
    tokens = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    out, exact, ref = model(tokens), dequant(tokens), full(tokens)
    assert (out.double() - exact).abs().max() / exact.abs().max() < 3e-2
    assert ((out - ref).norm() / ref.norm()).item() < 0.45


@pytest.mark.slow
@pytest.mark.parametrize("dim", [256, 192])  # 192: all but w2 stay bf16 (in % 128)
def test_memory_plan_equals_built_model_bytes(tmp_path, meta_tokenizer_path, dim):
    args = ModelArgs(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=128)
    write_random_checkpoint(tmp_path, args, seed=5, dtype=torch.bfloat16, tokenizer_path=meta_tokenizer_path)
    llama = Llama.build(str(tmp_path), max_seq_len=16, max_batch_size=1, device="cpu", quantize="int4", verify=False)
    model = llama.model
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # not the cache, rope tables
    planned = quantized_weight_bytes(args, "int4", torch.bfloat16)
    assert weights == planned, (weights, planned)
    int4_layers = sum(isinstance(m, Int4Linear) for m in model.modules())
    assert int4_layers == (15 if dim == 256 else 2)  # 192: only w2 (in = the FFN width, 512) fits
    plan = plan_memory(args, 16, 1, torch.bfloat16, quantize="int4")
    assert plan.weight_bytes == planned


@pytest.mark.slow
@torch.no_grad()
def test_build_int4_generates_on_cpu_and_is_not_fused(tmp_path, meta_tokenizer_path):
    args = small_args(128256)
    write_random_checkpoint(tmp_path, args, seed=6, dtype=torch.bfloat16, tokenizer_path=meta_tokenizer_path)
    llama = Llama.build(str(tmp_path), max_seq_len=32, max_batch_size=1, device="cpu", quantize="int4", verify=False)
    wq, out = llama.model.layers[0].attention.wq, llama.model.output
    assert isinstance(wq, Int4Linear) and wq.layout == "cpu" and isinstance(out, Int4Linear)
    for block in llama.model.layers:  # the C decode step takes bf16 or int8 blocks only
        assert not fused.usable(block, (torch.nn.Linear,))
    text = llama.text_completion(["The capital of France is"], temperature=0.0, max_gen_len=4)
    assert isinstance(text[0]["generation"], str)
    bf16 = Llama.build(str(tmp_path), max_seq_len=32, max_batch_size=1, device="cpu", verify=False)
    tokens = torch.randint(0, args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    a, b = llama.model(tokens, 0).float(), bf16.model(tokens, 0).float()
    assert ((a - b).norm() / b.norm()).item() < 0.45  # see test_int4_model_close_to_float_and_formula
    # one-token steps too (the decode path) give finite logits
    step = llama.model(tokens[:, :1], 12)
    assert torch.isfinite(step).all()


def test_bad_input(tmp_path, meta_tokenizer_path):
    args = small_args(128256)
    write_random_checkpoint(tmp_path, args, seed=7, dtype=torch.bfloat16, tokenizer_path=meta_tokenizer_path)
    with pytest.raises(ValueError, match="quantize='int5' is not supported"):
        Llama.build(str(tmp_path), max_seq_len=16, max_batch_size=1, device="cpu", quantize="int5", verify=False)
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        quantize_int4(torch.randn(16, 100))
    with pytest.raises(ValueError, match="kernels do not take"):
        Int4Linear.from_float(torch.randn(20, 256))


@pytest.mark.slow
def test_int4_refused_for_int8_folders(tmp_path, meta_tokenizer_path):
    import subprocess
    import sys

    from child_env import REPO, child_env

    src, dst = tmp_path / "src", tmp_path / "dst"
    write_random_checkpoint(src, small_args(128256), seed=8, dtype=torch.bfloat16, tokenizer_path=meta_tokenizer_path)
    run = subprocess.run([sys.executable, "-m", "llama.quantize", str(src), str(dst), "--int8"], cwd=REPO, env=child_env(),
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    with pytest.raises(ValueError, match="is an int8 folder.*quantize='int4' needs 16-bit weights"):
        Llama.build(str(dst), max_seq_len=16, max_batch_size=1, device="cpu", quantize="int4", verify=False)


def test_scales_and_zeros_layout():
    s, z = torch.rand(16, 3).to(torch.bfloat16), torch.rand(16, 3).to(torch.bfloat16)
    sz = scales_and_zeros(s, z)
    assert sz.shape == (3, 16, 2) and sz.is_contiguous()
    assert torch.equal(sz[2, 7], torch.stack([s[7, 2], z[7, 2]]))


def test_cache_heads_counted_whatever_the_packed_layout():
    """setup_cache counts a rank's KV heads from wk's output features: a packed int4 weight's tensor
    shape is not [out, in] (CUDA's layout: [out / 8, ...]), so its rows would give the wrong count."""
    from llama.model import ModelArgs, Transformer, local_out_features
    from llama.quantize.int4 import Int4Linear

    args = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=64)
    model = Transformer(args, dtype=torch.float32)
    wk = Int4Linear.from_float(model.layers[0].attention.wk.weight.detach())
    wk.weight = torch.zeros(16, 2, 32, 4, dtype=torch.int32)  # a layout whose first dimension is not 128
    model.layers[0].attention.wk = wk
    assert local_out_features(wk) == 128
    model.setup_cache(1, 8)
    assert model.layers[0].attention.cache.k.shape == (1, 2, 8, 64)


def test_devices_without_the_kernels_are_refused_before_loading(monkeypatch, tmp_path):
    """A GPU older than Ampere (torch's CUDA int4 kernel needs compute capability 8.0) or a torch
    without the CPU kernel: one clear error from Llama.build, before the checkpoint is opened."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(int4, "cuda_kernel_available", lambda: True)
    why = int4.unsupported(torch.device("cuda"))
    assert why is not None and "compute capability 8.0" in why and "7.5" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert int4.unsupported(torch.device("cuda")) is None
    assert int4.unsupported(torch.device("cpu")) is None  # this torch has the CPU kernel
    monkeypatch.setattr(int4, "cpu_kernel_available", lambda: False)
    with pytest.raises(ValueError, match="quantize='int4' cannot run on cpu: this torch build has no CPU int4 kernel"):
        Llama.build(str(tmp_path / "never-read"), device="cpu", quantize="int4")
