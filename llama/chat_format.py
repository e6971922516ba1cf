"""Dialog -> prompt token ids, in the Llama 3 chat format (or ChatML for generic tokenizers).

Llama 3: `<|begin_of_text|>`, then per message
`<|start_header_id|>{role}<|end_header_id|>\\n\\n{content stripped}<|eot_id|>`, then an open
`<|start_header_id|>assistant<|end_header_id|>\\n\\n` for the model to continue.
ChatML: per message `<|im_start|>{role}\\n{content stripped}<|im_end|>\\n`, then an open
`<|im_start|>assistant\\n`; no BOS.

Framing tokens are inserted as ids; message content is always encoded as plain text, so a
user typing "<|eot_id|>" gets the characters, never the control token.
"""

from __future__ import annotations

from typing import Sequence

from .datatypes import Dialog, Message
from .tokenizer import Tokenizer
from .tool_calls import decode_assistant_message, format_tool_call, is_builtin_tool

LLAMA3_ROLES = ("system", "user", "assistant", "ipython")
CHATML_ROLES = ("system", "user", "assistant")


class ChatFormat:
    """Encodes messages and dialogs for `tokenizer.chat_format` ("llama3" or "chatml")."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.chatml = tokenizer.chat_format == "chatml"
        self.roles = CHATML_ROLES if self.chatml else LLAMA3_ROLES

    def encode_header(self, message: Message) -> list[int]:
        """Tokens that open `message`: the role header (content is ignored)."""
        role = self._role(message)
        special = self.tokenizer.special_tokens
        if self.chatml:
            return [special["<|im_start|>"], *self._text(f"{role}\n")]
        return [special["<|start_header_id|>"], *self._text(role),
                special["<|end_header_id|>"], *self._text("\n\n")]  # fmt: skip

    def encode_message(self, message: Message) -> list[int]:
        """Header, stripped content, tool call (if any) and the closing token of one message.

        An assistant message with a built-in tool call ends
        `<|python_tag|>{call}<|eom_id|>`, as does any tool call on a message whose stop_reason is
        "end_of_message"; a custom (JSON) tool call ends with `<|eot_id|>`. At most one tool call
        per message (Llama 3.1 makes one call per turn).
        """
        tokens = self.encode_header(message)
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message content must be a str, got {type(content).__name__}")
        tokens += self._text(content.strip())
        calls = message.get("tool_calls") or []
        special = self.tokenizer.special_tokens
        if self.chatml:
            if calls:
                raise ValueError("tool calls are not supported in the chatml format")
            return tokens + [special["<|im_end|>"], *self._text("\n")]
        if calls and message["role"] != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {message['role']!r}")
        if len(calls) > 1:
            raise ValueError(f"one tool call per message is supported, got {len(calls)}")
        eom = message.get("stop_reason") == "end_of_message"
        if calls:
            call = calls[0]
            tagged = eom or is_builtin_tool(call["tool_name"])
            if not tagged and content.strip():
                raise ValueError("a custom (JSON) tool call cannot follow content in one message")
            if tagged:
                tokens.append(self._required(self.tokenizer.python_tag_id, "python_tag"))
            tokens += self._text(format_tool_call(call))
            eom = tagged
        if eom:
            return tokens + [self._required(self.tokenizer.eom_id, "eom")]
        return tokens + [self._required(self.tokenizer.eot_id, "eot")]

    def encode_dialog_prompt(self, dialog: Dialog) -> list[int]:
        """Whole dialog plus an open assistant header, ready for generation."""
        tokens: list[int] = []
        if not self.chatml and self.tokenizer.bos_id is not None:
            tokens.append(self.tokenizer.bos_id)
        default_system = self.tokenizer.default_system_prompt
        # Same as SmolLM2-Instruct's HF chat template: a default system turn unless one leads.
        if self.chatml and default_system and dialog and dialog[0].get("role") != "system":
            tokens += self.encode_message({"role": "system", "content": default_system})
        for message in dialog:
            tokens += self.encode_message(message)
        return tokens + self.encode_header({"role": "assistant", "content": ""})

    def decode_assistant_message(self, tokens: Sequence[int]) -> Message:
        """Generated tokens (stop token included if any) -> assistant Message; see tool_calls."""
        return decode_assistant_message(self.tokenizer, tokens, parse_tool_calls=not self.chatml)

    def _role(self, message: Message) -> str:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in self.roles:
            fmt = self.tokenizer.chat_format
            raise ValueError(f"invalid role {role!r} for chat format {fmt!r}; valid: {self.roles}")
        return role

    def _text(self, s: str) -> list[int]:
        # special-token text in content stays plain text: no control-token injection
        return self.tokenizer.encode(s, bos=False, eos=False)

    def _required(self, token_id: int | None, what: str) -> int:
        if token_id is None:
            raise ValueError(f"this tokenizer has no {what} token, which the message needs")
        return token_id
