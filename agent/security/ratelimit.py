"""Per-client token buckets and OpenAI-style rate-limit headers.

Each client (an API key id, or a source address when the request carries no key) owns a bucket holding up to
`limit` tokens that refills continuously at `limit` per minute; a request takes one token or is refused with a 429.
A continuous refill, unlike a fixed per-minute window, never lets a client send two minutes' worth of requests
around a window boundary, and never makes every client wait for the same wall-clock second.

Memory is bounded: buckets live in an LRU of at most `max_clients` entries. See `TokenBucketLimiter` for what
eviction costs. The limiter is pure and single-threaded: the agent calls `check()` on the event loop (it does no I/O).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# The product's defaults (requests per minute): the inference API and the cluster API.
DEFAULT_INFERENCE_RPM = 100
DEFAULT_CLUSTER_RPM = 1000
DEFAULT_MAX_CLIENTS = 10_000

HEADER_LIMIT = "x-ratelimit-limit-requests"
HEADER_REMAINING = "x-ratelimit-remaining-requests"
HEADER_RESET = "x-ratelimit-reset-requests"
HEADER_RETRY_AFTER = "Retry-After"


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI writes x-ratelimit-reset-*: "120ms", "6s", "1.5s", "1m30s", "6m0s", "1h0m0s"."""
    # OpenAI's values are Go time.Duration strings; we round *up* to whole milliseconds so that a client that
    # waits exactly that long finds the token there.
    millis = max(0, math.ceil(round(seconds * 1000, 6)))
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0").rstrip(".") if frac else str(whole)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def format_retry_after(seconds: float) -> str:
    """Retry-After as whole seconds, rounded up and at least 1 (the OpenAPI spec's TooManyRequests says >= 1)."""
    return str(max(1, math.ceil(round(seconds, 6))))


@dataclass(frozen=True)
class Decision:
    """The outcome of one `check()`: whether to serve the request and what to tell the client."""

    allowed: bool
    limit: int
    # Whole requests the client may still make right now (after this one, when it was allowed).
    remaining: int
    # Seconds until the bucket is full again ("resets to its initial state", OpenAI's meaning of reset).
    reset_seconds: float
    # Seconds until one token is available; 0.0 when the request was allowed.
    retry_after_seconds: float

    def headers(self) -> dict[str, str]:
        """The x-ratelimit-*-requests headers, plus Retry-After when the request was refused."""
        headers = {
            HEADER_LIMIT: str(self.limit),
            HEADER_REMAINING: str(self.remaining),
            HEADER_RESET: format_reset(self.reset_seconds),
        }
        if not self.allowed:
            headers[HEADER_RETRY_AFTER] = format_retry_after(self.retry_after_seconds)
        return headers

    @property
    def retry_after_header(self) -> int:
        """Retry-After as an integer (>= 1), for `RateLimitError(retry_after=...)`."""
        return int(format_retry_after(self.retry_after_seconds))


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class TokenBucketLimiter:
    """Token buckets keyed by client, refilled continuously, at most `max_clients` kept (least recently used go).

    Eviction tradeoff: a bucket that has refilled to full carries no information (a new bucket starts full), so
    evicting it loses nothing, and such buckets are dropped first. Only when more than `max_clients` clients have
    been active within one refill period (`burst / rate`, a minute by default) does the LRU drop a bucket that is not
    full; that client then starts over with a full bucket, i.e. may get up to one extra burst. Keeping memory bounded
    against a flood of distinct clients (each IPv6 host can have 2^64 addresses) is worth that; key keyless IPv6
    clients by their /64 (`address_bucket_key`) so one host cannot mint clients cheaply.
    """

    def __init__(
        self,
        rate_per_minute: float,
        *,
        burst: int | None = None,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate_per_minute > 0 or not math.isfinite(rate_per_minute):
            raise ValueError(f"rate_per_minute must be a positive number, got {rate_per_minute!r}")
        capacity = math.floor(rate_per_minute) if burst is None else burst
        if capacity < 1:
            raise ValueError(f"burst must be at least 1 request, got {capacity!r}")
        if max_clients < 1:
            raise ValueError(f"max_clients must be at least 1, got {max_clients!r}")
        # By default the burst is a minute's worth, so "100/min" lets an idle client send 100 at once, as
        # OpenAI's per-minute limits do; the refill then paces it at rate/60 per second.
        self.limit = capacity
        self.rate_per_second = rate_per_minute / 60.0
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def set_rate(self, rate_per_minute: float) -> None:
        """A new limit for every client (a live config change); the burst becomes a minute's worth of the rate.

        Buckets are kept: a client never gets a fresh burst from a change, and a lower limit caps what it has left.
        """
        if not rate_per_minute >= 1 or not math.isfinite(rate_per_minute):
            raise ValueError(f"rate_per_minute must be at least 1, got {rate_per_minute!r}")
        now = self._clock()
        for bucket in self._buckets.values():
            bucket.tokens = self._refilled(bucket, now)
            bucket.updated = now
        self.limit = math.floor(rate_per_minute)
        self.rate_per_second = rate_per_minute / 60.0
        for bucket in self._buckets.values():
            bucket.tokens = min(bucket.tokens, float(self.limit))

    def _refilled(self, bucket: _Bucket, now: float) -> float:
        # max(0, ...) so a clock that steps back (it should not: monotonic) never drains a bucket.
        return min(float(self.limit), bucket.tokens + max(0.0, now - bucket.updated) * self.rate_per_second)

    def check(self, client_key: str) -> Decision:
        """Take one token from `client_key`'s bucket if there is one; O(1) amortised."""
        now = self._clock()
        bucket = self._buckets.get(client_key)
        if bucket is None:
            bucket = _Bucket(float(self.limit), now)
            self._buckets[client_key] = bucket
        else:
            bucket.tokens = self._refilled(bucket, now)
            bucket.updated = now
            self._buckets.move_to_end(client_key)
        allowed = bucket.tokens >= 1.0
        if allowed:
            bucket.tokens -= 1.0
        decision = Decision(
            allowed=allowed,
            limit=self.limit,
            remaining=math.floor(bucket.tokens),
            reset_seconds=(self.limit - bucket.tokens) / self.rate_per_second,
            retry_after_seconds=0.0 if allowed else (1.0 - bucket.tokens) / self.rate_per_second,
        )
        self._trim(now)
        return decision

    def peek(self, client_key: str) -> Decision:
        """What `check()` would say about `client_key`, without taking a token or touching the LRU order."""
        bucket = self._buckets.get(client_key)
        tokens = float(self.limit) if bucket is None else self._refilled(bucket, self._clock())
        return Decision(
            allowed=tokens >= 1.0,
            limit=self.limit,
            remaining=math.floor(tokens),
            reset_seconds=(self.limit - tokens) / self.rate_per_second,
            retry_after_seconds=0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate_per_second,
        )

    def _trim(self, now: float) -> None:
        # Full buckets at the old end are dropped for free (each bucket is dropped at most once per insertion, so
        # this is amortised O(1)); then the hard cap applies, which may drop a bucket that is not full. The bucket
        # just checked is never full (it either gave a token or had less than one), so it always survives.
        buckets = self._buckets
        while buckets:
            oldest_key = next(iter(buckets))
            if self._refilled(buckets[oldest_key], now) < self.limit:
                break
            del buckets[oldest_key]
        while len(buckets) > self.max_clients:
            buckets.popitem(last=False)


def address_bucket_key(address: str) -> str:
    """The bucket key for a keyless client: the address itself for IPv4, its /64 network for IPv6."""
    # One IPv6 host usually controls a whole /64, so per-address buckets would let it mint fresh buckets at will.
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"addr:{address}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"addr:{ip.ipv4_mapped}"
        return f"addr:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"addr:{ip}"


def key_bucket_key(key_id: str) -> str:
    """The bucket key for a request that carries a valid API key (namespaced apart from addresses)."""
    return f"key:{key_id}"
