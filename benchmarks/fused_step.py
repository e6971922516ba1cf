"""The fused decode step (llama/fused.py) against the per-operator fast paths, in one process.

    python benchmarks/fused_step.py                      # the demo model and the Llama 3.2 1B shape
    python benchmarks/fused_step.py --shapes demo --batches 1
    python benchmarks/fused_step.py --weights int8,int8-keep --batches 1   # int8 models

Builds each model as ``Llama.build`` does (``speed_up``), then times one-token steps of the model's
forward after a 32-token prompt, alternating the fused model with the same model whose blocks are
plain ``TransformerBlock``s again (the per-operator path, what ``LLAMA_FUSED=0`` runs), and keeps
the best of ``--reps`` rounds' median step: in one process the two variants see the same machine minute by
minute, which matters on a shared machine. Also says whether both gave the same logits: bit for bit
where both multiply with the same kernel (rows up to ``llama.fast.matvec_rows``), within bf16
rounding where the per-operator path hands more rows to torch. The demo model is the real
checkpoint (``llama.demo``); the 1B shape has random weights. ``--weights``: bf16 (as loaded), int8
(``quantize_model``: every projection and the output int8, what ``quantize="int8"`` builds) or
int8-keep (the output kept bf16, ``keep_output=True``); each a row per shape and batch.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama  # noqa: E402,F401  first: OpenMP's wait policy (llama/openmp.py)
import torch  # noqa: E402

from load import cpu_description  # noqa: E402
from llama import fused  # noqa: E402
from llama.checkpoint import random_state_dict  # noqa: E402
from llama.fast import speed_up  # noqa: E402
from llama.model import ModelArgs, Transformer, TransformerBlock  # noqa: E402
from llama.quantize import quantize_model  # noqa: E402

WEIGHTS = ("bf16", "int8", "int8-keep")

LLAMA_1B = ModelArgs(
    dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
    ffn_dim_multiplier=1.5, use_scaled_rope=True, rope_scale_factor=32.0,
)  # fmt: skip


def build(shape: str, max_batch: int, weights: str = "bf16") -> Transformer:
    """The model with ``speed_up``'s paths (fused included unless LLAMA_FUSED=0), its weights as
    ``weights`` says (one of ``WEIGHTS``)."""
    if shape == "demo":
        from llama.checkpoint import load_params, load_transformer
        from llama.demo import default_checkpoint

        ckpt = default_checkpoint(progress=False)
        model = load_transformer(ckpt, torch.device("cpu"), torch.bfloat16, 0, 1, None, args=load_params(ckpt), progress=False)
    else:
        model = Transformer(LLAMA_1B, device="meta")
        model.load_state_dict(random_state_dict(LLAMA_1B), assign=True, strict=True)
    if weights != "bf16":
        quantize_model(model, keep_output=weights == "int8-keep")
    model.setup_cache(max_batch, 64)
    return speed_up(model.eval())


def unfused_blocks(model: Transformer) -> list[TransformerBlock]:
    """The model's blocks as plain ``TransformerBlock``s (same modules inside: the fast paths)."""
    blocks = []
    for block in model.layers:
        plain = TransformerBlock.__new__(TransformerBlock)
        plain.__dict__ = dict(block.__dict__)
        blocks.append(plain)
    return blocks


def use(model: Transformer, blocks: list[TransformerBlock], cls: type) -> None:
    """Give ``model`` these blocks and this class, in place."""
    for i, block in enumerate(blocks):
        model.layers[i] = block
    model.__class__ = cls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="demo,1b", help="comma-separated: demo, 1b")
    parser.add_argument("--batches", default="1,8", help="comma-separated rows per step")
    parser.add_argument("--weights", default="bf16", help=f"comma-separated: {', '.join(WEIGHTS)}")
    parser.add_argument("--steps", type=int, default=16, help="one-token steps per round")
    parser.add_argument("--reps", type=int, default=4, help="rounds per variant, alternating; the best is kept")
    opts = parser.parse_args()
    model_name, flags = cpu_description()
    print(f"CPU: {model_name} ({os.cpu_count()} logical cores), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"flags: {flags}")
    batches = [int(b) for b in opts.batches.split(",")]
    runs = [(shape, weights) for shape in opts.shapes.split(",") for weights in opts.weights.split(",")]
    if any(w not in WEIGHTS for _, w in runs):
        parser.error(f"--weights: use {', '.join(WEIGHTS)}")
    for shape, weights in runs:
        model = build(shape, max(batches), weights)
        label = shape if weights == "bf16" else f"{shape} {weights}"
        if type(model) is not fused.FusedTransformer:
            print(f"{label}: the fused step does not apply here (LLAMA_FUSED=0, or no native kernels)")
            continue
        variants = {"fused": (list(model.layers), fused.FusedTransformer), "per-operator": (unfused_blocks(model), Transformer)}
        for bsz in batches:
            gen = torch.Generator().manual_seed(bsz)
            tokens = torch.randint(0, model.args.vocab_size, (bsz, 32 + opts.steps), generator=gen)
            best, logits = {}, {}
            with torch.inference_mode():
                for _ in range(opts.reps):
                    for name, (blocks, cls) in variants.items():
                        use(model, blocks, cls)
                        model(tokens[:, :32], 0)
                        out, times = [], []
                        for p in range(32, 32 + opts.steps):
                            start = time.perf_counter()
                            out.append(model(tokens[:, p : p + 1], p))
                            times.append(time.perf_counter() - start)
                        median = sorted(times)[len(times) // 2]  # a step, not the prefill's aftermath
                        best[name] = min(best.get(name, float("inf")), median)
                        logits[name] = torch.cat(out, dim=1)
            use(model, *variants["fused"])  # back to the fused model for the next batch
            same = torch.equal(logits["fused"], logits["per-operator"])
            cells = "  ".join(f"{k} {v * 1e3:7.2f} ms ({bsz / v:6.1f} tok/s)" for k, v in best.items())
            ratio = best["per-operator"] / best["fused"]
            print(f"{label:14} batch {bsz}: {cells}  fused {ratio:.2f}x  logits equal: {same}  load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
