"""GGUF export (``python -m llama.gguf export``) and the import of Llama 3 GGUF vocabularies.

References: llama.cpp's own Llama 3 vocabulary file (tokens, types and merges must equal ours;
imported, it must encode like Meta's tokenizer), the Q8_0 block format as a float64 formula,
transformers' GGUF loader (logits: the q/k row order llama.cpp expects), llama.cpp itself when
llama-cpp-python is installed, and our importer (BF16 round trip bit for bit).

Every GGUF read parses the 128,256 tokens and 280,147 merges with the gguf package, which takes
10-25 s on a busy machine: those tests are slow.
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from llama.checkpoint import load_params, load_state_dict, load_transformer, random_state_dict, write_checkpoint
from llama.gguf import import_gguf, main, read_metadata, tokenizer_files
from llama.gguf_export import export_gguf
from llama.model import ModelArgs
from llama.params import to_dict
from llama.tokenizer import Tokenizer
from tokenizer_texts import sample_texts

gguf = pytest.importorskip("gguf", reason="the gguf package is a dependency (requirements.txt)")

REPO = Path(__file__).resolve().parents[1]
# Populated by scripts/setup.sh from the llama-cpp-python 0.3.36 source package.
LLAMA_CPP_VOCAB = REPO / ".cache" / "llama.cpp" / "ggml-vocab-llama-bpe.gguf"
# The vocabulary and llama.cpp's tokenizer test for it: inputs, and the ids llama.cpp expects (no BOS).
LLAMA_CPP_SHA256 = {
    "": "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",
    ".inp": "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
    ".out": "118abf2034a197fc5c9dec5204dfdeee7004c7c70952ae577f66b99e212fab9b",
}
# Llama 3.2-like: full vocabulary, RoPE scaling factor 32, two shards; untied output.
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                 ffn_dim_multiplier=1.3, rope_theta=500000.0, use_scaled_rope=True, rope_scale_factor=32.0)  # fmt: skip
PROMPT = "The capital of France is Paris, and the capital of Germany is Berlin. In 2024, 12 people met."
TEXTS = sample_texts(240)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory: pytest.TempPathFactory, meta_tokenizer_path: Path) -> Path:
    folder = tmp_path_factory.mktemp("export") / "meta"
    write_checkpoint(folder, random_state_dict(ARGS, seed=1), ARGS, n_shards=2)
    (folder / "tokenizer.model").write_bytes(meta_tokenizer_path.read_bytes())
    return folder


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory: pytest.TempPathFactory, meta_tokenizer_path: Path) -> Path:
    """One shard, output = embedding (as Llama 3.2 1B/3B): the export writes no output tensor."""
    sd = random_state_dict(ARGS, seed=2)
    sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    folder = tmp_path_factory.mktemp("export") / "tied"
    write_checkpoint(folder, sd, ARGS)
    (folder / "tokenizer.model").write_bytes(meta_tokenizer_path.read_bytes())
    return folder


@pytest.fixture(scope="module")
def bf16_gguf(meta_dir: Path) -> Path:
    out = meta_dir.parent / "model-bf16.gguf"
    main(["export", str(meta_dir), str(out)])  # the CLI; bf16 is the default
    return out


@pytest.fixture(scope="module")
def q8_gguf(tied_dir: Path) -> Path:
    out = tied_dir.parent / "model-q8_0.gguf"
    export_gguf(tied_dir, out, "q8_0")
    return out


@pytest.fixture(scope="module")
def llama_cpp_vocab() -> Path:
    """llama.cpp's Llama 3 vocabulary; skipped (with the command) when scripts/setup.sh has not
    cached it. CI runs setup.sh, which fails if it cannot fetch the file, so CI never skips."""
    for suffix, want in LLAMA_CPP_SHA256.items():
        path = Path(f"{LLAMA_CPP_VOCAB}{suffix}")
        if not path.is_file():
            pytest.skip(f"{path} is not cached: run scripts/setup.sh (fetches llama-cpp-python's source package)")
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        assert sha == want, f"{path} changed (sha256 {sha}): remove {path.parent} and rerun scripts/setup.sh"
    return LLAMA_CPP_VOCAB


def llama_cpp_cases(vocab: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's test-tokenizer-0 cases for the file: (text, expected ids)."""
    texts = Path(f"{vocab}.inp").read_bytes().decode("utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    ids = [[int(i) for i in line.split()] for line in Path(f"{vocab}.out").read_text().split("\n")[:-1]]
    assert len(texts) == len(ids) > 40
    return list(zip(texts, ids))


@pytest.fixture(scope="module")
def llama_cpp_meta(llama_cpp_vocab: Path) -> dict:
    return read_metadata(gguf.GGUFReader(llama_cpp_vocab))


@pytest.fixture(scope="module")
def meta_oracle(meta_tokenizer_path: Path):
    """Meta's own tokenizer class from the llama-models wheel (test-time oracle only)."""
    try:
        from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    except ImportError as e:
        pytest.skip(f"llama_models' tokenizer is not importable ({e}): pip install --no-deps llama-models==0.3.0")
    return MetaTokenizer(meta_tokenizer_path)


def encode_mismatches(ours: Tokenizer, meta_oracle) -> list[str]:
    """Texts that ``ours`` encodes (with BOS) or decodes differently from Meta's tokenizer."""
    out = []
    for text in TEXTS:
        theirs = meta_oracle.encode(text, bos=True, eos=False)
        if ours.encode(text, bos=True, eos=False) != theirs or ours.decode(theirs) != meta_oracle.decode(theirs):
            out.append(text)
    return out


# --- llama.cpp's own Llama 3 vocabulary -----------------------------------------------------


@pytest.mark.slow
def test_llama_cpp_vocabulary_imports_and_encodes_like_meta(llama_cpp_meta: dict, meta_oracle, tmp_path: Path) -> None:
    """The file that used to be refused (merge 2 'ĠĠ ĠĠ' repeats id 257: merges list every split
    of a token) imports to a tokenizer that encodes 240 texts exactly as Meta's tokenizer."""
    bpe, spec = tokenizer_files(llama_cpp_meta)
    (tmp_path / "tokenizer.model").write_text(bpe)
    import json

    (tmp_path / "tokenizer_spec.json").write_text(json.dumps(spec))
    ours = Tokenizer(tmp_path / "tokenizer.model")
    assert ours.bos_id == 128000 and ours.eos_id == 128001 and ours.eot_id == 128009  # llama.cpp adds BOS
    assert len(TEXTS) >= 200
    assert not (bad := encode_mismatches(ours, meta_oracle)), f"{len(bad)} texts differ, e.g. {bad[:3]}"
    for text, ids in llama_cpp_cases(LLAMA_CPP_VOCAB):  # what llama.cpp's own test expects
        assert ours.encode(text, bos=False, eos=False) == ids, text


def test_meta_tokenizer_gives_llama_cpps_expected_ids(llama_cpp_vocab: Path, tokenizer) -> None:
    """llama.cpp's expected ids for its Llama 3 vocabulary are what Meta's tokenizer.model gives."""
    for text, ids in llama_cpp_cases(llama_cpp_vocab):
        assert tokenizer.encode(text, bos=False, eos=False) == ids, text


@pytest.mark.slow
def test_exported_vocabulary_is_llama_cpps(bf16_gguf: Path, llama_cpp_meta: dict) -> None:
    """Tokens, types and all 280,147 merges equal llama.cpp's Llama 3 file; so do the keys llama.cpp
    reads for the architecture and the vocabulary."""
    ours = read_metadata(gguf.GGUFReader(bf16_gguf))
    for key in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "llama.rope.freq_base", "llama.vocab_size"):  # fmt: skip
        assert ours[key] == llama_cpp_meta[key], key
    assert set(llama_cpp_meta) - set(ours) == set(), "keys llama.cpp's file has and ours lacks"
    assert ours["tokenizer.ggml.merges"] == llama_cpp_meta["tokenizer.ggml.merges"]
    assert ours["tokenizer.ggml.tokens"][:128000] == llama_cpp_meta["tokenizer.ggml.tokens"][:128000]
    assert ours["tokenizer.ggml.token_type"] == llama_cpp_meta["tokenizer.ggml.token_type"]
    theirs_special = {t: i for i, t in enumerate(llama_cpp_meta["tokenizer.ggml.tokens"]) if i >= 128000}
    for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert ours["tokenizer.ggml.tokens"][theirs_special[name]] == name
    assert ours["tokenizer.ggml.eot_token_id"] == 128009 and ours["tokenizer.ggml.eom_token_id"] == 128008
    assert ours["llama.embedding_length"] == 64 and ours["llama.attention.head_count_kv"] == 2
    assert ours["llama.feed_forward_length"] == ARGS.ffn_hidden_dim and ours["general.file_type"] == 32  # MOSTLY_BF16


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.slow
def test_bf16_round_trip_is_bit_exact(bf16_gguf: Path, meta_dir: Path, meta_oracle, tmp_path: Path) -> None:
    back = tmp_path / "back"
    import_gguf(bf16_gguf, back, dtype=torch.bfloat16)
    params = load_params(back)
    assert params.ffn_hidden_dim == ARGS.ffn_hidden_dim  # the FFN knobs may be spelled differently
    same = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta",
            "use_scaled_rope", "rope_scale_factor")  # fmt: skip
    assert {k: getattr(params, k) for k in same} == {k: getattr(ARGS, k) for k in same}  # factor 32 from rope_freqs
    a, b = load_state_dict(meta_dir, ARGS), load_state_dict(back, params)
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.bfloat16 and torch.equal(a[key], b[key]), key
    ours = Tokenizer(back / "tokenizer.model")
    assert ours.stop_tokens == [128001, 128009, 128008] and ours.eom_id == 128008
    assert not (bad := encode_mismatches(ours, meta_oracle)), f"{len(bad)} texts differ, e.g. {bad[:3]}"


@pytest.mark.slow
def test_q8_0_is_the_block_format(q8_gguf: Path, tied_dir: Path, tmp_path: Path) -> None:
    """Each block of 32: fp16 d = max|x| / 127 and int8 q = round(x / d), against float64; the
    importer dequantizes d * q exactly; the tied output is not stored."""
    reader = gguf.GGUFReader(q8_gguf)
    assert read_metadata(reader)["general.file_type"] == 7  # MOSTLY_Q8_0
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names and names["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    src = load_state_dict(tied_dir, ARGS)
    back_dir = tmp_path / "back"
    import_gguf(q8_gguf, back_dir, dtype=torch.float32)
    back = load_state_dict(back_dir, load_params(back_dir))
    assert torch.equal(back["output.weight"], back["tok_embeddings.weight"])
    worst = 0.0
    for gname, key in (("token_embd.weight", "tok_embeddings.weight"), ("blk.1.attn_q.weight", "layers.1.attention.wq.weight"),
                       ("blk.0.ffn_down.weight", "layers.0.feed_forward.w2.weight")):  # fmt: skip
        t = names[gname]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        raw = np.asarray(t.data).reshape(-1, 34)  # per block: 2 bytes fp16 d, 32 int8
        d = raw[:, :2].copy().view(np.float16).astype(np.float64)[:, 0]
        q = raw[:, 2:].copy().view(np.int8).astype(np.float64)
        x = src[key].double().reshape(-1, 32).numpy()
        d64 = np.abs(x).max(axis=1) / 127
        assert np.all(np.abs(d - d64) <= d64 * 2.0**-11 * 1.001)  # fp16 rounding of the scale
        assert np.all(np.abs(q) <= 127) and np.all(np.abs(q - x / d64[:, None]) <= 0.5 + 1e-4)
        deq = torch.from_numpy((d[:, None] * q).reshape(src[key].shape)).float()
        assert torch.equal(back[key], deq)
        err = np.abs(deq.double().numpy().reshape(-1, 32) - x)
        assert np.all(err <= d64[:, None] / 2 + 127 * np.abs(d - d64)[:, None] + 1e-12)
        worst = max(worst, rel_err(deq, src[key]))
    print(f"Q8_0 relative error (worst of three tensors): {worst:.2e}")
    assert worst < 1e-2


# --- what llama.cpp-compatible readers compute ----------------------------------------------


@pytest.mark.slow
def test_transformers_reads_the_export_like_our_model(bf16_gguf: Path, meta_dir: Path) -> None:
    """transformers' GGUF loader un-permutes q/k from llama.cpp's order to rotate-half: equal logits
    show the rows are in the order llama.cpp expects. (It ignores rope_freqs, so the comparison
    is against our model without RoPE scaling.)"""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = load_gguf_checkpoint(str(bf16_gguf))["config"]
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "model_type"}
    hf = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="eager")).eval()
    tensors = load_gguf_checkpoint(str(bf16_gguf), return_tensors=True, model_to_load=hf)["tensors"]
    missing, unexpected = hf.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    assert not missing and not unexpected
    hf = hf.float()
    unscaled = ModelArgs(**{**to_dict(ARGS), "use_scaled_rope": False})
    ids = torch.randint(0, ARGS.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = rel_err(hf(ids).logits, load_transformer(meta_dir, dtype=torch.float32, args=unscaled)(ids))
    print(f"export vs transformers' GGUF reader: logits relative error {err:.1e}")
    assert err < 1e-4


@pytest.mark.slow
def test_llama_cpp_logits_match_ours(bf16_gguf: Path, meta_dir: Path, tokenizer) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp)")
    llm = llama_cpp.Llama(model_path=str(bf16_gguf), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    ids = tokenizer.encode(PROMPT, bos=True, eos=False)
    assert llm.tokenize(PROMPT.encode(), add_bos=True, special=False) == ids  # llama.cpp's tokenizer, our vocabulary
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        ours = load_transformer(meta_dir, dtype=torch.float32)(torch.tensor([ids]))[0]
    err = rel_err(theirs, ours)
    print(f"llama.cpp vs ours: logits relative error {err:.1e} (llama.cpp rounds activations to bf16)")
    assert err < 3e-2
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9


# --- errors come first, nothing is left behind ----------------------------------------------


PROG = "python -m llama.gguf export"


def export_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """``python -m llama.gguf export ARGV`` in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(["export", *argv])
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one ``prog: error: ...`` line of a user's mistake (no traceback)."""
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if ": error: " in x]
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 262-token model (SmolLM's pre-tokenizer) with checklist.chk: exports in a few milliseconds."""
    from test_gguf import write_tiny_gguf

    root = tmp_path_factory.mktemp("tiny")
    write_tiny_gguf(root / "tiny.gguf")
    import_gguf(root / "tiny.gguf", root / "tiny")
    return root / "tiny"


def test_refuses_an_existing_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep")
    code, err = export_cli([str(tmp_path), str(out)], capsys)
    assert code == 1 and "already exists" in error_line(err) and out.read_bytes() == b"keep"


def test_q8_0_needs_rows_of_32(tmp_path: Path, meta_tokenizer_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ModelArgs(dim=48, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=16)
    write_checkpoint(tmp_path / "m", random_state_dict(args), args)
    (tmp_path / "m" / "tokenizer.model").write_bytes(meta_tokenizer_path.read_bytes())
    code, err = export_cli([str(tmp_path / "m"), str(tmp_path / "m.gguf"), "--type", "q8_0"], capsys)
    assert code == 1 and "multiples of 32" in error_line(err) and "export bf16" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no partial file


def test_needs_a_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=96, multiple_of=32)
    write_checkpoint(tmp_path / "m", random_state_dict(args), args)
    code, err = export_cli([str(tmp_path / "m"), str(tmp_path / "m.gguf")], capsys)
    assert code == 1 and "no tokenizer.model" in error_line(err)


def test_command_line_conventions(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """As the other tools: abbreviated flags refused (exit 2), one line naming the program (exit 1)."""
    code, err = export_cli([str(tiny_dir), str(tmp_path / "o.gguf"), "--ty", "q8_0"], capsys)
    assert code == 2 and "unknown flag --ty (did you mean --type?)" in error_line(err)
    (tmp_path / "afile").write_text("keep")
    code, err = export_cli([str(tiny_dir), str(tmp_path / "afile" / "o.gguf")], capsys)
    assert code == 1 and f"{tmp_path / 'afile'} is a file, not a folder" in error_line(err)
    code, err = export_cli([str(tiny_dir), str(tmp_path / "afile" / "sub" / "o.gguf")], capsys)
    assert code == 1 and f"cannot create {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file" in error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    code, err = export_cli([str(tiny_dir), str(tmp_path / "o.gguf")], capsys)
    assert code == 0 and (tmp_path / "o.gguf").stat().st_mode & 0o777 == 0o666 & ~_umask()  # a normal new file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "o.gguf"]


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_ctrl_c_prints_one_line_and_leaves_nothing(tiny_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import llama.gguf_export

    real = llama.gguf_export._encode
    calls = []

    def encode(t, qtype):  # Ctrl-C while the third tensor is written
        calls.append(t)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(t, qtype)

    monkeypatch.setattr(llama.gguf_export, "_encode", encode)
    try:
        code, err = export_cli([str(tiny_dir), str(tmp_path / "o.gguf")], capsys)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main: Python prints its traceback")
    assert code == 130 and "Traceback" not in err and err.strip().splitlines()[-1] == f"{PROG}: interrupted"
    assert list(tmp_path.iterdir()) == []  # no OUT, no partial


def test_stale_partials_of_the_destination_are_removed(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    """A killed export leaves a hidden partial beside OUT: a file (earlier versions) or a folder
    with an owner file (now). The next export to OUT removes those whose writer is gone, and
    nothing else: a live writer's, another destination's, a name that is not exactly ours."""
    import os
    import subprocess
    import sys

    stale_file = tmp_path / ".o.gguf.partial-k3_x9zq1"  # tempfile.mkstemp's name, as earlier versions made it
    stale_file.write_bytes(b"x" * 3000)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale_folder = tmp_path / ".o.gguf.partial-abcd1234"  # kill -9 while writing: owner gone
    stale_folder.mkdir()
    (stale_folder / ".partial-owner").write_text(f"{os.uname().nodename} {dead.stdout.strip()}\n")
    (stale_folder / "o.gguf").write_bytes(b"x" * 5000)
    live = tmp_path / ".o.gguf.partial-live0000"
    live.mkdir()
    (live / ".partial-owner").write_text(f"{os.uname().nodename} {os.getpid()}\n")  # this test process runs
    kept = [live, tmp_path / ".other.gguf.partial-abcd1234", tmp_path / ".o.gguf.partial-abc",
            tmp_path / ".o.gguf.partial-abcd1234.keep", tmp_path / "o.gguf.partial-abcd1234"]  # fmt: skip
    for path in kept[1:]:
        path.write_bytes(b"not ours")
    code, err = export_cli([str(tiny_dir), str(tmp_path / "o.gguf")], capsys)
    assert code == 0, err
    assert f"removed {stale_file} (0.0 MB), left by an interrupted run" in err
    assert f"removed {stale_folder} (0.0 MB), left by an interrupted run" in err
    assert f"{live} is being written by process {os.getpid()}; left alone" in err
    assert not stale_file.exists() and not stale_folder.exists() and all(p.exists() for p in kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o.gguf", *(p.name for p in kept)])


@pytest.mark.slow
def test_kill_9_leaves_a_partial_the_next_run_removes(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    import subprocess
    import sys

    from child_env import REPO, child_env

    out = tmp_path / "o.gguf"
    code = ("import os, signal, sys; from llama.gguf_export import export_gguf; "
            "export_gguf(sys.argv[1], sys.argv[2], progress=lambda n, total, name: n == 3 and os.kill(os.getpid(), signal.SIGKILL))")  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", code, str(tiny_dir), str(out)], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    (partial,) = tmp_path.iterdir()
    assert partial.name.startswith(".o.gguf.partial-") and (partial / "o.gguf").stat().st_size > 0
    code, err = export_cli([str(tiny_dir), str(out)], capsys)
    assert code == 0 and f"removed {partial}" in err and "left by an interrupted run" in err
    assert [p.name for p in tmp_path.iterdir()] == ["o.gguf"]


@pytest.mark.slow
def test_shard_count_does_not_change_the_file(meta_dir: Path, bf16_gguf: Path, tmp_path: Path) -> None:
    """Two shards (each tensor assembled when written) and one file give the same bytes."""
    one = tmp_path / "meta"  # same folder name: general.name is the folder's name
    write_checkpoint(one, random_state_dict(ARGS, seed=1), ARGS)
    (one / "tokenizer.model").write_bytes((meta_dir / "tokenizer.model").read_bytes())
    export_gguf(one, tmp_path / "one.gguf")
    assert len(list(meta_dir.glob("consolidated.*.pth"))) == 2
    assert (tmp_path / "one.gguf").read_bytes() == bf16_gguf.read_bytes()
