"""One llama.cpp engine for benchmarks/bench.py, run by the llama-cpp-python venv's Python.

    .venv-llamacpp/bin/python benchmarks/llamacpp_worker.py --gguf FILE --threads N --max-seq-len N

The venv (``scripts/setup_llamacpp.sh``) has llama-cpp-python and numpy but no torch, so this file
imports neither torch nor ``llama``. It speaks bench.py's worker protocol: requests are JSON lines on
stdin, replies are stdout lines starting with ``MARK``. ``generate`` continues one prompt greedily by
exactly ``new_tokens`` tokens (llama.cpp's batch API for several sequences is not exposed by the
binding's high-level class, so batched decoding is reported as not measured): the prompt goes
through ``Llama.eval`` (llama.cpp's prefill, ``n_batch`` tokens at a time), then each step takes the
argmax of the last token's logits and evaluates that one token, as our engines and transformers' greedy
search do. Tokens are ids: no text is tokenized, so the vocabulary plays no part in the timings.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from llama_cpp import Llama

MARK = "@@bench "  # bench.py's MARK


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def generate(llm: Llama, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy: (tokens, seconds to the first new token, seconds to the last)."""
    start = time.perf_counter()
    llm.reset()  # forget the previous run's tokens: the KV cache is reused from position 0
    llm.eval(prompt)
    out, t_first = [], 0.0
    for i in range(new_tokens):
        # The last evaluated token's logits, read in place (the binding keeps them only with
        # logits_all=True, which would make llama.cpp compute the output layer for every prompt token).
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        token = int(np.argmax(logits))
        out.append(token)
        if i == 0:
            t_first = time.perf_counter() - start
        if i + 1 < new_tokens:
            llm.eval([token])
    return out, t_first, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--max-seq-len", type=int, required=True)
    opts = p.parse_args()

    def reply(obj: dict) -> None:
        print(MARK + json.dumps(obj), flush=True)

    start = time.perf_counter()
    llm = Llama(
        model_path=opts.gguf, n_ctx=opts.max_seq_len, n_batch=512, n_threads=opts.threads,
        n_threads_batch=opts.threads, verbose=False,
    )  # fmt: skip
    reply({"load_s": time.perf_counter() - start, "threads": opts.threads})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "generate":
            if len(req["prompts"]) != 1:
                reply({"unsupported": "batched decoding is not measured for llama.cpp"})
                continue
            tokens, t_first, t_last = generate(llm, req["prompts"][0], req["new_tokens"])
            reply({"tokens": [tokens], "t_first": t_first, "t_last": t_last})
        elif req["op"] == "memory":
            reply({"peak_rss": peak_rss(), "peak_gpu": None})
        elif req["op"] == "profile":
            reply({"table": ""})
        elif req["op"] == "exit":
            return


if __name__ == "__main__":
    main()
