"""Sampler: greedy, seeded draws, nucleus, OpenAI penalties, and agreement with softmax."""

from __future__ import annotations

from typing import Any, TypedDict, Unpack

import numpy as np
import pytest

from engines.base import EngineError, SamplingParams
from engines.runtime.sampler import Sampler

VOCAB = 49152


class Overrides(TypedDict, total=False):
    """SamplingParams' fields besides max_tokens."""

    temperature: float
    top_p: float
    seed: int | None
    presence_penalty: float
    frequency_penalty: float


def params(**kw: Unpack[Overrides]) -> SamplingParams:
    return SamplingParams(max_tokens=16, **kw)


def random_logits(seed: int, scale: float = 1.0, vocab: int = VOCAB) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab) * scale).astype(np.float32)


def draws(sampler: Sampler, logits: np.ndarray, n: int) -> list[int]:
    return [sampler.sample(logits) for _ in range(n)]


def test_temperature_zero_is_argmax_without_randomness() -> None:
    logits = random_logits(1)
    expected = int(np.argmax(logits))
    for seed in (None, 1, 2):
        assert draws(Sampler(params(temperature=0.0, seed=seed)), logits, 5) == [expected] * 5


def test_same_seed_same_draws_different_seed_differs() -> None:
    logits = random_logits(2, scale=0.5)  # flat enough that draws vary
    a = draws(Sampler(params(temperature=1.0, seed=1234)), logits, 50)
    b = draws(Sampler(params(temperature=1.0, seed=1234)), logits, 50)
    c = draws(Sampler(params(temperature=1.0, seed=4321)), logits, 50)
    assert a == b
    assert a != c
    assert len(set(a)) > 40


def test_same_seed_same_draws_with_top_p() -> None:
    logits = random_logits(3, scale=2.0)
    a = draws(Sampler(params(temperature=0.8, top_p=0.9, seed=7)), logits, 30)
    b = draws(Sampler(params(temperature=0.8, top_p=0.9, seed=7)), logits, 30)
    assert a == b
    assert len(set(a)) > 1


def test_small_top_p_keeps_only_the_top_token() -> None:
    logits = random_logits(4, scale=0.3)
    top = int(np.argmax(logits))
    assert set(draws(Sampler(params(temperature=1.0, top_p=1e-6, seed=5)), logits, 100)) == {top}
    # Without the nucleus the same logits give many tokens, so the assertion above means something.
    assert len(set(draws(Sampler(params(temperature=1.0, seed=5)), logits, 100))) > 50


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = np.full(1000, -np.inf, dtype=np.float32)
    logits[[10, 500, 700, 999]] = np.log([0.4, 0.3, 0.2, 0.1])
    got = draws(Sampler(params(temperature=1.0, top_p=0.5, seed=9)), logits, 4000)
    counts = {t: got.count(t) for t in set(got)}
    assert set(counts) == {10, 500}  # 0.4 < 0.5 <= 0.4 + 0.3
    assert counts[10] / counts[500] == pytest.approx(4 / 3, rel=0.1)


def test_top_p_with_a_long_tail_uses_the_exact_fallback() -> None:
    # Thousands of equal tokens: the nucleus lies far below the first candidate threshold.
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[0] = 5.0
    got = draws(Sampler(params(temperature=1.0, top_p=0.5, seed=3)), logits, 200)
    assert len(set(got)) > 150
    assert 0 in got


def test_wide_nucleus_is_exact() -> None:
    # 3000 tokens of weight 1, 1000 of weight e^-1 and a negligible rest: with top_p = 0.95 the nucleus is
    # all of the first group plus the first 543 of the second (ties kept in id order), beyond any quick
    # candidate set, so this exercises the histogram path.
    logits = np.full(4096, -10.0, dtype=np.float32)
    logits[:3000] = 0.0
    logits[3000:4000] = -1.0
    w = np.exp(logits.astype(np.float64))
    order = np.argsort(-w, kind="stable")
    nucleus = order[: int(np.searchsorted(np.cumsum(w[order]), 0.95 * w.sum())) + 1]
    assert nucleus.size == 3543
    got = np.array(draws(Sampler(params(temperature=1.0, top_p=0.95, seed=11)), logits, 4000))
    assert got.max() <= 3542
    second = float((got >= 3000).mean())
    expected = 543 * np.exp(-1) / (3000 + 543 * np.exp(-1))
    assert second == pytest.approx(expected, abs=0.015)
    assert len(set(got[got >= 3000].tolist())) > 150


def test_frequency_penalty_changes_the_choice() -> None:
    logits = np.zeros(100, dtype=np.float32)
    logits[3], logits[7] = 2.0, 1.4
    plain = Sampler(params(temperature=0.0))
    assert draws(plain, logits, 3) == [3, 3, 3]
    # After one 3: 2.0 - 0.5 = 1.5 > 1.4; after two: 2.0 - 1.0 < 1.4. Counts scale the penalty.
    freq = Sampler(params(temperature=0.0, frequency_penalty=0.5))
    assert draws(freq, logits, 3) == [3, 3, 7]
    assert freq.generated == {3: 2, 7: 1}


def test_presence_penalty_is_applied_once_per_token() -> None:
    logits = np.zeros(100, dtype=np.float32)
    logits[3], logits[7], logits[9] = 2.0, 1.4, 1.2
    pres = Sampler(params(temperature=0.0, presence_penalty=0.7))
    # 3; then 7 (3 is at 1.3 < 1.4); then 3 for good (1.3 > 1.2), since presence does not grow with the count.
    assert draws(pres, logits, 4) == [3, 7, 3, 3]
    # The same penalty as a frequency penalty does grow, and pushes 3 below 9 on the fourth step.
    assert draws(Sampler(params(temperature=0.0, frequency_penalty=0.7)), logits, 4) == [3, 7, 3, 9]


def test_logit_bias_bans_and_forces_tokens_without_touching_the_callers_logits() -> None:
    logits = random_logits(8)
    before = logits.copy()
    top = int(np.argmax(logits))
    banned = Sampler(SamplingParams(max_tokens=4, temperature=1.0, seed=3, logit_bias=((top, -100.0),)))
    assert top not in draws(banned, logits * 0.01, 50)  # -100 leaves it no chance even in a flat distribution
    forced = Sampler(SamplingParams(max_tokens=4, temperature=1.0, seed=3, logit_bias=((17, 100.0),)))
    assert draws(forced, logits, 20) == [17] * 20
    np.testing.assert_array_equal(logits, before)


def test_penalties_do_not_modify_the_callers_logits() -> None:
    logits = random_logits(6)
    before = logits.copy()
    draws(Sampler(params(temperature=0.7, presence_penalty=1.0, frequency_penalty=1.0, seed=1)), logits, 5)
    np.testing.assert_array_equal(logits, before)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_distribution_matches_softmax(temperature: float) -> None:
    # 16 live tokens spread over several 256-token blocks; the rest are masked with -inf.
    vocab = 2048
    live = np.array([0, 5, 255, 256, 300, 511, 512, 700, 1023, 1024, 1300, 1500, 1790, 2000, 2046, 2047])
    logits = np.full(vocab, -np.inf, dtype=np.float32)
    logits[live] = np.linspace(-1.5, 1.5, live.size, dtype=np.float32)[::-1] * np.float32(0.8)
    n = 10000
    got = np.array(draws(Sampler(params(temperature=temperature, seed=2024)), logits, n))
    assert np.isin(got, live).all()  # masked tokens are never drawn
    z = logits[live].astype(np.float64) / temperature
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum() * n
    observed = np.array([(got == t).sum() for t in live])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 37.7  # 99.9% quantile of chi-square with 15 degrees of freedom


def test_vanishing_temperature_tends_to_greedy() -> None:
    logits = random_logits(8)
    assert draws(Sampler(params(temperature=1e-40, seed=1)), logits, 3) == [int(np.argmax(logits))] * 3


def test_non_finite_logits_are_refused() -> None:
    with pytest.raises(EngineError, match="finite"):
        Sampler(params(temperature=1.0)).sample(np.full(10, np.nan, dtype=np.float32))
    with pytest.raises(EngineError, match="finite"):
        Sampler(params(temperature=0.0)).sample(np.full(10, -np.inf, dtype=np.float32))


@pytest.mark.parametrize(("field", "value"), [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5)])
def test_invalid_params_are_refused(field: str, value: float) -> None:
    overrides: dict[str, Any] = {field: value}  # a field named at run time
    with pytest.raises(ValueError, match=field):
        Sampler(params(**overrides))


def test_logprobs_are_the_log_softmax_of_the_biased_logits_with_the_top_alternatives_best_first() -> None:
    logits = random_logits(7, scale=3.0)
    sampler = Sampler(SamplingParams(max_tokens=4, temperature=1.3, seed=2, logit_bias=((11, 5.0),), logprobs=5))
    token = sampler.sample(logits)
    biased = logits.astype(np.float64)
    biased[11] += 5.0
    expected = biased - (biased.max() + np.log(np.exp(biased - biased.max()).sum()))
    scored = sampler.last_logprob
    assert scored is not None
    assert scored.logprob == pytest.approx(expected[token], abs=1e-4)
    best = np.argsort(-expected, kind="stable")[:5]
    assert [t for t, _ in scored.top] == best.tolist()
    assert [lp for _, lp in scored.top] == pytest.approx(expected[best].tolist(), abs=1e-4)
    # Temperature shapes the draw, not the reported distribution: a greedy sampler reports the same numbers.
    greedy = Sampler(SamplingParams(max_tokens=4, temperature=0.0, logit_bias=((11, 5.0),), logprobs=5))
    assert greedy.sample(logits) == best[0]
    assert greedy.last_logprob is not None and greedy.last_logprob.top == scored.top


def test_masked_tokens_are_never_listed_as_alternatives() -> None:
    logits = np.full(VOCAB, -np.inf, dtype=np.float32)
    logits[[3, 8]] = [1.0, 2.0]
    sampler = Sampler(SamplingParams(max_tokens=4, seed=1, logprobs=20))
    token = sampler.sample(logits)
    scored = sampler.last_logprob
    assert scored is not None and token in (3, 8)
    assert [t for t, _ in scored.top] == [8, 3]
    assert sum(np.exp(lp) for _, lp in scored.top) == pytest.approx(1.0)


def test_no_logprobs_unless_asked() -> None:
    sampler = Sampler(params(seed=1))
    sampler.sample(random_logits(1))
    assert sampler.last_logprob is None
