"""HF <-> Meta conversion: bit-exact round trips, transformers loading what we write with equal
logits, folders written by transformers itself (sharded, tied, bf16) converting back, and errors."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama.checkpoint import load_params, load_state_dict, load_transformer, write_random_checkpoint
from llama.convert import META_FFN, hf_to_meta, main, meta_ffn_params, meta_to_hf
from llama.model import ModelArgs, rope_frequencies

TINY = {
    "gqa": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32,
                     ffn_dim_multiplier=1.3, rope_theta=10000.0),
    "scaled": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32,
                        rope_theta=500000.0, use_scaled_rope=True),
    "scaled32_mqa": ModelArgs(dim=96, n_layers=1, n_heads=6, n_kv_heads=1, vocab_size=80, multiple_of=16,
                              ffn_dim_multiplier=1.5, use_scaled_rope=True, rope_scale_factor=32.0),
}  # fmt: skip


def tokens(vocab: int, seqlen: int = 48) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seqlen), generator=torch.Generator().manual_seed(0))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / a.double().norm()).item()


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Same params.json text and bit-identical tensors of the same dtype."""
    assert (a / "params.json").read_text() == (b / "params.json").read_text()
    args = load_params(a)
    x, y = load_state_dict(a, args), load_state_dict(b, args)
    assert list(x) == list(y)
    for key in x:
        assert x[key].dtype == y[key].dtype, key
        assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", sorted(TINY))
def test_meta_hf_meta_round_trip_is_bit_exact(tmp_path: Path, name: str, dtype: torch.dtype) -> None:
    write_random_checkpoint(tmp_path / "meta", TINY[name], n_shards=2, dtype=dtype)
    config = meta_to_hf(tmp_path / "meta", tmp_path / "hf")
    assert config["torch_dtype"] == {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    hf_to_meta(tmp_path / "hf", tmp_path / "back")
    assert_same_checkpoint(tmp_path / "meta", tmp_path / "back")
    assert (tmp_path / "back" / "checklist.chk").is_file()


@pytest.mark.parametrize("name", sorted(TINY))
def test_transformers_loads_our_hf_folder(tmp_path: Path, name: str) -> None:
    args = TINY[name]
    write_random_checkpoint(tmp_path / "meta", args, dtype=torch.float32)
    meta_to_hf(tmp_path / "meta", tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.dtype == torch.float32 and hf.config.max_position_embeddings == args.max_context
    # RoPE (incl. Llama 3.1 scaling with factor 8 or 32) as transformers computes it from our config.
    assert torch.allclose(hf.model.rotary_emb.inv_freq.float(), rope_frequencies(args), rtol=1e-6)
    ids = tokens(args.vocab_size)
    with torch.no_grad():
        theirs = hf(ids).logits
        ours = load_transformer(tmp_path / "meta")(ids)
    assert rel_err(theirs, ours) < 1e-4


def save_with_transformers(folder: Path, dtype: torch.dtype, tied: bool, **config: object) -> LlamaForCausalLM:
    """A random HF Llama written by transformers' own ``save_pretrained``, sharded into small files."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=200, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=tied,
                      attn_implementation="eager", **config)  # fmt: skip
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # norms away from 1 so a dropped norm weight shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, max_shard_size="40KB")
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_hf_to_meta_from_sharded_transformers_folder(tmp_path: Path, tied: bool) -> None:
    hf = save_with_transformers(tmp_path / "hf", torch.float32, tied)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    args = hf_to_meta(tmp_path / "hf", tmp_path / "meta")
    assert args.ffn_hidden_dim == 200 and args.n_kv_heads == 2
    state = load_state_dict(tmp_path / "meta", args)
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"]) == tied
    ids = tokens(120)
    with torch.no_grad():
        assert rel_err(hf(ids).logits, load_transformer(tmp_path / "meta")(ids)) < 1e-4


def test_hf_to_meta_keeps_bf16_and_reads_llama3_rope(tmp_path: Path) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    hf = save_with_transformers(tmp_path / "hf", torch.bfloat16, tied=True, rope_parameters=rope)
    args = hf_to_meta(tmp_path / "hf", tmp_path / "meta", n_shards=2)
    assert args.use_scaled_rope and args.rope_scale_factor == 8.0 and args.rope_theta == 500000.0
    state = load_state_dict(tmp_path / "meta", args)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert len(list((tmp_path / "meta").glob("consolidated.*.pth"))) == 2
    ids = tokens(120)
    with torch.no_grad():
        theirs = hf.float()(ids).logits
        ours = load_transformer(tmp_path / "meta", dtype=torch.float32)(ids)
    assert rel_err(theirs, ours) < 1e-4


def test_meta_to_hf_shards_large_models_and_transformers_loads_them(tmp_path: Path) -> None:
    args = TINY["gqa"]
    write_random_checkpoint(tmp_path / "meta", args, dtype=torch.float32)
    meta_to_hf(tmp_path / "meta", tmp_path / "hf", max_shard_bytes=30_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = tokens(args.vocab_size)
    with torch.no_grad():
        assert rel_err(hf(ids).logits, load_transformer(tmp_path / "meta")(ids)) < 1e-4


def test_tied_meta_checkpoint_becomes_tied_hf(tmp_path: Path) -> None:
    from llama.checkpoint import random_state_dict, write_checkpoint

    args = TINY["gqa"]
    sd = random_state_dict(args, dtype=torch.float32)
    sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    write_checkpoint(tmp_path / "meta", sd, args)
    config = meta_to_hf(tmp_path / "meta", tmp_path / "hf")
    assert config["tie_word_embeddings"] is True
    hf_to_meta(tmp_path / "hf", tmp_path / "back")
    assert_same_checkpoint(tmp_path / "meta", tmp_path / "back")


def test_tokenizer_files_travel_both_ways(tmp_path: Path, meta_tokenizer_path: Path) -> None:
    write_random_checkpoint(tmp_path / "meta", TINY["gqa"], tokenizer_path=meta_tokenizer_path)
    meta_to_hf(tmp_path / "meta", tmp_path / "hf")
    assert (tmp_path / "hf" / "original" / "tokenizer.model").is_file()  # where HF repos keep it
    hf_to_meta(tmp_path / "hf", tmp_path / "back")
    md5 = hashlib.md5((tmp_path / "back" / "tokenizer.model").read_bytes()).hexdigest()
    assert md5 == "08292403f8b173e7524d7fba7bbbd2d3"
    assert f"{md5}  tokenizer.model" in (tmp_path / "back" / "checklist.chk").read_text()


def test_ffn_params_reproduce_meta_and_any_width() -> None:
    for (dim, hidden), (multiple_of, multiplier) in META_FFN.items():
        assert meta_ffn_params(dim, hidden) == (multiple_of, multiplier)
    assert meta_ffn_params(576, 1536) == (256, None)  # SmolLM2: the defaults fit
    for dim in (64, 96, 576, 2048, 4096):
        for hidden in (1, 100, 200, 1000, 1536, 5632, 11008, 2 * dim, 10 * dim + 3):
            multiple_of, multiplier = meta_ffn_params(dim, hidden)
            got = ModelArgs(dim=dim, n_layers=1, n_heads=1, vocab_size=1, multiple_of=multiple_of,
                            ffn_dim_multiplier=multiplier).ffn_hidden_dim  # fmt: skip
            assert got == hidden, (dim, hidden, multiple_of, multiplier)


def write_config(folder: Path, **changes: object) -> None:
    save_with_transformers(folder, torch.float32, tied=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, r"model_type 'mistral'.*only Llama"),
        ({"architectures": ["LlamaForSequenceClassification"]}, r"only Llama"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, r"rope scaling type 'yarn'"),
        ({"attention_bias": True}, r"attention_bias=True is not supported"),
    ],
)
def test_unsupported_hf_models_are_rejected(tmp_path: Path, changes: dict, message: str) -> None:
    write_config(tmp_path / "hf", **changes)
    with pytest.raises(ValueError, match=message):
        hf_to_meta(tmp_path / "hf", tmp_path / "meta")
    assert not (tmp_path / "meta").exists()


def test_refuses_to_overwrite_and_leaves_no_partial_folder(tmp_path: Path) -> None:
    write_random_checkpoint(tmp_path / "meta", TINY["gqa"])
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        meta_to_hf(tmp_path / "meta", tmp_path / "hf")
    meta_to_hf(tmp_path / "meta", tmp_path / "hf2")
    (tmp_path / "hf2" / "model.safetensors").unlink()  # a broken source fails mid-way...
    with pytest.raises(FileNotFoundError):
        hf_to_meta(tmp_path / "hf2", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf2", "meta"]  # ...and leaves nothing


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_random_checkpoint(tmp_path / "meta", TINY["scaled"])
    main(["meta-to-hf", str(tmp_path / "meta"), str(tmp_path / "hf")])
    main(["hf-to-meta", str(tmp_path / "hf"), str(tmp_path / "back"), "--dtype", "fp32"])
    assert "use_scaled_rope" in capsys.readouterr().out
    assert {t.dtype for t in load_state_dict(tmp_path / "back", TINY["scaled"]).values()} == {torch.float32}
    with pytest.raises(SystemExit) as exit:
        main(["meta-to-hf", str(tmp_path / "meta"), str(tmp_path / "hf")])
    assert exit.value.code == 1 and "already exists" in capsys.readouterr().err
