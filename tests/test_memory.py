"""Memory plan (llama/memory.py) for the released models, against the numbers in llama3-facts §1."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.memory import GB, GiB, check_fits, kv_cache_bytes, main, parameter_count, plan_memory
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
    assert f"{weights_gb:.1f} GB" in out
    assert f"{kv_gib:8.4f} GiB" in out


@pytest.mark.slow
def test_memory_cli(tmp_path):
    params = _write_params(tmp_path, "405B")
    run = subprocess.run(
        [sys.executable, "-m", "llama.memory", str(params), "--max_seq_len", "1024", "--world_size", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "405,853,388,800" in run.stdout and "811.7 GB" in run.stdout and "0.4922 GiB" in run.stdout
    assert "per rank (8 ranks)" in run.stdout
