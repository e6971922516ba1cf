"""Tool calling: system-prompt layouts, tool-call text, and the assistant-message decoder on
every call form, malformed input and each stop token."""

import random
import uuid
from datetime import date
from pathlib import Path

import pytest

from llama.chat_format import ChatFormat
from llama.tokenizer import Tokenizer
from llama.tool_calls import (
    builtin_tools_system_prompt,
    custom_tools_prompt,
    decode_assistant_message,
    format_tool_call,
    make_tool_call,
    parse_tool_call,
)


@pytest.fixture(scope="module")
def tok(meta_tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(meta_tokenizer_path)


def decode(tok: Tokenizer, generated: str):
    """Decode generated text in which special-token text stands for the special ids."""
    tokens = tok.encode(generated, bos=False, eos=False, allowed_special="all")
    return decode_assistant_message(tok, tokens)


# --- prompts --------------------------------------------------------------------------------


def test_builtin_tools_system_prompt_layouts() -> None:
    day = date(2024, 7, 26)
    full = builtin_tools_system_prompt(
        ["brave_search", "wolfram_alpha"], code_interpreter=True, today=day,
        instructions="You are a helpful assistant.",
    )  # fmt: skip
    assert full == (
        "Environment: ipython\nTools: brave_search, wolfram_alpha\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 July 2024\n\n"
        "You are a helpful assistant."
    )
    assert builtin_tools_system_prompt(code_interpreter=True, today=day) == (
        "Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: 26 July 2024"
    )
    assert builtin_tools_system_prompt(today=date(2024, 3, 5), knowledge_date="01 March 2023") == (
        "Cutting Knowledge Date: 01 March 2023\nToday Date: 05 March 2024"
    )
    # any built-in tool needs the ipython environment to be callable at all
    assert builtin_tools_system_prompt(["wolfram_alpha"], today=day).startswith(
        "Environment: ipython\nTools: wolfram_alpha\n\n"
    )
    with pytest.raises(ValueError, match=r"unknown built-in tool\(s\) \['google'\]; valid:"):
        builtin_tools_system_prompt(["google"], today=day)


def test_custom_tools_prompt_layout() -> None:
    fn = {"type": "function", "function": {"name": "f", "parameters": {}}}
    assert custom_tools_prompt([fn]) == (
        "Given the following functions, please respond with a JSON for a function call with its "
        "proper arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name '
        "and its value}. Do not use variables.\n\n"
        '{\n    "type": "function",\n    "function": {\n        "name": "f",\n'
        '        "parameters": {}\n    }\n}'
    )
    with pytest.raises(ValueError, match="function definition without a name"):
        custom_tools_prompt([{"description": "nameless"}])


def test_format_tool_call() -> None:
    search = make_tool_call("wolfram_alpha", {"query": 'say "hi"', "units": "metric", "n": 2})
    expected = 'wolfram_alpha.call(query="say \\"hi\\"", units="metric", n=2)'
    assert format_tool_call(search) == expected
    assert format_tool_call(make_tool_call("code_interpreter", {"code": "print(1)"})) == "print(1)"
    custom = make_tool_call("get_weather", {"city": "Zürich"})
    assert format_tool_call(custom) == '{"name": "get_weather", "parameters": {"city": "Zürich"}}'
    with pytest.raises(ValueError, match="code_interpreter call needs arguments"):
        format_tool_call(make_tool_call("code_interpreter", {"source": "x"}))


# --- decoder: every tool-call form ------------------------------------------------------------


def test_builtin_call_after_python_tag(tok: Tokenizer) -> None:
    m = decode(tok, '<|python_tag|>brave_search.call(query="weather in Menlo Park")<|eom_id|>')
    assert m["role"] == "assistant" and m["content"] == "" and m["stop_reason"] == "end_of_message"
    [call] = m["tool_calls"]
    assert call["tool_name"] == "brave_search"
    assert call["arguments"] == {"query": "weather in Menlo Park"}
    assert uuid.UUID(call["call_id"])  # a real uuid string


def test_builtin_call_variants(tok: Tokenizer) -> None:
    bare = decode(tok, 'wolfram_alpha.call(query="2+2", precision=3)<|eot_id|>')
    assert bare["tool_calls"][0]["arguments"] == {"query": "2+2", "precision": 3}
    assert bare["stop_reason"] == "end_of_turn"
    lead = decode(tok, 'Let me look.<|python_tag|>brave_search.call(query="x")<|eom_id|>')
    assert lead["content"] == "Let me look."
    assert lead["tool_calls"][0]["tool_name"] == "brave_search"
    # an unknown name is a tool call only after <|python_tag|>
    tagged = decode(tok, "<|python_tag|>my_tool.call(a=1)<|eom_id|>")
    assert tagged["tool_calls"][0]["tool_name"] == "my_tool"
    untagged = decode(tok, "Use obj.call(a=1) here<|eot_id|>")
    assert untagged["tool_calls"] == [] and untagged["content"] == "Use obj.call(a=1) here"
    ids = {decode(tok, 'brave_search.call(query="x")')["tool_calls"][0]["call_id"] for _ in "abc"}
    assert len(ids) == 3


def test_code_interpreter(tok: Tokenizer) -> None:
    m = decode(tok, "<|python_tag|>import math\nprint(math.pi)\n<|eom_id|>")
    assert m["tool_calls"][0]["tool_name"] == "code_interpreter"
    assert m["tool_calls"][0]["arguments"] == {"code": "import math\nprint(math.pi)"}
    assert m["content"] == "" and m["stop_reason"] == "end_of_message"


@pytest.mark.parametrize(
    "generated",
    [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        '{"name": "get_weather", "arguments": {"city": "Paris"}}<|eot_id|>',
        ' <function=get_weather>{"city": "Paris"}</function><|eot_id|>',
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>',
    ],
)
def test_custom_calls(tok: Tokenizer, generated: str) -> None:
    m = decode(tok, generated)
    [call] = m["tool_calls"]
    assert (call["tool_name"], call["arguments"]) == ("get_weather", {"city": "Paris"})
    assert m["content"] == ""


@pytest.mark.parametrize(
    "generated",
    [
        '<|python_tag|>brave_search.call(query="unterminated<|eom_id|>',
        "<|python_tag|>brave_search.call(query=os.system('ls'))<|eom_id|>",
        '<|python_tag|>brave_search.call("positional")<|eom_id|>',
        '<|python_tag|>{"name": "f", "parameters": <|eom_id|>',
        '{"name": "f", "parameters": {"a": 1}',
        '{"name": 3, "parameters": {}}',
        '{"name": "f", "parameters": "a=1"}',
        '{"name": "f", "parameters": {}, "extra": 1}',
        '<function=f>{not json}</function>',
        '<function=f>["list"]</function>',
        '<function=f>{"a": 1}',
        "[" * 100_000,
    ],
)
def test_malformed_falls_back_to_content(tok: Tokenizer, generated: str) -> None:
    m = decode(tok, generated)
    assert m["tool_calls"] == []
    visible = generated.replace("<|python_tag|>", "").replace("<|eom_id|>", "")
    assert m["content"] == visible


def test_never_raises_on_garbage(tok: Tokenizer) -> None:
    rng = random.Random(0)
    pieces = ['{"name": ', '"f"', '"parameters"', ": {", "}", "<function=", ">", "</function>",
              "brave_search.call(", "query=", '"x"', ")", ",", "<|python_tag|>", "\\", "\n", "'"]
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        m = decode(tok, text)
        assert isinstance(m["content"], str) and len(m["tool_calls"]) <= 1
        assert parse_tool_call(text) is None or isinstance(parse_tool_call(text), dict)


# --- decoder: stop tokens ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix, reason",
    [
        ("<|eot_id|>", "end_of_turn"),
        ("<|eom_id|>", "end_of_message"),
        ("<|end_of_text|>", "end_of_turn"),
        ("", "out_of_tokens"),
        ("<|eot_id|>ignored after the stop", "end_of_turn"),
    ],
)
def test_stop_reasons(tok: Tokenizer, suffix: str, reason: str) -> None:
    m = decode(tok, "Paris is the capital." + suffix)
    assert m == {"role": "assistant", "content": "Paris is the capital.", "tool_calls": [],
                 "stop_reason": reason}  # fmt: skip
    assert decode_assistant_message(tok, [])["stop_reason"] == "out_of_tokens"


# --- encode -> decode round trip ------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        make_tool_call("brave_search", {"query": 'a "quoted"\nmulti-line ünïcödé \\ query'}),
        make_tool_call("wolfram_alpha", {"query": "x", "n": 3, "exact": True, "tags": ["a"]}),
        make_tool_call("code_interpreter", {"code": "for i in range(3):\n    print(i)"}),
        make_tool_call("get_weather", {"city": "São Paulo", "days": [1, 2]}),
    ],
)
def test_encode_then_decode(tok: Tokenizer, call) -> None:
    fmt = ChatFormat(tok)
    message = {"role": "assistant", "content": "", "tool_calls": [call]}
    tokens = fmt.encode_message(message)
    generated = tokens[len(fmt.encode_header(message)) :]
    decoded = fmt.decode_assistant_message(generated)
    [back] = decoded["tool_calls"]
    assert (back["tool_name"], back["arguments"]) == (call["tool_name"], call["arguments"])
    builtin = call["tool_name"] in ("brave_search", "wolfram_alpha", "code_interpreter")
    assert decoded["stop_reason"] == ("end_of_message" if builtin else "end_of_turn")
