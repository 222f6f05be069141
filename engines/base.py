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


# OpenAI's bound on top_logprobs: alternatives reported per token.
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; the sampler applies them to one sequence's logits."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # OpenAI's logit_bias: (token id, bias added to its logit), applied before everything else.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Report each sampled token's log-probability and this many most likely alternatives (0 to MAX_TOP_LOGPROBS);
    # None: do not.
    logprobs: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate: prompt token ids, sampling settings, the ids that end it and its grammar."""

    id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    # llguidance grammar text (the agent compiles JSON schemas to it); None: unconstrained.
    grammar: str | None = None


# What a running generation reports (the scheduler emits these; the engine host sends them to the agent).


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability and the most likely alternatives as (token id, log-probability), best
    first. The distribution is the one sampling starts from: the model's logits after logit_bias, penalties and
    the grammar's mask, before temperature and top_p (so a greedy and a sampled request report the same values)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Tokens:
    """Tokens sampled for one sequence since its last report; `logprobs`, one per token, when requested."""

    id: int
    ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Done:
    """A sequence ended: "stop" (a stop id), "length" (max_tokens or the context) or "cancelled"."""

    id: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """A request failed; the others carry on. `code`: bad_request, context_length_exceeded, overloaded,
    engine_error. `id` is None for a frame that did not say whose it was."""

    id: int | None
    code: str
    message: str


GenerationEvent = Tokens | Done | Failed


class SequenceState(Protocol):
    """An executor's per-sequence state (its KV cache); opaque to everything but the executor."""

    @property
    def length(self) -> int:
        """Tokens already held in this sequence's KV cache."""
        ...


class PrefixSnapshot(Protocol):
    """A copy of the first `length` positions of a sequence's KV cache, kept for prefix reuse."""

    @property
    def length(self) -> int: ...

    @property
    def nbytes(self) -> int:
        """Memory it holds, for the prefix cache's budget."""
        ...


Logits2D = npt.NDArray[np.float32]


class Executor(Protocol):
    """Runs a decoder-only language model: prefill prompts, then decode one token per sequence per step.

    What an executor provides (registered by name in `engines.executors`):
    - KV slots: at most `max_batch` live sequences, each an opaque `SequenceState` (`new_sequence`, `release`),
      its cache kept wherever is cheapest (host memory for ONNX Runtime on CPU, device memory for TensorRT);
      `snapshot` copies a prefix out for reuse, `kv_bytes_per_token` sizes budgets;
    - `prefill` of a prompt and one batched `decode` step over live sequences;
    - logits, never tokens: both return float32 logits in host memory, and the runtime is where they are masked
      (constrained decoding, logit bias), read for log-probabilities and sampled, the same for every executor.
    Calls never overlap (the scheduler makes them from one thread).
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_context(self) -> int:
        """Most tokens one sequence may hold (prompt plus generated)."""
        ...

    @property
    def max_batch(self) -> int:
        """Most live sequences at once (KV slots)."""
        ...

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache memory one token of one sequence takes, for budgeting."""
        ...

    def new_sequence(self, prefix: PrefixSnapshot | None = None) -> SequenceState:
        """Allocate a sequence, empty or holding a copy of `prefix`; EngineError when all slots are taken."""
        ...

    def prefill(self, seq: SequenceState, token_ids: Sequence[int]) -> Logits:
        """Append `token_ids` to the sequence; return float32 logits [vocab] for the last position."""
        ...

    def decode(self, seqs: Sequence[SequenceState], token_ids: Sequence[int]) -> Logits2D:
        """Append one token to each sequence in one batched step; return float32 logits [len(seqs), vocab].

        Fastest when `seqs` are all live sequences (the usual continuous-batching step).
        """
        ...

    def snapshot(self, seq: SequenceState, length: int) -> PrefixSnapshot:
        """Copy the first `length` positions of the sequence's KV cache out of the sequence."""
        ...

    def release(self, seq: SequenceState) -> None:
        """Free the sequence's KV cache (idempotent)."""
        ...

    def close(self) -> None:
        """Release the model and all sequences."""
        ...


class Encoder(Protocol):
    """Runs a sentence-embedding model: token ids in, one L2-normalised vector per input out."""

    @property
    def dimensions(self) -> int: ...

    @property
    def max_tokens(self) -> int:
        """Longest input (in tokens, special tokens included) the model accepts."""
        ...

    def embed(self, batch: Sequence[Sequence[int]]) -> Logits2D:
        """Embed each token sequence (each already within max_tokens); float32 [len(batch), dimensions]."""
        ...

    def close(self) -> None:
        """Release the model."""
        ...
