"""Dialog -> prompt token ids, in the Llama 3 chat format (or ChatML for generic tokenizers).

Llama 3: `<|begin_of_text|>`, then per message
`<|start_header_id|>{role}<|end_header_id|>\\n\\n{content stripped}<|eot_id|>`, then an open
`<|start_header_id|>assistant<|end_header_id|>\\n\\n` for the model to continue.
ChatML: per message `<|im_start|>{role}\\n{content stripped}<|im_end|>\\n`, then an open
`<|im_start|>assistant\\n`; no BOS.

Framing tokens are inserted as ids; message content is always encoded as plain text, so a
user typing "<|eot_id|>" gets the characters, never the control token.

This module is the one place that knows the roles and checks dialogs (`validate_dialog`). Like
Meta's ChatFormat it encodes any order of messages (two user turns in a row, a system message
later on, a dialog ending with an assistant message, which then gets a fresh assistant header):
only malformed messages are errors.
"""

from __future__ import annotations

from typing import Any, Sequence

from .datatypes import Dialog, Message
from .tokenizer import Tokenizer
from .tool_calls import (
    TOOL_PROMPT_FORMATS,
    decode_assistant_message,
    format_custom_tool_calls,
    format_tool_call,
    is_builtin_tool,
)

LLAMA3_ROLES = ("system", "user", "assistant", "ipython")
CHATML_ROLES = ("system", "user", "assistant")
# Other names accepted for a role: llama-models calls the tool-result role "tool".
ROLE_ALIASES = {"tool": "ipython"}


def validate_dialog(dialog: Any, index: int = 0, roles: Sequence[str] = LLAMA3_ROLES) -> Dialog:
    """Check that `dialog` is a non-empty list of well-formed messages; returns it unchanged.

    A message is a dict with a known `role` (or an alias such as "tool"), `content` a str, and,
    on assistant messages only, `tool_calls`: a list of {"tool_name": str, "arguments": dict}.
    The order of roles is free, as in Meta's format. Errors name the dialog and the message:
    "dialog 2, message 1: ...".
    """
    where = f"dialog {index}"
    if isinstance(dialog, dict):
        raise ValueError(f"{where} is a single message, not a list of messages: wrap it as [message]")
    if not isinstance(dialog, (list, tuple)):
        raise ValueError(f"{where} must be a list of messages, got {type(dialog).__name__}")
    if not dialog:
        raise ValueError(f"{where} is empty: give at least one user message")
    for j, message in enumerate(dialog):
        check_message(message, roles, f"{where}, message {j}")
    return dialog


def check_message(message: Any, roles: Sequence[str] = LLAMA3_ROLES, where: str = "message") -> str:
    """Raise a ValueError starting with `where` unless `message` is well formed; returns its role."""
    if not isinstance(message, dict):
        raise ValueError(f"{where}: expected a dict {{'role': ..., 'content': str}}, got {type(message).__name__}")
    role = message.get("role")
    if isinstance(role, str) and ROLE_ALIASES.get(role) in roles:
        role = ROLE_ALIASES[role]
    if role not in roles:
        raise ValueError(f"{where}: invalid role {message.get('role')!r}; valid: {tuple(roles)}")
    content = message.get("content")
    if not isinstance(content, str):
        raise ValueError(f"{where}: content must be a str, got {type(content).__name__}")
    calls = message.get("tool_calls") or []
    if calls and role != "assistant":
        raise ValueError(f"{where}: only assistant messages carry tool_calls, not {role!r}")
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"{where}: tool_calls must be a list, got {type(calls).__name__}")
    for k, call in enumerate(calls):
        ok = isinstance(call, dict) and isinstance(call.get("tool_name"), str)
        ok = ok and isinstance(call.get("arguments"), dict)
        if not ok:
            raise ValueError(f"{where}: tool call {k} must be {{'tool_name': str, 'arguments': dict}}, got {call!r}")
    return role


class ChatFormat:
    """Encodes messages and dialogs for `tokenizer.chat_format` ("llama3" or "chatml")."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.chatml = tokenizer.chat_format == "chatml"
        self.roles = CHATML_ROLES if self.chatml else LLAMA3_ROLES

    def validate_dialog(self, dialog: Any, index: int = 0) -> Dialog:
        """`validate_dialog` with this format's roles."""
        return validate_dialog(dialog, index, self.roles)

    def encode_header(self, message: Message) -> list[int]:
        """Tokens that open `message`: the role header (content is ignored)."""
        return self._header(self._role(message))

    def encode_message(self, message: Message, tool_prompt_format: str = "json") -> list[int]:
        """Header, stripped content, tool call(s) (if any) and the closing token of one message.

        Built-in tool calls are written after `<|python_tag|>`: one code_interpreter call, or
        brave_search / wolfram_alpha / photogen calls, one per line (never mixed with custom
        calls). Custom calls are tagged too on a message whose stop_reason is "end_of_message";
        otherwise they follow the content, written in `tool_prompt_format` ("json",
        "python_list", "function_tag"; several calls in "json" are written as a python list, see
        `format_custom_tool_calls`).

        The closing token is the message's own: `<|eom_id|>` for stop_reason "end_of_message",
        `<|eot_id|>` for "end_of_turn", so a decoded message is re-encoded as it was generated.
        Without either (a message written by hand, or "out_of_tokens"), tagged calls end with
        `<|eom_id|>` as documented, everything else with `<|eot_id|>`.
        """
        role = self._role(message)
        tokens = self._header(role)
        content = message["content"]
        tokens += self._text(content.strip())
        calls = message.get("tool_calls") or []
        special = self.tokenizer.special_tokens
        if self.chatml:
            if calls:
                raise ValueError("tool calls are not supported in the chatml format")
            return tokens + [special["<|im_end|>"], *self._text("\n")]
        stop_reason = message.get("stop_reason")
        eom = stop_reason == "end_of_message"
        if calls:
            builtin = [c["tool_name"] for c in calls if is_builtin_tool(c["tool_name"])]
            if builtin and len(calls) > 1 and (len(builtin) < len(calls) or "code_interpreter" in builtin):
                raise ValueError(
                    f"a built-in tool call ({builtin[0]}) must be the only call of its message, got "
                    f"{len(calls)} (only brave_search, wolfram_alpha and photogen calls may share one)"
                )
            if tool_prompt_format not in TOOL_PROMPT_FORMATS:
                raise ValueError(f"unknown tool_prompt_format {tool_prompt_format!r}; valid: {TOOL_PROMPT_FORMATS}")
            tagged = eom or bool(builtin)
            if not tagged and content.strip():
                # Calls after prose: only <function=...> tags read back as calls there (JSON or a
                # list after prose stays text, see split_tool_calls), so a decoded message replays.
                tool_prompt_format = "function_tag"
            if tagged:
                tokens.append(self._required(self.tokenizer.python_tag_id, "python_tag"))
            if builtin:
                tokens += self._text("\n".join(format_tool_call(c) for c in calls))
            else:
                tokens += self._text(format_custom_tool_calls(calls, tool_prompt_format))
            eom = tagged and stop_reason != "end_of_turn"
        if eom:
            return tokens + [self._required(self.tokenizer.eom_id, "eom")]
        return tokens + [self._required(self.tokenizer.eot_id, "eot")]

    def encode_dialog_prompt(self, dialog: Dialog, tool_prompt_format: str = "json", *, index: int = 0) -> list[int]:
        """Whole dialog plus an open assistant header, ready for generation.

        The dialog is checked first (`validate_dialog`; errors name dialog `index` and the
        message). A dialog ending with an assistant message gets a new assistant header after it,
        as in Meta's ChatFormat.
        """
        self.validate_dialog(dialog, index)
        tokens: list[int] = []
        if not self.chatml and self.tokenizer.bos_id is not None:
            tokens.append(self.tokenizer.bos_id)
        default_system = self.tokenizer.default_system_prompt
        # Same as SmolLM2-Instruct's HF chat template: a default system turn unless one leads.
        if self.chatml and default_system and dialog[0].get("role") != "system":
            tokens += self.encode_message({"role": "system", "content": default_system})
        for message in dialog:
            tokens += self.encode_message(message, tool_prompt_format)
        return tokens + self._header("assistant")

    def decode_assistant_message(self, tokens: Sequence[int]) -> Message:
        """Generated tokens (stop token included if any) -> assistant Message; see tool_calls."""
        return decode_assistant_message(self.tokenizer, tokens, parse_tool_calls=not self.chatml)

    def _role(self, message: Message) -> str:
        return check_message(message, self.roles, f"message (chat format {self.tokenizer.chat_format!r})")

    def _header(self, role: str) -> list[int]:
        special = self.tokenizer.special_tokens
        if self.chatml:
            return [special["<|im_start|>"], *self._text(f"{role}\n")]
        return [special["<|start_header_id|>"], *self._text(role),
                special["<|end_header_id|>"], *self._text("\n\n")]  # fmt: skip

    def _text(self, s: str) -> list[int]:
        # special-token text in content stays plain text: no control-token injection
        return self.tokenizer.encode(s, bos=False, eos=False)

    def _required(self, token_id: int | None, what: str) -> int:
        if token_id is None:
            raise ValueError(f"this tokenizer has no {what} token, which the message needs")
        return token_id
