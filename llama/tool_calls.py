"""Llama 3.1 tool calling: system-prompt helpers, tool-call text, and decoding assistant output.

Built-in tools (`brave_search`, `wolfram_alpha`, `photogen`) are called as
`<|python_tag|>brave_search.call(query="...")<|eom_id|>`, the query raw text between the quotes
(backslashes as written, both ways); the code interpreter as `<|python_tag|>` + code +
`<|eom_id|>` (any text after the tag that is no call, kept as generated); custom tools as JSON
`{"name": ..., "parameters": {...}}` ending with `<|eot_id|>`, as `<function=NAME>{...}</function>`,
or (Llama 3.2) as a python list `[f(a=1), g(b="x")]` holding several calls. Tool results come back
as `ipython` messages (Meta's newer name for the role: `tool`).
"""

from __future__ import annotations

import ast
import json
import re
import uuid
import warnings
from datetime import date
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from .datatypes import Message, StopReason, ToolCall

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# Tools the model calls with `<|python_tag|>` and `<|eom_id|>`; every other name is a custom tool.
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
# How custom tool calls are written in an encoded assistant message (see format_custom_tool_calls).
TOOL_PROMPT_FORMATS = ("json", "python_list", "function_tag")
CUSTOM_TOOLS_FORMAT = (
    'Respond in the format {"name": function name, "parameters": dictionary of argument name '
    'and its value}. Do not use variables.'
)
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")  # fmt: skip


def make_tool_call(
    tool_name: str, arguments: Mapping[str, Any], call_id: Optional[str] = None
) -> ToolCall:
    """A `ToolCall` with a fresh uuid4 `call_id` unless one is given."""
    return {"call_id": call_id or str(uuid.uuid4()), "tool_name": tool_name,
            "arguments": dict(arguments)}  # fmt: skip


def is_builtin_tool(tool_name: str) -> bool:
    """True for the tools called through `<|python_tag|>` ... `<|eom_id|>`."""
    return tool_name in BUILTIN_TOOLS


def format_date(day: date) -> str:
    """`26 July 2024` (two-digit day, English month: independent of the process locale)."""
    return f"{day.day:02d} {_MONTHS[day.month - 1]} {day.year}"


def builtin_tools_system_prompt(
    tools: Sequence[str] = (),
    *,
    code_interpreter: bool = False,
    knowledge_date: str = "December 2023",
    today: Optional[date] = None,
    instructions: str = "",
) -> str:
    """System prompt enabling Llama 3.1 built-in tools. Layout (lines joined by "\\n")::

        Environment: ipython              <- if code_interpreter or any tool
        Tools: brave_search, wolfram_alpha <- if tools other than code_interpreter
        <empty line>                      <- if either line above is present
        Cutting Knowledge Date: December 2023
        Today Date: 26 July 2024
        <empty line>
        {instructions}                    <- these two lines only if instructions

    `Environment: ipython` is what lets the model emit `<|python_tag|>` calls at all, so any
    built-in tool turns it on; it also enables the code interpreter. `today` defaults to
    `date.today()`. Unknown tool names are a ValueError.
    """
    tools = list(tools)
    if unknown := [t for t in tools if t not in BUILTIN_TOOLS]:
        raise ValueError(f"unknown built-in tool(s) {unknown}; valid: {list(BUILTIN_TOOLS)}")
    named = [t for t in tools if t != "code_interpreter"]
    lines = []
    if code_interpreter or tools:
        lines.append("Environment: ipython")
    if named:
        lines.append("Tools: " + ", ".join(named))
    if lines:
        lines.append("")
    lines.append(f"Cutting Knowledge Date: {knowledge_date}")
    lines.append(f"Today Date: {format_date(today or date.today())}")
    if instructions:
        lines += ["", instructions]
    return "\n".join(lines)


def custom_tools_prompt(functions: Sequence[Mapping[str, Any]], question: str = "") -> str:
    """Prompt text (usually the user message) offering JSON-schema functions. Layout::

        Given the following functions, please respond with a JSON for a function call with its
        proper arguments that best answers the given prompt.   <- one line
        <empty line>
        Respond in the format {"name": function name, "parameters": dictionary of argument
        name and its value}. Do not use variables.              <- one line
        <empty line>
        {definition 1 as JSON, indent 4}
        <empty line>
        {definition 2 ...}
        <empty line>
        {question}                                              <- only if given

    A definition `{"name", "description", "parameters": <JSON schema>}` is wrapped as
    `{"type": "function", "function": definition}`; one that already has "type" is used as is.
    """
    blocks = [
        "Given the following functions, please respond with a JSON for a function call with its "
        "proper arguments that best answers the given prompt.",
        CUSTOM_TOOLS_FORMAT,
    ]
    for fn in functions:
        wrapped = dict(fn) if "type" in fn else {"type": "function", "function": dict(fn)}
        inner = wrapped.get("function")
        if not isinstance(inner, dict) or not isinstance(inner.get("name"), str):
            raise ValueError(f"function definition without a name: {dict(fn)!r}")
        blocks.append(json.dumps(wrapped, indent=4, ensure_ascii=False))
    if question:
        blocks.append(question)
    return "\n\n".join(blocks)


def format_tool_call(call: ToolCall) -> str:
    r"""Text of one tool call, without special tokens.

    Built-in: `brave_search.call(query="x", n=3)`: string values are written as they are, between
    double quotes, only `"` escaped as `\"` (a LaTeX query `\int x` stays `\int x`; this is the
    form the decoder reads back, see `parse_tool_calls`); other values as Python literals.
    code_interpreter: the code itself. Custom: `{"name": ..., "parameters": {...}}`.
    """
    name, args = call["tool_name"], call["arguments"]
    if name == "code_interpreter":
        if not isinstance(args.get("code"), str):
            raise ValueError(f"code_interpreter call needs arguments {{'code': str}}, got {args!r}")
        return args["code"]
    if is_builtin_tool(name):
        return f"{name}.call({_python_kwargs(args, _raw_quoted)})"
    return json.dumps({"name": name, "parameters": args}, ensure_ascii=False)


def format_custom_tool_calls(calls: Sequence[ToolCall], tool_prompt_format: str = "json") -> str:
    """Text of one or more custom tool calls in a documented format, without special tokens.

    "json": one call as `{"name": ..., "parameters": {...}}` (Llama 3.1); several calls have no
    JSON form, so they are written as Llama 3.2's python list. "python_list":
    `[f(a=1), g(b="x", l=["y"])]` (Llama 3.2; strings double-quoted with JSON escapes, which are
    valid Python). "function_tag": `<function=f>{"a": 1}</function>` per call (Llama 3.1's
    alternative custom-tool format).
    """
    if tool_prompt_format not in TOOL_PROMPT_FORMATS:
        raise ValueError(f"unknown tool_prompt_format {tool_prompt_format!r}; valid: {TOOL_PROMPT_FORMATS}")
    if tool_prompt_format == "json" and len(calls) == 1:
        return format_tool_call(calls[0])
    if tool_prompt_format == "function_tag":
        return "".join(f"<function={c['tool_name']}>{json.dumps(c['arguments'], ensure_ascii=False)}</function>"
                       for c in calls)  # fmt: skip
    for c in calls:
        if not _NAME.fullmatch(c["tool_name"]):
            raise ValueError(f"tool name {c['tool_name']!r} is not a Python identifier: use the json format")
    return "[" + ", ".join(f"{c['tool_name']}({_python_kwargs(c['arguments'], _json_quoted)})" for c in calls) + "]"


def _python_kwargs(args: Mapping[str, Any], quoted: Callable[[str], str]) -> str:
    return ", ".join(f"{k}={_python_literal(v, quoted)}" for k, v in args.items())


def _python_literal(value: Any, quoted: Callable[[str], str]) -> str:
    """A Python literal for JSON-like `value`, its strings (nested ones too) written by `quoted`."""
    if isinstance(value, str):
        return quoted(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_python_literal(v, quoted) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{_python_literal(k, quoted)}: {_python_literal(v, quoted)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    return repr(value)  # numbers, True, False, None


def _json_quoted(text: str) -> str:
    # JSON's escapes (\" \\ \n \uXXXX) are all valid in Python literals: ast.literal_eval reads it back
    return json.dumps(text, ensure_ascii=False)


def _raw_quoted(text: str) -> str:
    # the text as written, between double quotes; only a quote needs escaping (see _raw_strings)
    return '"' + text.replace('"', '\\"') + '"'


# --- decoding ------------------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_]\w*")
_CALL_START = re.compile(r"([A-Za-z_]\w*)\.call\(")
_BUILTIN_CALL = re.compile(r"\b(?:" + "|".join(BUILTIN_TOOLS[:3]) + r")\.call\(")
_FUNCTION_OPEN = re.compile(r"\s*<function=([A-Za-z_][\w.\-]*)>")
# After `\"`: the quote closes the string (the backslash ending the value) if the call ends there.
_CALL_ENDS = re.compile(r"[ \t]*\)[ \t]*(?:[;\r\n]|$)")
# The argument a built-in tool takes (what a call in a custom-tool form is mapped to).
_BUILTIN_ARGUMENT = {"brave_search": "query", "wolfram_alpha": "query", "photogen": "query",
                     "code_interpreter": "code"}  # fmt: skip
_PARSE_ERRORS = (SyntaxError, ValueError, TypeError, MemoryError, RecursionError)


def parse_tool_calls(text: str, *, after_python_tag: bool = False) -> list[ToolCall]:
    r"""Tool calls written as the whole of `text` (surrounding whitespace aside), or [].

    Forms, as in Meta's prompt-format documentation:
    - Llama 3.1 built-ins `brave_search.call(query="...", k=literal)`, one or several (one per
      line or separated by `;`). Any `name.call(...)` after `<|python_tag|>`; bare only for
      built-in names. String values are raw text, as in Meta's format: backslashes are kept as
      written (`"\int x"`, `"C:\new"`); only `\"` stands for a quote;
    - JSON `{"name": ..., "parameters" | "arguments": {...}}` (other keys such as "type":
      "function" or "description" ignored; "type", if present, must be "function");
    - `<function=NAME>ARGS</function>`, one or several, the last closing tag optional, ARGS a
      JSON object or a Python dict literal;
    - Llama 3.2 python lists `[f(a=1), g(b="x")]` (keyword arguments, Python literal values);
    - after `<|python_tag|>`, any other non-blank text is code for `code_interpreter`, exactly as
      generated (whitespace included), whether or not it parses as Python here: the interpreter
      answers with its own error, and the dialog goes on.
    A built-in tool called in a custom form with one string argument under another name
    (`{"name": "brave_search", "parameters": {"q": "x"}}`) gets its own argument name ("query";
    "code" for code_interpreter). Literals are read with `ast.literal_eval` and `json.loads`
    only; nothing is evaluated.
    """
    calls = _calls(text.strip(), after_python_tag)
    if calls:
        return calls
    if after_python_tag and text.strip():
        return [make_tool_call("code_interpreter", {"code": text})]
    return []


def parse_tool_call(text: str, *, after_python_tag: bool = False) -> Optional[ToolCall]:
    """The single tool call of `text`, or None (no call, or several: see `parse_tool_calls`)."""
    calls = parse_tool_calls(text, after_python_tag=after_python_tag)
    return calls[0] if len(calls) == 1 else None


def split_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) for text generated without `<|python_tag|>`.

    The whole text may be a call (any form of `parse_tool_calls` except code), or prose followed
    by `<function=...>` calls or by built-in `name.call(...)` calls ending the message: the prose
    is the content. JSON and python lists after prose stay text (prose often quotes them).
    """
    stripped = text.strip()
    if calls := _calls(stripped, False):
        return "", calls
    starts = [stripped.find("<function=")] + [m.start() for m in _BUILTIN_CALL.finditer(stripped)]
    for start in sorted(s for s in starts if s > 0):
        if calls := _calls(stripped[start:], False):
            return stripped[:start].strip(), calls
    return text, []


def _calls(s: str, after_python_tag: bool) -> Optional[list[ToolCall]]:
    """The calls written as the whole of the stripped text `s`, or None."""
    try:
        if s.startswith("<function="):
            return _function_tags(s)
        if s.startswith("{"):
            call = _json_call(s)
            return [call] if call else None
        if s.startswith("["):
            return _python_list(s)
        if _CALL_START.match(s):
            return _dot_calls(s, any_name=after_python_tag)
    except _PARSE_ERRORS:
        pass
    return None


def _decoded_call(name: str, args: dict[str, Any]) -> ToolCall:
    """A decoded call; a built-in's one string argument is put under the built-in's own name."""
    own = _BUILTIN_ARGUMENT.get(name)
    if own and len(args) == 1 and own not in args:
        [value] = args.values()
        if isinstance(value, str):
            args = {own: value}
    return make_tool_call(name, args)


def _function_tags(s: str) -> Optional[list[ToolCall]]:
    """`<function=f>{...}</function><function=g>{...}` (the last closing tag optional)."""
    calls, pos = [], 0
    while pos < len(s):
        match = _FUNCTION_OPEN.match(s, pos)
        if not match:
            return None
        end = s.find("</function>", match.end())
        body = s[match.end() : end if end >= 0 else len(s)]
        args = _dict_literal(body)
        if args is None:
            return None
        calls.append(_decoded_call(match.group(1), args))
        pos = len(s) if end < 0 else end + len("</function>")
        while pos < len(s) and s[pos].isspace():
            pos += 1
    return calls


def _dict_literal(text: str) -> Optional[dict[str, Any]]:
    """A JSON object, or a Python dict literal (`{'a': 'b'}`), with string keys; else None."""
    text = text.strip()
    value = _json_value(text)
    if value is None:
        try:
            value = ast.literal_eval(_ast_parse(text, "eval"))
        except _PARSE_ERRORS:
            return None
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return value
    return None


def _json_call(s: str) -> Optional[ToolCall]:
    """`{"name": ..., "parameters" | "arguments": {...}, ...}`; "type", if any, is "function"."""
    obj = _json_value(s)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if obj.get("type", "function") != "function":
        return None
    args = obj["parameters"] if "parameters" in obj else obj.get("arguments")
    return _decoded_call(obj["name"], args) if isinstance(args, dict) else None


def _python_list(s: str) -> Optional[list[ToolCall]]:
    """`[f(a=1), g(b="x")]`: a non-empty list of calls of plain names with literal keywords."""
    node = _ast_parse(s, "eval").body
    shaped = isinstance(node, ast.List) and node.elts and all(
        isinstance(e, ast.Call) and isinstance(e.func, ast.Name) for e in node.elts
    )
    if not shaped:
        return None
    calls = []
    for e in node.elts:
        if e.args or any(kw.arg is None for kw in e.keywords):
            return None  # positional or **kwargs: not the documented form
        calls.append(_decoded_call(e.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in e.keywords}))
    return calls


def _dot_calls(s: str, any_name: bool) -> Optional[list[ToolCall]]:
    """`name.call(k=literal, ...)`, one per statement; anything else (positional args, code) -> None.

    Only built-in names unless `any_name`. String values are raw (see `_raw_strings`).
    """
    source = _raw_strings(s)
    if source is None:
        return None
    calls = []
    for statement in _ast_parse(source, "exec").body:
        node = statement.value if isinstance(statement, ast.Expr) else None
        ok = (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "call"
            and isinstance(node.func.value, ast.Name)
            and (any_name or is_builtin_tool(node.func.value.id))
            and not node.args
            and all(kw.arg is not None for kw in node.keywords)
        )
        if not ok:
            return None
        calls.append(_decoded_call(node.func.value.id, {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}))
    return calls or None


def _raw_strings(source: str) -> Optional[str]:
    r"""`source` with each string literal replaced by a Python literal of its raw text, or None.

    Meta's built-in call format puts the query between quotes as written, so a backslash is
    just a character (`"\int x"`, `"C:\new"`): Python's escapes would turn `\n` into a newline
    and `\a` into a bell, and reject `\x`, `\u`, `\N` outright. Here a string runs from its
    quote to the next unescaped same quote, `\"` (or `\'`) stands for the quote itself, and
    every other character is kept. One exception: `\"` followed by the end of the call closes
    the string, so a value ending with a backslash (`"C:\"`) reads back when it is the last
    argument. Prefixed strings (`r"..."`, `f"..."`) and unterminated ones give None.
    """
    out, start, i, n = [], 0, 0, len(source)
    while i < n:
        quote = source[i]
        if quote == "#":  # a comment runs to the end of its line, quotes and all
            end = source.find("\n", i)
            i = n if end < 0 else end
            continue
        if quote not in "\"'":
            i += 1
            continue
        if i and (source[i - 1].isalnum() or source[i - 1] == "_"):
            return None
        chars, j = [], i + 1
        while j < n and source[j] != quote:
            if source[j] == "\\" and source.startswith(quote, j + 1) and not _CALL_ENDS.match(source, j + 2):
                chars.append(quote)
                j += 2
            else:
                chars.append(source[j])
                j += 1
        if j >= n:
            return None
        out += [source[start:i], " ", repr("".join(chars)), " "]
        i = start = j + 1
    out.append(source[start:])
    return "".join(out)


def _ast_parse(source: str, mode: str) -> ast.AST:
    # generated text is full of backslashes: no SyntaxWarning for invalid escapes on every parse
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(source, mode=mode)


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def decode_assistant_message(
    tokenizer: "Tokenizer", tokens: Sequence[int], *, parse_tool_calls: bool = True
) -> Message:
    """Turn generated tokens into an assistant `Message` with `tool_calls` and `stop_reason`.

    `tokens` are what the model produced after the assistant header, including the stop token
    if generation stopped on one (anything after the first stop token is ignored):
    `<|eom_id|>` -> "end_of_message", another stop token (`<|eot_id|>`, `<|end_of_text|>`)
    -> "end_of_turn", none -> "out_of_tokens". With `<|python_tag|>`, the text before it is the
    content and the text after it the call(s) (`parse_tool_calls` with `after_python_tag`: code
    for the interpreter unless it is another call); without, see `split_tool_calls`. Call text
    is not repeated in the content; when there is no call (untagged text that is none, or
    nothing after the tag), all the text is the content (the tag itself dropped).
    """
    tokens = list(tokens)
    stop_reason: StopReason = "out_of_tokens"
    stops = set(tokenizer.stop_tokens)
    for i, token in enumerate(tokens):
        if token in stops:
            eom = token == tokenizer.eom_id
            stop_reason = "end_of_message" if eom else "end_of_turn"
            tokens = tokens[:i]
            break
    tag = tokenizer.python_tag_id
    calls: list[ToolCall] = []
    if tag is not None and tag in tokens:
        i = tokens.index(tag)
        before, after = tokenizer.decode(tokens[:i]), tokenizer.decode(tokens[i + 1 :])
        calls = _parse(after, after_python_tag=True) if parse_tool_calls else []
        content = before.strip() if calls else before + after
    else:
        content = tokenizer.decode(tokens)
        if parse_tool_calls:
            content, calls = split_tool_calls(content)
    return {"role": "assistant", "content": content, "tool_calls": calls,
            "stop_reason": stop_reason}  # fmt: skip


_parse = parse_tool_calls  # decode_assistant_message's flag shadows the name
