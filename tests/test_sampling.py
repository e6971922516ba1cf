"""Sampling (llama/sampling.py): greedy, temperature, top-p, against naive formulas written here."""

import pytest
import torch

from llama import sampling
from llama.sampling import TOP_P_CANDIDATES, all_finite, argmax, nucleus, sample_next, sample_top_p, sample_top_p_full_sort


def naive_nucleus(probs: list[float], p: float) -> set[int]:
    """Token ids of the smallest most-likely-first set whose mass exceeds p (all tokens if none does)."""
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass > p:
            break
    return kept


def test_nucleus_keeps_smallest_prefix_exceeding_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    assert nucleus(probs, 0.7).tolist() == [[0.5, 0.3, 0.0, 0.0]]
    assert nucleus(probs, 0.85).tolist() == [[0.5, 0.3, 0.15, 0.0]]
    assert nucleus(probs, 1.0).tolist() == [[0.5, 0.3, 0.15, 0.05]]
    # The most likely token always survives, however small p is.
    assert nucleus(probs, 1e-9).tolist() == [[0.5, 0.0, 0.0, 0.0]]


def test_nucleus_matches_naive_formula():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        probs = torch.softmax(torch.randn(12, generator=g, dtype=torch.float64) * (trial % 5), -1)
        p = float(torch.rand((), generator=g, dtype=torch.float64))
        sorted_probs, index = torch.sort(probs, descending=True)
        kept = nucleus(sorted_probs[None], p)[0]
        got = {int(index[i]) for i in range(12) if kept[i] > 0}
        assert got == naive_nucleus(probs.tolist(), p), (trial, p)


def test_sample_top_p_support_and_frequencies():
    # Probabilities deliberately not in sorted order: the result must be the original token ids.
    probs = torch.tensor([0.3, 0.05, 0.15, 0.5])
    n = 4000
    g = torch.Generator().manual_seed(0)
    for p, expected in ((0.7, {3: 0.5 / 0.8, 0: 0.3 / 0.8}), (1.0, {3: 0.5, 0: 0.3, 2: 0.15, 1: 0.05})):
        tokens = sample_top_p(probs.expand(n, 4), p, g)
        counts = torch.bincount(tokens, minlength=4).double() / n
        assert set(tokens.unique().tolist()) == set(expected)
        for token, freq in expected.items():
            assert abs(counts[token].item() - freq) < 0.04, (p, token, counts.tolist())
    # Tiny p: only the top token, every time.
    assert sample_top_p(probs.expand(100, 4), 1e-6, g).unique().tolist() == [3]


def test_temperature_zero_is_argmax():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_next(logits, 0.0, 0.9), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 0, 0.01), logits.argmax(-1))


@pytest.mark.parametrize("vocab", [128256, 49152, 1000, 8])
def test_argmax_and_all_finite_are_torch_s(vocab):
    """Greedy's argmax (numpy's on the CPU) is torch.argmax's index: the first of equal maxima, the
    first NaN; ``all_finite`` is isfinite().all(), for float32, float64 and bf16 (torch's) logits."""
    g = torch.Generator().manual_seed(vocab)
    cases = [torch.randn(rows, vocab, generator=g) for rows in (1, 3, 8)]
    x = torch.randn(8, vocab, generator=g)
    last = vocab - 1
    x[0].fill_(0.25)  # all equal: 0
    x[1, [last, 5 % vocab, vocab // 2]] = 9.0  # ties: the first
    x[2, last] = 9.0  # the very last position
    x[3, [3, last]] = float("nan")  # the first NaN, even before larger values
    x[3, 1] = float("inf")
    x[4, [vocab // 2, 2]] = float("inf")  # the first inf
    x[5].fill_(float("-inf"))  # all -inf: 0
    x[6, [last, vocab // 3]] = float("nan")
    x[6, 0] = 1e30
    x[7, vocab // 2] = float("-inf")
    cases += [x, x.to(torch.bfloat16), x.to(torch.float64)]
    cases.append(torch.randn(4, 3, vocab, generator=g)[:, -1])  # a step's last position: a strided view
    cases.append(torch.randn(vocab, generator=g))  # one row without a batch dimension
    for logits in cases:
        want = torch.argmax(logits, dim=-1)
        assert torch.equal(argmax(logits), want), (logits.shape, logits.dtype)
        assert torch.equal(sample_next(logits, 0.0, 0.9), want)
        assert all_finite(logits) == bool(torch.isfinite(logits).all())
        for row in range(logits.shape[0] if logits.dim() == 2 else 0):
            assert all_finite(logits[row : row + 1]) == bool(torch.isfinite(logits[row]).all()), row


def test_temperature_scales_logits_before_top_p():
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(2))
    for t in (0.3, 0.8, 1.7):
        a = sample_next(logits, t, 0.9, torch.Generator().manual_seed(3))
        b = sample_top_p(torch.softmax(logits / t, -1), 0.9, torch.Generator().manual_seed(3))
        assert torch.equal(a, b)


def _distributions() -> list[torch.Tensor]:
    """Peaked, flat and bf16-rounded (many exact ties) distributions, small and full vocab."""
    g = torch.Generator().manual_seed(4)
    out = []
    for trial in range(60):
        vocab = 128256 if trial in (0, 7) else (50 if trial % 12 == 1 else 2000)
        scale = [0.0, 0.05, 1.0, 3.0, 6.0, 12.0][trial % 6]
        logits = torch.randn(3, vocab, generator=g) * scale
        if trial % 2:
            logits = logits.to(torch.bfloat16).float()  # bf16 logits: equal probabilities are common
        out.append(torch.softmax(logits, -1))
    # Exact ties inside the nucleus and at the top-k boundary.
    tied = torch.full((2, 1000), 0.02 / 997)
    tied[:, [7, 3, 500]] = 0.98 / 3
    out.append(tied / tied.sum(-1, keepdim=True))
    boundary = torch.zeros(1, 2000)
    boundary[0, :TOP_P_CANDIDATES - 1] = 0.9 / (TOP_P_CANDIDATES - 1)
    boundary[0, 1000:1100] = 0.1 / 100  # the 64th candidate ties with 99 tokens outside the top-k
    out.append(boundary)
    return out


@pytest.mark.slow
def test_fast_top_p_path_equals_full_sort_exactly(monkeypatch):
    """Same generator state -> the same token ids, whichever path sample_top_p takes."""
    calls = {"fallback": 0}
    full = sampling.sample_top_p_full_sort

    def counting_full_sort(*args, **kwargs):
        calls["fallback"] += 1
        return full(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_top_p_full_sort", counting_full_sort)
    n = 0
    for i, probs in enumerate(_distributions()):
        for j, p in enumerate((0.05, 0.5, 0.9, 0.95, 0.999, 1.0)):
            for seed in (100 * i + j, 100 * i + j + 50):
                fast = sample_top_p(probs, p, torch.Generator().manual_seed(seed))
                ref = full(probs, p, torch.Generator().manual_seed(seed))
                assert torch.equal(fast, ref), (i, p, seed, fast.tolist(), ref.tolist())
                n += 1
    assert 0 < calls["fallback"] < n  # both the top-k path and the full-sort fallback were exercised


def test_full_sort_sample_lies_in_nucleus():
    g = torch.Generator().manual_seed(5)
    for _ in range(30):
        probs = torch.softmax(torch.randn(1, 40, generator=g) * 2, -1).double()
        p = float(torch.rand((), generator=g))
        allowed = naive_nucleus(probs[0].tolist(), p)
        draws = sample_top_p_full_sort(probs.expand(200, 40), p, g)
        assert set(draws.tolist()) <= allowed


@pytest.mark.parametrize("p", [0.9, 1.0])
def test_sampling_consumes_one_draw_per_row(p):
    """Every row draws exactly one uniform number: fast path and fallback leave the generator alike."""
    probs = torch.softmax(torch.randn(2, 3000, generator=torch.Generator().manual_seed(6)) * 8, -1)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    sample_top_p(probs, p, g1)
    sample_top_p_full_sort(probs, p, g2)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


# ---------------------------------------------------------------------------------------------
# Arguments: temperature finite and >= 0, top_p in (0, 1] (issue 15, points 3 and 17)


@pytest.mark.parametrize("t", [float("nan"), float("inf"), -0.5])
def test_temperature_must_be_finite_and_not_negative(t):
    with pytest.raises(ValueError, match=rf"^temperature={t!r} must be >= 0 and finite \(0 is greedy\)$"):
        sample_next(torch.zeros(1, 8), t, 0.9)


@pytest.mark.parametrize("t", ["0.5", None, True, torch.tensor(0.5)])
def test_temperature_must_be_a_number(t):
    with pytest.raises(TypeError, match=r"^temperature must be a number >= 0 \(0 is greedy\), got "):
        sample_next(torch.zeros(1, 8), t, 0.9)


@pytest.mark.parametrize("p,error", [(0.0, ValueError), (1.5, ValueError), (float("nan"), ValueError), ("0.9", TypeError)])
def test_top_p_range_and_type(p, error):
    with pytest.raises(error, match="top_p"):
        sample_next(torch.zeros(1, 8), 0.7, p)


def test_tiny_temperature_tends_to_greedy_with_ties_shared():
    # 1e-45 used to overflow logits / t to inf, and softmax to NaN: the last token id, every time.
    logits = torch.tensor([[1.0, 3.0, -2.0, 3.0, 0.5]]).expand(400, 5)
    g = torch.Generator().manual_seed(0)
    for t in (1e-45, 1e-30, 1e-8):
        tokens = sample_next(logits, t, 1.0, g)
        assert set(tokens.tolist()) == {1, 3}  # the two tied maxima, and nothing else
        assert 150 < int((tokens == 1).sum()) < 250
    single = torch.randn(6, 1000, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sample_next(single, 1e-45, 0.9, g), single.argmax(-1))


def test_huge_temperature_is_uniform_not_nan():
    logits = torch.tensor([[10.0, -10.0, 0.0, 5.0]]).expand(4000, 4)
    tokens = sample_next(logits, 1e30, 1.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=4).double() / 4000
    assert (counts - 0.25).abs().max() < 0.04
