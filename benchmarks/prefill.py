"""Prefill through each of torch's paths for bf16 weights, and through the one the probe picks.

The Llama 3.2 1B shape with random bf16 weights (``llama.checkpoint.random_state_dict``), one
512-token prompt at batch 1, ``model(tokens, 0, last_only=True)`` as ``Llama.generate`` runs it
(seconds to the first token's logits). Paths: torch's bf16 matmuls (``FastLinear`` compute dtype
None), float32 products of widened weights (compute dtype float32), and the prompt path that
``llama.fast.measure_prompt_path`` measures in this process (``speed_up``'s rule, without its cache).
The probe and each prefill run with the threads ``Llama.generate`` would use (``CpuThreads``: fewer
while other processes hold cores). The paths take turns in each repetition; the best of each is
printed with lscpu's model and flags and the load average. ``ONEDNN_MAX_CPU_ISA=AVX2`` runs torch's matmuls as on a CPU without AVX-512.

    python benchmarks/prefill.py [--reps 3] [--prompt-len 512] [--threads 2]
"""

import argparse
import os
import time

import torch

from bench import SHAPES
from kernels import cpu_description
from llama import fast
from llama.checkpoint import random_state_dict
from llama.devices import CpuThreads
from llama.model import Transformer

LLAMA_32_1B = SHAPES["llama3.2-1b"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    machine = cpu_description()
    model = Transformer(LLAMA_32_1B, device="meta")
    model.load_state_dict(random_state_dict(LLAMA_32_1B, dtype=torch.bfloat16), strict=True, assign=True)
    model.setup_cache(1, a.prompt_len)
    model.eval()
    tokens = torch.randint(0, LLAMA_32_1B.vocab_size, (1, a.prompt_len), generator=torch.Generator().manual_seed(0))
    threads = CpuThreads(every=1)
    threads.adjust()
    start = time.perf_counter()
    picked = fast.measure_prompt_path()
    probe_s, probe_threads = time.perf_counter() - start, torch.get_num_threads()
    paths = {"torch bf16 matmuls": None, "float32, widened weights": torch.float32,
             f"probe's pick ({picked})": fast.PROMPT_PATHS[picked]}  # fmt: skip
    best = dict.fromkeys(paths, (float("inf"), 0))  # (seconds, threads) of each path's best prefill
    with torch.inference_mode():
        for rep in range(a.reps + 1):  # the first round warms up
            for name, dtype in paths.items():
                fast.apply_fast_paths(model, dtype)
                n = threads.adjust()
                t = time.perf_counter()
                model(tokens, 0, last_only=True)
                if rep:
                    best[name] = min(best[name], (time.perf_counter() - t, n))
    print(machine, f"(at the start); at the end {os.getloadavg()[0]:.1f}")
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    print(f"Llama 3.2 1B shape, bf16, {a.prompt_len}-token prompt, {a.threads} threads"
          + (f", ONEDNN_MAX_CPU_ISA={isa}" if isa else "") + f"; probe {probe_s:.2f} s on {probe_threads} threads; best of {a.reps}")  # fmt: skip
    print("| path | prefill s | tok/s | threads |\n|---|---|---|---|")
    for name, (seconds, n) in best.items():
        print(f"| {name} | {seconds:.2f} | {a.prompt_len / seconds:.0f} | {n} |")


if __name__ == "__main__":
    main()
