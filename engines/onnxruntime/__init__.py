"""ONNX Runtime CPU executor for converted llama graphs (fused contrib-op graph by default, standard graph too)."""

from engines.onnxruntime.executor import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONTEXT,
    PREFILL_CHUNK,
    OrtExecutor,
    OrtSequence,
    OrtSnapshot,
)

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_CONTEXT", "PREFILL_CHUNK", "OrtExecutor", "OrtSequence", "OrtSnapshot"]
