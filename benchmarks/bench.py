"""Benchmark ``llama`` against Hugging Face transformers on identical random weights.

    python benchmarks/bench.py            # small (~150M) and Llama 3.2 1B shapes on CPU, ~15 min
    python benchmarks/bench.py --quick    # small shape only, a couple of minutes
    python benchmarks/bench.py --device cuda   # small and Llama 3 8B shapes on a GPU

One run: measure the memory bandwidth, write random-weight checkpoints (the real 128,256-token
vocabulary) in Meta's format and as a transformers folder, start every engine in its own process
(so peak RSS is its own), check that all produce the same greedy tokens, then time them
interleaved (A B C D, A B C D, ...): load, time to first token and prefill on a 512-token prompt,
decode at batch 1 and batch 8. Prints a table and writes benchmarks/RESULTS.md. See README.md.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

if "--worker" in sys.argv and sys.argv[sys.argv.index("--worker") + 1].startswith("ours"):
    # Our engines import llama before torch, as a program using it does: llama sets OpenMP's wait
    # at barriers before torch loads the runtime (llama/openmp.py). Other engines keep their defaults.
    import llama  # noqa: F401,E402

import torch  # noqa: E402

from engines import (
    ENGINES, LLAMACPP, LLAMACPP_PYTHON, ensure_checkpoints, ensure_demo, ensure_gguf, load_engine, meta_tokenizer,
)

from llama import hugepages
from llama.checkpoint import load_params
from llama.devices import DTYPES, busy_ticks, cpu_flags, runnable_elsewhere
from llama.memory import GB, kv_cache_bytes, parameter_count
from llama.model import ModelArgs
from llama.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent
VOCAB = 128256
SHAPES = {
    # ~150M parameters, 131M of them the embedding and output matrices: quick runs.
    "small": ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=VOCAB, multiple_of=256),
    "llama3.2-1b": ModelArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=VOCAB, multiple_of=256,
        ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, rope_scale_factor=32.0,
    ),  # fmt: skip
    "llama3-8b": ModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=VOCAB, multiple_of=1024,
        ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
    ),  # fmt: skip
}
# The demo model (llama.demo: SmolLM2-135M-Instruct, real weights, bf16): small and overhead-bound.
DEMO = "demo"
MARK = "@@bench "  # worker replies are the stdout lines starting with this
SHORT_PROMPT = 16  # tokens per row of the batched decode run


# ------------------------------------------------------------------------------------------------
# Worker: one engine in its own process, answering JSON requests on stdin.


def worker(opts: argparse.Namespace) -> None:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    dtype = DTYPES[opts.dtype]

    def reply(obj: dict) -> None:
        print(MARK + json.dumps(obj), flush=True)

    start = time.perf_counter()
    meta, hf = Path(opts.meta), Path(opts.hf)
    engine = load_engine(opts.worker, meta, hf, opts.device, dtype, opts.max_batch, opts.max_seq_len)
    path = engine.kernel_path() if hasattr(engine, "kernel_path") else ""
    reply({"load_s": time.perf_counter() - start, "threads": torch.get_num_threads(), "kernel_path": path})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "generate":
            tokens, t_first, t_last = engine.generate(req["prompts"], req["new_tokens"])
            reply({"tokens": tokens, "t_first": t_first, "t_last": t_last, "first_threads": getattr(engine, "first_threads", None)})
        elif req["op"] == "profile":
            reply({"table": engine.profile_step(req["prompt"])})
        elif req["op"] == "memory":
            peak_gpu = torch.cuda.max_memory_allocated() if opts.device == "cuda" else None
            reply({"peak_rss": peak_rss(), "peak_gpu": peak_gpu})
        elif req["op"] == "exit":
            return


def peak_rss() -> int:
    """This process's peak resident set, in bytes (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class Worker:
    """The parent's handle on one engine process."""

    def __init__(
        self, name: str, opts: argparse.Namespace, meta: Path, hf: Path, max_batch: int, max_seq_len: int, dtype: str,
        gguf: Optional[Path] = None,
    ):  # fmt: skip
        self.name = name
        if name in LLAMACPP:  # llama-cpp-python's own venv, without torch
            threads = opts.threads or torch.get_num_threads()
            cmd = [str(LLAMACPP_PYTHON), str(HERE / "llamacpp_worker.py"), "--gguf", str(gguf),
                   "--threads", str(threads), "--max-seq-len", str(max_seq_len)]  # fmt: skip
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--meta", str(meta), "--hf", str(hf),
                   "--device", opts.device, "--dtype", dtype, "--max-batch", str(max_batch),
                   "--max-seq-len", str(max_seq_len)]  # fmt: skip
            if opts.threads:
                cmd += ["--threads", str(opts.threads)]
        self.log = open(opts.workdir / f"{name}-{dtype}.log", "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.hello = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        raise RuntimeError(f"engine {self.name} exited ({self.proc.wait()}); see {self.log.name}")

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------------------------------------
# Machine


def bandwidth(
    device: str, gib: float = 1.0, repeats: int = 10, copy: bool = True, x: Optional[torch.Tensor] = None
) -> tuple[float, float]:
    """(read, copy) bandwidth in GB/s, best of ``repeats``: read = sum of a large float32 tensor
    (bytes read); copy = bytes read + bytes written by a tensor copy (0.0 without ``copy``). On
    CPUs the tensor read is in huge pages, where the model's weights are (llama/hugepages.py): in
    4 KiB pages the sum reads 3-6% slower than the weights can stream, and the floor would be too low.
    ``x``: the tensor to read (``read_tensor``), made here when None."""
    x = read_tensor(device, gib) if x is None else x
    y = torch.empty_like(x) if copy else None
    nbytes = x.numel() * 4
    read = nbytes / best_seconds(lambda: x.sum(), device, repeats) / GB
    return read, (2 * nbytes / best_seconds(lambda: y.copy_(x), device, repeats) / GB if copy else 0.0)


def best_seconds(fn: Callable[[], object], device: str, repeats: int = 10) -> float:
    """The best of ``repeats`` wall times of ``fn`` (after one untimed call), synchronised on CUDA."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def read_tensor(device: str, gib: float = 1.0) -> torch.Tensor:
    """The float32 tensor ``bandwidth`` reads: in huge pages on CPUs (where the weights are)."""
    n = int(gib * 2**30) // 4
    return hugepages.empty((n,), torch.float32).fill_(1) if device == "cpu" and hugepages.available() else torch.ones(n, device=device)


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores ({torch.backends.cpu.get_cpu_capability()}), {mem:.0f} GiB RAM"


def simd_flags() -> str:
    """The CPU's vector flags (what decides which kernels can run), e.g. "fma avx2 avx512f ... ; no AMX"."""
    flags = cpu_flags()
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    return " ".join(simd) + ("" if any(f.startswith("amx") for f in flags) else "; no AMX")


def default_engines(shape: str, device: str) -> list[str]:
    """All of them on CPU, except hf-compile for the 1B shape: there it calls the same bf16 matmuls
    as hf (measured 1.0x its decode, 0.8x at batch 8) and would add 5 minutes to the run. On CUDA
    ours-torch is ours (the native kernels are CPU-only). The llama.cpp engines (CPU only) where
    scripts/setup_llamacpp.sh has built them."""
    cpp = list(LLAMACPP) if device == "cpu" and LLAMACPP_PYTHON.exists() else []
    if device == "cpu" and shape != "small":
        return ["ours", "ours-int8", "ours-compile", "ours-torch", "hf"] + cpp
    if device == "cuda":
        return [e for e in ENGINES if e != "ours-torch" and e not in LLAMACPP]
    return [e for e in ENGINES if e not in LLAMACPP] + cpp


def default_reps(shape: str, device: str) -> int:
    return 2 if device == "cpu" and shape == "small" else 1 if device == "cpu" else 3


# ------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Result:
    load_s: float = 0.0
    warmup_s: float = 0.0
    ttft_s: float = float("inf")
    decode1: float = 0.0  # tokens/s at batch 1
    rates1: list = field(default_factory=list)  # batch-1 tokens/s of each repetition
    beside: list = field(default_factory=list)  # GB/s read just before and after each of those (the higher)
    decode8: float = 0.0  # tokens/s at batch B, all rows together
    peak_rss: int = 0
    peak_gpu: Optional[int] = None
    tokens: dict = field(default_factory=dict)
    profile: str = ""
    kernel_path: str = ""


def settle(max_s: float = 2.0) -> None:
    """Wait (up to ``max_s``) until no other task is runnable for 20 ms in a row: the engine that ran
    last may still have OpenMP threads spinning (libgomp's default spin lasts well past a region's
    end), and ours reads the cores in use when a prompt starts (``llama.devices.CpuThreads``)."""
    deadline, quiet_since = time.perf_counter() + max_s, None
    while time.perf_counter() < deadline:
        if runnable_elsewhere():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.perf_counter()
        elif time.perf_counter() - quiet_since >= 0.02:
            return
        time.sleep(0.002)


def timed(w: Worker, opts: argparse.Namespace, log, retries: int = 2, **req) -> dict:
    """One timed generate. On a shared CPU it is repeated (up to ``retries`` times) while other
    processes used more than a fifth of a core during it, whose load would be charged to this
    engine; the least disturbed attempt is kept."""
    if opts.device != "cpu" or not Path("/proc/stat").exists():
        return w.ask(op="generate", **req)
    attempts = []
    for attempt in range(retries + 1):
        settle()
        pids = (w.proc.pid, os.getpid())
        before = (time.perf_counter(), busy_ticks(), sum(busy_ticks(p) for p in pids))
        r = w.ask(op="generate", **req)
        wall, total = time.perf_counter() - before[0], busy_ticks() - before[1]
        ours = sum(busy_ticks(p) for p in pids) - before[2]
        others = (total - ours) / os.sysconf("SC_CLK_TCK") / wall  # cores used by other processes
        attempts.append((others, attempt, r))
        if others < 0.2:
            break
        again = "measuring again" if attempt < retries else "keeping the least disturbed attempt"
        log(f"  {w.name}: other processes used {others:.1f} cores meanwhile; {again}")
    return min(attempts)[2]


def prompts(batch: int, length: int, seed: int, vocab: tuple[int, Optional[int]] = (128000, 128000)) -> list[list[int]]:
    """BOS (if the vocabulary has one) then random ids from the base (non-special) vocabulary.
    ``vocab``: (base tokens, BOS id or None); Llama 3's by default."""
    base, bos = vocab
    g = torch.Generator().manual_seed(seed)
    head = [bos] if bos is not None else []
    return [head + torch.randint(0, base, (length - len(head),), generator=g).tolist() for _ in range(batch)]


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, int]:
    """(tokens before the first difference, summed over rows; total tokens)."""
    same = 0
    for ra, rb in zip(a, b):
        n = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
        same += n
    return same, sum(len(r) for r in a)


def run_shape(name: str, opts: argparse.Namespace, log) -> dict:
    if name == DEMO:
        meta, hf, write_s = ensure_demo(opts.workdir)
        args = load_params(meta)
    else:
        args = SHAPES[name]
        meta, hf, write_s = ensure_checkpoints(opts.workdir, name, args, DTYPES[opts.dtype], meta_tokenizer())
    if write_s:
        log(f"[{name}] wrote the checkpoints in {write_s:.0f} s")
    engines = opts.engines or default_engines(name, opts.device)
    if cpp := [e for e in engines if e in LLAMACPP]:
        why = ("it is not built (bash scripts/setup_llamacpp.sh)" if not LLAMACPP_PYTHON.exists()
               else f"they read a bf16 checkpoint, not {opts.dtype}" if opts.dtype != "bf16"
               else "it runs on CPU" if opts.device != "cpu" else "")  # fmt: skip
        if why:
            log(f"[{name}] skipping {', '.join(cpp)}: {why}")
            engines = [e for e in engines if e not in LLAMACPP]
    ggufs = {}
    for e in (e for e in engines if e in LLAMACPP):
        ggufs[e], spent = ensure_gguf(meta, hf.parent, LLAMACPP[e])
        if spent:
            log(f"[{name}] exported {ggufs[e].name} in {spent:.0f} s")
    tokenizer = Tokenizer(meta / "tokenizer.model")
    vocab = (tokenizer.spec.num_base_tokens, tokenizer.bos_id)
    reps = opts.reps or default_reps(name, opts.device)
    new, plen, batch = opts.new_tokens, opts.prompt_len, opts.batch
    max_seq_len = plen + new
    read_bw = bandwidth(opts.device)[0]  # the machine may be busier or quieter for this shape: the best counts
    log(f"[{name}] read bandwidth {read_bw:.1f} GB/s")
    results = {e: Result() for e in engines}
    check = check_float32(name, meta, hf, engines, opts, log, vocab)
    workers: dict[str, Worker] = {}
    try:
        for e in engines:  # started one after another: load times do not overlap
            workers[e] = Worker(e, opts, meta, hf, batch, max_seq_len, opts.dtype, ggufs.get(e))
            results[e].load_s = workers[e].hello["load_s"]
            results[e].kernel_path = workers[e].hello.get("kernel_path", "")
            log(f"[{name}] {e}: loaded in {results[e].load_s:.2f} s ({workers[e].hello['threads']} threads)")
        # Warm-up: the compiled engines compile here, one graph per batch size.
        for e, w in workers.items():
            t = time.perf_counter()
            w.ask(op="generate", prompts=prompts(1, 16, 1, vocab), new_tokens=4)
            w.ask(op="generate", prompts=prompts(batch, 16, 2, vocab), new_tokens=4)
            results[e].warmup_s = time.perf_counter() - t
            log(f"[{name}] {e}: warm-up {results[e].warmup_s:.1f} s")
        # Timings, interleaved: every engine runs each measurement before any runs it again.
        long_prompt, short = prompts(1, plen, 4, vocab), prompts(batch, SHORT_PROMPT, 5, vocab)
        reading = read_tensor(opts.device)
        for rep in range(reps):
            if rep:  # the machine's minute changes: the floor is the best reading of the run
                now = bandwidth(opts.device, repeats=3, copy=False, x=reading)[0]
                read_bw = max(read_bw, now)
                log(f"[{name}] rep {rep}: read bandwidth {now:.1f} GB/s now, {read_bw:.1f} the best so far")
            # Odd repetitions run the engines in reverse: none is always first after the reading, or
            # always a minute after another.
            order = list(workers.items())[:: -1 if rep % 2 else 1]
            for e, w in order:
                # Read just before and after each run too: the bandwidth may flip in between.
                before = bandwidth(opts.device, repeats=3, copy=False, x=reading)[0]
                r = timed(w, opts, log, prompts=long_prompt, new_tokens=new)
                beside = max(before, bandwidth(opts.device, repeats=3, copy=False, x=reading)[0])
                read_bw = max(read_bw, beside)
                res, rate = results[e], (new - 1) / (r["t_last"] - r["t_first"])
                res.ttft_s, res.decode1 = min(res.ttft_s, r["t_first"]), max(res.decode1, rate)
                res.rates1.append(rate)
                res.beside.append(beside)
                res.tokens["b1"] = r["tokens"]
                fewer = r.get("first_threads") or w.hello["threads"]
                note = f" (prompt on {fewer} of {w.hello['threads']} threads)" if fewer < w.hello["threads"] else ""
                log(f"[{name}] rep {rep} {e} b1: ttft {r['t_first']:.2f} s{note}, decode {rate:.2f} tok/s (read {beside:.1f} GB/s beside it)")
            for e, w in order:
                r = timed(w, opts, log, prompts=short, new_tokens=new)
                if "unsupported" in r:
                    continue
                res, rate = results[e], batch * (new - 1) / (r["t_last"] - r["t_first"])
                res.decode8 = max(res.decode8, rate)
                res.tokens["b8"] = r["tokens"]
                log(f"[{name}] rep {rep} {e} b{batch}: decode {rate:.2f} tok/s")
        for e, w in workers.items():
            m = w.ask(op="memory")
            results[e].peak_rss, results[e].peak_gpu = m["peak_rss"], m["peak_gpu"]
        if opts.profile:  # after the memory readings: the profiler's own memory is not the engine's
            for e in ("ours", "hf"):
                if e in workers:
                    results[e].profile = workers[e].ask(op="profile", prompt=long_prompt[0])["table"]
                    log(f"[{name}] {e}: profiled one decode step")
    finally:
        for w in workers.values():
            w.close()
    return dict(args=args, max_seq_len=max_seq_len, results=results, check=check, reps=reps, read_bw=read_bw)


def check_float32(
    name: str, meta: Path, hf: Path, engines: list[str], opts: argparse.Namespace, log, vocab: tuple[int, Optional[int]]
) -> str:
    """Greedy tokens of our eager engine and transformers', both in float32, must be identical.

    float32, because in bf16 the top two logits of random weights are often within rounding of
    each other, and engines that round differently (all of them) then part ways after a few tokens.
    """
    engines = [e for e in ("ours", "hf") if e in engines]
    if len(engines) < 2 or opts.no_check:
        return "not run"
    check, got = prompts(2, 32, 3, vocab), {}
    for e in engines:
        w = Worker(e, opts, meta, hf, 1, 32 + opts.check_tokens, "fp32")
        try:
            got[e] = [w.ask(op="generate", prompts=[p], new_tokens=opts.check_tokens)["tokens"][0] for p in check]
        finally:
            w.close()
    same, total = agreement(got["hf"], got["ours"])
    log(f"[{name}] float32 check, hf vs ours: {same}/{total} greedy tokens identical")
    if same != total:
        raise SystemExit(f"[{name}] ours and hf disagree in float32: {got['ours']} vs {got['hf']}")
    return f"identical greedy tokens in float32, ours vs hf ({total} tokens, 2 prompts)"


# ------------------------------------------------------------------------------------------------
# Report


def report(shapes: dict, opts: argparse.Namespace, info: dict) -> str:
    size = torch.empty((), dtype=DTYPES[opts.dtype]).element_size()
    lines = [
        f"Date: {info['date']}  ",
        f"Command: `{info['command']}`  ",
        f"Machine: {info['machine']}; torch {torch.__version__}, transformers {info['transformers']}; "
        f"{info['threads']} threads; load average before/after: {info['load_before']} / {info['load_after']}  ",
        f"CPU flags (the SIMD ones): {info['flags']}  ",
        f"Memory bandwidth: {info['read_bw']:.1f} GB/s read-only (sum of a 1 GiB float32 tensor in huge pages, best of 10; "
        f"measured at the start, before each shape, before each repetition after the first, just before and after each engine's batch-1 run and at the end; the floors use the best), "
        f"{info['copy_bw']:.1f} GB/s copy (read + write, at the start)  ",
        f"Wall time of the run: {info['wall_min']:.1f} min  ",
        f"Prompt {opts.prompt_len} tokens at batch 1 (TTFT, prefill = prompt / TTFT, decode b1 over the next "
        f"{opts.new_tokens - 1}), batch {opts.batch} x {SHORT_PROMPT}-token prompts for decode b{opts.batch} "
        f"(all rows' tokens/s); {opts.dtype}.",
        "",
    ]
    for name, s in shapes.items():
        args, res = s["args"], s["results"]
        params = parameter_count(args)
        streamed = (params - args.vocab_size * args.dim) * size  # every weight but the embedding table, per step
        kv = kv_cache_bytes(args, opts.batch * s["max_seq_len"], size)
        budget = params * size + kv
        read_bw = max(info["read_bw"], s["read_bw"])
        floor = read_bw * GB / streamed
        lines += [
            f"### {name}: {params / 1e6:.0f}M parameters, {streamed / GB:.2f} GB non-embedding weights, "
            f"KV cache {kv / GB:.2f} GB ({opts.batch} x {s['max_seq_len']})",
            f"Decode floor at batch 1: {floor:.1f} tok/s ({read_bw:.1f} GB/s, the best read bandwidth measured "
            f"in the run, / non-embedding weight bytes). Check before timing: {s['check']}. "
            f"Best of {s['reps']} interleaved repetition(s).",
            "",
            "| engine | load s | warm-up s | TTFT s | prefill tok/s | decode b1 tok/s | b1 % of floor "
            f"| decode b{opts.batch} tok/s | b{opts.batch} steps % of floor | peak RSS GB | RSS / (weights + KV) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e, r in res.items():
            # On a GPU the budget is the GPU's memory; the host RSS is shown alongside.
            peak = r.peak_gpu if r.peak_gpu else r.peak_rss
            gpu = f" (GPU {r.peak_gpu / GB:.2f})" if r.peak_gpu else ""
            b8 = (f"{r.decode8:.2f} | {100 * r.decode8 / opts.batch / floor:.0f}%" if r.decode8
                  else "not measured | -")  # fmt: skip
            lines.append(
                f"| {e} | {r.load_s:.2f} | {r.warmup_s:.1f} | {r.ttft_s:.3f} | {opts.prompt_len / r.ttft_s:.1f} "
                f"| {r.decode1:.2f} | {100 * r.decode1 / floor:.0f}% | {b8} "
                f"| {r.peak_rss / GB:.2f}{gpu} | {peak / budget:.2f} |"
            )
        base = res.get("hf")
        if base is not None:
            lines.append("")
            for e, r in res.items():
                if e != "hf":
                    lines.append(
                        f"- {e} vs hf: prefill {base.ttft_s / r.ttft_s:.2f}x, "
                        f"decode b1 {r.decode1 / base.decode1:.2f}x, decode b{opts.batch} {r.decode8 / base.decode8:.2f}x"
                    )
            for e in ("ours", "ours-compile", "ours-torch"):
                if e in res and name != DEMO:
                    r = res[e]
                    peak = r.peak_gpu if r.peak_gpu else r.peak_rss
                    lines.append(
                        f"- targets, {e}: "
                        + target("decode b1 vs hf", r.decode1 / base.decode1, 2.0, "x")
                        + target("decode b1 of floor", 100 * r.decode1 / floor, 75, "%")
                        + target("prefill vs hf", base.ttft_s / r.ttft_s, 1.5, "x")
                        + target("peak memory / (weights + KV)", peak / budget, 1.15, "x", at_most=True)
                    )
        lines += llamacpp_targets(res, floor, streamed)
        lines += repetition_lines(res, streamed)
        lines += [f"- kernel path, {e}: {r.kernel_path}" for e, r in res.items() if r.kernel_path]
        ref = next(iter(res))
        for e, r in res.items():
            if e != ref:
                kinds = [k for k in ("b1", "b8") if k in r.tokens and k in res[ref].tokens]
                agree = ", ".join(
                    f"{'b1' if k == 'b1' else f'b{opts.batch}'} {'/'.join(map(str, agreement(r.tokens[k], res[ref].tokens[k])))}"
                    for k in kinds
                )
                lines.append(f"- greedy tokens of the timed runs, {e} vs {ref}: {agree} identical before the first difference")
        for e, r in res.items():
            if r.profile:
                title = f"torch.profiler, one batch-1 decode step of {e} after the {opts.prompt_len}-token prompt:"
                lines += ["", title, "```", r.profile.strip(), "```"]
        lines.append("")
    return "\n".join(lines)


def llamacpp_targets(res: dict, floor: float, streamed: int) -> list[str]:
    """Issue #18's targets against llama.cpp on the same weights, where both engines ran."""
    lines = []
    for ours, theirs in (("ours", "llamacpp-bf16"), ("ours-int8", "llamacpp-q8")):
        if ours in res and theirs in res:
            a, b = res[ours], res[theirs]
            lines.append(
                f"- {ours} vs {theirs}: prefill {b.ttft_s / a.ttft_s:.2f}x; "
                + target("decode b1", a.decode1 / b.decode1, 1.10, "x")
                + f"peak RSS {a.peak_rss / max(b.peak_rss, 1):.2f}x"
            )
    if "ours-int8" in res and "ours" in res:
        a, b = res["ours-int8"], res["ours"]
        lines.append(
            "- ours-int8 vs ours: "
            + target("decode b1", a.decode1 / b.decode1, 1.8, "x")
            + target("peak RSS", a.peak_rss / b.peak_rss, 0.6, "x", at_most=True)
        )
    if "ours" in res:
        beside = median(of_reading(res["ours"], streamed))
        lines.append(
            "- ours: " + target("decode b1 of floor", 100 * res["ours"].decode1 / floor, 80, "%")
            + target("median over repetitions of the reading beside each", beside, 80, "%")
        )
    return lines


def of_reading(r: Result, streamed: int) -> list[float]:
    """Each repetition's batch-1 decode as % of the read bandwidth measured beside it."""
    return [100 * rate * streamed / (bw * GB) for rate, bw in zip(r.rates1, r.beside)]


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2 if xs else float("nan")


def repetition_lines(res: dict, streamed: int) -> list[str]:
    """Batch-1 decode per repetition: each engine's rate and % of the reading beside it, and the
    ratios of the pairs the targets compare (a pair ran in the same repetition, but the machine's
    bandwidth may have changed in between: the readings say whether it did)."""
    lines = []
    for e, r in res.items():
        if r.rates1:
            pct = of_reading(r, streamed)
            lines.append(
                f"- {e}, b1 per repetition: {' '.join(f'{x:.2f}' for x in r.rates1)} tok/s; read beside each "
                f"{' '.join(f'{b:.1f}' for b in r.beside)} GB/s; of that: {' '.join(f'{x:.0f}%' for x in pct)} "
                f"(median {median(pct):.0f}%)"
            )
    for a, b in (("ours", "llamacpp-bf16"), ("ours-int8", "llamacpp-q8"), ("ours-int8", "ours"), ("ours", "hf")):
        if a in res and b in res and res[a].rates1 and len(res[a].rates1) == len(res[b].rates1):
            ratios = [x / y for x, y in zip(res[a].rates1, res[b].rates1)]
            lines.append(f"- {a} / {b}, b1 per repetition: {' '.join(f'{x:.2f}' for x in ratios)} (median {median(ratios):.2f})")
    return lines


def target(label: str, value: float, goal: float, unit: str, at_most: bool = False) -> str:
    """'label 1.23x (target >= 2.0x: MISSED); ' and the like."""
    met = value <= goal if at_most else value >= goal
    goal_text = f"{'<=' if at_most else '>='} {goal}{unit}"
    return f"{label} {value:.2f}{unit} (target {goal_text}: {'met' if met else 'MISSED'}); "


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small shape only")
    p.add_argument("--shapes", help=f"comma-separated, from {list(SHAPES) + [DEMO]} (default: small + 1B on CPU, + 8B on CUDA)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--engines", help=f"comma-separated, from {ENGINES} (default: all but hf-compile for 1B on CPU)")
    p.add_argument("--threads", type=int, help="torch threads per engine (default: torch's, one per core)")
    p.add_argument("--reps", type=int, help="interleaved repetitions, best reported (default: 2 small + 1 1B on CPU, 3 CUDA)")
    p.add_argument("--profile", action="store_true", help="add torch.profiler's top ops of one decode step (ours, hf)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--check-tokens", type=int, default=24, help="greedy tokens per prompt in the float32 check")
    p.add_argument("--no-check", action="store_true", help="skip the float32 check of ours against hf")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/llama-bench"), help="checkpoints (reused), engine logs")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    # Internal: run one engine.
    for flag in ("--worker", "--meta", "--hf"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    p.add_argument("--max-batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-seq-len", type=int, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        return worker(opts)

    import transformers

    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible to torch")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    opts.engines = opts.engines.split(",") if opts.engines else None
    default = "small,llama3-8b" if opts.device == "cuda" else "small,llama3.2-1b"
    names = ["small"] if opts.quick else (opts.shapes or default).split(",")
    opts.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    info = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": shlex.join(["python", "benchmarks/bench.py", *sys.argv[1:]]),
        "machine": machine(opts.device),
        "transformers": transformers.__version__,
        "threads": opts.threads or torch.get_num_threads(),
        "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "flags": simd_flags(),
    }
    info["read_bw"], info["copy_bw"] = bandwidth(opts.device)
    log(f"{info['machine']}: read {info['read_bw']:.1f} GB/s, copy {info['copy_bw']:.1f} GB/s")
    shapes = {n: run_shape(n, opts, log) for n in names}
    info["read_bw"] = max(info["read_bw"], bandwidth(opts.device)[0])
    info["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    info["wall_min"] = (time.perf_counter() - t0) / 60
    text = report(shapes, opts, info)
    print(text)
    header = (
        "# Benchmark results\n\nWritten by `benchmarks/bench.py`; README.md says what each column means. "
        "The GPU runs are in RESULTS-cuda.md.\n\n"
    )
    opts.out.write_text(header + text)
    log(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
