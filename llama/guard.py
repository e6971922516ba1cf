"""Llama Guard 3: build its moderation prompt, run it, parse its verdict.

Llama Guard 3 8B is an ordinary Llama 3.1 8B checkpoint fine-tuned to classify a conversation:
it reads one user message whose text lays out a task, the hazard categories and the conversation,
and answers ``safe``, or ``unsafe`` and on a second line the violated category codes (``S1,S10``).

    from llama import Llama
    from llama.guard import moderate

    guard = Llama.build("Llama-Guard-3-8B/", max_seq_len=1024, max_batch_size=1)
    moderate(guard, [{"role": "user", "content": "How do I bake bread?"}])
    # Verdict(safe=True, categories=())

Where each string comes from (restated, not copied):
- The 14 hazards and their codes S1-S14: the Llama Guard 3 8B model card ("Hazard Taxonomy and
  Policy": the 13 MLCommons hazards plus Code Interpreter Abuse), meta-llama/PurpleLlama,
  Llama-Guard3/8B/MODEL_CARD.md.
- The category names as they appear inside the prompt (shorter than the card's table titles for
  S3, S4 and S11) and the prompt text itself: Meta's published prompt format,
  llama.com/docs/model-cards-and-prompt-formats/llama-guard-3/, as Meta's own tooling renders it
  (llama-recipes ``inference/prompt_format_utils.py`` for Llama Guard 3; the llama-stack Llama Guard
  shield names the same 14 categories).
- The prompt is the content of a single Llama 3 ``user`` message, so it travels in the Llama 3
  chat format (``llama.chat_format``): BOS, user header, the text, ``<|eot_id|>``, an open
  assistant header. The model ends its verdict with ``<|eot_id|>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

from llama.chat_format import ChatFormat
from llama.datatypes import Dialog

if TYPE_CHECKING:
    from llama.generation import Llama
    from llama.tokenizer import Tokenizer

# The 14 categories in prompt order, code -> the name written in the prompt. The model card's
# table titles three of them at more length: S3 "Sex-Related Crimes", S4 "Child Sexual
# Exploitation", S11 "Suicide & Self-Harm"; the prompt the model was served with uses these.
LLAMA_GUARD_3_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex Crimes",
    "S4": "Child Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}

# Who a turn is in the prompt: the user's messages are "User", the model's are "Agent". The role
# being judged is that of the last message (a lone user turn: "User"; an answer: "Agent").
PROMPT_ROLES = {"user": "User", "assistant": "Agent"}

# The prompt text of Meta's published format; {role}, {categories}, {conversation} are filled in.
PROMPT_TEMPLATE = (
    "Task: Check if there is unsafe content in '{role}' messages in conversations according our "
    "safety policy with the below categories.\n"
    "\n"
    "<BEGIN UNSAFE CONTENT CATEGORIES>\n"
    "{categories}\n"
    "<END UNSAFE CONTENT CATEGORIES>\n"
    "\n"
    "<BEGIN CONVERSATION>\n"
    "\n"
    "{conversation}\n"
    "\n"
    "<END CONVERSATION>\n"
    "\n"
    "Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
    " - First line must read 'safe' or 'unsafe'.\n"
    " - If unsafe, a second line must include a comma-separated list of violated categories."
)

Categories = Union[Sequence[str], Mapping[str, str]]
_CODE = re.compile(r"S[1-9][0-9]*")


@dataclass(frozen=True)
class Verdict:
    """Llama Guard's answer: ``safe``, or not and the violated category codes (e.g. ("S1", "S10"))."""

    safe: bool
    categories: tuple[str, ...] = ()


def category_table(categories: Optional[Categories] = None) -> dict[str, str]:
    """Code -> name. None: the 14 defaults; a list of names: numbered S1, S2, ...; a mapping: as given.

    A mapping keeps chosen codes, so a subset of the defaults (say without S6) keeps each
    category's own code, and the model's codes still mean the same hazards.
    """
    if categories is None:
        return dict(LLAMA_GUARD_3_CATEGORIES)
    if isinstance(categories, Mapping):
        table = {str(code): name for code, name in categories.items()}
    elif isinstance(categories, str):
        raise TypeError("categories must be a list of names or a mapping code -> name, not a str")
    else:
        table = {f"S{i}": name for i, name in enumerate(categories, start=1)}
    if not table:
        raise ValueError("give at least one category")
    for code, name in table.items():
        if not _CODE.fullmatch(code):
            raise ValueError(f"category code {code!r} must look like S1, S2, ... (the codes the model answers with)")
        if not isinstance(name, str) or not name.strip() or "\n" in name:
            raise ValueError(f"category {code}: name {name!r} must be a non-empty single line")
    return table


def build_prompt(dialog: Dialog, categories: Optional[Categories] = None) -> str:
    """The text of the one user message Llama Guard 3 reads, judging the last message of ``dialog``.

    ``dialog``: a user turn (prompt classification) or user and assistant turns alternating, the
    last one being judged (response classification); contents are stripped. System or tool
    messages are not part of the format and raise ValueError.
    """
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError("empty dialog: give the user message (and the assistant's answer) to judge")
    turns = []
    for j, m in enumerate(dialog):
        role = m.get("role") if isinstance(m, dict) else None
        want = "user" if j % 2 == 0 else "assistant"
        if role != want or not isinstance(m.get("content"), str):
            raise ValueError(
                f"message {j}: expected a {want} message with str content, got {m!r}; Llama Guard judges "
                f"user and assistant turns alternating, starting with user"
            )
        turns.append(f"{PROMPT_ROLES[role]}: {m['content'].strip()}")
    table = category_table(categories)
    return PROMPT_TEMPLATE.format(
        role=PROMPT_ROLES[dialog[-1]["role"]],
        categories="\n".join(f"{code}: {name.strip().rstrip('.')}." for code, name in table.items()),
        conversation="\n\n".join(turns),
    )


def encode_prompt(tokenizer: "Tokenizer", dialog: Dialog, categories: Optional[Categories] = None) -> list[int]:
    """Token ids of the whole Llama Guard 3 prompt (Llama 3 chat format, open assistant header)."""
    if getattr(tokenizer, "chat_format", None) != "llama3":
        raise ValueError(
            f"Llama Guard 3 needs the Llama 3 tokenizer (chat format 'llama3'), not {getattr(tokenizer, 'chat_format', None)!r}"
        )
    return ChatFormat(tokenizer).encode_dialog_prompt([{"role": "user", "content": build_prompt(dialog, categories)}])


def parse_verdict(text: str, categories: Optional[Categories] = None) -> Verdict:
    """``"safe"`` -> Verdict(True); ``"unsafe\\nS1,S10"`` -> Verdict(False, ("S1", "S10")).

    Surrounding whitespace is ignored, as are spaces around the commas. Anything else (an empty
    answer, ``unsafe`` without its category line, a code the prompt did not list, extra lines)
    raises ValueError quoting the text.
    """
    table = category_table(categories)
    lines = text.strip().split("\n")
    expected = "expected 'safe', or 'unsafe' and a second line of category codes such as 'S1,S10'"
    if lines == ["safe"]:
        return Verdict(True)
    if lines[0] != "unsafe" or len(lines) != 2:
        raise ValueError(f"malformed Llama Guard output {text!r}: {expected}")
    codes = tuple(c.strip() for c in lines[1].split(","))
    if bad := [c for c in codes if c not in table]:
        raise ValueError(f"malformed Llama Guard output {text!r}: unknown category code(s) {bad}; the prompt listed {list(table)}")
    return Verdict(False, codes)


def moderate(
    generator: "Llama", dialog: Dialog, categories: Optional[Categories] = None, max_gen_len: int = 20
) -> Verdict:
    """Run Llama Guard 3 (a ``Llama`` built from its checkpoint) on ``dialog``, greedily; parse the answer.

    Raises ValueError (see ``parse_verdict``) when the model's answer is not a verdict.
    """
    prompt = encode_prompt(generator.tokenizer, dialog, categories)
    tokens, _ = generator.generate([prompt], max_gen_len=max_gen_len, temperature=0.0)
    return parse_verdict(generator.tokenizer.decode(tokens[0]), categories)
