"""ONNX Runtime CPU executor for converted llama graphs; each sequence keeps its KV cache in host memory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from engines.base import ContextOverflowError, EngineError, Logits, ProgressFn, SequenceState
from engines.convert import ConvertedModel, LogitsMode, ensure_converted, past_names, present_names

DEFAULT_MAX_CONTEXT = 2048


class OrtSequence:
    """One sequence's KV cache: per layer, keys and values [1, n_kv, length, head_dim]."""

    def __init__(self, owner: OrtExecutor, past: dict[str, npt.NDArray[np.float32]]) -> None:
        self._owner = owner
        self._past: dict[str, npt.NDArray[np.float32]] | None = past
        self._length = 0

    @property
    def length(self) -> int:
        """Tokens already held in this sequence's KV cache."""
        return self._length

    @property
    def released(self) -> bool:
        """True once `OrtExecutor.release` freed it."""
        return self._past is None


class OrtExecutor:
    """`engines.base.Executor` over ONNX Runtime's CPU execution provider."""

    def __init__(
        self,
        model: ConvertedModel,
        threads: int,
        *,
        max_context: int = DEFAULT_MAX_CONTEXT,
        accuracy_level: int = 4,
    ) -> None:
        """Load `model`; `accuracy_level` goes to ORT's DQ+MatMul -> MatMulNBits fusion (4 = int8 compute)."""
        if threads < 1 or max_context < 1:
            raise ValueError(f"threads ({threads}) and max_context ({max_context}) must be positive")
        self.model = model
        cfg = model.config
        self._max_context = min(cfg.context_length, max_context)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Level 4 quantizes activations to int8 inside the int4/int8 GEMMs: several times faster on CPU, at a
        # small fidelity cost (level 0 keeps fp32 activations and reproduces the dequantized model exactly).
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
        self._session: ort.InferenceSession | None = ort.InferenceSession(
            str(model.model_path), so, providers=["CPUExecutionProvider"]
        )
        self._past_inputs = [name for i in range(cfg.n_layers) for name in past_names(i)]
        self._present_outputs = [name for i in range(cfg.n_layers) for name in present_names(i)]
        self._outputs = ["logits", *self._present_outputs]
        self._empty = np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), dtype=np.float32)

    @classmethod
    def from_gguf(
        cls,
        gguf_path: Path,
        cache_root: Path,
        *,
        threads: int,
        max_context: int = DEFAULT_MAX_CONTEXT,
        accuracy_level: int = 4,
        logits: LogitsMode = "last",
        sha256: str | None = None,
        progress: ProgressFn | None = None,
    ) -> OrtExecutor:
        """Convert (or reuse the cached conversion of) a GGUF and load it."""
        converted = ensure_converted(gguf_path, cache_root, sha256=sha256, progress=progress, logits=logits)
        return cls(converted, threads, max_context=max_context, accuracy_level=accuracy_level)

    @property
    def vocab_size(self) -> int:
        """Size of the logits vector."""
        return self.model.config.vocab_size

    @property
    def max_context(self) -> int:
        """Most tokens one sequence may hold (prompt plus generated)."""
        return self._max_context

    def new_sequence(self) -> OrtSequence:
        """Allocate an empty sequence."""
        self._live_session()
        return OrtSequence(self, dict.fromkeys(self._past_inputs, self._empty))

    def prefill(self, seq: SequenceState, token_ids: Sequence[int]) -> Logits:
        """Append `token_ids` (the whole prompt may come in one call); return logits for the last position."""
        if len(token_ids) == 0:
            raise ValueError("prefill needs at least one token")
        return self._step(seq, np.asarray(token_ids, dtype=np.int64))

    def decode(self, seq: SequenceState, token_id: int) -> Logits:
        """Append one token; return its logits."""
        return self._step(seq, np.array([token_id], dtype=np.int64))

    def release(self, seq: SequenceState) -> None:
        """Free the sequence's KV cache (idempotent)."""
        s = self._own(seq, allow_released=True)
        s._past = None
        s._length = 0

    def close(self) -> None:
        """Drop the ONNX Runtime session; every later call raises EngineError."""
        self._session = None

    def _live_session(self) -> ort.InferenceSession:
        if self._session is None:
            raise EngineError("the executor is closed")
        return self._session

    def _own(self, seq: SequenceState, *, allow_released: bool = False) -> OrtSequence:
        if not isinstance(seq, OrtSequence) or seq._owner is not self:
            raise EngineError("sequence does not belong to this executor")
        if seq.released and not allow_released:
            raise EngineError("sequence was released")
        return seq

    def _step(self, seq: SequenceState, ids: npt.NDArray[np.int64]) -> Logits:
        session = self._live_session()
        s = self._own(seq)
        assert s._past is not None
        start, n = s.length, int(ids.shape[0])
        if start + n > self._max_context:
            raise ContextOverflowError(
                f"sequence would hold {start + n} tokens, more than the context limit of {self._max_context}"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        feeds: dict[str, Any] = dict(s._past)
        feeds["input_ids"] = ids[None, :]
        feeds["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None, :]
        logits, *presents = session.run(self._outputs, feeds)
        s._past = dict(zip(self._past_inputs, presents, strict=True))
        s._length = start + n
        # Copy the one row we return, so callers never pin the [1, S, V] output buffer.
        return np.array(logits[0, -1], dtype=np.float32)
