"""Constrained decoding: a grammar decides, at every step, which tokens a sequence may take next.

llguidance does the work (the grammar engine llama.cpp and vLLM use). Why it and not xgrammar: it installs as one
small wheel with no torch, computes a 49k-token mask in microseconds on the CPU (bench/grammar.py measures it), and
compiles a JSON schema in about a millisecond, so a first-seen schema adds little to the time to first token.

- `json_schema_grammar` compiles a JSON schema to llguidance's grammar text (compact JSON), naming the keyword of
  a schema it cannot enforce.
- `token_table` turns the model's own vocabulary into llguidance's tokenizer (once per engine host).
- `Grammars` compiles grammars (llguidance's JSON grammar text, as the agent sends it) and keeps recent ones, so a
  repeated schema costs a copy, not a compile.
- `Constraint` follows one sequence: the tokens allowed next, then the token chosen.
- `MaskBatch` computes the masks of every constrained sequence of a batch in parallel (llguidance's own thread
  pool, without the GIL). Where the box has cores the executor does not use, the scheduler runs it while the
  executor computes the forward pass; where the executor has every core (the default: as many ONNX Runtime threads
  as cores), it runs just before the forward pass instead. Measured on 2 cores with 16 constrained streams
  (bench/grammar.py): computed beside the forward pass, the masks' threads delay ONNX Runtime's by 2-5 ms a step
  (its parallel sections wait for the thread that lost its core), while the 16 masks alone take 0.25 ms.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import llguidance
import llguidance.numpy as llguidance_numpy
import numpy as np
import numpy.typing as npt

from engines.base import EngineError, Logits

# Compiled grammars kept for reuse (clients send the same few schemas over and over).
_CACHED_GRAMMARS = 64


class GrammarError(EngineError):
    """A grammar cannot be compiled, or a sequence left it (a bug: masked sampling never does)."""


class SchemaError(GrammarError):
    """A JSON schema is invalid, or uses a keyword the grammar engine cannot enforce (`keyword`)."""

    def __init__(self, message: str, keyword: str | None = None) -> None:
        super().__init__(message)
        self.keyword = keyword


_UNIMPLEMENTED = re.compile(r"Unimplemented keys: (\[.*?\])")
_UNKNOWN_FORMAT = re.compile(r"Unknown format: (\S+)")
# Compact JSON, as OpenAI's models write it: without this, a small model at temperature 1 can spend its whole
# budget on whitespace between tokens that the grammar would allow.
_COMPACT = {"whitespace_flexible": False}


def json_schema_grammar(schema: Mapping[str, Any]) -> str:
    """llguidance grammar text for JSON that matches `schema`; SchemaError if it is invalid or not enforceable."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=_COMPACT)  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise SchemaError(f"the schema is not a JSON object: {exc}") from exc
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if not is_error:
        return grammar
    message = messages[0].strip()
    unimplemented = _UNIMPLEMENTED.search(message)
    if unimplemented:
        keywords = json.loads(unimplemented.group(1))
        raise SchemaError(
            f"JSON schema keyword(s) {', '.join(map(repr, keywords))} cannot be enforced by this server", keywords[0]
        )
    unknown = _UNKNOWN_FORMAT.search(message)
    if unknown:
        raise SchemaError(f"JSON schema string format {unknown.group(1)!r} is not supported", "format")
    raise SchemaError(f"invalid JSON schema: {message}")


class Vocabulary(Protocol):
    """What the grammar engine needs of a tokenizer (engines/text/tokenizer.py provides it)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def stop_ids(self) -> frozenset[int]: ...

    @property
    def special_ids(self) -> frozenset[int]: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def encode(self, text: str, *, add_special: bool = True) -> list[int]: ...


class _Wrapped:
    """The shape llguidance.TokenizerWrapper reads: token bytes, ids and a tokenize function."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        self.eos_token_id = vocabulary.eos_id
        self.bos_token_id = vocabulary.bos_id
        special = vocabulary.special_ids
        # A leading 0xFF marks a special token: no text can produce it, so no grammar admits it by accident.
        self.tokens = [
            b"\xff" + vocabulary.token_bytes(i) if i in special else vocabulary.token_bytes(i)
            for i in range(vocabulary.vocab_size)
        ]
        self.special_token_ids = sorted(special)
        self._vocabulary = vocabulary

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._vocabulary.encode(text, add_special=False)


def token_table(vocabulary: Vocabulary) -> llguidance.LLTokenizer:
    """llguidance's view of the model's vocabulary; the stop ids end a grammar (about 0.3 s for 49k tokens)."""
    wrapper = llguidance.TokenizerWrapper(_Wrapped(vocabulary))
    return llguidance.LLTokenizer(wrapper, eos_token=sorted(vocabulary.stop_ids))


class Grammars:
    """Compiles grammars for one vocabulary, keeping the most recent ones."""

    def __init__(self, table: llguidance.LLTokenizer) -> None:
        self.table = table
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.compiled = 0  # counters for stats and the benchmark
        self.reused = 0

    def constraint(self, grammar: str) -> Constraint:
        """A fresh Constraint for `grammar` (llguidance grammar text); GrammarError if it does not compile."""
        prototype = self._compiled.get(grammar)
        if prototype is not None:
            self._compiled.move_to_end(grammar)
            self.reused += 1
            return Constraint(prototype.deep_copy())
        matcher = llguidance.LLMatcher(self.table, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the grammar does not compile: {matcher.get_error()}")
        self.compiled += 1
        self._compiled[grammar] = matcher.deep_copy()
        while len(self._compiled) > _CACHED_GRAMMARS:
            self._compiled.popitem(last=False)
        return Constraint(matcher)


class Constraint:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    @property
    def finished(self) -> bool:
        """The grammar is complete and admits nothing more (only a stop token)."""
        return bool(self.matcher.is_stopped())

    def advance(self, token: int) -> None:
        """Take the chosen token; GrammarError if the grammar did not allow it."""
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} left the grammar: {self.matcher.get_error()}")


class MaskBatch:
    """The allowed-token masks of the constrained rows of one step, computed together."""

    def __init__(self, executor: llguidance.LLExecutor, vocab_size: int, *, overlap: bool = False) -> None:
        self._executor = executor
        # Whether the scheduler computes the masks beside the forward pass (spare cores) or just before it.
        self.overlap = overlap
        self._vocab_size = vocab_size
        self._bits: npt.NDArray[np.int32] = llguidance_numpy.allocate_token_bitmask(1, vocab_size)
        self._rows: dict[int, int] = {}

    def compute(self, constraints: Sequence[tuple[int, Constraint]]) -> None:
        """Fill the masks of (row, constraint) pairs; releases the GIL, so it can run beside the forward pass."""
        if len(constraints) > self._bits.shape[0]:
            self._bits = llguidance_numpy.allocate_token_bitmask(len(constraints), self._vocab_size)
        self._rows = {row: index for index, (row, _) in enumerate(constraints)}
        if len(constraints) == 1:
            # One mask is a fraction of a millisecond: waking the pool's threads would cost more than it saves, and
            # on a small box they would spin on the cores the forward pass is using.
            llguidance_numpy.fill_next_token_bitmask(constraints[0][1].matcher, self._bits, 0)
        elif constraints:
            llguidance_numpy.fill_next_token_bitmask_par(
                self._executor,
                [(constraint.matcher, index) for index, (_, constraint) in enumerate(constraints)],
                self._bits,
            )

    def allowed(self, row: int) -> npt.NDArray[np.bool_] | None:
        """Which tokens row `row` may take (None: the row is unconstrained)."""
        index = self._rows.get(row)
        if index is None:
            return None
        bits = np.unpackbits(self._bits[index].view(np.uint8), bitorder="little")
        return bits[: self._vocab_size].view(np.bool_)  # bytes of 0 and 1: a bool view, no copy

    def apply(self, row: int, logits: Logits) -> Logits:
        """`logits` with every token the grammar forbids at -inf (a new array; the input may be an executor's)."""
        allowed = self.allowed(row)
        if allowed is None:
            return logits
        if not allowed.any():
            raise GrammarError("the grammar admits no token here")
        if allowed.shape[0] < logits.shape[0]:  # an executor's padded vocabulary: the padding is never allowed
            allowed = np.concatenate([allowed, np.zeros(logits.shape[0] - allowed.shape[0], dtype=np.bool_)])
        return np.where(allowed[: logits.shape[0]], logits, np.float32(-np.inf))


def mask_executor(threads: int) -> llguidance.LLExecutor:
    """llguidance's pool for batched masks (as many threads as the executor's)."""
    return llguidance.LLExecutor(num_threads=max(1, threads))


def spare_cores(executor_threads: int) -> bool:
    """Whether this process may run on more cores than the executor's threads use (then masks overlap it)."""
    return len(os.sched_getaffinity(0)) > executor_threads
