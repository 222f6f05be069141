"""`OrtExecutor`: the `engines.base.Executor` over ONNX Runtime's CPU provider, for both graph flavours.

Fused graph (the default): the KV cache lives in a `SlotPool`; a decode step runs every requested sequence as one
batch over the first-n slot view, bound once per batch size through IO binding, so no step copies KV memory.
Standard graph (the TensorRT-facing reference): each sequence keeps its own past arrays and a batched decode runs
one sequence at a time; simple and correct, not fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from engines.base import ContextOverflowError, EngineError, Logits, Logits2D, PrefixSnapshot, ProgressFn, SequenceState
from engines.convert import (
    DEFAULT_FLAVOUR,
    ConvertedModel,
    GraphFlavour,
    LogitsMode,
    ensure_converted,
    past_names,
    present_names,
)
from engines.convert.fused import DEFAULT_ACCURACY_LEVEL, SEQLENS_K, TOTAL_SEQUENCE_LENGTH
from engines.onnxruntime.session import make_session
from engines.onnxruntime.slots import SlotPool

DEFAULT_MAX_CONTEXT = 2048
DEFAULT_MAX_BATCH = 16
# Longer prompts are prefilled in chunks. GroupQueryAttention computes a whole chunk x total score matrix (masking
# the causal half afterwards), so smaller chunks skip most of the masked work: 500 tokens prefill ~10% faster in
# chunks of 128 than in one step here, and the scratch memory (chunk x capacity per head) stays small. Chunks change
# no value: each continues exactly where the previous one stopped.
PREFILL_CHUNK = 128

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, eq=False)
class OrtSnapshot:
    """A host copy of a sequence's first `length` KV positions: kv [n_layers, 2 (keys, values), n_kv, length, hd]."""

    kv: F32
    model_key: str

    @property
    def length(self) -> int:
        """Positions held."""
        return int(self.kv.shape[3])

    @property
    def nbytes(self) -> int:
        """Host memory held."""
        return int(self.kv.nbytes)


class OrtSequence:
    """One sequence: its length and where its KV lives (a pool slot, or its own past arrays)."""

    def __init__(self, owner: OrtExecutor) -> None:
        self._owner = owner
        self._length = 0
        self._released = False
        self._slot = -1  # fused graph: index into the slot pool (moves when another sequence is released)
        self._past: list[F32] = []  # standard graph: [1, n_kv, length, hd] per layer, keys and values interleaved

    @property
    def length(self) -> int:
        """Tokens already held in this sequence's KV cache."""
        return self._length

    @property
    def released(self) -> bool:
        """True once `OrtExecutor.release` freed it."""
        return self._released


@dataclass
class _Binding:
    """An IO binding over some pool slots, valid while the pool keeps `generation`."""

    io: ort.IOBinding
    generation: int
    keep: list[Any]  # OrtValues that must outlive the binding


@dataclass
class _StepArrays:
    """Decode inputs and outputs for up to max_batch rows; a batch of k binds views of the first k rows."""

    ids: npt.NDArray[np.int64]
    seqlens: npt.NDArray[np.int32]
    total: npt.NDArray[np.int32]
    logits: F32


class OrtExecutor:
    """`engines.base.Executor` over ONNX Runtime's CPU execution provider."""

    def __init__(
        self,
        model: ConvertedModel,
        threads: int,
        *,
        max_context: int = DEFAULT_MAX_CONTEXT,
        max_batch: int = DEFAULT_MAX_BATCH,
        accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    ) -> None:
        """Load `model` (either graph flavour) with `threads` intra-op threads and `max_batch` KV slots."""
        if threads < 1 or max_context < 1 or max_batch < 1:
            raise ValueError(
                f"threads ({threads}), max_context ({max_context}) and max_batch ({max_batch}) must be positive"
            )
        self.model = model
        cfg = model.config
        self._max_context = min(cfg.context_length, max_context)
        self._max_batch = max_batch
        self._fused = model.graph == "fused"
        self._session: ort.InferenceSession | None = make_session(model, threads, accuracy_level)
        self._names = [n for i in range(cfg.n_layers) for n in past_names(i)]
        self._present = [n for i in range(cfg.n_layers) for n in present_names(i)]
        self._live: list[OrtSequence] = []  # fused: in slot order (slot i holds _live[i])
        self._pool = SlotPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, max_batch, self._max_context)
        self._decode_bindings: dict[int, _Binding] = {}
        self._prefill_bindings: dict[int, _Binding] = {}
        self._step: _StepArrays | None = None
        self._model_key = f"{model.gguf_sha256}/{cfg.n_layers}x{cfg.n_kv_heads}x{cfg.head_dim}"
        self._logits_rows_all = model.logits == "all"

    @classmethod
    def from_gguf(
        cls,
        gguf_path: Path,
        cache_root: Path,
        *,
        threads: int,
        max_context: int = DEFAULT_MAX_CONTEXT,
        max_batch: int = DEFAULT_MAX_BATCH,
        accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
        flavour: GraphFlavour = DEFAULT_FLAVOUR,
        logits: LogitsMode = "last",
        sha256: str | None = None,
        progress: ProgressFn | None = None,
    ) -> OrtExecutor:
        """Convert (or reuse the cached conversion of) a GGUF in the given graph flavour and load it."""
        converted = ensure_converted(
            gguf_path, cache_root, sha256=sha256, progress=progress, logits=logits, flavour=flavour
        )
        return cls(converted, threads, max_context=max_context, max_batch=max_batch, accuracy_level=accuracy_level)

    # --- the Executor protocol -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the logits vector."""
        return self.model.config.vocab_size

    @property
    def max_context(self) -> int:
        """Most tokens one sequence may hold (prompt plus generated)."""
        return self._max_context

    @property
    def max_batch(self) -> int:
        """Most live sequences at once (KV slots)."""
        return self._max_batch

    @property
    def kv_bytes_per_token(self) -> int:
        """KV memory of one token of one sequence (float32 keys and values, every layer)."""
        cfg = self.model.config
        return cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 4

    @property
    def live(self) -> int:
        """Sequences allocated and not yet released."""
        return len(self._live)

    @property
    def kv_capacity(self) -> int:
        """Positions per slot the fused graph's KV pool holds now (0 for the standard graph)."""
        return self._pool.capacity

    def new_sequence(self, prefix: PrefixSnapshot | None = None) -> OrtSequence:
        """Allocate a sequence, empty or holding a copy of `prefix`; EngineError when all slots are taken."""
        self._live_session()
        if len(self._live) >= self._max_batch:
            raise EngineError(f"all {self._max_batch} sequence slots are in use")
        kv = self._check_prefix(prefix) if prefix is not None else None
        seq = OrtSequence(self)
        length = 0 if kv is None else int(kv.shape[3])
        if self._fused:
            self._ensure_capacity(length)
            seq._slot = len(self._live)
            if kv is not None:
                self._pool.write(seq._slot, kv)
        else:
            cfg = self.model.config
            empty = np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
            seq._past = [empty] * len(self._names) if kv is None else self._past_from(kv)
        seq._length = length
        self._live.append(seq)
        return seq

    def prefill(self, seq: SequenceState, token_ids: Sequence[int]) -> Logits:
        """Append `token_ids` (the whole prompt may come in one call); return logits for the last position."""
        last: Logits = np.array(self._prefill(seq, token_ids, every_position=False)[-1])
        return last

    def prefill_all(self, seq: SequenceState, token_ids: Sequence[int]) -> Logits2D:
        """Like `prefill`, but logits [len(token_ids), vocab] for every new position (teacher forcing).

        Needs a graph converted with logits="all"; not part of the Executor protocol.
        """
        if self.model.logits != "all":
            raise ValueError("prefill_all needs a graph converted with logits='all'")
        return self._prefill(seq, token_ids, every_position=True)

    def _prefill(self, seq: SequenceState, token_ids: Sequence[int], *, every_position: bool) -> Logits2D:
        self._live_session()
        s = self._own(seq)
        if len(token_ids) == 0:
            raise ValueError("prefill needs at least one token")
        ids = self._check_ids(token_ids)
        if s.length + len(ids) > self._max_context:
            raise ContextOverflowError(
                f"sequence would hold {s.length + len(ids)} tokens, more than the context limit of {self._max_context}"
            )
        if not self._fused:
            return self._standard_step(s, ids, every_position)
        self._ensure_capacity(s.length + len(ids))
        chunks = [
            self._fused_prefill(s, ids[start : start + PREFILL_CHUNK], every_position)
            for start in range(0, len(ids), PREFILL_CHUNK)
        ]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def decode(self, seqs: Sequence[SequenceState], token_ids: Sequence[int]) -> Logits2D:
        """Append one token to each sequence in one batched step; return float32 logits [len(seqs), vocab]."""
        self._live_session()
        if len(seqs) != len(token_ids) or not seqs:
            raise ValueError(f"decode needs one token per sequence (got {len(seqs)} sequences, {len(token_ids)} ids)")
        owned = [self._own(s) for s in seqs]
        if len({id(s) for s in owned}) != len(owned):
            raise ValueError("a sequence appears twice in one decode step")
        ids = self._check_ids(token_ids)
        longest = max(s.length for s in owned)
        if longest + 1 > self._max_context:
            raise ContextOverflowError(
                f"a sequence would hold {longest + 1} tokens, more than the context limit of {self._max_context}"
            )
        if not self._fused:
            return np.concatenate([self._standard_step(s, ids[j : j + 1], False) for j, s in enumerate(owned)])
        self._gather_front(owned)
        self._ensure_capacity(longest + 1)
        return self._fused_decode(owned, ids, longest)

    def snapshot(self, seq: SequenceState, length: int) -> OrtSnapshot:
        """Copy the first `length` positions of the sequence's KV cache out of the sequence."""
        self._live_session()
        s = self._own(seq)
        if not 0 <= length <= s.length:
            raise ValueError(f"snapshot length {length} is outside 0..{s.length}")
        if self._fused:
            kv = self._pool.read(s._slot, length)
        else:
            cfg = self.model.config
            kv = np.empty((cfg.n_layers, 2, cfg.n_kv_heads, length, cfg.head_dim), np.float32)
            for i, past in enumerate(s._past):
                kv[i // 2, i % 2] = past[0, :, :length]
        return OrtSnapshot(kv, self._model_key)

    def release(self, seq: SequenceState) -> None:
        """Free the sequence's KV cache (idempotent); the last slot moves into the freed one."""
        s = self._own(seq, allow_released=True)
        if s._released:
            return
        if self._fused and self._session is not None:
            last = self._live[-1]
            if last is not s:
                self._pool.move(last._slot, s._slot, last.length)
                last._slot = s._slot
                self._live[s._slot] = last
            self._live.pop()
        elif s in self._live:
            self._live.remove(s)
        s._released = True
        s._length = 0
        s._slot = -1
        s._past = []

    def close(self) -> None:
        """Drop the session and every KV buffer; every later call raises EngineError."""
        self._session = None
        self._decode_bindings.clear()
        self._prefill_bindings.clear()
        self._step = None
        self._pool.free()
        for s in self._live:
            s._released, s._length, s._slot, s._past = True, 0, -1, []
        self._live = []

    # --- shared checks ------------------------------------------------------------------------------------------

    def _live_session(self) -> ort.InferenceSession:
        if self._session is None:
            raise EngineError("the executor is closed")
        return self._session

    def _own(self, seq: SequenceState, *, allow_released: bool = False) -> OrtSequence:
        if not isinstance(seq, OrtSequence) or seq._owner is not self:
            raise EngineError("sequence does not belong to this executor")
        if seq._released and not allow_released:
            raise EngineError("sequence was released")
        return seq

    def _check_ids(self, token_ids: Sequence[int]) -> npt.NDArray[np.int64]:
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.ndim != 1 or int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        return ids

    def _check_prefix(self, prefix: PrefixSnapshot) -> F32:
        cfg = self.model.config
        if not isinstance(prefix, OrtSnapshot) or prefix.model_key != self._model_key:
            raise EngineError("prefix snapshot was not taken from this model")
        if prefix.length > self._max_context:
            raise ContextOverflowError(
                f"prefix holds {prefix.length} tokens, more than the context limit of {self._max_context}"
            )
        assert prefix.kv.shape[:3] == (cfg.n_layers, 2, cfg.n_kv_heads)
        return prefix.kv

    # --- standard graph -----------------------------------------------------------------------------------------

    def _past_from(self, kv: F32) -> list[F32]:
        return [np.ascontiguousarray(kv[i // 2, i % 2][None]) for i in range(len(self._names))]

    def _standard_step(self, s: OrtSequence, ids: npt.NDArray[np.int64], every_position: bool) -> Logits2D:
        session = self._live_session()
        start, n = s.length, int(ids.shape[0])
        feeds: dict[str, Any] = dict(zip(self._names, s._past, strict=True))
        feeds["input_ids"] = ids[None, :]
        feeds["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None, :]
        logits, *presents = session.run(["logits", *self._present], feeds)
        s._past = presents
        s._length = start + n
        # Copy the rows we return, so callers never pin the [1, S, V] output buffer.
        return np.array(logits[0] if every_position else logits[0, -1:], dtype=np.float32)

    # --- fused graph --------------------------------------------------------------------------------------------

    def _ensure_capacity(self, needed: int) -> None:
        """Grow the pool for `needed` positions; bindings over the old buffers go, so the old memory is freed."""
        generation = self._pool.generation
        self._pool.ensure(needed, [s.length for s in self._live])
        if self._pool.generation != generation:
            self._decode_bindings.clear()
            self._prefill_bindings.clear()

    def _gather_front(self, seqs: list[OrtSequence]) -> None:
        """Swap slots so that `seqs` occupy slots 0..len(seqs)-1 (a no-op when decoding every live sequence)."""
        k = len(seqs)
        wanted = {id(s) for s in seqs}
        outside = [s for s in seqs if s._slot >= k]
        inside = [s for s in self._live[:k] if id(s) not in wanted]
        for a, b in zip(outside, inside, strict=True):
            self._pool.swap(a._slot, a.length, b._slot, b.length)
            a._slot, b._slot = b._slot, a._slot
            self._live[a._slot], self._live[b._slot] = a, b

    def _bind(self, start: int, stop: int, *, decode: bool) -> _Binding:
        """A binding over slots [start, stop) of the pool; for decode, the step arrays' first rows are bound too."""
        session = self._live_session()
        io = session.io_binding()
        keep: list[Any] = []
        for past, present, view in zip(self._names, self._present, self._pool.views(start, stop), strict=True):
            value = ort.OrtValue.ortvalue_from_numpy(view)
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)  # the same memory: GQA appends in place
            keep.append(value)
        if decode:
            if self._step is None:
                n, vocab = self._max_batch, self.vocab_size
                self._step = _StepArrays(
                    ids=np.zeros((n, 1), np.int64),
                    seqlens=np.zeros(n, np.int32),
                    total=np.zeros((), np.int32),
                    logits=np.empty((n, 1, vocab), np.float32),
                )
            k = stop - start
            step = self._step
            for name, array in (
                ("input_ids", step.ids[:k]),
                (SEQLENS_K, step.seqlens[:k]),
                (TOTAL_SEQUENCE_LENGTH, step.total),
            ):
                value = ort.OrtValue.ortvalue_from_numpy(array)
                io.bind_ortvalue_input(name, value)
                keep.append(value)
            value = ort.OrtValue.ortvalue_from_numpy(step.logits[:k])
            io.bind_ortvalue_output("logits", value)
            keep.append(value)
        return _Binding(io=io, generation=self._pool.generation, keep=keep)

    def _fused_decode(self, seqs: list[OrtSequence], ids: npt.NDArray[np.int64], longest: int) -> Logits2D:
        session = self._live_session()
        k = len(seqs)
        binding = self._decode_bindings.get(k)
        if binding is None or binding.generation != self._pool.generation:
            binding = self._decode_bindings[k] = self._bind(0, k, decode=True)
        step = self._step
        assert step is not None
        slots = np.fromiter((s._slot for s in seqs), np.intp, count=k)
        step.ids[slots, 0] = ids
        step.seqlens[slots] = [s.length for s in seqs]  # new total length - 1
        step.total[...] = longest + 1
        session.run_with_iobinding(binding.io)
        for s in seqs:
            s._length += 1
        out: Logits2D = step.logits[slots, 0]  # fancy indexing copies, in the caller's order
        return out

    def _fused_prefill(self, s: OrtSequence, ids: npt.NDArray[np.int64], every_position: bool) -> Logits2D:
        session = self._live_session()
        binding = self._prefill_bindings.get(s._slot)
        if binding is None or binding.generation != self._pool.generation:
            binding = self._prefill_bindings[s._slot] = self._bind(s._slot, s._slot + 1, decode=False)
        n = int(ids.shape[0])
        total = s.length + n
        io = binding.io
        # Named locals: ONNX Runtime reads these arrays' memory during the run, so they must stay alive until then.
        ids_2d = np.ascontiguousarray(ids[None, :])
        seqlens = np.array([total - 1], np.int32)
        total_arr = np.array(total, np.int32)
        out = np.empty((1, n if self._logits_rows_all else 1, self.vocab_size), np.float32)
        io.bind_cpu_input("input_ids", ids_2d)
        io.bind_cpu_input(SEQLENS_K, seqlens)
        io.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, total_arr)
        out_value = ort.OrtValue.ortvalue_from_numpy(out)
        io.bind_ortvalue_output("logits", out_value)
        session.run_with_iobinding(io)
        s._length = total
        rows: Logits2D = out[0] if every_position else out[0, -1:]
        return rows
