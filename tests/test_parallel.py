"""Model parallelism on CPU: torchrun + gloo ranks must compute what one process computes.

Random-weight checkpoints (float32) for MHA, GQA and one-KV-head configs, saved as 1, 2 and 4
shards, are loaded on 2 and 4 ranks by ``tests/mp/worker.py``; logits must equal MP=1's (computed
here) to a relative error below 1e-5, and greedy decoding must give the same tokens.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from child_env import REPO, child_env, free_port
from llama.checkpoint import (
    PLAN,
    SHARD_DIMS,
    expected_shapes,
    load_params,
    load_transformer,
    random_state_dict,
    write_checkpoint,
    write_random_checkpoint,
)
from llama.model import ModelArgs, Transformer
from llama.parallel import SHARDERS, parallelize, rowwise, setup_model_parallel
from llama.reshard import reshard

WORKER = REPO / "tests" / "mp" / "worker.py"
_spec = importlib.util.spec_from_file_location("mp_worker", WORKER)
mp_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mp_worker)

# n_heads, FFN width (192) and vocab divide by 4; n_kv_heads 4, 2 and 1 cover "more ranks than
# KV heads" (replicated heads) on 2 and 4 ranks.
CONFIGS = {
    "mha": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=256, multiple_of=32),
    "gqa": ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=32, use_scaled_rope=True),
    "kv1": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=256, multiple_of=32),
}
SHARDS = (1, 2, 4)
GEN = 8
REL_TOL = 1e-5
# Llama.build needs the real tokenizer's vocabulary; 2 KV heads, so 4 ranks replicate them.
BUILD_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|: relative to the logit scale (elementwise ratios blow up near 0)."""
    return ((got - ref).abs().max() / ref.abs().max()).item()


def torchrun(nproc: int, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``argv`` (a script and its arguments) on ``nproc`` local ranks; fails with the output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), *argv]  # fmt: skip
    env = child_env(OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """name -> checkpoint folder: ``CONFIG/N`` for N shards, plus one written by ``llama.reshard``."""
    root = tmp_path_factory.mktemp("mp_ckpts")
    out = {}
    for cname, args in CONFIGS.items():
        full = random_state_dict(args, seed=len(out), dtype=torch.float32)
        for n in SHARDS:
            out[f"{cname}/{n}"] = root / f"{cname}-{n}"
            write_checkpoint(out[f"{cname}/{n}"], full, args, n)
    out["kv1/reshard4"] = reshard(out["kv1/1"], root / "kv1-reshard4", 4, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def references(ckpts, tmp_path_factory) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """The prompt tokens file and MP=1 logits / greedy tokens per config (from the 1-shard files)."""
    tokens = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("mp_tokens") / "tokens.pt"
    torch.save(tokens, path)
    refs = {}
    for cname in CONFIGS:
        model = load_transformer(ckpts[f"{cname}/1"], "cpu", torch.float32)
        with torch.inference_mode():
            refs[cname] = {"logits": model(tokens), "greedy": mp_worker.greedy(model, tokens, GEN)}
    return path, refs


@pytest.fixture(scope="module")
def build_ckpt(tmp_path_factory, meta_tokenizer_path) -> Path:
    """A 2-shard random checkpoint with Llama 3's vocabulary and tokenizer, for Llama.build."""
    path = tmp_path_factory.mktemp("mp_build") / "ckpt"
    write_random_checkpoint(path, BUILD_ARGS, n_shards=2, seed=7, dtype=torch.float32, tokenizer_path=meta_tokenizer_path)
    return path


def test_plan_covers_every_weight_and_has_a_layer_per_kind():
    """Every checkpoint tensor is split or replicated by name; each kind of split has a fairscale
    layer; row-parallel layers exactly where dim 1 is split."""
    per_layer = {key.removeprefix("layers.0.") for key in expected_shapes(CONFIGS["gqa"]) if not key.startswith("layers.1.")}
    assert set(SHARD_DIMS) == per_layer
    assert set(SHARDERS) == set(PLAN.values())
    for name, kind in PLAN.items():
        assert (SHARDERS[kind] is rowwise) == (SHARD_DIMS[name + ".weight"] == 1), name


def test_single_process_needs_no_process_group(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert setup_model_parallel(None, "cpu") == (0, 1, 0)
    assert setup_model_parallel(1, "cpu") == (0, 1, 0)
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        setup_model_parallel(2, "cpu")


def test_torchrun_env_checks(monkeypatch):
    """torchrun --nproc_per_node 1 runs without a group; a size disagreeing with WORLD_SIZE is refused."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert setup_model_parallel(None, "cpu") == (0, 1, 0)
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"model_parallel_size=4 .*WORLD_SIZE=2.*torchrun --nproc_per_node 4"):
        setup_model_parallel(4, "cpu")
    assert not dist.is_initialized()


def test_parallelize_needs_setup():
    model = Transformer(CONFIGS["mha"], device="meta")
    with pytest.raises(RuntimeError, match="setup_model_parallel"):
        parallelize(model)


@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_match_single_process(world, ckpts, references, build_ckpt, meta_tokenizer_path, tmp_path):
    """N = 1, 2, 4 shards on `world` ranks: logits to 1e-5, identical greedy tokens and Llama.build output."""
    tokens_path, refs = references
    cases = [f"{name.replace('/', '-')}={path}" for name, path in ckpts.items()]
    torchrun(world, str(WORKER), "--out", str(tmp_path), "--tokens", str(tokens_path), "--gen", str(GEN),
             "--build", str(build_ckpt), "--tokenizer", str(meta_tokenizer_path), *cases)  # fmt: skip

    for rank in range(world):
        setup = json.loads((tmp_path / f"setup.rank{rank}.json").read_text())
        assert (setup["rank"], setup["world"], setup["local_rank"]) == (rank, world, rank)
        assert setup["again"] == [rank, world, rank]  # idempotent
        assert f"torchrun --nproc_per_node {world + 1}" in setup["mismatch_error"]

    worst = 0.0
    for name in ckpts:
        cname, hd = name.split("/")[0], CONFIGS[name.split("/")[0]].head_dim
        ref = refs[cname]
        diffs = []
        for rank in range(world):
            got = torch.load(tmp_path / f"{name.replace('/', '-')}.rank{rank}.pt", weights_only=True)
            diffs.append(rel_diff(got["logits"], ref["logits"]))
            assert diffs[-1] < REL_TOL, f"{name} rank {rank}: {diffs[-1]}"
            assert torch.equal(got["greedy"], ref["greedy"]), name
            # Whole KV heads, at least one per rank (n_kv_heads as saved: raised for N > n_kv_heads).
            n_kv_local = got["shapes"]["layers.0.attention.wk.weight"][0] // hd
            assert n_kv_local == max(1, load_params(ckpts[name]).n_kv_heads // world), name
        print(f"MP={world} {name}: max relative logit difference {max(diffs):.2e} (over {world} ranks)")
        worst = max(worst, *diffs)
    print(f"MP={world}: worst max relative logit difference {worst:.2e}")

    want = mp_worker.build_and_generate(str(build_ckpt), str(meta_tokenizer_path), GEN)
    for rank in range(world):
        assert json.loads((tmp_path / f"build.rank{rank}.json").read_text()) == want


@pytest.mark.slow
@needs_gloo
def test_example_text_completion_on_two_ranks(build_ckpt, meta_tokenizer_path):
    """The example runs under torchrun on CPU and only rank 0 prints."""
    res = torchrun(2, "example_text_completion.py", "--ckpt_dir", str(build_ckpt),
                   "--tokenizer_path", str(meta_tokenizer_path), "--max_gen_len", "8")  # fmt: skip
    assert res.stdout.count("The three things every good recipe for bread needs are") == 1, res.stdout
    assert res.stdout.count("==================================") == 4, res.stdout
    assert res.stderr.count("Loaded ") == 1, res.stderr


def test_cuda_device_is_local_rank(monkeypatch):
    """Second node of two (RANK 3, LOCAL_RANK 1): the GPU is cuda:1, the rank stays global; a
    LOCAL_RANK beyond this node's GPUs is refused before NCCL starts. (No GPU needed: the CUDA and
    process-group calls are stand-ins recording what they are asked.)"""
    from fairscale.nn.model_parallel import initialize as fs_init

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 4)
    monkeypatch.setattr(fs_init, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(fs_init, "get_model_parallel_world_size", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert setup_model_parallel(None, "cuda") == (3, 4, 1)
    assert chosen == [1]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2 .*2 GPU\(s\).*--nproc_per_node 2"):
        setup_model_parallel(None, "cuda")
    assert chosen == [1]


def launch_node(nnodes: int, nproc: int, port: int, *argv: str) -> subprocess.Popen:
    """One torchrun launcher of a ``--nnodes`` job, as on a separate machine: c10d rendezvous at
    127.0.0.1:``port`` (the launcher that binds it first hosts the store; the rendezvous numbers
    the nodes, so there is no ``--node_rank``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes",
           *argv]  # fmt: skip
    env = child_env(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(k, None)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@needs_gloo
@pytest.mark.slow
def test_two_nodes_match_single_process(ckpts, references, build_ckpt, meta_tokenizer_path, tmp_path):
    """Two torchrun launchers (2 ranks each, one per simulated node) act as 4 ranks: each rank reads
    the checkpoint slice of its GLOBAL rank (logits equal one process's, identical greedy tokens),
    LOCAL_RANK restarts at 0 on the second node, and only global rank 0 prints."""
    tokens_path, refs = references
    names = ["gqa/4", "kv1/2"]  # 4 files on 4 ranks; 2 files split in half, KV head replicated
    cases = [f"{n.replace('/', '-')}={ckpts[n]}" for n in names]
    argv = [str(WORKER), "--out", str(tmp_path), "--tokens", str(tokens_path), "--gen", str(GEN),
            "--build", str(build_ckpt), "--tokenizer", str(meta_tokenizer_path), *cases]  # fmt: skip
    port = free_port()
    nodes = [launch_node(2, 2, port, *argv) for _node in (0, 1)]
    outs = []
    try:
        for p in nodes:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(nodes, outs):
        assert p.returncode == 0, f"{' '.join(p.args)} failed ({p.returncode}):\n{out}\n{err}"

    seen = []
    for rank in range(4):
        setup = json.loads((tmp_path / f"setup.rank{rank}.json").read_text())
        assert (setup["rank"], setup["world"]) == (rank, 4)
        assert setup["rank"] == 2 * setup["node"] + setup["local_rank"]
        seen.append((setup["node"], setup["local_rank"]))
    assert sorted(seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]

    for name in names:
        ref = refs[name.split("/")[0]]
        for rank in range(4):
            got = torch.load(tmp_path / f"{name.replace('/', '-')}.rank{rank}.pt", weights_only=True)
            diff = rel_diff(got["logits"], ref["logits"])
            assert diff < REL_TOL, f"{name} rank {rank}: {diff}"
            assert torch.equal(got["greedy"], ref["greedy"]), name
        print(f"2 nodes x 2 ranks, {name}: logits within {REL_TOL} of one process, same greedy tokens")

    want = mp_worker.build_and_generate(str(build_ckpt), str(meta_tokenizer_path), GEN)
    for rank in range(4):
        assert json.loads((tmp_path / f"build.rank{rank}.json").read_text()) == want
    # Llama.build logs "Loaded ..." on the main process only: once over both nodes, not once per node.
    assert sum(err.count("Loaded ") for _out, err in outs) == 1, [err for _out, err in outs]
