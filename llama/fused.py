"""The fused decode step: each transformer block of an eager one-token step in one C call.

A small model's decode step is overhead-bound: the demo model (30 layers of dim 576) runs ~40 torch
operators a layer, each a few microseconds of Python and dispatch, while its weights stream from
memory in a fraction of that time (benchmarks/README.md has the profile). ``FusedBlock`` runs such a
step of a ``TransformerBlock`` in one call of ``csrc/decode_layer.c`` (ours, compiled with the other
native kernels, ``llama.native``): norm, q/k/v products, RoPE, the cache write, attention, wo, the
residual add and the SwiGLU feed-forward in one OpenMP team, with its scratch allocated once per model.
It rounds to bf16 wherever the plain bf16 model rounds, so it differs from the model only by the
order of float32 additions (tests/test_fused.py).

It takes only what it was written for, and hands everything else to the plain block: one token per
row (up to 8 rows) at an int position, not under ``torch.compile`` or autograd, bf16 contiguous CPU
weights in plain (or ``llama.fast``) linear layers (not int8, not fairscale's), a bf16 KV cache.
``llama.fast.speed_up`` applies it (one process, bf16 on CPU, native kernels available) unless
``LLAMA_FUSED=0`` is in the environment. The model file stays plain torch: this module swaps the
blocks' class, as ``llama.fast`` swaps layers.
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


class LayerStruct(ctypes.Structure):
    """decode_layer.c's ``llama_layer``: one block's weights and cache, and the model's sizes."""

    _fields_ = [(name, ctypes.c_void_p) for name in (*WEIGHTS, "attention_norm", "ffn_norm", "cache_k", "cache_v")]
    _fields_ += [(name, ctypes.c_int64) for name in ("dim", "n_heads", "n_kv_heads", "head_dim", "hidden", "max_batch", "max_seq")]
    _fields_ += [("eps", ctypes.c_float)]


def enabled() -> bool:
    """False when ``LLAMA_FUSED=0`` is in the environment (the per-operator fast paths then run)."""
    return os.environ.get("LLAMA_FUSED", "1") != "0"


class Workspace:
    """The float32 scratch of ``llama_decode_layers``, shared by a model's blocks (they run one after
    another), grown only when a call asks for more threads than it was sized for."""

    def __init__(self, lib: ctypes.CDLL, linear_types: tuple[type, ...]):
        self.lib = lib
        self.linear_types = linear_types  # the layer classes whose forward is F.linear of their weight
        self.buffer = torch.empty(0)
        self.threads = 0

    def get(self, layer: LayerStruct, threads: int) -> torch.Tensor:
        if threads > self.threads:
            floats = self.lib.llama_decode_scratch_floats(ctypes.byref(layer), threads)
            self.buffer, self.threads = torch.empty(floats, dtype=torch.float32), threads
        return self.buffer


class Plan:
    """One block's C call: its ``LayerStruct``, and the tensors it points into (kept alive here, so
    the pointers stay valid whatever happens to the module)."""

    def __init__(self, block: TransformerBlock, workspace: Workspace):
        attn, ffn = block.attention, block.feed_forward
        cache = attn.cache
        linears = [getattr(attn, n) for n in WEIGHTS[:4]] + [getattr(ffn, n) for n in WEIGHTS[4:]]
        weights = [m.weight for m in linears] + [block.attention_norm.weight, block.ffn_norm.weight]
        self.cache = cache
        self.tensors = weights + [cache.k, cache.v]
        # Where the weights live now: a module given another weight (or a .to()) shows a new pointer.
        self.sources = [m._parameters for m in linears] + [block.attention_norm._parameters, block.ffn_norm._parameters]
        self.pointers = tuple(w.data_ptr() for w in weights)
        max_batch, n_kv, max_seq, hd = cache.k.shape
        self.layer = LayerStruct(
            *(t.data_ptr() for t in self.tensors),
            dim=attn.wq.weight.shape[1], n_heads=attn.wq.weight.shape[0] // hd, n_kv_heads=n_kv, head_dim=hd,
            hidden=ffn.w1.weight.shape[0], max_batch=max_batch, max_seq=max_seq, eps=block.attention_norm.eps,
        )  # fmt: skip
        self.workspace = workspace
        self.call = workspace.lib.llama_decode_layers

    def current(self, block: TransformerBlock) -> bool:
        """Whether the block still has the weights and cache this plan points at."""
        return (
            block.attention._modules.get("cache") is self.cache
            and tuple(p["weight"].data_ptr() for p in self.sources) == self.pointers
        )

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int) -> torch.Tensor:
        """The block's output for x [B, 1, dim] bf16 at ``start_pos``; writes the cache at start_pos."""
        threads = torch.get_num_threads()
        scratch = self.workspace.get(self.layer, threads)
        out = torch.empty_like(x)
        args = (x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(), start_pos, x.shape[0])
        if self.call(ctypes.byref(self.layer), 1, *args, scratch.data_ptr(), scratch.numel(), threads):
            raise ValueError(f"llama_decode_layers refused x of {list(x.shape)} at position {start_pos}")
        return out


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


class FusedBlock(TransformerBlock):
    """``TransformerBlock`` whose eager one-token steps run ``csrc/decode_layer.c`` (see the module
    docstring for when); ``workspace`` None is the plain block."""

    workspace: Optional[Workspace] = None
    plan: Optional[Plan] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos, mask=None) -> torch.Tensor:
        if (
            self.workspace is not None
            and type(start_pos) is int
            and x.shape[1] == 1
            and 1 <= x.shape[0] <= MAX_ROWS
            and x.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and x.is_contiguous()
            and cos.dtype == torch.float32
            and cos.is_contiguous()
            and sin.is_contiguous()
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        ):
            plan = self.plan
            if plan is None or not plan.current(self):  # first step, or a new cache or weight
                if not usable(self, self.workspace.linear_types):
                    self.workspace = self.plan = None  # the plain block from now on (until apply_fused again)
                    return super().forward(x, cos, sin, start_pos, mask)
                plan = self.plan = Plan(self, self.workspace)
            if x.shape[0] <= plan.layer.max_batch and x.shape[2] == plan.layer.dim:
                if torch.autograd.profiler._is_profiler_enabled:  # one named row per block in a profile
                    with torch.profiler.record_function("llama::decode_layer"):
                        return plan.run(x, cos, sin, start_pos)
                return plan.run(x, cos, sin, start_pos)
        return super().forward(x, cos, sin, start_pos, mask)


def apply_fused(model: Transformer, linear_types: tuple[type, ...] = (nn.Linear,)) -> Transformer:
    """Swap ``model``'s blocks for ``FusedBlock``s, in place (returns ``model``), where the compiled
    library is available (``llama.native``); without it the model is left unchanged.

    ``linear_types``: the classes of projection layer the C step may replace, those whose forward
    is ``F.linear(x, weight)`` (``llama.fast`` adds its ``FastLinear``). Each block checks at each
    step that its weights and cache are still the ones it points at (a new cache from
    ``setup_cache``, a weight replaced) and otherwise re-plans, or runs the plain block.
    """
    lib = native.library()
    if lib is None:
        return model
    declare(lib)
    workspace = Workspace(lib, linear_types)
    for i, block in enumerate(model.layers):
        if not isinstance(block, FusedBlock):
            block = copy.copy(block)  # a shallow copy: the same parameters, buffers and children
            block.__class__ = FusedBlock
        block.workspace, block.plan = workspace, None
        model.layers[i] = block
    return model


def declare(lib: ctypes.CDLL) -> None:
    """Argument and result types of decode_layer.c's two functions."""
    lib.llama_decode_scratch_floats.restype = ctypes.c_int64
    lib.llama_decode_scratch_floats.argtypes = [ctypes.POINTER(LayerStruct), ctypes.c_int]
    lib.llama_decode_layers.restype = ctypes.c_int
    lib.llama_decode_layers.argtypes = [ctypes.POINTER(LayerStruct), ctypes.c_int] + [ctypes.c_void_p] * 4 + [
        ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
    ]  # fmt: skip
