"""OrtExecutor bookkeeping on a tiny random model, for both graph flavours: slots, limits, snapshots, growth."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from engines.base import ContextOverflowError, EngineError
from engines.convert import ConvertedModel, GraphFlavour, ensure_converted
from engines.onnxruntime import OrtExecutor, OrtSequence, OrtSnapshot
from tests.engines.reference_llama import ReferenceLlama
from tests.engines.tiny_gguf import TinySpec, write_tiny_gguf

FLAVOURS: list[GraphFlavour] = ["fused", "standard"]


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 256-token context, so the KV pool has room to grow."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-long") / "tiny.gguf", TinySpec(context=256))


@pytest.fixture(scope="module")
def tiny_models(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ConvertedModel]:
    cache = tmp_path_factory.mktemp("tiny-cache")
    return {f: ensure_converted(tiny_gguf, cache, flavour=f, logits="all") for f in FLAVOURS}


@pytest.fixture(params=FLAVOURS)
def tiny(request: pytest.FixtureRequest, tiny_models: dict[str, ConvertedModel]) -> OrtExecutor:
    return OrtExecutor(tiny_models[request.param], threads=1, max_context=8, max_batch=4, accuracy_level=0)


def _decode_one(ex: OrtExecutor, seq: OrtSequence, token: int) -> npt.NDArray[np.float32]:
    row: npt.NDArray[np.float32] = ex.decode([seq], [token])[0]
    return row


def test_every_position_matches_the_reference(tiny: OrtExecutor, tiny_gguf: Path) -> None:
    ids = [1, 17, 200, 3, 99, 45, 45, 7]
    seq = tiny.new_sequence()
    logits = tiny.prefill_all(seq, ids[:5])
    stepped = [_decode_one(tiny, seq, t) for t in ids[5:]]
    got = np.concatenate([logits, np.array(stepped)])
    np.testing.assert_allclose(got, ReferenceLlama(tiny_gguf).forward(ids), rtol=1e-4, atol=1e-4)


def test_context_overflow_leaves_the_sequence_as_it_was(tiny: OrtExecutor) -> None:
    assert tiny.max_context == 8
    seq = tiny.new_sequence()
    tiny.prefill(seq, [1, 2, 3, 4, 5, 6])
    tiny.decode([seq], [7])
    expected = _decode_one(tiny, tiny.new_sequence(prefix=tiny.snapshot(seq, 7)), 8)
    with pytest.raises(ContextOverflowError):
        tiny.prefill(seq, [8, 9])
    assert seq.length == 7
    np.testing.assert_allclose(_decode_one(tiny, seq, 8), expected, atol=1e-5)
    with pytest.raises(ContextOverflowError):
        tiny.decode([seq], [9])
    assert seq.length == 8
    with pytest.raises(ContextOverflowError):
        tiny.prefill(tiny.new_sequence(), list(range(9)))


def test_model_context_caps_the_limit(tiny_models: dict[str, ConvertedModel]) -> None:
    assert OrtExecutor(tiny_models["fused"], threads=1).max_context == 32  # the tiny model's context_length


def test_all_slots_taken_is_an_engine_error(tiny: OrtExecutor) -> None:
    seqs = [tiny.new_sequence() for _ in range(4)]
    with pytest.raises(EngineError, match="all 4 sequence slots"):
        tiny.new_sequence()
    tiny.release(seqs[2])
    again = tiny.new_sequence()
    assert tiny.live == 4
    assert again.length == 0


def test_release_frees_the_sequence_and_leaves_others_alone(tiny: OrtExecutor) -> None:
    a, b, c = tiny.new_sequence(), tiny.new_sequence(), tiny.new_sequence()
    tiny.prefill(a, [5, 6, 7])
    expected = tiny.prefill(b, [5, 6, 7])
    tiny.prefill(c, [9, 10])
    tiny.release(a)
    assert a.released
    assert a.length == 0
    with pytest.raises(EngineError, match="released"):
        tiny.decode([a], [1])
    with pytest.raises(EngineError, match="released"):
        tiny.snapshot(a, 0)
    tiny.release(a)  # idempotent
    assert tiny.live == 2
    fresh = tiny.new_sequence()
    np.testing.assert_allclose(tiny.prefill(fresh, [5, 6, 7]), expected, atol=1e-5)
    rows = tiny.decode([b, c, fresh], [8, 11, 8])
    np.testing.assert_allclose(rows[0], rows[2], atol=1e-5)
    alone = tiny.new_sequence()
    tiny.prefill(alone, [9, 10])
    np.testing.assert_allclose(rows[1], _decode_one(tiny, alone, 11), atol=1e-5)


def test_batched_decode_equals_each_alone(tiny: OrtExecutor) -> None:
    prompts = [[3], [4, 5, 6, 7], [8, 9]]
    batch = [tiny.new_sequence() for _ in prompts]
    for seq, p in zip(batch, prompts, strict=True):
        tiny.prefill(seq, p)
    rows = [tiny.decode(batch, [10, 11, 12]) for _ in range(2)]
    for seq in batch:
        tiny.release(seq)
    for j, (p, token) in enumerate(zip(prompts, [10, 11, 12], strict=True)):
        seq = tiny.new_sequence()
        tiny.prefill(seq, p)
        for r in rows:
            np.testing.assert_allclose(r[j], _decode_one(tiny, seq, token), atol=1e-5, rtol=0)
        tiny.release(seq)


def test_snapshot_roundtrip_equals_full_prefill(tiny: OrtExecutor) -> None:
    donor = tiny.new_sequence()
    tiny.prefill(donor, [1, 2, 3, 4])
    snap = tiny.snapshot(donor, 3)
    assert isinstance(snap, OrtSnapshot)
    assert snap.length == 3
    assert snap.nbytes == 3 * tiny.kv_bytes_per_token
    tiny.release(donor)  # the snapshot is a copy: it outlives its sequence
    reused = tiny.new_sequence(prefix=snap)
    whole = tiny.new_sequence()
    np.testing.assert_allclose(tiny.prefill(reused, [4, 5]), tiny.prefill(whole, [1, 2, 3, 4, 5]), atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        tiny.snapshot(reused, 6)


def test_snapshots_from_another_model_are_refused(tiny: OrtExecutor, executor: OrtExecutor) -> None:
    seq = executor.new_sequence()
    snap = executor.snapshot(seq, 0)
    executor.release(seq)
    with pytest.raises(EngineError, match="not taken from this model"):
        tiny.new_sequence(prefix=snap)
    assert tiny.live == 0


def test_bad_input_is_refused(tiny: OrtExecutor, tiny_models: dict[str, ConvertedModel]) -> None:
    seq = tiny.new_sequence()
    with pytest.raises(ValueError, match="at least one"):
        tiny.prefill(seq, [])
    with pytest.raises(ValueError, match="token ids"):
        tiny.prefill(seq, [256])
    with pytest.raises(ValueError, match="one token per sequence"):
        tiny.decode([seq], [1, 2])
    with pytest.raises(ValueError, match="twice"):
        tiny.decode([seq, seq], [1, 2])
    other = OrtExecutor(tiny_models["standard"], threads=1)
    with pytest.raises(EngineError, match="does not belong"):
        other.decode([seq], [1])
    assert seq.length == 0


def test_close_ends_the_executor(tiny: OrtExecutor) -> None:
    seq = tiny.new_sequence()
    tiny.close()
    assert seq.released
    with pytest.raises(EngineError, match="closed"):
        tiny.prefill(seq, [1])
    with pytest.raises(EngineError, match="closed"):
        tiny.new_sequence()


def test_kv_pool_grows_on_demand_and_keeps_contents(long_tiny: Path, tmp_path: Path) -> None:
    """The fused graph's pool starts small and reallocates (copying live slots) when a sequence needs room."""
    ex = OrtExecutor.from_gguf(long_tiny, tmp_path, threads=1, max_batch=3, accuracy_level=0)
    assert ex.kv_capacity == 0
    a, b = ex.new_sequence(), ex.new_sequence()
    ex.prefill(a, [1, 2, 3])
    ex.prefill(b, [4, 5])
    small = ex.kv_capacity
    assert 3 <= small < 100
    ex.decode([a, b], [6, 7])
    old = weakref.ref(ex._pool.buffers[0].base)  # the array owning the memory (views share it)
    c = ex.new_sequence()
    ex.prefill(c, list(range(100)))  # forces a reallocation while a and b hold positions
    assert ex.kv_capacity >= 101
    gc.collect()
    assert old() is None  # nothing (bindings included) keeps the outgrown buffers alive
    rows = ex.decode([a, b, c], [8, 9, 8])
    ref = ReferenceLlama(long_tiny)
    np.testing.assert_allclose(rows[0], ref.forward([1, 2, 3, 6, 8])[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rows[1], ref.forward([4, 5, 7, 9])[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rows[2], ref.forward([*range(100), 8])[-1], rtol=1e-4, atol=1e-4)
    assert ex.kv_capacity <= 256  # bounded by the context limit
    ex.close()


def test_long_prompts_are_prefilled_in_chunks(long_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt longer than PREFILL_CHUNK runs as several continuing steps, with the same logits."""
    monkeypatch.setattr("engines.onnxruntime.executor.PREFILL_CHUNK", 16)
    ex = OrtExecutor.from_gguf(long_tiny, tmp_path, threads=1, accuracy_level=0, logits="all")
    ids = [(7 * i) % 256 for i in range(50)]
    got = ex.prefill_all(ex.new_sequence(), ids)
    assert got.shape == (50, 256)
    np.testing.assert_allclose(got, ReferenceLlama(long_tiny).forward(ids), rtol=1e-4, atol=1e-4)
    ex.close()
