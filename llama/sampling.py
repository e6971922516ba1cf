"""Choosing the next token from logits: greedy, temperature and top-p, as plain functions; and
whether a step's logits are finite (on the CPU both greedy and that check read them through numpy).

Every random draw comes from an explicit ``torch.Generator``. Sampling is by inverse CDF (one
uniform number per row, searched in the cumulative probabilities of the nucleus), so the fast
top-p path, which sorts only the few most likely tokens, picks exactly the token the full
128,256-entry sort would pick for the same generator state.
"""

import math
from numbers import Real
from typing import Optional

import numpy as np
import torch

# The nucleus almost always lies within the top few dozen tokens; try this many before a full sort.
TOP_P_CANDIDATES = 64
# Logits of these dtypes are read through numpy on the CPU (``argmax``, ``all_finite``).
NUMPY_FLOATS = (torch.float32, torch.float64)


def check_temperature(temperature: float) -> None:
    """Raise unless ``temperature`` is a finite number >= 0 (0 is greedy)."""
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(
            f"temperature must be a number >= 0 (0 is greedy), got {temperature!r} ({type(temperature).__name__})"
        )
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 and finite (0 is greedy)")


def check_top_p(top_p: float) -> None:
    """Raise unless ``top_p`` is a number in (0, 1]."""
    if isinstance(top_p, bool) or not isinstance(top_p, Real):
        raise TypeError(f"top_p must be a number in (0, 1], got {top_p!r} ({type(top_p).__name__})")
    if not 0 < top_p <= 1:  # False for NaN too
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Next token per row from logits [B, V]: greedy when temperature == 0, else top-p sampling. -> [B].

    ``temperature`` must be finite and >= 0, ``top_p`` in (0, 1]. The logits are shifted so that
    each row's largest is 0 before dividing: a tiny temperature (1e-45) then tends to greedy
    (ties shared) instead of overflowing to inf and NaN.
    """
    check_temperature(temperature)
    check_top_p(top_p)
    if temperature == 0:
        return argmax(logits)
    x = logits.float()
    probs = torch.softmax((x - x.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    return sample_top_p(probs, top_p, generator)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, dim=-1)`` of logits [B, V] -> [B]: the first position of each row's
    largest value (of its first NaN, if any).

    Float logits on the CPU go through numpy's argmax, which gives the same index: after a
    memory-bound decode step the caches hold weights, not torch's code, and the finite check and
    the greedy choice together took 0.3-0.6 ms through torch against 0.2-0.3 through numpy (demo
    model and Llama 3.2 1B shape, benchmarks/README.md: a few percent of the demo model's step).
    """
    x = _numpy(logits)
    if x is not None:
        return torch.as_tensor(x.argmax(-1))  # as_tensor: a 0-d result for logits [V] too
    return torch.argmax(logits, dim=-1)


def all_finite(logits: torch.Tensor) -> bool:
    """Whether every value of ``logits`` is finite: its smallest and largest are (NaN spreads to both).
    On the CPU through numpy, for the reason ``argmax`` gives."""
    x = _numpy(logits)
    if x is not None:
        return bool(np.isfinite(x.min()) and np.isfinite(x.max()))
    lo, hi = torch.aminmax(logits)
    return bool(lo.isfinite() & hi.isfinite())


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under logits [B, S, V] (targets [B, S] long): [B, S] float32, whatever the
    logits' dtype (Meta's CPU code sets bf16 as torch's default)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]


def _numpy(logits: torch.Tensor) -> Optional[np.ndarray]:
    """numpy's view of float32/float64 CPU logits (no copy); None for others (bf16, a GPU, autograd)."""
    if logits.device.type == "cpu" and logits.dtype in NUMPY_FLOATS and not logits.requires_grad:
        return logits.numpy()
    return None


def nucleus(probs_sorted: torch.Tensor, p: float) -> torch.Tensor:
    """Zero the tail of descending probs [B, K]: keep the smallest prefix whose mass exceeds p.

    A token is kept when the mass strictly before it is at most p, so the most likely token always
    survives and the prefix mass is the first cumulative sum to exceed p.
    """
    before = torch.cumsum(probs_sorted, dim=-1) - probs_sorted
    return probs_sorted.masked_fill(before > p, 0.0)


def _draw(probs_sorted: torch.Tensor, index: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Inverse-CDF draw from unnormalised descending probs [B, K] with their token ids [B, K] -> [B]."""
    cdf = torch.cumsum(probs_sorted, dim=-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
    return torch.gather(index, -1, choice).squeeze(-1)


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Top-p (nucleus) sampling from probs [B, V] -> token ids [B].

    Sorts only the top ``TOP_P_CANDIDATES`` when, in every row, the candidates more likely than the
    last one already hold more than p of the mass (then no token outside them can be in the nucleus
    or tie with one); otherwise sorts the whole vocabulary.
    """
    k = min(TOP_P_CANDIDATES, probs.shape[-1])
    top, index = torch.topk(probs, k, dim=-1)
    # topk orders equal probabilities arbitrarily: put ties in token-id order, as the stable full sort does.
    index, order = torch.sort(index, dim=-1)
    top, order = torch.sort(top.gather(-1, order), dim=-1, descending=True, stable=True)
    index = index.gather(-1, order)
    # Exact only if the nucleus lies among tokens strictly more likely than the k-th: then no token
    # outside the candidates ties with a nucleus token.
    above_kth = top.masked_fill(top <= top[:, -1:], 0.0).sum(dim=-1)
    if k == probs.shape[-1] or bool((above_kth > p).all()):
        return _draw(nucleus(top, p), index, generator)
    return sample_top_p_full_sort(probs, p, generator)


def sample_top_p_full_sort(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The plain path: sort the whole vocabulary. Kept as the reference the fast path is tested against."""
    probs_sorted, index = torch.sort(probs, dim=-1, descending=True, stable=True)  # ties: lower id first
    return _draw(nucleus(probs_sorted, p), index, generator)
