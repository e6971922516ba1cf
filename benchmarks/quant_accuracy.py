"""What quantized weights cost in accuracy on a real model: the demo model (SmolLM2-135M-Instruct),
bf16 against int8 (llama/quantize/) with and without the output layer quantized, int4
(llama/quantize/int4.py: only the layers whose shapes torch's int4 kernels take, here w2 and the
output layer: the model's width, 576, is not a multiple of the group of 128) and FP8 (llama/fp8.py:
Meta's recipe, w1 w3 w2 of every layer but the first and the last, activations rounded to FP8 per
row; multiplied on the CPU by torch's _scaled_mm, where torch 2.13 takes row-wise scales).

Prints the perplexity of a fixed English text of at least 2,000 tokens (this repository's own
docs, written by us: docs/download.md, docs/models.md, docs/parallel.md, docs/tokenizer.md, in
that order, cut at 2,048 tokens), computed two ways: 512-token windows at once (the prompt path:
torch's matmuls) and the same windows one token a step (the decode path: our kernels on x86-64),
and the greedy answers to the example dialogs.

    python benchmarks/quant_accuracy.py
"""

import math
from pathlib import Path

import torch

from llama import fp8
from llama.demo import default_checkpoint
from llama.fast import speed_up
from llama.generation import Llama
from llama.quantize import quantize_model

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


@torch.no_grad()
def decode_perplexity(llama: Llama, ids: list[int], window: int = 512) -> float:
    """``perplexity`` with the tokens fed one at a time through the KV cache, as decoding runs: on
    x86-64 CPUs each step's products go through our kernels (int8: x rounded to int16 per block of
    32, llama/csrc/int8_matvec.c), where a whole window at once goes through torch's matmuls."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        for pos in range(len(chunk) - 1):
            logits = llama.model(torch.tensor([[chunk[pos]]]), pos).float()
            nll -= torch.log_softmax(logits[0, -1], -1)[chunk[pos + 1]].item()
            count += 1
    return math.exp(nll / count)


def main() -> None:
    ckpt = default_checkpoint()
    text = "\n\n".join((ROOT / d).read_text() for d in DOCS)
    rows = []
    answers: dict[str, list[str]] = {}
    for name in ("bf16", "int8", "int8, output bf16", "int4", "fp8"):
        quantize = {"int8": "int8", "int4": "int4"}.get(name)
        llama = Llama.build(str(ckpt), max_seq_len=600, max_batch_size=1, quantize=quantize, verify=False)
        if name == "int8, output bf16":
            quantize_model(llama.model, keep_output=True)
            speed_up(llama.model)
        elif name == "fp8":  # quantize="fp8" is for GPUs that multiply FP8; the same arithmetic here
            fp8.quantize_feed_forward(llama.model)
        ids = llama.tokenizer.encode(text, bos=True, eos=False)[:TOKENS]
        assert len(ids) == TOKENS, f"the docs hold only {len(ids)} tokens"
        rows.append((name, perplexity(llama, ids), decode_perplexity(llama, ids)))
        answers[name] = [
            r["generation"]["content"].replace("\n", " ")[:90]
            for r in (llama.chat_completion([d], temperature=0.0, max_gen_len=48)[0] for d in DIALOGS)
        ]
    base = rows[0][1]
    print(f"perplexity of {TOKENS} tokens of docs/*.md, SmolLM2-135M-Instruct")
    dbase = rows[0][2]
    print("| weights | perplexity, 512-token windows | vs bf16 | the same one token a step (decode kernels) | vs bf16 |")
    print("|---|---|---|---|---|")
    for name, ppl, dppl in rows:
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {dppl:.3f} | {100 * (dppl / dbase - 1):+.2f}% |")
    print("\ngreedy answers (first 90 characters)")
    for i, d in enumerate(DIALOGS):
        print(f"- {d[-1]['content']}")
        for name in answers:
            same = "" if name == "bf16" else (" (same as bf16)" if answers[name][i] == answers["bf16"][i] else "")
            print(f"  - {name}: {answers[name][i]!r}{same}")


if __name__ == "__main__":
    main()
