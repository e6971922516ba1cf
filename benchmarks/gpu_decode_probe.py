"""Where a batch-1 decode step's time goes on a GPU (Llama 3 8B shape, random bf16 weights).

    python benchmarks/gpu_decode_probe.py [--layers 32] [--variants reduce-overhead,ours]

1. One-row products for each weight shape of the model, separate and joined (gpu_bench.py's table,
   timed from a CUDA graph over enough copies that nothing stays in L2): GB/s against the read bandwidth.
2. The model's one-token step (context 512 of a 640-position cache), eager and compiled like
   ``Llama(compile=True)`` (``compile_decode_step``: static shapes, CUDA graphs, coordinate-descent
   tuning) and with torch.compile's plain modes;
   each step's time against the floor (non-embedding weight bytes / read bandwidth).
3. torch.profiler's top kernels of one compiled step.
Timings are CUDA-event medians; the read bandwidth is bench.py's (best of 10, as its floors use).
Prints a table; the numbers go into RESULTS-cuda.md by hand.
"""

import argparse
import statistics

import torch

from bench import bandwidth  # the read bandwidth bench.py's floors use
from gpu_bench import COMMON, SHAPES, fill, gemv_table  # the same weights and product table as gpu_bench.py
from llama.devices import compile_decode_step
from llama.fast import speed_up
from llama.model import ModelArgs, Transformer

def median_ms(fn, reps: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def random_model(n_layers: int) -> Transformer:
    """The 8B shape with ``n_layers`` layers, gpu_bench.py's random bf16 weights, as ``Llama.build`` runs it."""
    args = ModelArgs(**{**SHAPES["8b"], "n_layers": n_layers}, **COMMON)
    model = Transformer(args, device="meta", dtype=torch.bfloat16)
    fill(model, "", "cuda")
    model.setup_cache(1, 640)
    return speed_up(model).eval()  # the modules Llama.build runs


def step_ms(model: Transformer, compiled, tokens: torch.Tensor) -> float:
    pos = torch.tensor(512, device="cuda")
    if compiled is None:
        return median_ms(lambda: model(tokens, 512, last_only=True))
    return median_ms(lambda: compiled(tokens, pos, last_only=True))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--variants", default="reduce-overhead,ours", help="torch.compile modes, or ours")
    opts = p.parse_args()
    torch.manual_seed(0)
    bw = bandwidth("cuda")[0]  # GB/s
    print(f"{torch.cuda.get_device_name()}: read bandwidth {bw:.0f} GB/s", flush=True)
    print(gemv_table(bw, "cuda"), flush=True)

    model = random_model(opts.layers)
    streamed = sum(p.numel() * 2 for n, p in model.named_parameters() if "tok_embeddings" not in n)
    floor_ms = streamed / bw / 1e6
    tokens = torch.randint(0, 128256, (1, 1), device="cuda")
    with torch.inference_mode():
        model(torch.randint(0, 128256, (1, 512), device="cuda"), 0, last_only=True)  # fill the cache
        results = [("eager", step_ms(model, None, tokens))]
        for variant in opts.variants.split(","):
            torch._dynamo.reset()
            if variant == "ours":  # what Llama(compile=True) runs
                compiled = compile_decode_step(model, torch.device("cuda"))
            else:  # "reduce-overhead", "max-autotune", ...: torch.compile's modes alone
                compiled = torch.compile(model, fullgraph=True, dynamic=False, mode=variant)
            results.append((f"compiled: {variant}", step_ms(model, compiled, tokens)))
            print(results[-1], flush=True)
        prof_table = ""
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                compiled(tokens, torch.tensor(512, device="cuda"), last_only=True)
            torch.cuda.synchronize()
        prof_table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    print(f"\n{opts.layers} layers, {streamed / 1e9:.2f} GB streamed per step, floor {floor_ms:.2f} ms "
          f"({1e3 / floor_ms:.0f} tok/s)")  # fmt: skip
    print("| step | ms | tok/s | % of floor |\n|---|---|---|---|")
    for name, ms in results:
        print(f"| {name} | {ms:.2f} | {1e3 / ms:.0f} | {100 * floor_ms / ms:.0f}% |")
    print(f"\ntop kernels of 3 compiled steps (last variant):\n{prof_table}")


if __name__ == "__main__":
    main()
