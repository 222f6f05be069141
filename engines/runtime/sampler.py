"""Token sampling for one sequence: penalties, temperature, nucleus (top-p), then a seeded draw.

One `Sampler` per completion. It owns its random generator, so a request's seed fixes its draws no matter
how requests are batched, and it remembers the tokens it produced for the OpenAI presence/frequency
penalties. Everything is vectorised numpy over the vocabulary; the only partial sort is over the few
most likely tokens when top-p < 1.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from engines.base import EngineError, Logits, SamplingParams

# Relative weights (max = 1) above which nucleus candidates are sought first. Trained models put nearly all
# the mass on few tokens, so the first threshold usually holds the nucleus and only a handful are sorted;
# the last (0) is the exact fallback for flat distributions.
_NUCLEUS_THRESHOLDS = (1e-3, 1e-6, 0.0)

# The full-vocabulary draw walks block sums first, then one block, instead of a cumulative sum over the vocab.
_BLOCK = 256


class Sampler:
    """Chooses the next token of one sequence from its logits and records it for penalties."""

    def __init__(self, params: SamplingParams) -> None:
        if not params.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {params.temperature}")
        if not 0.0 < params.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
        self.params = params
        self._rng = np.random.Generator(np.random.PCG64(params.seed))
        self._counts: dict[int, int] = {}

    @property
    def generated(self) -> dict[int, int]:
        """How often each token id was produced so far (a copy)."""
        return dict(self._counts)

    def record(self, token_id: int) -> None:
        """Count a token as generated (done by `sample`; call it for tokens chosen elsewhere)."""
        self._counts[token_id] = self._counts.get(token_id, 0) + 1

    def sample(self, logits: Logits) -> int:
        """Choose the next token from float32 logits [vocab] and record it."""
        token = self._choose(self._penalized(np.asarray(logits, dtype=np.float32)))
        self.record(token)
        return token

    def _penalized(self, logits: Logits) -> Logits:
        p = self.params
        if not self._counts or (p.presence_penalty == 0.0 and p.frequency_penalty == 0.0):
            return logits
        ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
        counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
        out = logits.copy()  # the caller's logits may be a view into an executor buffer
        out[ids] -= counts * np.float32(p.frequency_penalty) + np.float32(p.presence_penalty)
        return out

    def _choose(self, logits: Logits) -> int:
        top = int(np.argmax(logits))
        peak = logits[top]
        if not np.isfinite(peak):
            raise EngineError("logits have no finite maximum (NaN or all -inf); cannot sample")
        temperature = self.params.temperature
        if temperature == 0.0:
            return top  # greedy: deterministic, draws nothing from the generator
        # Shifting by the max keeps exp in (0, 1]: no overflow, and the peak never underflows.
        weights = np.exp((logits - peak) * np.float32(1.0 / temperature))
        if self.params.top_p < 1.0:
            return self._nucleus(weights)
        return self._draw_full(weights)

    def _nucleus(self, weights: npt.NDArray[np.float32]) -> int:
        """Draw from the smallest set of most likely tokens whose probability reaches top_p."""
        target = self.params.top_p * float(weights.sum(dtype=np.float64))
        for threshold in _NUCLEUS_THRESHOLDS:
            # Every token at or above the threshold is a candidate, so the set is a prefix of the sorted
            # order; once its mass reaches the target it contains the whole nucleus.
            ids = np.flatnonzero(weights >= threshold)
            if threshold == 0.0 or float(weights[ids].sum(dtype=np.float64)) >= target:
                break
        ids = ids[np.argsort(-weights[ids])]
        cumulative = np.cumsum(weights[ids], dtype=np.float64)
        keep = min(int(np.searchsorted(cumulative, target, side="left")) + 1, ids.shape[0])
        return self._draw(cumulative[:keep], ids[:keep])

    def _draw_full(self, weights: npt.NDArray[np.float32]) -> int:
        """Draw from the whole distribution: pick a block by block sums, then a token inside it."""
        starts = np.arange(0, weights.shape[0], _BLOCK)
        blocks = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
        u = self._rng.random() * float(blocks[-1])
        # side="right" skips blocks and tokens of zero weight (masked tokens can never be drawn).
        block = min(int(np.searchsorted(blocks, u, side="right")), blocks.shape[0] - 1)
        if block > 0:
            u -= float(blocks[block - 1])
        segment = weights[starts[block] : starts[block] + _BLOCK]
        inner = np.cumsum(segment, dtype=np.float64)
        at = int(np.searchsorted(inner, u, side="right"))
        if at >= segment.shape[0] or segment[at] == 0.0:
            # Rounding between the block sum and the in-block sum: fall back to the block's last live token.
            at = int(np.flatnonzero(segment)[-1])
        return int(starts[block]) + at

    def _draw(self, cumulative: npt.NDArray[np.float64], ids: npt.NDArray[np.intp]) -> int:
        """Inverse-CDF draw over `ids` (all with positive weight) given their cumulative weights."""
        u = self._rng.random() * float(cumulative[-1])
        at = int(np.searchsorted(cumulative, u, side="right"))
        return int(ids[min(at, ids.shape[0] - 1)])
