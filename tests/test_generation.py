"""Generation (llama/generation.py): Meta's semantics on a tiny random checkpoint and a bigram model.

The random checkpoint checks the decode loop against an independent full forward (no KV cache);
the bigram model (tests/bigram_model.py) makes the next token known in advance, so stop tokens,
lengths and streamed text can be checked exactly.
"""

import json
from pathlib import Path

import pytest
import torch

import llama.devices
import llama.generation
import llama.memory
from bigram_model import make_bigram
from llama.checkpoint import load_transformer, write_random_checkpoint
from llama.devices import DTYPES, default_compute_dtype, default_dtype, parse_dtype, resolve_dtype
from llama.generation import Llama
from llama.memory import plan_memory
from llama.model import ModelArgs, Transformer
from llama.params import to_dict

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
MAX_SEQ_LEN, MAX_BATCH = 40, 4
EOT, EOM, EOS = 128009, 128008, 128001
A, B, C, D = 1000, 2000, 3000, 4000  # plain text tokens for bigram chains


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, meta_tokenizer_path) -> Path:
    path = tmp_path_factory.mktemp("generation") / "ckpt"
    write_random_checkpoint(path, ARGS, n_shards=1, seed=0, dtype=torch.float32, tokenizer_path=meta_tokenizer_path)
    return path


@pytest.fixture(scope="module")
def generator(ckpt_dir) -> Llama:
    # tokenizer_path None: ckpt_dir/tokenizer.model
    return Llama.build(str(ckpt_dir), None, MAX_SEQ_LEN, MAX_BATCH, seed=1, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def full_model(ckpt_dir) -> Transformer:
    """The same weights with no KV cache: every call is an independent full-sequence forward."""
    return load_transformer(ckpt_dir, "cpu", torch.float32)


@pytest.fixture(scope="module")
def bigram(generator) -> Llama:
    """A 1-layer model whose weights each test turns into a bigram table with ``set_bigram``."""
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
    model = Transformer(args, device="cpu", dtype=torch.float32)
    model.setup_cache(MAX_BATCH, 32)
    return Llama(model, generator.tokenizer, seed=0)


def set_bigram(llm: Llama, successors: dict[int, int]) -> Llama:
    make_bigram(llm.model.state_dict(), llm.model.args, successors)
    return llm


def prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    """Random prompts of plain-text tokens, each starting with <|begin_of_text|>."""
    g = torch.Generator().manual_seed(seed)
    return [[128000] + torch.randint(0, 128000, (n - 1,), generator=g).tolist() for n in lengths]


def full_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0]  # [S, V]


# --- semantics on the random checkpoint ---------------------------------------------------------


@pytest.mark.slow
def test_same_seed_same_tokens(ckpt_dir):
    def sample(seed: int) -> list[list[int]]:
        llm = Llama.build(str(ckpt_dir), None, 32, 2, seed=seed, device="cpu", dtype="fp32")
        return llm.generate(prompts(5, 8), max_gen_len=6, temperature=0.8, top_p=0.9)[0]

    first, again, other = sample(3), sample(3), sample(4)
    assert first == again
    assert first != other


def test_batch_equals_single(generator):
    batch = prompts(3, 9, 17, seed=1)
    tokens, lps = generator.generate(batch, max_gen_len=6, temperature=0, logprobs=True)
    for row, p in enumerate(batch):
        alone, alone_lps = generator.generate([p], max_gen_len=6, temperature=0, logprobs=True)
        assert tokens[row] == alone[0]
        assert torch.allclose(torch.tensor(lps[row]), torch.tensor(alone_lps[0]), atol=1e-4)


def test_logprobs_equal_full_forward(generator, full_model):
    generator.rng.manual_seed(11)
    batch = prompts(4, 11, seed=2)
    tokens, lps = generator.generate(batch, max_gen_len=5, temperature=1.0, top_p=1.0, logprobs=True, echo=True)
    for row, p in enumerate(batch):
        seq = tokens[row]
        assert seq[: len(p)] == p and len(seq) == len(p) + 5  # echo: prompt included
        assert len(lps[row]) == len(seq) and lps[row][0] == 0.0  # the first prompt token has none
        want = torch.log_softmax(full_logits(full_model, seq)[:-1], -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lps[row][1:]), want, atol=1e-4)


def test_max_gen_len_0_scores_the_prompts(generator, full_model):
    """Meta's scoring call: nothing generated, each prompt token's logprob given those before it
    (rows of different lengths in one batch; a prompt may fill max_seq_len then)."""
    batch = prompts(4, 11, MAX_SEQ_LEN, seed=5)
    tokens, lps = generator.generate(batch, max_gen_len=0, temperature=0.6, logprobs=True, echo=True)
    assert tokens == batch
    for row, p in enumerate(batch):
        want = torch.log_softmax(full_logits(full_model, p)[:-1], -1).gather(-1, torch.tensor(p[1:])[:, None])[:, 0]
        assert lps[row][0] == 0.0 and len(lps[row]) == len(p)
        assert torch.allclose(torch.tensor(lps[row][1:]), want, atol=1e-4)
    assert generator.generate(batch, max_gen_len=0, logprobs=True) == ([[], [], []], [[], [], []])  # no echo: nothing
    assert generator.generate(batch[:2], max_gen_len=0, echo=True) == (batch[:2], None)
    (done,) = generator.text_completion(["Hello"], max_gen_len=0, logprobs=True, echo=True)
    assert done["generation"] == "<|begin_of_text|>Hello" and done["logprobs"][0] == 0.0 and len(done["logprobs"]) == 2


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_any_nonfinite_logit_stops_generation(generator, value):
    """One NaN, inf or -inf anywhere in a row's logits (first, middle or last position, any row)
    stops the step before sampling: the check reads the smallest and largest logit."""
    from llama.diagnose import NonFiniteLogitsError

    for row, index in ((0, 0), (1, 77_777), (1, 128_255)):
        def poison(_module, _inputs, logits):
            logits[row, -1, index] = value
            return logits

        handle = generator.model.register_forward_hook(poison)
        try:
            with pytest.raises(NonFiniteLogitsError, match="non-finite logits"):
                generator.generate(prompts(3, 5), max_gen_len=2, temperature=0)
        finally:
            handle.remove()
    assert generator.generate(prompts(3, 5), max_gen_len=2, temperature=0)  # unpoisoned: it generates


def test_greedy_is_argmax_and_echo_is_consistent(generator, full_model):
    batch = prompts(6, 3, seed=3)
    tokens, lps = generator.generate(batch, max_gen_len=5, temperature=0, logprobs=True)
    echoed, echoed_lps = generator.generate(batch, max_gen_len=5, temperature=0, logprobs=True, echo=True)
    for row, p in enumerate(batch):
        seq = p + tokens[row]
        argmax = full_logits(full_model, seq)[len(p) - 1 : -1].argmax(-1)
        assert tokens[row] == argmax.tolist()
        assert echoed[row] == seq
        assert torch.allclose(torch.tensor(echoed_lps[row][len(p) :]), torch.tensor(lps[row]), atol=1e-5)
    # Top-p with a tiny p keeps only the most likely token: greedy, whatever the temperature.
    assert generator.generate(batch, max_gen_len=5, temperature=1.0, top_p=1e-9)[0] == tokens


def test_sampled_logprobs_are_those_of_returned_tokens(generator, full_model):
    generator.rng.manual_seed(5)
    (p,) = prompts(7, seed=4)
    (tokens,), (lps,) = generator.generate([p], max_gen_len=6, temperature=0.7, top_p=0.9, logprobs=True)
    seq = p + tokens
    logp = torch.log_softmax(full_logits(full_model, seq), -1)  # logprobs ignore temperature, as Meta's
    want = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(tokens)]
    assert torch.allclose(torch.tensor(lps), torch.tensor(want), atol=1e-4)


def test_stream_yields_the_tokens_and_text_of_generate(generator):
    batch = prompts(5, 2, 9, seed=5)
    generator.rng.manual_seed(21)
    tokens, _ = generator.generate(batch, max_gen_len=6, temperature=0.9, top_p=0.95)
    generator.rng.manual_seed(21)
    streamed: list[list[int]] = [[] for _ in batch]
    texts = ["" for _ in batch]
    for events in generator.generate_stream(batch, max_gen_len=6, temperature=0.9, top_p=0.95):
        assert len({e["row"] for e in events}) == len(events)  # at most one event per row per step
        for e in events:
            if not e["is_stop"]:
                streamed[e["row"]].append(e["token"])
            texts[e["row"]] += e["text"]
    assert streamed == tokens
    assert texts == [generator.tokenizer.decode(t) for t in tokens]


def test_text_stream_matches_text_completion(generator):
    generator.rng.manual_seed(8)
    (completion,) = generator.text_completion(["The sky is"], temperature=0.8, max_gen_len=5)
    generator.rng.manual_seed(8)
    streamed = generator.text_stream("The sky is", temperature=0.8, max_gen_len=5)
    assert "".join(e["text"] for e in streamed) == completion["generation"]


def test_result_shapes(generator):
    out = generator.text_completion(["Hello", "The capital of France is"], max_gen_len=3)
    assert [set(r) for r in out] == [{"generation"}] * 2 and all(isinstance(r["generation"], str) for r in out)
    out = generator.text_completion(["Hello"], max_gen_len=3, logprobs=True)
    assert set(out[0]) == {"generation", "tokens", "logprobs"}
    assert len(out[0]["tokens"]) == len(out[0]["logprobs"]) <= 3
    assert all(isinstance(t, str) for t in out[0]["tokens"]) and all(x <= 0 for x in out[0]["logprobs"])
    echo = generator.text_completion(["Hello"], max_gen_len=3, echo=True)[0]["generation"]
    assert echo.startswith("<|begin_of_text|>Hello")

    user, system = {"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}
    dialogs = [[user], [system, user]]
    out = generator.chat_completion(dialogs, max_gen_len=3)
    for r in out:
        assert set(r) == {"generation"}
        assert r["generation"]["role"] == "assistant" and isinstance(r["generation"]["content"], str)
    out = generator.chat_completion(dialogs[:1], max_gen_len=3, logprobs=True)
    assert set(out[0]) == {"generation", "tokens", "logprobs"} and len(out[0]["tokens"]) == len(out[0]["logprobs"])


# --- exact behaviour on a bigram model ----------------------------------------------------------


@pytest.mark.parametrize("stop", [EOS, EOM, EOT])
def test_stop_tokens_end_rows_and_are_not_returned(bigram, stop):
    set_bigram(bigram, {A: B, B: C, C: stop, D: D})
    batch = [[A], [C], [D], [B]]
    tokens, lps = bigram.generate(batch, max_gen_len=6, temperature=0.6, top_p=0.9, logprobs=True)
    assert tokens == [[B, C], [], [D] * 6, [C]]  # other rows go on after one stops
    assert [len(x) for x in lps] == [2, 0, 6, 1] and all(-1e-6 < x <= 0 for row in lps for x in row)
    assert bigram.generate([[A]], max_gen_len=6, temperature=0, echo=True)[0] == [[A, B, C]]
    rows: list[list[tuple[int, bool]]] = [[] for _ in batch]
    for events in bigram.generate_stream(batch, max_gen_len=6, temperature=0):
        for e in events:
            rows[e["row"]].append((e["token"], e["is_stop"]))
    assert rows[0] == [(B, False), (C, False), (stop, True)] and rows[1] == [(stop, True)]
    assert rows[2] == [(D, False)] * 6 and rows[3] == [(C, False), (stop, True)]


@pytest.mark.parametrize("stop, reason", [(EOT, "end_of_turn"), (EOM, "end_of_message"), (EOS, "end_of_turn")])
def test_chat_completion_stop_reason(bigram, stop, reason):
    hello, there = bigram.tokenizer.encode("Hello there", bos=False, eos=False)
    last = bigram.formatter.encode_dialog_prompt([{"role": "user", "content": "hi"}])[-1]  # "\n\n" after the header
    set_bigram(bigram, {last: hello, hello: there, there: stop})
    dialog = [{"role": "user", "content": "hi"}]
    (out,) = bigram.chat_completion([dialog], logprobs=True)
    assert out["generation"]["content"] == "Hello there" and out["generation"]["stop_reason"] == reason
    assert out["tokens"] == ["Hello", " there"]
    (short,) = bigram.chat_completion([dialog], max_gen_len=1)
    assert short["generation"]["content"] == "Hello" and short["generation"]["stop_reason"] == "out_of_tokens"
    assert "".join(e["text"] for e in bigram.chat_stream(dialog)) == "Hello there"


def test_max_gen_len_and_max_seq_len_bound_the_output(bigram):
    set_bigram(bigram, {D: D})  # never stops
    room = bigram.model.max_seq_len  # 32
    assert bigram.generate([[D]], max_gen_len=1)[0] == [[D]]
    assert bigram.generate([[D] * 3, [D] * 10], max_gen_len=7)[0] == [[D] * 7, [D] * 7]
    # The cache ends the longer row early; the shorter one still gets all max_gen_len tokens.
    assert [len(t) for t in bigram.generate([[D] * 4, [D] * 28], max_gen_len=10)[0]] == [10, room - 28]
    # max_gen_len None: up to max_seq_len - 1 new tokens, so the cache is filled.
    text = bigram.tokenizer.decode([D])
    (out,) = bigram.text_completion([text], max_gen_len=None, logprobs=True)
    assert out["tokens"] == [text] * (room - 2)  # BOS + D, then D until the cache is full


def _byte_token(llm: Llama, byte: int) -> int:
    token = llm.tokenizer.model.encode_single_token(bytes([byte]))
    assert llm.tokenizer.decode_bytes([token]) == bytes([byte])
    return token


def test_stream_assembles_characters_split_across_byte_tokens(bigram):
    text = "é😀!"  # c3 a9 | f0 9f 98 80 | 21: one byte-level token each
    chain = [_byte_token(bigram, b) for b in text.encode()]
    set_bigram(bigram, {A: chain[0], **dict(zip(chain, chain[1:] + [EOT]))})
    events = list(bigram.text_stream(bigram.tokenizer.decode([A]), max_gen_len=20))
    assert [e["token"] for e in events] == chain + [EOT]
    assert [e["text"] for e in events] == ["", "é", "", "", "", "😀", "!", ""]
    assert bigram.generate([[A]], max_gen_len=20)[0] == [chain]
    assert bigram.text_completion([bigram.tokenizer.decode([A])], max_gen_len=20)[0]["generation"] == text


def test_stream_flushes_an_incomplete_character_at_the_end(bigram):
    chain = [_byte_token(bigram, b) for b in "😀".encode()]
    set_bigram(bigram, {A: chain[0], chain[0]: chain[1], chain[1]: EOT, B: chain[2], chain[2]: chain[3], chain[3]: C})
    for prompt, max_gen_len in (([A], 10), ([B], 1), ([B], 2)):  # ends on a stop token / out of tokens
        tokens = bigram.generate([prompt], max_gen_len=max_gen_len)[0][0]
        texts = [e["text"] for events in bigram.generate_stream([prompt], max_gen_len) for e in events]
        assert "".join(texts) == bigram.tokenizer.decode(tokens)
    assert bigram.tokenizer.decode(bigram.generate([[A]], 10)[0][0]) == "\ufffd"


# --- errors -------------------------------------------------------------------------------------

REQUEST_ERRORS = [
    ({"prompt_tokens": []}, "empty batch"),
    ({"prompt_tokens": [[1, 2], []]}, "prompt 1 is empty"),
    ({"prompt_tokens": [[1]] * 5}, "batch of 5 prompts exceeds max_batch_size=4"),
    ({"prompt_tokens": [[1] * MAX_SEQ_LEN]}, f"prompt 0 has {MAX_SEQ_LEN} tokens; .* shorter than max_seq_len={MAX_SEQ_LEN}"),
    ({"prompt_tokens": [[1, 128256]]}, "prompt 0 has token ids outside 0..128255"),
    ({"temperature": -0.1}, "temperature=-0.1 must be >= 0"),
    ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
    ({"max_gen_len": -1}, "max_gen_len=-1 must be at least"),  # 0 scores (generate), a stream needs 1
]


@pytest.mark.parametrize("kwargs, message", REQUEST_ERRORS, ids=[m[:24] for _, m in REQUEST_ERRORS])
def test_request_errors(generator, kwargs, message):
    request = {"prompt_tokens": [[128000, 5]], "max_gen_len": 4, "temperature": 0.6, "top_p": 0.9, **kwargs}
    with pytest.raises(ValueError, match=message):
        generator.generate(**request)
    with pytest.raises(ValueError, match=message):  # the stream checks before its first step
        next(generator.generate_stream(**request))


def test_model_without_cache_is_refused(generator):
    with pytest.raises(ValueError, match="setup_cache"):
        Llama(Transformer(ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=16), device="meta"), generator.tokenizer)


def _params_only(tmp_path: Path, name: str, **params) -> Path:
    """A folder with only params.json: build must fail on it before looking for weights."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({**to_dict(ARGS), **params}))
    return folder


@pytest.mark.slow
def test_build_limits_max_seq_len_to_the_model_context(tmp_path, meta_tokenizer_path):
    v30, v31 = _params_only(tmp_path, "v30"), _params_only(tmp_path, "v31", use_scaled_rope=True)
    tok = str(meta_tokenizer_path)
    with pytest.raises(ValueError, match=r"max_seq_len=8193 must be between 2 and the model's context of 8192 .*131072"):
        Llama.build(str(v30), tok, max_seq_len=8193, max_batch_size=1, device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="max_seq_len=131073 .* context of 131072 tokens"):
        Llama.build(str(v31), tok, max_seq_len=131073, max_batch_size=1, device="cpu", dtype="fp32")
    for folder, longest in ((v30, 8192), (v31, 131072)):  # the limit itself passes, then no weights
        with pytest.raises(FileNotFoundError, match="no consolidated"):
            Llama.build(str(folder), tok, max_seq_len=longest, max_batch_size=1, device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="max_batch_size=0 must be at least 1"):
        Llama.build(str(v30), tok, max_seq_len=64, max_batch_size=0, device="cpu", dtype="fp32")


def test_build_vocab_mismatch_names_both_sizes(tmp_path, meta_tokenizer_path):
    folder = _params_only(tmp_path, "small_vocab", vocab_size=32000)
    with pytest.raises(ValueError, match=r"vocab_size=32000.*128256 tokens"):
        Llama.build(str(folder), str(meta_tokenizer_path), max_seq_len=64, device="cpu")
    # With the default tokenizer path the message names the file that was read.
    (folder / "tokenizer.model").write_bytes(Path(meta_tokenizer_path).read_bytes())
    with pytest.raises(ValueError, match=r"vocab_size=32000.*tokenizer\.model has 128256 tokens"):
        Llama.build(str(folder), None, max_seq_len=64, device="cpu")


def test_build_checks_memory_before_allocating(tmp_path, meta_tokenizer_path, monkeypatch):
    folder = _params_only(tmp_path, "big")

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights loaded before the memory check")

    monkeypatch.setattr(llama.memory, "available_bytes", lambda device: 10**6)
    monkeypatch.setattr(llama.generation, "load_transformer", must_not_load)
    plan = plan_memory(ARGS, 64, 4, torch.float32)
    with pytest.raises(MemoryError) as e:
        Llama.build(str(folder), str(meta_tokenizer_path), max_seq_len=64, max_batch_size=4, device="cpu", dtype="fp32")
    assert plan.describe() in str(e.value) and "0.00 GiB is free" in str(e.value)


def test_dtypes(monkeypatch):
    cpu = torch.device("cpu")
    for native_bf16, compute in ((True, None), (False, torch.float32)):
        # bf16 weights on every CPU; multiplied in float32 where the CPU has no bf16 arithmetic.
        monkeypatch.setattr(llama.devices, "cpu_has_native_bf16", lambda: native_bf16)
        assert default_dtype(cpu) == torch.bfloat16
        assert default_compute_dtype(cpu, torch.bfloat16) == compute
        assert default_compute_dtype(cpu, torch.float32) is None
    monkeypatch.undo()
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(torch.float16, torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))
    for other in (torch.int8, torch.complex64, torch.float8_e4m3fn, torch.float64):  # failed deep in load or generate
        with pytest.raises(ValueError, match=rf"^dtype {other} is not one the model computes in"):
            resolve_dtype(other, torch.device("cpu"))
    # One table of names for every entry point: the short, the torch and the C spellings.
    spellings = {torch.bfloat16: ("bf16", "bfloat16"), torch.float16: ("fp16", "float16", "half"),
                 torch.float32: ("fp32", "float32", "float")}  # fmt: skip
    assert sorted(DTYPES) == sorted(name for names in spellings.values() for name in names)
    for dtype, names in spellings.items():
        assert all(parse_dtype(name) == dtype for name in names)


# --- dialogs ------------------------------------------------------------------------------------

U, AS, SYS, TOOL = ({"role": r, "content": "x"} for r in ("user", "assistant", "system", "ipython"))


def test_dialogs_meta_encodes_are_accepted(generator):
    """Dialog checks live in llama.chat_format (tests/test_chat_format.py); here: chat_completion uses them."""
    out = generator.chat_completion([[U, U], [U, AS], [U, SYS, U], [TOOL]], temperature=0, max_gen_len=2)
    assert len(out) == 4
    with pytest.raises(ValueError, match="dialog 1, message 1: invalid role 'robot'"):
        generator.chat_completion([[U], [U, {"role": "robot", "content": "x"}]], max_gen_len=2)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda g: g.chat_completion([U]), r"got one dialog \(a list of messages\): use \[dialog\]"),
        (lambda g: g.chat_completion(U), "chat_completion takes a list of dialogs, got a dict"),
        (lambda g: g.chat_completion([[]]), "dialog 0 is empty"),
        (lambda g: g.text_completion("Hello there"), r"text_completion takes a list of prompts, got a str: use \[prompt\]"),
        (lambda g: g.text_completion([[1, 2]]), r"prompt 0 is a list, not a str"),
    ],
)
def test_batch_given_without_its_list(generator, call, message):
    with pytest.raises(ValueError, match=message):
        call(generator)
