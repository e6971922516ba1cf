"""CUDA checks: the same model on GPU and CPU, and Llama.build under torchrun with NCCL.

Skipped without a GPU (CI has none); run on a GPU machine with ``python -m pytest -q tests/test_cuda.py``.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from child_env import REPO, child_env, free_port
from llama.checkpoint import load_transformer, write_random_checkpoint
from llama.model import ModelArgs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ARGS = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128256, multiple_of=64, use_scaled_rope=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, meta_tokenizer_path) -> Path:
    path = tmp_path_factory.mktemp("cuda_ckpt")
    write_random_checkpoint(path, ARGS, dtype=torch.float32, tokenizer_path=meta_tokenizer_path)
    return path


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_cuda_logits_match_cpu_fp32(ckpt: Path) -> None:
    tokens = torch.randint(0, ARGS.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    cpu = load_transformer(ckpt, "cpu", torch.float32)(tokens)
    gpu_model = load_transformer(ckpt, "cuda", torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = gpu_model(tokens.cuda()).cpu()
    err = _rel(gpu, cpu)
    print(f"cuda vs cpu fp32 logits rel err {err:.2e}")
    assert err < 1e-4


def test_cuda_cached_decode_equals_full_forward_bf16(ckpt: Path) -> None:
    model = load_transformer(ckpt, "cuda", torch.bfloat16)
    tokens = torch.randint(0, ARGS.vocab_size, (1, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    full = model(tokens)
    model.setup_cache(1, 32)
    steps = [model(tokens[:, :10], 0)] + [model(tokens[:, i : i + 1], i) for i in range(10, 24)]
    err = _rel(torch.cat(steps, 1), full)
    print(f"bf16 cached vs full rel err {err:.2e}")
    assert err < 3e-2


def test_build_and_generate_on_cuda(ckpt: Path, meta_tokenizer_path) -> None:
    from llama import Llama

    gen = Llama.build(str(ckpt), str(meta_tokenizer_path), max_seq_len=64, max_batch_size=2, device="cuda", dtype="fp32")
    assert gen.device.type == "cuda"
    prompts = [gen.tokenizer.encode("Hello there", bos=True, eos=False), gen.tokenizer.encode("A", bos=True, eos=False)]
    torch.backends.cuda.matmul.allow_tf32 = False
    tokens, _ = gen.generate(prompts, 12, temperature=0)
    cpu = Llama.build(str(ckpt), str(meta_tokenizer_path), max_seq_len=64, max_batch_size=2, device="cpu", dtype="fp32")
    assert tokens == cpu.generate(prompts, 12, temperature=0)[0]


def test_torchrun_nccl_fairscale_layers_single_gpu(ckpt: Path, tmp_path: Path) -> None:
    """MP=1 through torchrun with an NCCL group and fairscale's parallel layers on cuda:0.

    ``Llama.build`` skips the group for one rank; this forces it, so NCCL collectives and the
    parallel layers run on the GPU, and compares the logits with the plain model.
    """
    port = free_port()
    script = tmp_path / "run.py"
    script.write_text(
        "import json, torch, torch.distributed as dist\n"
        "from fairscale.nn.model_parallel import initialize as fs_init\n"
        "from llama.checkpoint import load_transformer\n"
        "from llama.parallel import parallelize\n"
        "torch.backends.cuda.matmul.allow_tf32 = False\n"
        "torch.cuda.set_device(0)\n"
        "dist.init_process_group('nccl')\n"
        "fs_init.initialize_model_parallel(1)\n"
        f"m = load_transformer({str(ckpt)!r}, 'cuda', torch.float32, 0, 1, parallelize)\n"
        f"p = load_transformer({str(ckpt)!r}, 'cuda', torch.float32)\n"
        "t = torch.randint(0, 128256, (2, 16), device='cuda')\n"
        "a, b = m(t), p(t)\n"
        "err = ((a - b).abs().max() / b.abs().max()).item()\n"
        "kinds = sorted({type(x).__name__ for x in m.modules()})\n"
        f"open({str(tmp_path / 'out.json')!r}, 'w').write(json.dumps({{'err': err, 'kinds': kinds}}))\n"
        "dist.destroy_process_group()\n"
    )
    env = child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(port), str(script)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    print(f"NCCL + fairscale MP=1 vs plain fp32 logits rel err {out['err']:.2e}")
    assert "ColumnParallelLinear" in out["kinds"] and "RowParallelLinear" in out["kinds"]
    assert out["err"] < 1e-5


def test_cuda_graph_decode_equals_eager(ckpt: Path, meta_tokenizer_path, monkeypatch) -> None:
    """The default CUDA decode step (a CUDA graph, llama/cuda_graph.py) against eager steps: the same
    greedy tokens and logprobs (fp32, no TF32) for batches of 1 and 2, graphs reused across calls."""
    from llama import Llama
    from llama.cuda_graph import GraphedDecodeStep

    torch.backends.cuda.matmul.allow_tf32 = False
    graphed = Llama.build(str(ckpt), str(meta_tokenizer_path), max_seq_len=64, max_batch_size=2, device="cuda", dtype="fp32")
    assert isinstance(graphed.decode_step, GraphedDecodeStep)
    monkeypatch.setenv("LLAMA_CUDA_GRAPH", "0")
    eager = Llama.build(str(ckpt), str(meta_tokenizer_path), max_seq_len=64, max_batch_size=2, device="cuda", dtype="fp32")
    assert eager.decode_step is None
    batches = [[[1, 2, 3]], [[5, 6, 7, 8], [9, 10]], [[11, 12]]]
    for batch in batches:
        a = graphed.generate(batch, 20, temperature=0, logprobs=True)
        b = eager.generate(batch, 20, temperature=0, logprobs=True)
        assert a[0] == b[0]
        err = max(abs(x - y) for ra, rb in zip(a[1], b[1]) for x, y in zip(ra, rb))
        print(f"graph vs eager, batch {len(batch)}: max logprob difference {err:.2e}")
        assert err < 1e-4
    assert sorted(graphed.decode_step.graphs) == [1, 2]


def test_int8_on_cuda_matches_float64_and_bf16_model(ckpt: Path, meta_tokenizer_path) -> None:
    """Int8Linear on a GPU (widened for torch's product; llama.gpu_matvec's kernel is tested in
    test_gpu_matvec_kernel_on_cuda): the product against a float64 formula of the dequantized
    weights, and an int8 build's logits against the bf16 build's."""
    from llama import Llama
    from llama.quantize import Int8Linear

    layer = Int8Linear.from_float(torch.randn(384, 256, generator=torch.Generator().manual_seed(0))).cuda()
    x = torch.randn(3, 256, device="cuda").bfloat16()
    want = x.double() @ (layer.weight.double() * layer.scale.double()[:, None]).T
    err = _rel(layer(x), want)
    print(f"int8 product on cuda vs float64 rel err {err:.2e}")
    assert err < 1e-2
    bf16 = Llama.build(str(ckpt), str(meta_tokenizer_path), max_seq_len=64, max_batch_size=1, device="cuda", dtype="bf16")
    int8 = Llama.build(str(ckpt), str(meta_tokenizer_path), max_seq_len=64, max_batch_size=1, device="cuda", dtype="bf16",
                       quantize="int8")  # fmt: skip
    tokens = torch.randint(0, ARGS.vocab_size, (1, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    err = _rel(int8.model(tokens), bf16.model(tokens))
    print(f"int8 vs bf16 model logits rel err {err:.2e}")
    assert err < 5e-2
    out, _ = int8.generate([[1, 2, 3]], 8, temperature=0)  # through the CUDA graph
    assert len(out[0]) == 8


@torch.no_grad()
def test_int4_cuda_kernel_matches_float64() -> None:
    """torch's CUDA int4 kernel on our nibbles (llama.quantize.int4.pack_for_cuda) against float64
    x @ dequant(q).T: bf16 activations and bf16 output, so within 1e-2 of the largest output."""
    from llama.quantize.int4 import Int4Linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 1024, generator=g)
    layer = Int4Linear.from_float(w)
    exact = layer.dequantized(torch.float64)
    layer = layer.to("cuda").pack()
    assert layer.layout == "cuda"
    for rows in (1, 7, 64):
        x = torch.randn(rows, 1024, generator=g).to(torch.bfloat16)
        ref = x.double() @ exact.T
        y = layer(x.cuda()).cpu()
        err = _rel(y, ref)
        print(f"int4 cuda kernel, {rows} rows: rel err {err:.2e}")
        assert err < 1e-2


@pytest.mark.parametrize("quantize, tolerance", [("int8", 0.05), ("int4", 0.45)])
@torch.no_grad()
def test_quantized_logits_close_to_bf16_on_cuda(ckpt: Path, meta_tokenizer_path, quantize: str, tolerance: float) -> None:
    """Each quantization's logits (norm, relative) against the bf16 model's on the GPU: random weights,
    so int8 (per-row, ~0.4% of each weight) and int4 (group 128, ~10%) are amplified by the random
    layers (measured on the CPU: int8 2%, int4 30%); the tolerances are 1.5-2.5x that."""
    from llama import Llama

    kwargs = dict(max_seq_len=64, max_batch_size=1, device="cuda", dtype="bf16", verify=False)
    bf16 = Llama.build(str(ckpt), str(meta_tokenizer_path), **kwargs)
    tokens = torch.randint(0, ARGS.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0)).cuda()
    ref = bf16.model(tokens, 0).float()
    del bf16
    q = Llama.build(str(ckpt), str(meta_tokenizer_path), quantize=quantize, **kwargs)
    out = q.model(tokens, 0).float()
    err = ((out - ref).norm() / ref.norm()).item()
    print(f"{quantize} vs bf16 logits on cuda: rel err {err:.3f}")
    assert err < tolerance
    text = q.text_completion(["Hello"], temperature=0.0, max_gen_len=4)
    assert isinstance(text[0]["generation"], str)
