"""How much of a tensor's memory is mapped into this process now, read from Linux's /proc/self/pagemap."""

import mmap
import os
import struct

import torch

PAGEMAP = "/proc/self/pagemap"
readable = os.access(PAGEMAP, os.R_OK)


def present_pages(t: torch.Tensor) -> int:
    """Pages of ``t``'s bytes mapped into this process (pagemap's bit 63: present), whatever mapping
    or neighbours they share: a mapping's own Rss would count those too."""
    page = mmap.PAGESIZE
    first, last = t.data_ptr() // page, (t.data_ptr() + t.numel() * t.element_size() - 1) // page
    with open(PAGEMAP, "rb") as f:
        f.seek(first * 8)
        entries = struct.unpack(f"{last - first + 1}Q", f.read((last - first + 1) * 8))
    return sum(e >> 63 for e in entries)
