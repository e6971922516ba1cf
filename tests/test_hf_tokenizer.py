"""``meta-to-hf`` writes tokenizer.json / tokenizer_config.json: transformers' AutoTokenizer on the
exported folder must encode, decode and render chat prompts exactly as our tokenizer on Meta's
tokenizer.model does."""

import json
from pathlib import Path

import pytest

from llama.chat_format import ChatFormat
from llama.checkpoint import write_random_checkpoint
from llama.convert import main as convert_main
from llama.model import ModelArgs
from tokenizer_texts import sample_texts

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (requirements-dev.txt)")

TINY = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, rope_theta=500000.0,
                 use_scaled_rope=True)  # fmt: skip
TEXTS = sample_texts(240)
DIALOGS = [
    [{"role": "user", "content": "This is a test sentence."}],
    [{"role": "system", "content": "This is a test sentence."}, {"role": "user", "content": "This is a response."}],
    [
        {"role": "system", "content": "  Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"},
        {"role": "user", "content": "What's 2+2?\n"},
        {"role": "assistant", "content": " 4 "},
        {"role": "user", "content": "Say <|eot_id|> literally, then 日本語 😀."},
    ],
    [{"role": "user", "content": "run it"}, {"role": "ipython", "content": "{\"result\": 42}"}],
    [{"role": "user", "content": ""}],
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, meta_tokenizer_path: Path) -> Path:
    """A Meta folder with Meta's tokenizer.model converted by the CLI (``meta-to-hf``)."""
    root = tmp_path_factory.mktemp("hf_tok")
    write_random_checkpoint(root / "meta", TINY, tokenizer_path=meta_tokenizer_path)
    convert_main(["meta-to-hf", str(root / "meta"), str(root / "hf")])
    return root / "hf"


@pytest.fixture(scope="module")
def auto_tokenizer(hf_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


def test_files_written(hf_dir: Path) -> None:
    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / "original" / "tokenizer.model").is_file()
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|begin_of_text|>" and config["eos_token"] == "<|end_of_text|>"
    assert config["model_max_length"] == TINY.max_context
    assert "<|start_header_id|>" in config["chat_template"]
    model = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert len(model["vocab"]) == 128_000 and model["merges"][:3] == ["Ġ Ġ", "Ġ ĠĠĠ", "ĠĠ ĠĠ"]


def test_meta_reference_ids(auto_tokenizer) -> None:
    """Meta's published ids (llama3-facts.md §3)."""
    assert auto_tokenizer.encode("This is a test sentence.") == [128000, 2028, 374, 264, 1296, 11914, 13]
    assert auto_tokenizer.decode([128000, 2028, 374, 264, 1296, 11914, 13, 128001]) == (
        "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    )


def test_encodes_like_ours(auto_tokenizer, tokenizer) -> None:
    """240 texts, both ways of treating special-token text: transformers splits special tokens
    out by default (our ``allowed_special="all"``); with ``split_special_tokens=True`` it treats
    them as plain text, which is our default."""
    assert len(TEXTS) >= 200
    differ = []
    for text in TEXTS:
        plain = tokenizer.encode(text, bos=True, eos=False)
        special = tokenizer.encode(text, bos=True, eos=False, allowed_special="all")
        if auto_tokenizer(text, split_special_tokens=True)["input_ids"] != plain:
            differ.append(("plain", text))
        if auto_tokenizer.encode(text) != special:
            differ.append(("special", text))
        if auto_tokenizer.decode(plain) != tokenizer.decode(plain):
            differ.append(("decode", text))
    assert not differ, f"{len(differ)} of {3 * len(TEXTS)} comparisons differ, e.g. {differ[:3]}"


@pytest.mark.parametrize("dialog", DIALOGS, ids=range(len(DIALOGS)))
def test_chat_template_renders_our_prompt(auto_tokenizer, tokenizer, dialog: list) -> None:
    ours = ChatFormat(tokenizer).encode_dialog_prompt(dialog)
    rendered = auto_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=False)
    # the template renders text; ids only where the framing is a control token and content is not
    assert rendered == tokenizer.decode(ours)
    ids = auto_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, return_dict=True)
    if "<|" not in json.dumps(dialog):
        assert ids["input_ids"] == ours


@pytest.mark.slow
def test_chatml_vocabulary_from_gguf(tmp_path: Path) -> None:
    """The embedded demo model's vocabulary (SmolLM2, imported from GGUF: ChatML, digits split,
    a default system prompt): AutoTokenizer on our files encodes and renders chats like ours."""
    from llama import demo
    from llama.convert import meta_to_hf
    from llama.gguf import import_gguf
    from llama.tokenizer import Tokenizer

    import_gguf(demo.smollm2_gguf(), tmp_path / "meta")
    meta_to_hf(tmp_path / "meta", tmp_path / "hf")
    ours = Tokenizer(tmp_path / "meta" / "tokenizer.model")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    differ = [t for t in TEXTS if hf(t, split_special_tokens=True)["input_ids"] != ours.encode(t, bos=True, eos=False)]
    assert not differ, f"{len(differ)} of {len(TEXTS)} texts differ, e.g. {differ[:3]}"
    for dialog in DIALOGS[:3]:
        rendered = hf.apply_chat_template(dialog, add_generation_prompt=True, tokenize=False)
        assert rendered == ours.decode(ChatFormat(ours).encode_dialog_prompt(dialog))
