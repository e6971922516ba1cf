"""Bad input to the command-line tools, driven as a user hits it: the CLI in a subprocess.

One test (or parametrized case) per kind of issue 15's catalogue that a CLI owns (1, 8, 9, 13, 14,
15, 16, 19, 20, 21) and issue 16's CLI points (help text, folder permissions). Each asserts the
exit code, that the message names the problem (a flag, a key, a file, a number), that a user's
mistake prints no traceback, and that nothing was written or overwritten.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from child_env import REPO, child_env
from llama.checkpoint import atomic_folder, write_checkpoint, write_random_checkpoint
from llama.convert import meta_to_hf
from llama.model import ModelArgs

PY = sys.executable
# Small, but with Meta's vocabulary so that Meta's tokenizer.model loads with it.
ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
# 9 query heads and 3 KV heads, like the demo model: it runs on 1 or 3 ranks, not on 2.
NINE_HEADS = ModelArgs(dim=72, n_layers=1, n_heads=9, n_kv_heads=3, vocab_size=128256, multiple_of=96)
EXAMPLES = ["example_text_completion.py", "example_chat_completion.py", "-m llama.chat"]


def run(cmd: str | list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """``cmd`` (a string is split on spaces) as a child process in the repository root."""
    argv = cmd.split() if isinstance(cmd, str) else cmd
    return subprocess.run(
        [PY, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        env=child_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **env),
    )  # fmt: skip


def user_error(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Assert a user's mistake: exit ``code``, no traceback, an error line naming every word."""
    err = result.stderr
    assert result.returncode == code, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    line = next((x for x in err.splitlines() if ": error: " in x), "")
    for word in words:
        assert word in line, f"{word!r} not in the error line {line!r}\nstderr:\n{err}"
    assert "hint: " in err
    return line


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, meta_tokenizer_path) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny"
    write_random_checkpoint(path, ARGS, seed=0, tokenizer_path=meta_tokenizer_path)
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory, ckpt) -> Path:
    path = tmp_path_factory.mktemp("cli") / "hf"
    meta_to_hf(ckpt, path)
    return path


def copy_hf(hf: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "hf"
    shutil.copytree(hf, dst)
    return dst


@pytest.fixture
def mount(tmp_path):
    """A fresh tmpfs of a given size (``mount("1m")``, ``mount("1m", "ro")``); skips where mounting is not allowed."""
    mounted = []

    def make(size: str, *options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        opts = ",".join([f"size={size}", *options])
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root): the free-space check is also tested in-process")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", str(point)], capture_output=True)


# --- 1: convert --shards -1 / 0 ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("shards", ["-1", "0", "two"])
def test_1_convert_shards_must_be_positive(shards, hf, tmp_path):
    result = run(["-m", "llama.convert", "hf-to-meta", str(hf), str(tmp_path / "out"), "--shards", shards])
    user_error(result, 2, "--shards", shards)
    assert not (tmp_path / "out").exists()


# --- 8: misspelt flags and bad values fail before anything is loaded -----------------------------

BAD_FLAGS = [
    (["--temprature", "0"], ["unknown flag --temprature", "did you mean --temperature?"]),
    (["--sytem", "Be brief."], ["unknown flag --sytem"]),
    (["--temperature", "abc"], ["--temperature", "'abc' is not a number"]),
    (["--temperature", "nan"], ["--temperature", "nan is not a finite number"]),
    (["--temperature", "-1"], ["--temperature", "must be >= 0"]),
    (["--top_p", "0"], ["--top_p", "outside (0, 1]"]),
    (["--max_seq_len", "abc"], ["--max_seq_len", "'abc' is not a whole number"]),
    (["--max_gen_len", "0"], ["--max_gen_len", "must be at least 1"]),
    (["--dtype", "int3"], ["--dtype", "invalid choice: 'int3'"]),
]


# Every bad flag on the text example; the issue's own four on the chat example and llama.chat.
CASES = [("example_text_completion.py", f, w) for f, w in BAD_FLAGS] + [
    (script, f, w) for script in EXAMPLES[1:] for f, w in BAD_FLAGS[:4]
]


@pytest.mark.slow
@pytest.mark.parametrize("script, flags, words", CASES, ids=[f"{s} {' '.join(f)}" for s, f, _ in CASES])
def test_8_bad_flags_fail_before_loading(script, flags, words):
    # The checkpoint folder does not exist: an error about the flag proves nothing was loaded first.
    result = run(script.split() + ["--ckpt_dir", "/nonexistent/ckpt", *flags], timeout=120)
    user_error(result, 2, *words)
    assert result.stdout == ""


@pytest.mark.slow
def test_8_good_flags_in_every_spelling_pass_the_check(ckpt):
    """The check accepts what fire accepts: --a_b V, --a_b=V, --a-b V."""
    result = run(["example_text_completion.py", f"--ckpt_dir={ckpt}", "--max-seq-len", "64", "--max_gen_len=2",
                  "--temperature", "0", "--device", "cpu", "--dtype", "fp32"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("==================================") == 4


# --- 9: python -m llama.memory ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory) -> Path:
    """A checkpoint whose output layer is a copy of the embedding, as converted tied models are."""
    from llama.checkpoint import random_state_dict

    state = random_state_dict(ARGS, seed=0)
    state["output.weight"] = state["tok_embeddings.weight"].clone()
    path = tmp_path_factory.mktemp("cli") / "tied"
    write_checkpoint(path, state, ARGS)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, code, words",
    [
        (["--max_seq_len", "-5"], 2, ["--max_seq_len", "-5 must be at least 2"]),
        (["--max_batch_size", "0"], 2, ["--max_batch_size", "0 must be at least 1"]),
        (["--world_size", "0"], 2, ["--world_size", "0 must be at least 1"]),
        (["--max_seq_len", "9000"], 1, ["--max_seq_len 9000", "model's context of 8192"]),
        (["--world_size", "3"], 1, ["M=3 ranks", "Rank counts that work: 1, 2, 4"]),
        (["--dtype", "int2"], 2, ["--dtype", "invalid choice: 'int2'"]),
    ],
)
def test_9_memory_refuses_bad_values(flags, code, words, ckpt):
    user_error(run(["-m", "llama.memory", str(ckpt), *flags]), code, *words)


@pytest.mark.slow
def test_9_memory_counts_int4_bf16_and_a_tied_output_in_gib(tied_ckpt):
    # Independent count: embedding (vocab x dim) once, one layer, the final norm.
    hd, ffn = 64 // 4, ARGS.ffn_hidden_dim
    layer = 64 * 4 * hd * 2 + 64 * 2 * hd * 2 + 3 * 64 * ffn + 2 * 64
    unique = 128256 * 64 + layer + 64
    result = run(["-m", "llama.memory", str(tied_ckpt), "--dtype", "int4", "--max_seq_len", "1024"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"parameters: {unique:,} (output layer tied" in out
    assert f"loaded as two copies: {unique + 128256 * 64:,}" in out
    assert f"{'int4':<14} {unique * 0.5 / 2**30:8.2f} GiB" in out
    # this run: int4 weights as loaded, scales included, the embedding in bf16 (llama.memory's
    # quantized_weight_bytes, checked by hand in tests/test_memory.py), KV cache 16-bit
    from llama.memory import quantized_weight_bytes

    assert f"weights {quantized_weight_bytes(ARGS, 'int4') / 2**30:.2f} GiB" in out
    assert " GB" not in out  # one unit throughout
    bf16 = run(["-m", "llama.memory", str(tied_ckpt), "--dtype", "bf16", "--max_seq_len", "1024"])
    assert bf16.returncode == 0, bf16.stderr
    assert f"weights {(unique + 128256 * 64) * 2 / 2**30:.2f} GiB" in bf16.stdout


# --- 13: devices that do not exist here ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("device, words", [("tpu", ["'tpu' is not a device name"]), ("gpu", ["'gpu'", "use cuda"]),
                                           ("cuda", ["'cuda'"]), ("cuda:7", ["'cuda:7'"])])  # fmt: skip
def test_13_device_that_does_not_exist_names_the_devices_here(device, words):
    if device.startswith("cuda") and torch.cuda.device_count() > int(device.partition(":")[2] or 0):
        pytest.skip("this machine has that CUDA device")
    result = run(["example_text_completion.py", "--ckpt_dir", "/nonexistent", "--device", device])
    user_error(result, 2, "--device", *words, "devices here: cpu")


def test_13_library_names_the_devices_here_too():
    from llama.devices import check_device

    with pytest.raises(ValueError, match="'tpu' is not a device name; devices here: cpu"):
        check_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="devices here: cpu"):
            check_device("cuda")


# --- 14: full disk, read-only destination ----------------------------------------------------


@pytest.mark.slow
def test_14_full_disk_is_refused_before_writing(mount, ckpt, hf):
    small = mount("1m")
    for argv in (["-m", "llama.reshard", str(ckpt), str(small / "out"), "--mp", "2"],
                 ["-m", "llama.convert", "hf-to-meta", str(hf), str(small / "out")],
                 ["-m", "llama.convert", "meta-to-hf", str(ckpt), str(small / "out")]):  # fmt: skip
        line = user_error(run(argv), 1, f"no space left on {small}", "1.0 MB free")
        assert "(need 32." in line or "(need 33." in line  # 32.9 MB of weights (bf16)
        assert list(small.iterdir()) == []


@pytest.mark.slow
def test_14_full_disk_gguf_is_refused_before_dequantizing(mount, tmp_path):
    from test_gguf import write_tiny_gguf

    write_tiny_gguf(tmp_path / "tiny.gguf")
    small = mount("16k")
    result = run(["-m", "llama.gguf", str(tmp_path / "tiny.gguf"), str(small / "out")])
    user_error(result, 1, f"no space left on {small}", "MB free")
    assert "dequantizing" not in result.stderr and list(small.iterdir()) == []


@pytest.mark.slow
def test_14_read_only_destination(mount, ckpt):
    ro = mount("1m", "ro")
    user_error(run(["-m", "llama.reshard", str(ckpt), str(ro / "out"), "--mp", "1"]), 1, str(ro), "read-only")


def test_14_disk_filling_up_mid_write_is_named(mount, tmp_path):
    """The estimate can be short (headers, other writers): a write that hits ENOSPC says so."""
    small = mount("1m")
    with pytest.raises(OSError, match=rf"no space left on {small} while writing {small / 'out'}"):
        with atomic_folder(small / "out") as tmp:
            torch.save(torch.zeros(2**20), tmp / "big.pth")  # 4 MiB into 1 MiB
    assert list(small.iterdir()) == []


def test_14_gguf_export_full_disk_and_read_only(mount, tmp_path, capsys):
    """The export checks the room for the file before the work, and a read-only destination; a
    write that still fills the disk (the estimate is short) is named too, and leaves nothing."""
    from test_gguf import write_tiny_gguf

    from llama.checkpoint import atomic_file
    from llama.gguf import import_gguf

    write_tiny_gguf(tmp_path / "tiny.gguf")
    import_gguf(tmp_path / "tiny.gguf", tmp_path / "tiny")
    small, ro = mount("64k"), mount("1m", "ro")
    code, err = in_process("llama.gguf", ["export", str(tmp_path / "tiny"), str(small / "o.gguf")], capsys)
    line = next(x for x in err.splitlines() if ": error: " in x)
    assert code == 1 and "Traceback" not in err and "Verifying" not in err, err  # refused before the hashing
    assert line.startswith(f"python -m llama.gguf export: error: no space left on {small} (need ")
    assert "MB free) to write" in line and list(small.iterdir()) == []
    code, err = in_process("llama.gguf", ["export", str(tmp_path / "tiny"), str(ro / "o.gguf")], capsys)
    assert code == 1 and f"python -m llama.gguf export: error: cannot write in {ro}: read-only file system" in err
    with pytest.raises(OSError, match=rf"no space left on {small} while writing {small / 'o.gguf'}"):
        with atomic_file(small / "o.gguf") as path:
            path.write_bytes(b"x" * 2**17)  # 128 KiB into 64 KiB
    assert list(small.iterdir()) == []


def test_14_free_space_check_in_process(monkeypatch, tmp_path):
    import llama.checkpoint as checkpoint

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=10**9))
    with pytest.raises(OSError, match=r"no space left on .* \(need 2.00 GB, 1.00 GB free\) to write .*out"):
        with atomic_folder(tmp_path / "out", need_bytes=2 * 10**9):
            pass
    assert list(tmp_path.iterdir()) == []


# --- 15 and 16: broken Hugging Face folders, truncated files, paths outside the folder -----------


@pytest.mark.slow
@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: "{not json", ["config.json: invalid JSON", "line 1, column 2"]),
        (lambda c: json.dumps({k: v for k, v in c.items() if k != "hidden_size"}), ["config.json lacks hidden_size"]),
        (lambda c: json.dumps({**c, "hidden_size": "64"}), ["config.json", "hidden_size is '64' (str)"]),
        (lambda c: json.dumps({**c, "rms_norm_eps": "1e-5"}), ["config.json", "rms_norm_eps is '1e-5' (str)"]),
    ],
    ids=["invalid-json", "missing-key", "string-int", "string-float"],
)
def test_15_broken_config_json(edit, words, hf, tmp_path):
    src = copy_hf(hf, tmp_path)
    (src / "config.json").write_text(edit(json.loads((src / "config.json").read_text())))
    user_error(run(["-m", "llama.convert", "hf-to-meta", str(src), str(tmp_path / "out")]), 1, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_15_truncated_safetensors(hf, tmp_path):
    src = copy_hf(hf, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = run(["-m", "llama.convert", "hf-to-meta", str(src), str(tmp_path / "out")])
    user_error(result, 1, str(src / "model.safetensors"), "truncated", "re-download")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_15_truncated_gguf(tmp_path):
    from test_gguf import write_tiny_gguf

    write_tiny_gguf(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    for cut in (len(data) // 2, 100):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        result = run(["-m", "llama.gguf", str(tmp_path / "cut.gguf"), str(tmp_path / "out")])
        user_error(result, 1, str(tmp_path / "cut.gguf"), "not a readable GGUF file", "truncated")
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_16_index_naming_a_file_outside_the_folder_is_refused(hf, tmp_path):
    src = copy_hf(hf, tmp_path)
    secret = tmp_path / "secret.safetensors"
    (src / "model.safetensors").rename(secret)  # a real safetensors file: opening it would succeed
    index = {"weight_map": {"model.embed_tokens.weight": "../secret.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    result = run(["-m", "llama.convert", "hf-to-meta", str(src), str(tmp_path / "out")])
    user_error(result, 1, "model.safetensors.index.json", "'../secret.safetensors'", "outside", "refused")
    assert not (tmp_path / "out").exists()


# --- 19: one line and a hint for a user's mistake; Ctrl-C; LLAMA_DEBUG --------------------------


@pytest.mark.slow
def test_19_wrong_ckpt_dir_prompt_too_long_and_debug_traceback(ckpt, tmp_path):
    result = run(["example_text_completion.py", "--ckpt_dir", str(tmp_path / "nope")])
    user_error(result, 1, "checkpoint folder not found", str(tmp_path / "nope"))
    assert len(result.stderr.strip().splitlines()) == 2  # the error and the hint
    result = run(["example_text_completion.py", "--ckpt_dir", str(ckpt), "--max_seq_len", "8", "--device", "cpu"])
    user_error(result, 1, "prompt 0 has", "--max_seq_len 8", "use --max_seq_len 16")  # every prompt checked first
    debug = run(["example_text_completion.py", "--ckpt_dir", str(tmp_path / "nope")], LLAMA_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES[:2])
def test_19_ctrl_c_prints_one_line(script, ckpt):
    # A long generation (1,000 tokens a prompt), interrupted once the model is loaded: the signal
    # lands while it generates, however fast the machine (waiting for the first answer on stdout
    # raced with the end of a short run).
    proc = subprocess.Popen(
        [PY, script, "--ckpt_dir", str(ckpt), "--max_seq_len", "1100", "--max_gen_len", "1000", "--device", "cpu",
         "--dtype", "fp32"],
        cwd=REPO, env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C's default action in the child even where this test runs with SIGINT ignored (a shell
        # ignores it for commands started with `&`, and Python then installs no KeyboardInterrupt).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    before = []
    for line in proc.stderr:  # until "Loaded ... in N s"
        before.append(line)
        if line.startswith("Loaded "):
            break
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = "".join(before) + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"{script}: interrupted"


# --- 20: torchrun with a rank count the model cannot split over ---------------------------------


@pytest.mark.slow
def test_20_torchrun_on_ranks_that_do_not_divide_the_heads(tmp_path, meta_tokenizer_path):
    write_random_checkpoint(tmp_path / "nine", NINE_HEADS, tokenizer_path=meta_tokenizer_path)
    files = sorted((tmp_path / "nine").glob("*.pth"))  # a checklist: refused before the minutes of hashing
    (tmp_path / "nine" / "checklist.chk").write_text("".join(f"{hashlib.md5(f.read_bytes()).hexdigest()}  {f.name}\n" for f in files))
    from test_examples import free_port

    result = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                  "example_text_completion.py", "--ckpt_dir", str(tmp_path / "nine"), "--device", "cpu"])  # fmt: skip
    assert result.returncode != 0
    ours = [x for x in result.stderr.splitlines() if "example_text_completion.py: error:" in x]
    assert len(ours) == 1, result.stderr  # printed once, by rank 0
    assert "M=2 ranks" in ours[0] and "n_heads=9" in ours[0] and "Rank counts that work: 1, 3" in ours[0]
    assert "Verifying" not in result.stderr
    # No traceback from our code on the ranks (torchrun's own summary follows, with frames of
    # torch's files, which live under REPO/.venv in CI).
    ours = [line for line in result.stderr.splitlines() if f'File "{REPO}' in line and "/.venv/" not in line]
    assert not ours, ours


# --- 21: stale partial folders; gguf checks the destination first --------------------------------


@pytest.mark.slow
def test_21_stale_partial_folder_is_removed_and_a_live_one_kept(ckpt, tmp_path):
    stale = tmp_path / ".out.partial-abc123"
    stale.mkdir()
    (stale / "consolidated.00.pth").write_bytes(b"x" * 1000)  # a killed run: no owner file
    live = tmp_path / ".out.partial-live99"
    live.mkdir()
    (live / ".partial-owner").write_text(f"{os.uname().nodename} {os.getpid()}\n")  # this test process runs
    other = tmp_path / ".other.partial-zzz"  # another destination's: not ours to touch
    other.mkdir()
    result = run(["-m", "llama.reshard", str(ckpt), str(tmp_path / "out"), "--mp", "1"])
    assert result.returncode == 0, result.stderr
    assert f"removed {stale} (0.0 MB), left by an interrupted run" in result.stdout + result.stderr
    assert f"{live} is being written by process {os.getpid()}; left alone" in result.stdout + result.stderr
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "out" / "params.json").is_file()


@pytest.mark.slow
def test_21_gguf_refuses_an_existing_destination_before_reading(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)  # would fail to parse
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    result = run(["-m", "llama.gguf", str(tmp_path / "broken.gguf"), str(tmp_path / "out")])
    user_error(result, 1, str(tmp_path / "out"), "already exists")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


# --- a corrupt download: the folder tools check SRC's checklist.chk before writing ---------------


def corrupt(ckpt: Path, tmp_path: Path) -> Path:
    """A copy of ``ckpt`` with 4 KB of 0xff in the middle of its shard (NaNs in a weight), as a bad
    download has it: checklist.chk no longer matches."""
    src = tmp_path / "corrupt"
    shutil.copytree(ckpt, src, ignore=shutil.ignore_patterns(".llama-verified"))
    shard = src / "consolidated.00.pth"
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    return src


def in_process(module: str, argv: list[str], capsys) -> tuple[int, str]:
    """``python -m MODULE ARGV`` in this process (its ``main``): (exit code, stdout and stderr)."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return e.value.code, out + err


FOLDER_TOOLS = {
    "quantize": ("llama.quantize_folder", "python -m llama.quantize", lambda src, dst: [src, dst, "--int8"]),
    "reshard": ("llama.reshard", "python -m llama.reshard", lambda src, dst: [src, dst, "--mp", "2"]),
    "meta-to-hf": ("llama.convert", "python -m llama.convert", lambda src, dst: ["meta-to-hf", src, dst]),
    "gguf-export": ("llama.gguf", "python -m llama.gguf export", lambda src, dst: ["export", src, dst + ".gguf"]),
}


@pytest.mark.parametrize("tool", FOLDER_TOOLS)
def test_corrupt_source_is_refused_before_writing(tool, ckpt, tmp_path, capsys):
    """Llama.build refuses a folder whose files do not match checklist.chk; so do the tools that
    read one, before writing (quantize and reshard would write a fresh checklist vouching for it)."""
    module, prog, argv = FOLDER_TOOLS[tool]
    src = corrupt(ckpt, tmp_path)
    code, err = in_process(module, argv(str(src), str(tmp_path / "out")), capsys)
    assert code == 1 and "Traceback" not in err, err
    line = next(x for x in err.splitlines() if ": error: " in x)
    assert line.startswith(f"{prog}: error: {src / 'consolidated.00.pth'} does not match checklist.chk"), line
    assert line.endswith("(a corrupt or incomplete download): re-download it, or pass --no_verify to load it anyway")
    assert f"Verifying 3 file(s) of {src} against checklist.chk" in err  # the progress, as Llama.build shows it
    assert [p.name for p in tmp_path.iterdir()] == ["corrupt"]  # nothing written, no partial


def test_no_verify_skips_the_check_but_quantize_still_refuses_nan(ckpt, tmp_path, capsys):
    src = corrupt(ckpt, tmp_path)
    code, err = in_process("llama.reshard", [str(src), str(tmp_path / "mp2"), "--mp", "2", "--no_verify"], capsys)
    assert code == 0 and "Verifying" not in err and (tmp_path / "mp2" / "checklist.chk").is_file()  # the user's choice
    code, err = in_process("llama.quantize_folder", [str(src), str(tmp_path / "int8"), "--int8", "--no-verify"], capsys)
    line = next(x for x in err.splitlines() if ": error: " in x)
    assert code == 1 and line.startswith(f"python -m llama.quantize: error: {src / 'consolidated.00.pth'}: layers.0.")
    assert "has a non-finite value (NaN or inf) in row" in line
    assert not (tmp_path / "int8").exists() and not list(tmp_path.glob(".int8.partial-*"))


# --- issue 16: folders get normal permissions; every CLI has real help ---------------------------


def test_written_folders_get_normal_permissions(ckpt, tmp_path):
    from llama.reshard import reshard

    umask = os.umask(0o022)
    try:
        reshard(ckpt, tmp_path / "mp2", 2, log=lambda m: None)
        with atomic_folder(tmp_path / "plain") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(umask)
    for folder in (tmp_path / "mp2", tmp_path / "plain"):
        assert folder.stat().st_mode & 0o777 == 0o755, oct(folder.stat().st_mode)
    assert not (tmp_path / "mp2" / ".partial-owner").exists()
    assert ".partial-owner" not in (tmp_path / "mp2" / "checklist.chk").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, words",
    [
        ("example_text_completion.py", ["--ckpt_dir", "demo model", "--temperature", "default 0.6", "--dtype"]),
        ("example_chat_completion.py", ["--ckpt_dir", "demo model", "--max_gen_len", "--top_p"]),
        ("-m llama.chat", ["--ckpt_dir", "demo model", "--system", "default 2048"]),
        ("-m llama.memory", ["path", "--max_seq_len", "int4", "--world_size"]),
        ("-m llama.convert hf-to-meta", ["--shards", "--dtype", "bf16"]),
        ("-m llama.convert meta-to-hf", ["--max_shard_size", "default 5", "--no_verify"]),
        ("-m llama.reshard", ["--mp", "--dtype", "--no_verify"]),
        ("-m llama.quantize", ["src", "dst", "--int8", "per output row", "--no_verify", "checklist.chk"]),
        ("-m llama.gguf", ["out_dir", "--dtype", "default fp32"]),
        ("-m llama.gguf export", ["src", "out", "--type", "q8_0", "--no_verify"]),
    ],
)
def test_help_describes_every_flag(argv, words):
    result = run(argv.split() + ["--help"])
    assert result.returncode == 0, result.stderr
    assert "Optional[" not in result.stdout and "Type:" not in result.stdout
    text = " ".join(result.stdout.split())  # argparse wraps the help to the widest flag
    for word in words:
        assert word in text, f"{word!r} missing from:\n{result.stdout}"


def test_corrupt_weights_found_while_generating_are_one_line(capsys):
    """NaN/inf logits (a corrupt checkpoint, fp16 overflow) end a command with its message, no
    traceback; other RuntimeErrors stay bugs and keep theirs."""
    from llama.cli import user_errors
    from llama.diagnose import NonFiniteLogitsError

    with pytest.raises(SystemExit) as exit_:
        with user_errors("prog"):
            raise NonFiniteLogitsError("the model produced non-finite logits (NaN/inf) for position 3")
    assert exit_.value.code == 1
    assert capsys.readouterr().err.startswith("prog: error: the model produced non-finite logits")
    with pytest.raises(RuntimeError, match="a bug"), user_errors("prog"):
        raise RuntimeError("a bug")


@pytest.mark.slow  # a child process: seconds
def test_chat_refuses_torchrun_before_loading(ckpt):
    """llama.chat reads stdin in one process: under torchrun its ranks would hang on each other."""
    result = run(["-m", "llama.chat", "--ckpt_dir", str(ckpt)], WORLD_SIZE="2", RANK="0")
    user_error(result, 1, "not under torchrun (2 ranks)", "example_chat_completion.py")
    assert "Memory plan" not in result.stderr


@pytest.mark.slow  # a child process: seconds
@pytest.mark.parametrize("script, what", [("example_chat_completion.py", "dialog 1 has"), ("example_text_completion.py", "prompt 2 has")])
def test_examples_check_every_prompt_before_the_first_answer(ckpt, script, what):
    """One error naming the prompt that does not fit (not "prompt 0"), and no half-printed answer
    before it: the second dialog and the third text prompt are the first over these lengths."""
    seq = {"example_chat_completion.py": "40", "example_text_completion.py": "14"}[script]
    result = run([script, "--ckpt_dir", str(ckpt), "--device", "cpu", "--max_seq_len", seq, "--max_gen_len", "2"])
    user_error(result, 1, what, f"--max_seq_len {seq}", "use --max_seq_len")
    assert result.stdout == ""


@pytest.mark.slow  # a child process: seconds
def test_torchrun_ranks_report_their_own_errors_once(tmp_path):
    """Under torchrun (WORLD_SIZE > 1) an error every rank hits is printed once, and one that only
    rank 1 hits (its own shard) is printed by rank 1, named so; before, only rank 0 spoke."""
    code = "import sys; from llama.cli import user_errors\nwith user_errors('prog'):\n    raise ValueError(sys.argv[1])"
    tag = f"{tmp_path.name}-{time.time()}"  # a message no earlier run of this test made

    def ranks(*messages: str) -> list[str]:
        procs = [
            subprocess.Popen([PY, "-c", code, m], cwd=REPO, stderr=subprocess.PIPE, text=True,
                             env=child_env(WORLD_SIZE=str(len(messages)), RANK=str(rank)))
            for rank, m in enumerate(messages)
        ]  # fmt: skip
        errs = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [1] * len(messages)
        return [line for err in errs for line in err.splitlines() if ": error: " in line]

    assert ranks(f"shared {tag}", f"shared {tag}") == [f"prog: error: shared {tag}"]
    lines = ranks(f"fine {tag}", f"consolidated.01.pth is truncated {tag}")
    assert sorted(lines) == sorted([f"prog: error: fine {tag}", f"prog: error: rank 1: consolidated.01.pth is truncated {tag}"])


@pytest.mark.slow  # a child process: seconds
def test_a_hugging_face_folder_is_named_as_one(hf):
    """--ckpt_dir given a transformers folder: said so, with the two ways out, not "tokenizer.model not found"."""
    result = run(["example_text_completion.py", "--ckpt_dir", str(hf), "--device", "cpu"])
    user_error(result, 1, "is a Hugging Face folder", "original/", "llama.convert hf-to-meta")


@pytest.mark.slow  # a child process: seconds
def test_chat_names_a_system_prompt_that_fills_the_context(ckpt):
    """Before: every message was refused as "message too long"; the system prompt was the cause."""
    proc = subprocess.run(
        [PY, "-m", "llama.chat", "--ckpt_dir", str(ckpt), "--device", "cpu", "--max_seq_len", "64", "--system", "word " * 100],
        cwd=REPO, input="hello\n/exit\n", capture_output=True, text=True, timeout=300, env=child_env(OMP_NUM_THREADS="1"),
    )  # fmt: skip
    user_error(proc, 1, "the system prompt takes", "--max_seq_len 64", "a shorter --system")
