"""ONNX Runtime executor on SmolLM2: KV stepping, batched decode identity, slots, prefix snapshots, greedy answers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from engines.base import EngineError, Executor
from engines.convert import ConvertedModel
from engines.onnxruntime import OrtExecutor, OrtSequence
from tests.engines.smollm2_prompts import CHATML_SHORT, CHATML_WITH_SYSTEM, EOS, detokenize

F32 = npt.NDArray[np.float32]
STEPS = 32
# Eight prompts of different lengths (prefixes of the system-prompt chat, then the short chat): 8 to 37 tokens.
PROMPTS = [CHATML_WITH_SYSTEM[:n] for n in (8, 13, 21, 26, 30, 37)] + [CHATML_SHORT, CHATML_SHORT[:11]]


def _greedy(ex: OrtExecutor, prompt: list[int], steps: int) -> list[int]:
    seq = ex.new_sequence()
    logits = ex.prefill(seq, prompt)
    out: list[int] = []
    for _ in range(steps):
        token = int(np.argmax(logits))
        out.append(token)
        if token == EOS:
            break
        logits = ex.decode([seq], [token])[0]
    ex.release(seq)
    return out


@dataclass
class Trajectory:
    """One prompt decoded greedily alone: the token fed at each step and the logits that step returned."""

    prefill_logits: F32
    tokens: list[int]  # tokens[i] is fed at step i (the argmax of the previous logits); STEPS + 1 of them
    logits: list[F32]  # logits[i] is what step i returned


@pytest.fixture(scope="module")
def alone(executor: OrtExecutor) -> list[Trajectory]:
    """Each of PROMPTS decoded by itself (batch of one), EOS not special, STEPS steps."""
    out = []
    for prompt in PROMPTS:
        seq = executor.new_sequence()
        first = executor.prefill(seq, prompt)
        tokens, logits = [int(np.argmax(first))], []
        for _ in range(STEPS):
            logits.append(executor.decode([seq], [tokens[-1]])[0])
            tokens.append(int(np.argmax(logits[-1])))
        executor.release(seq)
        out.append(Trajectory(first, tokens, logits))
    return out


@pytest.fixture
def clean(executor: OrtExecutor) -> Iterator[OrtExecutor]:
    """The shared executor, checked to hold no sequences before and after the test."""
    assert executor.live == 0
    yield executor
    assert executor.live == 0


def test_is_an_executor(executor: OrtExecutor) -> None:
    ex: Executor = executor
    assert ex.vocab_size == 49152
    assert ex.max_context == 2048  # min(model's 8192, the default cap)
    assert ex.max_batch == 16
    assert ex.kv_bytes_per_token == 30 * 2 * 3 * 64 * 4  # layers x (K, V) x KV heads x head_dim x float32
    assert executor.model.graph == "fused"


def test_batched_decode_equals_each_sequence_alone(clean: OrtExecutor, alone: list[Trajectory]) -> None:
    """Eight sequences of different lengths in one batch: every row is what that sequence gives by itself."""
    seqs = [clean.new_sequence() for _ in PROMPTS]
    for seq, prompt, ref in zip(seqs, PROMPTS, alone, strict=True):
        np.testing.assert_array_equal(clean.prefill(seq, prompt), ref.prefill_logits)
    worst = 0.0
    fed = [ref.tokens[0] for ref in alone]
    for step in range(STEPS):
        rows = clean.decode(seqs, fed)
        assert rows.shape == (len(PROMPTS), 49152)
        for row, ref in zip(rows, alone, strict=True):
            worst = max(worst, float(np.abs(row - ref.logits[step]).max()))
        fed = [int(np.argmax(row)) for row in rows]
        assert fed == [ref.tokens[step + 1] for ref in alone]  # the batch picks exactly the tokens each picked alone
    assert worst <= 1e-4  # measured on AVX-512 VNNI: exactly 0 (MatMulNBits rows do not depend on batch size)
    for seq in seqs:
        clean.release(seq)


def test_release_compacts_slots_and_leaves_the_others_intact(clean: OrtExecutor, alone: list[Trajectory]) -> None:
    """Releasing sequences mid-run moves the last slot into the hole; the survivors keep decoding as if alone."""
    seqs = [clean.new_sequence() for _ in PROMPTS[:5]]
    for seq, prompt in zip(seqs, PROMPTS[:5], strict=True):
        clean.prefill(seq, prompt)
    live = list(range(5))
    for step in range(12):
        if step == 4:
            clean.release(seqs[1])  # a middle slot: the last sequence moves into it
            live.remove(1)
        if step == 8:
            clean.release(seqs[0])
            live.remove(0)
        rows = clean.decode([seqs[i] for i in live], [alone[i].tokens[step] for i in live])
        for row, i in zip(rows, live, strict=True):
            np.testing.assert_allclose(row, alone[i].logits[step], atol=1e-4, rtol=0)
    assert sorted(s._slot for s in seqs if not s.released) == [0, 1, 2]
    for seq in seqs:
        clean.release(seq)


def test_decoding_a_subset_in_any_order(clean: OrtExecutor, alone: list[Trajectory]) -> None:
    """A step over some live sequences (not the first slots, out of order) touches only those."""
    seqs = [clean.new_sequence() for _ in PROMPTS[:4]]
    for seq, prompt in zip(seqs, PROMPTS[:4], strict=True):
        clean.prefill(seq, prompt)
    order = [3, 1]  # slots 3 and 1 swap places with 0 and 2
    for step in range(3):
        rows = clean.decode([seqs[i] for i in order], [alone[i].tokens[step] for i in order])
        for row, i in zip(rows, order, strict=True):
            np.testing.assert_allclose(row, alone[i].logits[step], atol=1e-4, rtol=0)
    for step in range(3):  # the two left behind resume where they stopped
        rows = clean.decode([seqs[0], seqs[2]], [alone[0].tokens[step], alone[2].tokens[step]])
        for row, i in zip(rows, (0, 2), strict=True):
            np.testing.assert_allclose(row, alone[i].logits[step], atol=1e-4, rtol=0)
    for seq in seqs:
        clean.release(seq)


def test_prefix_snapshot_reuse_equals_full_prefill(clean: OrtExecutor) -> None:
    """A sequence started from a snapshot of a shared system prompt continues exactly like a full prefill."""
    system = 20  # the system prompt's tokens
    donor = clean.new_sequence()
    clean.prefill(donor, CHATML_WITH_SYSTEM)
    snap = clean.snapshot(donor, system)
    clean.release(donor)
    assert snap.length == system
    assert snap.nbytes == system * clean.kv_bytes_per_token

    reused = clean.new_sequence(prefix=snap)
    assert reused.length == system
    a = clean.prefill(reused, CHATML_WITH_SYSTEM[system:])
    whole = clean.new_sequence()
    b = clean.prefill(whole, CHATML_WITH_SYSTEM)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    tokens_a, tokens_b = [int(np.argmax(a))], [int(np.argmax(b))]
    for _ in range(8):
        ra, rb = clean.decode([reused, whole], [tokens_a[-1], tokens_b[-1]])
        tokens_a.append(int(np.argmax(ra)))
        tokens_b.append(int(np.argmax(rb)))
    assert tokens_a == tokens_b
    clean.release(reused)
    clean.release(whole)


def test_prefill_in_chunks_equals_one_prefill(clean: OrtExecutor) -> None:
    chunked = clean.new_sequence()
    clean.prefill(chunked, CHATML_WITH_SYSTEM[:20])
    a = clean.prefill(chunked, CHATML_WITH_SYSTEM[20:])
    whole = clean.new_sequence()
    b = clean.prefill(whole, CHATML_WITH_SYSTEM)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    clean.release(chunked)
    clean.release(whole)


def test_decoding_step_by_step_equals_one_prefill(exact_executor: OrtExecutor) -> None:
    """With fp32 activations, prefill + N decodes gives the logits of prefilling all N tokens at once."""
    ex = exact_executor
    continuation = [504, 3575, 282, 4649, 314, 7042, 30, 2]
    stepped = ex.new_sequence()
    ex.prefill(stepped, CHATML_SHORT)
    by_step = [ex.decode([stepped], [t])[0] for t in continuation]
    assert stepped.length == len(CHATML_SHORT) + len(continuation)
    whole = ex.new_sequence()
    at_once = ex.prefill_all(whole, CHATML_SHORT + continuation)[len(CHATML_SHORT) :]
    np.testing.assert_allclose(np.array(by_step), at_once, atol=1e-3, rtol=0)
    ex.release(stepped)
    ex.release(whole)


def test_greedy_answer_names_paris(clean: OrtExecutor, smollm2_vocab: list[str]) -> None:
    text = detokenize(smollm2_vocab, _greedy(clean, CHATML_SHORT, 16))
    assert "Paris" in text


def test_greedy_answer_with_system_prompt_names_paris(exact_executor: OrtExecutor, smollm2_vocab: list[str]) -> None:
    """The chat template's real prompt, with fp32 activations."""
    text = detokenize(smollm2_vocab, _greedy(exact_executor, CHATML_WITH_SYSTEM, 12))
    assert text.startswith("The capital of France is Paris")


def test_standard_graph_answers_the_same(converted_last: ConvertedModel, smollm2_vocab: list[str]) -> None:
    """The standard-ops graph (the TensorRT reference) through the same executor API."""
    ex = OrtExecutor(converted_last, threads=2)
    assert ex.model.graph == "standard"
    text = detokenize(smollm2_vocab, _greedy(ex, CHATML_SHORT, 10))
    ex.close()
    assert "Paris" in text


def test_logits_are_float32(clean: OrtExecutor) -> None:
    seq = clean.new_sequence()
    logits = clean.prefill(seq, [1, 2, 3])
    assert logits.dtype == np.float32
    assert logits.shape == (49152,)
    assert np.isfinite(logits).all()
    rows = clean.decode([seq], [4])
    assert rows.dtype == np.float32
    assert rows.shape == (1, 49152)
    clean.release(seq)


def test_sequences_of_another_executor_are_refused(clean: OrtExecutor, exact_executor: OrtExecutor) -> None:
    seq = exact_executor.new_sequence()
    with pytest.raises(EngineError, match="does not belong"):
        clean.decode([seq], [1])
    snap = exact_executor.snapshot(seq, 0)
    assert isinstance(seq, OrtSequence)
    exact_executor.release(seq)
    reused = clean.new_sequence(prefix=snap)  # same model, same KV layout: a snapshot travels between executors
    assert reused.length == 0
    clean.release(reused)
