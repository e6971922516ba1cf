"""A memory-mapped token embedding that leaves only what a step reads in this process's memory.

On CPUs the token embedding stays memory-mapped from the checkpoint (llama/hugepages.py): a lookup
reads one row per token. But with every page a lookup faults in, Linux maps up to 15 neighbours
already in the page cache (fault-around, 64 KiB), and they stay in the process's resident set.
Measured on the Llama 3.2 1B shape (4 KiB rows, a 501 MiB table): a 512-token prompt left 32 MiB of
the table resident, batch-8 decoding of 8 x 144 tokens 33 MiB more; a long-running process creeps
towards the whole table (1 GiB for 8B). ``MADV_RANDOM`` does not stop fault-around (measured).

So ``release_after_lookup`` hands the table's pages back after each lookup (``madvise(MADV_DONTNEED)``
over its whole pages, ``llama.checkpoint.release_pages``): ~14 us a step for the 1B table. The pages
stay in the page cache; the next read of one is a minor fault. Only where the table lies in one file
mapping that no other tensor of the model reads (an output layer tied to it and read in place would
fault its pages back every step), and not inside ``torch.compile`` (the hook is skipped there).
"""

from typing import Optional

import torch
from torch import nn

from llama.checkpoint import byte_span, mappings, release_pages, whole_pages
from llama.hooks import own


def file_mapping(start: int, end: int) -> Optional[tuple[int, int]]:
    """The address range of the one file mapping (Linux /proc/self/maps, a non-zero inode) that
    holds [start, end); None where none does (ordinary memory, anonymous mappings, not Linux)."""
    for lo, hi, inode, _ in mappings():
        if lo <= start < hi:
            return (lo, hi) if end <= hi and inode != 0 else None
    return None


def release_after_lookup(model: nn.Module) -> bool:
    """Hand ``model.tok_embeddings``' file pages back to the OS after each of its lookups (a forward
    hook), where its weight is a CPU tensor in a file mapping whose pages no other parameter or
    buffer of ``model`` shares. Returns whether the hook was added."""
    embedding = getattr(model, "tok_embeddings", None)
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.device.type != "cpu" or not weight.is_contiguous() or weight.numel() == 0:
        return False
    start, end = byte_span(weight)
    mapping = file_mapping(start, end)
    if mapping is None:
        return False
    first, last = whole_pages(start, end)  # what release_pages hands back
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in tensors:  # a tied output layer is the same tensor under another name
        if name == "tok_embeddings.weight" or t.device.type != "cpu" or t.numel() == 0:
            continue
        a, b = byte_span(t)
        if a < last and first < b:  # reads a page that would be released
            return False

    def release(module: nn.Module, _inputs, _output) -> None:
        if not torch.compiler.is_compiling():
            release_pages(module.weight, [mapping])  # a no-op for a weight no longer in the mapping

    embedding.register_forward_hook(own(release))  # not a user's hook: the fast steps need not step aside (llama.hooks)
    return True
