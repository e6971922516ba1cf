"""Meta-format checkpoints: the on-disk format we write, strict loading, dtype casts, and memory."""

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from child_env import child_env
from llama.checkpoint import (
    VERIFIED_RECORD,
    expected_shapes,
    load_state_dict,
    load_transformer,
    random_state_dict,
    read_checklist,
    verify_checkpoint,
    write_checkpoint,
    write_random_checkpoint,
)
from llama.model import ModelArgs, Transformer
from llama.params import to_dict

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, use_scaled_rope=True)


def meta_layout(args: ModelArgs, n_shards: int) -> dict[str, tuple[int, ...]]:
    """Shape of every key in one of ``n_shards`` files, written from the facts table (not the code)."""
    hd, ffn, dim, n = args.dim // args.n_heads, args.ffn_hidden_dim, args.dim, n_shards
    kv = max(args.n_kv_heads, n_shards)  # more shards than KV heads: each KV head duplicated
    out = {"tok_embeddings.weight": (args.vocab_size // n, dim)}
    for i in range(args.n_layers):
        out |= {
            f"layers.{i}.attention.wq.weight": (args.n_heads * hd // n, dim),
            f"layers.{i}.attention.wk.weight": (kv * hd // n, dim),
            f"layers.{i}.attention.wv.weight": (kv * hd // n, dim),
            f"layers.{i}.attention.wo.weight": (dim, args.n_heads * hd // n),
            f"layers.{i}.feed_forward.w1.weight": (ffn // n, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, ffn // n),
            f"layers.{i}.feed_forward.w3.weight": (ffn // n, dim),
            f"layers.{i}.attention_norm.weight": (dim,),
            f"layers.{i}.ffn_norm.weight": (dim,),
        }
    out |= {"norm.weight": (dim,), "output.weight": (args.vocab_size // n, dim)}
    return out


def shard_path(ckpt: Path, i: int = 0) -> Path:
    return ckpt / f"consolidated.{i:02d}.pth"


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A one-file bf16 checkpoint of TINY."""
    write_random_checkpoint(tmp_path, TINY, seed=3)
    return tmp_path


def edit_shard(ckpt: Path, edit) -> None:
    path = shard_path(ckpt)
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)


# ---------------------------------------------------------------------------------------------
# The format written


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_random_checkpoint_is_meta_format(tmp_path, n_shards):
    (tmp_path / "tok.model").write_bytes(b"aGVsbG8= 0\n")
    ckpt = tmp_path / "ckpt"
    written = write_random_checkpoint(ckpt, TINY, n_shards=n_shards, tokenizer_path=tmp_path / "tok.model")
    shards = [f"consolidated.{i:02d}.pth" for i in range(n_shards)]
    files = shards + ["params.json", "checklist.chk", "tokenizer.model"]
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(files)
    assert (ckpt / "tokenizer.model").read_bytes() == b"aGVsbG8= 0\n"

    params = json.loads((ckpt / "params.json").read_text())
    assert params == to_dict(written)
    assert params["n_kv_heads"] == max(TINY.n_kv_heads, n_shards)  # 405B MP16 style duplication
    assert {k: v for k, v in params.items() if k != "n_kv_heads"} == {
        k: v for k, v in to_dict(TINY).items() if k != "n_kv_heads"
    }

    layout = meta_layout(TINY, n_shards)
    assert len(layout) == 9 * TINY.n_layers + 3
    loaded = [torch.load(ckpt / name, weights_only=True) for name in shards]
    for sd in loaded:
        assert type(sd) is dict and list(sd) == list(layout)
        assert {k: tuple(t.shape) for k, t in sd.items()} == layout
        assert all(t.dtype == torch.bfloat16 for t in sd.values())
    for key in ("norm.weight", "layers.1.ffn_norm.weight", "layers.0.attention_norm.weight"):
        assert all(torch.equal(sd[key], loaded[0][key]) for sd in loaded)  # replicated


def test_8b_has_291_keys():
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.3,
                     multiple_of=1024)
    assert expected_shapes(args) == meta_layout(args, 1)
    assert len(expected_shapes(args)) == 291


@pytest.mark.skipif(shutil.which("md5sum") is None, reason="md5sum not installed")
def test_checklist_verifies_with_md5sum(ckpt):
    lines = (ckpt / "checklist.chk").read_text().splitlines()
    assert sorted(line.split("  ", 1)[1] for line in lines) == ["consolidated.00.pth", "params.json"]
    ok = subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=ckpt, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    with open(ckpt / "params.json", "a") as f:
        f.write(" ")
    bad = subprocess.run(["md5sum", "-c", "checklist.chk"], cwd=ckpt, capture_output=True, text=True)
    assert bad.returncode != 0 and "params.json: FAILED" in bad.stdout


# ---------------------------------------------------------------------------------------------
# Strict, safe loading

EXECUTED: list[str] = []


def _side_effect() -> int:
    EXECUTED.append("unpickling ran code")
    return 0


class CodeOnLoad:
    """Unpickling this calls a function: exactly what ``weights_only=True`` must refuse."""

    def __reduce__(self):
        return (_side_effect, ())


def test_pickle_with_code_is_refused(ckpt):
    edit_shard(ckpt, lambda sd: sd.__setitem__("payload", CodeOnLoad()))
    with pytest.raises(ValueError, match=rf"cannot load {shard_path(ckpt)}: .*[Ww]eights only load failed"):
        load_transformer(ckpt)
    assert EXECUTED == []


def test_rope_freqs_is_dropped(ckpt):
    expected = random_state_dict(TINY, seed=3)
    edit_shard(ckpt, lambda sd: sd.__setitem__("rope.freqs", torch.ones(TINY.head_dim // 2)))
    got = load_state_dict(ckpt, TINY)
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in got)


def test_unexpected_key_is_named(ckpt):
    edit_shard(ckpt, lambda sd: sd.__setitem__("layers.0.attention.bias", torch.zeros(3)))
    with pytest.raises(ValueError, match=r"unexpected keys \['layers\.0\.attention\.bias'\] \(1\)"):
        load_transformer(ckpt)


def test_missing_key_is_named(ckpt):
    edit_shard(ckpt, lambda sd: sd.pop("layers.1.feed_forward.w3.weight"))
    with pytest.raises(ValueError, match=r"missing keys \['layers\.1\.feed_forward\.w3\.weight'\] \(1\)"):
        load_transformer(ckpt)


def test_shape_mismatch_gives_both_shapes(ckpt):
    edit_shard(ckpt, lambda sd: sd.__setitem__("layers.0.attention.wk.weight", torch.zeros(48, 64)))
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wk\.weight has shape \(48, 64\), but params\.json "
                                         r"implies \(32, 64\)"):
        load_transformer(ckpt)


def test_missing_shard_is_named(tmp_path):
    write_random_checkpoint(tmp_path, TINY, n_shards=4)
    shard_path(tmp_path, 2).unlink()
    with pytest.raises(FileNotFoundError, match=r"\['consolidated\.02\.pth'\] missing"):
        load_transformer(tmp_path)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        load_transformer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"params file not found: .*params\.json"):
        load_transformer(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps(to_dict(TINY)))
    with pytest.raises(FileNotFoundError, match=r"no consolidated\.NN\.pth files"):
        load_transformer(tmp_path)


# ---------------------------------------------------------------------------------------------
# What is loaded


@pytest.mark.parametrize("n_shards", [1, 2])
def test_loads_the_written_tensors(tmp_path, n_shards):
    write_random_checkpoint(tmp_path, TINY, n_shards=n_shards, seed=5)
    got = load_state_dict(tmp_path, TINY)
    want = random_state_dict(TINY, seed=5)
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "saved,requested", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, None)]
)
def test_cast_to_requested_dtype(tmp_path, saved, requested):
    write_random_checkpoint(tmp_path, TINY, seed=1, dtype=saved)
    model = load_transformer(tmp_path, dtype=requested)
    want = random_state_dict(TINY, seed=1, dtype=saved)
    params = dict(model.named_parameters())
    assert list(params) == list(want)
    for key, t in want.items():
        assert params[key].dtype == (requested or saved)
        assert torch.equal(params[key].detach(), t.to(requested or saved))


def test_load_transformer_equals_direct_load(ckpt):
    direct = Transformer(TINY, dtype=torch.bfloat16)
    direct.load_state_dict(random_state_dict(TINY, seed=3), strict=True)
    loaded = load_transformer(ckpt)
    assert loaded.args == TINY
    tokens = torch.randint(0, TINY.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), direct(tokens))


# ---------------------------------------------------------------------------------------------
# Memory: a checkpoint already in the requested dtype stays memory-mapped


def file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map ``path`` (from /proc/self/maps)."""
    ranges, target = [], str(path.resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_dtype_weights_point_into_the_mapped_file(tmp_path, dtype):
    write_random_checkpoint(tmp_path, TINY, dtype=dtype)
    model = load_transformer(tmp_path, dtype=dtype)
    ranges = file_mappings(shard_path(tmp_path))
    assert ranges, "the shard is not memory-mapped"
    for name, p in model.named_parameters():
        assert any(lo <= p.data_ptr() < hi for lo, hi in ranges), f"{name} was copied out of the file"
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    cast = load_transformer(tmp_path, dtype=other)  # a cast has to copy
    assert not any(lo <= cast.output.weight.data_ptr() < hi for lo, hi in file_mappings(shard_path(tmp_path)))


RSS_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from llama.checkpoint import load_transformer

    def status():
        out = {}
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
        return out

    before = status()
    model = load_transformer(sys.argv[1])
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # touches every weight
    after = status()
    print(json.dumps({"before": before, "after": after}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_rss_of_loading_a_bf16_checkpoint(tmp_path):
    """A 311 MB bf16 checkpoint: peak RSS grows by at most 1.1x the file (its mapped pages, once
    touched) plus 150 MB, and anonymous memory by well under the file size (no copy is made)."""
    args = ModelArgs(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, vocab_size=32000)
    # Constant weights: the values do not matter here, and filling 168M random numbers is slow.
    weights = {k: torch.full(s, 0.02, dtype=torch.bfloat16) for k, s in expected_shapes(args).items()}
    write_checkpoint(tmp_path, weights, args)
    size = shard_path(tmp_path).stat().st_size
    assert 200e6 < size < 400e6
    env = child_env()
    run = subprocess.run([sys.executable, "-c", RSS_CHILD, str(tmp_path)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    m = json.loads(run.stdout.strip().splitlines()[-1])
    peak_growth = m["after"]["VmHWM"] - m["before"]["VmRSS"]
    anon_growth = m["after"]["RssAnon"] - m["before"]["RssAnon"]
    print(f"file {size / 1e6:.0f} MB: peak RSS +{peak_growth / 1e6:.0f} MB, anonymous +{anon_growth / 1e6:.0f} MB")
    assert peak_growth <= 1.1 * size + 150e6
    assert anon_growth <= 0.5 * size


# ---------------------------------------------------------------------------------------------
# Loading untrusted files: what the error says (issue 15, points 4, 11, 12)


def test_legacy_pickle_format_still_loads(ckpt):
    # torch.save before 1.6 wrote a plain pickle, which cannot be memory-mapped: loaded without mmap.
    sd = torch.load(shard_path(ckpt), weights_only=True)
    torch.save(sd, shard_path(ckpt), _use_new_zipfile_serialization=False)
    got = load_state_dict(ckpt, TINY)
    assert all(torch.equal(got[k], sd[k]) for k in got)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8, torch.bool])
def test_integer_tensor_is_named_with_its_dtype(ckpt, dtype):
    edit_shard(ckpt, lambda sd: sd.__setitem__("norm.weight", sd["norm.weight"].to(dtype)))
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=rf"{shard_path(ckpt)}: norm\.weight has dtype {name}, not a float type"):
        load_state_dict(ckpt, TINY)


def test_first_shard_missing_is_a_gap(tmp_path):
    write_random_checkpoint(tmp_path, TINY, n_shards=2)
    shard_path(tmp_path, 0).unlink()
    with pytest.raises(FileNotFoundError, match=r"\['consolidated\.00\.pth'\] missing"):
        load_transformer(tmp_path)


@pytest.mark.parametrize("kept", [1, 2])
def test_trailing_shards_missing_are_named_from_the_shapes(tmp_path, kept):
    write_random_checkpoint(tmp_path, TINY, n_shards=4)
    for i in range(kept, 4):
        shard_path(tmp_path, i).unlink()
    missing = [f"consolidated.{i:02d}.pth" for i in range(kept, 4)]
    only = "consolidated.00.pth is" if kept == 1 else f"{kept} (consolidated.00.pth ... consolidated.01.pth) are"
    with pytest.raises(FileNotFoundError, match=re.escape(f"shard(s) {missing} missing") + r".* has 4 shards, but only "
                                                + re.escape(f"{only} here")):  # fmt: skip
        load_transformer(tmp_path)


# ---------------------------------------------------------------------------------------------
# Verification against checklist.chk


def test_read_checklist_accepts_md5sum_formats(tmp_path):
    chk = tmp_path / "checklist.chk"
    chk.write_text("0123456789abcdef0123456789ABCDEF  params.json\nfedcba9876543210fedcba9876543210 *a b.pth\n\n")
    assert read_checklist(chk) == {"params.json": "0123456789abcdef0123456789abcdef",
                                   "a b.pth": "fedcba9876543210fedcba9876543210"}  # fmt: skip


def test_sha256_checklists_of_llama_cli_links_verify(ckpt):
    """The llama CLI's links (Llama 3.1 on, 3.2, 3.3) ship sha256 lines with a leading ./
    (shared/docs/download-layouts.md, as tests/download_server.py serves them): read, checked with
    sha256, and a corrupt file named; before, every such download was refused as "not md5sum"."""
    from download_server import checklist

    files = {f"m/{p.name}": p.read_bytes() for p in sorted(ckpt.iterdir()) if p.is_file() and p.name != "checklist.chk"}
    (ckpt / "checklist.chk").write_bytes(checklist("C", "m", files))
    assert all(len(d) == 64 for d in read_checklist(ckpt / "checklist.chk").values())
    assert "./" not in "".join(read_checklist(ckpt / "checklist.chk"))
    logs: list[str] = []
    verify_checkpoint(ckpt, True, logs.append)
    assert logs[0].startswith(f"Verifying {len(files)} file(s)")
    shard = ckpt / "consolidated.00.pth"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth does not match checklist\.chk: sha256 [0-9a-f]{64}, expected"):
        verify_checkpoint(ckpt, None, logs.append)


def test_verify_splits_files_across_ranks_and_merges_the_record(ckpt):
    logs: list[str] = []
    verify_checkpoint(ckpt, None, logs.append, rank=1, world_size=2)
    names = sorted(ln.split(" ", 3)[3] for ln in (ckpt / VERIFIED_RECORD).read_text().splitlines())
    listed = sorted(read_checklist(ckpt / "checklist.chk"))
    assert names == listed[1::2] and "Verifying 1 file(s)" in logs[0]
    verify_checkpoint(ckpt, None, logs.append, rank=0, world_size=2)
    names = sorted(ln.split(" ", 3)[3] for ln in (ckpt / VERIFIED_RECORD).read_text().splitlines())
    assert names == listed
    logs.clear()
    verify_checkpoint(ckpt, None, logs.append)
    assert logs == []


def test_verify_in_a_read_only_folder_says_it_will_repeat(ckpt, monkeypatch):
    def refuse(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_text", refuse)
    logs: list[str] = []
    verify_checkpoint(ckpt, None, logs.append)
    assert logs[-1].startswith(f"note: cannot record the verification in {ckpt} (Permission denied): it will be "
                               "repeated next time; pass verify=False to skip it")  # fmt: skip
    assert not (ckpt / VERIFIED_RECORD).exists()


def test_verify_false_reads_nothing(ckpt):
    (ckpt / "checklist.chk").write_text("garbage\n")
    verify_checkpoint(ckpt, False)
    with pytest.raises(ValueError, match="is not an md5sum or sha256sum line"):
        verify_checkpoint(ckpt, None)
