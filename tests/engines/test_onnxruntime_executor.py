"""ONNX Runtime executor: KV-cache stepping, greedy SmolLM2 generation, context limits, sequence lifecycle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.base import ContextOverflowError, EngineError, Executor
from engines.convert import ConvertedModel, ensure_converted
from engines.onnxruntime import OrtExecutor, OrtSequence
from tests.engines.smollm2_prompts import CHATML_SHORT, CHATML_WITH_SYSTEM, EOS, detokenize


def _greedy(ex: OrtExecutor, prompt: list[int], steps: int) -> list[int]:
    seq = ex.new_sequence()
    logits = ex.prefill(seq, prompt)
    out: list[int] = []
    for _ in range(steps):
        token = int(np.argmax(logits))
        out.append(token)
        if token == EOS:
            break
        logits = ex.decode(seq, token)
    ex.release(seq)
    return out


def test_is_an_executor(executor: OrtExecutor) -> None:
    ex: Executor = executor
    assert ex.vocab_size == 49152
    assert ex.max_context == 2048  # min(model's 8192, the default cap)


def test_decoding_step_by_step_equals_one_prefill(executor: OrtExecutor) -> None:
    """Prefill + N decodes gives the logits of prefilling all N tokens at once: the KV cache path is right."""
    continuation = [504, 3575, 282, 4649, 314, 7042, 30, 2]
    stepped = executor.new_sequence()
    executor.prefill(stepped, CHATML_SHORT)
    by_step = [executor.decode(stepped, t) for t in continuation]
    assert stepped.length == len(CHATML_SHORT) + len(continuation)
    for n in (3, len(continuation)):
        whole = executor.new_sequence()
        at_once = executor.prefill(whole, CHATML_SHORT + continuation[:n])
        np.testing.assert_allclose(by_step[n - 1], at_once, atol=1e-3, rtol=0)
        executor.release(whole)
    executor.release(stepped)


def test_prefill_in_chunks_equals_one_prefill(executor: OrtExecutor) -> None:
    chunked = executor.new_sequence()
    executor.prefill(chunked, CHATML_WITH_SYSTEM[:20])
    a = executor.prefill(chunked, CHATML_WITH_SYSTEM[20:])
    whole = executor.new_sequence()
    b = executor.prefill(whole, CHATML_WITH_SYSTEM)
    np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)


def test_greedy_answer_names_paris(executor: OrtExecutor, smollm2_vocab: list[str]) -> None:
    text = detokenize(smollm2_vocab, _greedy(executor, CHATML_SHORT, 16))
    assert "Paris" in text


def test_greedy_answer_with_system_prompt_names_paris(
    converted_last: ConvertedModel, smollm2_vocab: list[str]
) -> None:
    """The chat template's real prompt, with fp32 activations (the int8 fast path drifts on this one)."""
    exact = OrtExecutor(converted_last, threads=2, accuracy_level=0)
    text = detokenize(smollm2_vocab, _greedy(exact, CHATML_WITH_SYSTEM, 12))
    exact.close()
    assert text.startswith("The capital of France is Paris")


def test_logits_are_a_float32_vector(executor: OrtExecutor) -> None:
    seq = executor.new_sequence()
    logits = executor.prefill(seq, [1, 2, 3])
    assert logits.dtype == np.float32
    assert logits.shape == (49152,)
    assert np.isfinite(logits).all()
    executor.release(seq)


# The lifecycle tests use a tiny random model: they are about bookkeeping, not language.


@pytest.fixture
def tiny(tiny_gguf: Path, tmp_path: Path) -> OrtExecutor:
    return OrtExecutor.from_gguf(tiny_gguf, tmp_path, threads=1, max_context=8)


def test_context_overflow(tiny: OrtExecutor) -> None:
    assert tiny.max_context == 8
    seq = tiny.new_sequence()
    tiny.prefill(seq, [1, 2, 3, 4, 5, 6])
    tiny.decode(seq, 7)
    tiny.decode(seq, 8)
    with pytest.raises(ContextOverflowError):
        tiny.decode(seq, 9)
    assert seq.length == 8  # a refused step leaves the sequence as it was
    with pytest.raises(ContextOverflowError):
        tiny.prefill(tiny.new_sequence(), list(range(9)))


def test_model_context_caps_the_limit(tiny_gguf: Path, tmp_path: Path) -> None:
    ex = OrtExecutor.from_gguf(tiny_gguf, tmp_path, threads=1)
    assert ex.max_context == 32  # the tiny model's context_length, below the default cap of 2048


def test_release_frees_the_sequence_and_leaves_others_alone(tiny: OrtExecutor) -> None:
    a, b = tiny.new_sequence(), tiny.new_sequence()
    tiny.prefill(a, [5, 6, 7])
    expected = tiny.prefill(b, [5, 6, 7])
    tiny.release(a)
    assert isinstance(a, OrtSequence)
    assert a.released
    assert a.length == 0
    with pytest.raises(EngineError, match="released"):
        tiny.decode(a, 1)
    tiny.release(a)  # idempotent
    fresh = tiny.new_sequence()
    np.testing.assert_allclose(tiny.prefill(fresh, [5, 6, 7]), expected, atol=1e-6)
    np.testing.assert_allclose(tiny.decode(b, 8), tiny.decode(fresh, 8), atol=1e-6)


def test_interleaved_sequences_do_not_share_state(tiny: OrtExecutor) -> None:
    a, b = tiny.new_sequence(), tiny.new_sequence()
    tiny.prefill(a, [10, 11])
    tiny.prefill(b, [20, 21, 22, 23])
    tiny.decode(b, 24)
    alone = tiny.new_sequence()
    tiny.prefill(alone, [10, 11])
    np.testing.assert_allclose(tiny.decode(a, 12), tiny.decode(alone, 12), atol=1e-6)


def test_bad_input_is_refused(tiny: OrtExecutor, tiny_gguf: Path, tmp_path: Path) -> None:
    seq = tiny.new_sequence()
    with pytest.raises(ValueError, match="at least one"):
        tiny.prefill(seq, [])
    with pytest.raises(ValueError, match="token ids"):
        tiny.prefill(seq, [256])
    other = OrtExecutor(ensure_converted(tiny_gguf, tmp_path), threads=1)
    with pytest.raises(EngineError, match="does not belong"):
        other.decode(seq, 1)
    assert seq.length == 0


def test_close_ends_the_executor(tiny: OrtExecutor) -> None:
    seq = tiny.new_sequence()
    tiny.close()
    with pytest.raises(EngineError, match="closed"):
        tiny.prefill(seq, [1])
    with pytest.raises(EngineError, match="closed"):
        tiny.new_sequence()
