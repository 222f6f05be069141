"""Token buckets: exact refill arithmetic on an injected clock, OpenAI header formats, bounded memory."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest

from agent.errors import RateLimitError
from agent.security.ratelimit import (
    DEFAULT_CLUSTER_RPM,
    DEFAULT_INFERENCE_RPM,
    TokenBucketLimiter,
    address_bucket_key,
    format_reset,
    format_retry_after,
    key_bucket_key,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_product_defaults() -> None:
    assert (DEFAULT_INFERENCE_RPM, DEFAULT_CLUSTER_RPM) == (100, 1000)


def test_a_fresh_client_gets_a_full_minute_burst_then_is_refused_with_exact_timings() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(60, clock=clock)  # 1 token per second, burst 60
    decisions = [limiter.check("a") for _ in range(60)]
    assert all(d.allowed for d in decisions)
    assert [d.remaining for d in decisions[:3]] == [59, 58, 57]
    assert decisions[0].reset_seconds == pytest.approx(1.0)
    assert decisions[-1].remaining == 0 and decisions[-1].reset_seconds == pytest.approx(60.0)

    refused = limiter.check("a")
    assert (refused.allowed, refused.limit, refused.remaining) == (False, 60, 0)
    assert refused.reset_seconds == pytest.approx(60.0) and refused.retry_after_seconds == pytest.approx(1.0)

    clock.now += 0.25  # a quarter token back: still refused, retry in 0.75 s
    refused = limiter.check("a")
    assert not refused.allowed and refused.retry_after_seconds == pytest.approx(0.75)
    assert refused.reset_seconds == pytest.approx(59.75)

    clock.now += 0.75
    allowed = limiter.check("a")
    assert allowed.allowed and allowed.remaining == 0 and allowed.retry_after_seconds == 0.0


def test_refill_is_continuous_and_capped_at_the_limit() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(100, clock=clock)  # 100/min: one token per 0.6 s
    for _ in range(100):
        assert limiter.check("k").allowed
    assert not limiter.check("k").allowed
    clock.now += 6.0  # ten tokens
    results = [limiter.check("k").allowed for _ in range(11)]
    assert results == [True] * 10 + [False]
    clock.now += 3600.0  # an hour idle refills to the limit, not beyond it
    assert limiter.peek("k").remaining == 100
    assert sum(limiter.check("k").allowed for _ in range(150)) == 100


def test_clients_have_separate_buckets() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(2, clock=clock)
    assert [limiter.check("a").allowed for _ in range(3)] == [True, True, False]
    assert limiter.check("b").allowed


def test_burst_can_differ_from_the_rate() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(60, burst=5, clock=clock)
    assert sum(limiter.check("a").allowed for _ in range(10)) == 5
    decision = limiter.check("a")
    assert decision.limit == 5 and decision.retry_after_seconds == pytest.approx(1.0)


def test_a_clock_that_steps_back_never_drains_or_overfills() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(60, clock=clock)
    limiter.check("a")
    clock.now -= 100.0
    assert limiter.check("a").remaining == 58


def test_peek_takes_nothing() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(60, clock=clock)
    assert limiter.peek("a").remaining == 60 and len(limiter) == 0
    limiter.check("a")
    assert limiter.peek("a").remaining == 59
    assert limiter.check("a").remaining == 58


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate_per_minute": 0}, "positive"),
        ({"rate_per_minute": float("nan")}, "positive"),
        ({"rate_per_minute": 10, "burst": 0}, "burst"),
        ({"rate_per_minute": 0.5}, "burst"),
        ({"rate_per_minute": 10, "max_clients": 0}, "max_clients"),
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenBucketLimiter(**kwargs)


def test_memory_stays_bounded_under_a_flood_of_distinct_clients() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(100, max_clients=1000, clock=clock)
    tracemalloc.start()
    try:
        for n in range(100_000):
            limiter.check(f"client-{n}")
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(limiter) == 1000
    # 1000 buckets with their keys; 100,000 of them would be well over 10 MB.
    assert held < 1_000_000
    # The most recent clients are the ones kept: their buckets still carry the request they made.
    assert limiter.peek("client-99999").remaining == 99
    assert limiter.peek("client-0").remaining == 100  # evicted, starts full again (the documented tradeoff)


def test_full_buckets_are_dropped_first_so_idle_clients_cost_no_memory() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(60, max_clients=10_000, clock=clock)
    for n in range(500):
        limiter.check(f"old-{n}")
    clock.now += 61.0  # every old bucket has refilled: they carry no information
    limiter.check("new")
    assert len(limiter) == 1


def test_a_busy_client_keeps_its_state_while_idle_ones_come_and_go() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(60, max_clients=3, clock=clock)
    for _ in range(60):
        limiter.check("busy")
    for n in range(50):
        limiter.check(f"drive-by-{n}")
        limiter.check("busy")  # stays most recently used
    assert not limiter.check("busy").allowed


def test_decision_headers_follow_openai_names_and_formats() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(100, clock=clock)
    first = limiter.check("a")
    assert first.headers() == {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "99",
        "x-ratelimit-reset-requests": "600ms",
    }
    for _ in range(99):
        limiter.check("a")
    refused = limiter.check("a")
    assert refused.headers() == {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s",
        "Retry-After": "1",
    }
    assert refused.retry_after_header == 1
    error = RateLimitError("Rate limit reached", retry_after=refused.retry_after_header, headers=refused.headers())
    assert (error.status, error.type, error.code, error.retry_after) == (429, "requests", "rate_limit_exceeded", 1)
    assert error.headers["Retry-After"] == "1"
    assert error.envelope()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.0001, "1ms"),
        (0.12, "120ms"),
        (0.6, "600ms"),
        (0.9999, "1s"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (6.0, "6s"),
        (8.64, "8.64s"),
        (20.0, "20s"),
        (60.0, "1m0s"),
        (90.0, "1m30s"),
        (360.0, "6m0s"),
        (432.0, "7m12s"),
        (60.25, "1m0.25s"),
        (3600.0, "1h0m0s"),
        (3723.5, "1h2m3.5s"),
        (-3.0, "0s"),
    ],
)
def test_format_reset_matches_openai_duration_strings(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.0, "1"), (0.01, "1"), (1.0, "1"), (1.0000000001, "1"), (1.2, "2"), (59.5, "60")]
)
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(seconds: float, text: str) -> None:
    assert format_retry_after(seconds) == text


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.168.1.5", "addr:192.168.1.5"),
        ("::ffff:192.168.1.5", "addr:192.168.1.5"),
        ("2001:db8:1:2:3:4:5:6", "addr:2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "addr:2001:db8:1:2::/64"),
        ("fe80::1%eth0", "addr:fe80::/64"),
        ("not-an-ip", "addr:not-an-ip"),
    ],
)
def test_keyless_clients_are_bucketed_by_address_and_ipv6_by_slash_64(address: str, key: str) -> None:
    assert address_bucket_key(address) == key


def test_key_and_address_buckets_never_collide() -> None:
    assert key_bucket_key("key_ab12cd34") == "key:key_ab12cd34"
    assert key_bucket_key("x") != address_bucket_key("x")


def test_a_rate_change_keeps_what_clients_used_and_caps_what_they_have_left() -> None:
    clock = FakeClock()
    limiter = TokenBucketLimiter(100, clock=clock)
    for _ in range(40):
        limiter.check("busy")
    limiter.check("light")
    limiter.set_rate(50)  # 60 tokens left become 50; no fresh burst for anyone
    assert limiter.peek("busy").remaining == 50 and limiter.peek("busy").limit == 50
    assert limiter.peek("light").remaining == 50
    for _ in range(50):
        assert limiter.check("busy").allowed
    assert not limiter.check("busy").allowed
    limiter.set_rate(120)  # raising the limit refills at the new rate from now on, not at once
    assert limiter.peek("busy").remaining == 0
    clock.now += 1.0
    assert limiter.peek("busy").remaining == 2 and limiter.peek("busy").limit == 120
    with pytest.raises(ValueError, match="at least 1"):
        limiter.set_rate(0)
