"""int8 folders: ``python -m llama.quantize SRC DST --int8`` (llama/quantize_folder.py) and loading them.

The reference is ``Llama.build(SRC, quantize="int8")``'s own path (``int8_transform`` while loading):
a folder must load into exactly the same tensors and logits, bit for bit, on 1 rank and 2 gloo ranks.
Every refusal of strict loading is a named case; the CLI's mistakes print one line and write nothing.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from child_env import REPO, child_env
from llama import quantize_folder as qf
from llama.checkpoint import (
    int8_folder,
    load_shard_file,
    load_state_dict,
    load_transformer,
    verify_checkpoint,
    write_checklist,
    write_random_checkpoint,
)
from llama.model import ModelArgs
from llama.params import check_quantization, from_dict, load as load_params_file, read_quantization
from llama.quantize import Int8Linear, folder_entry, int8_transform, is_quantized_key

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=64)
# Meta's vocabulary, for Llama.build with Meta's tokenizer.model.
BUILD_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
TOKENS = torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


def make(root: Path, name: str, n_shards: int = 1, dtype: torch.dtype = torch.bfloat16, args: ModelArgs = ARGS,
         tokenizer: Path | None = None) -> tuple[Path, Path]:  # fmt: skip
    """A random SRC folder and its int8 folder DST (written by ``quantize_folder``)."""
    src, dst = root / f"{name}-src", root / f"{name}-int8"
    write_random_checkpoint(src, args, n_shards=n_shards, seed=n_shards, dtype=dtype, tokenizer_path=tokenizer)
    qf.quantize_folder(src, dst, log=lambda m: None)
    return src, dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("int8")
    return {"bf16": make(root, "bf16"), "fp32": make(root, "fp32", dtype=torch.float32), "mp2": make(root, "mp2", 2)}


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


# --- the format -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bf16", "mp2"])
def test_shard_k_is_int8_transform_of_source_shard_k(folders, name):
    """Every quantized key int8 [out, in] with float32 scales [out] under KEY.scale, exactly
    int8_transform's; every other tensor the source's own, unchanged."""
    src, dst = folders[name]
    n = 2 if name == "mp2" else 1
    assert sorted(p.name for p in dst.iterdir()) == ["checklist.chk", *[f"consolidated.{k:02d}.pth" for k in range(n)], "params.json"]
    for k in range(n):
        stored = torch.load(dst / f"consolidated.{k:02d}.pth", weights_only=True)
        source = torch.load(src / f"consolidated.{k:02d}.pth", weights_only=True)
        want: dict[str, torch.Tensor] = {}
        for key, t in source.items():
            want.update(int8_transform(key, t))
        assert set(stored) == set(want)
        quantized = [key for key in source if is_quantized_key(key)]
        assert len(quantized) == 7 * ARGS.n_layers + 1
        for key in quantized:
            assert stored[key].dtype == torch.int8 and stored[key].shape == source[key].shape
            assert stored[key.removesuffix("weight") + "scale"].dtype == torch.float32
        state_equal({key: stored[key] for key in want}, want)
        assert torch.equal(stored["tok_embeddings.weight"], source["tok_embeddings.weight"])
    verify_checkpoint(dst, verify=True, log=lambda m: None)  # checklist.chk lists and matches every file


def test_params_entry_round_trip(folders):
    src, dst = folders["mp2"]
    params = json.loads((dst / "params.json").read_text())
    assert params.pop("quantization") == folder_entry(2, torch.bfloat16) == {
        "format": "int8", "scheme": "per-row symmetric", "weights": ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"],
        "shards": 2, "source_dtype": "bfloat16",
    }  # fmt: skip
    assert params == json.loads((src / "params.json").read_text())  # the source's params, plus the entry
    assert read_quantization(dst / "params.json") == folder_entry(2, torch.bfloat16)
    assert read_quantization(src / "params.json") is None
    assert load_params_file(dst / "params.json") == load_params_file(src / "params.json")
    assert int8_folder(dst, 2)["source_dtype"] == "bfloat16"
    assert json.loads((folders["fp32"][1] / "params.json").read_text())["quantization"]["source_dtype"] == "float32"


GOOD = folder_entry(1, torch.bfloat16)


@pytest.mark.parametrize(
    "entry, words",
    [
        ({**GOOD, "format": "int4"}, ["format 'int4'", "not supported"]),
        ({**GOOD, "format": "nf4"}, ["'nf4'"]),
        ({k: v for k, v in GOOD.items() if k != "format"}, ["format None"]),
        ("int8", ["must be an object", "'int8'"]),
        (None, ["must be an object", "null"]),
        ({**GOOD, "scheme": "per-group"}, ["scheme 'per-group'"]),
        ({**GOOD, "weights": ["wq"]}, ["weights ['wq']"]),
        ({**GOOD, "shards": 0}, ["shards", "positive integer", "0"]),
        ({**GOOD, "source_dtype": "int8"}, ["source_dtype 'int8'"]),
        ({**GOOD, "group_size": 128}, ["unknown field(s) ['group_size']"]),
        ({k: v for k, v in GOOD.items() if k != "shards"}, ["missing field(s) ['shards']"]),
    ],
)
def test_params_entry_refusals(entry, words):
    params = {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "quantization": entry}
    with pytest.raises(ValueError) as e:
        from_dict(params, source="x/params.json")
    for word in ["x/params.json", *words]:
        assert word in str(e.value), (word, str(e.value))
    assert check_quantization(dict(GOOD)) == GOOD


def test_meta_quantization_args_still_refused():
    params = {"dim": 128, "n_layers": 2, "n_heads": 4, "vocab_size": 256, "quantization_args": {"group_size": 32}}
    with pytest.raises(ValueError, match="quantization_args.*QAT / SpinQuant"):
        from_dict(params)


# --- loading: bit for bit what quantize="int8" computes while loading ----------------------------------


@torch.no_grad()
@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32), ("bf16", torch.float32)])
def test_load_equals_quantize_at_load(folders, name, dtype):
    src, dst = folders[name]
    got = load_transformer(dst, "cpu", dtype)
    want = load_transformer(src, "cpu", dtype, transform=int8_transform)
    assert isinstance(got.layers[1].feed_forward.w2, Int8Linear) and isinstance(got.output, Int8Linear)
    assert not isinstance(got.tok_embeddings, Int8Linear)
    state_equal(got.state_dict(), want.state_dict())
    assert got.tok_embeddings.weight.dtype == dtype
    assert torch.equal(got(TOKENS), want(TOKENS))


@torch.no_grad()
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_on_gpu_equals_quantize_at_load(folders):
    """On a GPU the folder's tensors move there as stored (int8 values, float32 scales), as
    quantize-at-load's do (passed on an H200, benchmarks/RESULTS-cuda.md)."""
    src, dst = folders["bf16"]
    got = load_transformer(dst, "cuda", torch.bfloat16)
    want = load_transformer(src, "cuda", torch.bfloat16, transform=int8_transform)
    assert got.layers[0].attention.wq.weight.device.type == "cuda"
    state_equal(got.state_dict(), want.state_dict())
    assert torch.equal(got(TOKENS.cuda()), want(TOKENS.cuda()))


def test_shards_load_as_their_ranks_quantize(folders):
    """Rank k of 2 gets from the 2-shard folder exactly what quantize-at-load gives rank k of 2."""
    src, dst = folders["mp2"]
    for rank in range(2):
        got = load_state_dict(dst, ARGS, rank, 2, int8_folders=True)
        want = load_state_dict(src, ARGS, rank, 2, transform=int8_transform)
        assert set(got) == set(want)
        state_equal({k: got[k] for k in want}, want)


def test_llama2_layout_keeps_its_embedding_split(tmp_path):
    """Llama 2 folders split tok_embeddings by columns ([vocab, dim/N] a file): DST keeps each file's
    own columns, and loads as quantize-at-load does."""
    src = tmp_path / "src"
    write_random_checkpoint(src, ARGS, n_shards=2, seed=7)
    files = [torch.load(src / f"consolidated.0{k}.pth", weights_only=True) for k in range(2)]
    full = torch.cat([f["tok_embeddings.weight"] for f in files])  # [vocab, dim]
    for k, f in enumerate(files):
        f["tok_embeddings.weight"] = full.chunk(2, dim=1)[k].clone()
        torch.save(f, src / f"consolidated.0{k}.pth")
    write_checklist(src)
    qf.quantize_folder(src, tmp_path / "dst", log=lambda m: None)
    for k in range(2):
        stored = torch.load(tmp_path / "dst" / f"consolidated.0{k}.pth", weights_only=True)
        assert torch.equal(stored["tok_embeddings.weight"], files[k]["tok_embeddings.weight"])
        got = load_state_dict(tmp_path / "dst", ARGS, k, 2, int8_folders=True)
        want = load_state_dict(src, ARGS, k, 2, transform=int8_transform)
        assert set(got) == set(want)
        state_equal({key: got[key] for key in want}, want)


def test_build_loads_the_folder(tmp_path, meta_tokenizer_path, monkeypatch):
    """Llama.build(DST) == Llama.build(SRC, quantize="int8"): weights and logits, bit for bit;
    quantize="int8" on DST changes nothing; quantize="fp8" on it is an error saying why."""
    from llama import fp8
    from llama.generation import Llama

    src, dst = make(tmp_path, "build", args=BUILD_ARGS, tokenizer=meta_tokenizer_path)
    assert (dst / "tokenizer.model").read_bytes() == meta_tokenizer_path.read_bytes()
    kw = dict(max_seq_len=32, max_batch_size=1, device="cpu", verify=True)
    built = {name: Llama.build(str(path), quantize=q, **kw)
             for name, path, q in (("folder", dst, None), ("again", dst, "int8"), ("at_load", src, "int8"))}  # fmt: skip
    assert isinstance(built["folder"].model.layers[0].attention.wq, Int8Linear)
    tokens = torch.randint(0, BUILD_ARGS.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = {name: b.model(tokens) for name, b in built.items()}
    for name in ("again", "at_load"):
        state_equal(built["folder"].model.state_dict(), built[name].model.state_dict())
        assert torch.equal(logits["folder"], logits[name]), name
    texts = [b.text_completion(["The capital of France is"], temperature=0.0, max_gen_len=4)[0]["generation"] for b in built.values()]
    assert texts[0] == texts[1] == texts[2]
    monkeypatch.setattr(fp8, "fp8_supported", lambda device: True)  # past the device check, to the folder's
    with pytest.raises(ValueError, match="int8 folder .*quantize='fp8' needs 16-bit weights"):
        Llama.build(str(dst), quantize="fp8", **kw)


def test_memory_plan_counts_int8_bytes(tmp_path, meta_tokenizer_path, monkeypatch, capsys):
    """With memory for the int8 weights but not the bf16 ones, the int8 folder builds and its source
    does not; ``python -m llama.memory DST`` plans the int8 bytes too."""
    import llama.memory
    from llama.generation import Llama
    from llama.memory import plan_memory, quantized_weight_bytes

    src, dst = make(tmp_path, "mem", args=BUILD_ARGS, tokenizer=meta_tokenizer_path)
    int8 = plan_memory(BUILD_ARGS, 32, 1, torch.bfloat16, quantize="int8").total_bytes
    bf16 = plan_memory(BUILD_ARGS, 32, 1, torch.bfloat16).total_bytes
    assert int8 < 0.8 * bf16  # the embedding (128256 x 64, bf16 in both) is most of this model
    monkeypatch.setattr(llama.memory, "available_bytes", lambda device: (int8 + bf16) // 2)
    kw = dict(max_seq_len=32, max_batch_size=1, device="cpu", verify=False)
    Llama.build(str(dst), **kw)
    with pytest.raises(MemoryError):
        Llama.build(str(src), **kw)
    capsys.readouterr()
    llama.memory.main(str(dst), max_seq_len=32)
    weights = quantized_weight_bytes(BUILD_ARGS, "int8", torch.bfloat16)
    assert f"this run: weights {weights / 2**30:.2f} GiB" in capsys.readouterr().out
    llama.memory.main(str(src), max_seq_len=32)
    assert f"this run: weights {weights / 2**30:.2f} GiB" not in capsys.readouterr().out


# --- model parallelism ---------------------------------------------------------------------------------


def test_other_rank_counts_refused(folders, tmp_path):
    """Fewer ranks than files (or a count that is not a multiple) would join files whose scales differ."""
    _, two = folders["mp2"]
    for world in (1, 3):
        with pytest.raises(ValueError) as e:
            load_state_dict(two, ARGS, 0, world, int8_folders=True)
        words = (str(two), "quantized as 2 shards", "a multiple of 2", f"not {world}", "python -m llama.reshard", "--int8")
        for word in words:
            assert word in str(e.value), (word, str(e.value))
    partial = shutil.copytree(two, tmp_path / "partial")
    (partial / "consolidated.01.pth").unlink()
    with pytest.raises(FileNotFoundError, match="written as 2 shard\\(s\\), but the folder has 1"):
        load_state_dict(partial, ARGS, 0, 1, int8_folders=True)


@pytest.mark.parametrize("name, world", [("bf16", 2), ("bf16", 4), ("mp2", 4)])
def test_multiple_of_the_files_as_ranks(folders, name, world):
    """On M = kN ranks rank r takes its rows (columns for wo, w2) of file r // k with that file's
    scales (sliced with the rows, whole with the columns): the N-rank model's numbers, split further.
    On 4 ranks the 2 KV heads are each held by two ranks."""
    from llama.checkpoint import expected_shapes, rank_range, shard_dim

    _, dst = folders[name]
    n = 2 if name == "mp2" else 1
    k = world // n
    files = [load_state_dict(dst, ARGS, i, n, int8_folders=True) for i in range(n)]
    for r in range(world):
        got = load_state_dict(dst, ARGS, r, world, int8_folders=True)
        mine = files[r // k]
        assert set(got) == set(mine)
        for key in mine:
            weight = key.removesuffix(".scale") + ".weight" if key.endswith(".scale") else key
            d, rng = shard_dim(weight), rank_range(weight, ARGS, r, world)
            if key.endswith(".scale") and d == 1:
                d = None  # a column slice keeps every row's scale
            want = mine[key]
            if d is not None:  # the global rows (columns) of rank r, less where file r // k starts
                start = (r // k) * expected_shapes(ARGS)[weight][d] // n
                want = want.narrow(d, rng[0] - start, rng[1] - rng[0])
            assert torch.equal(got[key], want), (r, key)


@pytest.mark.slow
def test_two_shards_on_two_gloo_ranks(folders, tmp_path):
    """Each rank loads its file into Int8Linear layers with fairscale's reduce / gather: its weights
    and the logits equal quantize-at-load on 2 ranks, bit for bit, and both ranks agree. A 1-file
    folder on the same 2 ranks computes its 1-process logits, up to the order of float additions."""
    from test_parallel import dist, torchrun

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    src, dst = folders["mp2"]
    torch.save(TOKENS, tmp_path / "tokens.pt")
    worker = Path(__file__).parent / "mp" / "int8_worker.py"
    one_file = folders["fp32"][1]
    torchrun(2, str(worker), str(src), str(dst), str(tmp_path / "tokens.pt"), str(tmp_path), str(one_file))
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for g in got:
        assert g["same_state"] and torch.equal(g["folder"], g["at_load"])
        assert g["parallel"] == {"wq": None, "wo": "reduce", "w1": None, "w2": "reduce", "output": "gather"}
    assert torch.equal(got[0]["folder"], got[1]["folder"])
    assert torch.equal(got[0]["one_file"], got[1]["one_file"])
    with torch.inference_mode():
        alone = load_transformer(one_file, "cpu", torch.float32)(TOKENS)
    assert ((got[0]["one_file"] - alone).abs().max() / alone.abs().max()).item() < 1e-5
    with torch.inference_mode():  # and it is the 2-rank int8 model: near the 1-process float model
        want = load_transformer(src, "cpu", torch.float32)(TOKENS)
    rel = ((got[0]["folder"] - want).abs().max() / want.abs().max()).item()
    assert 0 < rel < 0.05, rel


# --- strict loading -------------------------------------------------------------------------------------

WQ = "layers.0.attention.wq.weight"
WQ_SCALE = "layers.0.attention.wq.scale"


def _nan_scale(sd):
    sd[WQ_SCALE] = sd[WQ_SCALE].clone()
    sd[WQ_SCALE][3] = float("nan")


def _zero_scale(sd):
    sd[WQ_SCALE] = sd[WQ_SCALE].clone()
    sd[WQ_SCALE][5] = 0.0


def _negative_scale(sd):
    sd[WQ_SCALE] = -sd[WQ_SCALE]


EDITS = {
    "scale missing": (lambda sd: sd.pop(WQ_SCALE), [WQ, "row scales", WQ_SCALE, "missing"]),
    "weight not int8": (lambda sd: sd.update({WQ: sd[WQ].to(torch.bfloat16)}), [WQ, "bfloat16", "stores it as int8"]),
    "scale float64": (lambda sd: sd.update({WQ_SCALE: sd[WQ_SCALE].double()}), [WQ_SCALE, "float64", "expected float32 of shape (128,)"]),
    "scale shape": (lambda sd: sd.update({WQ_SCALE: sd[WQ_SCALE][:-1]}), [WQ_SCALE, "(127,)", "expected float32 of shape (128,)"]),
    "scale [out, 1]": (lambda sd: sd.update({WQ_SCALE: sd[WQ_SCALE][:, None]}), [WQ_SCALE, "(128, 1)"]),
    "scale NaN": (_nan_scale, [WQ_SCALE, "nan at row 3", "finite and > 0"]),
    "scale zero": (_zero_scale, [WQ_SCALE, "0.0 at row 5", "finite and > 0"]),
    "scale negative": (_negative_scale, [WQ_SCALE, "at row 0", "finite and > 0"]),
    "embedding int8": (lambda sd: sd.update({"tok_embeddings.weight": sd["tok_embeddings.weight"].to(torch.int8)}),
                       ["tok_embeddings.weight", "is int8", "quantizes only"]),  # fmt: skip
    "stray scale": (lambda sd: sd.update({"layers.0.ffn_norm.scale": torch.ones(128)}), ["layers.0.ffn_norm.scale", "unexpected key"]),
    "weight missing": (lambda sd: sd.pop(WQ), ["missing keys", WQ]),
    "unexpected key": (lambda sd: sd.update({"extra.weight": torch.zeros(2)}), ["unexpected keys", "extra.weight"]),
    "int8 shape": (lambda sd: sd.update({WQ: sd[WQ][:, :-1].clone()}), [WQ, "has shape (128, 127)", "(128, 128)"]),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_strict_loading_refusals(folders, tmp_path, case):
    _, dst = folders["bf16"]
    bad = shutil.copytree(dst, tmp_path / "bad")
    path = bad / "consolidated.00.pth"
    sd = torch.load(path, weights_only=True)
    edit, words = EDITS[case]
    edit(sd)
    torch.save(sd, path)
    with pytest.raises(ValueError) as e:
        load_transformer(bad, "cpu")
    message = str(e.value)
    assert "\n" not in message
    for word in [str(path), *words]:
        assert word in message, (word, message)


def test_int8_outside_an_int8_folder_still_refused(folders, tmp_path):
    """Without the params.json entry an int8 tensor is a bad re-save, as before."""
    _, dst = folders["bf16"]
    bad = shutil.copytree(dst, tmp_path / "bad")
    params = json.loads((bad / "params.json").read_text())
    del params["quantization"]
    (bad / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match="has dtype int8, not a float type"):
        load_transformer(bad, "cpu")


def test_float_folder_claiming_int8_refused(folders, tmp_path):
    src, _ = folders["bf16"]
    bad = shutil.copytree(src, tmp_path / "bad")
    params = json.loads((bad / "params.json").read_text())
    (bad / "params.json").write_text(json.dumps({**params, "quantization": folder_entry(1, torch.bfloat16)}))
    with pytest.raises(ValueError, match=f"{bad / 'consolidated.00.pth'}: layers.0.attention.wq.weight has dtype bfloat16"):
        load_transformer(bad, "cpu")


def test_tools_refuse_an_int8_folder(folders, tmp_path):
    """Tools that read 16/32-bit weights (reshard here) say what the folder is instead of writing int8 as floats."""
    from llama.reshard import reshard

    _, dst = folders["mp2"]
    with pytest.raises(ValueError, match="is an int8 folder .*need the folder it was quantized from"):
        reshard(dst, tmp_path / "out", 2, log=lambda m: None)
    assert not (tmp_path / "out").exists()


# --- the command ----------------------------------------------------------------------------------------


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """``python -m llama.quantize ARGV`` in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        qf.main(argv)
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


def nothing_written(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}.partial-")]


def test_cli_errors(folders, tmp_path, capsys):
    src, dst = folders["bf16"]
    cases = [
        ([str(tmp_path / "nope"), str(tmp_path / "out"), "--int8"], 1, ["checkpoint folder not found", "nope"]),
        ([str(dst), str(tmp_path / "out"), "--int8"], 1, [str(dst), "already an int8 folder"]),
        ([str(src), str(tmp_path / "out")], 2, ["--int8", "required"]),
        ([str(src), str(tmp_path / "out"), "--int4"], 2, ["unknown flag --int4", "--int8"]),
    ]
    for argv, code, words in cases:
        got, err = cli(argv, capsys)
        line = next((x for x in err.splitlines() if ": error: " in x), "")
        assert got == code and "Traceback" not in err, err
        for word in ["python -m llama.quantize: error:", *words]:
            assert word in line, (word, err)
        assert nothing_written(tmp_path, "out")


def test_cli_refuses_existing_dst_before_reading(folders, tmp_path, capsys, monkeypatch):
    src, _ = folders["bf16"]
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep")
    monkeypatch.setattr(qf, "load_params", lambda *a: pytest.fail("read SRC before refusing DST"))
    code, err = cli([str(src), str(existing), "--int8"], capsys)
    assert code == 1 and f"{existing} already exists" in err
    assert [p.name for p in existing.iterdir()] == ["mine.txt"]


def test_cli_refuses_integer_weights(tmp_path, capsys):
    src = tmp_path / "src"
    write_random_checkpoint(src, ARGS)
    sd = torch.load(src / "consolidated.00.pth", weights_only=True)
    sd[WQ] = sd[WQ].to(torch.int16)
    torch.save(sd, src / "consolidated.00.pth")
    code, err = cli([str(src), str(tmp_path / "out"), "--int8"], capsys)
    assert code == 1 and "int16, not a float type" in err and WQ in err
    assert nothing_written(tmp_path, "out")


def test_cli_checks_free_space_first(folders, tmp_path, capsys, monkeypatch):
    import llama.checkpoint

    src, _ = folders["mp2"]
    need = qf.int8_folder_bytes(ARGS, torch.bfloat16, 2)
    written = sum(p.stat().st_size for p in folders["mp2"][1].glob("consolidated.*.pth"))
    assert 0.9 < written / need < 1.2  # the estimate is the folder's size, give or take torch.save's headers
    real = shutil.disk_usage
    monkeypatch.setattr(llama.checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=need - 1))
    monkeypatch.setattr(qf, "load_state_dict", lambda *a, **k: pytest.fail("quantized before checking the space"))
    code, err = cli([str(src), str(tmp_path / "out"), "--int8"], capsys)
    assert code == 1 and "no space left on" in err
    assert nothing_written(tmp_path, "out")


def test_interrupted_write_leaves_nothing(folders, tmp_path, monkeypatch):
    """A failure after the first shard leaves no DST and no partial folder: a partial DST never looks complete."""
    src, _ = folders["mp2"]
    saved = []

    def save(obj, path):
        if saved:
            raise OSError(5, "Input/output error")
        saved.append(path)
        torch.save(obj, path)

    monkeypatch.setattr(qf.torch, "save", save)
    with pytest.raises(OSError, match="Input/output error"):
        qf.quantize_folder(src, tmp_path / "out", log=lambda m: None)
    assert saved and nothing_written(tmp_path, "out")


@pytest.mark.slow
def test_command_line(folders, tmp_path):
    """The command as a user runs it: --help, a conversion, no warning on stderr (the package's
    __main__ runs without importing llama.quantize twice)."""
    src, dst = folders["bf16"]
    env = child_env(OMP_NUM_THREADS="1")
    run = lambda *a: subprocess.run([sys.executable, "-m", "llama.quantize", *a], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # noqa: E731
    help_ = run("--help")
    assert help_.returncode == 0 and "--int8" in help_.stdout and "SRC" not in help_.stderr
    out = tmp_path / "cli-int8"
    res = run(str(src), str(out), "--int8")
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr, res.stderr
    assert f"wrote {out / 'consolidated.00.pth'}" in res.stderr
    assert (out / "params.json").read_bytes() == (dst / "params.json").read_bytes()
    state_equal(load_shard_file(out / "consolidated.00.pth", int8=True), load_shard_file(dst / "consolidated.00.pth", int8=True))
