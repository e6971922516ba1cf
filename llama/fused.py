"""The fused decode step: an eager one-token step of every transformer block in one C call.

A small model's decode step is overhead-bound: the demo model (30 layers of dim 576) runs ~40 torch
operators a layer, each a few microseconds of Python and dispatch, while its weights stream from
memory in a fraction of that time (benchmarks/README.md has the profile). ``csrc/decode_layer.c``
(ours, compiled with the other native kernels, ``llama.native``) runs a block's norm, q/k/v
products, RoPE, cache write, attention, wo, residual add and SwiGLU feed-forward in one OpenMP
team, with scratch allocated once per model. ``FusedTransformer`` calls it once per step for all
blocks and the final norm and output product; ``FusedBlock`` once per block where the model's
step cannot (a block it cannot run, a block called on its own). It rounds to bf16 wherever the
plain bf16 model rounds and sums the norms' squares in torch's order, so its logits equal the
per-operator path's bit for bit on the CPUs tested (tests/test_fused.py).

It takes only what it was written for, and hands everything else to the plain model: one token per
row (up to 8 rows, ``apply_fused``) at an int position, not under ``torch.compile`` or autograd,
bf16 contiguous CPU weights in plain (or ``llama.fast``) linear layers (not int8, FP8 or
fairscale's), a bf16 KV cache. ``llama.fast.speed_up`` applies it (one process, bf16 on the CPU,
native kernels available) unless ``LLAMA_FUSED=0`` is in the environment. Its products run the AVX2
loop of ``csrc/bf16_matvec.c`` (the default, ``native.bf16_variant``) whatever ``LLAMA_BF16_KERNEL``
says: that loop was as fast as the AVX-512 one for 1-4 rows on the CPU measured. The model file stays
plain torch: this module swaps classes, as ``llama.fast`` swaps layers.
"""

import copy
import ctypes
import os
from typing import Optional

import torch
from torch import nn

from llama import native
from llama.model import Transformer, TransformerBlock

MAX_ROWS = 8  # rows per call: decode_layer.c's MAX_ROWS
WEIGHTS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# A block this small is overhead-bound at every batch: the demo model's (7 MB) decodes 8 rows 1.75x
# faster fused, though torch's products beat our loop at 8 rows here; a Llama 3.2 1B block (121 MB)
# 5% slower (benchmarks/README.md), so there only the rows where our loop wins take the C call.
SMALL_BLOCK_BYTES = 32 << 20


class LayerStruct(ctypes.Structure):
    """decode_layer.c's ``llama_layer``: one block's weights and cache, and the model's sizes."""

    _fields_ = [(name, ctypes.c_void_p) for name in (*WEIGHTS, "attention_norm", "ffn_norm", "cache_k", "cache_v")]
    _fields_ += [(name, ctypes.c_int64) for name in ("dim", "n_heads", "n_kv_heads", "head_dim", "hidden", "max_batch", "max_seq")]
    _fields_ += [("eps", ctypes.c_float)]


class HeadStruct(ctypes.Structure):
    """decode_layer.c's ``llama_head``: the final norm and output product, for a call that returns logits."""

    _fields_ = [("norm", ctypes.c_void_p), ("output", ctypes.c_void_p), ("vocab", ctypes.c_int64), ("eps", ctypes.c_float)]


def enabled() -> bool:
    """False when ``LLAMA_FUSED=0`` is in the environment (the per-operator fast paths then run)."""
    return os.environ.get("LLAMA_FUSED", "1") != "0"


class Workspace:
    """The float32 scratch of ``llama_decode_layers``, shared by a model's blocks (they run one after
    another), grown only when a call asks for more threads than it was sized for."""

    def __init__(self, lib: ctypes.CDLL, linear_types: tuple[type, ...], max_rows: int):
        self.lib = lib
        self.linear_types = linear_types  # the layer classes whose forward is F.linear of their weight
        self.max_rows = max_rows  # rows (batch) per step that take the C call
        self.buffer = torch.empty(0)
        self.sized_for = (0, 0)  # (threads, max_seq): the scratch depends on both

    def get(self, layer: LayerStruct, threads: int) -> torch.Tensor:
        """The scratch for ``layer``'s sizes and ``threads`` threads."""
        if self.sized_for != (threads, layer.max_seq):
            floats = self.lib.llama_decode_scratch_floats(ctypes.byref(layer), threads)
            if floats > self.buffer.numel():
                self.buffer = torch.empty(floats, dtype=torch.float32)
            self.sized_for = (threads, layer.max_seq)
        return self.buffer


class Plan:
    """One block's part of the C call: its ``LayerStruct``, and the tensors it points into (views
    kept here, so the memory stays valid whatever later happens to the module's parameters)."""

    def __init__(self, block: TransformerBlock, max_rows: int):
        attn, ffn = block.attention, block.feed_forward
        cache = attn.cache
        linears = [getattr(attn, n) for n in WEIGHTS[:4]] + [getattr(ffn, n) for n in WEIGHTS[4:]]
        weights = [m.weight for m in linears] + [block.attention_norm.weight, block.ffn_norm.weight]
        self.cache = cache
        self.tensors = [t.detach() for t in weights + [cache.k, cache.v]]
        # What the block is made of now: a module swapped in (int8 layers, a new attention) shows
        # as another child, a weight replaced (or moved by .to()) as another pointer.
        self.owners = (block._modules, attn._modules, ffn._modules)
        self.children = self.modules_of(block)
        self.sources = [m._parameters for m in linears] + [block.attention_norm._parameters, block.ffn_norm._parameters]
        self.pointers = tuple(w.data_ptr() for w in weights)
        max_batch, n_kv, max_seq, hd = cache.k.shape
        self.layer = LayerStruct(
            *(t.data_ptr() for t in self.tensors),
            dim=attn.wq.weight.shape[1], n_heads=attn.wq.weight.shape[0] // hd, n_kv_heads=n_kv, head_dim=hd,
            hidden=ffn.w1.weight.shape[0], max_batch=max_batch, max_seq=max_seq, eps=block.attention_norm.eps,
        )  # fmt: skip
        self.alone = (LayerStruct * 1)(self.layer)  # the argument of a call for this block alone
        self.dim, self.max_rows = self.layer.dim, min(max_rows, max_batch)

    @staticmethod
    def modules_of(block: TransformerBlock) -> tuple[nn.Module, ...]:
        """The block's attention, feed-forward, norms, projections and cache, in a fixed order."""
        own, attn, ffn = block._modules, block._modules["attention"]._modules, block._modules["feed_forward"]._modules
        top = tuple(own[n] for n in ("attention", "feed_forward", "attention_norm", "ffn_norm"))
        return top + tuple(attn[n] for n in WEIGHTS[:4]) + tuple(ffn[n] for n in WEIGHTS[4:]) + (attn["cache"],)

    def current(self, block: TransformerBlock) -> bool:
        """Whether the block is still made of the modules, cache and weights this plan points at."""
        own, attn, ffn = self.owners
        return (
            own is block._modules
            and own["attention"]._modules is attn
            and own["feed_forward"]._modules is ffn
            and self.modules_of(block) == self.children
            and tuple(p["weight"].data_ptr() for p in self.sources) == self.pointers
        )


def usable(block: TransformerBlock, linear_types: tuple[type, ...]) -> bool:
    """Whether the C step can run ``block``: bf16 contiguous CPU weights without bias in layers of
    exactly ``linear_types`` (not int8, FP8 or fairscale's), a contiguous bf16 cache, one norm eps."""
    attn, ffn = block.attention, block.feed_forward
    cache = getattr(attn, "cache", None)
    linears = [getattr(attn, n, None) for n in WEIGHTS[:4]] + [getattr(ffn, n, None) for n in WEIGHTS[4:]]
    if cache is None or not all(type(m) in linear_types for m in linears):
        return False
    weights = [m.weight for m in linears] + [block.attention_norm.weight, block.ffn_norm.weight]
    tensors = weights + [cache.k, cache.v]
    if not all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return False
    if any(m.bias is not None for m in linears) or block.attention_norm.eps != block.ffn_norm.eps:
        return False
    hd = cache.k.shape[-1]
    wq, wk, w1 = attn.wq.weight, attn.wk.weight, ffn.w1.weight
    return cache.k.shape == cache.v.shape and wq.shape[0] % hd == 0 and wk.shape[0] == cache.k.shape[1] * hd and (
        wq.shape[0] // hd
    ) % cache.k.shape[1] == 0 and w1.shape == ffn.w3.weight.shape


def step_input(x: torch.Tensor, cos: torch.Tensor, start_pos) -> bool:
    """Whether a step's input is one the C call takes: x [B <= 8, 1, dim] contiguous bf16 on the CPU,
    float32 angles, an int position; eager and without autograd (the C call records no graph)."""
    return (
        type(start_pos) is int
        and x.shape[1] == 1
        and 1 <= x.shape[0] <= MAX_ROWS
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.is_contiguous()
        and cos.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def run(
    workspace: Workspace, layers: ctypes.Array, x: torch.Tensor, cos: int, sin: int, start_pos: int,
    head: Optional[HeadStruct] = None,
) -> torch.Tensor:  # fmt: skip
    """``layers`` (one block's ``LayerStruct`` or an array of them, in order) on x [B, 1, dim] bf16 at
    ``start_pos`` in one C call; ``cos``, ``sin``: addresses of the position's float32 angles. Writes
    each layer's cache at start_pos; returns the last layer's output [B, 1, dim], or with ``head``
    the logits [B, 1, vocab] float32 (the model's ``output(norm(h)).float()``)."""
    threads = torch.get_num_threads()
    scratch = workspace.get(layers[0], threads)
    bsz = x.shape[0]
    if head is None:
        out, logits = torch.empty_like(x), None
    else:
        out, logits = None, torch.empty(bsz, 1, head.vocab, dtype=torch.float32)
    args = (x.data_ptr(), out.data_ptr() if out is not None else None, cos, sin, start_pos, bsz)
    args += (scratch.data_ptr(), scratch.numel(), threads, head, logits.data_ptr() if logits is not None else None)
    profiled = torch.autograd.profiler._is_profiler_enabled
    with torch.profiler.record_function("llama::decode_layers") if profiled else _NO_RECORD:  # a row in profiles
        if workspace.lib.llama_decode_layers(layers, len(layers), *args):
            raise ValueError(f"llama_decode_layers refused x of {list(x.shape)} at position {start_pos}")
    return out if logits is None else logits


class FusedBlock(TransformerBlock):
    """``TransformerBlock`` whose eager one-token steps run ``csrc/decode_layer.c`` (see the module
    docstring for when); ``workspace`` None is the plain block."""

    workspace: Optional[Workspace] = None
    plan: Optional[Plan] = None

    def current_plan(self) -> Optional[Plan]:
        """The block's plan, made again after a change of cache or weights; None (from then on) where
        the block has become one the C step cannot run (int8 layers swapped in, another dtype)."""
        plan = self.plan
        if plan is None or not plan.current(self):  # first step, or a new cache or weight
            if self.workspace is None or not usable(self, self.workspace.linear_types):
                self.workspace = self.plan = None  # the plain block from now on (until apply_fused again)
                return None
            plan = self.plan = Plan(self, self.workspace.max_rows)
        return plan

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos, mask=None) -> torch.Tensor:
        if self.workspace is not None and step_input(x, cos, start_pos) and cos.is_contiguous() and sin.is_contiguous():
            plan = self.current_plan()
            if plan is not None and x.shape[0] <= plan.max_rows and x.shape[2] == plan.dim:
                return run(self.workspace, plan.alone, x, cos.data_ptr(), sin.data_ptr(), start_pos)
        return super().forward(x, cos, sin, start_pos, mask)


class FusedTransformer(Transformer):
    """``Transformer`` whose eager one-token steps run every block in one C call, when all are
    ``FusedBlock``s that can (one call instead of one per block: ~10 us of Python and ctypes a
    block saved, benchmarks/README.md); otherwise the plain forward, whose blocks decide each."""

    _fused_layers: Optional[tuple[tuple[Plan, ...], ctypes.Array]] = None
    _fused_head: Optional[tuple] = None  # (norm weight, output weight, their pointers, HeadStruct or None, views)

    def forward(self, tokens: torch.Tensor, start_pos=0, last_only: bool = False) -> torch.Tensor:
        if type(start_pos) is int and tokens.shape[1] == 1 and self._rope_cos is not None:
            bsz = tokens.shape[0]
            if 0 <= start_pos < self.max_seq_len and bsz <= self.max_batch_size:
                h = self.tok_embeddings(tokens)  # [B, 1, dim]
                cos, sin = self._rope_cos, self._rope_sin  # [max_seq_len, head_dim / 2] float32
                fused = self._layers() if step_input(h, cos, start_pos) and cos.is_contiguous() else None
                if fused is not None and bsz <= fused[0][0].max_rows:
                    start = start_pos * cos.stride(0) * cos.element_size()  # the position's row of angles
                    angles = (cos.data_ptr() + start, sin.data_ptr() + start)
                    head = self._head()
                    out = run(self.layers[0].workspace, fused[1], h, *angles, start_pos, head)
                    return out if head is not None else self.output(self.norm(out)).float()  # [B, 1, vocab]
        return super().forward(tokens, start_pos, last_only)

    def _layers(self) -> Optional[tuple[tuple[Plan, ...], ctypes.Array]]:
        """Every block's plan, and their ``LayerStruct``s in one array (made again when a plan
        changes); None when a block is not a ``FusedBlock`` that can run."""
        plans = []
        for block in self.layers:
            plan = block.current_plan() if type(block) is FusedBlock else None
            if plan is None:
                return None
            plans.append(plan)
        cached = self._fused_layers
        if cached is None or len(cached[0]) != len(plans) or any(a is not b for a, b in zip(cached[0], plans)):
            cached = self._fused_layers = (tuple(plans), (LayerStruct * len(plans))(*(p.layer for p in plans)))
        return cached


    def _head(self) -> Optional[HeadStruct]:
        """The final norm and output product for the C call, or None where the output layer is not
        one it can run (another class, int8, not bf16): then torch computes them."""
        linear_types = self.layers[0].workspace.linear_types
        norm, output = self.norm.weight, self.output.weight
        cached = self._fused_head
        if cached is not None and cached[0] is norm and cached[1] is output and cached[2] == (norm.data_ptr(), output.data_ptr()):
            return cached[3]
        usable = type(self.output) in linear_types and self.output.bias is None and all(
            t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in (norm, output)
        )
        head = HeadStruct(norm.data_ptr(), output.data_ptr(), output.shape[0], self.norm.eps) if usable else None
        # The parameters, where their data was, the struct, and views that keep that data alive.
        self._fused_head = (norm, output, (norm.data_ptr(), output.data_ptr()), head, norm.detach(), output.detach())
        return head


class _NoRecord:
    """A context manager that does nothing (``run`` outside the profiler)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


_NO_RECORD = _NoRecord()


def apply_fused(
    model: Transformer, linear_types: tuple[type, ...] = (nn.Linear,), matvec_rows: int = MAX_ROWS
) -> Transformer:
    """Swap ``model``'s blocks for ``FusedBlock``s, in place (returns ``model``), where the compiled
    library is available (``llama.native``); without it the model is left unchanged.

    ``linear_types``: the classes of projection layer the C step may replace, those whose forward
    is ``F.linear(x, weight)`` (``llama.fast`` adds its ``FastLinear``). Each block checks at each
    step that its weights and cache are still the ones it points at (a new cache from
    ``setup_cache``, a weight replaced) and otherwise re-plans, or runs the plain block.

    ``matvec_rows``: the rows for which our matvec loop beats torch's products on this CPU
    (``llama.fast.matvec_rows``). Steps of that many rows take the C call; more rows (up to 8) only
    where a block's weights are small (``SMALL_BLOCK_BYTES``), so that the overhead the call saves
    outweighs torch's faster kernel for many rows.
    """
    lib = native.library()
    if lib is None:
        return model
    declare(lib)
    block_bytes = sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    workspace = Workspace(lib, linear_types, MAX_ROWS if block_bytes <= SMALL_BLOCK_BYTES else matvec_rows)
    for i, block in enumerate(model.layers):
        if not isinstance(block, FusedBlock):
            block = copy.copy(block)  # a shallow copy: the same parameters, buffers and children
            block.__class__ = FusedBlock
        block.workspace, block.plan = workspace, None
        model.layers[i] = block
    if type(model) is Transformer:  # in place: Llama.build keeps its model object
        model.__class__ = FusedTransformer
    return model


def declare(lib: ctypes.CDLL) -> None:
    """Argument and result types of decode_layer.c's two functions."""
    lib.llama_decode_scratch_floats.restype = ctypes.c_int64
    lib.llama_decode_scratch_floats.argtypes = [ctypes.POINTER(LayerStruct), ctypes.c_int]
    lib.llama_decode_layers.restype = ctypes.c_int
    lib.llama_decode_layers.argtypes = [ctypes.POINTER(LayerStruct), ctypes.c_int] + [ctypes.c_void_p] * 4 + [
        ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
        ctypes.POINTER(HeadStruct), ctypes.c_void_p,
    ]  # fmt: skip
