"""Named types shared by the tokenizer, chat format, tool calling and generation (Meta's names)."""

from typing import Any, List, Literal, TypedDict

# "tool" is llama-models' newer name for "ipython" (tool results); both encode as ipython.
Role = Literal["system", "user", "assistant", "ipython", "tool"]

# Why generation stopped: on <|eot_id|> (or <|end_of_text|>), on <|eom_id|> (the model expects a
# tool result next), or because the token budget ran out.
StopReason = Literal["end_of_turn", "end_of_message", "out_of_tokens"]


class ToolCall(TypedDict):
    """One tool invocation requested by the assistant."""

    call_id: str  # unique per call (a uuid4 string), so a result can name the call it answers
    tool_name: str  # "brave_search", "wolfram_alpha", "photogen", "code_interpreter" or custom
    arguments: dict[str, Any]  # code_interpreter: {"code": "..."}


class _MessageRequired(TypedDict):
    role: Role
    content: str


class Message(_MessageRequired, total=False):
    """A chat message; `tool_calls` and `stop_reason` are only present on assistant messages."""

    tool_calls: List[ToolCall]
    stop_reason: StopReason


Dialog = List[Message]


class CompletionPrediction(TypedDict, total=False):
    """Result of `text_completion`; `tokens` and `logprobs` only when logprobs were requested."""

    generation: str
    tokens: List[str]
    logprobs: List[float]


class ChatPrediction(TypedDict, total=False):
    """Result of `chat_completion`; `tokens` and `logprobs` only when logprobs were requested."""

    generation: Message
    tokens: List[str]
    logprobs: List[float]
