"""llama/hugepages.py: weights copied into 2 MiB-aligned mappings advised to use huge pages.

What is checked is what the module promises and can be seen from Python: the copy holds the same
bits at a 2 MiB-aligned address in a mapping advised MADV_HUGEPAGE (the kernel's ``hg`` flag in
/proc/self/smaps), only the tensors it names are copied, and a model built with it computes the same
logits as one built without it. Whether the kernel then backs the mapping with huge pages, and
what that buys, is the machine's (benchmarks/README.md).
"""

import mmap
from pathlib import Path

import pytest
import torch

import residency
from llama import hugepages
from llama.checkpoint import write_random_checkpoint
from llama.generation import Llama
from llama.model import ModelArgs
from llama.quantize import Int8Linear, int8_transform

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="transparent huge pages are off or not Linux")


def mapping_lines(t: torch.Tensor) -> list[str]:
    """The /proc/self/smaps lines of the mapping that holds ``t``'s first byte."""
    address, lines, inside = t.data_ptr(), [], False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= address < hi
        elif inside:
            lines.append(line)
    return lines


def advised_huge(t: torch.Tensor) -> bool:
    """Whether the mapping holding ``t`` carries the kernel's MADV_HUGEPAGE flag (``hg``)."""
    return any(l.startswith("VmFlags:") and "hg" in l.split()[1:] for l in mapping_lines(t))


def resident_kib(t: torch.Tensor) -> int:
    """KiB of the mapping holding ``t`` that are in memory (smaps' ``Rss``)."""
    return next(int(l.split()[1]) for l in mapping_lines(t) if l.startswith("Rss:"))


@needs_thp
def test_empty_is_aligned_advised_and_usable():
    t = hugepages.empty((3, 1 << 20), torch.bfloat16)  # 6 MiB
    assert t.shape == (3, 1 << 20) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0 and advised_huge(t)
    t.fill_(2.0)
    assert t.float().sum().item() == 6 * (1 << 20)


@needs_thp
def test_transform_copies_big_weights_only():
    big, small = torch.randn(1024, 1024), torch.randn(16, 16)  # 4 MiB and 1 KiB
    out = hugepages.transform("layers.0.attention.wq.weight", big)["layers.0.attention.wq.weight"]
    assert torch.equal(out, big) and out.data_ptr() != big.data_ptr() and advised_huge(out)
    assert hugepages.transform("norm.weight", small)["norm.weight"] is small
    assert hugepages.transform("tok_embeddings.weight", big)["tok_embeddings.weight"] is big  # a lookup table
    wide = torch.randn(2048, 1024)  # int8: 2 MiB
    both = hugepages.after(int8_transform)("layers.0.feed_forward.w1.weight", wide)
    assert set(both) == {"layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w1.scale"}
    q = both["layers.0.feed_forward.w1.weight"]
    assert q.dtype == torch.int8 and advised_huge(q) and torch.equal(q, int8_transform("layers.0.feed_forward.w1.weight", wide)["layers.0.feed_forward.w1.weight"])


@needs_thp
def test_after_packs_small_tensors_into_shared_huge_pages(monkeypatch):
    """One load's small tensors (a small model's matrices, norms, int8 scales) are copied one after
    another into shared huge-page chunks, 64-byte aligned, equal to their sources; big ones get
    their own mappings; the token embedding is never copied; a new load starts a new arena."""
    place = hugepages.after(None)
    small = {f"layers.{i}.attention.wq.weight": torch.randn(300, 7).to(torch.bfloat16) for i in range(3)}
    out = {k: place(k, t)[k] for k, t in small.items()}
    ptrs = [t.data_ptr() for t in out.values()]
    assert all(torch.equal(out[k], small[k]) and out[k].data_ptr() != small[k].data_ptr() for k in small)
    assert all(advised_huge(t) for t in out.values()) and all(p % 64 == 0 for p in ptrs)
    assert ptrs[1] - ptrs[0] == ptrs[2] - ptrs[1] == -(-300 * 7 * 2 // 64) * 64  # packed, in order
    assert len({t.untyped_storage().data_ptr() for t in out.values()}) == 1  # one chunk
    emb = torch.randn(10, 10)
    assert place("tok_embeddings.weight", emb)["tok_embeddings.weight"] is emb
    big = torch.randn(1024, 1024)
    copied = place("output.weight", big)["output.weight"]
    assert copied.data_ptr() % hugepages.HUGE_PAGE == 0 and torch.equal(copied, big)
    other = hugepages.after(None)("norm.weight", torch.ones(4))["norm.weight"]
    assert other.untyped_storage().data_ptr() != out["layers.0.attention.wq.weight"].untyped_storage().data_ptr()
    # int8 first: the scale (float32 [300], 1.2 KB) and the int8 matrix both packed.
    copy = hugepages.Arena.copy
    monkeypatch.setattr(hugepages.Arena, "copy", lambda self, t: pytest.fail("int8 copied again") if t.dtype == torch.int8 else copy(self, t))
    w = torch.randn(300, 64)
    both = hugepages.after(int8_transform)("layers.0.feed_forward.w1.weight", w)
    assert set(both) == {"layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w1.scale"}
    assert all(advised_huge(t) for t in both.values())
    expected = int8_transform("layers.0.feed_forward.w1.weight", w)
    assert all(torch.equal(both[k], expected[k]) for k in expected)  # quantized straight into the arena
    # A chunk fills, then the next starts.
    arena = hugepages.Arena()
    arena.CHUNK = 4096
    a, b = arena.copy(torch.zeros(1000, dtype=torch.uint8)), arena.copy(torch.zeros(4000, dtype=torch.uint8))
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() and b.data_ptr() % hugepages.HUGE_PAGE == 0


@needs_thp
def test_after_streams_big_tensors_block_by_block(monkeypatch):
    """A loaded tensor is copied into huge pages a block at a time, each block then released (the
    loader's hook, in order, covering it all); int8 values are quantized straight into huge pages
    (no copy afterwards) while the 16-bit source is released block by block."""
    monkeypatch.setattr(hugepages, "COPY_BLOCK", 1 << 20)
    big = torch.randn(1024, 1024)  # 4 MiB: 4 blocks
    released: list[torch.Tensor] = []
    out = hugepages.after(None)("output.weight", big, release=released.append)["output.weight"]
    assert torch.equal(out, big) and advised_huge(out)
    assert [r.data_ptr() for r in released] == [big.data_ptr() + i * (1 << 20) for i in range(4)]
    monkeypatch.setattr(hugepages, "copy", lambda *a: pytest.fail("int8 values copied again"))
    monkeypatch.setattr(Int8Linear, "BLOCK", 1 << 19)  # quantized 512 rows at a time
    wide = torch.randn(2048, 1024).to(torch.bfloat16)  # int8: 2 MiB
    released.clear()
    both = hugepages.after(int8_transform)("layers.0.feed_forward.w1.weight", wide, release=released.append)
    q = both["layers.0.feed_forward.w1.weight"]
    assert advised_huge(q) and torch.equal(q, int8_transform("layers.0.feed_forward.w1.weight", wide)["layers.0.feed_forward.w1.weight"])
    assert [(r.data_ptr(), r.shape[0]) for r in released] == [(wide[i * 512].data_ptr(), 512) for i in range(4)]


needs_smaps = pytest.mark.skipif(
    not hasattr(mmap, "MAP_ANONYMOUS") or not Path("/proc/self/smaps").exists() or not residency.readable,
    reason="residency is read from Linux's /proc/self/smaps and /proc/self/pagemap",
)


def written_kib(t: torch.Tensor) -> int:
    """KiB of ``t``'s own pages in memory, for a tensor whose every page was written (torch.zeros):
    its allocation may share a mapping with others, whose Rss would count theirs too or split it.
    (Not for pages only read: pagemap shows the shared zero page as present, smaps' Rss does not.)"""
    return residency.present_pages(t) * mmap.PAGESIZE >> 10


@needs_smaps
def test_zeros_on_demand_is_resident_only_where_written():
    """A KV cache's zeros take memory where positions are written, not for the whole cache (torch.zeros
    writes every byte: the mutation check below); 4 KiB pages (no ``hg``), so residency follows writes."""
    shape = (4, 8, 4096, 128)  # [B, H, S, hd] bf16: 32 MiB
    t = hugepages.zeros_on_demand(shape, device="cpu", dtype=torch.bfloat16)
    assert t.shape == shape and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert resident_kib(t) < 64 and not advised_huge(t)
    t[0, :, :16] = 1.0  # 16 positions of batch row 0, every head: 8 stripes of 4 KiB
    assert 32 <= resident_kib(t) <= 64
    assert t.float().sum().item() == 8 * 16 * 128 and t[1:].abs().max().item() == 0  # reading maps no memory
    assert resident_kib(t) <= 64
    assert hugepages.zeros_on_demand((2, 3), device="meta").device.type == "meta"  # other devices: torch.zeros
    assert hugepages.zeros_on_demand((0, 3)).numel() == 0
    full = torch.zeros(shape, dtype=torch.bfloat16)  # what the cache was: all of it resident
    assert written_kib(full) >= 32 << 10


@needs_smaps
@torch.no_grad()
def test_build_makes_the_kv_cache_on_demand(tmp_path, meta_tokenizer_path):
    """``Llama.build``'s CPU KV cache is resident only for the positions generated (1 row of 4, 24 of
    4096 positions here), and generation gives the same tokens and logits as with torch.zeros."""
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=64)
    write_random_checkpoint(tmp_path, args, seed=7, dtype=torch.bfloat16, tokenizer_path=meta_tokenizer_path)
    llm = Llama.build(str(tmp_path), max_seq_len=4096, max_batch_size=4, device="cpu", verify=False)
    cache = llm.model.layers[0].attention.cache
    assert cache.k.untyped_storage().nbytes() == 4 * 2 * 4096 * 64 * 2 and resident_kib(cache.k) < 64  # 4 MiB each
    out = llm.generate([[1, 5, 9, 200, 7]], max_gen_len=20, temperature=0.0, logprobs=True)
    assert 8 <= resident_kib(cache.k) < 64  # row 0: 25 positions x 2 heads x 128 B
    llm.model.setup_cache(4, 4096)  # torch.zeros
    assert written_kib(llm.model.layers[0].attention.cache.k) >= 4 << 10
    again = llm.generate([[1, 5, 9, 200, 7]], max_gen_len=20, temperature=0.0, logprobs=True)
    assert again == out


def test_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_HUGE_PAGES", "0")
    assert not hugepages.available()
    monkeypatch.delenv("LLAMA_HUGE_PAGES")
    never = tmp_path / "enabled"
    never.write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "THP_SETTING", never)
    assert not hugepages.available()
    never.write_text("always [madvise] never\n")
    assert hugepages.available() == hasattr(__import__("mmap"), "MADV_HUGEPAGE")


@pytest.mark.slow
@needs_thp
@torch.no_grad()
def test_build_puts_streamed_weights_in_huge_pages_with_the_same_logits(tmp_path, monkeypatch, meta_tokenizer_path):
    args = ModelArgs(dim=1024, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=128256, multiple_of=256)
    write_random_checkpoint(tmp_path, args, seed=5, dtype=torch.bfloat16, tokenizer_path=meta_tokenizer_path)
    tokens = torch.tensor([[1, 5, 9, 200, 7]])
    logits = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("LLAMA_HUGE_PAGES", setting)
        llm = Llama.build(str(tmp_path), max_seq_len=16, max_batch_size=1, device="cpu", verify=False)
        model = llm.model
        wq, w1 = model.layers[0].attention.wq.weight, model.layers[1].feed_forward.w1.weight  # 2 and 5 MiB
        assert advised_huge(wq) == advised_huge(w1) == (setting == "1")
        assert not advised_huge(model.tok_embeddings.weight)
        assert advised_huge(model.layers[0].attention_norm.weight) == (setting == "1")  # 2 KiB: packed
        logits[setting] = model(tokens, 0)
    assert torch.equal(logits["1"], logits["0"])
