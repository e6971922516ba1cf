"""llama/mapped_embedding.py: a memory-mapped token embedding keeps no pages resident after a lookup.

Which of the table's pages are mapped into the process is read from /proc/self/pagemap (bit 63:
present), so the test sees what the kernel sees: with the hook none after a generation that read
200 rows on 200 different pages; without it (the same model, the hook removed) at least those 200.
"""

import mmap

import pytest
import torch

import residency
from llama.checkpoint import load_transformer, write_random_checkpoint
from llama.generation import Llama
from llama.mapped_embedding import file_mapping, release_after_lookup
from llama.model import ModelArgs, Transformer

ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
ROWS_PER_PAGE = mmap.PAGESIZE // (ARGS.dim * 2)  # bf16 rows
PROMPT = [128000] + [i * 3 * ROWS_PER_PAGE for i in range(1, 200)]  # 199 rows on 199 pages, 2 pages apart


needs_pagemap = pytest.mark.skipif(not residency.readable, reason="no /proc/self/pagemap (not Linux)")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, meta_tokenizer_path):
    path = tmp_path_factory.mktemp("mapped") / "ckpt"
    write_random_checkpoint(path, ARGS, seed=5, dtype=torch.bfloat16, tokenizer_path=meta_tokenizer_path)
    return path


@needs_pagemap
@pytest.mark.parametrize("huge_pages", ["1", "0"])  # other weights copied, or mapped beside the table
def test_lookups_leave_no_pages_of_the_table_resident(ckpt, monkeypatch, huge_pages):
    monkeypatch.setenv("LLAMA_HUGE_PAGES", huge_pages)
    llm = Llama.build(str(ckpt), max_seq_len=256, max_batch_size=1, device="cpu", dtype="bf16")
    table = llm.model.tok_embeddings.weight
    assert file_mapping(table.data_ptr(), table.data_ptr() + 1) is not None  # memory-mapped from the shard
    assert len(llm.model.tok_embeddings._forward_hooks) == 1
    tokens, logprobs = llm.generate([PROMPT], max_gen_len=8, temperature=0, logprobs=True)
    assert residency.present_pages(table) <= 2  # at most the partial first and last pages, shared with neighbours
    llm.model.tok_embeddings._forward_hooks.clear()  # the same model without the hook
    again, again_logprobs = llm.generate([PROMPT], max_gen_len=8, temperature=0, logprobs=True)
    assert residency.present_pages(table) >= len(PROMPT) - 1
    assert again == tokens and again_logprobs == logprobs


def test_a_table_read_elsewhere_or_in_ordinary_memory_is_left_alone(ckpt):
    model = load_transformer(ckpt, "cpu", torch.bfloat16)  # memory-mapped from the shard
    model.output.weight = model.tok_embeddings.weight  # tied: the output layer reads every page
    assert not release_after_lookup(model)
    assert not model.tok_embeddings._forward_hooks
    plain = Transformer(ARGS, device="cpu", dtype=torch.bfloat16)  # ordinary memory
    assert file_mapping(plain.tok_embeddings.weight.data_ptr(), plain.tok_embeddings.weight.data_ptr() + 1) is None
    assert not release_after_lookup(plain)
    assert release_after_lookup(load_transformer(ckpt, "cpu", torch.bfloat16))
