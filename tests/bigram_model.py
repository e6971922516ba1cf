"""Weights that turn the Transformer into a known bigram table, so generation is predictable.

With every ``attention.wo`` and ``feed_forward.w2`` zero, each block adds nothing to the residual
stream: the final hidden state at a position is the embedding of the token there, and the model
predicts from the last token alone. Token ``a`` (the i-th key of ``successors``) embeds as the
one-hot vector e_i; the output row of ``successors[a]`` gets ``scale * e_i``. After the final
RMSNorm (weight 1) e_i becomes sqrt(dim)·e_i, so the successor's logit is scale·sqrt(dim) and every
other logit is 0: a margin that makes sampling at any temperature <= 1 pick the successor.
"""

import torch

from llama.model import ModelArgs


def make_bigram(
    state: dict[str, torch.Tensor], args: ModelArgs, successors: dict[int, int], scale: float = 10.0
) -> None:
    """Rewrite a full state dict (or a model's ``state_dict()``, whose tensors alias its weights) in place."""
    if len(successors) > args.dim:
        raise ValueError(f"{len(successors)} bigram entries need dim >= {len(successors)}, got {args.dim}")
    with torch.no_grad():
        for i in range(args.n_layers):
            state[f"layers.{i}.attention.wo.weight"].zero_()
            state[f"layers.{i}.feed_forward.w2.weight"].zero_()
        state["norm.weight"].fill_(1.0)
        out, emb = state["output.weight"], state["tok_embeddings.weight"]
        out.zero_()
        for slot, (token, successor) in enumerate(successors.items()):
            emb[token].zero_()
            emb[token, slot] = 1.0
            out[successor, slot] += scale
