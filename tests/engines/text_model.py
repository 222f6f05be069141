"""The bundled SmolLM2 GGUF's text pipeline, loaded once per session (building its tokenizer is not free)."""

from __future__ import annotations

import functools

from engines.text import TextPipeline
from tests.bundled import smollm2_gguf


@functools.cache
def smollm_pipeline() -> TextPipeline:
    """The pipeline of the bundled model (immutable, so sharing it between tests is safe)."""
    return TextPipeline.from_gguf(smollm2_gguf())
