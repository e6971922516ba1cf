"""CPU weights in transparent huge pages (Linux): the same numbers, fewer TLB misses while decoding.

A decode step streams every weight from memory once. With 4 KiB pages a 1B model's 2.5 GB are
600,000 pages, and the page walks of the TLB misses stall the stream; with 2 MiB pages there are
1,200. Measured on a 2-core AMD EPYC (Zen 4), Llama 3.2 1B shape, bf16, batch-1 decode of
``Llama.generate_stream``: weights memory-mapped from the checkpoint (4 KiB pages) 10.3-11.0
tok/s, the same weights copied into huge pages 13.5 tok/s (benchmarks/README.md).

Linux gives huge pages to anonymous memory that asks for them (``madvise(MADV_HUGEPAGE)``) when
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``; torch's allocator does
not ask (unless ``THP_MEM_ALLOC_ENABLE=1`` was set before its first allocation), and a checkpoint
memory-mapped from its file is in 4 KiB pages. So ``Llama.build`` on a CPU copies each weight of
2 MiB or more, as it is loaded, into a mapping of its own, aligned to 2 MiB and advised to use huge
pages (``transform``), and packs the smaller tensors one after another into shared huge-page
chunks (``Arena``; ``after`` does both): a small model's matrices are all under 2 MiB (the demo
model's 270 block tensors, 212 MB), and in 4 KiB pages its decode step took 7.7 ms against 6.0 ms
packed (benchmarks/README.md). The loader then hands the file's pages back, so the peak memory is
one tensor above the model's. The token embedding stays memory-mapped: a lookup reads a few rows,
and copying it would make all of it resident. Where huge pages are off (``never``), not Linux, or
``LLAMA_HUGE_PAGES=0`` is set, nothing is copied.
"""

import mmap
import os
from pathlib import Path
from typing import Callable, Optional

import torch

HUGE_PAGE = 2 << 20  # x86-64's transparent huge page (and arm64's with 4 KiB base pages)
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
SKIPPED = ("tok_embeddings.weight",)  # a lookup table: only the rows of the tokens seen are read

Transform = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def available() -> bool:
    """Whether ``transform`` copies anything here (see the module docstring)."""
    if os.environ.get("LLAMA_HUGE_PAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def empty(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in anonymous memory of its own, 2 MiB-aligned, advised to use
    huge pages. The tensor keeps the mapping alive; it is unmapped when the tensor is freed."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # holds a reference to the mapping
    offset = -whole.data_ptr() % HUGE_PAGE  # a multiple of the base page size: madvise's unit
    region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes + HUGE_PAGE - offset)
    return whole[offset : offset + nbytes].view(dtype).view(shape)


def copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a contiguous CPU tensor) copied into huge pages."""
    out = empty(t.shape, t.dtype)
    out.copy_(t)
    return out


def transform(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """For ``llama.checkpoint.load_state_dict(transform=...)``: a CPU weight of 2 MiB or more, but
    the token embedding, copied into huge pages; anything else passed through."""
    big = t.device.type == "cpu" and t.numel() * t.element_size() >= HUGE_PAGE and t.is_contiguous()
    return {key: copy(t) if big and key not in SKIPPED else t}


class Arena:
    """Huge-page chunks (``empty``) that small tensors are copied into one after another, each at a
    64-byte boundary (a cache line). A chunk lives as long as any tensor in it. Only the 2 MiB pages
    written are backed by memory, so a chunk's unused end costs address space, not RAM."""

    CHUNK = 32 << 20  # bytes a chunk: many small tensors, few mappings
    ALIGN = 64

    def __init__(self) -> None:
        self.chunk: Optional[torch.Tensor] = None  # uint8 [CHUNK] (or one tensor's size, if larger)
        self.used = 0

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (a contiguous CPU tensor) copied into the current chunk, or a new one when it is full."""
        nbytes = t.numel() * t.element_size()
        if self.chunk is None or self.used + nbytes > self.chunk.numel():
            self.chunk, self.used = empty((max(self.CHUNK, nbytes),), torch.uint8), 0
        out = self.chunk[self.used : self.used + nbytes].view(t.dtype).view(t.shape)
        out.copy_(t)
        self.used += -(-nbytes // self.ALIGN) * self.ALIGN
        return out


def after(first: Optional[Transform]) -> Transform:
    """A transform for one model's load: ``first``'s tensors (``llama.quantize.int8_transform``'s,
    say; None: the loaded ones), each of 2 MiB or more then through ``transform``, each smaller CPU
    tensor but the token embedding packed into an ``Arena`` of this load's own."""
    arena = Arena()

    def place(key: str, t: torch.Tensor) -> torch.Tensor:
        small = 0 < t.numel() * t.element_size() < HUGE_PAGE
        if small and key not in SKIPPED and t.device.type == "cpu" and t.is_contiguous():
            return arena.copy(t)
        return transform(key, t)[key]

    def both(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: place(name, value) for name, value in (first(key, t) if first else {key: t}).items()}

    return both
