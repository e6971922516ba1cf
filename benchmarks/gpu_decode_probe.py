"""Where a batch-1 decode step's time goes on a GPU (Llama 3 8B shape, random bf16 weights).

    python benchmarks/gpu_decode_probe.py [--layers 32] [--variants reduce-overhead,ours]

1. cuBLAS matrix-vector products (``F.linear`` with one row) for each weight shape of the model,
   rotating over enough copies that nothing stays in L2: GB/s against the measured read bandwidth.
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
import torch.nn.functional as F

from bench import bandwidth  # the read bandwidth bench.py's floors use
from llama.devices import compile_decode_step
from llama.fast import speed_up
from llama.model import ModelArgs, Transformer

ARGS_8B = dict(dim=4096, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024, ffn_dim_multiplier=1.3,
               norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)  # fmt: skip


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


def gemv_table(bw: float) -> list[str]:
    rows = []
    shapes = {"wq, wo": (4096, 4096), "wk, wv": (1024, 4096), "w1, w3": (14336, 4096), "w2": (4096, 14336),
              "output": (128256, 4096)}  # fmt: skip
    for name, (n, k) in shapes.items():
        copies = max(2, int(2e9 // (n * k * 2)))  # ~2 GB of weights: far beyond L2
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)

        def run():
            for w in ws:
                F.linear(x, w)

        ms = median_ms(run, reps=10) / copies
        rows.append(f"| F.linear 1 x {k} by {n} x {k} ({name}) | {ms * 1e3:.1f} us | {n * k * 2 / ms / 1e6:.0f} GB/s "
                    f"| {100 * n * k * 2 / ms / 1e6 / bw:.0f}% |")  # fmt: skip
        del ws
    return rows


def random_model(n_layers: int) -> Transformer:
    args = ModelArgs(n_layers=n_layers, **ARGS_8B)
    model = Transformer(args, device="meta", dtype=torch.bfloat16).to_empty(device="cuda")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
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
    lines = ["| what | time | GB/s | % of read bandwidth |", "|---|---|---|---|"] + gemv_table(bw)
    print("\n".join(lines), flush=True)

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
