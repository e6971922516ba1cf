"""Memory plan (llama/memory.py) for the released models, against the numbers in llama3-facts §1."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.memory import (
    GB,
    GiB,
    check_fits,
    kv_cache_bytes,
    main,
    parameter_count,
    plan_memory,
    quantized_weight_bytes,
    report,
)
from llama.model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parents[1]

COMMON = {"vocab_size": 128256, "norm_eps": 1e-05, "rope_theta": 500000.0}
PARAMS = {
    "8B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, **COMMON},
    "70B": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3, "multiple_of": 4096, **COMMON},
    "405B": {"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8, "ffn_dim_multiplier": 1.2, "multiple_of": 4096,
             "use_scaled_rope": True, **COMMON},  # fmt: skip
}
PARAMS["405B-MP16"] = {**PARAMS["405B"], "n_kv_heads": 16}  # Meta's MP16 files duplicate each KV head

# name: (parameters, 16-bit weights in GB rounded to 0.1, KV cache for 1,024 tokens in 16-bit, GiB)
EXPECTED = {
    "8B": (8_030_261_248, 16.1, 0.125),
    "70B": (70_553_706_496, 141.1, 0.3125),
    "405B": (405_853_388_800, 811.7, 0.4921875),
}


def args_of(name: str) -> ModelArgs:
    return ModelArgs.from_dict(PARAMS[name])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_released_models(name):
    args = args_of(name)
    count, weights_gb, kv_gib = EXPECTED[name]
    assert parameter_count(args) == count
    assert round(parameter_count(args) * 2 / GB, 1) == weights_gb
    assert kv_cache_bytes(args, 1024, 2) / GiB == kv_gib
    plan = plan_memory(args, max_seq_len=1024, max_batch_size=1, dtype=torch.bfloat16)
    assert plan.weight_bytes == 2 * count
    assert plan.kv_cache_bytes / GiB == kv_gib
    assert plan.total_bytes == plan.weight_bytes + plan.kv_cache_bytes
    # fp32 doubles, batch x length is what counts.
    assert plan_memory(args, 512, 2, torch.float32).kv_cache_bytes == 2 * plan.kv_cache_bytes


def test_405b_mp16_kv_cache():
    assert kv_cache_bytes(args_of("405B-MP16"), 1024, 2) / GiB == 0.984375


def test_parameter_count_matches_a_built_model():
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=32,
                     ffn_dim_multiplier=1.3)
    model = Transformer(args, device="meta")
    assert parameter_count(args) == sum(p.numel() for p in model.parameters())


def test_per_rank_division():
    args = args_of("70B")
    count = EXPECTED["70B"][0]
    whole = plan_memory(args, 8192, 1, torch.bfloat16)
    per_rank = plan_memory(args, 8192, 1, torch.bfloat16, world_size=8)
    assert per_rank.weight_bytes == 2 * count // 8
    assert per_rank.kv_cache_bytes * 8 == whole.kv_cache_bytes  # one of 8 KV heads per rank
    assert "per rank (8 ranks)" in per_rank.describe()
    # More ranks than KV heads: every rank still holds one whole (replicated) KV head.
    eight_b = args_of("8B")
    one_head = 2 * 32 * 1 * 128 * 2 * 4096
    assert plan_memory(eight_b, 4096, 1, torch.bfloat16, world_size=16).kv_cache_bytes == one_head
    mp16 = args_of("405B-MP16")
    assert plan_memory(mp16, 1024, 1, torch.bfloat16, world_size=16).kv_cache_bytes == 2 * 126 * 128 * 2 * 1024


def test_check_fits_raises_with_numbers():
    plan = plan_memory(args_of("8B"), 8192, 4, torch.bfloat16)
    check_fits(plan, "cpu", available=plan.total_bytes)  # exactly enough: fine
    with pytest.raises(MemoryError) as e:
        check_fits(plan, "cpu", available=plan.weight_bytes + GiB)
    msg = str(e.value)
    assert plan.describe() in msg and f"{(plan.weight_bytes + GiB) / GiB:.2f} GiB is free" in msg
    assert "lower max_seq_len or max_batch_size" in msg
    kv_per_token = plan.kv_cache_bytes // (8192 * 4)
    assert f"about {GiB // kv_per_token} tokens" in msg
    with pytest.raises(MemoryError, match="weights alone do not fit"):
        check_fits(plan, "cpu", available=GiB)


def test_check_fits_unknown_availability_passes(monkeypatch):
    import llama.memory

    monkeypatch.setattr(llama.memory, "available_bytes", lambda device: None)
    check_fits(plan_memory(args_of("405B"), 131072, 8), "cpu")


def _write_params(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name / "params.json"
    path.parent.mkdir()
    path.write_text(json.dumps(PARAMS[name]))
    return path


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_report_prints_release_numbers(name, tmp_path, capsys):
    count, weights_gb, kv_gib = EXPECTED[name]
    main(str(_write_params(tmp_path, name).parent), max_seq_len=1024, max_batch_size=1)
    out = capsys.readouterr().out
    assert f"{count:,}" in out
    assert f"bf16/fp16      {count * 2 / GiB:8.2f} GiB" in out  # the post's GB are 10^9 bytes: one unit here
    assert f"{kv_gib:8.4f} GiB" in out
    assert " GB" not in out


@pytest.mark.slow  # a child process
def test_memory_cli(tmp_path):
    params = _write_params(tmp_path, "405B")
    run = subprocess.run(
        [sys.executable, "-m", "llama.memory", str(params), "--max_seq_len", "1024", "--world_size", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "405,853,388,800" in run.stdout and "755.96 GiB" in run.stdout and "0.4922 GiB" in run.stdout
    assert "per rank (8 ranks)" in run.stdout


# Llama 3 8B by hand (dim 4096, 32 layers, 32 heads, 8 KV heads, head_dim 128, FFN 14336, vocab 128256):
#   per layer: wq, wo 4096x4096 = 16,777,216 each; wk, wv 1024x4096 = 4,194,304 each;
#   w1, w3 14336x4096 and w2 4096x14336 = 58,720,256 each -> 218,103,808 projection weights a layer;
#   x 32 = 6,979,321,856, + output 128256x4096 = 525,336,576 -> 7,504,658,432 quantized weights;
#   the rest (embedding 525,336,576 + norms 266,240) stays bf16: 1,051,205,632 bytes.
#   Output rows: (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096) x 32 + 128256 = 1,504,512.
INT8_8B = 7_504_658_432 + 4 * 1_504_512 + 1_051_205_632  # 8,561,882,112
#   int4: half a byte each + (bf16 scale + bf16 zero point) per 128 weights: 58,630,144 groups.
INT4_8B = 7_504_658_432 // 2 + 4 * 58_630_144 + 1_051_205_632  # 5,038,055,424
#   fp8 (Meta's recipe): w1 w3 w2 of layers 1..30 only: 30 x 176,160,768 = 5,284,823,040 one-byte
#   weights + 30 x (14336 + 14336 + 4096) float32 row scales; the other 2,745,438,208 weights bf16.
FP8_8B = 5_284_823_040 + 4 * 30 * 32_768 + 2 * 2_745_438_208  # 10,779,631,616
#   int8 on 2 ranks: half of every weight; rows of column-parallel layers halved, row-parallel
#   (wo, w2) keep all 4096: (2048 + 512 + 512 + 7168 + 7168 + 4096 + 4096) x 32 + 64128 = 883,328.
INT8_8B_2RANKS = 7_504_658_432 // 2 + 4 * 883_328 + 1_051_205_632 // 2  # 4,281,465,344


def test_quantized_bytes_8b():
    args = args_of("8B")
    assert quantized_weight_bytes(args, "int8") == INT8_8B == 8_561_882_112
    assert quantized_weight_bytes(args, "int4") == INT4_8B == 5_038_055_424
    assert quantized_weight_bytes(args, "fp8") == FP8_8B == 10_779_631_616
    assert quantized_weight_bytes(args, "int8", world_size=2) == INT8_8B_2RANKS == 4_281_465_344
    # float32 for the unquantized rest: only those bytes double.
    assert quantized_weight_bytes(args, "int8", torch.float32) == INT8_8B + 1_051_205_632
    plan = plan_memory(args, 1024, 1, torch.bfloat16, quantize="int4")
    assert plan.weight_bytes == INT4_8B
    assert plan.kv_cache_bytes == plan_memory(args, 1024, 1, torch.bfloat16).kv_cache_bytes  # KV stays bf16
    with pytest.raises(ValueError, match="unknown quantization 'int3'; use one of int8, int4, fp8"):
        quantized_weight_bytes(args, "int3")


def test_fp8_405b_matches_meta_shard_size():
    """Meta's 405B FP8 folder: each of the 8 consolidated.NN.pth files is 60,903,742,309 bytes
    (download-layouts.md); our per-rank bytes, less the scales (stored in fp8_scales_NN.pt), agree
    to within the pickle's overhead (the bf16 MP8 files carry the same ~7.6 MB over 2 bytes a weight)."""
    args = args_of("405B")
    scales = 4 * 124 * (53248 // 8 * 2 + 16384)  # float32 row scales of rank r's w1, w3 slices and w2
    payload = quantized_weight_bytes(args, "fp8", world_size=8) - scales
    assert 0 < 60_903_742_309 - payload < 8_000_000, payload


def test_report_lists_quantized_sizes():
    text = report(args_of("8B"), 1024, 1, torch.bfloat16)
    rows = (("int8 +per-row scales", INT8_8B), ("int4 +group 128", INT4_8B), ("fp8 +Meta's FP8 folders", FP8_8B))
    for label, nbytes in rows:
        assert re.search(rf"{label} +{nbytes / GiB:.2f} GiB", text), (label, text)
