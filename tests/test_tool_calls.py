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
    format_custom_tool_calls,
    make_tool_call,
    parse_tool_call,
    parse_tool_calls,
    split_tool_calls,
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
        '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        '<function=get_weather>{"city": "Paris"}<|eot_id|>',
        "<function=get_weather>{'city': 'Paris'}</function><|eot_id|>",
        '[get_weather(city="Paris")]<|eot_id|>',
        '<|python_tag|>[get_weather(city="Paris")]<|eom_id|>',
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
        '<function=f>{"a": 1} trailing prose',
        '{"type": "tool", "name": "f", "parameters": {}}',
        '{"name": "f", "parameters": {}, "arguments": {}}',
        '[get_boiling_point("water", True)]',
        '<|python_tag|>[f(a=g())]<|eom_id|>',
        '<|python_tag|>[f(a=1)<|eom_id|>',
        "<|python_tag|>Let me think about this.<|eom_id|>",
        "[" * 100_000,
        "<|python_tag|>" + "[" * 100_000,
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
        assert isinstance(m["content"], str) and isinstance(m["tool_calls"], list)
        for tagged in (False, True):
            calls = parse_tool_calls(text, after_python_tag=tagged)
            assert all(isinstance(c["arguments"], dict) for c in calls)


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


# --- several calls, prose before a call, the python-list format ---------------------------------


def test_python_list_several_calls(tok: Tokenizer) -> None:
    text = '[get_weather(city="SF", metric="celsius"), get_time(tz="PST")]'
    for generated in (text + "<|eot_id|>", "<|python_tag|>" + text + "<|eom_id|>"):
        m = decode(tok, generated)
        assert [(c["tool_name"], c["arguments"]) for c in m["tool_calls"]] == [
            ("get_weather", {"city": "SF", "metric": "celsius"}), ("get_time", {"tz": "PST"}),
        ]  # fmt: skip
        assert m["content"] == "" and len({c["call_id"] for c in m["tool_calls"]}) == 2
    # after <|python_tag|> it is never code for the interpreter
    assert all(c["tool_name"] != "code_interpreter" for c in parse_tool_calls(text, after_python_tag=True))


def test_several_function_tags_and_prose_before(tok: Tokenizer) -> None:
    m = decode(tok, 'Checking both. <function=a>{"x": 1}</function>\n<function=b>{"y": [2]}<|eot_id|>')
    assert m["content"] == "Checking both."
    assert [(c["tool_name"], c["arguments"]) for c in m["tool_calls"]] == [("a", {"x": 1}), ("b", {"y": [2]})]
    m = decode(tok, 'I will look it up. brave_search.call(query="Menlo Park")<|eom_id|>')
    assert m["content"] == "I will look it up." and m["tool_calls"][0]["arguments"] == {"query": "Menlo Park"}
    # JSON and lists after prose are quotations as often as calls: they stay text
    for prose in ('Example: {"name": "f", "parameters": {}}', 'Try [f(a=1)]'):
        assert split_tool_calls(prose) == (prose, [])


def test_parse_tool_call_single() -> None:
    assert parse_tool_call("[f(a=1), g(b=2)]") is None  # several: use parse_tool_calls
    assert parse_tool_call("[f(a=1)]")["arguments"] == {"a": 1}


def test_format_custom_tool_calls() -> None:
    calls = [make_tool_call("f", {"a": 1, "s": 'q"uote'}), make_tool_call("g", {"l": [1, "x"], "d": {"k": None}})]
    listed = format_custom_tool_calls(calls)
    assert listed == '[f(a=1, s="q\\"uote"), g(l=[1, \'x\'], d={\'k\': None})]'
    assert format_custom_tool_calls(calls[:1]) == '{"name": "f", "parameters": {"a": 1, "s": "q\\"uote"}}'
    assert format_custom_tool_calls(calls[:1], "python_list") == '[f(a=1, s="q\\"uote")]'
    assert format_custom_tool_calls(calls, "function_tag") == (
        '<function=f>{"a": 1, "s": "q\\"uote"}</function><function=g>{"l": [1, "x"], "d": {"k": null}}</function>'
    )
    for fmt in ("json", "python_list", "function_tag"):
        back = parse_tool_calls(format_custom_tool_calls(calls, fmt))
        assert [(c["tool_name"], c["arguments"]) for c in back] == [(c["tool_name"], c["arguments"]) for c in calls]
    with pytest.raises(ValueError, match="unknown tool_prompt_format 'xml'"):
        format_custom_tool_calls(calls, "xml")
    with pytest.raises(ValueError, match="is not a Python identifier"):
        format_custom_tool_calls([make_tool_call("my-tool", {}), calls[0]])
