"""The engines the benchmark compares, each behind one small interface, plus the checkpoints they read.

An engine loads a checkpoint once, then ``generate(prompts, new_tokens)`` continues every prompt
greedily by exactly ``new_tokens`` tokens (no early stop) and returns the tokens with two wall
times: when the first new token of every row was known (prefill) and when the last one was.

- ``ours``: ``llama.Llama`` eager; ``ours-int8``: the int8 folder ``python -m llama.quantize`` writes
  (made once, in the workdir beside the transformers copy); ``ours-int8-load``: ``quantize="int8"`` on the 16-bit folder
  (the same model, quantized while loading: a higher peak RSS); ``ours-int4``: ``quantize="int4"``
  (torch's int4 kernels; layers of widths that are not multiples of 128 stay 16-bit); ``ours-compile``: ``Llama.build(..., compile=True)``;
  ``ours-torch``: eager with ``LLAMA_NATIVE=0``, i.e. torch's kernels instead of the native bf16
  kernels (llama/native.py), to show what they buy on the same run.
- ``hf``: transformers ``LlamaForCausalLM`` with its default (dynamic) cache and SDPA attention;
  ``hf-compile``: the same with a static cache and ``torch.compile`` of the decode step, the
  recipe transformers documents for fast generation.

Both read the same random weights: ``write_hf_copy`` rewrites our Meta-format checkpoint as a
transformers folder (the only numerical change is the q/k row order of rotary embeddings).
"""

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Protocol

import torch

from llama.checkpoint import write_random_checkpoint
from llama.gguf_export import export_gguf
from llama.convert import meta_to_hf
from llama.model import ModelArgs
from llama.params import to_dict

ENGINES = ("ours", "ours-int8", "ours-int8-load", "ours-int4", "ours-compile", "ours-torch", "hf", "hf-compile", "llamacpp-bf16", "llamacpp-q8")
# llama.cpp engines: (GGUF type written by our exporter, llama/gguf_export.py). They run in their own
# venv (scripts/setup_llamacpp.sh) through benchmarks/llamacpp_worker.py, not through load_engine.
LLAMACPP = {"llamacpp-bf16": "bf16", "llamacpp-q8": "q8_0"}
LLAMACPP_PYTHON = Path(__file__).resolve().parents[1] / ".venv-llamacpp" / "bin" / "python"


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, float]:
        """Greedy continuation of exactly ``new_tokens`` per row -> (tokens, t_first, t_last) in seconds."""
        ...


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ours:
    """``llama.Llama`` as a user builds it; stop tokens disabled so every run has the same length."""

    def __init__(
        self, ckpt_dir: Path, device: str, dtype: torch.dtype, max_batch: int, max_seq_len: int, compile: bool,
        quantize: Optional[str] = None,
    ):  # fmt: skip
        from llama.generation import Llama

        self.llama = Llama.build(
            str(ckpt_dir), max_seq_len=max_seq_len, max_batch_size=max_batch, device=device, dtype=dtype,
            compile=compile, quantize=quantize, verify=False,
        )  # fmt: skip
        self.llama.tokenizer.stop_tokens = [-1]  # no id is -1: rows never stop early (like HF's min_new_tokens)
        self.device = self.llama.device

    def kernel_path(self) -> str:
        """Which fast paths this model runs (``llama.fast``), read off its modules."""
        return describe_paths(self.llama.model)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, float]:
        out: list[list[int]] = [[] for _ in prompts]
        sync(self.device)
        start = time.perf_counter()
        t_first = t_last = 0.0
        for events in self.llama.generate_stream(prompts, max_gen_len=new_tokens, temperature=0.0):
            for e in events:  # reading the tokens waits for the device
                out[e["row"]].append(e["token"])
            t_last = time.perf_counter() - start
            if not t_first:
                t_first = t_last
                self.first_threads = torch.get_num_threads()  # the prompt's (llama.devices.CpuThreads)
        return out, t_first, t_last


    @torch.inference_mode()
    def profile_step(self, prompt: list[int]) -> str:
        """torch.profiler's top ops of one batch-1 decode step after ``prompt`` (the timed step's own path)."""
        model = self.llama.model
        tokens = torch.tensor([prompt], device=self.device)
        model(tokens, 0, last_only=True)
        step = self.llama.decode_step or model
        compiled = self.llama.decode_step is not None
        for pos in (len(prompt), len(prompt) + 1):  # a warm-up step, then the profiled one
            start = torch.tensor(pos, device=self.device) if compiled else pos
            with torch.profiler.profile(activities=activities(self.device)) as prof:
                step(tokens[:, -1:], start, last_only=True)
                sync(self.device)
        return top_ops(prof, self.device)


def describe_paths(model: torch.nn.Module) -> str:
    """One line: the kernels a built model uses for few-row products, prompts, attention and int8."""
    from llama import native
    from llama.fast import DecodeAttention, FastLinear
    from llama.quantize import Int8Linear

    mods = list(model.modules())
    fast = [m for m in mods if isinstance(m, FastLinear)]
    int8 = [m for m in mods if isinstance(m, Int8Linear)]
    rows = max((m.matvec_rows for m in fast if m.matvec is not None), default=0)
    prompt = {str(m.compute_dtype or m.weight.dtype).removeprefix("torch.") for m in fast}
    kernels = native.kernels()
    loop = f" ({kernels.matvec.variant} loop but single rows up to 4096)" if kernels and kernels.matvec.variant == "avx512bf16" else ""
    parts = [f"bf16 kernel for <= {rows} rows{loop}" if rows else "no bf16 kernel",
             f"longer products in {'/'.join(sorted(prompt)) or '-'} (torch)"]  # fmt: skip
    if any(isinstance(m, DecodeAttention) and m.kernel is not None for m in mods):
        parts.append("one-token attention kernel")
    if int8:
        variant = kernels.int8_matvec.variant if kernels and any(m.matvec for m in int8) else "torch"
        parts.append(f"int8 products: {variant}")
    blocks = sorted({type(b).__name__ for b in getattr(model, "layers", [])})
    parts.append(f"blocks: {'/'.join(blocks)}")
    return "; ".join(parts)


def ensure_gguf(meta_dir: Path, folder: Path, gguf_type: str) -> tuple[Path, float]:
    """The GGUF copy of ``meta_dir`` (our exporter) in ``folder``; reused when present.
    Returns (path, seconds spent writing: 0 when reused)."""
    out = folder / f"model-{gguf_type}.gguf"
    if out.exists():
        return out, 0.0
    start = time.perf_counter()
    export_gguf(meta_dir, out, gguf_type)
    return out, time.perf_counter() - start


def activities(device: torch.device) -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    return acts + [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else acts


def top_ops(prof, device: torch.device, rows: int = 10) -> str:
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=50)


class _Timestamps:
    """A transformers streamer that records when each step's tokens arrive (the first call is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HF:
    """transformers ``LlamaForCausalLM`` from a converted folder; greedy ``generate`` with a streamer for timings."""

    def __init__(self, hf_dir: Path, device: str, dtype: torch.dtype, max_seq_len: int, compile: bool):
        from transformers import CompileConfig, LlamaForCausalLM

        self.device = torch.device(device)
        self.model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(self.device).eval()
        self.kwargs: dict = {"do_sample": False, "temperature": None, "top_p": None, "pad_token_id": 0}
        if compile:
            # Static cache + compiled decode step. transformers compiles automatically only on GPUs;
            # _compile_all_devices is its own switch for doing the same on CPU.
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            config = CompileConfig(fullgraph=True, dynamic=False, mode=mode)
            config._compile_all_devices = True
            self.kwargs["compile_config"] = config
        self.compile = compile
        self.max_seq_len = max_seq_len
        self.caches: dict[int, object] = {}  # batch size -> StaticCache of max_seq_len positions

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, float]:
        lengths = {len(p) for p in prompts}
        if len(lengths) != 1:
            raise ValueError("the benchmark gives every row the same prompt length (no padding)")
        ids = torch.tensor(prompts, device=self.device)
        kwargs = dict(self.kwargs)
        if self.compile:
            # One static cache per batch size, always max_seq_len long: the compiled step keeps its
            # shapes from call to call (a cache sized prompt + new tokens would recompile it).
            from transformers import StaticCache

            cache = self.caches.get(len(prompts))
            if cache is None:
                cache = StaticCache(config=self.model.config, max_cache_len=self.max_seq_len)
                self.caches[len(prompts)] = cache
            else:
                cache.reset()
            kwargs["past_key_values"] = cache
        stamps = _Timestamps()
        sync(self.device)
        start = time.perf_counter()
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            streamer=stamps,
            **kwargs,
        )
        sync(self.device)
        end = time.perf_counter()
        # stamps.times[0]: the prompt, before prefill; [1]: the first new token; [-1]: the last.
        return out[:, ids.shape[1] :].tolist(), stamps.times[1] - start, end - start


    @torch.inference_mode()
    def profile_step(self, prompt: list[int]) -> str:
        """torch.profiler's top ops of one batch-1 decode step after ``prompt`` (eager forward, dynamic cache)."""
        ids = torch.tensor([prompt], device=self.device)
        cache = self.model(ids, use_cache=True, logits_to_keep=1).past_key_values
        for _ in range(2):  # a warm-up step, then the profiled one
            with torch.profiler.profile(activities=activities(self.device)) as prof:
                self.model(ids[:, -1:], past_key_values=cache, use_cache=True, logits_to_keep=1)
                sync(self.device)
        return top_ops(prof, self.device)


def load_engine(
    name: str, ckpt_dir: Path, hf_dir: Path, device: str, dtype: torch.dtype, max_batch: int, max_seq_len: int
) -> Engine:
    if name == "ours-torch":
        os.environ["LLAMA_NATIVE"] = "0"  # this worker process only
        return Ours(ckpt_dir, device, dtype, max_batch, max_seq_len, compile=False)
    if name == "ours-int8":  # the int8 folder `python -m llama.quantize` writes, beside the checkpoint
        return Ours(ensure_int8_folder(ckpt_dir, hf_dir.parent / "int8"), device, dtype, max_batch, max_seq_len, compile=False)
    if name in ("ours-int8-load", "ours-int4"):  # the 16-bit folder quantized while loading
        quantize = "int8" if name == "ours-int8-load" else "int4"
        return Ours(ckpt_dir, device, dtype, max_batch, max_seq_len, compile=False, quantize=quantize)
    if name in ("ours", "ours-compile"):
        return Ours(ckpt_dir, device, dtype, max_batch, max_seq_len, compile=name == "ours-compile")
    if name in ("hf", "hf-compile"):
        return HF(hf_dir, device, dtype, max_seq_len, compile=name == "hf-compile")
    raise ValueError(f"unknown engine {name!r}; choose from {ENGINES}")


# ------------------------------------------------------------------------------------------------
# Checkpoints


def ensure_checkpoints(
    root: Path, name: str, args: ModelArgs, dtype: torch.dtype, tokenizer: Path, seed: int = 0
) -> tuple[Path, Path, float]:
    """Meta-format and transformers copies of random weights under ``root/name``; reused when complete.

    Returns (meta_dir, hf_dir, seconds spent writing: 0 when reused).
    """
    tag = f"{name}-{str(dtype).removeprefix('torch.')}-seed{seed}"
    meta_dir, hf_dir = root / tag / "meta", root / tag / "hf"
    done = root / tag / "complete.json"
    want = {"params": to_dict(args), "dtype": str(dtype), "seed": seed}
    if done.is_file() and json.loads(done.read_text()) == want:
        return meta_dir, hf_dir, 0.0
    start = time.perf_counter()
    write_random_checkpoint(meta_dir, args, seed=seed, dtype=dtype, tokenizer_path=tokenizer)
    shutil.rmtree(hf_dir, ignore_errors=True)  # a copy left by an interrupted run
    meta_to_hf(meta_dir, hf_dir)  # the project's converter: rotate-half wq/wk rows, config.json
    done.write_text(json.dumps(want) + "\n")
    return meta_dir, hf_dir, time.perf_counter() - start


def ensure_int8_folder(meta_dir: Path, out: Path) -> Path:
    """The int8 folder of ``meta_dir`` (``python -m llama.quantize``) at ``out``, written once."""
    from llama.quantize_folder import quantize_folder

    if not out.exists():  # quantize_folder renames a finished folder into place: one that exists is complete
        quantize_folder(meta_dir, out, log=lambda message: None)
    return out


def ensure_demo(root: Path) -> tuple[Path, Path, float]:
    """The demo model (``llama.demo``, SmolLM2-135M-Instruct in bf16) and its transformers copy
    under ``root/demo``. Returns (meta_dir, hf_dir, seconds spent writing: 0 when reused)."""
    from llama.demo import default_checkpoint

    meta_dir = default_checkpoint()
    hf_dir, done = root / "demo" / "hf", root / "demo" / "complete.json"
    want = {"source": str(meta_dir), "params": json.loads((meta_dir / "params.json").read_text())}
    if done.is_file() and json.loads(done.read_text()) == want:
        return meta_dir, hf_dir, 0.0
    start = time.perf_counter()
    shutil.rmtree(hf_dir, ignore_errors=True)
    meta_to_hf(meta_dir, hf_dir)
    done.write_text(json.dumps(want) + "\n")
    return meta_dir, hf_dir, time.perf_counter() - start


def meta_tokenizer() -> Path:
    """Meta's Llama 3 tokenizer.model from the llama-models wheel (never committed)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the benchmark needs Meta's tokenizer.model: pip install --no-deps llama-models==0.3.0")
    return Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"
