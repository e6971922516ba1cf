"""GPU decoding, Llama 3 shapes, random weights made on the GPU (no checkpoint files to write or read).

    python benchmarks/gpu_bench.py [--shape 8b] [--variants graph,eager,unfused,int8,int4,fp8] \
        [--batches 1,8] [--tokens 128] [--big 70b:int4] [--json OUT.json]

Each variant is ``Llama`` as ``Llama.build`` makes it on a GPU (``speed_up``'s fast paths, the default
decode step), from the same random bf16 weights (seeded per tensor, so every variant quantizes the
same numbers):
- ``graph``: the default: one-token steps replayed from a CUDA graph (llama/cuda_graph.py), fused
  projections (llama/fused_projections.py); ``eager``: ``LLAMA_CUDA_GRAPH=0``; ``unfused``:
  ``LLAMA_FUSE_PROJECTIONS=0``; ``compile``: ``compile=True`` (minutes of Inductor);
- ``torch-matvec``: torch's products only (``LLAMA_GPU_MATVEC=0``: no Triton kernel, llama/gpu_matvec.py);
- ``int8`` / ``int4`` / ``fp8``: ``quantize=`` of that name, then the default step; ``int8-torch``:
  int8 with torch's products only (each weight widened for ``F.linear``).
Per variant and batch size: decode tok/s (every row's tokens) from the times of the loop's steps
after a first short run whose first step captures the graph (or compiles) for that batch size:
that step's time is the warm-up; ms a step and its share of the floor, which is the bytes of the
weights a step reads (everything but the embedding table) over the read bandwidth measured here
(bench.py's: the best of 10 sums of a 1 GiB float32 tensor). Accuracy: each variant's last-position
logits of a 64-token prompt against the bf16 model's (relative error, top-1 agreement); bf16 vs
float64 formulas is the CPU tests' job. ``--big 70b:int4`` builds the 70B shape quantized layer by
layer on the GPU (its bf16 weights, 141 GB, would not fit) and decodes with it.
Prints markdown tables; the numbers go into RESULTS-cuda.md by hand.
"""

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import bandwidth, best_seconds  # noqa: E402  (the read bandwidth bench.py's floors use)
from llama import fp8, gpu_matvec  # noqa: E402
from llama.devices import record_cuda_graph  # noqa: E402
from llama.fast import speed_up  # noqa: E402
from llama.generation import Llama  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402
from llama.quantize import quantize_model  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

SHAPES = {
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3),
    "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
    "tiny": dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, multiple_of=64),  # a dry run on the CPU
}
COMMON = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
ENV = {"eager": {"LLAMA_CUDA_GRAPH": "0"}, "unfused": {"LLAMA_FUSE_PROJECTIONS": "0"},
       "torch-matvec": {"LLAMA_GPU_MATVEC": "0"}, "int8-torch": {"LLAMA_GPU_MATVEC": "0"}}


def quantizer(name: Optional[str]) -> Callable[[torch.nn.Module], object]:
    """What ``Llama.build(quantize=name)`` does to a loaded model (or one block of it)."""
    if name is None:
        return lambda module: None
    if name == "int8":
        return quantize_model
    if name == "fp8":
        return fp8.quantize_feed_forward
    if name == "int4":
        from llama.quantize.int4 import quantize_model_int4

        return quantize_model_int4
    raise ValueError(name)


@contextlib.contextmanager
def environ(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def fill(module: torch.nn.Module, prefix: str, device: str) -> None:
    """Random bf16 values for ``module``'s parameters (made on ``meta``), seeded by their names:
    N(0, 0.02) for matrices, ones for the norms."""
    module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            full = f"{prefix}{name}"
            if "norm" in full:
                p.fill_(1.0)
                continue
            g = torch.Generator(device).manual_seed(zlib.crc32(full.encode()))
            p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(0.02))


def random_model(shape: str, quantize: Optional[str], device: str) -> Transformer:
    """The shape's model on ``device`` (bf16), each block filled and then quantized before the next,
    so the peak is one block of bf16 beside the quantized model (fp8 keeps layers 0 and -1 bf16 and
    is applied to the whole model, as ``Llama.build`` does)."""
    args = ModelArgs(**SHAPES[shape], **COMMON)
    model = Transformer(args, device="meta", dtype=torch.bfloat16)
    q = quantizer(quantize)
    for i, block in enumerate(model.layers):
        fill(block, f"layers.{i}.", device)
        if quantize in ("int8", "int4"):
            q(block)
    for name in ("tok_embeddings", "norm", "output"):
        fill(getattr(model, name), f"{name}.", device)
    q(model)  # int8 / int4: the output layer (the blocks are done already); fp8: layers 1 ... n-2
    return model


def streamed_bytes(model: Transformer) -> int:
    """Bytes of every tensor a decode step reads whole: all weights and buffers but the embedding
    table (one row a token) and the KV cache (a few MB here, counted out)."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "tok_embeddings" in name or name.endswith((".cache.k", ".cache.v")) or "_rope" in name:
            continue
        total += t.numel() * t.element_size()
    return total


def tokenizer() -> Tokenizer:
    """Meta's tokenizer from the llama-models wheel, with no stop tokens: every run decodes all its steps."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        raise SystemExit("needs Meta's tokenizer.model: pip install --no-deps llama-models==0.3.0")
    tok = Tokenizer(str(Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"))
    tok.stop_tokens = []
    return tok


def decode(llm: Llama, bsz: int, prompt_len: int, tokens: int) -> tuple[float, float]:
    """(decode steps per second after the first two, seconds of the first decode step)."""
    prompts = [[(97 * r + 13 * j) % 100000 + 100 for j in range(prompt_len)] for r in range(bsz)]
    stamps = [time.perf_counter()]
    for _ in llm._steps(prompts, tokens, 0.0, 1.0, False):  # each step ends with the tokens on the host
        stamps.append(time.perf_counter())
    return (len(stamps) - 3) / (stamps[-1] - stamps[2]), stamps[2] - stamps[1]


def last_logits(llm: Llama, prompt_len: int = 64) -> torch.Tensor:
    tokens = torch.tensor([[(31 * j) % 100000 + 100 for j in range(prompt_len)]], device=llm.device)
    with torch.inference_mode():
        return llm.model(tokens, 0, last_only=True)[0, -1].double()


def run_variant(name: str, opts, tok: Tokenizer, bw: float, reference: Optional[torch.Tensor]) -> dict:
    quantize = name.split("-")[0] if name.split("-")[0] in ("int8", "int4", "fp8") else None
    shape = opts.shape
    if ":" in name:  # "70b:int4"
        shape, quantize = name.split(":")
    started = time.perf_counter()
    with environ(ENV.get(name, {})):
        model = random_model(shape, quantize, opts.device)
        model.setup_cache(max(opts.batches), max(opts.prompt, 64) + opts.tokens + 8)
        gpu_matvec.VERDICTS.clear()
        speed_up(model)
        llm = Llama(model, tok, compile=name == "compile")
    for line in gpu_matvec.VERDICTS:  # which product each weight shape got, with the probe's timings
        print(f"  {name}: {line}", flush=True)
    built = time.perf_counter() - started
    floor_ms = streamed_bytes(model) / bw / 1e6
    out = {"variant": name, "shape": shape, "build_s": built, "streamed_gb": streamed_bytes(model) / 1e9,
           "floor_ms": floor_ms, "gpu_gb": torch.cuda.memory_allocated() / 1e9 if opts.device == "cuda" else 0.0}  # fmt: skip
    logits = last_logits(llm)
    if reference is not None and shape == opts.shape:
        out["rel_err"] = ((logits - reference).abs().max() / reference.abs().max()).item()
        out["top1_same"] = bool(logits.argmax() == reference.argmax())
    out["logits"] = logits
    for bsz in opts.batches:
        _, warmup = decode(llm, bsz, opts.prompt, 4)  # its first step captures (or compiles) for this batch size
        rate, _ = decode(llm, bsz, opts.prompt, opts.tokens)
        out[f"b{bsz}"] = {"tok_s": rate * bsz, "step_ms": 1e3 / rate, "pct_floor": 100 * floor_ms * rate / 1e3,
                          "warmup_s": warmup}  # fmt: skip
    if opts.device == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps({k: v for k, v in out.items() if k != "logits"}), flush=True)
    del llm, model
    gc.collect()
    if opts.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def gemv_table(bw: float, device: str) -> str:
    """One-row products of the 8B shape's weights, separate and fused, bf16 (``F.linear``) and int8
    (torch's ``_weight_int8pack_mm``): GB/s of weight bytes over ~2 GB of copies (nothing stays in
    L2), the kernels' own time (``kernel_seconds``). Our Triton kernel's times per shape are in the
    lines each variant prints (``llama.gpu_matvec``'s probe)."""
    shapes = {"wq, wo": (4096, 4096), "wk, wv": (1024, 4096), "wq|wk|wv": (6144, 4096), "w1, w3": (14336, 4096),
              "w1|w3": (28672, 4096), "w2": (4096, 14336), "output": (128256, 4096)}  # fmt: skip
    lines = ["| product (1 row) | bf16 us | bf16 GB/s | bf16 % of read | int8 us | int8 GB/s |", "|---|---|---|---|---|---|"]
    for name, (n, k) in shapes.items():
        copies = max(2, int(2e9 // (n * k * 2)))
        ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(copies)]
        qs = [torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8) for _ in range(copies)]
        scale = torch.rand(n, device=device, dtype=torch.bfloat16)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        cells = [name]
        for mats, run, size in ((ws, lambda w: torch.nn.functional.linear(x, w), 2),
                                (qs, lambda q: torch.ops.aten._weight_int8pack_mm(x, q, scale), 1)):  # fmt: skip
            try:
                seconds = kernel_seconds(lambda: [run(m) for m in mats], device) / copies
                cells += [f"{seconds * 1e6:.1f}", f"{n * k * size / seconds / 1e9:.0f}"]
                if size == 2:
                    cells.append(f"{100 * n * k * size / seconds / 1e9 / bw:.0f}%")
            except (NotImplementedError, RuntimeError) as e:
                cells += [f"({type(e).__name__})", "-"]
        lines.append("| " + " | ".join(cells) + " |")
        del ws, qs
    return "\n".join(lines)


def kernel_seconds(fn: Callable[[], object], device: str) -> float:
    """GPU time of ``fn``'s kernels: replayed from a CUDA graph (from Python, each launch's ~10-20 us
    would be timed instead of the kernels of small products); wall time on the CPU."""
    if device != "cuda":
        return best_seconds(fn, device)
    graph, _ = record_cuda_graph(fn)
    return best_seconds(graph.replay, device)


def table(results: list[dict], batches: list[int], bw: float) -> str:
    head = "| variant | shape | GB read a step | build s | " + " | ".join(
        f"b{b} tok/s | b{b} ms/step | b{b} % of floor" for b in batches
    ) + " | warm-up s (first step, b1) | peak GPU GB | logits rel err vs bf16 | top-1 same |"
    lines = [f"read bandwidth {bw:.0f} GB/s", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        cells = [r["variant"], r["shape"], f"{r['streamed_gb']:.2f}", f"{r['build_s']:.1f}"]
        for b in batches:
            x = r[f"b{b}"]
            cells += [f"{x['tok_s']:.1f}", f"{x['step_ms']:.2f}", f"{x['pct_floor']:.0f}%"]
        cells += [f"{r[f'b{batches[0]}']['warmup_s']:.2f}", f"{r.get('peak_gpu_gb', 0):.1f}", f"{r.get('rel_err', float('nan')):.2e}",
                  str(r.get("top1_same", "-"))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--variants", default="graph,eager,unfused,int8,int4,fp8")
    p.add_argument("--big", default="", help="extra variants of another shape, e.g. 70b:int4,70b:int8")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", type=float, default=1e9, help="seconds: skip the variants left after this")
    p.add_argument("--json", default="")
    p.add_argument("--gemv", action="store_true", help="first the one-row products table")
    opts = p.parse_args()
    opts.batches = [int(b) for b in opts.batches.split(",")]
    started = time.perf_counter()
    bw = bandwidth(opts.device)[0]
    name = torch.cuda.get_device_name() if opts.device == "cuda" else opts.device
    print(f"{name}: read bandwidth {bw:.0f} GB/s; torch {torch.__version__}", flush=True)
    if opts.gemv:
        print(gemv_table(bw, opts.device), flush=True)
    tok = tokenizer()
    results: list[dict] = []
    reference = None
    variants = [v for v in opts.variants.split(",") if v] + [v for v in opts.big.split(",") if v]
    for v in variants:
        if time.perf_counter() - started > opts.budget:
            print(f"skipped {v}: over the budget of {opts.budget:.0f} s", flush=True)
            continue
        try:
            r = run_variant(v, opts, tok, bw, reference)
        except Exception as e:  # one variant's failure must not lose the others' numbers
            print(f"variant {v} failed: {type(e).__name__}: {e}", flush=True)
            import traceback

            traceback.print_exc()
            continue
        if v == "graph" and reference is None:
            reference = r["logits"]
        results.append(r)
    print(table(results, opts.batches, bw))
    if opts.json:
        Path(opts.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "logits"} for r in results], indent=1))


if __name__ == "__main__":
    main()
