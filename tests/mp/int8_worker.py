"""One rank of an int8 folder, launched by tests/test_quantize_folder.py through torchrun.

    python -m torch.distributed.run --nproc_per_node M tests/mp/int8_worker.py SRC INT8_DIR TOKENS.pt OUT_DIR [ONE_FILE_DIR]

Loads the rank's file of the M-file int8 folder (fairscale layers, ``Int8Linear`` in them) and the
same rank of SRC quantized while loading (``int8_transform``); saves to ``OUT_DIR/rankR.pt`` both
float32 logits of TOKENS, whether the two state dicts are equal bit for bit, and how each kind of
int8 layer combines the ranks' outputs; with ONE_FILE_DIR (a 1-file int8 folder) also its logits
on the M ranks, under "one_file".
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `import llama`

from llama.checkpoint import load_transformer  # noqa: E402
from llama.parallel import parallelize, setup_model_parallel  # noqa: E402
from llama.quantize import int8_transform  # noqa: E402


def main() -> None:
    src, folder, tokens_path, out = sys.argv[1:5]
    one_file = sys.argv[5] if len(sys.argv) > 5 else None
    rank, world, _local_rank = setup_model_parallel(None, "cpu")
    tokens = torch.load(tokens_path, weights_only=True)
    models = {
        "folder": load_transformer(folder, "cpu", torch.float32, rank, world, parallelize=parallelize),
        "at_load": load_transformer(src, "cpu", torch.float32, rank, world, parallelize=parallelize, transform=int8_transform),
    }
    a, b = (m.state_dict() for m in models.values())
    same = list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    block = models["folder"].layers[0]
    layers = {"wq": block.attention.wq, "wo": block.attention.wo, "w1": block.feed_forward.w1,
              "w2": block.feed_forward.w2, "output": models["folder"].output}  # fmt: skip
    result = {"same_state": same, "parallel": {name: getattr(m, "parallel", "not Int8Linear") for name, m in layers.items()}}
    if one_file is not None:
        models["one_file"] = load_transformer(one_file, "cpu", torch.float32, rank, world, parallelize=parallelize)
    with torch.inference_mode():
        result.update({name: m(tokens) for name, m in models.items()})
    torch.save(result, Path(out) / f"rank{rank}.pt")
    torch.distributed.barrier()  # no rank tears the group down while a peer still talks to it
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
