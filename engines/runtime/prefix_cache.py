"""Recently computed KV prefixes, so a prompt that starts like recent work skips recomputing that part.

Entries are (token ids, KV snapshot) pairs. A lookup only uses an entry whose tokens are an exact prefix of the
new prompt. When a finished sequence shares only part of an existing entry (two chats with the same system
prompt), the shared part is stored as an entry of its own, so the third such chat finds it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engines.base import PrefixSnapshot


@dataclass(frozen=True)
class PrefixHit:
    """A reusable prefix: restore `snapshot`, then prefill the prompt from position `snapshot.length`."""

    snapshot: PrefixSnapshot


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens two sequences share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """An LRU of KV snapshots bounded by the tokens they hold."""

    def __init__(self, budget_tokens: int, *, min_tokens: int = 16) -> None:
        self.budget_tokens = budget_tokens
        self.min_tokens = min_tokens
        self._entries: OrderedDict[tuple[int, ...], PrefixSnapshot] = OrderedDict()
        self._tokens_held = 0
        self.hits = 0
        self.reused_tokens = 0

    @property
    def tokens_held(self) -> int:
        return self._tokens_held

    def lookup(self, prompt: Sequence[int]) -> PrefixHit | None:
        """The longest entry that is a prefix of `prompt` and leaves at least one token to prefill."""
        best: tuple[int, ...] | None = None
        for tokens in self._entries:
            if len(tokens) < len(prompt) and (best is None or len(tokens) > len(best)):
                if common_prefix_length(tokens, prompt) == len(tokens):
                    best = tokens
        if best is None:
            return None
        self._entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += len(best)
        return PrefixHit(self._entries[best])

    def offer(self, tokens: Sequence[int], take_snapshot: Callable[[int], PrefixSnapshot]) -> None:
        """Consider a finished sequence's KV (`take_snapshot(n)` copies its first n positions)."""
        if self.budget_tokens <= 0 or len(tokens) < self.min_tokens:
            return
        key = tuple(tokens)
        # The part shared with an existing entry (a common system prompt) becomes an entry of its own.
        shared = max((common_prefix_length(key, other) for other in self._entries), default=0)
        if self.min_tokens <= shared < len(key) and key[:shared] not in self._entries:
            self._insert(key[:shared], take_snapshot(shared))
        if key not in self._entries and len(key) <= self.budget_tokens:
            self._insert(key, take_snapshot(len(key)))

    def _insert(self, key: tuple[int, ...], snapshot: PrefixSnapshot) -> None:
        self._entries[key] = snapshot
        self._tokens_held += len(key)
        while self._tokens_held > self.budget_tokens and self._entries:
            old, _ = self._entries.popitem(last=False)
            self._tokens_held -= len(old)
