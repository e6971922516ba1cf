"""Llama 2 as Meta ships it: params.json (vocab_size -1, no rope_theta, no n_kv_heads), shards with
tok_embeddings split along dim 1 and the unused rope.freqs, the SentencePiece tokenizer against
Hugging Face's LlamaTokenizer, and the [INST] chat format against HF's Llama 2 chat template.

No Llama 2 tokenizer.model ships in an installable package, so the tokenizer tests train a small
one here with the sentencepiece trainer, with the settings of Meta's file (BPE, byte fallback,
split digits, dummy prefix, no normalization, unk/bos/eos = 0/1/2, no pad).
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from bigram_model import make_bigram
from hf_reference import hf_logits, hf_model, rel_err

from llama.chat_format_llama2 import Llama2ChatFormat
from llama.checkpoint import load_params, load_state_dict, load_transformer, random_state_dict
from llama.family import load_tokenizer, tokenizer_kind
from llama.generation import chat_format_for
from llama.generation import Llama
from llama.memory import parameter_count
from llama.params import from_dict
from llama.reshard import reshard
from llama.sp_tokenizer import SentencePieceTokenizer

spm = pytest.importorskip("sentencepiece", reason="Llama 2 support needs the sentencepiece package")
pytestmark = pytest.mark.usefixtures("one_thread")

# Meta's params.json of the Llama 2 releases (llama-2-7b, -7b-chat, -13b, -70b): no rope_theta, no
# n_kv_heads below 70B, vocab_size -1; derived sizes and parameter counts as published.
LLAMA2_PARAMS = {
    "7B": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1},
           11008, 32, 6_738_415_616),
    "7B-chat": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1},
                11008, 32, 6_738_415_616),
    "13B": ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05, "vocab_size": -1},
            13824, 40, 13_015_864_320),
    "70B": ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
             "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}, 28672, 8, 68_976_648_192),
}  # fmt: skip

# Tiny Llama 2 shapes, written as Meta writes them (vocab_size from the tokenizer: 1000 here).
TINY = {
    "mha": {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-06, "vocab_size": -1},
    "gqa-70b-style": {"dim": 128, "multiple_of": 64, "ffn_dim_multiplier": 1.3, "n_heads": 8, "n_kv_heads": 2,
                      "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1},
}  # fmt: skip
VOCAB = 1000

# How Meta's Llama 2 shards split each tensor (llama3-facts.md §1): tok_embeddings along dim 1.
LLAMA2_SPLIT = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "output": 0}


def corpus_lines() -> list[str]:
    """Training and test text: this repository's docs and code plus multilingual lines."""
    root = Path(__file__).resolve().parents[1]
    lines = []
    for path in sorted([*root.glob("*.md"), *root.glob("docs/*.md"), *root.glob("llama/*.py")]):
        lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines += ["Grüße aus München, déjà vu, naïve café", "日本語のテキストです", "Привет, мир", "numbers 1234567 3.14"] * 5
    return lines


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A SentencePiece model trained with the settings of Meta's Llama 2 tokenizer.model."""
    prefix = tmp_path_factory.mktemp("sp") / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_prefix=str(prefix), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, character_coverage=0.9995, minloglevel=2, num_threads=1,
    )  # fmt: skip
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def sp_tok(sp_model) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(sp_model)


@pytest.fixture(scope="module")
def hf_tok(sp_model, tmp_path_factory):
    """HF's LlamaTokenizer on the same file, normalizing as HF's published Llama 2 tokenizer does.

    transformers 5 builds LlamaTokenizer with a Metaspace pre-tokenizer, which adds no "▁" in front
    of text that already starts with a space (SentencePiece does); HF's own LlamaConverter for a
    legacy Llama tokenizer (the form of the meta-llama/Llama-2-*-hf tokenizer.json) prepends "▁" and
    replaces spaces instead, which we install from that converter.
    """
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="HF reads SentencePiece files through protobuf")
    from transformers.convert_slow_tokenizer import LlamaConverter

    folder = tmp_path_factory.mktemp("hf_tok")
    (folder / "tokenizer.model").write_bytes(sp_model.read_bytes())
    tok = transformers.LlamaTokenizer.from_pretrained(str(folder), legacy=True, add_bos_token=True)
    legacy = SimpleNamespace(original_tokenizer=SimpleNamespace(legacy=True, add_prefix_space=True))
    tok._tokenizer.normalizer = LlamaConverter.normalizer(legacy, None)
    tok._tokenizer.pre_tokenizer = LlamaConverter.pre_tokenizer(legacy, "▁", True)
    return tok


def write_llama2_folder(folder: Path, params: dict, full: dict[str, torch.Tensor], n_shards: int,
                        tokenizer: Path | None = None) -> None:  # fmt: skip
    """A folder as Meta ships Llama 2: Meta's params.json keys, shards split per LLAMA2_SPLIT, rope.freqs."""
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    head_dim = params["dim"] // params["n_heads"]
    for i in range(n_shards):
        shard = {"rope.freqs": 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)}
        for key, t in full.items():
            name = key.split(".")[-2]
            shard[key] = t.clone() if t.dim() == 1 else t.chunk(n_shards, dim=LLAMA2_SPLIT[name])[i].clone()
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    if tokenizer is not None:
        (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())


# ---------------------------------------------------------------------------------------------
# params.json


@pytest.mark.parametrize("name", list(LLAMA2_PARAMS))
def test_released_llama2_params(name):
    params, ffn, kv_heads, count = LLAMA2_PARAMS[name]
    args = from_dict(params, vocab_size=32000)
    assert (args.vocab_size, args.rope_theta, args.n_kv_heads, args.ffn_hidden_dim) == (32000, 10000.0, kv_heads, ffn)
    assert args.norm_eps == params["norm_eps"] and not args.use_scaled_rope
    assert parameter_count(args) == count


def test_vocab_minus_one_needs_the_tokenizer(tmp_path, sp_model):
    with pytest.raises(ValueError, match="vocab_size is -1"):
        from_dict(LLAMA2_PARAMS["7B"][0])
    (tmp_path / "params.json").write_text(json.dumps(TINY["mha"]))
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        load_params(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    assert load_params(tmp_path).vocab_size == VOCAB  # the folder's tokenizer decides
    assert load_params(tmp_path, vocab_size=32000).vocab_size == 32000
    # Llama 3 files state rope_theta; an explicit value always wins over the Llama 2 default.
    assert from_dict({**TINY["mha"], "rope_theta": 500000.0}, vocab_size=8).rope_theta == 500000.0


# ---------------------------------------------------------------------------------------------
# Checkpoints: dim-1 embedding shards, against HF and against one shard


@pytest.fixture(scope="module")
def llama2_folders(tmp_path_factory, sp_model):
    """name -> (args, full fp32 weights, {n_shards: folder}) for 1, 2 and 4 Meta-style shards."""
    out = {}
    for name, params in TINY.items():
        args = from_dict(params, vocab_size=VOCAB)
        full = random_state_dict(args, seed=3, dtype=torch.float32)
        folders = {}
        for n in (1, 2, 4):
            folders[n] = tmp_path_factory.mktemp(f"{name}-{n}")
            folders[n].rmdir()
            write_llama2_folder(folders[n], params, full, n, sp_model)
        out[name] = (args, full, folders)
    return out


def test_llama2_shards_split_embedding_along_dim_1(llama2_folders):
    args, _, folders = llama2_folders["gqa-70b-style"]
    shard = torch.load(folders[2] / "consolidated.01.pth", weights_only=True)
    assert shard["tok_embeddings.weight"].shape == (VOCAB, args.dim // 2)  # the fixture is Llama 2's layout
    assert shard["output.weight"].shape == (VOCAB // 2, args.dim) and "rope.freqs" in shard


@pytest.mark.parametrize("name", list(TINY))
@torch.no_grad()
def test_llama2_checkpoint_matches_hf(name, llama2_folders):
    args, full, folders = llama2_folders[name]
    model = load_transformer(folders[2], args=load_params(folders[2])).eval()
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    ours, ref = model(tokens), hf_logits(hf_model(args, full), tokens)
    assert ours.shape == ref.shape == (2, 20, VOCAB)
    assert rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("name", list(TINY))
def test_two_shards_equal_one_shard(name, llama2_folders):
    args, full, folders = llama2_folders[name]
    one = load_state_dict(folders[1], args)
    for n in (2, 4):
        many = load_state_dict(folders[n], args)
        assert one.keys() == many.keys() == full.keys()
        assert all(torch.equal(one[k], many[k]) and torch.equal(one[k], full[k]) for k in one)


def test_ranks_take_embedding_rows_from_column_shards(llama2_folders):
    args, full, folders = llama2_folders["gqa-70b-style"]
    for n_files, ranks in ((2, 2), (2, 4), (4, 2), (1, 2)):
        for rank in range(ranks):
            got = load_state_dict(folders[n_files], args, rank, ranks)["tok_embeddings.weight"]
            assert torch.equal(got, full["tok_embeddings.weight"].chunk(ranks, dim=0)[rank]), (n_files, ranks, rank)


def test_mixed_embedding_layouts_are_an_error(tmp_path, llama2_folders):
    args, full, folders = llama2_folders["mha"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("params.json", "consolidated.00.pth", "tokenizer.model"):
        (bad / name).write_bytes((folders[2] / name).read_bytes())
    shard = torch.load(folders[2] / "consolidated.01.pth", weights_only=True)
    shard["tok_embeddings.weight"] = full["tok_embeddings.weight"].chunk(2, dim=0)[1].clone()  # Llama 3 layout
    torch.save(shard, bad / "consolidated.01.pth")
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth: tok_embeddings.weight has shape"):
        load_state_dict(bad, args)


@pytest.mark.parametrize("src_shards, mp", [(2, 1), (2, 4), (1, 2)])
def test_reshard_llama2_keeps_its_format(tmp_path, llama2_folders, src_shards, mp):
    args, full, folders = llama2_folders["gqa-70b-style"]
    dst = reshard(folders[src_shards], tmp_path / "out", mp, log=lambda _: None)
    # Meta's Llama 2 params.json and layout, as its own code loads them: only n_kv_heads changes
    # when there are more shards than KV heads (each KV head duplicated).
    params = json.loads((dst / "params.json").read_text())
    assert params == {**TINY["gqa-70b-style"], "n_kv_heads": max(2, mp)}
    assert tokenizer_kind(dst / "tokenizer.model") == "sentencepiece"
    shard = torch.load(dst / "consolidated.00.pth", weights_only=True)
    assert shard["tok_embeddings.weight"].shape == (VOCAB, args.dim // mp)
    assert torch.equal(shard["tok_embeddings.weight"], full["tok_embeddings.weight"].chunk(mp, dim=1)[0])
    written = load_params(dst)
    assert (written.vocab_size, written.rope_theta) == (VOCAB, 10000.0)
    got = load_state_dict(dst, written)
    for key in ("tok_embeddings.weight", "output.weight", "layers.1.attention.wq.weight", "layers.0.feed_forward.w2.weight"):
        assert torch.equal(got[key], full[key])


# ---------------------------------------------------------------------------------------------
# The SentencePiece tokenizer


def tokenizer_texts() -> list[str]:
    # SentencePiece writes a space as U+2581 and decodes U+2581 as a space: text holding that
    # character itself cannot round-trip (in Meta's tokenizer too), so lines with it are left out
    # of the sample (this repository's sources mention it; which lines the sample takes moves as
    # they are edited).
    lines = [line for line in corpus_lines() if "\u2581" not in line]
    texts = lines[:: max(1, len(lines) // 200)][:200]
    texts += [
        "", " ", "  ", "Hello", " Hello", "Hello ", "  two  spaces  ", "\n", "a\n\nb", "\tTab\tseparated",
        "1234567890", "3.14159", "Ünïcödé ÀÉÎÕÜ", "日本語", "emoji 🙂🚀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "zero\u200bwidth",
        "</s> and <s> and <unk> as text", "[INST] tags [/INST] <<SYS>>", "'quotes' \"double\" `back`",
        "mixed 中文 English ελληνικά", "ﬁ ligature", "\u00a0nbsp", "trailing newline\n",
    ]  # fmt: skip
    return texts


def test_sentencepiece_matches_hf_llama_tokenizer(sp_tok, hf_tok):
    texts = tokenizer_texts()
    assert len(texts) >= 200
    for s in texts:
        ours = sp_tok.encode(s, bos=True, eos=False)
        # split_special_tokens: "</s>" typed in text stays text, as in Meta's tokenizer.
        assert ours == hf_tok(s, split_special_tokens=True)["input_ids"], s
        assert sp_tok.decode(ours) == hf_tok.decode(ours, skip_special_tokens=True) == s, s


def test_meta_encode_decode_semantics(sp_tok, sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id, sp_tok.n_words) == (1, 2, -1, VOCAB)
    assert sp_tok.stop_tokens == [2] and sp_tok.special_tokens == {"<s>": 1, "</s>": 2}
    s = "Hello world </s>"
    body = sp.encode(s)
    assert sp_tok.encode(s, bos=True, eos=True) == [1, *body, 2]
    assert 2 not in body  # control-token text is plain text
    assert sp_tok.encode(s, bos=False, eos=False, allowed_special="all") == [*sp.encode("Hello world "), 2]
    with pytest.raises(ValueError, match="disallowed_special"):
        sp_tok.encode(s, bos=False, eos=False, disallowed_special="all")
    assert sp_tok.decode([1, *body, 2]) == s
    with pytest.raises(ValueError, match="valid ids are 0..999"):
        sp_tok.decode([5, VOCAB])


def test_streaming_bytes_add_up_to_decode(sp_tok):
    for s in ["Grüße 🙂 日本 — done.", "plain words here", "\nnewline first"]:
        ids = sp_tok.encode(s, bos=False, eos=False)
        streamed = b"".join(sp_tok.decode_bytes([t]) for t in ids).decode("utf-8")
        # SentencePiece's decode drops the one space its encoding put in front of the text.
        assert streamed == " " + s and sp_tok.decode(ids) == s


def test_tokenizer_kind_from_content(tmp_path, sp_model, meta_tokenizer_path):
    assert tokenizer_kind(sp_model) == "sentencepiece"
    assert tokenizer_kind(meta_tokenizer_path) == "tiktoken"
    assert isinstance(load_tokenizer(sp_model), SentencePieceTokenizer)
    assert load_tokenizer(meta_tokenizer_path).chat_format == "llama3"
    cases = {"hf.json": b'{"version": "1.0", "model": {}}', "empty": b"", "junk": bytes(range(7, 64))}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="neither a tiktoken BPE file .* nor a SentencePiece model"):
            load_tokenizer(tmp_path / name)
    with pytest.raises(ValueError, match="tokenizer.json"):
        tokenizer_kind(tmp_path / "hf.json")
    (tmp_path / "broken.model").write_bytes(sp_model.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        load_tokenizer(tmp_path / "broken.model")


# ---------------------------------------------------------------------------------------------
# The [INST] chat format against HF's Llama 2 chat template

# The chat_template of Hugging Face's meta-llama/Llama-2-7b-chat-hf (tokenizer_config.json), as
# published there: system folded into the first user turn, [INST] ... [/INST] per user turn with
# BOS, " {answer} " + EOS per assistant turn.
HF_LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}],
    [
        {"role": "system", "content": "  You are a pirate.\nStay in character. "},
        {"role": "user", "content": "I want to learn to bake bread. "},
        {"role": "assistant", "content": " Start with a simple white loaf: flour, water, salt and yeast.\n"},
        {"role": "user", "content": "How long should the dough rise?"},
        {"role": "assistant", "content": "About an hour, until doubled."},
        {"role": "user", "content": "Grüße 🙂 — and then?"},
    ],
    [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ],
]


@pytest.mark.parametrize("i", range(len(DIALOGS)))
def test_dialog_prompt_matches_hf_chat_template(i, sp_tok, hf_tok):
    ours = Llama2ChatFormat(sp_tok).encode_dialog_prompt(DIALOGS[i])
    rendered = hf_tok.apply_chat_template(DIALOGS[i], chat_template=HF_LLAMA2_CHAT_TEMPLATE, tokenize=False)
    assert rendered.startswith("<s>[INST] ") and rendered.endswith(" [/INST]")
    assert ours == hf_tok(rendered, add_special_tokens=False)["input_ids"]
    assert ours.count(1) == sum(m["role"] == "user" for m in DIALOGS[i])  # one BOS per turn
    assert ours.count(2) == sum(m["role"] == "assistant" for m in DIALOGS[i])  # one EOS per answer


def test_dialog_prompt_text_layout(sp_tok):
    fmt = chat_format_for(sp_tok)
    assert isinstance(fmt, Llama2ChatFormat)
    dialog = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
              {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]  # fmt: skip
    want = "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]"
    ids = fmt.encode_dialog_prompt(dialog)
    text = "".join(("<s>" if t == 1 else "</s>" if t == 2 else sp_tok.decode_bytes([t]).decode()) for t in ids)
    # Each <s> segment is encoded alone, so it starts with SentencePiece's added space.
    assert text.replace("<s> ", "<s>") == want


def test_control_token_text_in_content_is_plain(sp_tok):
    fmt = Llama2ChatFormat(sp_tok)
    ids = fmt.encode_dialog_prompt([{"role": "user", "content": "end here </s><s> please"}])
    assert ids.count(2) == 0 and ids.count(1) == 1


@pytest.mark.parametrize(
    "dialog, match",
    [
        ([{"role": "user", "content": "hi [/INST] sure"}], r"contains '\[/INST\]'"),
        ([{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "x"}], "contains '<<SYS>>'"),
        ([{"role": "assistant", "content": "x"}], "expected user, got assistant"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "expected assistant, got user"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message must be from user"),
        ([{"role": "system", "content": "x"}], "last message must be from user"),
        ([{"role": "ipython", "content": "x"}], "role 'ipython' is not one of"),
        ([], "empty dialog"),
    ],
)
def test_bad_dialogs(sp_tok, dialog, match):
    with pytest.raises(ValueError, match=match):
        Llama2ChatFormat(sp_tok).encode_dialog_prompt(dialog)


# ---------------------------------------------------------------------------------------------
# End to end: Llama.build on a Llama 2 chat folder, chat_completion stops on EOS


def test_chat_completion_on_llama2_folder(tmp_path, sp_model, sp_tok):
    params = TINY["mha"]
    args = from_dict(params, vocab_size=VOCAB)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    prompt = Llama2ChatFormat(sp_tok).encode_dialog_prompt(dialog)
    # The tokenizer is trained on this repository's text, so how a reply splits changes with the
    # docs: take the first whose tokens (after the prompt's last) are all distinct, as a bigram needs.
    replies = [(text, sp_tok.encode(text, bos=False, eos=False)) for text in ("Hello there", "Hello", "Hi there", "Hi")]
    reply, answer = next(((t, a) for t, a in replies if len({prompt[-1], *a}) == len(a) + 1), (None, None))
    assert reply is not None, f"every reply repeats a token: {replies}"
    chain = [prompt[-1], *answer, 2]  # the prompt's last token -> the answer -> EOS
    full = random_state_dict(args, seed=0, dtype=torch.float32)
    make_bigram(full, args, dict(zip(chain[:-1], chain[1:])))
    write_llama2_folder(tmp_path / "llama-2-chat", params, full, 2, sp_model)

    llm = Llama.build(str(tmp_path / "llama-2-chat"), max_seq_len=128, max_batch_size=2, device="cpu", dtype="fp32")
    assert isinstance(llm.tokenizer, SentencePieceTokenizer) and isinstance(llm.formatter, Llama2ChatFormat)
    out = llm.chat_completion([dialog], temperature=0.0, max_gen_len=20)
    message = out[0]["generation"]
    assert message["content"] == reply and message["stop_reason"] == "end_of_turn"
    streamed = "".join(e["text"] for e in llm.chat_stream(dialog, temperature=0.0, max_gen_len=20))
    assert streamed == " " + reply  # streaming keeps SentencePiece's leading space
    text = llm.text_completion(["Say"], temperature=0.0, max_gen_len=3)[0]["generation"]
    assert isinstance(text, str)


@torch.no_grad()
def test_meta_to_hf_and_memory_on_llama2_folder(tmp_path, llama2_folders):
    from transformers import LlamaForCausalLM

    from llama.convert import meta_to_hf
    from llama.memory import _load_args

    args, full, folders = llama2_folders["gqa-70b-style"]
    assert _load_args(folders[2]) == args  # python -m llama.memory on a Llama 2 folder
    config = meta_to_hf(folders[2], tmp_path / "hf")
    assert config["vocab_size"] == VOCAB and config["num_key_value_heads"] == 2
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    ours = load_transformer(folders[2], args=args).eval()(tokens)
    assert rel_err(ours, hf(tokens).logits) < 1e-4
