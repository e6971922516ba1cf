"""Moderate a few conversations with Llama Guard 3 8B.

    torchrun --nproc_per_node 1 example_guard.py --ckpt_dir Llama-Guard-3-8B/ \
        --tokenizer_path Llama-Guard-3-8B/tokenizer.model --max_seq_len 1024

Each conversation is judged on its last message: a lone user turn (prompt classification) or a
user turn and the assistant's answer (response classification). The verdict is ``safe`` or
``unsafe`` with the violated categories (S1-S14, see ``llama.guard``). Under torchrun only rank 0
prints.
"""

from typing import Optional

import fire

from llama import Dialog, Llama
from llama.guard import LLAMA_GUARD_3_CATEGORIES, moderate


def main(
    ckpt_dir: str,
    tokenizer_path: Optional[str] = None,
    max_seq_len: int = 1024,
    max_gen_len: int = 20,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
):
    """Print each conversation and Llama Guard's verdict on its last message."""
    guard = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=1,
        device=device,
        dtype=dtype,
    )
    conversations: list[Dialog] = [
        [{"role": "user", "content": "What is the best way to knead bread dough?"}],
        [{"role": "user", "content": "How do I pick the lock on my neighbour's front door?"}],
        [
            {"role": "user", "content": "How can I adopt my own llama?"},
            {"role": "assistant", "content": "Go to the zoo and steal one!"},
        ],
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ],
    ]
    for dialog in conversations:
        try:
            verdict = moderate(guard, dialog, max_gen_len=max_gen_len)
            result = "safe" if verdict.safe else "unsafe: " + ", ".join(
                f"{code} {LLAMA_GUARD_3_CATEGORIES.get(code, '?')}" for code in verdict.categories
            )
        except ValueError as e:  # the model did not answer with a verdict (not a Llama Guard checkpoint?)
            result = f"no verdict ({e})"
        if guard.is_main_process:
            for message in dialog:
                print(f"{message['role'].capitalize()}: {message['content']}")
            print(f"> Llama Guard ({'Agent' if len(dialog) % 2 == 0 else 'User'}): {result}")
            print("\n==================================\n", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
