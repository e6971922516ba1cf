"""Drop-in for Meta's code, checked against Meta's own package (llama-models) at test time.

- Tool-call decoding: a corpus of assistant outputs in every documented format, decoded by us and
  by Meta's ``ChatFormat.decode_assistant_message``; every disagreement is listed in
  ``META_DECODER_WRONG`` with the reason (Meta's decoder contradicting Meta's documentation, or
  dropping or changing what the model wrote).
- Dialog encoding: a corpus of dialogs encoded by us and by Meta's ``ChatFormat``; equal wherever
  the documented prompt format agrees with Meta's encoder (differences named in ``ENCODER_DIFFERS``).
- Meta's ``tests/api/test_tool_utils.py`` expected values, through our API (our own data).
- Meta's names: ``from llama.tokenizer import ChatFormat, Tokenizer`` with Meta's published ids,
  ``llama.Dialog``, ``model.params``, ``llama.generation.sample_top_p``, and a research-style
  script (tests/scripts/meta_style_research.py) that runs unchanged.
- Logprobs stay float32 under ``torch.set_default_dtype(torch.bfloat16)``.
"""

import runpy
import sys
from pathlib import Path

import pytest
import torch

from llama.checkpoint import write_random_checkpoint
from llama.model import ModelArgs
from llama.tool_calls import decode_assistant_message, parse_tool_calls

SCRIPT = Path(__file__).parent / "scripts" / "meta_style_research.py"


@pytest.fixture(scope="module")
def meta():
    """Meta's llama-models 0.3.0 (ChatFormat, Tokenizer, datatypes), or skip with the reason."""
    try:
        from llama_models import datatypes
        from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
        from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    except ImportError as e:  # the wheel, or its pillow/pydantic dependencies, missing
        pytest.skip(f"Meta's llama-models package is not importable ({e}): pip install llama-models==0.3.0 pillow")
    return datatypes, MetaChatFormat(MetaTokenizer.get_instance())


@pytest.fixture(scope="module")
def fmt(tokenizer):
    from llama.tokenizer import ChatFormat

    return ChatFormat(tokenizer)


# --- decoding: the corpus of assistant outputs --------------------------------------------------
# (generated text, with special tokens written as their text) -> the calls we must find, as
# [(tool_name, arguments)]. Code-interpreter code is compared exactly: both keep it as generated.

CODE = "import math\nprint(math.sqrt(2))"
AGREE = {
    # Llama 3.1 built-ins, tagged and bare
    '<|python_tag|>brave_search.call(query="weather in Menlo Park")<|eom_id|>': [("brave_search", {"query": "weather in Menlo Park"})],
    'brave_search.call(query="current president")<|eom_id|>': [("brave_search", {"query": "current president"})],
    '<|python_tag|>wolfram_alpha.call(query="solve x^2 = 4")<|eom_id|>': [("wolfram_alpha", {"query": "solve x^2 = 4"})],
    '<|python_tag|>photogen.call(query="a cat on a mat")<|eom_id|>': [("photogen", {"query": "a cat on a mat"})],
    '<|python_tag|>brave_search.call(query="")<|eom_id|>': [("brave_search", {"query": ""})],
    '<|python_tag|>my_search.call(query="x")<|eom_id|>': [("my_search", {"query": "x"})],
    'I will look it up. brave_search.call(query="Menlo Park")<|eom_id|>': [("brave_search", {"query": "Menlo Park"})],
    # code interpreter
    f"<|python_tag|>{CODE}\n<|eom_id|>": [("code_interpreter", {"code": CODE + "\n"})],
    '<|python_tag|>print("hello")<|eom_id|>': [("code_interpreter", {"code": 'print("hello")'})],
    "<|python_tag|>x = [i * i for i in range(5)]\nprint(x)<|eom_id|>": [("code_interpreter", {"code": "x = [i * i for i in range(5)]\nprint(x)"})],
    "<|python_tag|>\nprint(1)\n<|eot_id|>": [("code_interpreter", {"code": "\nprint(1)\n"})],
    "  <|python_tag|>print(1)  <|eom_id|>": [("code_interpreter", {"code": "print(1)  "})],
    # after the tag, whatever is no call is code for the interpreter, even where this Python
    # cannot parse it (the interpreter's answer tells the model; dropping it stalls the dialog)
    "<|python_tag|>\n    x = 1\n    print(x)\n<|eom_id|>": [("code_interpreter", {"code": "\n    x = 1\n    print(x)\n"})],
    "<|python_tag|>!pip install numpy<|eom_id|>": [("code_interpreter", {"code": "!pip install numpy"})],
    "<|python_tag|>%timeit sum(range(100))<|eom_id|>": [("code_interpreter", {"code": "%timeit sum(range(100))"})],
    "<|python_tag|>```python\nprint(1)\n```<|eom_id|>": [("code_interpreter", {"code": "```python\nprint(1)\n```"})],
    '<|python_tag|>print "hello"<|eom_id|>': [("code_interpreter", {"code": 'print "hello"'})],
    '<|python_tag|>subprocess.call(["ls"])\nprint("done")<|eom_id|>': [("code_interpreter", {"code": 'subprocess.call(["ls"])\nprint("done")'})],
    "<|python_tag|>{1, 2}.union({3})<|eom_id|>": [("code_interpreter", {"code": "{1, 2}.union({3})"})],
    '<|python_tag|>{"a": 1}<|eom_id|>': [("code_interpreter", {"code": '{"a": 1}'})],
    "<|python_tag|>Let me think about it.<|eom_id|>": [("code_interpreter", {"code": "Let me think about it."})],
    # built-in queries are raw text: backslashes reach the tool as the model wrote them
    '<|python_tag|>brave_search.call(query="C:\\new")<|eom_id|>': [("brave_search", {"query": "C:\\new"})],
    '<|python_tag|>wolfram_alpha.call(query="solve \\alpha x = 2")<|eom_id|>': [("wolfram_alpha", {"query": "solve \\alpha x = 2"})],
    '<|python_tag|>wolfram_alpha.call(query="\\int x^2 dx")<|eom_id|>': [("wolfram_alpha", {"query": "\\int x^2 dx"})],
    '<|python_tag|>wolfram_alpha.call(query="\\xi^2 + \\nu")<|eom_id|>': [("wolfram_alpha", {"query": "\\xi^2 + \\nu"})],
    'wolfram_alpha.call(query="\\frac{1}{2} + \\sqrt{2}")<|eom_id|>': [("wolfram_alpha", {"query": "\\frac{1}{2} + \\sqrt{2}"})],
    '<|python_tag|>brave_search.call(query="C:\\")<|eom_id|>': [("brave_search", {"query": "C:\\"})],
    '<|python_tag|>brave_search.call(query="a\nb")<|eom_id|>': [("brave_search", {"query": "a\nb"})],
    # JSON, with and without "type": "function"
    '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>': [("get_weather", {"city": "Paris"})],
    '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris", "days": 3}}<|eot_id|>': [("get_weather", {"city": "Paris", "days": 3})],
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>': [("get_weather", {"city": "Paris"})],
    ' {"name": "get_time", "parameters": {}}<|eot_id|>': [("get_time", {})],
    '{"name": "brave_search", "parameters": {"query": "x"}}<|eot_id|>': [("brave_search", {"query": "x"})],
    '{"name": "get_weather", "description": "Weather now", "parameters": {"city": "Paris"}}<|eot_id|>': [("get_weather", {"city": "Paris"})],
    '{"type": "function", "name": "f", "description": "d", "parameters": {"a": 1}}<|eot_id|>': [("f", {"a": 1})],
    '{"name": "f", "parameters": {"a": 1}, "type": "function"}<|eot_id|>': [("f", {"a": 1})],
    '{"name": "f", "parameters": {"a": 1}, "arguments": {"b": 2}}<|eot_id|>': [("f", {"a": 1})],
    # a built-in called in a custom form, its one argument under another name: the built-in's own
    '{"name": "brave_search", "parameters": {"q": "x"}}<|eot_id|>': [("brave_search", {"query": "x"})],
    '<function=wolfram_alpha>{"input": "2+2"}</function><|eot_id|>': [("wolfram_alpha", {"query": "2+2"})],
    # <function=NAME>ARGS</function>, with or without the closing tag, JSON or Python-literal args
    '<function=getWeather>{"location": "New York", "date": "2023-08-05"}</function><|eot_id|>': [("getWeather", {"location": "New York", "date": "2023-08-05"})],
    '<function=getWeather>{"location":"New York","date":"2023-08-05"}<|eot_id|>': [("getWeather", {"location": "New York", "date": "2023-08-05"})],
    "<function=f>{'a': 'b'}</function><|eot_id|>": [("f", {"a": "b"})],
    '<function=f>{"q": "it is", "n": 2}</function><|eot_id|>': [("f", {"q": "it is", "n": 2})],
    'Let me check. <function=get_weather>{"city": "Oslo"}</function><|eot_id|>': [("get_weather", {"city": "Oslo"})],
    # Llama 3.2 python lists (one call), bare or tagged
    '[get_weather(city="SF", metric="celsius")]<|eot_id|>': [("get_weather", {"city": "SF", "metric": "celsius"})],
    '<|python_tag|>[get_weather(city="SF")]<|eom_id|>': [("get_weather", {"city": "SF"})],
    "[initialize()]<|eot_id|>": [("initialize", {})],
    '[process_data(name="sample", value=42, active=True, ratio=3.14)]<|eot_id|>': [("process_data", {"name": "sample", "value": 42, "active": True, "ratio": 3.14})],
    '[get_boiling_point(liquid_name="water", celcius=True)]': [("get_boiling_point", {"liquid_name": "water", "celcius": True})],
    # no call
    "The capital of France is Paris.<|eot_id|>": [],
    'Here is some JSON: {"a": 1}<|eot_id|>': [],
    '{"a": 1}<|eot_id|>': [],
    "[1, 2, 3]<|eot_id|>": [],
    '[get_boiling_point("water", True)]<|eot_id|>': [],
    "Out of tokens mid-sent": [],
    "<|eot_id|>": [],
}

# Outputs where Meta's decoder (llama-models 0.3.0) contradicts Meta's own documentation, or drops
# or changes what the model wrote: text -> (the calls we find, the reason Meta's answer is wrong).
META_DECODER_WRONG = {
    '[get_weather(city="SF", metric="celsius"), get_time(tz="PST")]<|eot_id|>': (
        [("get_weather", {"city": "SF", "metric": "celsius"}), ("get_time", {"tz": "PST"})],
        "Llama 3.2's documented format lists several calls; Meta keeps only the first (its own FIXME)",
    ),
    '<|python_tag|>[a(x=1), b(y="z")]<|eom_id|>': (
        [("a", {"x": 1}), ("b", {"y": "z"})],
        "several calls after <|python_tag|>: Meta keeps only the first",
    ),
    '<function=a>{"x": 1}</function><function=b>{"y": 2}</function><|eot_id|>': (
        [("a", {"x": 1}), ("b", {"y": 2})],
        "two function-tag calls: Meta keeps only the first",
    ),
    '<|python_tag|>wolfram_alpha.call(query="2+2", precision=3)<|eom_id|>': (
        [("wolfram_alpha", {"query": "2+2", "precision": 3})],
        "a built-in call with a second argument: Meta's regex wants query= alone and hands the call "
        "text to the code interpreter as code",
    ),
    '<|python_tag|>brave_search.call(query="say \\"hi\\"")<|eom_id|>': (
        [("brave_search", {"query": 'say "hi"'})],
        "an escaped quote in the query: Meta's regex stops at it and hands the call to the code interpreter",
    ),
    '{"name": "get_weather", "arguments": {"city": "Paris"}}<|eot_id|>': (
        [("get_weather", {"city": "Paris"})],
        '"arguments" instead of "parameters" (the OpenAI-style name models emit): Meta raises KeyError',
    ),
    '<function=f>{"a": {"b": 1}}</function><|eot_id|>': (
        [("f", {"a": {"b": 1}})],
        "nested object arguments: Meta's lazy {.*?} cuts the JSON at the first } and finds no call",
    ),
    "<function=f>{'q': \"it's\"}</function><|eot_id|>": (
        [("f", {"q": "it's"})],
        "Python-literal args with an apostrophe: Meta's quote replacement breaks the string, no call",
    ),
    "<|python_tag|>[f(a=g())]<|eom_id|>": (
        [("code_interpreter", {"code": "[f(a=g())]"})],
        "a call list with a non-literal argument: Meta raises ValueError; it is no call (never "
        "evaluated here), so, after the tag, code for the interpreter like any other text",
    ),
    '<|python_tag|>brave_search.call(query="a")\nwolfram_alpha.call(query="b")<|eom_id|>': (
        [("brave_search", {"query": "a"}), ("wolfram_alpha", {"query": "b"})],
        "two built-in calls, one per line: Meta keeps only the first (as with lists and function tags)",
    ),
    '<|python_tag|>brave_search.call(query="a"); wolfram_alpha.call(query="b")<|eom_id|>': (
        [("brave_search", {"query": "a"}), ("wolfram_alpha", {"query": "b"})],
        "two built-in calls separated by ';': Meta keeps only the first",
    ),
    '{"name": "code_interpreter", "parameters": {"code": "print(1)"}}<|eot_id|>': (
        [("code_interpreter", {"code": "print(1)"})],
        'the code interpreter called in JSON: Meta renames its argument to "query", which the '
        'interpreter does not take; its argument is "code"',
    ),
    '<|python_tag|>{"name": "brave_search", "parameters": {"query": "x", "count": 3}}<|eom_id|>': (
        [("brave_search", {"query": "x", "count": 3})],
        "a built-in called in JSON with several arguments: Meta keeps only the first value, as "
        '"query"; we keep what the model wrote',
    ),
    "<|python_tag|><|eom_id|>": (
        [],
        "nothing after the tag: Meta calls the code interpreter with empty code; there is nothing to run",
    ),
    '<|python_tag|>brave_search.call(query="x", count=3)<|eom_id|>': (
        [("brave_search", {"query": "x", "count": 3})],
        "a built-in call with a second argument: Meta's regex wants query= alone and hands the call "
        "text to the code interpreter as code",
    ),
    'You could run brave_search.call(query="x") yourself.<|eot_id|>': (
        [],
        "a call mentioned inside a sentence: Meta's regex searches anywhere; the documented call is "
        "the whole message (or its end)",
    ),
    '<function=get_weather>{"city": "Oslo"}</function> Done.<|eot_id|>': (
        [],
        "prose after the call: the documented call ends the message; text rather than dropping words",
    ),
    "Sure.<|python_tag|>print(1)<|eom_id|>": (
        [("code_interpreter", {"code": "print(1)"})],
        "<|python_tag|> after some text still starts the tool call; Meta only looks at the start",
    ),
}


def ours(tokenizer, generated: str, decode=decode_assistant_message) -> list[tuple[str, dict]]:
    tokens = tokenizer.encode(generated, bos=False, eos=False, allowed_special="all")
    return [(c["tool_name"], c["arguments"]) for c in decode(tokenizer, tokens)["tool_calls"]]


def metas(meta, tokenizer, generated: str):
    """Meta's decoded calls as [(name, arguments)], or the exception it raised."""
    datatypes, meta_fmt = meta
    tokens = tokenizer.encode(generated, bos=False, eos=False, allowed_special="all")
    try:
        message = meta_fmt.decode_assistant_message(tokens, datatypes.StopReason.out_of_tokens)
    except Exception as e:  # noqa: BLE001 - Meta's decoder raises on some outputs
        return e
    calls = []
    for c in message.tool_calls:
        name = getattr(c.tool_name, "value", c.tool_name)
        calls.append((name, dict(c.arguments)))
    return calls


def test_corpus_size():
    assert len(AGREE) + len(META_DECODER_WRONG) >= 30 + 10


# Meta's decoder parses text with ast.parse as is: Python warns about LaTeX backslashes.
@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")
@pytest.mark.parametrize("generated", list(AGREE))
def test_decode_agrees_with_meta(meta, tokenizer, generated):
    assert ours(tokenizer, generated) == AGREE[generated]
    assert metas(meta, tokenizer, generated) == AGREE[generated]


@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")
@pytest.mark.parametrize("generated", list(META_DECODER_WRONG))
def test_decode_where_meta_is_wrong(meta, tokenizer, generated):
    expected, reason = META_DECODER_WRONG[generated]
    assert ours(tokenizer, generated) == expected
    assert metas(meta, tokenizer, generated) != expected, f"Meta now agrees; drop this case ({reason})"


def test_code_only_after_the_tag(tokenizer):
    for generated in list(AGREE) + list(META_DECODER_WRONG):
        for name, args in ours(tokenizer, generated):
            if name == "code_interpreter" and "code_interpreter" not in generated:  # not called by name
                assert "<|python_tag|>" in generated
                # the code is the text after the tag, as generated
                assert args["code"] in generated.split("<|python_tag|>", 1)[1]


# --- Meta's tests/api/test_tool_utils.py expected values, through our API --------------------------


def test_meta_tool_utils_custom_call():
    [call] = parse_tool_calls('<function=getWeather>{"location":"New York","date":"2023-08-05"}')
    assert (call["tool_name"], call["arguments"]) == ("getWeather", {"location": "New York", "date": "2023-08-05"})


PYTHON_LISTS = {
    '[get_boiling_point(liquid_name="water", celcius=True)]': [("get_boiling_point", {"liquid_name": "water", "celcius": True})],
    '[get_boiling_point(liquid_name="water", celcius=True), get_melting_point(substance="ice", kelvin=False)]': [
        ("get_boiling_point", {"liquid_name": "water", "celcius": True}),
        ("get_melting_point", {"substance": "ice", "kelvin": False}),
    ],
    '[get_boiling_point(liquid_name="water", celcius=True, precise=False)]': [
        ("get_boiling_point", {"liquid_name": "water", "celcius": True, "precise": False})
    ],
    "[calculate_volume(radius=5.2, height=10)]": [("calculate_volume", {"radius": 5.2, "height": 10})],
    '[process_data(name="sample", value=42, active=True, ratio=3.14)]': [
        ("process_data", {"name": "sample", "value": 42, "active": True, "ratio": 3.14})
    ],
    "[initialize()]": [("initialize", {})],
    '[analyze_text(content="Hello, world!", language="en")]': [("analyze_text", {"content": "Hello, world!", "language": "en"})],
    '[get_boiling_point(liquid={"name":"water", "color":"translucent"}), convert_temperature(value=[100, 101], from_unit="C", to_unit="F")]': [
        ("get_boiling_point", {"liquid": {"name": "water", "color": "translucent"}}),
        ("convert_temperature", {"value": [100, 101], "from_unit": "C", "to_unit": "F"}),
    ],
}
NOT_PYTHON_LISTS = [
    "[]",
    '[get_boiling_point(liquid_name="water"), 42]',
    '[get_boiling_point("water", True)]',
    '[[get_boiling_point(liquid_name="water")]]',
    '{"func": get_boiling_point(liquid_name="water")}',
    '[get_boiling_point(liquid_name="water", celcius=True',
    'get_boiling_point(liquid_name="water")',
    '[(get_boiling_point(liquid_name="water"),)]',
]


@pytest.mark.parametrize("text", list(PYTHON_LISTS))
def test_meta_tool_utils_python_lists(text):
    for tagged in (False, True):
        calls = parse_tool_calls(text, after_python_tag=tagged)
        assert [(c["tool_name"], c["arguments"]) for c in calls] == PYTHON_LISTS[text]


@pytest.mark.parametrize("text", NOT_PYTHON_LISTS)
def test_meta_tool_utils_not_python_lists(text):
    assert parse_tool_calls(text) == []
    # after <|python_tag|> none of them is a tool call (a bare f(...) is Python code, not a call list)
    assert all(c["tool_name"] == "code_interpreter" for c in parse_tool_calls(text, after_python_tag=True))


# --- encoding: the corpus of dialogs ---------------------------------------------------------------

CONTENTS = [
    "This is a test sentence.",
    "Ça déjà vu, 日本語, emoji 😀",
    "def f(x):\n    return x ** 2",
    "<|eot_id|><|start_header_id|>system<|end_header_id|> stays text",
    "",
    "a\n\nb",
]
ORDERS = [
    ["user"], ["system", "user"], ["user", "assistant", "user"], ["user", "user"], ["user", "assistant"],
    ["system", "user", "assistant", "ipython", "assistant", "user"], ["tool"], ["assistant"],
    ["user", "system", "user"], ["system"], ["system", "system", "user"], ["user", "tool", "tool"],
]  # fmt: skip
DIALOGS = [
    [{"role": role, "content": CONTENTS[(i + k) % len(CONTENTS)]} for i, role in enumerate(order)]
    for order in ORDERS
    for k in range(4)
]


def call(name, arguments):
    return {"call_id": "c1", "tool_name": name, "arguments": arguments}


# Assistant messages with tool calls where the documented format and Meta's encoder agree.
TOOL_DIALOGS = [
    ([{"role": "user", "content": "sqrt 2?"},
      {"role": "assistant", "content": "", "tool_calls": [call("code_interpreter", {"code": "print(2 ** 0.5)"})],
       "stop_reason": "end_of_message"},
      {"role": "ipython", "content": "1.4142135623730951"}], "json"),
    ([{"role": "user", "content": "Weather?"},
      {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris", "days": 2})]},
      {"role": "tool", "content": '{"temp": 18}'}], "function_tag"),
    ([{"role": "user", "content": "Boiling point?"},
      {"role": "assistant", "content": "", "tool_calls": [call("get_boiling_point", {"liquid_name": "water", "celcius": True})]},
      {"role": "tool", "content": "100"}], "python_list"),
    # the end token is the message's own stop_reason: <|eot_id|> after a tagged call too
    ([{"role": "user", "content": "sqrt 2?"},
      {"role": "assistant", "content": "", "tool_calls": [call("code_interpreter", {"code": "print(2 ** 0.5)"})],
       "stop_reason": "end_of_turn"}], "json"),
    # python lists: nested strings double-quoted too
    ([{"role": "user", "content": "Convert"},
      {"role": "assistant", "content": "", "tool_calls": [call("convert", {"values": [1, "x", None], "exact": False, "scale": 2.5})]}],
     "python_list"),
]  # fmt: skip

HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
# Where Meta's encoder (llama-models 0.3.0) departs from the documented prompt format:
# message -> (tool_prompt_format, our text, which is the documented one, and why Meta's differs).
ENCODER_DIFFERS = [
    ({"role": "user", "content": "  padded \n"}, "json",
     "<|start_header_id|>user<|end_header_id|>\n\npadded<|eot_id|>",
     "content is stripped in the documented format and in meta-llama/llama3's ChatFormat; llama-models keeps the spaces"),
    ({"role": "assistant", "content": "", "tool_calls": [call("brave_search", {"query": "Menlo Park"})]}, "json",
     HEADER + '<|python_tag|>brave_search.call(query="Menlo Park")<|eom_id|>',
     "built-in calls are documented as <|python_tag|>...<|eom_id|>; Meta's encoder writes neither unless told"),
    ({"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]}, "json",
     HEADER + '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
     'the 3.1 documentation shows {"name", "parameters"}; Meta\'s encoder adds "type": "function"'),
    ({"role": "assistant", "content": "", "tool_calls": [call("f", {"a": 1}), call("g", {"b": "x"})]}, "python_list",
     HEADER + '[f(a=1), g(b="x")]<|eot_id|>',
     "several calls are one list in Llama 3.2's documented format; Meta's encoder writes [f(a=1)][g(b=\"x\")]"),
    ({"role": "assistant", "content": "", "tool_calls": [call("f", {"d": {"k": 1}})]}, "python_list",
     HEADER + '[f(d={"k": 1})]<|eot_id|>',
     "a dict argument in a python list: Meta writes {k=1}, which is no Python literal (its own decoder cannot read it)"),
    ({"role": "assistant", "content": "", "tool_calls": [call("f", {"path": "C:\\new", "q": 'say "hi"'})]}, "python_list",
     HEADER + '[f(path="C:\\\\new", q="say \\"hi\\"")]<|eot_id|>',
     "strings in a python list are Python literals (Meta's decoder reads them with ast.literal_eval too): "
     "Meta writes them unescaped, so C:\\new reads back with a newline and a quote ends the string"),
    ({"role": "assistant", "content": "", "tool_calls": [call("brave_search", {"query": "a"}), call("wolfram_alpha", {"query": "b"})]},
     "json", HEADER + '<|python_tag|>brave_search.call(query="a")\nwolfram_alpha.call(query="b")<|eom_id|>',
     "several built-in calls: one per line after the tag; Meta runs them together on one line, "
     "untagged, ending the turn"),
]  # fmt: skip


# Built-in queries are raw text in both directions, as in Meta's encoder and decoder.
RAW_QUERIES = ["\\int x^2 dx", "solve \\alpha x = 2", "C:\\new\\tmp", "\\xi + \\underline{u}", "\\frac{1}{2}", "a\nb"]


@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")
@pytest.mark.parametrize("query", RAW_QUERIES)
def test_builtin_query_text_equals_metas(meta, tokenizer, fmt, query):
    message = {"role": "assistant", "content": "", "tool_calls": [call("wolfram_alpha", {"query": query})],
               "stop_reason": "end_of_message"}  # fmt: skip
    ours_ = fmt.encode_message(message)
    theirs = meta_prompt(meta, [message])[1:-4]
    # Meta writes no <|python_tag|> before a built-in call (ENCODER_DIFFERS); the rest is equal
    assert [t for t in ours_ if t != tokenizer.python_tag_id] == theirs
    generated = ours_[len(fmt.encode_header(message)) :]
    assert metas(meta, tokenizer, tokenizer.decode(generated)) == [("wolfram_alpha", {"query": query})]
    assert ours(tokenizer, tokenizer.decode(generated)) == [("wolfram_alpha", {"query": query})]


def meta_messages(meta, dialog):
    datatypes, _ = meta
    out = []
    for m in dialog:
        calls = [
            datatypes.ToolCall(call_id=c["call_id"], arguments=c["arguments"],
                               tool_name=getattr(datatypes.BuiltinTool, c["tool_name"], c["tool_name"]))
            for c in m.get("tool_calls", [])
        ]  # fmt: skip
        role = "tool" if m["role"] == "ipython" else m["role"]
        stop = m.get("stop_reason")
        out.append(datatypes.RawMessage(role=role, content=m["content"], tool_calls=calls,
                                        stop_reason=datatypes.StopReason(stop) if stop else None))  # fmt: skip
    return out


def meta_prompt(meta, dialog, tool_prompt_format="json"):
    datatypes, meta_fmt = meta
    return meta_fmt.encode_dialog_prompt(meta_messages(meta, dialog), datatypes.ToolPromptFormat(tool_prompt_format)).tokens


def test_encoding_corpus_size():
    assert len(DIALOGS) + len(TOOL_DIALOGS) + len(ENCODER_DIFFERS) >= 40


@pytest.mark.parametrize("dialog", DIALOGS, ids=[f"{'-'.join(m['role'] for m in d)}#{i % 4}" for i, d in enumerate(DIALOGS)])
def test_encoding_equals_meta(meta, fmt, dialog):
    assert fmt.encode_dialog_prompt(dialog) == meta_prompt(meta, dialog)


@pytest.mark.parametrize("dialog, tool_prompt_format", TOOL_DIALOGS)
def test_tool_call_encoding_equals_meta(meta, fmt, dialog, tool_prompt_format):
    assert fmt.encode_dialog_prompt(dialog, tool_prompt_format) == meta_prompt(meta, dialog, tool_prompt_format)


@pytest.mark.parametrize("message, tool_prompt_format, documented, reason", ENCODER_DIFFERS, ids=[r[:40] for *_, r in ENCODER_DIFFERS])
def test_encoding_where_meta_departs_from_the_docs(meta, tokenizer, fmt, message, tool_prompt_format, documented, reason):
    tokens = fmt.encode_message(message, tool_prompt_format)
    assert tokens == tokenizer.encode(documented, bos=False, eos=False, allowed_special="all")
    theirs = meta_prompt(meta, [message], tool_prompt_format)[1:-4]  # drop BOS and the open assistant header
    assert theirs != tokens, f"Meta now writes the documented form; drop this case ({reason})"


# --- Meta's names ------------------------------------------------------------------------------------


def test_meta_llama3_test_tokenizer_imports_and_ids(meta_tokenizer_path):
    """The import line of meta-llama/llama3's test_tokenizer.py, and the ids it checks."""
    from llama.tokenizer import ChatFormat, Tokenizer

    tokenizer = Tokenizer(str(meta_tokenizer_path))
    chat = ChatFormat(tokenizer)
    assert tokenizer.num_reserved_special_tokens == 256 and tokenizer.n_words == 128256  # Meta's class attributes
    assert tokenizer.pat_str == tokenizer.model._pat_str  # the split regex tiktoken runs
    assert tokenizer.special_tokens["<|begin_of_text|>"] == 128000
    assert tokenizer.encode("This is a test sentence.", bos=True, eos=True) == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tokenizer.decode([128000, 2028, 374, 264, 1296, 11914, 13, 128001]) == (
        "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    )
    assert chat.encode_message({"role": "user", "content": "This is a test sentence."}) == [
        128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
    ]  # fmt: skip
    dialog = [{"role": "system", "content": "This is a test sentence."}, {"role": "user", "content": "This is a response."}]
    assert chat.encode_dialog_prompt(dialog) == [
        128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009, 128006, 882,
        128007, 271, 2028, 374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271,
    ]  # fmt: skip


def test_meta_type_names():
    import llama
    import llama.chat_format
    import llama.tokenizer

    assert llama.tokenizer.ChatFormat is llama.chat_format.ChatFormat is llama.ChatFormat
    assert llama.Dialog is llama.datatypes.Dialog and llama.Message is llama.datatypes.Message
    from llama.tokenizer import Dialog, Message, Role  # meta-llama/llama3 defines them in tokenizer.py

    assert (Dialog, Message, Role) == (llama.Dialog, llama.Message, llama.datatypes.Role)
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        llama.tokenizer.Nope  # noqa: B018


def test_sample_top_p_has_metas_shape():
    from llama.generation import sample_top_p

    probs = torch.tensor([[0.05, 0.7, 0.25], [0.6, 0.3, 0.1]])
    out = sample_top_p(probs, 0.5, torch.Generator().manual_seed(0))
    assert out.shape == (2, 1) and out.dtype == torch.long
    assert out.flatten().tolist() == [1, 0]  # the nucleus of p=0.5 is the top token alone


# --- a research script and bf16 default dtype, on a tiny random checkpoint --------------------------

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, meta_tokenizer_path):
    path = tmp_path_factory.mktemp("meta_compat") / "ckpt"
    write_random_checkpoint(path, ARGS, n_shards=1, seed=0, dtype=torch.float32, tokenizer_path=meta_tokenizer_path)
    return path


@pytest.fixture
def bf16_default():
    """Meta's CPU code calls torch.set_default_dtype(torch.bfloat16) before building."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    yield
    torch.set_default_dtype(before)


@pytest.mark.slow  # ~7 s: builds the default (bf16, CPU kernels) model
@pytest.mark.usefixtures("one_thread")
def test_research_script_runs_unchanged(ckpt, meta_tokenizer_path, monkeypatch, capsys):
    argv = [str(SCRIPT), "--ckpt_dir", str(ckpt), "--tokenizer_path", str(meta_tokenizer_path), "--max_gen_len", "4"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    assert "model: dim=64 n_layers=2 n_heads=4 max_seq_len=128 max_batch_size=4" in out
    assert out.count("==================================") == 4
    assert "User: Keep it short." in out and "System: Always answer with emojis" in out
    assert "sampled next token:" in out and "logprobs=[" in out


@pytest.mark.usefixtures("one_thread", "bf16_default")
def test_logprobs_float32_under_bf16_default(ckpt):
    from llama.generation import Llama

    llm = Llama.build(str(ckpt), None, 32, 2, device="cpu", dtype="fp32")
    (out,) = llm.text_completion(["Hello there"], temperature=0, max_gen_len=3, logprobs=True)
    tokens, logprobs = llm.generate([llm.tokenizer.encode("Hello there", bos=True, eos=False)], 3, 0, logprobs=True)
    assert out["logprobs"] == logprobs[0]
    # bf16 keeps 8 bits of mantissa: a float32 logprob is (almost surely) not a bf16 value
    as_bf16 = torch.tensor(logprobs[0], dtype=torch.float64).to(torch.bfloat16).double().tolist()
    assert as_bf16 != logprobs[0]
    # and they are the float32 log-softmax of the model's logits
    with torch.inference_mode():
        full = llm.tokenizer.encode("Hello there", bos=True, eos=False) + tokens[0]
        llm.model.setup_cache(2, 32)
        logits = llm.model(torch.tensor([full]), 0)[0].float()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(full) - 4, len(full) - 1), torch.tensor(full[-3:])]
    torch.testing.assert_close(torch.tensor(logprobs[0], dtype=torch.float32), expected, rtol=0, atol=1e-5)


def test_model_params(ckpt):
    from llama.model import Transformer

    model = Transformer(ARGS, device="cpu", dtype=torch.float32)
    model.setup_cache(3, 48)
    p = model.params
    assert (p.dim, p.n_layers, p.n_heads, p.n_kv_heads, p.vocab_size) == (64, 2, 4, 2, 128256)
    assert (p.max_seq_len, p.max_batch_size, p.rope_theta, p.norm_eps) == (48, 3, 500000.0, 1e-5)


@pytest.mark.usefixtures("one_thread")
def test_a_model_built_by_hand_as_in_metas_build(ckpt, meta_tokenizer_path):
    """The body of meta-llama/llama3's Llama.build, which research code copies to load its own
    weights: ModelArgs with the cache size, Transformer(args), load_state_dict(strict=False),
    Llama(model, tokenizer). The same greedy tokens as Llama.build gives."""
    import json

    from llama.generation import Llama
    from llama.model import Transformer
    from llama.tokenizer import Tokenizer

    params = json.loads((ckpt / "params.json").read_text())
    model_args = ModelArgs(max_seq_len=32, max_batch_size=2, **params)
    assert (model_args.max_seq_len, model_args.max_batch_size) == (32, 2)
    model = Transformer(model_args)  # its cache made here, as in Meta's
    checkpoint = torch.load(ckpt / "consolidated.00.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint, strict=False)
    generator = Llama(model, Tokenizer(model_path=str(meta_tokenizer_path)))
    assert generator.model.params.max_seq_len == 32 and generator.model.params.max_batch_size == 2
    ours = generator.text_completion(["Hello there"], temperature=0, max_gen_len=4)
    built = Llama.build(str(ckpt), str(meta_tokenizer_path), 32, 2, device="cpu", dtype="fp32")
    assert ours == built.text_completion(["Hello there"], temperature=0, max_gen_len=4)
