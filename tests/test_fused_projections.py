"""Fused projections (llama/fused_projections.py): [wq; wk; wv] and [w1; w3] joined into one product each.

Each output row is the same dot product of the same weight row with the same input: on the CPUs
tried torch computes it in the same order whatever the matrix's height, and the fused model's
logits equal the plain model's bit for bit (float32, bf16 and int8; prefill, eager and
static-shape decode). The tests allow last-bit differences (``assert_same``), which another
CPU's BLAS could make, and nothing more.
"""

import gc
import weakref

import pytest
import torch
from torch import nn

from llama import fast, fused_projections
from llama.checkpoint import random_state_dict
from llama.fast import DecodeAttention, FastLinear, apply_fast_paths, fuse_projections_here
from llama.fused_projections import FusedGateUp, FusedQKV, Rows, fuse_projections
from llama.model import ModelArgs, Transformer
from llama.quantize import Int8Linear, quantize_model

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, use_scaled_rope=True)
NAMES = {"attention": ("wq", "wk", "wv"), "feed_forward": ("w1", "w3")}

pytestmark = pytest.mark.usefixtures("one_thread")


def model(dtype: torch.dtype = torch.float32, seed: int = 0, int8: bool = False) -> Transformer:
    m = Transformer(ARGS, dtype=dtype)
    m.load_state_dict(random_state_dict(ARGS, seed=seed, dtype=dtype))
    m.requires_grad_(False)
    if int8:
        quantize_model(m)
    return m


def weight_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


@torch.no_grad()
def run(m: Transformer) -> list[torch.Tensor]:
    """Logits of a prefill, two eager decode steps and two static-shape steps (tensor start_pos)."""
    tokens = torch.randint(0, ARGS.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    out = [m(tokens)]  # no cache: the full-sequence forward
    m.setup_cache(2, 24)
    out.append(m(tokens[:, :8], 0))
    out += [m(tokens[:, i : i + 1], i) for i in (8, 9)]
    out += [m(tokens[:, i : i + 1], torch.tensor(i)) for i in (10, 11)]
    m.clear_cache()
    return out


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], rel: float = 1e-5) -> None:
    """Equal up to ``rel`` of the largest logit: bit for bit on the CPUs tried, but a BLAS may block a
    taller matrix differently on another CPU (last-bit differences, which bf16 rounding between layers
    can grow to a bf16 unit). A wrong join (gate and up swapped, a row offset) is off by far more."""
    for i, (x, y) in enumerate(zip(a, b)):
        err = (x.double() - y.double()).abs().max().item()
        assert err <= rel * y.abs().max().item(), f"call {i}: fused logits differ by up to {err}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_equal_the_unfused_model(dtype):
    plain, joined = model(dtype), model(dtype)
    assert fuse_projections(joined) == 2 * ARGS.n_layers
    assert isinstance(joined.layers[0].attention, FusedQKV) and isinstance(joined.layers[0].feed_forward, FusedGateUp)
    assert_same(run(plain), run(joined), 1e-5 if dtype == torch.float32 else 2e-2)


def test_int8_logits_equal_the_unfused_int8_model():
    plain, joined = model(int8=True), model(int8=True)
    assert fuse_projections(joined) == 2 * ARGS.n_layers
    attention = joined.layers[0].attention
    assert isinstance(attention.wqkv, Int8Linear) and attention.wqkv.weight.dtype == torch.int8
    assert torch.equal(attention.wk.scale, plain.layers[0].attention.wk.scale)
    assert_same(run(plain), run(joined))


def test_fast_paths_keep_working_and_stay_fused():
    """DecodeAttention's one-token attention runs in the fused attention, before and after
    apply_fast_paths is run again on the fused model."""
    plain = apply_fast_paths(model(torch.bfloat16), torch.float32)
    joined = apply_fast_paths(model(torch.bfloat16), torch.float32)
    fuse_projections(joined, (nn.Linear, FastLinear))
    attention = joined.layers[0].attention
    assert isinstance(attention, DecodeAttention) and isinstance(attention, FusedQKV)
    assert isinstance(attention.wqkv, FastLinear) and attention.wqkv.compute_dtype == torch.float32
    expected = run(plain)
    assert_same(expected, run(joined), 2e-2)  # bf16 weights
    apply_fast_paths(joined, torch.float32)  # again: the classes keep their fused mixins
    attention = joined.layers[0].attention
    assert isinstance(attention, DecodeAttention) and isinstance(attention, FusedQKV)
    assert isinstance(attention.wqkv, FastLinear) and isinstance(attention.wqkv, fused_projections.Joined)
    assert list(joined.state_dict()) == list(plain.state_dict())
    assert_same(expected, run(joined), 2e-2)  # bf16 weights


@pytest.mark.parametrize("int8", [False, True])
def test_weights_are_views_and_the_old_tensors_are_freed(int8):
    m = model(int8=int8)
    before = weight_bytes(m)
    old = [
        weakref.ref(getattr(block, group)._modules[name]._buffers["weight"] if int8 else getattr(getattr(block, group), name).weight)
        for block in m.layers
        for group, names in NAMES.items()
        for name in names
    ]
    fuse_projections(m)
    gc.collect()
    assert all(ref() is None for ref in old), "an unfused weight is still referenced"
    assert weight_bytes(m) == before
    for block in m.layers:
        for group, joined in (("attention", "wqkv"), ("feed_forward", "w13")):
            module = getattr(block, group)
            layer = getattr(module, joined)
            whole = layer._buffers["weight"] if int8 else layer._parameters["weight"]
            start = 0
            for name in NAMES[group]:
                rows = getattr(module, name)
                assert isinstance(rows, Rows)
                assert rows.weight.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
                assert rows.weight.data_ptr() == whole[start:].data_ptr()
                start += rows.weight.shape[0]
            assert start == whole.shape[0]


def test_checkpoint_names_read_and_write_the_joined_matrix():
    sd = random_state_dict(ARGS, seed=0, dtype=torch.float32)
    m = model()
    fuse_projections(m)
    assert torch.equal(m.layers[0].attention.wq.weight, sd["layers.0.attention.wq.weight"])
    assert torch.equal(m.layers[1].feed_forward.w3.weight, sd["layers.1.feed_forward.w3.weight"])
    saved = m.state_dict()
    assert list(saved) == list(sd)  # the checkpoint's keys, in its order: no wqkv / w13
    assert all(torch.equal(saved[k], sd[k]) for k in sd)
    # Loading other weights writes through the views into the joined matrices.
    other = random_state_dict(ARGS, seed=5, dtype=torch.float32)
    m.load_state_dict(other)
    assert torch.equal(m.layers[0].attention.wqkv.weight[: ARGS.dim], other["layers.0.attention.wq.weight"])
    assert_same(run(model(seed=5)), run(m))
    with pytest.raises(RuntimeError, match="wk.weight"):
        m.load_state_dict({k: v for k, v in other.items() if k != "layers.0.attention.wk.weight"})
    # A layer called on its own still computes its rows' product.
    x = torch.randn(3, ARGS.dim)
    assert torch.equal(m.layers[0].attention.wv(x), torch.nn.functional.linear(x, other["layers.0.attention.wv.weight"]))


def test_views_follow_the_joined_matrix_through_to():
    m = model()
    fuse_projections(m)
    m.to(torch.float64)
    attention = m.layers[0].attention
    assert attention.wq.weight.dtype == torch.float64
    assert attention.wk.weight.data_ptr() == attention.wqkv.weight[ARGS.dim :].data_ptr()


class Sharded(nn.Module):
    """Stands in for fairscale's ColumnParallelLinear: a weight, but not a plain linear layer."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


def test_layers_that_are_not_plain_are_left_alone():
    m = model()
    a0, a1 = m.layers[0].attention, m.layers[1].attention
    a0.wk = Sharded(a0.wk.weight.detach())  # a block with a foreign layer: its attention stays
    a1.wv = Int8Linear.from_float(a1.wv.weight.detach())  # a mix of float and int8: stays
    assert fuse_projections(m) == ARGS.n_layers  # the two feed-forwards only
    assert type(a0.wq) is nn.Linear and type(a1.wq) is nn.Linear and not isinstance(a0, FusedQKV)
    q = model(int8=True)
    for block in q.layers:
        block.attention.wq.parallel = "gather"  # one rank's slice of a column-parallel int8 layer
    assert fuse_projections(q) == ARGS.n_layers
    assert not isinstance(q.layers[0].attention, FusedQKV)
    assert fuse_projections(model(), linear_types=(FastLinear,)) == 0  # nn.Linear not among the classes asked for


def test_fused_twice_is_fused_once():
    m = model()
    assert fuse_projections(m) == 2 * ARGS.n_layers
    assert fuse_projections(m) == 0


def test_where_speed_up_fuses(monkeypatch):
    monkeypatch.delenv("LLAMA_FUSE_PROJECTIONS", raising=False)
    bf16 = model(torch.bfloat16)
    assert fuse_projections_here(bf16)  # the C step not applied: bf16 fuses on the CPU
    assert not fuse_projections_here(bf16, world_size=2)  # several ranks: left alone
    assert not fuse_projections_here(model())  # float32 on the CPU: measured a wash
    assert fuse_projections_here(model(int8=True))
    monkeypatch.setenv("LLAMA_FUSE_PROJECTIONS", "0")
    assert not fuse_projections_here(bf16)


@pytest.mark.parametrize("setting", ["1", "0"])
def test_speed_up_fuses_unless_turned_off(monkeypatch, setting):
    """speed_up on a bf16 CPU model with the C step off: fused, unless LLAMA_FUSE_PROJECTIONS=0;
    the greedy path through the fast paths gives the unfused model's logits."""
    monkeypatch.setenv("LLAMA_FUSED", "0")
    monkeypatch.setenv("LLAMA_FUSE_PROJECTIONS", setting)
    m = fast.speed_up(model(torch.bfloat16))
    assert isinstance(m.layers[0].attention, FusedQKV) == (setting == "1")
    assert isinstance(m.layers[0].feed_forward.w1, Rows) == (setting == "1")


def test_not_fused_where_the_c_step_runs(monkeypatch):
    """With llama.fused's C step applied (bf16 on the CPU), the blocks keep their separate layers."""
    monkeypatch.delenv("LLAMA_FUSED", raising=False)
    monkeypatch.delenv("LLAMA_FUSE_PROJECTIONS", raising=False)
    m = fast.speed_up(model(torch.bfloat16))
    if not any(isinstance(b, fast.fused.FusedBlock) for b in m.layers):
        pytest.skip("the native library is not available here: llama.fused not applied")
    assert not isinstance(m.layers[0].attention, FusedQKV)
    assert isinstance(m.layers[0].attention.wq, nn.Linear)
