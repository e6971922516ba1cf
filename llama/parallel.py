"""Model parallelism: start the process group, then shard a built ``Transformer`` in one place.

``llama.model`` knows nothing of ranks. After it is built (on ``meta``, by
``llama.checkpoint.load_transformer``), ``parallelize`` swaps the modules named in the plan
(``llama.checkpoint.PLAN``, which the loader splits checkpoints by too) for fairscale's layers. Each rank then holds the same slices that
``llama.checkpoint.load_state_dict(..., rank, world_size)`` reads, so the weights load strictly:

- column-parallel (``wq``, ``wk``, ``wv``, ``w1``, ``w3``, ``output``): rows split, the output of
  each rank is its own heads / FFN columns; ``output`` all-gathers so every rank has full logits;
- row-parallel (``wo``, ``w2``): columns split, partial results all-reduced;
- vocab-parallel (``tok_embeddings``): rows split, each rank embeds the ids it owns, all-reduced.

With more ranks than KV heads each rank holds one whole (replicated) KV head: ``wk``/``wv`` become
column-parallel layers whose logical width is ``world_size * head_dim``.
"""

import contextlib
import io
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

# fairscale's constructors allocate with the legacy ``torch.Tensor(rows, cols)``, which ignores
# ``with torch.device("meta")``, and build the *full* master weight to scatter from. Under
# FakeTensorMode every tensor made inside is a shape-only fake, so building them costs no memory.
from torch._subclasses.fake_tensor import FakeTensorMode

from llama.checkpoint import PLAN, check_layout, layer_suffix, rank_range, shard_dim
from llama.model import ModelArgs, Transformer

# Builds the parallel replacement of one module: (module, args, world_size) -> new module.
Sharder = Callable[[nn.Module, ModelArgs, int], nn.Module]


def _no_init(weight: torch.Tensor) -> torch.Tensor:
    """Weights come from the checkpoint: fairscale's random initialisation would be wasted work."""
    return weight


def vocab_parallel(module: nn.Module, args: ModelArgs, world_size: int) -> nn.Module:
    """nn.Embedding -> VocabParallelEmbedding (rows of the table split across ranks)."""
    return VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, init_method=_no_init)


def colwise(module: nn.Module, args: ModelArgs, world_size: int) -> nn.Module:
    """nn.Linear -> ColumnParallelLinear; the output stays split (this rank's heads / FFN units)."""
    return ColumnParallelLinear(
        module.in_features, module.out_features, bias=False, gather_output=False, init_method=_no_init
    )


def colwise_kv(module: nn.Module, args: ModelArgs, world_size: int) -> nn.Module:
    """wk / wv: column-parallel, but never less than one whole KV head per rank.

    With world_size > n_kv_heads the checkpoint loader gives every rank a copy of the KV head its
    query heads use, so the logical layer is ``world_size`` heads wide: local rows = head_dim.
    """
    out_features = max(args.n_kv_heads, world_size) * args.head_dim
    return ColumnParallelLinear(module.in_features, out_features, bias=False, gather_output=False, init_method=_no_init)


def colwise_gathered(module: nn.Module, args: ModelArgs, world_size: int) -> nn.Module:
    """The output projection: column-parallel over the vocabulary, all-gathered to full logits."""
    return ColumnParallelLinear(
        module.in_features, module.out_features, bias=False, gather_output=True, init_method=_no_init
    )


def rowwise(module: nn.Module, args: ModelArgs, world_size: int) -> nn.Module:
    """nn.Linear -> RowParallelLinear taking the already-split output of a column-parallel layer."""
    return RowParallelLinear(
        module.in_features, module.out_features, bias=False, input_is_parallel=True, init_method=_no_init
    )


# Each kind of ``llama.checkpoint.PLAN`` -> the fairscale layer that replaces a module of that kind.
SHARDERS: dict[str, Sharder] = {
    "vocab": vocab_parallel,
    "colwise": colwise,
    "colwise_kv": colwise_kv,
    "colwise_gathered": colwise_gathered,
    "rowwise": rowwise,
}


def parallelize(model: Transformer) -> Transformer:
    """Replace the modules named in ``PLAN`` by fairscale parallel layers, in place; returns ``model``.

    Needs ``setup_model_parallel`` first. Weights on ``meta`` (the normal case: the loader assigns
    real ones next) stay on ``meta`` with this rank's local shape; real weights are sliced to this
    rank's part, exactly as ``llama.checkpoint.rank_range`` reads them from a checkpoint.
    """
    if not fs_init.model_parallel_is_initialized():
        raise RuntimeError("parallelize() needs the model-parallel group: call setup_model_parallel() first")
    rank, world_size = fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()
    args = model.args
    check_layout(args, world_size, world_size)  # whole heads, FFN units and vocab rows per rank
    targets = [(name, mod) for name, mod in model.named_modules() if layer_suffix(name) in PLAN]
    with FakeTensorMode():
        built = [SHARDERS[PLAN[layer_suffix(name)]](old, args, world_size) for name, old in targets]
    for (name, old), new in zip(targets, built):
        weight, key = old.weight, name + ".weight"
        dim = shard_dim(key)
        lo, hi = rank_range(key, args, rank, world_size) or (0, weight.shape[dim])
        if weight.is_meta:  # no data to slice: a placeholder of the local shape
            shape = list(weight.shape)
            shape[dim] = hi - lo
            local = torch.empty(shape, device="meta", dtype=weight.dtype)
        else:
            local = weight.detach().narrow(dim, lo, hi - lo).clone()
        if tuple(local.shape) != tuple(new.weight.shape):  # the plan and the loader must agree
            raise AssertionError(
                f"{name}: fairscale layer is {tuple(new.weight.shape)}, checkpoint slice {tuple(local.shape)}"
            )
        new.weight = nn.Parameter(local, requires_grad=weight.requires_grad)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def setup_model_parallel(model_parallel_size: Optional[int], device_type: str) -> tuple[int, int, int]:
    """Join the torchrun process group and fairscale's model-parallel group; returns (rank, world, local_rank).

    A plain ``python`` process (no torchrun environment) with ``model_parallel_size`` None or 1
    runs alone: (0, 1, 0), no process group. Under torchrun every rank is one model-parallel
    shard, so ``model_parallel_size`` (if given) must equal ``WORLD_SIZE``. Backend: nccl for cuda
    (each rank on ``cuda:LOCAL_RANK``), gloo for cpu. Calling it again in the same process is a no-op.
    Across nodes (``torchrun --nnodes``) ``rank`` is global (it picks the checkpoint slice and the
    one printing process) and ``local_rank`` is the index on this node (it picks the GPU).
    """
    device_type = torch.device(device_type).type
    if "WORLD_SIZE" not in os.environ:
        if model_parallel_size is None or model_parallel_size == 1:
            return 0, 1, 0
        raise ValueError(
            f"model_parallel_size={model_parallel_size} needs one process per rank: launch with "
            f"torchrun --nproc_per_node {model_parallel_size} <script> ..."
        )
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if model_parallel_size is not None and model_parallel_size != world_size:
        raise ValueError(
            f"model_parallel_size={model_parallel_size} but torchrun started WORLD_SIZE={world_size} processes: "
            f"launch with torchrun --nproc_per_node {model_parallel_size} <script> ... "
            f"(or pass model_parallel_size=None to use {world_size})"
        )
    if device_type == "cuda":
        # LOCAL_RANK (this node's process index), never RANK: on the second of two 8-GPU nodes
        # RANK runs 8..15 but the GPUs are still cuda:0..7.
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise ValueError(
                f"LOCAL_RANK={local_rank} (RANK={rank}) but this machine has {n_gpus} GPU(s): start at most "
                f"{n_gpus} processes per node (torchrun --nproc_per_node {n_gpus}; "
                f"more nodes: --nnodes, docs/parallel.md)"
            )
        torch.cuda.set_device(local_rank)  # before NCCL starts: one GPU per rank
    if world_size == 1:
        return rank, 1, local_rank  # one shard: plain nn layers, no process group needed
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"model parallelism runs on cuda (nccl) or cpu (gloo), not {device_type!r}")
    if not dist.is_initialized():
        # env:// reads MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE set by torchrun.
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if dist.get_world_size() != world_size:
        raise ValueError(f"existing process group has {dist.get_world_size()} ranks, WORLD_SIZE says {world_size}")
    if not fs_init.model_parallel_is_initialized():
        # fairscale prints a banner ("> initializing model parallel ...") on rank 0; a library
        # should not, so this one call's stdout is dropped.
        with contextlib.redirect_stdout(io.StringIO()):
            fs_init.initialize_model_parallel(world_size)
    elif fs_init.get_model_parallel_world_size() != world_size:
        raise ValueError(
            f"model-parallel group already set up with {fs_init.get_model_parallel_world_size()} ranks, not {world_size}"
        )
    return rank, world_size, local_rank
