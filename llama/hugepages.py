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
packed (benchmarks/README.md). The copies go 16 MiB at a time and the loader's ``release`` hands
each block's file pages back at once, so a build peaks at the model's own size. The token embedding stays memory-mapped: a lookup reads a few rows,
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

Transform = Callable[..., dict[str, torch.Tensor]]  # llama.checkpoint.Transform


def available() -> bool:
    """Whether ``transform`` copies anything here (see the module docstring)."""
    if os.environ.get("LLAMA_HUGE_PAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def _anonymous(nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    """A private anonymous mapping of ``nbytes`` (> 0) and a uint8 tensor over all of it, which
    keeps the mapping alive; the kernel backs each page, zeroed, when it is first touched."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return region, torch.frombuffer(region, dtype=torch.uint8)


def empty(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in anonymous memory of its own, 2 MiB-aligned, advised to use
    huge pages. The tensor keeps the mapping alive; it is unmapped when the tensor is freed."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    region, whole = _anonymous(nbytes + HUGE_PAGE)
    offset = -whole.data_ptr() % HUGE_PAGE  # a multiple of the base page size: madvise's unit
    region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes + HUGE_PAGE - offset)
    return whole[offset : offset + nbytes].view(dtype).view(shape)


def zeros_on_demand(shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.zeros`` for a CPU KV cache: anonymous memory (4 KiB pages, no huge-page advice), whose
    pages the kernel hands out zeroed when first written. ``torch.zeros`` writes every byte, so a
    cache of max_batch_size x max_seq_len positions is resident before the first token; this one
    costs RAM only for the positions used (a 128k-token cache for a short chat: a few MB, not GBs).
    The whole size is still checked against free memory before loading (``llama.memory``). Another
    device, or no ``mmap.MAP_ANONYMOUS``: ``torch.zeros``."""
    if torch.device(device).type != "cpu" or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(shape, device=device, dtype=dtype)
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    region, whole = _anonymous(nbytes)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # THP "always" would fault 2 MiB at a time: a head's whole stripe
        region.madvise(mmap.MADV_NOHUGEPAGE)
    return whole.view(dtype).view(shape)


COPY_BLOCK = 16 << 20  # bytes copied between two ``release`` calls


def copy(t: torch.Tensor, release: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """``t`` (a contiguous CPU tensor) copied into huge pages, ``COPY_BLOCK`` bytes at a time, each
    block of ``t`` then handed to ``release`` (the loader's: its file pages leave memory at once)."""
    out = empty(t.shape, t.dtype)
    src, dst = t.view(-1), out.view(-1)
    step = max(1, COPY_BLOCK // t.element_size())
    for start in range(0, src.numel(), step):
        dst[start : start + step].copy_(src[start : start + step])
        if release is not None:
            release(src[start : start + step])
    return out


def transform(key: str, t: torch.Tensor, release: Optional[Callable[[torch.Tensor], None]] = None) -> dict[str, torch.Tensor]:
    """For ``llama.checkpoint.load_state_dict(transform=...)``: a CPU weight of 2 MiB or more, but
    the token embedding, copied into huge pages (see ``copy``); anything else passed through."""
    big = t.device.type == "cpu" and t.numel() * t.element_size() >= HUGE_PAGE and t.is_contiguous()
    return {key: copy(t, release) if big and key not in SKIPPED else t}


class Arena:
    """Huge-page chunks (``empty``) that small tensors are copied into one after another, each at a
    64-byte boundary (a cache line). A chunk lives as long as any tensor in it. Only the 2 MiB pages
    written are backed by memory, so a chunk's unused end costs address space, not RAM."""

    CHUNK = 32 << 20  # bytes a chunk: many small tensors, few mappings
    ALIGN = 64

    def __init__(self) -> None:
        self.chunk: Optional[torch.Tensor] = None  # uint8 [CHUNK] (or one tensor's size, if larger)
        self.used = 0

    def empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in the current chunk, or in a new one when it is full."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if self.chunk is None or self.used + nbytes > self.chunk.numel():
            self.chunk, self.used = empty((max(self.CHUNK, nbytes),), torch.uint8), 0
        out = self.chunk[self.used : self.used + nbytes].view(dtype).view(shape)
        self.used += -(-nbytes // self.ALIGN) * self.ALIGN
        return out

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (a contiguous CPU tensor) copied into the arena."""
        return self.empty(t.shape, t.dtype).copy_(t)


def after(first: Optional[Transform]) -> Transform:
    """A transform for one model's load: ``first``'s tensors (``llama.quantize.int8_transform``'s,
    say; None: the loaded ones), each of 2 MiB or more then through ``transform``, each smaller CPU
    tensor but the token embedding packed into an ``Arena`` of this load's own. ``first`` is called
    with ``release`` (the loader's) and ``empty``, an allocator that puts what it makes straight
    into huge pages (a mapping of its own from 2 MiB, else the arena), then not copied again."""
    arena = Arena()

    def place(key: str, t: torch.Tensor, release: Optional[Callable[[torch.Tensor], None]]) -> torch.Tensor:
        small = 0 < t.numel() * t.element_size() < HUGE_PAGE
        if small and key not in SKIPPED and t.device.type == "cpu" and t.is_contiguous():
            return arena.copy(t)
        return transform(key, t, release)[key]

    def both(key: str, t: torch.Tensor, release: Optional[Callable[[torch.Tensor], None]] = None) -> dict[str, torch.Tensor]:
        made: set[int] = set()  # what ``first`` wrote straight into huge pages: kept as it is

        def allocate(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
            small = torch.Size(shape).numel() * dtype.itemsize < HUGE_PAGE
            out = arena.empty(shape, dtype) if small else empty(shape, dtype)
            made.add(out.data_ptr())
            return out

        taken = first(key, t, release=release, empty=allocate) if first else {key: t}
        # The loaded tensor's own pages are released as they are copied; another tensor's (first's) are not file pages.
        return {
            name: value if value.data_ptr() in made else place(name, value, release if value is t else None)
            for name, value in taken.items()
        }

    return both
