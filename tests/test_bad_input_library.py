"""Issue 15's bad-input catalogue, library side (and issue 14's params.json points 5 and 6).

Each case is driven the way a user meets it: ``Llama.build`` on a folder someone broke, or a call
of the generation API with a wrong argument. Every test asserts that the message names the
problem (the key, the file, the number) and that nothing in the folder was written or overwritten.
Numbers in the test names are the issue's.
"""

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from llama.checkpoint import VERIFIED_RECORD, write_checklist, write_random_checkpoint
from llama.diagnose import NonFiniteLogitsError
from llama.generation import Llama
from llama.model import ModelArgs
from llama.params import load as read_params
from llama.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# The smallest model that takes Meta's tokenizer (vocabulary 128,256): shards of ~8 MB.
ARGS = ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=128256, multiple_of=32)
SEQ, BATCH = 32, 2


@pytest.fixture(scope="module")
def base(tmp_path_factory, meta_tokenizer_path) -> Path:
    """A one-shard bf16 checkpoint in Meta's format, with tokenizer.model and checklist.chk."""
    path = tmp_path_factory.mktemp("bad_input") / "base"
    write_random_checkpoint(path, ARGS, seed=0, tokenizer_path=meta_tokenizer_path)
    return path


@pytest.fixture
def ckpt(base, tmp_path) -> Path:
    """A fresh copy of ``base`` for a test to break."""
    return Path(shutil.copytree(base, tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def llm(base, tmp_path_factory) -> Llama:
    folder = Path(shutil.copytree(base, tmp_path_factory.mktemp("llm") / "ckpt"))
    return Llama.build(str(folder), None, SEQ, BATCH, device="cpu", dtype="fp32")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime: equal snapshots mean nothing was written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def build(folder: Path, **kw) -> Llama:
    return Llama.build(str(folder), kw.pop("tokenizer_path", None), kw.pop("max_seq_len", SEQ),
                       kw.pop("max_batch_size", BATCH), device="cpu", dtype=kw.pop("dtype", "fp32"), **kw)  # fmt: skip


def refused(folder: Path, error, match: str, **kw) -> str:
    """Build ``folder`` expecting ``error`` matching ``match``; assert nothing in the folder changed."""
    before = snapshot(folder)
    with pytest.raises(error, match=match) as e:
        build(folder, **kw)
    assert snapshot(folder) == before
    return str(e.value)


def edit_params(folder: Path, **changes) -> Path:
    path = folder / "params.json"
    params = json.loads(path.read_text())
    params.update(changes)
    path.write_text(json.dumps(params))
    write_checklist(folder)  # the user's edit is deliberate: the checklist agrees with it
    return path


def edit_shard(folder: Path, edit, i: int = 0) -> Path:
    path = folder / f"consolidated.{i:02d}.pth"
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)
    return path


# ---------------------------------------------------------------------------------------------
# 2. params.json values of the wrong type or range


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("use_scaled_rope", "false", r"use_scaled_rope must be true or false \(a JSON boolean\), got 'false' \(a string\)"),
        ("rope_theta", -1, r"rope_theta must be a number > 1 \(Llama 3: 500000\.0\), got -1"),
        ("norm_eps", -1, r"norm_eps must be a positive number \(Llama 3: 1e-05\), got -1"),
        ("rope_scale_factor", 0, r"rope_scale_factor must be a number >= 1 \(3\.1: 8, 3\.2 1B/3B: 32\), got 0"),
        ("norm_eps", "abc", r"norm_eps must be a positive number \(Llama 3: 1e-05\), got 'abc' \(a string\)"),
        ("ffn_dim_multiplier", "1.3", r"ffn_dim_multiplier must be a positive number, got '1\.3' \(a string\)"),
    ],
)
def test_2_params_json_types_and_ranges(ckpt, key, value, message):
    path = edit_params(ckpt, **{key: value})
    refused(ckpt, ValueError, rf"^{path}: {message}$")


# ---------------------------------------------------------------------------------------------
# 3. Temperature must be finite and >= 0; non-finite logits stop with an error


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_3_temperature_not_finite_or_negative(llm, temperature):
    with pytest.raises(ValueError, match=rf"^temperature={temperature!r} must be >= 0 and finite \(0 is greedy\)$"):
        llm.text_completion(["Hello"], temperature=temperature, max_gen_len=4)
    with pytest.raises(ValueError, match=r"^temperature=.* must be >= 0 and finite"):
        llm.text_stream("Hello", temperature=temperature, max_gen_len=4)


def test_3_tiny_temperature_is_greedy_not_noise(llm):
    greedy = llm.text_completion(["Hello there"], temperature=0, max_gen_len=6)
    tiny = llm.text_completion(["Hello there"], temperature=1e-45, max_gen_len=6)
    assert tiny == greedy
    tokens, _ = llm.generate([[128000, 9906]], max_gen_len=6, temperature=1e-45)
    assert 128255 not in tokens[0]


def test_3_nan_weights_stop_naming_the_layer_and_checkpoint(ckpt):
    def poison(sd):
        sd["layers.1.attention.wq.weight"][3, 5] = float("nan")

    edit_shard(ckpt, poison)
    write_checklist(ckpt)  # the checksums agree: only the logits can show it
    llm = build(ckpt)
    with pytest.raises(NonFiniteLogitsError) as e:
        llm.text_completion(["Hello"], temperature=0.6, max_gen_len=4)
    # Position 2 is predicted by the prefill, whose fused attention kernel (SDPA on CPU) happens to
    # absorb a NaN in one query element; the first decode step, predicting position 3, does not.
    assert re.match(r"the model produced non-finite logits \(NaN/inf\) for position [23]: the first non-finite "
                    r"output is layers\.1\.attention\.wq's, and layers\.1\.attention\.wq\.weight holds 1 NaN/inf "
                    rf"value\(s\): the checkpoint {ckpt} is corrupt; re-download it", str(e.value))  # fmt: skip
    with pytest.raises(NonFiniteLogitsError, match=r"layers\.1\.attention\.wq"):
        list(llm.text_stream("Hello", max_gen_len=4))


def test_3_check_names_the_first_module_in_execution_order(ckpt):
    edit_shard(ckpt, lambda sd: sd["tok_embeddings.weight"][9906].fill_(float("inf")))  # "Hello"
    write_checklist(ckpt)
    with pytest.raises(NonFiniteLogitsError, match=r"first non-finite output is tok_embeddings's, and "
                                                   r"tok_embeddings\.weight holds 32 NaN/inf value\(s\)"):
        build(ckpt).text_completion(["Hello"], max_gen_len=2)


# ---------------------------------------------------------------------------------------------
# 4. Integer weights; checklist.chk verification by Llama.build


def test_4_integer_weights_are_an_error(ckpt):
    path = edit_shard(ckpt, lambda sd: sd.update({k: (v * 100).to(torch.int8) for k, v in sd.items()}))
    refused(ckpt, ValueError, rf"^{path}: tok_embeddings\.weight has dtype int8, not a float type: .*"
                              r"use the original float16/bfloat16/float32 checkpoint$", verify=False)  # fmt: skip


def zero_run(path: Path, start: int, length: int) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(length))


def test_4_checklist_catches_a_run_of_zeros(ckpt, capsys):
    shard = ckpt / "consolidated.00.pth"
    assert shard.stat().st_size > 6 << 20
    zero_run(shard, 1 << 20, 4 << 20)  # 4 MiB of zeros inside the embedding: loads silently without the check
    message = refused(ckpt, ValueError, rf"^{shard} does not match checklist\.chk: md5 [0-9a-f]{{32}}, expected "
                                        r"[0-9a-f]{32} \(a corrupt or incomplete download\): re-download it, or pass "
                                        r"verify=False to load it anyway$")  # fmt: skip
    assert not (ckpt / VERIFIED_RECORD).exists()
    assert "Verifying 3 file(s)" in capsys.readouterr().err
    build(ckpt, verify=False)  # the user's explicit choice
    assert message


@pytest.mark.slow  # four builds
def test_4_verification_is_paid_once_and_redone_when_a_file_changes(ckpt, capsys):
    build(ckpt)
    err = capsys.readouterr().err
    assert f"Verifying 3 file(s) of {ckpt} against checklist.chk" in err and "Verified 3 file(s)" in err
    record = (ckpt / VERIFIED_RECORD).read_text().splitlines()
    assert sorted(line.split(" ", 3)[3] for line in record) == ["consolidated.00.pth", "params.json", "tokenizer.model"]

    build(ckpt)  # recorded: no hashing
    assert "Verifying" not in capsys.readouterr().err
    build(ckpt, verify=True)  # forced
    assert "Verifying 3 file(s)" in capsys.readouterr().err

    # The shard changes after verification (same size): size+mtime differ from the record, so it is hashed again.
    shard = ckpt / "consolidated.00.pth"
    st = shard.stat()
    zero_run(shard, 1 << 20, 4096)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ValueError, match=rf"{shard} does not match checklist\.chk"):
        build(ckpt)
    assert "Verifying 1 file(s)" in capsys.readouterr().err


def test_4_verify_true_without_a_checklist(ckpt):
    (ckpt / "checklist.chk").unlink()
    refused(ckpt, FileNotFoundError, rf"^verify=True, but {ckpt} has no checklist\.chk to verify against$", verify=True)
    build(ckpt)  # auto: nothing to verify against


def test_4_malformed_checklist_line(ckpt):
    (ckpt / "checklist.chk").write_text("<html><body>403 Forbidden</body></html>\n")
    refused(ckpt, ValueError, rf"^{ckpt / 'checklist.chk'}, line 1: .* is not an md5sum or sha256sum line")


# ---------------------------------------------------------------------------------------------
# 5. tokenizer.model that claims to be Meta's (128,000 ranks) but is not


def test_5_edited_meta_tokenizer_warns_with_both_sums(ckpt):
    path = ckpt / "tokenizer.model"
    lines = path.read_text().splitlines()
    (a, ra), (b, rb) = lines[1000].split(), lines[1001].split()
    lines[1000], lines[1001] = f"{a} {rb}", f"{b} {ra}"  # two ranks swapped
    path.write_text("\n".join(lines) + "\n")
    write_checklist(ckpt)
    with pytest.warns(UserWarning) as record:
        Tokenizer(path)
    (w,) = [w for w in record if "md5" in str(w.message)]
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    assert str(w.message) == (
        f"{path} has Meta's 128,000 ranks but md5 {md5}, not 08292403f8b173e7524d7fba7bbbd2d3 of Meta's Llama 3 "
        f"tokenizer.model: an edited or corrupt file gives wrong token ids; re-download it"
    )


def test_5_meta_tokenizer_does_not_warn(meta_tokenizer_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Tokenizer(meta_tokenizer_path)


# ---------------------------------------------------------------------------------------------
# 6. max_gen_len < 1 is an error in every stream and < 0 everywhere (0 scores, as in Meta's
# generate); 7. token ids must be ints; 17. wrong argument types

DIALOG = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("max_gen_len", [0, -3])
def test_6_max_gen_len_not_positive(llm, max_gen_len):
    streams = {
        "text_stream": lambda: llm.text_stream("Hello", max_gen_len=max_gen_len),
        "chat_stream": lambda: llm.chat_stream(DIALOG, max_gen_len=max_gen_len),
        "generate_stream": lambda: llm.generate_stream([[128000, 9906]], max_gen_len=max_gen_len),
    }
    for name, call in streams.items():
        with pytest.raises(ValueError, match=rf"^max_gen_len={max_gen_len} must be at least 1$"):
            next(iter(call()))  # text_stream and chat_stream raise at the call, before any token
    calls = {
        "text_completion": lambda: llm.text_completion(["Hello"], max_gen_len=max_gen_len),
        "chat_completion": lambda: llm.chat_completion([DIALOG], max_gen_len=max_gen_len),
        "generate": lambda: llm.generate([[128000, 9906]], max_gen_len=max_gen_len),
    }
    for name, call in calls.items():
        if max_gen_len == 0:  # Meta's scoring call: nothing generated
            assert call() in ([{"generation": ""}], [{"generation": {"role": "assistant", "content": "", "stop_reason": "out_of_tokens", "tool_calls": []}}], ([[]], None)), name
            continue
        with pytest.raises(ValueError, match=rf"^max_gen_len={max_gen_len} must be at least 0$"):
            call()


@pytest.mark.parametrize("token,kind", [(1.7, "float"), ("5", "str"), (True, "bool")])
def test_7_token_ids_must_be_ints(llm, token, kind):
    with pytest.raises(TypeError, match=rf"^prompt 1, token 2: {token!r} is a {kind}; token ids must be ints$"):
        llm.generate([[128000, 9906], [128000, 9906, token]], max_gen_len=2)


def test_7_numpy_ints_and_tensors_still_work(llm):
    want = llm.generate([[128000, 9906]], max_gen_len=2, temperature=0)[0]
    assert llm.generate([np.array([128000, 9906])], max_gen_len=2, temperature=0)[0] == want
    assert llm.generate([[np.int64(128000), np.int32(9906)]], max_gen_len=2, temperature=0)[0] == want
    assert llm.generate(torch.tensor([[128000, 9906]]), max_gen_len=2, temperature=0)[0] == want
    with pytest.raises(TypeError, match=r"^prompt 0: a tensor of token ids must be 1-D of an integer dtype, got "
                                        r"torch\.float32 \(2,\)$"):  # fmt: skip
        llm.generate(torch.tensor([[128000.0, 9906.0]]), max_gen_len=2)


def test_7_flat_list_of_ids(llm):
    with pytest.raises(TypeError, match=r"^prompt 0 must be a list of token ids \(ints\), got int"):
        llm.generate([128000, 9906], max_gen_len=2)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"max_gen_len": 5.5}, TypeError, r"max_gen_len must be an integer, got 5\.5 \(float\)"),
        ({"temperature": "0.5"}, TypeError, r"temperature must be a number >= 0 \(0 is greedy\), got '0\.5' \(str\)"),
        ({"top_p": "0.9"}, TypeError, r"top_p must be a number in \(0, 1\], got '0\.9' \(str\)"),
        ({"top_p": float("nan")}, ValueError, r"top_p=nan must be in \(0, 1\]"),
    ],
)
def test_17_generation_argument_types(llm, kwargs, error, message):
    with pytest.raises(error, match=rf"^{message}$"):
        llm.text_completion(["Hello"], **{"max_gen_len": 4, **kwargs})
    with pytest.raises(error, match=rf"^{message}$"):
        llm.generate([[128000, 9906]], **{"max_gen_len": 4, **kwargs})


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"max_seq_len": 64.5}, TypeError, r"max_seq_len must be an integer, got 64\.5 \(float\)"),
        ({"max_batch_size": 1.5}, TypeError, r"max_batch_size must be an integer, got 1\.5 \(float\)"),
        ({"max_seq_len": "64"}, TypeError, r"max_seq_len must be an integer, got '64' \(str\)"),
        ({"model_parallel_size": 0}, ValueError, r"model_parallel_size=0 must be at least 1"),
        ({"max_batch_size": 0}, ValueError, r"max_batch_size=0 must be at least 1"),
        ({"verify": "yes"}, TypeError, r"verify must be None \(auto\), True or False, got 'yes'"),
        ({"compile": "yes"}, TypeError, r"compile must be True or False, got 'yes'"),
    ],
)
def test_17_build_argument_types(ckpt, kwargs, error, message):
    refused(ckpt, error, rf"^{message}$", **kwargs)


def test_17_the_folder_argument(ckpt):
    """None, a shard file or a GGUF file where the folder goes: named, with what to give instead."""
    with pytest.raises(TypeError, match=r"^ckpt_dir must be a checkpoint folder's path \(str or Path\), got None$"):
        Llama.build(None, None, SEQ, BATCH, device="cpu")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth is a file: give its folder \(params\.json \+ consolidated\.NN\.pth\)$"):
        Llama.build(str(ckpt / "consolidated.00.pth"), None, SEQ, BATCH, device="cpu")
    gguf = ckpt.parent / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"model\.gguf is a file: .*import a GGUF with python -m llama\.gguf import$"):
        Llama.build(str(gguf), None, SEQ, BATCH, device="cpu")


def test_17_text_given_to_generate(llm):
    with pytest.raises(TypeError, match=r"^prompt_tokens must be a list of prompts, each a list of token ids, got a str: 'abc' \(text goes to text_completion"):
        llm.generate("abc", max_gen_len=4)


# ---------------------------------------------------------------------------------------------
# 11. Not a PyTorch file saved as the shard; 12. a missing shard


FORBIDDEN = b"""<!DOCTYPE html>
<html><head><title>403 Forbidden</title></head>
<body><h1>403 Forbidden</h1><p>Request has expired.</p></body></html>
"""


@pytest.mark.parametrize(
    "content,what",
    [
        (FORBIDDEN, 'looks like an HTML page, saying "403 Forbidden"'),
        (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code></Error>',
         'looks like an HTML page, saying "AccessDenied"'),
        (bytes(range(256)) * 64, "unknown data"),
        (b"", None),
    ],
    ids=["html", "xml", "random", "empty"],
)
def test_11_not_a_pytorch_checkpoint(ckpt, content, what):
    shard = ckpt / "consolidated.00.pth"
    shard.write_bytes(content)
    (ckpt / "checklist.chk").unlink()  # or the checksum says it first (next test)
    if what is None:
        refused(ckpt, ValueError, rf"^{shard} is empty \(0 bytes\), not a PyTorch checkpoint: re-download it$")
    else:
        refused(ckpt, ValueError, rf"^{shard} is not a PyTorch checkpoint \({what}; {len(content):,} bytes\): "
                                  r"re-download it$")  # fmt: skip


def test_11_with_a_checklist_the_checksum_names_it_first(ckpt):
    shard = ckpt / "consolidated.00.pth"
    shard.write_bytes(FORBIDDEN)
    refused(ckpt, ValueError, rf"^{shard} does not match checklist\.chk")


def test_11_truncated_shard(ckpt):
    shard = ckpt / "consolidated.00.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    refused(ckpt, ValueError, rf"^{shard} is a truncated or corrupt PyTorch checkpoint \({len(data) // 2:,} bytes; "
                              r".*\): re-download it$", verify=False)  # fmt: skip


@pytest.fixture
def two_shards(tmp_path, meta_tokenizer_path) -> Path:
    write_random_checkpoint(tmp_path / "mp2", ARGS, n_shards=2, seed=0, tokenizer_path=meta_tokenizer_path)
    return tmp_path / "mp2"


def test_12_last_shard_missing_named_by_the_checklist(two_shards):
    (two_shards / "consolidated.01.pth").unlink()
    refused(two_shards, FileNotFoundError, rf"^{two_shards / 'consolidated.01.pth'} is missing, but "
                                           rf"{two_shards / 'checklist.chk'} lists it")  # fmt: skip


def test_12_last_shard_missing_named_by_the_shapes(two_shards):
    (two_shards / "consolidated.01.pth").unlink()
    (two_shards / "checklist.chk").unlink()
    refused(two_shards, FileNotFoundError, r"shard\(s\) \['consolidated\.01\.pth'\] missing: consolidated\.00\.pth "
                                           r"holds 64128 of the 128256 embedding rows of params\.json, so the "
                                           r"checkpoint has 2 shards, but only consolidated\.00\.pth is here: download the missing file\(s\)$")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Issue 14, 5: params.json keys of Meta's loaders; 6: Llama 3.2 RoPE factor


def test_14_5_runtime_keys_are_ignored_with_a_note(ckpt, capsys):
    path = edit_params(ckpt, max_seq_len=2048, max_batch_size=32)
    llm = build(ckpt)
    assert llm.model.max_seq_len == SEQ
    err = capsys.readouterr().err
    assert f"note: {path}: ignored max_batch_size=32 (a runtime setting: pass max_batch_size to Llama.build)" in err
    assert f"note: {path}: ignored max_seq_len=2048 (a runtime setting: pass max_seq_len to Llama.build)" in err


@pytest.mark.parametrize(
    "key,value,what",
    [
        ("quantization_args", {"group_size": 32, "scheme": "int4_weight_int8_dynamic_activation"},
         "a quantized checkpoint"),
        ("lora_args", {"rank": 16, "scale": 2.0}, "a checkpoint with LoRA adapters"),
        ("vision_chunk_size", 560, "a Llama 3.2 Vision \\(multimodal\\) checkpoint"),
    ],
)
def test_14_5_checkpoints_we_cannot_run(ckpt, key, value, what):
    path = edit_params(ckpt, **{key: value})
    refused(ckpt, ValueError, rf"^{path}: key '{key}' means this is {what}.*: not supported$")


def test_14_5_unknown_key_is_named(ckpt):
    path = edit_params(ckpt, n_expert=8)
    refused(ckpt, ValueError, rf"^{path}: unknown key\(s\) \['n_expert'\]")


def test_14_6_llama_3_2_params_get_factor_32_and_say_so(tmp_path):
    # Meta's released Llama 3.2 1B params.json (facts table), byte for byte what download.sh fetches.
    released = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
                "use_scaled_rope": True}  # fmt: skip
    path = tmp_path / "params.json"
    path.write_text(json.dumps(released))
    args = read_params(path)
    assert args.rope_scale_factor == 32.0
    assert args.notes == ["Llama 3.2 1B shape: RoPE scale factor 32 (Meta's params.json omits it; "
                          'a "rope_scale_factor" key overrides)']  # fmt: skip
    path.write_text(json.dumps({**released, "rope_scale_factor": 8}))
    assert read_params(path).rope_scale_factor == 8.0


def test_14_6_the_load_message_says_so(ckpt, capsys, monkeypatch):
    # The 1B itself is 2.5 GB: make the tiny model's shape count as a released 3.2 shape, so that
    # Llama.build runs the same path (params.json -> factor -> model -> message) on it.
    import llama.params

    shape = {k: getattr(ARGS, k) for k in llama.params.LLAMA_3_2_SHAPES["Llama 3.2 1B"]} | {"use_scaled_rope": True}
    monkeypatch.setitem(llama.params.LLAMA_3_2_SHAPES, "Llama 3.2 1B", shape)
    edit_params(ckpt, use_scaled_rope=True)
    llm = build(ckpt)
    assert llm.model.args.rope_scale_factor == 32.0
    assert ("note: Llama 3.2 1B shape: RoPE scale factor 32 (Meta's params.json omits it; a \"rope_scale_factor\" "
            "key overrides)") in capsys.readouterr().err  # fmt: skip
    edit_params(ckpt, rope_scale_factor=8)
    assert build(ckpt).model.args.rope_scale_factor == 8.0
    assert "RoPE scale factor" not in capsys.readouterr().err
