"""Which product is fastest on this CPU, for the rule in llama/fast.py (``speed_up``).

For the projection shapes of a Llama 3.2 1B layer (K = 2048; N = 2048, 512, 8192 and back),
held in enough copies to fill ``--gib`` GiB (default 1: the weights come from memory, as in a model,
not from the CPU's caches), prints GB/s of weights streamed for: torch's bf16 ``F.linear`` (the CPU's own bf16 path), torch's
float32 product on widened weights (``FastLinear`` with compute_dtype float32), and our bf16 and
int8 kernels in each variant the CPU has (AVX2, AVX-512, AVX512-BF16 for bf16), for 1 to 8 rows (decode) and for 128
rows (a prompt). Each cell is the best of several repetitions, the engines of a row count taken in
turn within each repetition, timed by wall clock (all threads) and by this thread's CPU time with
one thread (the second is steadier on a busy machine).

    python benchmarks/kernels.py [--threads 2] [--reps 5] [--rows 1,2,4,8,128] [--gib 1]
"""

import argparse
import os
import platform
import subprocess
import time

import torch
import torch.nn.functional as F

from llama import native
from llama.fast import FastLinear
from llama.quantize import quantize_int8

SHAPES = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]  # (N, K) of wq, wk, w1, w2 in 1B


def cpu_description() -> str:
    """lscpu's model name and the SIMD flags that decide kernels."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    simd = [f for f in flags if f.startswith(("avx", "amx", "fma"))]
    return f"{model}; {' '.join(simd)}; load average {os.getloadavg()[0]:.1f}"


def best_interleaved(fns: list, reps: int, clock) -> list[float]:
    """The best time of each function over ``reps`` rounds, each round running them all in turn."""
    for fn in fns:
        fn()  # warm up
    times = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = clock()
            fn()
            times[i] = min(times[i], clock() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rows", default="1,2,4,8,128", help="comma-separated row counts")
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of bf16 weights (copies of the layer)")
    a = parser.parse_args()
    kernels = native.kernels()
    if kernels is None:
        raise SystemExit("the native kernels are unavailable on this machine")
    torch.manual_seed(0)
    layer_bytes = sum(n * k * 2 for n, k in SHAPES)
    copies = max(1, round(a.gib * 2**30 / layer_bytes))
    weights = [torch.randn(n, k).to(torch.bfloat16) for _ in range(copies) for n, k in SHAPES]
    int8 = [quantize_int8(w) for w in weights]
    fast = []
    for w in weights:
        layer = FastLinear(w.shape[1], w.shape[0], bias=False, device="meta")
        layer.weight = torch.nn.Parameter(w, requires_grad=False)
        layer.compute_dtype = torch.float32
        fast.append(layer)
    bf16_bytes = sum(w.numel() * 2 for w in weights)
    int8_bytes = sum(q.numel() for q, _ in int8)
    int8_variants = kernels.int8_matvec.variants
    bf16_variants = kernels.matvec.variants

    def engines(x: dict[int, torch.Tensor], rows: int):
        """(name, bytes read, function) for inputs x[K] of ``rows`` rows."""
        yield "torch bf16 F.linear", bf16_bytes, lambda: [F.linear(x[w.shape[1]], w) for w in weights]
        yield "torch fp32 (widened)", bf16_bytes, lambda: [f(x[f.in_features]) for f in fast]
        if rows <= native.MAX_ROWS:
            for v in bf16_variants:
                def run_bf16(v=v):
                    kernels.matvec.use_variant(v)
                    return [kernels.matvec(x[w.shape[1]], w) for w in weights]
                yield f"ours bf16 {v}", bf16_bytes, run_bf16
            for v in int8_variants:
                def run(v=v):
                    kernels.int8_matvec.use_variant(v)
                    return [kernels.int8_matvec(x[q.shape[1]], q, s) for q, s in int8]
                yield f"ours int8 {v}", int8_bytes, run

    rows_list = [int(r) for r in a.rows.split(",")]
    machine = cpu_description()
    table: dict[str, list[str]] = {}
    for rows in rows_list:
        x = {k: torch.randn(rows, k).to(torch.bfloat16) for k in {k for _, k in SHAPES}}
        names, sizes, fns = zip(*engines(x, rows))
        torch.set_num_threads(a.threads)
        walls = best_interleaved(list(fns), a.reps, time.perf_counter)
        torch.set_num_threads(1)
        cpus = best_interleaved(list(fns), a.reps, time.thread_time)
        torch.set_num_threads(a.threads)
        for name, nbytes, wall, cpu in zip(names, sizes, walls, cpus):
            table.setdefault(name, ["-"] * len(rows_list))[rows_list.index(rows)] = (
                f"{nbytes / wall / 1e9:.1f} / {nbytes / cpu / 1e9:.1f}"
            )
    kernels.matvec.use_variant(native.bf16_variant(_has_avx512()))  # back to the default
    kernels.int8_matvec.use_variant(native.int8_variant(_has_avx512()))
    print(machine, f"(at the start); at the end {os.getloadavg()[0]:.1f}")
    print(f"{copies} copies of the layer ({copies * layer_bytes / 2**30:.2f} GiB of bf16 weights)")
    print(f"GB/s of weights read; wall clock with {a.threads} threads | CPU time with 1 thread")
    print("| engine | " + " | ".join(f"rows {r}" for r in rows_list) + " |")
    print("|---" * (len(rows_list) + 1) + "|")
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


def _has_avx512() -> bool:
    from llama.devices import cpu_flags

    return {"avx512f", "avx512bw"} <= cpu_flags()


if __name__ == "__main__":
    main()
