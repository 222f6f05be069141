"""Contracts shared by every engine component: errors, sampling parameters and the Executor protocol."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

Logits = npt.NDArray[np.float32]

# Reports long work (conversion, loading): (stage, done, total).
ProgressFn = Callable[[str, int, int], None]


class EngineError(Exception):
    """Base class of every error raised by the `engines` package."""


class ModelFormatError(EngineError):
    """The model file is not something we can convert or run (unsupported architecture, quantization, ...)."""


class ContextOverflowError(EngineError):
    """A sequence would grow past the model's context window."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; the sampler applies them to one sequence's logits."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class SequenceState(Protocol):
    """An executor's per-sequence state (its KV cache); opaque to everything but the executor."""

    @property
    def length(self) -> int:
        """Tokens already held in this sequence's KV cache."""
        ...


class Executor(Protocol):
    """Runs a decoder-only language model: prefill a prompt, then decode one token at a time.

    Implementations keep the KV cache wherever is cheapest for them (host memory for ONNX Runtime on CPU,
    device memory for TensorRT); callers only hold the opaque `SequenceState`.
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_context(self) -> int: ...

    def new_sequence(self) -> SequenceState:
        """Allocate an empty sequence."""
        ...

    def prefill(self, seq: SequenceState, token_ids: Sequence[int]) -> Logits:
        """Append `token_ids` to the sequence; return float32 logits [vocab] for the last position."""
        ...

    def decode(self, seq: SequenceState, token_id: int) -> Logits:
        """Append one token; return float32 logits [vocab] for it."""
        ...

    def release(self, seq: SequenceState) -> None:
        """Free the sequence's KV cache."""
        ...

    def close(self) -> None:
        """Release the model and all sequences."""
        ...
