"""One model-parallel rank, launched by tests/test_parallel.py through torchrun.

    python -m torch.distributed.run --nproc_per_node M tests/mp/worker.py --out DIR \
        --tokens TOKENS.pt --gen N [--build CKPT --tokenizer PATH] NAME=CKPT_DIR [NAME=CKPT_DIR ...]

For each checkpoint every rank loads its shard (``parallelize`` + ``load_transformer``), runs a
full forward in float32 and a greedy KV-cached decode, and saves ``DIR/NAME.rankR.pt`` with the
logits, the generated ids and its local weight shapes (and checks that ``parallelize`` of the
full model, real weights, computes the same logits); the test compares them with MP=1 computed
in its own process. ``DIR/setup.rankR.json`` records ``setup_model_parallel``'s answers, and
``--build`` runs ``Llama.build`` + greedy ``generate`` into ``DIR/build.rankR.json``.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `import llama`

from llama.checkpoint import load_params, load_state_dict, load_transformer  # noqa: E402
from llama.model import Transformer  # noqa: E402


@torch.inference_mode()
def greedy(model: Transformer, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens after ``prompt`` [B, S] with the KV cache: prefill, then one token a step."""
    bsz, seqlen = prompt.shape
    model.setup_cache(bsz, seqlen + n)
    out = []
    logits = model(prompt, 0, last_only=True)  # [B, 1, V]
    for i in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        out.append(nxt)
        if i + 1 < n:
            logits = model(nxt, seqlen + i)
    model.clear_cache()
    return torch.cat(out, dim=1)  # [B, n]


BUILD_PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,"]


def build_and_generate(ckpt: str, tokenizer: str, gen: int) -> dict:
    """Llama.build (float32 on CPU) then greedy ``generate`` and ``text_completion`` of BUILD_PROMPTS."""
    from llama.generation import Llama

    llama = Llama.build(ckpt, tokenizer, max_seq_len=64, max_batch_size=2, device="cpu", dtype="fp32")
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in BUILD_PROMPTS]
    tokens, _ = llama.generate(prompts, max_gen_len=gen, temperature=0.0)
    texts = [c["generation"] for c in llama.text_completion(BUILD_PROMPTS, temperature=0.0, max_gen_len=gen)]
    return {"tokens": tokens, "texts": texts}


def check_setup(world_size: int) -> dict:
    """Calling setup again is a no-op; a size that disagrees with WORLD_SIZE is a ValueError."""
    from llama.parallel import setup_model_parallel

    again = setup_model_parallel(None, "cpu")
    try:
        setup_model_parallel(world_size + 1, "cpu")
        error = None
    except ValueError as e:
        error = str(e)
    return {"again": list(again), "mismatch_error": error}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--gen", type=int, default=8)
    ap.add_argument("--build", help="checkpoint for Llama.build")
    ap.add_argument("--tokenizer", help="tokenizer.model for --build")
    ap.add_argument("cases", nargs="*", help="NAME=CKPT_DIR")
    a = ap.parse_args()

    from llama.parallel import parallelize, setup_model_parallel

    rank, world, local_rank = setup_model_parallel(None, "cpu")
    out = Path(a.out)
    # GROUP_RANK: torchrun's node index (0 ... nnodes-1); tests with --nnodes 2 check RANK against it.
    node = int(os.environ.get("GROUP_RANK", "0"))
    info = {"rank": rank, "world": world, "local_rank": local_rank, "node": node, **check_setup(world)}
    (out / f"setup.rank{rank}.json").write_text(json.dumps(info))
    tokens = torch.load(a.tokens, weights_only=True)
    for case in a.cases:
        name, ckpt = case.split("=", 1)
        model = load_transformer(ckpt, "cpu", torch.float32, rank, world, parallelize=parallelize)
        want = load_state_dict(ckpt, load_params(ckpt), rank, world, torch.float32)
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert shapes == {k: list(v.shape) for k, v in want.items()}, f"{name}: local shapes differ from the loader's"
        # parallelize() on a model with real (full) weights slices them the same way.
        sliced = parallelize(load_transformer(ckpt, "cpu", torch.float32))
        with torch.inference_mode():
            logits = model(tokens)
            assert torch.equal(sliced(tokens), logits), f"{name}: sliced full model differs"
        result = {"logits": logits, "greedy": greedy(model, tokens, a.gen), "shapes": shapes}
        torch.save(result, out / f"{name}.rank{rank}.pt")
    if a.build:
        (out / f"build.rank{rank}.json").write_text(json.dumps(build_and_generate(a.build, a.tokenizer, a.gen)))
    # Every rank reaches this point before any tears its group down: a gloo rank destroyed while a
    # peer still talks to it can abort that peer ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
