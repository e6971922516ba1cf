"""What int8 weights (llama/quantize.py) cost in accuracy on a real model: the demo model
(SmolLM2-135M-Instruct), bf16 against int8 with and without the output layer quantized.

Prints the perplexity of a fixed English text of at least 2,000 tokens (this repository's own
docs, written by us: docs/download.md, docs/models.md, docs/parallel.md, docs/tokenizer.md, in
that order, cut at 2,048 tokens) and the greedy answers to the example dialogs.

    python benchmarks/int8_accuracy.py
"""

import math
from pathlib import Path

import torch

from llama.generation import Llama
from llama.demo import default_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["docs/download.md", "docs/models.md", "docs/parallel.md", "docs/tokenizer.md"]
TOKENS = 2048
DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Always answer with Haiku"}, {"role": "user", "content": "I am going to Paris, what should I see?"}],
    [{"role": "user", "content": "What is 12 times 7?"}],
    [{"role": "system", "content": "Always answer with emojis"}, {"role": "user", "content": "How to go from Beijing to NY?"}],
]


@torch.no_grad()
def perplexity(llama: Llama, ids: list[int], window: int = 512) -> float:
    """exp(mean negative log-likelihood) over ``ids``, in independent windows of ``window`` tokens."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window + 1]])
        logits = llama.model(chunk[:, :-1]).float()
        logp = torch.log_softmax(logits, -1)
        nll -= logp.gather(-1, chunk[:, 1:, None]).sum().item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def main() -> None:
    ckpt = default_checkpoint()
    text = "\n\n".join((ROOT / d).read_text() for d in DOCS)
    rows = []
    answers: dict[str, list[str]] = {}
    for name, quantize, keep_output in (("bf16", None, False), ("int8", "int8", False), ("int8, output bf16", "int8", True)):
        llama = Llama.build(str(ckpt), max_seq_len=600, max_batch_size=1, quantize=None if keep_output else quantize, verify=False)
        if keep_output:
            from llama.fast import speed_up
            from llama.quantize import quantize_model

            quantize_model(llama.model, keep_output=True)
            speed_up(llama.model)
        ids = llama.tokenizer.encode(text, bos=True, eos=False)[:TOKENS]
        assert len(ids) == TOKENS, f"the docs hold only {len(ids)} tokens"
        rows.append((name, perplexity(llama, ids)))
        answers[name] = [
            r["generation"]["content"].replace("\n", " ")[:90]
            for r in (llama.chat_completion([d], temperature=0.0, max_gen_len=48)[0] for d in DIALOGS)
        ]
    base = rows[0][1]
    print(f"perplexity of {TOKENS} tokens of docs/*.md, SmolLM2-135M-Instruct")
    print("| weights | perplexity | vs bf16 |\n|---|---|---|")
    for name, ppl in rows:
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% |")
    print("\ngreedy answers (first 90 characters)")
    for i, d in enumerate(DIALOGS):
        print(f"- {d[-1]['content']}")
        for name in answers:
            same = "" if name == "bf16" else (" (same as bf16)" if answers[name][i] == answers["bf16"][i] else "")
            print(f"  - {name}: {answers[name][i]!r}{same}")


if __name__ == "__main__":
    main()
