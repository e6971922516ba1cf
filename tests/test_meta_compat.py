"""Drop-in for Meta's code, checked against Meta's own package (llama-models) at test time.

- Tool-call decoding: a corpus of assistant outputs in every documented format, decoded by us and
  by Meta's ``ChatFormat.decode_assistant_message``; every disagreement is listed in
  ``META_DECODER_WRONG`` with the reason (Meta's decoder contradicting Meta's documentation).
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
# [(tool_name, arguments)]. Code-interpreter code is compared stripped: Meta strips only spaces.

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
    f"<|python_tag|>{CODE}\n<|eom_id|>": [("code_interpreter", {"code": CODE})],
    '<|python_tag|>print("hello")<|eom_id|>': [("code_interpreter", {"code": 'print("hello")'})],
    "<|python_tag|>x = [i * i for i in range(5)]\nprint(x)<|eom_id|>": [("code_interpreter", {"code": "x = [i * i for i in range(5)]\nprint(x)"})],
    # JSON, with and without "type": "function"
    '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>': [("get_weather", {"city": "Paris"})],
    '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris", "days": 3}}<|eot_id|>': [("get_weather", {"city": "Paris", "days": 3})],
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>': [("get_weather", {"city": "Paris"})],
    ' {"name": "get_time", "parameters": {}}<|eot_id|>': [("get_time", {})],
    '{"name": "brave_search", "parameters": {"query": "x"}}<|eot_id|>': [("brave_search", {"query": "x"})],
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

# Outputs where Meta's decoder (llama-models 0.3.0) contradicts Meta's own documentation:
# text -> (the calls we find, the reason Meta's answer is wrong).
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
    '<|python_tag|>{"a": 1}<|eom_id|>': (
        [],
        "a JSON object that is not a call: Meta sends it to the code interpreter; ambiguous, so text",
    ),
    "<|python_tag|>[f(a=g())]<|eom_id|>": (
        [],
        "a call list with a non-literal argument: Meta raises ValueError; never evaluated, so text",
    ),
    "<|python_tag|>Let me think about it.<|eom_id|>": (
        [],
        "prose after the tag is not Python: Meta sends it to the code interpreter; we keep it as text",
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
        args = dict(c.arguments)
        if name == "code_interpreter":
            args = {"code": args["code"].strip()}
        calls.append((name, args))
    return calls


def test_corpus_size():
    assert len(AGREE) + len(META_DECODER_WRONG) >= 30 + 10


@pytest.mark.parametrize("generated", list(AGREE))
def test_decode_agrees_with_meta(meta, tokenizer, generated):
    assert ours(tokenizer, generated) == AGREE[generated]
    assert metas(meta, tokenizer, generated) == AGREE[generated]


@pytest.mark.parametrize("generated", list(META_DECODER_WRONG))
def test_decode_where_meta_is_wrong(meta, tokenizer, generated):
    expected, reason = META_DECODER_WRONG[generated]
    assert ours(tokenizer, generated) == expected
    assert metas(meta, tokenizer, generated) != expected, f"Meta now agrees; drop this case ({reason})"


def test_never_code_when_ambiguous(tokenizer):
    for generated in list(AGREE) + list(META_DECODER_WRONG):
        for name, args in ours(tokenizer, generated):
            if name == "code_interpreter":
                assert generated.startswith("<|python_tag|>") or "<|python_tag|>" in generated
                assert not args["code"].lstrip().startswith(("[", "{", "<function="))


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
