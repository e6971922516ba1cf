"""Fused projections: each block's wq|wk|wv as one matrix and w1|w3 as one, built after loading.

A batch-1 decode step is memory-bound, and a GPU streams a big matrix closer to its bandwidth than
small ones: one [q; k; v] product and one [w1; w3] product read the same bytes in fewer, larger
passes, with fewer kernels. Llama 3 8B shape on an H200, CUDA-graph steps: 7.43 -> 6.90 ms a token
(benchmarks/RESULTS-cuda.md). Each output row is still one dot product of the
same weight row with the same input, so the function is the plain model's (tests/test_fused_projections.py
checks the logits).

``fuse_projections(model)`` works in place on a loaded model of one rank, block by block, so the
extra memory at any time is one block's q, k, v (or w1, w3) matrices:
- the layers are joined where all of a group are plain linear layers without bias (exactly one of
  ``linear_types``; ``llama.fast`` adds its ``FastLinear``) of one dtype and device, or all
  ``llama.quantize.Int8Linear`` layers of one rank (int8 rows and their float32 row scales are
  concatenated: exact). Anything else (fairscale's layers, FP8, a mix, ``meta`` tensors) is left
  as it is: a model of several ranks is not fused (each rank could fuse its own column slices, but
  nothing measured asks for it yet);
- the joined layer (``attention.wqkv``, ``feed_forward.w13``) is a copy of the group's first layer
  (same class and settings: ``FastLinear``'s compute dtype and kernel, ``Int8Linear``'s kernel)
  holding the concatenated weight, so it multiplies as that layer would;
- ``wq``, ``wk``, ``wv``, ``w1``, ``w3`` stay, as ``Rows`` modules whose ``weight`` (and int8
  ``scale``) is a row slice, a view, of the joined matrix: nothing is duplicated, the old tensors
  are freed, ``model.layers[0].attention.wq.weight`` reads the checkpoint's tensor, and
  ``state_dict()`` has exactly the checkpoint's keys (the joined layers save nothing of their own;
  ``load_state_dict`` writes through the views). ``parameters()`` yields each joined matrix once:
  the model's weight bytes are unchanged. ``.to()`` moves the joined matrices and the views follow.
- the attention keeps its class's behaviour (``llama.fast.DecodeAttention``'s ``attend``, the KV
  cache): its class becomes a subclass of the one it had that overrides ``Attention.project``
  only; the feed-forward's ``forward`` does one product, then ``silu(a) * b``, then ``w2``. Both
  are free of host syncs and data-dependent shapes (the static-shape decode step, ``torch.compile``).

Decisions (no one to ask, so written here):
- this module sits below ``llama.fast`` in tests/test_layering.py (beside ``llama.fused``), because
  ``llama.fast.speed_up`` calls it; it therefore does not import ``FastLinear`` and takes the layer
  classes it may join as an argument, as ``llama.fused.apply_fused`` does;
- ``speed_up`` fuses after ``apply_fast_paths`` (the joined layer copies the fast layer's settings);
  ``apply_fast_paths`` run again on a fused model keeps the fused classes (``keep_fused``);
- where ``llama.fused`` runs the CPU decode step (bf16 on the CPU) nothing is fused: the C step
  reads wq, wk, wv, w1, w3 as separate bf16 layers, and it would see ``Rows`` modules and hand
  every step back to torch; ``speed_up`` says where else it fuses, from measurements;
- ``LLAMA_FUSE_PROJECTIONS=0`` in the environment turns it off in ``speed_up`` (``enabled``); an
  explicit call of ``fuse_projections`` always fuses;
- ``Rows`` is not an ``nn.Linear`` (it has no parameter of its own); calling it still computes its
  slice's product. A fused model's ``load_state_dict(assign=True)`` copies into the views rather
  than assigning, and a view saved on its own with ``torch.save`` writes its whole joined matrix.
"""

import copy
import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from llama.model import Attention, FeedForward, Transformer
from llama.quantize import Int8Linear

GROUPS = {"attention": ("wqkv", ("wq", "wk", "wv")), "feed_forward": ("w13", ("w1", "w3"))}


def enabled() -> bool:
    """False when ``LLAMA_FUSE_PROJECTIONS=0`` is in the environment (``llama.fast.speed_up`` then fuses nothing)."""
    return os.environ.get("LLAMA_FUSE_PROJECTIONS", "1") != "0"


class Rows(nn.Module):
    """Rows [start, stop) of a joined layer: ``weight`` (and ``scale`` for int8) are views of its tensors.

    The joined layer is found by name in the parent's ``_modules`` dict (shared by the shallow
    copies ``llama.fast`` makes of the parent), so the view follows it through ``.to()`` and swaps.
    """

    def __init__(self, siblings: dict, joined: str, start: int, stop: int):
        super().__init__()
        self.__dict__["_siblings"] = siblings  # the parent's _modules: a reference, not a registered child
        self.joined, self.start, self.stop = joined, start, stop

    @property
    def source(self) -> nn.Module:
        return self._siblings[self.joined]

    @property
    def weight(self) -> torch.Tensor:
        return self.source.weight[self.start : self.stop]  # [stop - start, in]

    @property
    def scale(self) -> torch.Tensor:
        if not isinstance(self.source, Int8Linear):
            raise AttributeError("scale: only int8 rows have one")
        return self.source.scale[self.start : self.stop]

    @property
    def in_features(self) -> int:
        return self.source.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"weight": self.weight}
        if isinstance(self.source, Int8Linear):
            tensors["scale"] = self.scale
        return tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This slice's product alone (the fused modules never call it; code that does still gets it)."""
        if isinstance(self.source, Int8Linear):
            return (F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)).to(x.dtype)
        return F.linear(x, self.weight)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, t in self._tensors().items():  # the checkpoint's keys: wq.weight (and wq.scale)
            destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        tensors = self._tensors()
        for name, t in tensors.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
            elif state_dict[key].shape != t.shape:
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(state_dict[key].shape)} from "
                    f"checkpoint, the shape in current model is {tuple(t.shape)}."
                )
            else:
                with torch.no_grad():
                    t.copy_(state_dict[key])  # into the joined matrix
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] not in tensors)

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.stop} of {self.joined}"


class Joined:
    """Mixin of a joined layer: it saves and loads nothing itself (its ``Rows`` views do, under the
    checkpoint's names)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        pass


class FusedQKV:
    """Mixin of a fused attention: q, k, v from one product with [wq; wk; wv] (``Attention.project``)."""

    qkv_sizes: tuple[int, int, int]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.wqkv(x).split(self.qkv_sizes, dim=-1)  # [B, S, Hq*hd], [B, S, Hkv*hd] x 2: views


class FusedGateUp:
    """Mixin of a fused SwiGLU: w2(silu(a) * b) with [a, b] from one product with [w1; w3]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # [..., hidden] each: views
        return self.w2(F.silu(gate) * up)


MIXINS = (Joined, FusedQKV, FusedGateUp)


@functools.cache
def fused_class(base: type, mixin: type) -> type:
    """``base`` with ``mixin``'s methods first: ``FusedDecodeAttention`` keeps ``attend``."""
    if issubclass(base, mixin):
        return base
    return type(f"{mixin.__name__}{base.__name__}", (mixin, base), {"__module__": __name__})


def keep_fused(module: nn.Module, cls: type) -> type:
    """The class to swap ``module`` to instead of ``cls`` (``llama.fast``): ``cls`` with the mixin
    ``module`` was fused with, if any, so that a fused module stays fused."""
    for mixin in MIXINS:
        if isinstance(module, mixin):
            return fused_class(cls, mixin)
    return cls


def joinable(layers: list[nn.Module], linear_types: tuple[type, ...]) -> bool:
    """All plain linear layers of ``linear_types`` (exact class) without bias, or all ``Int8Linear``
    of one rank; 2-D weights of one dtype, device (not ``meta``) and input width."""
    kinds = {type(m) for m in layers}
    if len(kinds) != 1:
        return False
    kind = kinds.pop()
    if kind is Int8Linear:
        if any(m.parallel is not None or m.scale.shape != m.weight.shape[:1] for m in layers):
            return False
    elif kind not in linear_types or any(getattr(m, "bias", None) is not None for m in layers):
        return False
    weights = [getattr(m, "weight", None) for m in layers]
    if not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights):
        return False
    return (
        len({(w.dtype, w.device, w.shape[1]) for w in weights}) == 1
        and weights[0].device.type != "meta"
    )


def join(layers: list[nn.Module]) -> nn.Module:
    """One layer whose weight (and scale) is the row-wise concatenation of ``layers``': a shallow copy
    of the first (its class and settings) with fresh tensors."""
    first = layers[0]
    joined = copy.copy(first)
    joined.__class__ = fused_class(type(first), Joined)
    joined._parameters, joined._buffers, joined._modules = dict(first._parameters), dict(first._buffers), dict(first._modules)
    weight = torch.cat([m.weight.detach() for m in layers])  # [sum of outs, in]
    if isinstance(first, Int8Linear):
        joined._buffers["weight"] = weight
        joined._buffers["scale"] = torch.cat([m.scale for m in layers])  # [sum of outs] float32
    else:
        joined._parameters["weight"] = nn.Parameter(weight, requires_grad=first.weight.requires_grad)
    joined.out_features = weight.shape[0]
    return joined


def _fuse(module: nn.Module, joined_name: str, names: tuple[str, ...], mixin: type, linear_types: tuple[type, ...]) -> bool:
    """Join ``module``'s layers ``names`` into ``joined_name``, leave ``Rows`` views in their place
    and give ``module`` the ``mixin`` class. False (nothing changed) where they are not joinable."""
    layers = [module._modules.get(n) for n in names]
    if isinstance(module, mixin) or not joinable(layers, linear_types):
        return False
    sizes = [m.weight.shape[0] for m in layers]
    if mixin is FusedGateUp and sizes[0] != sizes[1]:
        return False  # w1 and w3 of different widths: not a SwiGLU this forward computes
    module._modules[joined_name] = join(layers)
    del layers  # the old layers (and their tensors) go when the views replace them
    start = 0
    for name, size in zip(names, sizes):
        module._modules[name] = Rows(module._modules, joined_name, start, start + size)
        start += size
    module.__class__ = fused_class(type(module), mixin)
    if mixin is FusedQKV:
        module.qkv_sizes = tuple(sizes)
    return True


@torch.no_grad()
def fuse_projections(model: Transformer, linear_types: tuple[type, ...] = (nn.Linear,)) -> int:
    """Fuse each block's [wq; wk; wv] and [w1; w3] in place, where they are joinable (see the module
    docstring); returns how many modules (attentions and feed-forwards) were fused. A module fused
    already, or not an ``Attention`` / ``FeedForward``, is left as it is."""
    fused = 0
    for block in model.layers:
        attention, feed_forward = block._modules.get("attention"), block._modules.get("feed_forward")
        if isinstance(attention, Attention):
            fused += _fuse(attention, *GROUPS["attention"], FusedQKV, linear_types)
        if isinstance(feed_forward, FeedForward):
            fused += _fuse(feed_forward, *GROUPS["feed_forward"], FusedGateUp, linear_types)
    return fused
