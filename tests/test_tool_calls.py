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
    assert m["tool_calls"][0]["arguments"] == {"code": "import math\nprint(math.pi)\n"}  # as generated
    assert m["content"] == "" and m["stop_reason"] == "end_of_message"


# After <|python_tag|>, text that is no recognised call is code for the interpreter, exactly as
# generated, whether or not this Python parses it: the interpreter answers, the dialog goes on.
CODE_AFTER_TAG = [
    "\n    x = 1\n    print(x)\n",                           # uniformly indented
    "!pip install numpy",                                     # notebook commands
    "%timeit sum(range(10))",
    "```python\nprint(1)\n```",                               # markdown fence
    'print "hello"',                                          # Python 2
    'subprocess.call(["ls"])\nprint("done")',                # a .call( that is code
    "{1, 2}.union({3})",
    "Let me think about this.",                               # prose: the interpreter says so
    '{"a": 1}',                                               # JSON that is no call
    '{"name": "f", "parameters": ',                           # broken call forms
    "[f(a=g())]",
    "[f(a=1)",
    'brave_search.call(query="unterminated',
    "brave_search.call(query=os.system('ls'))",
    'brave_search.call("positional")',
    'brave_search.call(query=r"raw")',
    'brave_search.call(query="a")\nprint(1)',
    "<function=f>{not json}</function>",
    "obj.call(a=1).then(2)",
    "[" * 100_000,
    "  print(1)  ",
]


@pytest.mark.parametrize("code", CODE_AFTER_TAG, ids=range(len(CODE_AFTER_TAG)))
def test_text_after_python_tag_is_code(tok: Tokenizer, code: str) -> None:
    for stop in ("<|eom_id|>", "<|eot_id|>", ""):
        m = decode(tok, "Running it.<|python_tag|>" + code + stop)
        assert [(c["tool_name"], c["arguments"]) for c in m["tool_calls"]] == [("code_interpreter", {"code": code})]
        assert m["content"] == "Running it."
    assert parse_tool_calls(code, after_python_tag=True)[0]["arguments"] == {"code": code}
    # without the tag it is never code
    assert all(c["tool_name"] != "code_interpreter" for c in parse_tool_calls(code))


@pytest.mark.parametrize("blank", ["", "  ", "\n\n"])
def test_nothing_after_python_tag_is_no_call(tok: Tokenizer, blank: str) -> None:
    m = decode(tok, f"<|python_tag|>{blank}<|eom_id|>")
    assert m["tool_calls"] == [] and m["content"] == blank and m["stop_reason"] == "end_of_message"


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
        '{"name": "get_weather", "description": "Weather now", "parameters": {"city": "Paris"}}<|eot_id|>',
        '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}, "id": "x1"}<|eot_id|>',
        '{"name": "get_weather", "parameters": {"city": "Paris"}, "arguments": {"town": "Oslo"}}<|eot_id|>',
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
        'brave_search.call(query="unterminated<|eom_id|>',
        "brave_search.call(query=os.system('ls'))<|eom_id|>",
        'brave_search.call("positional")<|eom_id|>',
        '{"name": "f", "parameters": <|eom_id|>',
        '{"name": "f", "parameters": {"a": 1}',
        '{"name": 3, "parameters": {}}',
        '{"name": "f", "parameters": "a=1"}',
        '{"name": "f"}',
        '<function=f>{not json}</function>',
        '<function=f>["list"]</function>',
        '<function=f>{"a": 1} trailing prose',
        '{"type": "tool", "name": "f", "parameters": {}}',
        '[get_boiling_point("water", True)]',
        '[f(a=g())]<|eom_id|>',
        '[f(a=1)<|eom_id|>',
        'brave_search.call(query="a")\nprint(1)',
        "[" * 100_000,
    ],
)
def test_malformed_falls_back_to_content(tok: Tokenizer, generated: str) -> None:
    """Without <|python_tag|>, text that is no well-formed call stays the message's content."""
    m = decode(tok, generated)
    assert m["tool_calls"] == []
    assert m["content"] == generated.replace("<|eom_id|>", "")


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
    assert listed == '[f(a=1, s="q\\"uote"), g(l=[1, "x"], d={"k": None})]'
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


# --- built-in call arguments are raw text, as in Meta's format ------------------------------------

# (call text as generated, the arguments the tool receives). Backslashes are characters: LaTeX
# for Wolfram Alpha and Windows paths reach the tool as written; only \" stands for a quote.
RAW_QUERIES = [
    (r'brave_search.call(query="C:\new")', {"query": "C:\\new"}),
    (r'wolfram_alpha.call(query="solve \alpha x = 2")', {"query": "solve \\alpha x = 2"}),
    (r'wolfram_alpha.call(query="\int x^2 dx")', {"query": "\\int x^2 dx"}),
    (r'wolfram_alpha.call(query="\xi + \underline{u} + \N")', {"query": "\\xi + \\underline{u} + \\N"}),
    (r'wolfram_alpha.call(query="\frac{1}{2} \\ \t")', {"query": "\\frac{1}{2} \\\\ \\t"}),
    (r'brave_search.call(query="say \"hi\" now")', {"query": 'say "hi" now'}),
    (r'brave_search.call(query="C:\")', {"query": "C:\\"}),
    (r'brave_search.call(query="a\\")', {"query": "a\\\\"}),
    ("brave_search.call(query='it\\'s \\d')", {"query": "it's \\d"}),
    ('brave_search.call(query="line one\nline two")', {"query": "line one\nline two"}),
    (r'wolfram_alpha.call(query="\sqrt{2}", precision=3, tags=["\a", "b"])',
     {"query": "\\sqrt{2}", "precision": 3, "tags": ["\\a", "b"]}),
]  # fmt: skip


@pytest.mark.parametrize("text, arguments", RAW_QUERIES, ids=range(len(RAW_QUERIES)))
def test_builtin_arguments_are_raw_text(tok: Tokenizer, text: str, arguments: dict) -> None:
    for generated in (f"<|python_tag|>{text}<|eom_id|>", f"{text}<|eom_id|>", f"Looking.\n{text}<|eom_id|>"):
        [call] = decode(tok, generated)["tool_calls"]
        assert call["arguments"] == arguments
    # re-encoded: the text as generated (single quotes become double ones), read back the same
    again = format_tool_call(call)
    assert parse_tool_calls(again, after_python_tag=True)[0]["arguments"] == arguments
    assert again == text or "'" in text


def test_builtin_call_text_is_raw() -> None:
    def text(query: str) -> str:
        return format_tool_call(make_tool_call("wolfram_alpha", {"query": query}))

    assert text("\\int x^2 dx") == r'wolfram_alpha.call(query="\int x^2 dx")'
    assert text("solve \\alpha x = 2") == r'wolfram_alpha.call(query="solve \alpha x = 2")'
    assert text('a "b" \\" c') == r'wolfram_alpha.call(query="a \"b\" \\" c")'
    assert text("two\nlines") == 'wolfram_alpha.call(query="two\nlines")'
    for query in ["\\int", "C:\\new\\", '"', '\\"', "\\\\", "\\", "x\\'y", "", "é\t\\u00e9"]:
        [call] = parse_tool_calls(text(query), after_python_tag=True)
        assert call["arguments"] == {"query": query}, text(query)


def test_several_builtin_calls(tok: Tokenizer) -> None:
    for sep in ("\n", "; ", ";\n", "\n\n"):
        text = f'brave_search.call(query="a"){sep}wolfram_alpha.call(query="\\int b")'
        for generated in (f"<|python_tag|>{text}<|eom_id|>", f"{text}<|eom_id|>"):
            m = decode(tok, generated)
            assert [(c["tool_name"], c["arguments"]) for c in m["tool_calls"]] == [
                ("brave_search", {"query": "a"}), ("wolfram_alpha", {"query": "\\int b"}),
            ]  # fmt: skip
    # comments are no strings, strings are no comments
    commented = 'brave_search.call(query="a # b")  # it\'s "quoted"\nwolfram_alpha.call(query="c")'
    assert [c["arguments"] for c in parse_tool_calls(commented)] == [{"query": "a # b"}, {"query": "c"}]
    # other names only after the tag, and every statement must be a call
    assert parse_tool_calls('my.call(a=1)\nbrave_search.call(query="x")') == []
    assert [c["tool_name"] for c in parse_tool_calls('my.call(a=1)\nbrave_search.call(query="x")', after_python_tag=True)] == [
        "my", "brave_search"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "generated, expected",
    [
        ('{"name": "brave_search", "parameters": {"q": "x"}}', ("brave_search", {"query": "x"})),
        ('<function=wolfram_alpha>{"input": "2+2"}</function>', ("wolfram_alpha", {"query": "2+2"})),
        ('[photogen(prompt="a cat")]', ("photogen", {"query": "a cat"})),
        ('{"name": "code_interpreter", "parameters": {"source": "print(1)"}}', ("code_interpreter", {"code": "print(1)"})),
        ('{"name": "code_interpreter", "parameters": {"code": "print(1)"}}', ("code_interpreter", {"code": "print(1)"})),
        ('brave_search.call(q="x")', ("brave_search", {"query": "x"})),
        # several arguments, or a value that is no string: as written
        ('{"name": "brave_search", "parameters": {"q": "x", "n": 2}}', ("brave_search", {"q": "x", "n": 2})),
        ('{"name": "brave_search", "parameters": {"n": 2}}', ("brave_search", {"n": 2})),
        ('{"name": "get_weather", "parameters": {"q": "x"}}', ("get_weather", {"q": "x"})),
    ],
)
def test_builtin_called_in_a_custom_form(generated: str, expected: tuple) -> None:
    [call] = parse_tool_calls(generated)
    assert (call["tool_name"], call["arguments"]) == expected


# --- decode -> encode gives back what was generated ------------------------------------------------

ROUND_TRIPS = [
    "<|python_tag|>print(1)<|eot_id|>",
    "<|python_tag|>print(1)<|eom_id|>",
    "<|python_tag|>\nimport math\nprint(math.pi)\n<|eom_id|>",
    "<|python_tag|>\n    x = 1\n    print(x)<|eom_id|>",
    "<|python_tag|>!pip install numpy<|eom_id|>",
    '<|python_tag|>wolfram_alpha.call(query="\\int x^2 dx")<|eom_id|>',
    '<|python_tag|>wolfram_alpha.call(query="solve \\alpha x = 2")<|eot_id|>',
    '<|python_tag|>brave_search.call(query="C:\\new \\"x\\"")<|eom_id|>',
    '<|python_tag|>brave_search.call(query="a")\nwolfram_alpha.call(query="b")<|eom_id|>',
    "Let me run it.<|python_tag|>print(2 ** 0.5)<|eom_id|>",
    '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>',
    "The capital is Paris.<|eot_id|>",
    "Searching.<|eom_id|>",
]


@pytest.mark.parametrize("generated", ROUND_TRIPS)
def test_decode_then_encode_gives_the_tokens_back(tok: Tokenizer, generated: str) -> None:
    fmt = ChatFormat(tok)
    tokens = tok.encode(generated, bos=False, eos=False, allowed_special="all")
    message = fmt.decode_assistant_message(tokens)
    assert fmt.encode_message(message)[len(fmt.encode_header(message)) :] == tokens


def test_end_token_follows_stop_reason(tok: Tokenizer) -> None:
    fmt = ChatFormat(tok)
    code = make_tool_call("code_interpreter", {"code": "print(1)"})
    search = make_tool_call("brave_search", {"query": "x"})
    custom = make_tool_call("f", {"a": 1})
    for calls, default in (([code], tok.eom_id), ([search], tok.eom_id), ([custom], tok.eot_id), ([], tok.eot_id)):
        message = {"role": "assistant", "content": "", "tool_calls": calls}
        assert fmt.encode_message(message)[-1] == default  # the documented ending
        assert fmt.encode_message({**message, "stop_reason": "out_of_tokens"})[-1] == default
        assert fmt.encode_message({**message, "stop_reason": "end_of_turn"})[-1] == tok.eot_id
        assert fmt.encode_message({**message, "stop_reason": "end_of_message"})[-1] == tok.eom_id


def test_several_builtin_calls_encoded_one_per_line(tok: Tokenizer) -> None:
    fmt = ChatFormat(tok)
    calls = [make_tool_call("brave_search", {"query": "a"}), make_tool_call("wolfram_alpha", {"query": "\\int b"})]
    message = {"role": "assistant", "content": "", "tool_calls": calls}
    tokens = fmt.encode_message(message)[len(fmt.encode_header(message)) :]
    assert tok.decode(tokens) == '<|python_tag|>brave_search.call(query="a")\nwolfram_alpha.call(query="\\int b")<|eom_id|>'
    code = make_tool_call("code_interpreter", {"code": "print(1)"})
    for mixed in ([calls[0], code], [code, code], [calls[0], make_tool_call("f", {})]):
        with pytest.raises(ValueError, match=r"must be the only call of its message, got 2 \(only brave_search"):
            fmt.encode_message({**message, "tool_calls": mixed})
