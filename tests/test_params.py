"""params.json <-> ModelArgs (``llama.params``): Meta's released files read in any key order, errors that
name the key and the file, Meta's extra keys accepted or refused with what they mean, the Llama 3.2
RoPE factor, and the round trip back to params.json."""

import json

import pytest
import torch
from test_model import RELEASED, ref_rope_frequencies, shuffled  # Meta's released params.json files (facts table)

from llama.model import rope_frequencies
from llama.params import from_dict, load as read_params, to_dict


def test_model_args_accepts_released_params_in_any_order():
    for seed in range(3):
        for params in RELEASED.values():
            args = from_dict(shuffled(params, seed))
            assert all(getattr(args, k) == v for k, v in params.items())


def test_llama_3_0_params_lack_use_scaled_rope():
    args = from_dict(RELEASED["3-8B"])
    assert args.use_scaled_rope is False and args.max_context == 8192
    assert from_dict(RELEASED["3.1-8B"]).max_context == 131072


@pytest.mark.parametrize("name", list(RELEASED))
def test_to_dict_round_trips(name, tmp_path):
    args = from_dict(RELEASED[name])
    # Exactly the released file's keys and values; for 3.2 1B/3B plus the factor their shape implies,
    # written explicitly so that a tool that edits the shape (resharding: n_kv_heads) keeps it.
    extra = {"rope_scale_factor": 32.0} if name.startswith("3.2") else {}
    assert to_dict(args) == {**RELEASED[name], **extra}
    assert from_dict(to_dict(args)) == args
    path = tmp_path / "params.json"
    path.write_text(json.dumps(to_dict(args)))
    assert read_params(path) == args


def test_to_dict_keeps_a_non_default_rope_scale_factor():
    args = from_dict({**RELEASED["3.2-1B"], "rope_scale_factor": 32.0})
    assert to_dict(args)["rope_scale_factor"] == 32.0
    assert from_dict(to_dict(args)) == args


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_seq_length'\]"):
        from_dict({**RELEASED["3.1-8B"], "max_seq_length": 2048})


# Meta's llama-models ModelArgs fields that are runtime knobs or vision tiling: no effect on the text math.
@pytest.mark.parametrize("key,value", [("max_seq_len", 2048), ("max_batch_size", 32), ("vision_max_num_chunks", 4)])
def test_keys_meta_accepts_without_math_are_ignored_with_a_note(key, value):
    args = from_dict({**RELEASED["3.1-8B"], key: value}, "p.json")
    assert args == from_dict(RELEASED["3.1-8B"])
    assert any(f"p.json: ignored {key}={value}" in note for note in args.notes)


@pytest.mark.parametrize(
    "key,value,what",
    [
        ("quantization_args", {"group_size": 32, "scheme": "int4_weight_int8_dynamic_activation", "spinquant": True},
         "quantized"),
        ("lora_args", {"rank": 16, "scale": 2.0}, "LoRA"),
        ("vision_chunk_size", 560, "Vision"),
        ("vision_num_cross_attention_layers", 8, "Vision"),
        ("moe_args", {"num_experts": 16}, "mixture-of-experts"),
    ],
)
def test_keys_of_checkpoints_we_cannot_run_say_what_they_are(key, value, what):
    with pytest.raises(ValueError, match=rf"p\.json: key '{key}' means this is .*{what}.*not supported"):
        from_dict({**RELEASED["3.2-1B"], key: value}, "p.json")


def test_null_or_off_values_of_those_keys_are_accepted():
    # What asdict() of Meta's ModelArgs writes for a text model: no quantization, no LoRA, no vision.
    off = {"quantization_args": None, "lora_args": None, "vision_chunk_size": -1,
           "vision_num_cross_attention_layers": -1, "vision_max_num_chunks": 4}  # fmt: skip
    assert from_dict({**RELEASED["3.1-8B"], **off}) == from_dict(RELEASED["3.1-8B"])


@pytest.mark.parametrize("name", ["3.2-1B", "3.2-3B"])
def test_llama_3_2_shapes_get_rope_factor_32(name):
    args = from_dict(RELEASED[name])  # Meta's params.json: no factor
    assert args.rope_scale_factor == 32.0
    assert any("RoPE scale factor 32" in n and "Llama 3.2" in n for n in args.notes)
    # The frequencies use it: compare with the float64 formula at factor 32 (Hugging Face's
    # config.json of Llama-3.2-1B/3B says rope_scaling factor 32.0).
    torch.testing.assert_close(rope_frequencies(args).double(), ref_rope_frequencies(args.head_dim, 500000.0, True, 32.0),
                               rtol=2e-6, atol=0)
    # An explicit key wins, and is kept when written back.
    explicit = from_dict({**RELEASED[name], "rope_scale_factor": 8.0})
    assert explicit.rope_scale_factor == 8.0 and explicit.notes == []
    assert from_dict(to_dict(explicit)).rope_scale_factor == 8.0


@pytest.mark.parametrize("change", [{"n_kv_heads": 16}, {"n_layers": 15}, {"use_scaled_rope": False}])
def test_other_shapes_keep_factor_8(change):
    args = from_dict({**RELEASED["3.2-1B"], **change})
    assert args.rope_scale_factor == 8.0 and args.notes == []


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("use_scaled_rope", "false", r"use_scaled_rope must be true or false \(a JSON boolean\), got 'false' \(a string\)"),
        ("use_scaled_rope", 1, r"use_scaled_rope must be true or false"),
        ("rope_theta", -1, r"rope_theta must be a number > 1 \(Llama 3: 500000\.0\), got -1"),
        ("rope_theta", "5e5", r"rope_theta must be a number > 1 .*got '5e5' \(a string\)"),
        ("norm_eps", -1, r"norm_eps must be a positive number .*got -1"),
        ("norm_eps", 0, r"norm_eps must be a positive number .*got 0"),
        ("norm_eps", "abc", r"norm_eps must be a positive number .*got 'abc' \(a string\)"),
        ("norm_eps", float("nan"), r"norm_eps must be a positive number .*got nan"),
        ("rope_scale_factor", 0, r"rope_scale_factor must be a number >= 1 .*got 0"),
        ("rope_scale_factor", 0.5, r"rope_scale_factor must be a number >= 1 .*got 0\.5"),
        ("rope_scale_factor", float("inf"), r"rope_scale_factor must be a number >= 1 .*got inf"),
        ("ffn_dim_multiplier", "1.3", r"ffn_dim_multiplier must be a positive number, got '1\.3' \(a string\)"),
        ("ffn_dim_multiplier", -1.3, r"ffn_dim_multiplier must be a positive number, got -1\.3"),
        ("dim", 4096.0, r"dim must be a positive integer, got 4096\.0 \(a number\)"),
        ("n_layers", "32", r"n_layers must be a positive integer, got '32' \(a string\)"),
        ("n_kv_heads", True, r"n_kv_heads must be a positive integer, got True \(a boolean\)"),
        ("vocab_size", -2, r"vocab_size must be a positive integer, got -2"),  # -1: Llama 2, the tokenizer decides
    ],
)
def test_wrong_types_and_ranges_are_named(key, value, message):
    with pytest.raises(ValueError, match=rf"p\.json: {message}"):
        from_dict({**RELEASED["3.1-8B"], key: value}, "p.json")


def test_integral_floats_become_floats():
    args = from_dict({**RELEASED["3.1-8B"], "rope_theta": 500000, "ffn_dim_multiplier": 1})
    assert isinstance(args.rope_theta, float) and isinstance(args.ffn_dim_multiplier, float)


def test_missing_key_is_named():
    params = dict(RELEASED["3.1-8B"])
    del params["n_heads"]
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['n_heads'\]"):
        from_dict(params)


def test_params_json_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"params file not found: .*params\.json"):
        read_params(tmp_path / "params.json")


def test_params_json_invalid(tmp_path):
    path = tmp_path / "params.json"
    path.write_text('{"dim": 4096,')
    with pytest.raises(ValueError, match=r"params\.json: not valid JSON"):
        read_params(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"params\.json: expected a JSON object, got list"):
        read_params(path)


def test_load_errors_name_the_file(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({**RELEASED["3.1-8B"], "bogus": 1}))
    with pytest.raises(ValueError, match=rf"{path}: unknown key\(s\) \['bogus'\]"):
        read_params(path)
