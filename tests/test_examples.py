"""The example scripts and the interactive chat, run as users run them: in subprocesses.

They run on a bigram checkpoint (tests/bigram_model.py) whose assistant always answers "Hello
there", and which continues each of the text example's prompts with " Hello there", so their
output can be checked word for word.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigram_model import make_bigram
from child_env import child_env, free_port
from llama.chat_format import ChatFormat
from llama.checkpoint import random_state_dict, write_checkpoint
from llama.model import ModelArgs
from llama.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test starts Python processes (~10 s each on 2 cores)
ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
COMMON = ["--max_seq_len", "128", "--max_gen_len", "8", "--device", "cpu", "--dtype", "fp32"]
TEXT_PROMPTS = [
    "The three things every good recipe for bread needs are",
    "Simply put, the theory of evolution says that",
    "Capital cities:\nFrance => Paris",
    "good morning => guten Morgen\nthank you =>",
]
TEXT_ENDINGS = [" are", " that", " =>"]  # the last words of the example's four prompts
CHAT_LINES = [
    "User: What is the capital of France?",
    "Assistant: Start with a simple white loaf: flour, water, salt and yeast.",
    "User: How long should the dough rise?",
    "System: You are a pirate. Always answer like one.",
]


@pytest.fixture(scope="module")
def hello_ckpt(tmp_path_factory, meta_tokenizer_path) -> Path:
    """Every assistant turn is "Hello there" then <|eot_id|>: the prompt ends with the header's "\\n\\n".
    A text prompt ending in TEXT_ENDINGS continues with " Hello there" then <|eot_id|>."""
    tokenizer = Tokenizer(meta_tokenizer_path)
    hello, there = tokenizer.encode("Hello there", bos=False, eos=False)
    space_hello, space_there = tokenizer.encode(" Hello there", bos=False, eos=False)
    header_end = ChatFormat(tokenizer).encode_dialog_prompt([{"role": "user", "content": "x"}])[-1]
    successors = {header_end: hello, hello: there, there: tokenizer.eot_id, space_hello: space_there}
    for ending in TEXT_ENDINGS:
        (token,) = tokenizer.encode(ending, bos=False, eos=False)
        successors[token] = space_hello
    successors[space_there] = tokenizer.eot_id
    state = random_state_dict(ARGS, seed=0, dtype=torch.float32)
    make_bigram(state, ARGS, successors)
    path = tmp_path_factory.mktemp("examples") / "hello"
    write_checkpoint(path, {k: v.to(torch.bfloat16) for k, v in state.items()}, ARGS)
    (path / "tokenizer.model").write_bytes(Path(meta_tokenizer_path).read_bytes())
    return path


def launch(launcher: str) -> list[str]:
    if launcher == "python":
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port())]


def run(cmd: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    # One OpenMP thread: the model is tiny, and threads on busy cores only slow it down.
    env = child_env(OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        cmd, cwd=ROOT, input=stdin, capture_output=True, text=True, encoding="utf-8", errors="replace",
        env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, (
        f"{cmd} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


@pytest.mark.slow  # a child process loading a model: 10-20 s
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_text_completion_example(launcher, hello_ckpt, meta_tokenizer_path):
    script = ["example_text_completion.py", "--ckpt_dir", str(hello_ckpt), "--tokenizer_path", str(meta_tokenizer_path)]
    out = run(launch(launcher) + script + COMMON).stdout
    for prompt in TEXT_PROMPTS:
        assert prompt in out
    # What the model wrote, not only what the script printed: each prompt's continuation.
    assert out.count(" Hello there\n\n==================================") == 4


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_chat_completion_example(launcher, hello_ckpt, meta_tokenizer_path):
    script = ["example_chat_completion.py", "--ckpt_dir", str(hello_ckpt), "--tokenizer_path", str(meta_tokenizer_path)]
    out = run(launch(launcher) + script + COMMON).stdout
    for line in CHAT_LINES:
        assert line in out
    assert out.count("> Assistant: Hello there\n") == 4
    assert out.count("==================================") == 4


@pytest.mark.slow
def test_interactive_chat_through_stdin(hello_ckpt):
    cmd = [sys.executable, "-m", "llama.chat", "--ckpt_dir", str(hello_ckpt), "--max_gen_len", "5"]
    cmd += ["--max_seq_len", "128", "--device", "cpu", "--dtype", "fp32"]
    result = run(cmd, stdin="hello\n/reset\nhi again\n/exit\n")
    assert result.stdout == "Hello there\n\nHello there\n\n"  # stdin is not a terminal: no prompts
    assert "(dialog reset)" in result.stderr
