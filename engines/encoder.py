"""ONNX Runtime CPU sentence encoder over a converted BERT graph (`engines.base.Encoder`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engines.base import ContextOverflowError, EngineError, Logits2D, ProgressFn
from engines.convert.bert import ConvertedEncoder, ensure_converted_encoder
from engines.convert.bert_graph import ATTENTION_MASK, INPUT_IDS, OUTPUT

# Padded tokens per ONNX Runtime run: bounds the activations (the attention scores of 4096 tokens at length 256
# take 48 MiB) while leaving the matrix products large enough to run at full speed.
DEFAULT_MAX_RUN_TOKENS = 4096
# One run's fixed cost in padded-token equivalents, for planning runs: measured on 2 CPU threads, a run costs
# about 6 ms plus 0.28 ms per padded token, so a batch is split only where that saves more than ~20 tokens of pad.
_RUN_COST_TOKENS = 20.0


def plan_runs(lengths: Sequence[int], max_run_tokens: int) -> list[list[int]]:
    """Group input indices into runs (each padded to its longest member) minimising estimated total cost.

    Inputs are sorted by length, longest first, and cut into contiguous groups by dynamic programming over
    cost(group) = run overhead + size x longest length, with size x longest length <= max_run_tokens.
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda i: -lengths[i])
    lens = np.array([lengths[i] for i in order], dtype=np.float64)
    best = np.zeros(n + 1)  # best[j]: cheapest plan for the j longest inputs
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        starts = np.arange(j)
        padded = (j - starts) * lens[:j]  # group order[start:j] is padded to lens[start], its longest
        cost = best[:j] + _RUN_COST_TOKENS + padded
        # A single input always fits: it is within max_tokens, which the caller keeps below max_run_tokens.
        cost[(padded > max_run_tokens) & (starts < j - 1)] = np.inf
        cut[j] = int(np.argmin(cost))
        best[j] = cost[cut[j]]
    runs: list[list[int]] = []
    j = n
    while j > 0:
        runs.append(order[cut[j] : j])
        j = int(cut[j])
    runs.reverse()
    return runs


class OrtEncoder:
    """`engines.base.Encoder` over ONNX Runtime's CPU execution provider."""

    def __init__(self, model: ConvertedEncoder, threads: int, *, max_run_tokens: int = DEFAULT_MAX_RUN_TOKENS) -> None:
        """Load `model` on `threads` intra-op threads."""
        if threads < 1:
            raise ValueError(f"threads must be positive, not {threads}")
        self.model = model
        cfg = model.config
        self._max_run_tokens = max(max_run_tokens, cfg.max_tokens)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Level ALL fuses the erf GELU with its bias (BiasGelu) and the attention scale into the MatMul. Offline
        # Attention/SkipLayerNormalization fusion was measured too: no faster here (the matrix products dominate).
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session: ort.InferenceSession | None = ort.InferenceSession(
            str(model.model_path), so, providers=["CPUExecutionProvider"]
        )

    @classmethod
    def from_model_dir(
        cls,
        model_dir: Path,
        cache_root: Path,
        *,
        threads: int,
        sha256: str | None = None,
        progress: ProgressFn | None = None,
    ) -> OrtEncoder:
        """Convert (or reuse the cached conversion of) a BERT model directory and load it."""
        return cls(ensure_converted_encoder(model_dir, cache_root, sha256=sha256, progress=progress), threads)

    @property
    def dimensions(self) -> int:
        """Length of each embedding vector."""
        return self.model.config.hidden_size

    @property
    def max_tokens(self) -> int:
        """Longest input (in tokens, [CLS] and [SEP] included) the model accepts."""
        return self.model.config.max_tokens

    @property
    def vocab_size(self) -> int:
        """Token ids must lie in [0, vocab_size)."""
        return self.model.config.vocab_size

    def embed(self, batch: Sequence[Sequence[int]]) -> Logits2D:
        """Embed each token sequence; float32 [len(batch), dimensions], each row of unit length."""
        session = self._live_session()
        rows = [np.asarray(ids, dtype=np.int64) for ids in batch]
        for i, ids in enumerate(rows):
            if ids.ndim != 1 or ids.size == 0:
                raise ValueError(f"input {i} must be a non-empty sequence of token ids")
            if ids.size > self.max_tokens:
                raise ContextOverflowError(
                    f"input {i} has {ids.size} tokens, more than the model's limit of {self.max_tokens}"
                )
            if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
                raise ValueError(f"input {i}: token ids must lie in [0, {self.vocab_size})")
        out = np.empty((len(rows), self.dimensions), dtype=np.float32)
        for run in plan_runs([r.size for r in rows], self._max_run_tokens):
            width = max(rows[i].size for i in run)
            # Right padding with id 0 ([PAD]); the mask keeps pad out of attention and out of the mean.
            ids = np.zeros((len(run), width), dtype=np.int64)
            mask = np.zeros((len(run), width), dtype=np.int64)
            for k, i in enumerate(run):
                ids[k, : rows[i].size] = rows[i]
                mask[k, : rows[i].size] = 1
            (vectors,) = session.run([OUTPUT], {INPUT_IDS: ids, ATTENTION_MASK: mask})
            out[run] = vectors
        return out

    def close(self) -> None:
        """Drop the ONNX Runtime session; every later call raises EngineError."""
        self._session = None

    def _live_session(self) -> ort.InferenceSession:
        if self._session is None:
            raise EngineError("the encoder is closed")
        return self._session
