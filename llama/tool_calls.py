"""Llama 3.1 tool calling: system-prompt helpers, tool-call text, and decoding assistant output.

Built-in tools (`brave_search`, `wolfram_alpha`, `photogen`) are called as
`<|python_tag|>brave_search.call(query="...")<|eom_id|>`; the code interpreter as
`<|python_tag|>` + Python code + `<|eom_id|>`; custom tools as JSON
`{"name": ..., "parameters": {...}}` ending with `<|eot_id|>`. Tool results come back as
`ipython` messages.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from datetime import date
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from .datatypes import Message, StopReason, ToolCall

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# Tools the model calls with `<|python_tag|>` and `<|eom_id|>`; every other name is a custom tool.
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
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
    """Text of a tool call, without special tokens.

    Built-in: `brave_search.call(query="x", b="y")` (Python literals; strings double-quoted);
    code_interpreter: the code itself; custom: `{"name": ..., "parameters": {...}}`.
    """
    name, args = call["tool_name"], call["arguments"]
    if name == "code_interpreter":
        if not isinstance(args.get("code"), str):
            raise ValueError(f"code_interpreter call needs arguments {{'code': str}}, got {args!r}")
        return args["code"]
    if is_builtin_tool(name):
        rendered = ", ".join(f"{k}={_python_literal(v)}" for k, v in args.items())
        return f"{name}.call({rendered})"
    return json.dumps({"name": name, "parameters": args}, ensure_ascii=False)


def _python_literal(value: Any) -> str:
    # json.dumps gives a double-quoted string whose escapes are also valid in Python literals
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


_CALL_START = re.compile(r"([A-Za-z_]\w*)\.call\(")
_FUNCTION_TAG = re.compile(r"<function=([^>\s]+)>(.*)</function>", re.DOTALL)


def parse_tool_call(text: str, *, after_python_tag: bool = False) -> Optional[ToolCall]:
    """Parse one tool call from generated text, or return None (= plain content).

    Accepted: `name.call(k=literal, ...)` (bare only for built-in names), `<function=NAME>{json}
    </function>`, `{"name": ..., "parameters" | "arguments": {...}}`; after `<|python_tag|>`,
    any other non-empty text is code for `code_interpreter`. Text that starts like one of the
    structured forms but does not parse is None, never an exception.
    """
    stripped = text.strip()
    if match := _CALL_START.match(stripped):
        if is_builtin_tool(match.group(1)) or after_python_tag:
            call = _parse_python_call(stripped)
            if call is not None or is_builtin_tool(match.group(1)):
                return call
    elif match := _FUNCTION_TAG.fullmatch(stripped):
        args = _json_value(match.group(2))
        return make_tool_call(match.group(1), args) if isinstance(args, dict) else None
    elif stripped.startswith("{"):
        obj = _json_value(stripped)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("parameters", obj.get("arguments"))
        extra = set(obj) - {"name", "parameters", "arguments"}
        return make_tool_call(obj["name"], args) if isinstance(args, dict) and not extra else None
    elif stripped.startswith("<function="):
        return None
    if after_python_tag and stripped:
        return make_tool_call("code_interpreter", {"code": stripped})
    return None


def _parse_python_call(text: str) -> Optional[ToolCall]:
    """`name.call(k=literal, ...)` -> ToolCall; anything else (positional args, code) -> None."""
    try:
        node = ast.parse(text, mode="eval").body
        ok = (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "call"
            and isinstance(node.func.value, ast.Name)
            and not node.args
            and all(kw.arg is not None for kw in node.keywords)
        )
        if not ok:
            return None
        args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None
    return make_tool_call(node.func.value.id, args)


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
    -> "end_of_turn", none -> "out_of_tokens". Text before `<|python_tag|>` is the content;
    a recognised tool call (see `parse_tool_call`) gives `tool_calls=[call]` and the call text
    is not repeated in the content. Unparseable tool-call text stays as plain content.
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
        call = parse_tool_call(after, after_python_tag=True) if parse_tool_calls else None
        content = before.strip() if call else before + after
    else:
        content = tokenizer.decode(tokens)
        call = parse_tool_call(content) if parse_tool_calls else None
        if call:
            content = ""
    if call:
        calls.append(call)
    return {"role": "assistant", "content": content, "tool_calls": calls,
            "stop_reason": stop_reason}  # fmt: skip
