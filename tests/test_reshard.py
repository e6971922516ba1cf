"""Resharding: N checkpoint files on M ranks (load time) and ``python -m llama.reshard`` (on disk).

Everything here runs in one process: ``load_state_dict(..., rank, world_size)`` needs no process
group, so every (N, M) pair is checked tensor by tensor against ``shard_state_dict`` of the full
weights; tests/test_parallel.py runs the same checkpoints on real torchrun ranks.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama.reshard
from llama.checkpoint import (
    find_shards,
    load_params,
    load_state_dict,
    load_transformer,
    random_state_dict,
    shard_state_dict,
    write_checkpoint,
)
from llama.model import ModelArgs
from llama.reshard import reshard

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "gqa": ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=32),
    "kv1": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=256, multiple_of=32),
}
SHARDS = (1, 2, 4)
TOKENS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def full() -> dict[str, dict[str, torch.Tensor]]:
    """Full float32 random weights per config."""
    return {name: random_state_dict(args, seed=i, dtype=torch.float32) for i, (name, args) in enumerate(CONFIGS.items())}


@pytest.fixture(scope="module")
def ckpts(full, tmp_path_factory) -> dict[tuple[str, int], Path]:
    """(config, N) -> checkpoint folder of N shards, with a tokenizer.model and tokenizer_spec.json."""
    root = tmp_path_factory.mktemp("reshard")
    out = {}
    for name, args in CONFIGS.items():
        for n in SHARDS:
            path = out[name, n] = root / f"{name}-{n}"
            write_checkpoint(path, full[name], args, n)
            (path / "tokenizer.model").write_bytes(b"stand-in tokenizer bytes\n")
            (path / "tokenizer_spec.json").write_text('{"spec": 1}\n')
    return out


@pytest.fixture(scope="module")
def reference_logits(ckpts) -> dict[str, torch.Tensor]:
    """MP=1 logits of each config from its 1-shard checkpoint."""
    out = {}
    for name in CONFIGS:
        with torch.inference_mode():
            out[name] = load_transformer(ckpts[name, 1], "cpu", torch.float32)(TOKENS)
    return out


def assert_logits_match(ckpt: Path, ref: torch.Tensor) -> None:
    with torch.inference_mode():
        got = load_transformer(ckpt, "cpu", torch.float32)(TOKENS)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def assert_shards_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


# --- load-time resharding -------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("n", SHARDS)
@pytest.mark.parametrize("m", [1, 2, 4])
def test_n_files_on_m_ranks_give_the_split_of_the_full_weights(name, n, m, full, ckpts):
    """Rank r of M gets exactly shard r of the full weights, whatever N the files were saved as;
    with M > n_kv_heads each rank gets one whole copy of the KV head its query heads use."""
    args = load_params(ckpts[name, n])  # n_kv_heads = N when the files duplicate KV heads
    want, _ = shard_state_dict(with_kv_heads(full[name], CONFIGS[name], args.n_kv_heads), args, m)
    for rank in range(m):
        got = load_state_dict(ckpts[name, n], args, rank, m)
        assert_shards_equal(got, want[rank])
        if m > args.n_kv_heads:
            assert got["layers.0.attention.wk.weight"].shape == (args.head_dim, args.dim)


def with_kv_heads(full: dict[str, torch.Tensor], args: ModelArgs, n_kv: int) -> dict[str, torch.Tensor]:
    """The full weights with each KV head repeated to make n_kv heads (naive, for comparison)."""
    out = dict(full)
    for k, t in full.items():
        if k.endswith(("attention.wk.weight", "attention.wv.weight")):
            heads = t.view(args.n_kv_heads, args.head_dim, args.dim)
            out[k] = heads.repeat_interleave(n_kv // args.n_kv_heads, dim=0).reshape(-1, args.dim)
    return out


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("n", [2, 4])
def test_more_files_than_ranks_single_process(name, n, ckpts, reference_logits):
    """2 -> 1 and 4 -> 1 (incl. KV heads duplicated in the files when N > n_kv_heads)."""
    assert_logits_match(ckpts[name, n], reference_logits[name])


def small_checkpoint(path: Path, args: ModelArgs, n: int) -> Path:
    write_checkpoint(path, random_state_dict(args, dtype=torch.float32), args, n)
    return path


def test_impossible_combinations_name_n_m_and_heads(tmp_path, ckpts):
    with pytest.raises(ValueError, match=r"N=4 shards on M=3 ranks \(n_heads=8, n_kv_heads=2\)"):
        load_state_dict(ckpts["gqa", 4], CONFIGS["gqa"], 0, 3)
    # n_kv_heads=3 neither divides nor is divided by 2 ranks.
    args = ModelArgs(dim=48, n_layers=1, n_heads=6, n_kv_heads=3, vocab_size=240, multiple_of=16)
    ckpt = small_checkpoint(tmp_path / "kv3", args, 1)
    with pytest.raises(ValueError, match=r"N=1 shards on M=2 ranks \(n_heads=6, n_kv_heads=3\).*n_kv_heads=3"):
        load_state_dict(ckpt, args, 0, 2)
    # Every size divides by 4 and 6, but 4 files cannot be regrouped onto 6 ranks.
    args = ModelArgs(dim=96, n_layers=1, n_heads=12, vocab_size=240, multiple_of=48)
    ckpt = small_checkpoint(tmp_path / "h12", args, 4)
    with pytest.raises(ValueError, match=r"N=4 shards on M=6 ranks \(n_heads=12, n_kv_heads=12\).*multiple"):
        load_state_dict(ckpt, args, 0, 6)


def test_missing_shard_is_named(tmp_path, ckpts):
    ckpt = tmp_path / "gap"
    shutil.copytree(ckpts["gqa", 4], ckpt)
    (ckpt / "consolidated.02.pth").unlink()  # 00, 01, 03 left
    with pytest.raises(FileNotFoundError, match=r"consolidated\.02\.pth.*missing"):
        load_state_dict(ckpt, CONFIGS["gqa"], 0, 1)


def test_shards_that_disagree_with_params_json(tmp_path, ckpts):
    # params.json says 4 KV heads, the files hold 2.
    ckpt = tmp_path / "params"
    shutil.copytree(ckpts["gqa", 2], ckpt)
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    with pytest.raises(ValueError, match=r"attention\.wk\.weight has shape \(8, 64\), but params\.json implies \(16, 64\)"):
        load_state_dict(ckpt, load_params(ckpt), 0, 1)
    # One tensor in one shard cut short.
    ckpt = tmp_path / "tensor"
    shutil.copytree(ckpts["gqa", 2], ckpt)
    sd = torch.load(ckpt / "consolidated.01.pth", weights_only=True)
    sd["layers.1.feed_forward.w2.weight"] = sd["layers.1.feed_forward.w2.weight"][:, :-1].clone()
    torch.save(sd, ckpt / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth: layers\.1\.feed_forward\.w2\.weight has shape \(64, 95\)"):
        load_state_dict(ckpt, CONFIGS["gqa"], 1, 2)  # rank 1 reads file 1 (rank 0 never opens it)


# --- python -m llama.reshard ----------------------------------------------------------------


def run_reshard(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama.reshard", *argv], cwd=REPO, capture_output=True, text=True)


@pytest.mark.slow
def test_round_trip_is_bit_exact_and_checklist_verifies(tmp_path, full, ckpts):
    """1 -> 2 (through the command line) -> 1 gives back the original tensors, torch.equal."""
    src = ckpts["gqa", 1]
    res = run_reshard(str(src), str(tmp_path / "mp2"), "--mp", "2")
    assert res.returncode == 0, res.stderr
    llama.reshard.main([str(tmp_path / "mp2"), str(tmp_path / "mp1"), "--mp", "1"])
    back = torch.load(tmp_path / "mp1" / "consolidated.00.pth", weights_only=True)
    assert_shards_equal(back, full["gqa"])
    for dst, n in ((tmp_path / "mp2", 2), (tmp_path / "mp1", 1)):
        assert [p.name for p in find_shards(dst)] == [f"consolidated.{i:02d}.pth" for i in range(n)]
        assert load_params(dst) == CONFIGS["gqa"]
        for name in ("tokenizer.model", "tokenizer_spec.json"):
            assert (dst / name).read_bytes() == (src / name).read_bytes()
        if shutil.which("md5sum"):
            check = subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=dst, capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr
            assert check.stdout.count(": OK") == n + 3  # shards, params.json, the two tokenizer files
    # Each half holds only its slices: a saved view would drag the whole source storage along.
    src_size = (src / "consolidated.00.pth").stat().st_size
    assert all(p.stat().st_size < 0.6 * src_size for p in find_shards(tmp_path / "mp2"))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("n,m", [(1, 2), (2, 1), (2, 4), (4, 2), (1, 4)])
def test_every_direction(name, n, m, tmp_path, ckpts, reference_logits):
    """Each output shard is the split of the source's tensors (as stored: KV heads the source
    already duplicated stay duplicated), the params say so, and MP=1 logits are unchanged."""
    src = ckpts[name, n]
    dst = reshard(src, tmp_path / "out", m, log=quiet)
    src_args = load_params(src)
    want, want_args = shard_state_dict(load_state_dict(src, src_args), src_args, m)
    for rank, path in enumerate(find_shards(dst)):
        assert_shards_equal(torch.load(path, weights_only=True), want[rank])
    assert load_params(dst) == want_args  # n_kv_heads raised to M when M > n_kv_heads
    assert_logits_match(dst, reference_logits[name])


def test_kv_heads_duplicated_in_params(tmp_path, full, ckpts):
    dst = reshard(ckpts["kv1", 1], tmp_path / "out", 4, log=quiet)
    params = json.loads((dst / "params.json").read_text())
    assert params == {**CONFIGS["kv1"].to_dict(), "n_kv_heads": 4}
    for path in find_shards(dst):
        assert torch.equal(torch.load(path, weights_only=True)["layers.1.attention.wv.weight"],
                           full["kv1"]["layers.1.attention.wv.weight"])  # fmt: skip


def test_dtype_cast(tmp_path, full, ckpts):
    llama.reshard.main([str(ckpts["gqa", 2]), str(tmp_path / "bf16"), "--mp", "1", "--dtype", "bf16"])
    got = torch.load(tmp_path / "bf16" / "consolidated.00.pth", weights_only=True)
    assert_shards_equal(got, {k: v.to(torch.bfloat16) for k, v in full["gqa"].items()})


@pytest.mark.slow
def test_refuses_to_overwrite(tmp_path, ckpts):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    res = run_reshard(str(ckpts["gqa", 1]), str(dst), "--mp", "2")
    assert res.returncode != 0 and "refusing to overwrite" in res.stderr
    assert [p.name for p in dst.iterdir()] == ["notes.txt"]
    # The source itself is a non-empty folder too.
    with pytest.raises(FileExistsError):
        reshard(ckpts["gqa", 1], ckpts["gqa", 1], 2, log=quiet)
    # An empty folder is fine.
    (tmp_path / "empty").mkdir()
    reshard(ckpts["gqa", 1], tmp_path / "empty", 2, log=quiet)
    assert len(find_shards(tmp_path / "empty")) == 2


def test_impossible_layout_writes_nothing(tmp_path, ckpts):
    with pytest.raises(ValueError, match=r"N=1 shards on M=3 ranks"):
        reshard(ckpts["gqa", 1], tmp_path / "out", 3, log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_failure_leaves_no_destination(tmp_path, ckpts, monkeypatch):
    """A crash after the first shard leaves neither DST nor the hidden work folder."""
    real_save, calls = torch.save, []

    def failing_save(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(obj, path)

    monkeypatch.setattr(llama.reshard.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        reshard(ckpts["gqa", 1], tmp_path / "out", 4, log=quiet)
    assert list(tmp_path.iterdir()) == []
