"""One rank of a kept-FP8 model (``llama.fp8.Fp8Linear``), launched by tests/test_fp8.py through torchrun.

    python -m torch.distributed.run --nproc_per_node M tests/mp/fp8_worker.py CKPT_DIR TOKENS.pt OUT_DIR

Loads the rank's file of an FP8 folder of M files keeping FP8 (``keep_fp8=True``, fairscale layers
around it) and saves the float32 logits of TOKENS to ``OUT_DIR/rankR.pt`` with the kinds of its
feed-forward layers.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `import llama`

from llama.checkpoint import load_transformer  # noqa: E402
from llama.parallel import parallelize, setup_model_parallel  # noqa: E402


def main() -> None:
    ckpt, tokens_path, out = sys.argv[1:4]
    rank, world, _local_rank = setup_model_parallel(None, "cpu")
    model = load_transformer(ckpt, "cpu", torch.float32, rank, world, parallelize=parallelize, keep_fp8=True)
    with torch.inference_mode():
        logits = model(torch.load(tokens_path, weights_only=True))
    kinds = [type(layer.feed_forward.w2).__name__ for layer in model.layers]
    torch.save({"logits": logits, "kinds": kinds}, Path(out) / f"rank{rank}.pt")
    torch.distributed.barrier()  # no rank tears the group down while a peer still talks to it
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
