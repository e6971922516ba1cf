"""Finding where a forward pass went non-finite, after the logits came out NaN or inf.

Generation checks each step's logits; when they are not finite it re-runs that step with forward
hooks on every module (the model's own forward, unchanged) and names the first module, in
execution order, whose output holds a NaN or inf, and whether that module's weights do.
"""

from pathlib import Path
from typing import Optional

import torch
from torch import nn


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN/inf logits: a corrupt checkpoint, or overflow in float16."""

    user_error = True  # the command-line tools print its message and hint, not a traceback (llama.cli)


def first_nonfinite_module(model: nn.Module, tokens: torch.Tensor, start_pos: int) -> Optional[str]:
    """Re-run ``model(tokens, start_pos)`` and return the name of the first module whose output is not finite.

    The step is recomputed exactly (the KV cache positions it writes get the same values again).
    None when every module's output is finite this time.
    """
    found: list[str] = []

    def hook(name: str):
        def record(_module: nn.Module, _inputs, output) -> None:
            if not found and isinstance(output, torch.Tensor) and output.is_floating_point():
                if not bool(torch.isfinite(output).all()):
                    found.append(name)

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules() if name]
    try:
        model(tokens, start_pos)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def nonfinite_logits_message(
    model: nn.Module, tokens: torch.Tensor, start_pos: int, position: int, ckpt_dir: Optional[Path]
) -> str:
    """The error for non-finite logits predicting ``position``: which module, and what to do."""
    where = f"the checkpoint {ckpt_dir}" if ckpt_dir is not None else "the model's weights"
    name = first_nonfinite_module(model, tokens, start_pos)
    head = f"the model produced non-finite logits (NaN/inf) for position {position}"
    if name is None:
        return f"{head}; {where} may be corrupt: verify it against checklist.chk (Llama.build(..., verify=True))"
    module = model.get_submodule(name)
    bad = {n: int((~torch.isfinite(p)).sum()) for n, p in module.named_parameters()}
    bad = {n: k for n, k in bad.items() if k}
    if bad:
        held = ", ".join(f"{name}.{n} holds {k} NaN/inf value(s)" for n, k in bad.items())
        return (
            f"{head}: the first non-finite output is {name}'s, and {held}: {where} is corrupt; "
            f"re-download it (Llama.build(..., verify=True) checks it against checklist.chk)"
        )
    dtype = next(module.parameters(), torch.empty(0)).dtype
    hint = " (float16 overflow? load in bfloat16 or float32)" if dtype == torch.float16 else ""
    return (
        f"{head}: the first non-finite output is {name}'s, though its weights are finite{hint}; "
        f"check {where} (Llama.build(..., verify=True) compares it with checklist.chk)"
    )
