"""Meta's FP8 checkpoint folders (Llama 3.1 405B "FP8"), faked small and written in Meta's format.

The fixture follows the published facts, not our loader: a bf16 checkpoint whose feed-forward
weights w1, w3, w2 of every layer but the first and the last are replaced, in each shard file, by
FP8 e4m3 values with one float32 scale per output row of that file's slice (scale = the row's
largest |w| / 448, Meta's per-row recipe), the scales saved in ``fp8_scales_{shard}.pt`` under
``"{layer}_feed_forward.{w1|w3|w2}_{shard}"``. Loading must give value x scale exactly (float64
formula, rounded once), and the model must compute what a bf16 model of those weights computes.
"""

from pathlib import Path

import pytest
import torch

from llama import fp8
from llama.checkpoint import (
    expected_shapes,
    load_params,
    load_state_dict,
    load_transformer,
    random_state_dict,
    write_checkpoint,
)
from llama.model import ModelArgs

pytestmark = pytest.mark.usefixtures("one_thread")

# 4 layers: 0 and 3 stay bf16, 1 and 2 are FP8. FFN width 192 and 4 heads split over 1, 2, 4 ranks.
ARGS = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
FP8_LAYERS = (1, 2)
SPLIT = {"w1": 0, "w3": 0, "w2": 1}  # w1/w3 split by rows across shards, w2 by columns


def meta_fp8_folder(path: Path, n_shards: int, seed: int = 0, args: ModelArgs = ARGS) -> dict[str, torch.Tensor]:
    """Write an FP8 folder of ``n_shards`` files; returns the full dequantized weights in float64."""
    write_checkpoint(path, random_state_dict(args, seed, torch.bfloat16), args, n_shards)
    deq: dict[str, list[torch.Tensor]] = {}
    for i in range(n_shards):
        shard_path = path / f"consolidated.{i:02d}.pth"
        sd = torch.load(shard_path, weights_only=True)
        scales = {}
        for layer in range(1, args.n_layers - 1):  # all but the first and the last
            for w in SPLIT:
                key = f"layers.{layer}.feed_forward.{w}.weight"
                local = sd[key].double()  # this file's slice [out, in_local] or [out_local, in]
                scale = local.abs().amax(dim=1) / 448.0
                value = (local / scale[:, None]).to(torch.float8_e4m3fn)
                scale = scale.float()
                sd[key] = value
                scales[f"{layer}_feed_forward.{w}_{i}"] = scale
                deq.setdefault(key, []).append(value.double() * scale.double()[:, None])
        torch.save(sd, shard_path)
        torch.save(scales, path / f"fp8_scales_{i}.pt")
    return {k: torch.cat(parts, dim=SPLIT[k.split(".")[-2]]) for k, parts in deq.items()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[int, tuple[Path, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("fp8")
    return {n: (root / f"fp8-{n}", meta_fp8_folder(root / f"fp8-{n}", n, seed=n)) for n in (1, 2)}


def test_fixture_is_meta_format(folders):
    """FP8 only in the middle layers' FFN; the dequantized weights are near the bf16 originals."""
    path, deq = folders[2]
    sd = torch.load(path / "consolidated.01.pth", weights_only=True)
    fp8_keys = sorted(k for k, t in sd.items() if t.dtype == torch.float8_e4m3fn)
    assert fp8_keys == sorted(f"layers.{i}.feed_forward.{w}.weight" for i in FP8_LAYERS for w in SPLIT)
    assert sorted(torch.load(path / "fp8_scales_1.pt", weights_only=True)) == sorted(
        f"{i}_feed_forward.{w}_1" for i in FP8_LAYERS for w in SPLIT
    )
    original = random_state_dict(ARGS, 2, torch.bfloat16)
    for key, w in deq.items():
        # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 of the row's scale-free value.
        err = (w - original[key].double()).abs() / original[key].double().abs().amax(dim=1, keepdim=True)
        assert err.max() <= 2**-4 * 1.01, key
        assert not torch.equal(w, original[key].double()), key  # really quantized


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantized_exactly(folders, n_shards, dtype):
    """Every FP8 weight equals value x row scale in float64 rounded once to ``dtype``; the rest is untouched."""
    path, deq = folders[n_shards]
    state = load_state_dict(path, load_params(path), dtype=dtype)
    bf16 = random_state_dict(ARGS, n_shards, torch.bfloat16)
    assert set(state) == set(expected_shapes(ARGS))
    for key, t in state.items():
        assert t.dtype == dtype, key
        want = deq[key].to(dtype) if key in deq else bf16[key].to(dtype)
        assert torch.equal(t, want), key


def test_keeps_checkpoint_dtype(folders):
    """dtype None: the FP8 weights become the checkpoint's own dtype (bf16), like every other tensor."""
    path, deq = folders[1]
    state = load_state_dict(path, load_params(path))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert torch.equal(state["layers.1.feed_forward.w2.weight"], deq["layers.1.feed_forward.w2.weight"].bfloat16())


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_take_their_slices(folders, world):
    """2 FP8 files on 2 or 4 ranks: each rank's w1/w3 rows and w2 columns, with their own file's scales."""
    path, deq = folders[2]
    args = load_params(path)
    for rank in range(world):
        state = load_state_dict(path, args, rank, world, torch.float32)
        for key, full in deq.items():
            d = SPLIT[key.split(".")[-2]]
            size = full.shape[d] // world
            assert torch.equal(state[key], full.narrow(d, rank * size, size).float()), (key, rank)


def test_logits_equal_bf16_model_of_dequantized_weights(folders, tmp_path):
    """The FP8 folder's model computes exactly what a plain bf16 folder of the dequantized weights computes."""
    path, deq = folders[2]
    full = random_state_dict(ARGS, 2, torch.bfloat16)
    full.update({k: w.bfloat16() for k, w in deq.items()})
    write_checkpoint(tmp_path / "bf16", full, ARGS, 1)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            got = load_transformer(path, "cpu", dtype)(tokens)
            want = load_transformer(tmp_path / "bf16", "cpu", dtype)(tokens) if dtype == torch.bfloat16 else None
            if want is None:  # float32: the bf16 rounding of the reference would differ; use float32 weights
                full32 = {**{k: v.float() for k, v in full.items()}, **{k: w.float() for k, w in deq.items()}}
                write_checkpoint(tmp_path / "fp32", full32, ARGS, 1)
                want = load_transformer(tmp_path / "fp32", "cpu", dtype)(tokens)
            assert torch.equal(got, want), dtype


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _edit_scales(path: Path, shard: int, edit) -> None:
    scales = torch.load(path / f"fp8_scales_{shard}.pt", weights_only=True)
    edit(scales)
    torch.save(scales, path / f"fp8_scales_{shard}.pt")


def test_missing_scale_is_named(folders, tmp_path):
    path = _copy(folders[2][0], tmp_path / "c")
    _edit_scales(path, 1, lambda s: s.pop("2_feed_forward.w3_1"))
    with pytest.raises(ValueError, match=r"fp8_scales_1\.pt: missing scale\(s\) \['2_feed_forward\.w3_1'\]"):
        load_state_dict(path, load_params(path))


def test_stray_scale_is_named(folders, tmp_path):
    """A scale for a weight that is not FP8 (layer 0 stays bf16) or for another shard is an error."""
    path = _copy(folders[2][0], tmp_path / "c")
    _edit_scales(path, 0, lambda s: s.update({"0_feed_forward.w1_0": torch.ones(96)}))
    with pytest.raises(ValueError, match=r"stray scale '0_feed_forward\.w1_0'.*layers\.0\.feed_forward\.w1\.weight"):
        load_state_dict(path, load_params(path))
    path = _copy(folders[2][0], tmp_path / "d")
    _edit_scales(path, 0, lambda s: s.update({"1_feed_forward.w1_1": s["1_feed_forward.w1_0"]}))
    with pytest.raises(ValueError, match=r"fp8_scales_0\.pt: unexpected key '1_feed_forward\.w1_1'"):
        load_state_dict(path, load_params(path))


def test_missing_or_extra_scales_file(folders, tmp_path):
    path = _copy(folders[2][0], tmp_path / "c")
    (path / "fp8_scales_1.pt").unlink()
    missing = r"consolidated\.01\.pth holds 6 FP8 weight.*fp8_scales_1\.pt is missing"
    with pytest.raises(FileNotFoundError, match=missing):
        load_state_dict(path, load_params(path))
    path = _copy(folders[2][0], tmp_path / "d")
    (path / "fp8_scales_2.pt").write_bytes((path / "fp8_scales_1.pt").read_bytes())
    with pytest.raises(ValueError, match=r"fp8_scales_2\.pt: FP8 scales for shard 2, but the folder has 2"):
        load_state_dict(path, load_params(path))


def test_scales_without_fp8_weights(tmp_path):
    """A bf16 folder with an fp8_scales file beside it: the scales belong to no weight."""
    write_checkpoint(tmp_path, random_state_dict(ARGS, 0), ARGS, 1)
    torch.save({"1_feed_forward.w1_0": torch.ones(192)}, tmp_path / "fp8_scales_0.pt")
    with pytest.raises(ValueError, match=r"fp8_scales_0\.pt: FP8 scales, but .*consolidated\.00\.pth holds no FP8"):
        load_state_dict(tmp_path, ARGS)


def test_scale_shapes(folders, tmp_path):
    """[out, 1] scales load like [out]; any other shape is refused with both shapes."""
    path, deq = folders[1]
    path = _copy(path, tmp_path / "col")
    _edit_scales(path, 0, lambda s: s.update({"1_feed_forward.w2_0": s["1_feed_forward.w2_0"][:, None]}))
    state = load_state_dict(path, load_params(path), dtype=torch.float32)
    assert torch.equal(state["layers.1.feed_forward.w2.weight"], deq["layers.1.feed_forward.w2.weight"].float())
    _edit_scales(path, 0, lambda s: s.update({"1_feed_forward.w2_0": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"scale '1_feed_forward\.w2_0' is \(3,\), expected floats of shape \(64,\)"):
        load_state_dict(path, load_params(path))


def test_fp8_outside_feed_forward_refused(tmp_path):
    sd = random_state_dict(ARGS, 0)
    sd["layers.1.attention.wq.weight"] = sd["layers.1.attention.wq.weight"].to(torch.float8_e4m3fn)
    write_checkpoint(tmp_path, sd, ARGS, 1)
    # No fp8_scales_N.pt here, so the loader refuses the float8 tensor as it refuses any non-float one.
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.wq\.weight has dtype float8_e4m3fn"):
        load_state_dict(tmp_path, ARGS)


def test_dequantize_blocks_match_one_product(monkeypatch):
    """Row blocks (which bound the float64 temporary) change nothing: a tiny block size, same result."""
    g = torch.Generator().manual_seed(1)
    value = (torch.randn(37, 48, generator=g) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(37, generator=g) + 0.01
    want = (value.double() * scale.double()[:, None]).to(torch.bfloat16)
    monkeypatch.setattr(fp8, "_BLOCK_ELEMENTS", 100)  # two rows a block
    assert torch.equal(fp8.dequantize(value, scale, torch.bfloat16), want)


# --- FP8 kept as FP8 (the GPU path): its arithmetic checked on CPU, where torch._scaled_mm also runs.

def _cpu_rowwise_scaled_mm() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes one scale per row (torch 2.11's takes one per tensor)."""
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


CPU_ROWWISE = _cpu_rowwise_scaled_mm()
needs_scaled_mm = pytest.mark.skipif(
    not CPU_ROWWISE, reason="this torch's CPU _scaled_mm has no row-wise scales (torch 2.11's has per-tensor only)"
)


def test_quantize_rows_follows_meta_recipe():
    """A row's largest |x| becomes 448 (FP8's largest value); the row maximum is bounded by 1200, beyond
    which entries saturate at +-448."""
    x = torch.tensor([[3.0, -1.5, 0.25, 0.0], [5000.0, 600.0, -2400.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    q, s = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 1) and s.dtype == torch.float32
    assert s[0, 0].item() == pytest.approx(3.0 / 448) and q[0, 0].float().item() == 448.0
    assert s[1, 0].item() == pytest.approx(1200.0 / 448)
    assert q[1].float().tolist()[0] == 448.0 and q[1].float().tolist()[2] == -448.0  # saturated
    assert q[1, 1].float().item() == pytest.approx(600 / (1200 / 448), rel=2**-4)  # 224: within the bound
    assert torch.equal(q[2].float(), torch.zeros(4))


@needs_scaled_mm
@pytest.mark.parametrize("out_dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2**-8)])
def test_fp8_linear_matches_float64_formula(out_dtype, tol):
    """y = (x values x x scales) @ (w values x w scales).T, the FP8 products summed exactly enough."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g, dtype=torch.float32) * 3
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    w_scale = (w.abs().amax(dim=1) / 448).float()
    value = (w / w_scale.double()[:, None]).to(torch.float8_e4m3fn)
    y = fp8.fp8_linear(x, value, w_scale, out_dtype=out_dtype)
    assert y.shape == (5, 48) and y.dtype == x.dtype
    xq, xs = fp8.quantize_rows(x)
    ref = (xq.double() * xs.double()) @ (value.double() * w_scale.double()[:, None]).T
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < tol
    # And near the unquantized product: FP8 keeps 3 mantissa bits of both operands.
    exact = x.double() @ (value.double() * w_scale.double()[:, None]).T
    assert ((y.double() - exact).abs().max() / exact.abs().max()).item() < 0.05


def test_keep_fp8_loads_values_and_scales_as_stored(folders):
    """One file per rank: the FP8 tensors and their scales, untouched; other rank counts dequantize."""
    path, deq = folders[2]
    args = load_params(path)
    for rank in range(2):
        state = load_state_dict(path, args, rank, 2, torch.bfloat16, keep_fp8=True)
        sd = torch.load(path / f"consolidated.{rank:02d}.pth", weights_only=True)
        scales = torch.load(path / f"fp8_scales_{rank}.pt", weights_only=True)
        for layer in FP8_LAYERS:
            for w in SPLIT:
                key = f"layers.{layer}.feed_forward.{w}"
                assert state[key + ".weight"].dtype == torch.float8_e4m3fn
                assert torch.equal(state[key + ".weight"].view(torch.uint8), sd[key + ".weight"].view(torch.uint8))
                assert torch.equal(state[key + ".scale"], scales[f"{layer}_feed_forward.{w}_{rank}"])
        assert state["layers.0.feed_forward.w1.weight"].dtype == torch.bfloat16
    state = load_state_dict(path, args, 0, 1, torch.bfloat16, keep_fp8=True)  # 2 files on 1 rank
    assert not any(k.endswith(".scale") for k in state)
    assert torch.equal(state["layers.1.feed_forward.w2.weight"], deq["layers.1.feed_forward.w2.weight"].bfloat16())


@needs_scaled_mm
def test_kept_fp8_model_near_dequantized_model(folders):
    """The model with FP8 layers (activations quantized per row) stays close to the bf16 model of the
    same weights; the only difference is the activations' FP8 rounding in layers 1 and 2."""
    path, _ = folders[1]
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    kept = load_transformer(path, "cpu", torch.float32, keep_fp8=True)
    kinds = [type(kept.layers[i].feed_forward.w1).__name__ for i in range(4)]
    assert kinds == ["Linear", "Fp8Linear", "Fp8Linear", "Linear"]
    with torch.inference_mode():
        got = kept(tokens)
        want = load_transformer(path, "cpu", torch.float32)(tokens)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert 0 < rel < 0.05, rel


def test_keep_fp8_decision(folders, tmp_path, monkeypatch):
    """FP8 kept only for an FP8 folder on a CUDA GPU of compute capability >= 8.9, one file per rank."""
    path, _ = folders[2]
    assert not fp8.keep_fp8(path, "cpu", 2)
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    assert fp8.keep_fp8(path, "cuda:0", 2)
    assert not fp8.keep_fp8(path, "cuda:0", 4)  # 2 files on 4 ranks: dequantized
    capability["value"] = (8, 9)
    assert fp8.keep_fp8(path, "cuda:0", 2)
    capability["value"] = (8, 6)  # A10/A40/RTX 30xx: no FP8 tensor cores
    assert not fp8.keep_fp8(path, "cuda:0", 2)
    capability["value"] = (9, 0)
    write_checkpoint(tmp_path, random_state_dict(ARGS, 0), ARGS, 2)
    assert not fp8.keep_fp8(tmp_path, "cuda:0", 2)  # a bf16 folder


@needs_scaled_mm
@pytest.mark.slow
def test_kept_fp8_on_two_ranks(folders, tmp_path):
    """2 FP8 files on 2 gloo ranks, kept FP8: w1/w3 column slices and w2's row-parallel slice with its
    all-reduce. Both ranks give the same logits, near the dequantized model's (without w2's all-reduce
    the relative difference is about 0.5)."""
    from test_parallel import dist, torchrun

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    path, _ = folders[2]
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    worker = Path(__file__).parent / "mp" / "fp8_worker.py"
    torchrun(2, str(worker), str(path), str(tmp_path / "tokens.pt"), str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert got[0]["kinds"] == ["RowParallelLinear", "Fp8Linear", "Fp8Linear", "RowParallelLinear"]
    assert torch.equal(got[0]["logits"], got[1]["logits"])
    with torch.inference_mode():
        want = load_transformer(path, "cpu", torch.float32)(tokens)
    rel = ((got[0]["logits"] - want).abs().max() / want.abs().max()).item()
    assert 0 < rel < 0.05, rel


def test_reshard_writes_dequantized_bf16(folders, tmp_path):
    """``llama.reshard`` of an FP8 folder writes a plain bf16 folder (no scales files) of the dequantized weights."""
    from llama.reshard import reshard

    path, deq = folders[2]
    out = reshard(path, tmp_path / "bf16", 1, log=lambda _: None)
    assert not any(p.name.startswith("fp8_scales") for p in Path(out).iterdir())
    state = load_state_dict(out, load_params(out))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    for key, w in deq.items():
        assert torch.equal(state[key], w.bfloat16()), key


def test_quantize_weight_per_row():
    """Each row's largest |w| becomes exactly 448; value x scale is within FP8's rounding of w."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 96, generator=g).bfloat16()
    w[5] = 0  # an all-zero row: scale 1, values 0
    value, scale = fp8.quantize_weight(w)
    assert value.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (40,)
    w64 = w.double()
    amax = w64.abs().amax(dim=1)
    nonzero = amax > 0
    assert torch.allclose(scale.double()[nonzero], amax[nonzero] / 448, rtol=2**-23, atol=0)
    assert scale[5].item() == 1.0 and not value[5].float().any()
    assert torch.equal(value.float().abs().amax(dim=1)[nonzero], torch.full((39,), 448.0))
    back = value.double() * scale.double()[:, None]
    assert ((back - w64).abs() <= 2**-4 * amax[:, None]).all()


@needs_scaled_mm
def test_quantize_feed_forward_equals_meta_fp8_folder(folders, tmp_path):
    """quantize="fp8" of a bf16 folder gives the layers, values, scales and logits of Meta's FP8 folder
    of the same weights (the fixture, written from the published recipe)."""
    path, _ = folders[1]
    write_checkpoint(tmp_path, random_state_dict(ARGS, 1, torch.bfloat16), ARGS, 1)  # folders[1]'s bf16 weights
    model = load_transformer(tmp_path, "cpu", torch.float32)
    assert fp8.quantize_feed_forward(model) == 6
    assert fp8.quantize_feed_forward(model) == 0  # already FP8
    kept = load_transformer(path, "cpu", torch.float32, keep_fp8=True)
    for layer in FP8_LAYERS:
        for w in SPLIT:
            a, b = getattr(model.layers[layer].feed_forward, w), getattr(kept.layers[layer].feed_forward, w)
            assert type(a) is type(b) is fp8.Fp8Linear
            assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8)), (layer, w)
            assert torch.equal(a.scale, b.scale), (layer, w)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model(tokens), kept(tokens))


def test_build_quantize_argument_checked_first(tmp_path):
    from llama.generation import Llama

    with pytest.raises(ValueError, match=r"quantize='int3' is not supported: use one of \(None, 'int8', 'int4', 'fp8'\)"):
        Llama.build(str(tmp_path / "nowhere"), device="cpu", quantize="int3")
    with pytest.raises(ValueError, match=r"quantize='fp8' .*compute capability 8\.9 or more .*not cpu"):
        Llama.build(str(tmp_path / "nowhere"), device="cpu", quantize="fp8")


@needs_scaled_mm
def test_build_on_an_fp8_device(tmp_path, meta_tokenizer_path, monkeypatch):
    """Llama.build as on an FP8 GPU (the capability check stood in for; _scaled_mm runs on CPU): an FP8
    folder stays FP8, a bf16 folder with quantize="fp8" becomes the same model: same greedy text."""
    from llama.generation import Llama

    args = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
    meta_fp8_folder(tmp_path / "fp8", 1, seed=5, args=args)
    write_checkpoint(tmp_path / "bf16", random_state_dict(args, 5, torch.bfloat16), args, 1)
    monkeypatch.setattr(fp8, "fp8_supported", lambda device: True)
    outs = []
    for folder, quantize in (("fp8", None), ("bf16", "fp8")):
        llama = Llama.build(str(tmp_path / folder), str(meta_tokenizer_path), max_seq_len=32, max_batch_size=1,
                            device="cpu", dtype="fp32", quantize=quantize)  # fmt: skip
        kinds = [type(layer.feed_forward.w1).__name__ for layer in llama.model.layers]
        assert [kind == "Fp8Linear" for kind in kinds] == [False, True, True, False], (folder, kinds)
        outs.append(llama.text_completion(["The capital of France is"], temperature=0.0, max_gen_len=6))
    assert outs[0] == outs[1]


# --- On an FP8 GPU (skipped elsewhere; written for the session that has one).

needs_fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or not fp8.fp8_supported("cuda"), reason="needs a CUDA GPU of compute capability >= 8.9"
)


@needs_fp8_gpu
def test_fp8_linear_on_gpu_matches_float64_formula():
    """CUDA's row-wise _scaled_mm (bf16 output): the same activation quantization as on CPU, and the
    product within bf16 rounding of the float64 formula."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 256, generator=g) * 3).bfloat16()
    w = torch.randn(128, 256, generator=g, dtype=torch.float64)
    value, scale = fp8.quantize_weight(w)
    y = fp8.fp8_linear(x.cuda(), value.cuda(), scale.cuda())
    assert y.dtype == torch.bfloat16 and y.shape == (5, 128)
    xq, xs = fp8.quantize_rows(x)
    xq_gpu, xs_gpu = fp8.quantize_rows(x.cuda())
    # The values equal; the scales (amax / 448 in float32) within an ulp: CUDA's division may round the other way.
    assert torch.equal(xq_gpu.cpu().view(torch.uint8), xq.view(torch.uint8))
    assert torch.allclose(xs_gpu.cpu(), xs, rtol=2.5e-7, atol=0)
    ref = (xq.double() * xs.double()) @ (value.double() * scale.double()[:, None]).T
    assert ((y.cpu().double() - ref).abs().max() / ref.abs().max()).item() < 2**-7


@needs_fp8_gpu
def test_kept_fp8_model_on_gpu(folders):
    """The FP8 folder kept FP8 on the GPU (bf16 elsewhere) against the same on CPU in float32 where the
    CPU multiplies FP8 row-wise; elsewhere against the dequantized model (activations not rounded
    to FP8: the tolerance of test_kept_fp8_model_near_dequantized_model)."""
    path, _ = folders[1]
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        gpu = load_transformer(path, "cuda", torch.bfloat16, keep_fp8=True)(tokens.cuda()).float().cpu()
        cpu = load_transformer(path, "cpu", torch.float32, keep_fp8=CPU_ROWWISE)(tokens)
    err = ((gpu - cpu).abs().max() / cpu.abs().max()).item()
    print(f"FP8 on the GPU vs {'FP8' if CPU_ROWWISE else 'dequantized'} float32 on the CPU: rel err {err:.2e}")
    assert err < (3e-2 if CPU_ROWWISE else 5e-2)
