"""The one-token decode step replayed from a CUDA graph: the default way to decode on a GPU.

An eager decode step on a GPU is bound by the host, not the GPU: the Llama 3 8B shape launches
~400 kernels a token, and Python plus the launches took ~30 ms a step on an H100 whose GPU needed
~6 (benchmarks/RESULTS-cuda.md). A CUDA graph records those launches once and replays them with
one call. Unlike ``compile=True`` (Inductor: minutes of compilation before the first token), the
graph runs the model's own eager kernels and is captured in well under a second.

``GraphedDecodeStep(model)`` is called like ``model(tokens, start_pos)`` for one token a row
(tokens [B, 1], ``start_pos`` an int or a 0-d tensor) and runs the static-shape step the compiled
step runs (``start_pos`` a 0-d long tensor on the model's device: attention over the whole cache
with a position mask, ``llama.model``); it returns logits
[B, 1, vocab]. The first call for a batch size B captures a graph for it: a warm-up run on a side
stream (it writes the step's keys and values at ``start_pos``, the same values the real step
writes there), then the capture, which runs nothing; every call then copies its inputs into the
graph's own and replays it. The logits are the graph's output tensor, overwritten by the next
replay of that graph: read them before the next step (the generation loop does). A model whose
step cannot be captured (a layer that synchronises with the host) is said so once on stderr and
decodes with the same static-shape step, eagerly.

Graphs are per batch size, each with its own memory pool: a step's activations are small (the
8B shape: ~1 MiB of logits and temporaries per row). A graph records the addresses of everything
it touches: a new KV cache (``setup_cache`` again) is noticed at the next call, which captures
anew; whoever replaces a weight tensor itself (not its values) after the capture calls ``reset()``.
``Llama`` uses it on CUDA for a one-process model unless
``compile=True`` or ``LLAMA_CUDA_GRAPH=0`` (several ranks keep eager steps: their all-reduces
would have to be captured too, untested here).
"""

import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from llama.devices import record_cuda_graph


def enabled(device: torch.device, world_size: int = 1) -> bool:
    """Whether ``Llama`` decodes through a CUDA graph: a CUDA device, one rank, ``LLAMA_CUDA_GRAPH`` not 0."""
    return device.type == "cuda" and world_size == 1 and os.environ.get("LLAMA_CUDA_GRAPH", "1") != "0"


@dataclass
class Captured:
    """One batch size's graph: its input tensors, which each call fills, and its output logits."""

    graph: object  # torch.cuda.CUDAGraph (or a stand-in with .replay())
    tokens: torch.Tensor  # [B, 1] long
    start_pos: torch.Tensor  # 0-d long
    logits: torch.Tensor  # [B, 1, vocab] float32, rewritten by each replay


# (run, tokens, start_pos) -> Captured: records ``run(tokens, start_pos)`` (the logits) into a graph.
Capture = Callable[[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor], Captured]


def capture_cuda_graph(
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokens: torch.Tensor, start_pos: torch.Tensor
) -> Captured:
    """Record ``run(tokens, start_pos)`` into a ``torch.cuda.CUDAGraph`` (``llama.devices.record_cuda_graph``:
    a warm-up run on a side stream first, then the capture)."""
    with torch.cuda.device(tokens.device):
        graph, logits = record_cuda_graph(lambda: run(tokens, start_pos))
    return Captured(graph, tokens, start_pos, logits)


class GraphedDecodeStep:
    """``model``'s static-shape one-token step, one CUDA graph per batch size (see the module docstring)."""

    def __init__(self, model: nn.Module, capture: Optional[Capture] = None):
        self.model = model
        self.capture = capture or capture_cuda_graph
        self.graphs: dict[int, Captured] = {}
        self.cache_ids: list[int] = []  # the KV cache objects the graphs write into
        self.failed: Optional[str] = None  # why a capture failed: then every step runs eagerly

    def _run(self, tokens: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, start_pos, last_only=True)  # S = 1: the last position is the only one

    def __call__(self, tokens: torch.Tensor, start_pos: int | torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """Logits [B, 1, vocab] of the one-token step at ``start_pos`` (an int, or a 0-d tensor on the
        model's device) for tokens [B, 1] (a view is fine: it is copied); see the class."""
        if tokens.dim() != 2 or tokens.shape[1] != 1 or (isinstance(start_pos, torch.Tensor) and start_pos.dim() != 0):
            raise ValueError(
                f"a graphed decode step takes tokens [B, 1] and an int or 0-d tensor start_pos, got tokens "
                f"{tuple(tokens.shape)} and start_pos {start_pos!r:.40}"
            )
        bsz = tokens.shape[0]
        cache_ids = [id(layer.attention.cache) for layer in self.model.layers] + [id(self.model._rope_cos)]
        if cache_ids != self.cache_ids:  # setup_cache made new tensors: the graphs point at freed ones
            self.graphs.clear()
            self.cache_ids = cache_ids
        captured = self.graphs.get(bsz)
        if captured is not None:
            captured.tokens.copy_(tokens)
            captured.start_pos.fill_(start_pos)
            captured.graph.replay()
            return captured.logits
        # Inputs of its own, made once: the caller's tensors may be views, freed or reused.
        pos = torch.tensor(start_pos, dtype=torch.long, device=tokens.device)
        if self.failed is not None:  # this model cannot be captured: the same static-shape step, eager
            return self._run(tokens, pos)
        try:
            captured = self.capture(self._run, tokens.clone(), pos)
        except RuntimeError as e:  # a layer that synchronises with the host, say: decode eagerly
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"note: decoding without a CUDA graph (the step could not be captured: {self.failed})",
                  file=sys.stderr, flush=True)  # fmt: skip
            return self._run(tokens, pos)
        self.graphs[bsz] = captured
        captured.graph.replay()
        return captured.logits

    def reset(self) -> None:
        """Forget every graph (the model's tensors were replaced): the next call captures again."""
        self.graphs.clear()
