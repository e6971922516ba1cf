"""Forward hooks and the fast decode steps.

Research code registers forward hooks (``register_forward_hook`` / ``register_forward_pre_hook``,
on a layer or for every module with ``torch.nn.modules.module.register_module_forward_hook``) to
read or steer activations, and expects them to run on every forward, as with Meta's model. The fast
one-token steps call no submodule: the C step (``llama.fused``) runs whole blocks, the CUDA graph
(``llama.cuda_graph``) replays kernels recorded once, the compiled step runs what Dynamo traced
before the hook existed. So each of them steps aside, for that step, while a hook is registered on
a module it would skip (or globally): the plain per-module forward runs and every hook fires.

The check is a scan of hook dictionaries gathered when a step's plan is made (``hook_dicts``):
about a microsecond for a block's modules, nothing allocated. The library's own hooks (``own``:
the memory-mapped embedding's page release) do not count: the fast steps do their work already.
"""

from typing import Callable, Iterable

from torch import nn
from torch.nn.modules import module as _module

_OWN = "_llama_own_hook"


def hook_dicts(modules: Iterable[nn.Module]) -> list[dict]:
    """The forward and forward-pre hook dictionaries of ``modules`` (torch adds a hook to its
    module's dictionary in place, so a list made once sees hooks registered later)."""
    return [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]


def own(hook: Callable) -> Callable:
    """Mark ``hook`` as one of the library's, which ``hooked`` does not count; returns it."""
    setattr(hook, _OWN, True)
    return hook


def hooked(dicts: list[dict]) -> bool:
    """Whether any of ``dicts`` (``hook_dicts``) holds a hook not marked ``own``, or a global module hook is registered."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(dicts) and any(not getattr(h, _OWN, False) for d in dicts if d for h in d.values())
