"""Where a batch-1 decode step's time goes: each product class alone against the whole step.

    python benchmarks/step_profile.py [CKPT_DIR] [--rounds 6]

CKPT_DIR (default: the 1B-shape checkpoint ``bench.py`` wrote, /tmp/llama-bench/...) is built as
``Llama.build`` builds it (huge pages, the fused step). Each round, in turn: ``bench.py``'s
read-only pass over 1 GiB in huge pages (the machine's floor this minute: its bandwidth moves from
minute to minute on a shared VM);
one-token steps of the model's forward at position 512 (median of 8); then each weight class of all
layers through our kernel for one row (``native.kernels().matvec``, with the loop ``Llama.build``
chose, 2 threads: what the fused step runs per layer), layer after layer, so the bytes come from memory as in a step. Prints, per round and
class, ms and GB/s of weights, and each as a share of the read-only pass; the step's time not
spent in the products is attention, norms, the layers' barriers, and the call's Python.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama  # noqa: E402,F401  first: OpenMP's wait policy (llama/openmp.py)
import torch  # noqa: E402

from bench import bandwidth  # noqa: E402
from load import cpu_description  # noqa: E402
from llama import native  # noqa: E402
from llama.generation import Llama  # noqa: E402

DEFAULT = Path("/tmp/llama-bench/llama3.2-1b-bfloat16-seed0/meta")
CLASSES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dir", nargs="?", type=Path, default=DEFAULT)
    p.add_argument("--rounds", type=int, default=6)
    a = p.parse_args()
    if not (a.ckpt_dir / "params.json").is_file():
        raise SystemExit(f"{a.ckpt_dir}: no checkpoint there (python benchmarks/bench.py --shapes llama3.2-1b writes one)")
    llm = Llama.build(str(a.ckpt_dir), max_seq_len=640, max_batch_size=1, device="cpu", verify=False)
    model, matvec = llm.model, native.kernels().matvec
    weights = {c: [model.get_submodule(f"layers.{i}.{c}").weight for i in range(len(model.layers))] for c in CLASSES}
    weights["output"] = [model.output.weight]
    if any(w.dtype != torch.bfloat16 for ws in weights.values() for w in ws):
        raise SystemExit("this profile is for bf16 weights")
    tok = torch.tensor([[5]])
    name, flags = cpu_description()
    print(f"CPU: {name}; SIMD: {' '.join(f for f in flags.split() if f.startswith(('avx', 'amx', 'fma')))}")
    print(f"{a.ckpt_dir}: {sum(w.numel() * 2 for ws in weights.values() for w in ws) / 1e9:.2f} GB of bf16 products a token")
    with torch.inference_mode():
        model(torch.full((1, 512), 7), 0, last_only=True)  # a 512-token prompt: the cache as in bench.py
        rows = []
        for r in range(a.rounds):
            floor = bandwidth("cpu", repeats=3, copy=False)[0]  # as bench.py reads it: 1 GiB in huge pages
            step = statistics.median(_timed(lambda: model(tok, 512, last_only=True)) for _ in range(8))
            parts = {}
            for c, ws in weights.items():
                x = torch.randn(1, ws[0].shape[1]).to(torch.bfloat16)
                parts[c] = min(_timed(lambda: [matvec(x, w) for w in ws]) for _ in range(2))
            rows.append((floor, step, parts))
            print(f"round {r}: read-only {floor:.1f} GB/s, step {step * 1e3:.1f} ms", flush=True)
    print("\n| class | GB a token | " + " | ".join(f"round {i}: ms / GB/s / % of read-only" for i in range(len(rows))) + " |")
    print("|---|---|" + "---|" * len(rows))
    for c, ws in weights.items():
        nbytes = sum(w.numel() * 2 for w in ws)
        cells = [f"{parts[c] * 1e3:.1f} / {nbytes / parts[c] / 1e9:.1f} / {nbytes / parts[c] / 1e9 / floor:.0%}" for floor, _, parts in rows]
        print(f"| {c} | {nbytes / 1e9:.3f} | " + " | ".join(cells) + " |")
    total = sum(w.numel() * 2 for ws in weights.values() for w in ws)
    print("| all products | " + f"{total / 1e9:.3f} | " + " | ".join(
        f"{sum(parts.values()) * 1e3:.1f} / {total / sum(parts.values()) / 1e9:.1f} / {total / sum(parts.values()) / 1e9 / floor:.0%}"
        for floor, _, parts in rows) + " |")
    print("| the step (forward) | " + f"{total / 1e9:.3f} | " + " | ".join(
        f"{step * 1e3:.1f} / {total / step / 1e9:.1f} / {total / step / 1e9 / floor:.0%}" for floor, step, _ in rows) + " |")
    print("| the step's ms at the read-only speed | | " + " | ".join(f"{total / floor / 1e6:.1f}" for floor, _, _ in rows) + " |")


if __name__ == "__main__":
    main()
