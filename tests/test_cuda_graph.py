"""The CUDA-graph decode step's bookkeeping (llama/cuda_graph.py), on the CPU with a stand-in graph.

A real graph needs a GPU (tests/test_cuda.py runs one: graph == eager there). Here the capture is
replaced by one that records the step's inputs and re-runs the model on those same tensors at each
replay, and that refuses to replay over a KV cache other than the one it was captured with: what
a stale CUDA graph would do silently (write into freed memory). So these tests fail if a call's
inputs are not copied into the graph's own tensors, if graphs are not kept per batch size, or if
a new cache is not noticed.
"""

import pytest
import torch

from llama import cuda_graph
from llama.cuda_graph import Captured, GraphedDecodeStep
from llama.generation import Llama
from llama.model import ModelArgs, Transformer

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeGraph:
    """Replays ``run`` on the captured input tensors; refuses a model whose caches changed since."""

    def __init__(self, model: Transformer, run, tokens: torch.Tensor, start_pos: torch.Tensor, logits: torch.Tensor):
        self.model, self.run, self.tokens, self.start_pos, self.logits = model, run, tokens, start_pos, logits
        self.caches = [layer.attention.cache for layer in model.layers]

    def replay(self) -> None:
        assert [layer.attention.cache for layer in self.model.layers] == self.caches, "replayed over a freed cache"
        self.logits.copy_(self.run(self.tokens, self.start_pos))


def fake_capture(model: Transformer, log: list):
    def capture(run, tokens, start_pos) -> Captured:
        logits = run(tokens, start_pos)  # the warm-up run: writes the same keys and values as the step
        log.append(tokens.shape[0])
        return Captured(FakeGraph(model, run, tokens, start_pos, logits), tokens, start_pos, logits)

    return capture


def make_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ARGS, device="cpu", dtype=torch.float32)
    for p in model.parameters():  # decisive logits: greedy choices far from ties
        p.data.normal_(0, 0.2)
    model.setup_cache(4, 48)
    return model


def run(llm: Llama, batch: list[list[int]], n: int = 10) -> tuple[list[list[int]], list[list[float]]]:
    tokens, logprobs = llm.generate(batch, n, temperature=0, logprobs=True)
    return tokens, logprobs


def test_graphed_steps_generate_like_eager_steps(tokenizer):
    model = make_model()
    eager = Llama(model, tokenizer)
    assert eager.decode_step is None  # on the CPU: eager steps
    batches = [[[1, 2, 3]], [[5, 6, 7, 8], [9, 10], [11, 12, 13]], [[14, 15]]]
    expected = [run(eager, b) for b in batches]

    graphed, captures = Llama(model, tokenizer), []
    graphed.decode_step = GraphedDecodeStep(model, capture=fake_capture(model, captures))
    for batch, (tokens, logprobs) in zip(batches, expected):
        got_tokens, got_logprobs = run(graphed, batch)
        assert got_tokens == tokens
        for a, b in zip(got_logprobs, logprobs):  # the whole cache with a mask vs the written part
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert captures == [1, 3]  # one graph per batch size, kept for the third request

    model.setup_cache(4, 48)  # new cache tensors: the graphs must be captured again
    tokens, _ = run(graphed, batches[0])
    assert tokens == expected[0][0]
    assert captures == [1, 3, 1]


def test_inputs_are_copied_not_kept():
    model = make_model()
    step = GraphedDecodeStep(model, capture=fake_capture(model, []))
    tokens, pos = torch.tensor([[7]]), torch.tensor(0)
    first = step(tokens, pos).clone()
    tokens.fill_(8), pos.fill_(1)  # the caller reuses its tensors: the graph's own must not follow
    second = step(torch.tensor([[7]]), torch.tensor(0)).clone()
    assert torch.equal(first, second)
    third = step(tokens, pos).clone()  # a call's new values are used: token 8 at position 1
    assert torch.equal(third, model(torch.tensor([[8]]), torch.tensor(1), last_only=True))


@pytest.mark.parametrize(
    "tokens, pos",
    [(torch.tensor([[1, 2]]), torch.tensor(0)), (torch.tensor([1]), torch.tensor(0)), (torch.tensor([[1]]), torch.tensor([0]))],
)
def test_step_shapes_are_checked(tokens, pos):
    step = GraphedDecodeStep(make_model(), capture=fake_capture(make_model(), []))
    with pytest.raises(ValueError, match="tokens \\[B, 1\\] and an int or 0-d tensor start_pos"):
        step(tokens, pos)


def test_enabled_only_for_one_cuda_process(monkeypatch):
    monkeypatch.delenv("LLAMA_CUDA_GRAPH", raising=False)
    assert cuda_graph.enabled(torch.device("cuda"))
    assert not cuda_graph.enabled(torch.device("cpu"))
    assert not cuda_graph.enabled(torch.device("cuda"), world_size=2)
    monkeypatch.setenv("LLAMA_CUDA_GRAPH", "0")
    assert not cuda_graph.enabled(torch.device("cuda"))


def test_a_step_that_cannot_be_captured_runs_eagerly(tokenizer, capsys):
    """A capture that fails (a layer synchronising with the host, say) is said once, and every step
    then runs the same static-shape step eagerly: the same tokens as eager decoding."""
    model = make_model()
    expected = Llama(model, tokenizer).generate([[1, 2, 3]], 8, temperature=0)

    def refuse(run, tokens, start_pos):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    llm = Llama(model, tokenizer)
    llm.decode_step = GraphedDecodeStep(model, capture=refuse)
    assert llm.generate([[1, 2, 3]], 8, temperature=0) == expected
    assert llm.generate([[1, 2, 3]], 8, temperature=0) == expected
    err = capsys.readouterr().err
    assert err.count("decoding without a CUDA graph") == 1 and "not permitted when stream is capturing)" in err
