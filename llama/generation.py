"""``Llama``: build a model + tokenizer from a checkpoint, then complete text and chats.

Meta's API and semantics (``Llama.build``, ``generate``, ``text_completion``, ``chat_completion``)
on any device: CUDA or CPU, one plain ``python`` process or ``torchrun`` ranks. Only rank 0
prints; other ranks compute the same thing silently (``Llama.is_main_process``).
"""

import codecs
import numbers
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, TypedDict, Union

import torch

from llama import cuda_graph, fp8, hugepages, sampling
from llama.chat_format import ChatFormat
from llama.chat_format_llama2 import Llama2ChatFormat
from llama.cuda_graph import GraphedDecodeStep
from llama.checkpoint import check_layout, find_shards, int8_folder, load_params, load_transformer, verify_checkpoint
from llama.datatypes import ChatPrediction, CompletionPrediction, Dialog
from llama.devices import CpuThreads, check_device, compile_decode_step, default_device, resolve_dtype
from llama.diagnose import NonFiniteLogitsError, nonfinite_logits_message
from llama.family import AnyTokenizer, load_tokenizer
from llama.fast import speed_up
from llama.hooks import hook_dicts, hooked
from llama.mapped_embedding import release_after_lookup
from llama.memory import check_fits, plan_memory
from llama.model import Transformer
from llama.parallel import parallelize, setup_model_parallel
from llama.quantize import int8_transform
from llama.quantize.int4 import int4_transform, pack_model
from llama.quantize.int4 import unsupported as int4_unsupported
from llama.sampling import all_finite, check_temperature, check_top_p, sample_next
from llama.tokenizer import Tokenizer


QUANTIZE = (None, "int8", "int4", "fp8")  # Llama.build(quantize=...): llama/quantize/, llama/fp8.py


class TokenEvent(TypedDict):
    """One token produced for one batch row by ``generate_stream``.

    ``text`` is the newly completed text (empty while a multi-byte character is still incomplete);
    ``is_stop`` marks the stop token that ended the row (``generate`` drops it; its text is empty
    unless it flushes an unfinished character as U+FFFD).
    """

    row: int
    token: int
    text: str
    is_stop: bool


def chat_format_for(tokenizer: AnyTokenizer) -> Union[ChatFormat, Llama2ChatFormat]:
    """The dialog encoder matching ``tokenizer.chat_format`` ("llama2", "llama3" or "chatml")."""
    if tokenizer.chat_format == "llama2":
        return Llama2ChatFormat(tokenizer)
    return ChatFormat(tokenizer)


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise unless ``value`` is an int >= ``minimum`` (5.5, "64" and True are not); the error names ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")


class Llama:
    """A loaded model and tokenizer with Meta's generation API."""

    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: Optional[str] = None,
        max_seq_len: int = 512,
        max_batch_size: int = 4,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Optional[str | torch.device] = None,
        dtype: Optional[str | torch.dtype] = None,
        compile: bool = False,
        verify: Optional[bool] = None,
        quantize: Optional[str] = None,
    ) -> "Llama":
        """Load ``ckpt_dir`` (params.json + consolidated.NN.pth) and its tokenizer, ready to generate.

        Runs as a plain process (one rank) or under ``torchrun`` (one rank per process; any shard
        count that divides or is divided by the number of ranks). ``tokenizer_path`` defaults to
        ``ckpt_dir/tokenizer.model``. Fails before allocating when the weights plus a KV cache of
        ``max_batch_size x max_seq_len`` do not fit in the device's free memory.

        On a CUDA GPU (one process) each one-token decode step is replayed from a CUDA graph of the
        model's eager kernels, captured in the first step (``llama.cuda_graph``; ``LLAMA_CUDA_GRAPH=0``
        turns it off). ``compile`` runs it through ``torch.compile`` instead (static shapes: the step
        attends over the whole cache with a position mask; see ``compile_decode_step``). The first
        generation compiles (minutes on a GPU, where kernels are tuned); later ones are faster
        still (benchmarks/RESULTS-cuda.md). Prefill stays eager.

        ``verify``: None checks the files against ``checklist.chk`` when there is one and they were
        not verified before (``llama.checkpoint.verify_checkpoint``), True always, False never.

        ``quantize="int8"``: after loading, every projection (wq ... w3 and output) is stored as int8
        with one scale per output row (``llama.quantize``), half the bytes of bf16: faster decoding
        where reading the weights is the cost (CPUs; benchmarks/README.md), at a small accuracy cost
        (docs/models.md). Each weight is quantized as it is read (on the CPU), so the 16-bit model
        never has to fit in memory. An int8 folder (``python -m llama.quantize``) loads as such with
        no ``quantize`` argument (``"int8"`` changes nothing), on N ranks or a multiple of N for N files.
        ``quantize="int4"`` (one rank): every projection whose shape torch's int4 kernels take (all of
        Llama 3's) stored as 4-bit codes with a bf16 scale and zero point per group of 128 weights
        along a row (``llama.quantize.int4``), about a quarter of bf16's bytes, multiplied by
        torch's int4 kernels on CUDA and on the CPU (bf16 activations); quantized as it is read, as
        int8 is. Not with int8 folders (their int8 values are not the 16-bit weights) nor several ranks.
        ``quantize="fp8"`` (CUDA GPUs of compute capability >= 8.9): after loading, the feed-forward
        weights of every layer but the first and the last are multiplied in FP8, as in Meta's FP8
        folders (``llama.fp8``); those folders themselves stay FP8 on such GPUs without it.
        """
        start = time.time()
        check_int("max_seq_len", max_seq_len, 2)
        check_int("max_batch_size", max_batch_size, 1)
        check_int("seed", seed, 0)
        if model_parallel_size is not None:
            check_int("model_parallel_size", model_parallel_size, 1)
        if verify not in (None, True, False):
            raise TypeError(f"verify must be None (auto), True or False, got {verify!r}")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        if not isinstance(ckpt_dir, (str, os.PathLike)):
            raise TypeError(f"ckpt_dir must be a checkpoint folder's path (str or Path), got {ckpt_dir!r}")
        device = check_device(device) if device is not None else default_device()  # names the devices here
        rank, world_size, local_rank = setup_model_parallel(model_parallel_size, device.type)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        dtype = resolve_dtype(dtype, device)
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize={quantize!r} is not supported: use one of {QUANTIZE}")
        if quantize == "fp8" and not fp8.fp8_supported(device):
            raise ValueError(
                f"quantize='fp8' multiplies in FP8, which needs a CUDA GPU of compute capability 8.9 or more "
                f"(Ada, Hopper), not {device}; Meta's FP8 folders load on any device without it (as {dtype})"
            )
        if quantize == "int4" and (why := int4_unsupported(device)) is not None:
            raise ValueError(f"quantize='int4' cannot run on {device}: {why}; quantize='int8' runs everywhere")

        if Path(ckpt_dir).is_file():  # a .pth or a .gguf given where the folder goes
            how = "; import a GGUF with python -m llama.gguf import" if str(ckpt_dir).endswith(".gguf") else ""
            raise ValueError(f"{ckpt_dir} is a file: give its folder (params.json + consolidated.NN.pth){how}")
        if not Path(ckpt_dir).is_dir():  # before the tokenizer, whose default path is inside it
            raise FileNotFoundError(f"checkpoint folder not found: {ckpt_dir}")
        folder = Path(ckpt_dir)
        if not (folder / "params.json").exists() and (folder / "config.json").exists():  # before "no tokenizer.model"
            original = " (its original/ subfolder holds Meta's files)" if (folder / "original" / "params.json").exists() else ""
            raise ValueError(
                f"{ckpt_dir} is a Hugging Face folder (config.json, no params.json){original}: use the Meta-format "
                f"original/ folder, or convert it with python -m llama.convert hf-to-meta {ckpt_dir} OUT"
            )
        tokenizer_file = Path(tokenizer_path) if tokenizer_path else Path(ckpt_dir) / "tokenizer.model"
        tokenizer = load_tokenizer(tokenizer_file)  # tiktoken (Llama 3) or SentencePiece (Llama 2), by content
        args = load_params(ckpt_dir, vocab_size=tokenizer.n_words)  # Llama 2's vocab_size -1: the tokenizer's
        if args.vocab_size != tokenizer.n_words:
            raise ValueError(
                f"{Path(ckpt_dir) / 'params.json'} has vocab_size={args.vocab_size}, but the tokenizer "
                f"{tokenizer_file} has {tokenizer.n_words} tokens: is it the tokenizer of this checkpoint?"
            )
        if not 2 <= max_seq_len <= args.max_context:
            llama30 = not args.use_scaled_rope and tokenizer.n_words == 128256  # not the demo model, not Llama 2
            raise ValueError(
                f"max_seq_len={max_seq_len} must be between 2 and the model's context of {args.max_context} tokens"
                + (" (Llama 3.0; 3.1 checkpoints with use_scaled_rope allow 131072)" if llama30 else "")
            )
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be at least 1")
        # An int8 folder (llama.quantize): int8 as stored, on a multiple of its file count as ranks.
        int8 = int8_folder(ckpt_dir, world_size) is not None
        if int8 and quantize == "fp8":
            raise ValueError(
                f"{ckpt_dir} is an int8 folder (python -m llama.quantize); quantize='fp8' needs 16-bit weights: "
                f"build the folder it was quantized from with quantize='fp8', or this one without quantize"
            )
        if quantize == "int4" and int8:
            raise ValueError(
                f"{ckpt_dir} is an int8 folder (python -m llama.quantize); quantize='int4' needs 16-bit weights: "
                f"build the folder it was quantized from with quantize='int4', or this one without quantize"
            )
        if quantize == "int4" and world_size > 1:
            raise ValueError(f"quantize='int4' runs on one rank only, not {world_size}: use quantize='int8' or no quantize")
        # Meta's FP8 folders stay FP8 on GPUs that multiply it (one file per rank); else bf16 at load
        # (and for int4, which quantizes those 16-bit weights).
        keep_fp8 = quantize != "int4" and fp8.keep_fp8(ckpt_dir, device, world_size)
        # quantize="int8" quantizes each weight as it is read (the peak is the int8 model);
        # quantize="fp8" after loading (the peak is the 16-bit model).
        planned = "fp8" if keep_fp8 else "int8" if quantize == "int8" or int8 else "int4" if quantize == "int4" else None
        if world_size > 1:  # a rank count that cannot split the files: said before the minutes of verifying
            check_layout(args, len(find_shards(ckpt_dir)), world_size)
        plan = plan_memory(args, max_seq_len, max_batch_size, dtype, world_size, quantize=planned)
        check_fits(plan, device)
        if rank == 0:  # before the load, which can take minutes: what it will take, and where
            print(f"Memory plan on {device}: {plan.describe()}", file=sys.stderr, flush=True)
        log = (lambda m: print(m, file=sys.stderr, flush=True)) if rank == 0 else (lambda m: None)
        for note in args.notes:  # a RoPE factor chosen for a Llama 3.2 shape, a params.json key ignored
            log(f"note: {note}")
        verify_checkpoint(ckpt_dir, verify, log, rank, world_size)

        transform = int8_transform if quantize == "int8" and not int8 else int4_transform if quantize == "int4" else None
        if device.type == "cpu" and hugepages.available():  # decoding streams them: llama/hugepages.py
            transform = hugepages.after(transform)
        model = load_transformer(
            ckpt_dir, device, dtype, rank, world_size, parallelize if world_size > 1 else None, args=args,
            progress=rank == 0, keep_fp8=keep_fp8, transform=transform,
        )
        if quantize == "int4":  # the nibbles made at load, in the layout of the device's kernel
            pack_model(model)
        if quantize == "fp8":  # a bf16 folder (or an FP8 one on another rank count): FFN to FP8 now
            fp8.quantize_feed_forward(model)
        model.setup_cache(max_batch_size, max_seq_len, zeros=hugepages.zeros_on_demand)  # resident where written
        speed_up(model, world_size)  # float32 compute of bf16 weights on CPUs without bf16, and more: llama/fast.py
        if device.type == "cpu":  # only the rows a step reads stay resident: llama/mapped_embedding.py
            release_after_lookup(model)
        llama = Llama(model, tokenizer, rank=rank, seed=seed, compile=compile, world_size=world_size)
        llama.ckpt_dir = Path(ckpt_dir)
        llama.log(f"Loaded {ckpt_dir} on {device} as {dtype} ({world_size} rank(s)) in {time.time() - start:.2f} s")
        return llama

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, rank: int = 0, seed: int = 1, compile: bool = False, world_size: int = 1
    ):
        if model.max_seq_len == 0:
            raise ValueError("the model has no KV cache: call model.setup_cache(max_batch_size, max_seq_len) first")
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = chat_format_for(tokenizer)
        self.rank = rank
        self.ckpt_dir: Optional[Path] = None  # named by errors about the weights; set by build
        self.device = model.tok_embeddings.weight.device
        # Sampling draws from this generator only (no global seed), seeded identically on every rank
        # so that all ranks sample the same tokens.
        self.rng = torch.Generator(self.device).manual_seed(seed)
        # The static-shape one-token step (start_pos passed as a tensor: one graph for every position):
        # compiled, or on a GPU replayed from a CUDA graph (llama/cuda_graph.py); None: eager steps.
        self.decode_step: Optional[Callable[..., torch.Tensor]] = None
        if compile:
            self.decode_step = compile_decode_step(model, self.device)
        elif cuda_graph.enabled(self.device, world_size):
            self.decode_step = GraphedDecodeStep(model)

    @property
    def is_main_process(self) -> bool:
        """Rank 0: the one process that prints."""
        return self.rank == 0

    def log(self, message: str) -> None:
        """Print on rank 0 only (to stderr, so stdout carries only generated text)."""
        if self.is_main_process:
            print(message, file=sys.stderr, flush=True)

    def _check_request(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, temperature: float, top_p: float) -> None:
        if isinstance(prompt_tokens, (str, bytes, dict)) or not hasattr(prompt_tokens, "__len__"):
            raise TypeError(
                f"prompt_tokens must be a list of prompts, each a list of token ids, got a {type(prompt_tokens).__name__}: "
                f"{prompt_tokens!r:.60} (text goes to text_completion, or tokenizer.encode first)"
            )
        bsz, limits = len(prompt_tokens), (self.model.max_batch_size, self.model.max_seq_len)
        if bsz == 0:
            raise ValueError("empty batch: give at least one prompt")
        if bsz > limits[0]:
            raise ValueError(f"batch of {bsz} prompts exceeds max_batch_size={limits[0]}; rebuild with a larger one")
        for i, p in enumerate(prompt_tokens):
            if isinstance(p, (str, bytes, dict)) or not hasattr(p, "__len__") or not hasattr(p, "__iter__"):
                raise TypeError(f"prompt {i} must be a list of token ids (ints), got {type(p).__name__}: {p!r:.60}")
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if isinstance(p, torch.Tensor):
                if p.dim() != 1 or p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
                    raise TypeError(
                        f"prompt {i}: a tensor of token ids must be 1-D of an integer dtype, got {p.dtype} {tuple(p.shape)}"
                    )
            else:
                for j, t in enumerate(p):  # 1.7 or "5" would be truncated or fail deep in torch; numpy ints are fine
                    if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                        raise TypeError(f"prompt {i}, token {j}: {t!r} is a {type(t).__name__}; token ids must be ints")
            if len(p) > limits[1] or (len(p) == limits[1] and max_gen_len != 0):
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; it must be shorter than max_seq_len={limits[1]} "
                    f"to leave room for generation"
                )
            if min(p) < 0 or max(p) >= self.tokenizer.n_words:
                raise ValueError(f"prompt {i} has token ids outside 0..{self.tokenizer.n_words - 1}")
        check_int("max_gen_len", max_gen_len, 0)  # 0: score the prompts only (_score)
        check_temperature(temperature)
        check_top_p(top_p)

    @torch.inference_mode()
    def _steps(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
    ) -> Iterator[tuple[int, torch.Tensor, list[bool], list[bool], Optional[torch.Tensor], list[int]]]:
        """The decode loop. Yields (pos, tokens [B, total], is_new [B], stopped_now [B], logprobs
        [B, total], the tokens at pos [B]); the per-row lists are on the host.

        Prompts are left-aligned in one [B, total] tensor; the first step prefills the shortest
        prompt's length, then each step feeds one position for every row. A row still inside its
        prompt keeps its prompt token, so each row computes exactly what it would alone. Which rows
        are new, stop or are done is kept in Python lists: each torch operator between two
        memory-bound steps costs several microseconds with the caches cold (~0.2 ms a step for the
        dozen this took as tensors, 2-3% of the demo model's step).
        """
        self._check_request(prompt_tokens, max_gen_len, temperature, top_p)
        bsz = len(prompt_tokens)
        lengths = [len(p) for p in prompt_tokens]
        limits = [n + max_gen_len for n in lengths]  # a row generates positions len(prompt) ... limit - 1
        min_len, max_len = min(lengths), max(lengths)
        total = min(self.model.max_seq_len, max_gen_len + max_len)
        tokens = torch.zeros((bsz, total), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompt_tokens):
            tokens[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        positions = torch.arange(total, device=self.device)
        in_prompt = positions[None, :] < torch.tensor(lengths, device=self.device)[:, None]  # [B, total]
        # float32 whatever torch's default dtype (Meta's CPU code sets bf16 globally)
        token_logprobs = torch.zeros((bsz, total), dtype=torch.float32, device=self.device) if logprobs else None
        stop_tokens = set(self.tokenizer.stop_tokens)
        stopped = [False] * bsz

        # The compiled step's inputs: the same tensors every step, so its guards (shapes, strides) always hold.
        step_tokens = torch.zeros((bsz, 1), dtype=torch.long, device=self.device)
        start_pos = torch.zeros((), dtype=torch.long, device=self.device)

        prev = 0
        # On CPUs: fewer threads while other processes keep cores busy (llama.devices.CpuThreads). Not
        # with the compiled step: its graph is specialized for a thread count (a change recompiles).
        threads = CpuThreads() if self.device.type == "cpu" and self.decode_step is None else None
        # The graphed or compiled step runs no module's hooks: while one is registered, the plain
        # forward steps instead (llama.hooks; checked each step, a hook may come mid-answer).
        hooks = hook_dicts(self.model.modules()) if self.decode_step is not None else []
        try:
            for cur in range(min_len, total):
                if threads is not None:
                    threads.adjust()
                fast = self.decode_step is not None and cur - prev == 1 and not hooked(hooks)
                if fast and isinstance(self.decode_step, GraphedDecodeStep):
                    logits = self.decode_step(tokens[:, prev:cur], prev)  # copies into the graph's own inputs
                elif fast:  # total <= max_seq_len: in bounds
                    step_tokens.copy_(tokens[:, prev:cur])
                    logits = self.decode_step(step_tokens, start_pos.fill_(prev), last_only=not logprobs)
                else:
                    logits = self.model(tokens[:, prev:cur], prev, last_only=not logprobs)  # [B, S or 1, V]
                if not all_finite(logits[:, -1]):  # a broken checkpoint: never sample from NaN or inf
                    message = nonfinite_logits_message(self.model, tokens[:, prev:cur], prev, cur, self.ckpt_dir)
                    raise NonFiniteLogitsError(message)
                nxt = sample_next(logits[:, -1], temperature, top_p, self.rng)
                if cur < max_len:  # a row still inside its prompt keeps its prompt token
                    tokens[:, cur] = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
                    values = tokens[:, cur].tolist()
                else:
                    tokens[:, cur] = nxt
                    values = nxt.tolist()
                if token_logprobs is not None:
                    # Log-probability of each next token under the logits that predicted it.
                    targets = tokens[:, prev + 1 : cur + 1]
                    token_logprobs[:, prev + 1 : cur + 1] = sampling.token_logprobs(logits, targets)
                is_new = [lengths[r] <= cur < limits[r] and not stopped[r] for r in range(bsz)]
                stopped_now = [is_new[r] and values[r] in stop_tokens for r in range(bsz)]
                stopped = [a or b for a, b in zip(stopped, stopped_now)]
                yield cur, tokens, is_new, stopped_now, token_logprobs, values
                prev = cur
                if all(stopped[r] or cur + 1 >= limits[r] for r in range(bsz)):
                    break
        finally:
            if threads is not None:
                threads.restore()

    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Continue each prompt; returns (tokens, logprobs) per row, the stop token not included.

        ``echo`` includes the prompt (its first token has logprob 0.0). Rows end at the first
        ``<|end_of_text|>``/``<|eot_id|>``/``<|eom_id|>``, after ``max_gen_len`` tokens, or at max_seq_len.
        ``max_gen_len=0`` generates nothing, as in Meta's code: with ``logprobs`` and ``echo`` it
        scores the prompts (each token's logprob given the tokens before it), a prompt may then
        fill ``max_seq_len``.
        """
        out_tokens, out_logprobs, _ = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        return out_tokens, (out_logprobs if logprobs else None)

    def _generate(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo):
        """generate() plus the stop token of each row (None when it ran out of tokens)."""
        if max_gen_len == 0:
            self._check_request(prompt_tokens, max_gen_len, temperature, top_p)
            tokens, lps = self._score(prompt_tokens, logprobs)
            keep = (lambda row: row) if echo else (lambda row: [])
            return [keep(t) for t in tokens], [keep(lp) for lp in lps], [None] * len(tokens)
        end, tokens, token_logprobs = 0, None, None
        stop_at: dict[int, tuple[int, int]] = {}
        for cur, tokens, _is_new, stopped_now, token_logprobs, values in self._steps(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs
        ):
            end = cur + 1
            stop_at.update((row, (cur, values[row])) for row, stop in enumerate(stopped_now) if stop)
        if tokens is None:  # only when the prompts already fill the cache: _check_request prevents it
            raise RuntimeError("no generation step ran")
        rows_tokens, rows_logprobs, stops = [], [], []
        all_tokens = tokens[:, :end].tolist()
        all_logprobs = token_logprobs[:, :end].tolist() if token_logprobs is not None else None
        for row, prompt in enumerate(prompt_tokens):
            start = 0 if echo else len(prompt)
            stop = stop_at.get(row)
            finish = stop[0] if stop else min(end, len(prompt) + max_gen_len)
            rows_tokens.append(all_tokens[row][start:finish])
            rows_logprobs.append(all_logprobs[row][start:finish] if all_logprobs is not None else [])
            stops.append(stop[1] if stop else None)
        return rows_tokens, rows_logprobs, stops

    @torch.inference_mode()
    def _score(self, prompt_tokens: Sequence[Sequence[int]], logprobs: bool) -> tuple[list[list[int]], list[list[float]]]:
        """Each prompt and, with ``logprobs``, its tokens' logprobs (the first 0.0) from one forward
        over the batch; nothing is sampled (``max_gen_len=0``)."""
        rows = [[int(t) for t in p] for p in prompt_tokens]
        if not logprobs:
            return rows, [[] for _ in rows]
        total = max(map(len, rows))
        tokens = torch.zeros((len(rows), total), dtype=torch.long, device=self.device)  # 0s after a short prompt:
        for i, p in enumerate(rows):  # causal attention, so they change nothing before them
            tokens[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        logits = self.model(tokens, 0)  # [B, total, V] float32
        if not all_finite(logits):
            raise NonFiniteLogitsError(nonfinite_logits_message(self.model, tokens, 0, total, self.ckpt_dir))
        lps = torch.zeros((len(rows), total), dtype=torch.float32, device=self.device)
        lps[:, 1:] = sampling.token_logprobs(logits[:, :-1], tokens[:, 1:])
        return rows, [lp[: len(p)] for lp, p in zip(lps.tolist(), rows)]

    def generate_stream(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
    ) -> Iterator[list[TokenEvent]]:
        """Like ``generate``, but yields each step's new tokens (one event per row that produced one).

        Text is decoded incrementally per row, so a character split across tokens appears whole in
        the event that completes it; a row's last event flushes an unfinished one as U+FFFD, so the
        texts add up to ``tokenizer.decode`` of the row. A row's last event is its stop token
        (``is_stop``), if any.
        """
        check_int("max_gen_len", max_gen_len, 1)  # a stream of nothing: generate(max_gen_len=0) scores
        decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in prompt_tokens]
        # The last position each row can generate: its budget or the end of the cache, whichever is first.
        ends = [min(self.model.max_seq_len, len(p) + max_gen_len) - 1 for p in prompt_tokens]
        for cur, _, is_new, stopped_now, _, values in self._steps(prompt_tokens, max_gen_len, temperature, top_p, False):
            events: list[TokenEvent] = []
            for row in (r for r, new in enumerate(is_new) if new):
                token, stop = values[row], stopped_now[row]
                data = b"" if stop else self.tokenizer.decode_bytes([token])
                text = decoders[row].decode(data, final=stop or cur == ends[row])
                events.append({"row": row, "token": token, "text": text, "is_stop": stop})
            if events:
                yield events

    def chat_stream(
        self, dialog: Dialog, temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None
    ) -> Iterator[TokenEvent]:
        """Stream the assistant's answer to one dialog, token by token (the last event may be the stop)."""
        prompt = self.formatter.encode_dialog_prompt(dialog)
        return self._stream_one(prompt, temperature, top_p, max_gen_len)

    def text_stream(
        self, prompt: str, temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None
    ) -> Iterator[TokenEvent]:
        """Stream the continuation of one text prompt (BOS prepended), token by token."""
        return self._stream_one(self.tokenizer.encode(prompt, bos=True, eos=False), temperature, top_p, max_gen_len)

    def _stream_one(
        self, prompt: list[int], temperature: float, top_p: float, max_gen_len: Optional[int]
    ) -> Iterator[TokenEvent]:
        # Default: whatever room the cache leaves after the prompt (a prompt that fills it is refused).
        max_gen_len = max(self.model.max_seq_len - len(prompt), 1) if max_gen_len is None else max_gen_len
        # Checked now, at the call: the generator's body would run only when first iterated.
        check_int("max_gen_len", max_gen_len, 1)
        check_temperature(temperature)
        check_top_p(top_p)
        return (event for events in self.generate_stream([prompt], max_gen_len, temperature, top_p) for event in events)

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> list[CompletionPrediction]:
        """Complete each prompt (BOS prepended). ``max_gen_len`` None means up to max_seq_len - 1."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise ValueError(f"text_completion takes a list of prompts, got a {type(prompts).__name__}: use [prompt]")
        for i, x in enumerate(prompts):
            if not isinstance(x, str):
                raise ValueError(f"prompt {i} is a {type(x).__name__}, not a str (token ids go to generate())")
        max_gen_len = self.model.max_seq_len - 1 if max_gen_len is None else max_gen_len
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        if logprobs:
            return [
                {"generation": self.tokenizer.decode(t), "tokens": [self.tokenizer.decode([x]) for x in t], "logprobs": lp}
                for t, lp in zip(tokens, lps)
            ]
        return [{"generation": self.tokenizer.decode(t)} for t in tokens]

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> list[ChatPrediction]:
        """Answer each dialog as the assistant.

        The generated message carries ``stop_reason`` ("end_of_turn", "end_of_message",
        "out_of_tokens") and, for Llama 3.1 tool use, the parsed ``tool_calls``.
        """
        if isinstance(dialogs, (str, dict)) or not isinstance(dialogs, (list, tuple)):
            raise ValueError(f"chat_completion takes a list of dialogs, got a {type(dialogs).__name__}")
        if dialogs and isinstance(dialogs[0], dict):
            raise ValueError("chat_completion takes a list of dialogs, got one dialog (a list of messages): use [dialog]")
        max_gen_len = self.model.max_seq_len - 1 if max_gen_len is None else max_gen_len
        prompt_tokens = [self.formatter.encode_dialog_prompt(d, index=i) for i, d in enumerate(dialogs)]
        tokens, lps, stops = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, False)
        out: list[ChatPrediction] = []
        for t, lp, stop in zip(tokens, lps, stops):
            message = self.formatter.decode_assistant_message(t + ([stop] if stop is not None else []))
            pred: ChatPrediction = {"generation": message}
            if logprobs:
                pred["tokens"] = [self.tokenizer.decode([x]) for x in t]
                pred["logprobs"] = lp
            out.append(pred)
        return out


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Meta's ``llama.generation.sample_top_p``: top-p sampling of probs [B, V] -> token ids [B, 1].

    A thin alias of ``llama.sampling.sample_top_p`` (which returns [B]) with Meta's output shape.
    Without ``generator`` it draws from torch's global RNG, as Meta's does.
    """
    return sampling.sample_top_p(probs, p, generator)[:, None]
