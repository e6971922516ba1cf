"""The demo model's generation settings (llama/demo.py) and the README's headline command with them.

The headline test runs ``python example_chat_completion.py`` as a new user does (no flags, the
demo model converted into a fresh cache) and checks that the first answer names Paris and that no
answer loops: no token, and no short run of tokens, repeated more than MAX_REPEATS times in a row.
"""

import importlib.util
import subprocess
import sys

import pytest

from child_env import REPO, child_env
from llama import demo

MAX_REPEATS = 4  # "fashion, fashion, fashion, ..." (the answer) repeats a 2-token unit 205 times
META = {"temperature": 0.6, "top_p": 0.9, "max_gen_len": None}


def test_flags_win_then_demo_settings_then_the_scripts_defaults(capsys):
    flags = {"temperature": None, "top_p": None, "max_gen_len": None}
    assert demo.generation_settings(False, META, **flags) == META
    assert capsys.readouterr().err == ""  # real checkpoints: nothing to announce
    assert demo.generation_settings(True, META, **flags) == demo.DEMO_SETTINGS
    err = capsys.readouterr().err
    assert "Demo model settings: temperature=0.0, top_p=1.0, max_gen_len=128 (greedy)" in err
    mixed = demo.generation_settings(True, META, **{**flags, "temperature": 0.7})
    assert mixed == {**demo.DEMO_SETTINGS, "temperature": 0.7}
    assert "(greedy)" not in capsys.readouterr().err
    assert demo.generation_settings(False, META, **{**flags, "max_gen_len": 5}) == {**META, "max_gen_len": 5}


def longest_repeat(tokens: list[int], max_period: int = 4) -> int:
    """Most consecutive repetitions of any unit of 1..max_period tokens (1: nothing repeats)."""
    best = 1
    for period in range(1, max_period + 1):
        run = 1
        for i in range(period, len(tokens) - period + 1, period):
            run = run + 1 if tokens[i : i + period] == tokens[i - period : i] else 1
            best = max(best, run)
    return best


def test_longest_repeat():
    assert longest_repeat([1, 2, 3, 4]) == 1
    assert longest_repeat([7, 7, 7, 1]) == 3
    assert longest_repeat([5] + [8, 9] * 6 + [1]) >= 5


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(demo.PACKAGE) is None, reason=f"needs {demo.INSTALL_HINT}")
def test_headline_command_answers_paris_without_loops(tmp_path):
    from llama.tokenizer import Tokenizer

    env = child_env(XDG_CACHE_HOME=str(tmp_path), PYTHONIOENCODING="utf-8")
    result = subprocess.run(
        [sys.executable, "example_chat_completion.py"], cwd=REPO, env=env, capture_output=True, text=True,
        encoding="utf-8", timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Demo model settings: temperature=0.0" in result.stderr
    answers = [block.split("> Assistant: ", 1)[1].strip() for block in result.stdout.split("=" * 34) if "> Assistant: " in block]
    assert len(answers) == 4, result.stdout
    assert "Paris" in answers[0], answers[0]
    tokenizer = Tokenizer(tmp_path / "llama" / demo.MODEL_NAME / "tokenizer.model")
    for answer in answers:
        assert longest_repeat(tokenizer.encode(answer, bos=False, eos=False)) <= MAX_REPEATS, answer
