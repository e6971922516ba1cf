"""A research script in the style of meta-llama/llama3's examples, using only names that code written
for Meta's repository uses (ours are thin aliases). tests/test_meta_compat.py runs it unchanged.

    python tests/scripts/meta_style_research.py --ckpt_dir DIR --tokenizer_path DIR/tokenizer.model
"""

from typing import List, Optional

import fire
import torch

from llama import Dialog, Llama
from llama.generation import sample_top_p
from llama.tokenizer import ChatFormat, Tokenizer


def main(
    ckpt_dir: str,
    tokenizer_path: str,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = 8,
):
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
    )
    params = generator.model.params
    print(f"model: dim={params.dim} n_layers={params.n_layers} n_heads={params.n_heads} "
          f"max_seq_len={params.max_seq_len} max_batch_size={params.max_batch_size}")

    dialogs: List[Dialog] = [
        [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
        [
            {"role": "user", "content": "I am going to Paris, what should I see?"},
            {"role": "user", "content": "Keep it short."},  # two user turns in a row
        ],
        [
            {"role": "user", "content": "Continue my answer."},
            {"role": "assistant", "content": "The Eiffel Tower is"},  # scoring/continuing a turn
        ],
        [
            {"role": "user", "content": "Hi"},
            {"role": "system", "content": "Always answer with emojis"},  # system not first
            {"role": "user", "content": "How to go from Beijing to NY?"},
        ],
    ]
    results = generator.chat_completion(dialogs, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    for dialog, result in zip(dialogs, results):
        for msg in dialog:
            print(f"{msg['role'].capitalize()}: {msg['content']}\n")
        print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        print("\n==================================\n")

    # The prompt the chat API fed the model, rebuilt with Meta's class names.
    tokenizer: Tokenizer = generator.tokenizer
    formatter = ChatFormat(tokenizer)
    prompt = formatter.encode_dialog_prompt(dialogs[0])
    assert prompt[0] == tokenizer.bos_id and len(prompt) < params.max_seq_len
    print(f"prompt tokens: {len(prompt)}; stop tokens: {sorted(tokenizer.stop_tokens)}")

    # A hand-written sampling loop, as research code does with Meta's model and sample_top_p.
    tokens = torch.tensor([prompt], dtype=torch.long)
    with torch.inference_mode():
        logits = generator.model(tokens, 0)
        probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
        next_token = sample_top_p(probs, top_p)
    next_token = next_token.reshape(-1)
    print(f"sampled next token: {int(next_token[0])} ({tokenizer.decode(next_token.tolist())!r})")

    completions = generator.text_completion(["I believe the meaning of life is"], max_gen_len=max_gen_len,
                                            temperature=temperature, top_p=top_p, logprobs=True)  # fmt: skip
    for c in completions:
        print(f"> {c['generation']!r} logprobs={[round(x, 3) for x in c['logprobs']]}")


if __name__ == "__main__":
    fire.Fire(main)
