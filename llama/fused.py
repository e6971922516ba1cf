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
blocks whose seven projections are all bf16 contiguous CPU weights in plain (or ``llama.fast``)
linear layers, or all int8 ``llama.quantize.Int8Linear`` layers of one rank (``quantize="int8"``,
an int8 folder, ``quantize_model``; not a mix of the two, FP8 or fairscale's), a bf16 KV cache;
the output layer may be either (``keep_output=True`` leaves it bf16 beside int8 blocks).
``llama.fast.speed_up`` applies it (one process, a bf16 model on the CPU, int8 or not, native
kernels available) unless ``LLAMA_FUSED=0`` is in the environment. Its bf16 products run the AVX2
loop of ``csrc/bf16_matvec.c`` (the default, ``native.bf16_variant``) whatever ``LLAMA_BF16_KERNEL``
says: that loop was as fast as the AVX-512 one for 1-4 rows on the CPU measured; its int8 products
the loop of ``csrc/int8_matvec.c`` that ``Int8Linear``'s kernel runs (``native.int8_variant``,
``int8_matvec.use_variant``), with its scheme (each 32-element block of the input rounded to
int16), so an int8 model's fused logits too equal its per-operator path's bit for bit. The model
file stays plain torch: this module swaps classes, as ``llama.fast`` swaps layers.
"""

import copy
import ctypes
import operator
import os
from typing import Optional

import torch
from torch import nn

from llama import native
from llama.hooks import hook_dicts, hooked
from llama.model import Transformer, TransformerBlock
from llama.quantize import Int8Linear

MAX_ROWS = 8  # rows per call: decode_layer.c's MAX_ROWS
WEIGHTS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
SCALES = tuple(f"{name}_scale" for name in WEIGHTS)  # llama_layer's int8 row scales
# A block this small is overhead-bound at every batch: the demo model's (7 MB) decodes 8 rows 1.75x
# faster fused, though torch's products beat our loop at 8 rows here; a Llama 3.2 1B block (121 MB)
# 5% slower (benchmarks/README.md), so there only the rows where our loop wins take the C call.
SMALL_BLOCK_BYTES = 32 << 20


class LayerStruct(ctypes.Structure):
    """decode_layer.c's ``llama_layer``: one block's weights and cache, and the model's sizes."""

    _fields_ = [(name, ctypes.c_void_p) for name in (*WEIGHTS, *SCALES, "attention_norm", "ffn_norm", "cache_k", "cache_v")]
    _fields_ += [(name, ctypes.c_int64) for name in ("dim", "n_heads", "n_kv_heads", "head_dim", "hidden", "max_batch", "max_seq")]
    _fields_ += [("int8", ctypes.c_int64), ("eps", ctypes.c_float)]


class HeadStruct(ctypes.Structure):
    """decode_layer.c's ``llama_head``: the final norm and output product, for a call that returns logits."""

    _fields_ = [("norm", ctypes.c_void_p), ("output", ctypes.c_void_p), ("output_scale", ctypes.c_void_p)]
    _fields_ += [("vocab", ctypes.c_int64), ("eps", ctypes.c_float)]


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
        linears = projections(block)
        self.int8 = type(linears[0]) is Int8Linear  # all seven are, or none (``usable``)
        norms = [block.attention_norm, block.ffn_norm]
        # Where each tensor the C step reads lives: (the module's dict of parameters or buffers, key).
        kind = "_buffers" if self.int8 else "_parameters"  # Int8Linear's weight and scale are buffers
        weights = [(getattr(m, kind), "weight") for m in linears]
        scales = [(m._buffers, "scale") for m in linears] if self.int8 else []
        self.sources = weights + scales + [(m._parameters, "weight") for m in norms]
        self.cache = cache
        self.tensors = [d[k].detach() for d, k in self.sources] + [cache.k.detach(), cache.v.detach()]
        # What the block is made of now: a module swapped in (int8 layers, a new attention or cache)
        # shows as another object in its parent's dict, a tensor replaced as another object, one
        # whose data moved (``.data =``, ``.to()``) as another pointer, another int8 product too.
        modules = [(block.__dict__, "_modules"), (attn.__dict__, "_modules"), (ffn.__dict__, "_modules")]
        modules += [(block._modules, n) for n in ("attention", "feed_forward", "attention_norm", "ffn_norm")]
        modules += [(attn._modules, n) for n in (*WEIGHTS[:4], "cache")] + [(ffn._modules, n) for n in WEIGHTS[4:]]
        tensors = self.sources + [(cache._buffers, "k"), (cache._buffers, "v")]
        products = [(m.__dict__, "matvec") for m in linears] if self.int8 else []
        self.snapshot = Snapshot(modules + tensors + products, [d[k] for d, k in tensors])
        pointers = dict(zip(WEIGHTS + (SCALES if self.int8 else ()), (t.data_ptr() for t in self.tensors)))
        pointers.update(zip(("attention_norm", "ffn_norm", "cache_k", "cache_v"), (t.data_ptr() for t in self.tensors[-4:])))
        max_batch, n_kv, max_seq, hd = cache.k.shape
        self.layer = LayerStruct(
            **pointers,
            dim=attn.wq.weight.shape[1], n_heads=attn.wq.weight.shape[0] // hd, n_kv_heads=n_kv, head_dim=hd,
            hidden=ffn.w1.weight.shape[0], max_batch=max_batch, max_seq=max_seq, int8=int(self.int8),
            eps=block.attention_norm.eps,
        )  # fmt: skip
        self.alone = (LayerStruct * 1)(self.layer)  # the argument of a call for this block alone
        self.hooks = hook_dicts(list(block.modules())[1:])  # the C call skips these modules' hooks (llama.hooks)
        # int8 blocks take every batch their layers give the kernel (``llama.fast``: 8): the
        # per-operator path runs the same int8 loop for those rows, so the C call is never the
        # slower product. Their kernel is part of what the plan assumes (``current``).
        int8_rows = min(m.matvec_rows for m in linears) if self.int8 else 0
        self.dim, self.max_rows = self.layer.dim, min(int8_rows if self.int8 else max_rows, max_batch)

    def current(self, block: TransformerBlock) -> bool:
        """Whether the block is still made of the modules, cache and weights this plan points at."""
        return block.__dict__ is self.snapshot.owner and self.snapshot.holds()


class Snapshot:
    """What a plan assumes, checked before every step in two passes that run in C (``map``): each
    (dict, key) slot still holds the object it held, and each tensor's data is still where it was.
    ~60 us a step for the demo model's 30 blocks, where a check per block in Python took 150."""

    def __init__(self, slots: list[tuple[dict, str]], tensors: list[torch.Tensor]):
        self.owner = slots[0][0]  # the first slot's dict: the block's own ``__dict__``
        self.dicts, self.keys = [d for d, _ in slots], [k for _, k in slots]
        self.held = list(map(dict.get, self.dicts, self.keys))
        self.tensors = tensors  # among ``held``: once the slots hold, these are the module's tensors
        self.pointers = list(map(torch.Tensor.data_ptr, tensors))

    def holds(self) -> bool:
        """Every slot holds its object (``is``: ``==`` on tensors is elementwise) and every tensor its data."""
        return all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.held)) and (
            list(map(torch.Tensor.data_ptr, self.tensors)) == self.pointers
        )

    @staticmethod
    def join(parts: list["Snapshot"], slots: list[tuple[dict, str]]) -> "Snapshot":
        """One snapshot of ``slots`` and of every part's slots and tensors, as they are now (a
        model's blocks, each just checked: one check a step for all of them)."""
        return Snapshot(
            slots + [(d, k) for p in parts for d, k in zip(p.dicts, p.keys)], [t for p in parts for t in p.tensors]
        )


def _pointer(t: object) -> Optional[int]:
    """A tensor's data pointer; None for anything else (a weight or scale set to None)."""
    return t.data_ptr() if isinstance(t, torch.Tensor) else None


def projections(block: TransformerBlock) -> list[Optional[nn.Module]]:
    """The block's seven projection layers, in ``WEIGHTS`` order (None where one is missing)."""
    attn, ffn = block.attention, block.feed_forward
    return [getattr(attn, n, None) for n in WEIGHTS[:4]] + [getattr(ffn, n, None) for n in WEIGHTS[4:]]


def int8_usable(m: nn.Module) -> bool:
    """Whether the C step can run ``m`` as an int8 product: an ``Int8Linear`` of one rank (no
    reduce or gather) whose product is the native int8 kernel (``llama.fast`` sets it: the loop and
    scheme the C step runs; without it the layer computes in torch, which the C step would not
    equal), int8 [out, in] contiguous CPU weight, float32 [out] contiguous scales."""
    w, scale = getattr(m, "weight", None), getattr(m, "scale", None)
    kernels = native.kernels()
    return (
        type(m) is Int8Linear
        and m.parallel is None
        and kernels is not None
        and m.matvec is kernels.int8_matvec
        and m.matvec_rows >= 1
        and isinstance(w, torch.Tensor)
        and isinstance(scale, torch.Tensor)
        and w.dtype == torch.int8
        and w.dim() == 2
        and scale.dtype == torch.float32
        and tuple(scale.shape) == (w.shape[0],)
        and all(t.device.type == "cpu" and t.is_contiguous() for t in (w, scale))
    )


def usable(block: TransformerBlock, linear_types: tuple[type, ...]) -> bool:
    """Whether the C step can run ``block``: its seven projections either all bf16 contiguous CPU
    weights without bias in layers of exactly ``linear_types`` (not FP8 or fairscale's), or all
    ``Int8Linear``s it can run (``int8_usable``; a block mixing the two is left to torch); bf16
    norms, a contiguous bf16 cache, one norm eps."""
    attn, ffn = block.attention, block.feed_forward
    cache = getattr(attn, "cache", None)
    linears = projections(block)
    if cache is None:
        return False
    norms = [block.attention_norm.weight, block.ffn_norm.weight]
    if all(type(m) is Int8Linear for m in linears):
        if not all(int8_usable(m) for m in linears):
            return False
        tensors = norms + [cache.k, cache.v]
    elif all(type(m) in linear_types for m in linears):
        if any(m.bias is not None for m in linears):
            return False
        tensors = [m.weight for m in linears] + norms + [cache.k, cache.v]
    else:
        return False
    if not all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return False
    if block.attention_norm.eps != block.ffn_norm.eps:
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
            if plan is not None and x.shape[0] <= plan.max_rows and x.shape[2] == plan.dim and not hooked(plan.hooks):
                return run(self.workspace, plan.alone, x, cos.data_ptr(), sin.data_ptr(), start_pos)
        return super().forward(x, cos, sin, start_pos, mask)


class FusedTransformer(Transformer):
    """``Transformer`` whose eager one-token steps run every block in one C call, when all are
    ``FusedBlock``s that can (one call instead of one per block: ~10 us of Python and ctypes a
    block saved, benchmarks/README.md); otherwise the plain forward, whose blocks decide each."""

    _fused_layers: Optional[tuple[tuple[Plan, ...], ctypes.Array, int, list[dict], Snapshot, list[type]]] = None
    _fused_head: Optional[tuple] = None  # (norm, output weight, scale, their pointers, HeadStruct or None, rows, views)

    def forward(self, tokens: torch.Tensor, start_pos=0, last_only: bool = False) -> torch.Tensor:
        if type(start_pos) is int and tokens.shape[1] == 1 and self._rope_cos is not None:
            bsz = tokens.shape[0]
            if 0 <= start_pos < self.max_seq_len and bsz <= self.max_batch_size:
                h = self.tok_embeddings(tokens)  # [B, 1, dim]
                cos, sin = self._rope_cos, self._rope_sin  # [max_seq_len, head_dim / 2] float32
                fused = self._layers() if step_input(h, cos, start_pos) and cos.is_contiguous() else None
                # Not while a hook waits on a module the call skips (llama.hooks): the final norm and
                # output are looked up each step, as _head does (either may have been swapped).
                hooks = fused is not None and (hooked(fused[3]) or hooked(hook_dicts((self.norm, self.output))))  # ~7 us
                if fused is not None and bsz <= fused[2] and not hooks:
                    start = start_pos * cos.stride(0) * cos.element_size()  # the position's row of angles
                    angles = (cos.data_ptr() + start, sin.data_ptr() + start)
                    head, head_rows = self._head()
                    head = head if bsz <= head_rows else None
                    out = run(self.layers[0].workspace, fused[1], h, *angles, start_pos, head)
                    return out if head is not None else self.output(self.norm(out)).float()  # [B, 1, vocab]
        return super().forward(tokens, start_pos, last_only)

    def _layers(self) -> Optional[tuple[tuple[Plan, ...], ctypes.Array, int, list[dict]]]:
        """Every block's plan, their ``LayerStruct``s in one array (made again when a plan changes),
        the rows all of them take, and the hook dictionaries of the blocks and their modules
        (``llama.hooks``); None when a block is not a ``FusedBlock`` that can run."""
        cached = self._fused_layers
        # One check for the whole model while nothing changed: the same blocks, of the same class,
        # each made of what its plan points at (``Snapshot``); else block by block, re-planning.
        if cached is not None and list(map(type, self.layers)) == cached[5] and cached[4].holds():
            return cached[:4]
        plans = []
        for block in self.layers:
            plan = block.current_plan() if type(block) is FusedBlock else None
            if plan is None:
                return None
            plans.append(plan)
        if cached is None or len(cached[0]) != len(plans) or any(a is not b for a, b in zip(cached[0], plans)):
            array, rows = (LayerStruct * len(plans))(*(p.layer for p in plans)), min(p.max_rows for p in plans)
        else:
            array, rows = cached[1], cached[2]
        blocks = [(self.__dict__, "_modules"), (self._modules, "layers"), (self.layers.__dict__, "_modules")]
        blocks += [(self.layers._modules, name) for name in self.layers._modules]
        blocks += [(b.__dict__, name) for b in self.layers for name in ("workspace", "plan")]
        whole = Snapshot.join([p.snapshot for p in plans], blocks)
        hooks = hook_dicts(self.layers.modules())
        self._fused_layers = (tuple(plans), array, rows, hooks, whole, [FusedBlock] * len(plans))
        return self._fused_layers[:4]

    def _head(self) -> tuple[Optional[HeadStruct], int]:
        """The final norm and output product for the C call, and up to how many rows it takes them;
        None where the output layer is not one it can run (another class, FP8, not bf16, an
        ``Int8Linear`` it cannot run): then torch computes them. A bf16 output layer takes the
        rows of bf16 blocks (``Workspace.max_rows``), an int8 one the rows it gives the kernel."""
        workspace = self.layers[0].workspace
        output = self.output
        norm, weight, scale = self.norm.weight, output.weight, getattr(output, "scale", None)
        pointers = (_pointer(norm), _pointer(weight), _pointer(scale), output.__dict__.get("matvec"))
        cached = self._fused_head
        if cached is not None and cached[0] is norm and cached[1] is weight and cached[2] is scale and cached[3] == pointers:
            return cached[4], cached[5]
        bf16_norm = norm.dtype == torch.bfloat16 and norm.device.type == "cpu" and norm.is_contiguous()
        int8 = type(output) is Int8Linear
        if int8:
            usable = bf16_norm and int8_usable(output)
        else:
            usable = bf16_norm and type(output) in workspace.linear_types and output.bias is None and (
                weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.is_contiguous()
            )
        head = None
        if usable:
            head = HeadStruct(norm.data_ptr(), weight.data_ptr(), scale.data_ptr() if int8 else None, weight.shape[0], self.norm.eps)
        rows = output.matvec_rows if int8 else workspace.max_rows
        # The tensors, where their data was, the struct, its rows, and views that keep that data alive.
        views = tuple(t.detach() for t in (norm, weight, scale) if isinstance(t, torch.Tensor))
        self._fused_head = (norm, weight, scale, pointers, head, rows, views)
        return head, rows


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
    is ``F.linear(x, weight)`` (``llama.fast`` adds its ``FastLinear``); blocks of ``Int8Linear``
    layers with the native int8 kernel are taken too, whatever this says. Each block checks at each
    step that its weights and cache are still the ones it points at (a new cache from
    ``setup_cache``, a weight replaced) and otherwise re-plans, or runs the plain block.

    ``matvec_rows``: the rows for which our bf16 matvec loop beats torch's products on this CPU
    (``llama.fast.matvec_rows``). Steps of that many rows take the C call; more rows (up to 8) only
    where a block's weights are small (``SMALL_BLOCK_BYTES``), so that the overhead the call saves
    outweighs torch's faster kernel for many rows. The same rule decides where a bf16 output layer
    beside int8 blocks (``keep_output=True``) is computed; int8 blocks and an int8 output layer
    take the rows their layers give the int8 kernel (8), which is what the per-operator path runs.
    """
    lib = native.library()
    if lib is None:
        return model
    declare(lib)
    block_bytes = weight_bytes(model.layers[0])
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


def weight_bytes(block: nn.Module) -> int:
    """Bytes of a block's weights: its parameters, and its ``Int8Linear`` layers' int8 weights and
    scales (buffers, not parameters)."""
    tensors = list(block.parameters())
    tensors += [t for m in block.modules() if isinstance(m, Int8Linear) for t in m.buffers(recurse=False)]
    return sum(t.numel() * t.element_size() for t in tensors)


def declare(lib: ctypes.CDLL) -> None:
    """Argument and result types of decode_layer.c's two functions."""
    lib.llama_decode_scratch_floats.restype = ctypes.c_int64
    lib.llama_decode_scratch_floats.argtypes = [ctypes.POINTER(LayerStruct), ctypes.c_int]
    lib.llama_decode_layers.restype = ctypes.c_int
    lib.llama_decode_layers.argtypes = [ctypes.POINTER(LayerStruct), ctypes.c_int] + [ctypes.c_void_p] * 4 + [
        ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
        ctypes.POINTER(HeadStruct), ctypes.c_void_p,
    ]  # fmt: skip
