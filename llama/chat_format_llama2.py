"""Dialog -> prompt token ids in the Llama 2 chat format (``[INST]`` ... ``[/INST]``).

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user2} [/INST]

The layout of Meta's Llama 2 reference (``chat_completion``), restated:
- an optional system message comes first and is folded into the first user message, wrapped in
  ``<<SYS>>\\n`` ... ``\\n<</SYS>>\\n\\n``;
- then user and assistant alternate, starting and ending with user;
- each answered turn is the text ``[INST] {user} [/INST] {answer} `` (contents stripped; note the
  trailing space) encoded with BOS and EOS; the open last turn is ``[INST] {user} [/INST]`` with
  BOS and no EOS. The model answers, then emits EOS (id 2), its only stop token.

BOS/EOS are ids, never text: "</s>" typed in a message is encoded as the characters. Meta refuses
dialogs whose content contains the format's own tags (``[INST]``, ``[/INST]``, ``<<SYS>>``,
``<</SYS>>``), which would fake turn boundaries; so do we, with a ValueError naming the tag.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from llama.datatypes import Dialog, Message
from llama.tool_calls import decode_assistant_message

if TYPE_CHECKING:
    from llama.sp_tokenizer import SentencePieceTokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
FORMAT_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
LLAMA2_ROLES = ("system", "user", "assistant")


class Llama2ChatFormat:
    """Encodes dialogs for Llama 2 chat models; the same interface as ``ChatFormat`` for generation."""

    roles = LLAMA2_ROLES

    def __init__(self, tokenizer: "SentencePieceTokenizer"):
        if tokenizer.bos_id is None:
            raise ValueError("the Llama 2 chat format needs a tokenizer with a BOS token")
        self.tokenizer = tokenizer

    def encode_dialog_prompt(self, dialog: Dialog, *, index: int = 0) -> list[int]:
        """Whole dialog, its last user turn left open for the assistant's answer.

        Errors from ``turns`` are prefixed with "dialog ``index``" (its place in the batch)."""
        try:
            turns = self.turns(dialog)
        except ValueError as e:
            raise ValueError(f"dialog {index}, {e}") from None
        tokens: list[int] = []
        for user, answer in zip(turns[:-1:2], turns[1::2]):
            tokens += self.tokenizer.encode(f"{B_INST} {user} {E_INST} {answer} ", bos=True, eos=True)
        return tokens + self.tokenizer.encode(f"{B_INST} {turns[-1]} {E_INST}", bos=True, eos=False)

    def turns(self, dialog: Dialog) -> list[str]:
        """Stripped user/assistant contents in order, the system prompt folded into the first user turn.

        Raises ValueError for a role other than system/user/assistant, a system message that is not
        first, turns that do not alternate user/assistant starting and ending with user, and
        content containing one of the format's tags.
        """
        if not isinstance(dialog, (list, tuple)) or not dialog:
            raise ValueError("empty dialog: give at least one user message")
        for j, m in enumerate(dialog):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {j}: expected {{'role': ..., 'content': str}}, got {m!r}")
            if m.get("role") not in LLAMA2_ROLES:
                raise ValueError(f"message {j}: role {m.get('role')!r} is not one of {LLAMA2_ROLES} (Llama 2 chat)")
            if tag := next((t for t in FORMAT_TAGS if t in m["content"]), None):
                raise ValueError(
                    f"message {j} contains {tag!r}: Llama 2 chat does not allow its format tags "
                    f"{list(FORMAT_TAGS)} inside content (they would fake turn boundaries)"
                )
        messages = list(dialog)
        system = None
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        for j, m in enumerate(messages):
            want = "user" if j % 2 == 0 else "assistant"
            if m["role"] != want:
                raise ValueError(
                    f"message {j + (system is not None)}: expected {want}, got {m['role']}; Llama 2 chat "
                    f"takes an optional system message, then user and assistant alternating, ending with user"
                )
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("the last message must be from user: the assistant answers next")
        contents = [m["content"] for m in messages]
        if system is not None:
            contents[0] = B_SYS + system + E_SYS + contents[0]
        return [c.strip() for c in contents]

    def decode_assistant_message(self, tokens: Sequence[int]) -> Message:
        """Generated tokens (EOS included if it stopped) -> assistant Message with ``stop_reason``."""
        return decode_assistant_message(self.tokenizer, tokens, parse_tool_calls=False)
