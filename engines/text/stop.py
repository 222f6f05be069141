"""Stop strings over streamed text: emit only what can no longer turn into a stop string.

Text arrives in pieces (one per token), and a stop string may straddle pieces, so the matcher holds back the
longest tail of the text that is still a prefix of some stop string. When a stop string completes, output is
cut at the earliest occurrence of any stop string in the unemitted text, and nothing after it is ever emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class StopResult(NamedTuple):
    """Text safe to emit now, and whether a stop string has completed (generation should end)."""

    text: str
    stopped: bool


class StopMatcher:
    """Finds stop strings in a stream of text pieces."""

    def __init__(self, stops: Sequence[str]) -> None:
        # An empty stop string would match everywhere; OpenAI-style APIs treat it as absent.
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        self._held = ""
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        """Whether a stop string has completed."""
        return self._matched is not None

    @property
    def matched(self) -> str | None:
        """The stop string that ended the text, if any."""
        return self._matched

    def push(self, piece: str) -> StopResult:
        """Feed the next piece of text; return what may be emitted now."""
        if self._matched is not None:
            return StopResult("", True)
        if not self._stops:
            return StopResult(piece, False)
        text = self._held + piece
        cut, matched = -1, None
        for stop in self._stops:
            at = text.find(stop)
            if at != -1 and (cut == -1 or at < cut):
                cut, matched = at, stop
        if matched is not None:
            self._held, self._matched = "", matched
            return StopResult(text[:cut], True)
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :]
        return StopResult(text[: len(text) - keep], False)

    def flush(self) -> str:
        """Release held text at the end of generation (nothing once a stop string matched)."""
        held, self._held = self._held, ""
        return "" if self._matched is not None else held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best
