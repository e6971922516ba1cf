"""Decode speed on a busy machine: default threads against one thread, idle and beside a CPU hog.

    python benchmarks/load.py                    # the demo model, ~3 min on 2 cores
    python benchmarks/load.py --ckpt_dir DIR     # any Meta-format checkpoint
    python benchmarks/load.py --variants         # also the raw settings behind the default choice

Each measurement runs in a fresh process (thread settings and OpenMP's environment are read once
per process): build the model on CPU, prefill a chat prompt, then time greedy one-token decode
steps of ``Llama.generate_stream`` for ``--seconds`` (or ``--tokens``, whichever comes first). "loaded" runs the same while
``python -c "while True: pass"`` holds a core. Engines: ``native`` (our bf16 kernels,
llama/native.py, for every one-token product even where the CPU has native bf16) and ``torch`` (``LLAMA_NATIVE=0``:
what ``Llama.build`` runs without our kernels). Prints the CPU model, its flags and the load
average beside the table; the load average is read at each measurement, because on a shared
machine "idle" is only as idle as the neighbours allow.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
MARK = "@@load "
FIXED = "LOAD_BENCH_FIXED_THREADS"  # this script's own switch: keep the thread count (no CpuThreads)
HOG = [sys.executable, "-c", "while True: pass"]
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def worker(opts: argparse.Namespace) -> None:
    """One measurement in this process: prints MARK + {"tok_s", "threads", "steps"}."""
    import llama  # noqa: F401  first: it sets OpenMP's wait policy before torch loads the runtime (llama/openmp.py)
    import torch

    from llama import native
    from llama.fast import apply_fast_paths, prompt_compute_dtype
    from llama.generation import Llama

    if opts.threads:
        torch.set_num_threads(opts.threads)
    if os.environ.get(FIXED) == "1":  # the variant without llama.devices.CpuThreads lowering threads
        from llama import devices

        devices.CpuThreads.adjust = lambda self: torch.get_num_threads()
    ckpt = opts.ckpt_dir
    if ckpt is None:
        from llama.demo import default_checkpoint

        ckpt = str(default_checkpoint())
    llm = Llama.build(ckpt, max_seq_len=opts.tokens + 64, max_batch_size=1, device="cpu")
    model = llm.model
    if opts.engine == "native":
        kernels = native.kernels()
        if kernels is None:
            print(MARK + json.dumps({"error": "native kernels unavailable on this machine"}), flush=True)
            return
        # Llama.build already gave the kernels the products they win (llama/fast.py); here they take
        # every one-token product, as on CPUs without native bf16.
        apply_fast_paths(model, prompt_compute_dtype(), kernels.matvec,
                         native.MAX_ROWS, kernels.attention)  # fmt: skip
    prompt = llm.formatter.encode_dialog_prompt(PROMPT)
    llm.tokenizer.stop_tokens = [-1]  # no id is -1: every run decodes the same number of steps
    # Through Llama's own decode loop (generate_stream), as users run it: it also lowers the thread
    # count while other processes keep cores busy (llama.devices.CpuThreads). Timed from the first
    # new token (after the prompt and 3 warm-up steps) to the last.
    start, steps = 0.0, 0
    with torch.inference_mode():
        for i, _events in enumerate(llm.generate_stream([prompt], max_gen_len=opts.tokens, temperature=0.0)):
            if i == 3:
                start = time.perf_counter()
            elif i > 3:
                steps += 1
                if time.perf_counter() - start > opts.seconds:
                    break
        elapsed = time.perf_counter() - start
    policy = os.environ.get("OMP_WAIT_POLICY") or f"spin {os.environ.get('GOMP_SPINCOUNT', 'default')}"
    print(MARK + json.dumps({"tok_s": steps / elapsed, "threads": torch.get_num_threads(), "steps": steps, "policy": policy}), flush=True)


def measure(opts: argparse.Namespace, engine: str, threads: int, env: dict[str, str], loaded: bool) -> dict:
    """Run one worker (beside a CPU hog when ``loaded``); its result plus the load average."""
    cmd = [sys.executable, __file__, "--worker", "--engine", engine, "--threads", str(threads)]
    cmd += ["--tokens", str(opts.tokens), "--seconds", str(opts.seconds)]
    if opts.ckpt_dir:
        cmd += ["--ckpt_dir", opts.ckpt_dir]
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if engine == "torch":
        full_env["LLAMA_NATIVE"] = "0"
    hog = subprocess.Popen(HOG) if loaded else None
    try:
        if hog is not None:
            time.sleep(0.5)  # let the hog reach the run queue before we start
        result = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=opts.seconds + 300)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    load1 = os.getloadavg()[0]
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
    if result.returncode != 0 or not lines:
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1], "load": load1}
    return {**json.loads(lines[-1][len(MARK) :]), "load": load1}


def cpu_description() -> tuple[str, str]:
    """``lscpu``'s model name and flags (empty where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "", ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return fields.get("Model name", "").strip(), fields.get("Flags", "").strip()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_dir", default=None, help="Meta-format checkpoint (default: the demo model)")
    parser.add_argument("--engines", default="native,torch", help="comma-separated: native, torch")
    parser.add_argument("--tokens", type=int, default=128, help="decode steps at most per measurement")
    parser.add_argument("--seconds", type=float, default=8.0, help="decode time at most per measurement")
    parser.add_argument("--variants", action="store_true", help="also: threads never lowered, and each OpenMP wait policy")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="native", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker:
        worker(opts)
        return

    cores = os.cpu_count() or 1
    model, flags = cpu_description()
    print(f"CPU: {model} ({cores} logical cores)")
    print(f"flags: {flags}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    # (label, threads, extra environment); threads 0 = the library's default.
    settings = [("default", 0, {}), ("1 thread", 1, {})]
    if opts.variants:
        settings += [
            (f"{cores} thr, never lowered", cores, {FIXED: "1"}),
            (f"{cores} thr, OMP_WAIT_POLICY=active", cores, {"OMP_WAIT_POLICY": "active"}),
            (f"{cores} thr, OMP_WAIT_POLICY=passive", cores, {"OMP_WAIT_POLICY": "passive"}),
            (f"{cores} thr, libgomp default wait", cores, {"LLAMA_OMP_DEFAULTS": "1"}),
        ]
    header = f"{'engine':<7} {'threads':<36} {'idle tok/s':>10} {'(load)':>7} {'loaded tok/s':>12} {'(load)':>7}"
    rows = []
    for engine in opts.engines.split(","):
        for label, threads, env in settings:
            idle = measure(opts, engine, threads, env, loaded=False)
            busy = measure(opts, engine, threads, env, loaded=True)
            rows.append((engine, label, idle, busy))
            print(f"  measured {engine} / {label}: {cell(idle)} idle, {cell(busy)} loaded", file=sys.stderr, flush=True)
    print()
    print(header)
    for engine, label, idle, busy in rows:
        used = idle.get("threads")
        name = f"{label} ({used})" if used is not None and label == "default" else label
        print(f"{engine:<7} {name:<36} {cell(idle):>10} {idle['load']:7.2f} {cell(busy):>12} {busy['load']:7.2f}")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("(load) = 1-minute load average right after the measurement; loaded = beside `python -c 'while True: pass'`")


def cell(result: dict) -> str:
    return f"{result['tok_s']:.2f}" if "tok_s" in result else "error"


if __name__ == "__main__":
    main()
