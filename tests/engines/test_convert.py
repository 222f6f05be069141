"""GGUF -> ONNX converter: exact repacking, fidelity against a numpy oracle, the atomic cache, refusals."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType as Q

from engines.base import ModelFormatError
from engines.convert import (
    CONVERTER_VERSION,
    BlockWeight,
    ConvertedModel,
    GgufModel,
    GgufTensor,
    GraphFlavour,
    ensure_converted,
    pack_int4,
    past_names,
    repack,
)
from tests.engines.reference_llama import ReferenceLlama
from tests.engines.smollm2_prompts import CHATML_WITH_SYSTEM
from tests.engines.tiny_gguf import TinySpec, write_tiny_gguf


def _run_all_positions(model: ConvertedModel, ids: list[int], accuracy_level: int) -> npt.NDArray[np.float32]:
    """Logits [S, vocab] of a logits='all' graph for one fresh sequence."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    session = ort.InferenceSession(str(model.model_path), so, providers=["CPUExecutionProvider"])
    cfg = model.config
    feeds: dict[str, npt.NDArray[np.generic]] = {
        "input_ids": np.array([ids], dtype=np.int64),
        "position_ids": np.arange(len(ids), dtype=np.int64)[None],
    }
    empty = np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
    for i in range(cfg.n_layers):
        for name in past_names(i):
            feeds[name] = empty
    logits: npt.NDArray[np.float32] = session.run(["logits"], feeds)[0][0]
    return logits


def _pearson_per_row(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    return np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True)])


# --- exact repacking ----------------------------------------------------------------------------------------


def _quantized(qtype: Q, shape: tuple[int, int], seed: int = 0) -> GgufTensor:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 3.0, (shape[0], 1)).astype(np.float32)
    return GgufTensor("w", qtype, shape, gguf.quants.quantize(data, qtype))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_repack_dequantizes_exactly_like_gguf(qtype: Q) -> None:
    t = _quantized(qtype, (48, 256))
    w = repack(t)
    assert isinstance(w, BlockWeight)
    expected = gguf.quants.dequantize(t.data, qtype).reshape(t.shape)
    np.testing.assert_array_equal(w.dequantize(), expected)
    limit = 8 if w.bits == 4 else 128
    assert w.values.min() >= -limit
    assert w.values.max() < limit
    assert (w.offset is not None) == (qtype == Q.Q4_1)


def test_repack_is_exact_on_the_real_model(smollm2_model: GgufModel) -> None:
    for name in [f"blk.7.{p}.weight" for p in ("attn_q", "ffn_down", "ffn_norm")]:
        t = smollm2_model.tensor(name)
        w = repack(t)
        got = w.dequantize() if isinstance(w, BlockWeight) else w
        np.testing.assert_array_equal(got, gguf.quants.dequantize(t.data, t.qtype).reshape(t.shape), err_msg=name)


def test_pack_int4_puts_the_first_element_in_the_low_nibble() -> None:
    assert pack_int4(np.array([1, -2, 7, -8], np.int8)) == bytes([0xE1, 0x87])


def test_onnx_runtime_reads_our_int4_blocks_as_we_mean_them() -> None:
    """Our int4 tensor through a real blockwise DequantizeLinear equals values * scale, transposed."""
    w = repack(_quantized(Q.Q4_0, (8, 64)))
    assert isinstance(w, BlockWeight)
    values = np.ascontiguousarray(w.values.T)  # the converter's [in, out] orientation
    nodes = [onnx.helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=0, block_size=32)]
    inits = [
        onnx.helper.make_tensor("q", onnx.TensorProto.INT4, values.shape, pack_int4(values), raw=True),
        onnx.numpy_helper.from_array(np.ascontiguousarray(w.scale.T), "s"),
    ]
    out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, values.shape)
    graph = onnx.helper.make_graph(nodes, "dq", [], [out], inits)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {})[0], w.dequantize().T)


# --- graph fidelity -----------------------------------------------------------------------------------------


def test_graph_reproduces_the_dequantized_model(
    converted_all: ConvertedModel, reference_logits: npt.NDArray[np.float32]
) -> None:
    """With fp32 activations (accuracy level 0) the ONNX graph is the numpy oracle, to float rounding."""
    logits = _run_all_positions(converted_all, CHATML_WITH_SYSTEM, accuracy_level=0)
    corr = _pearson_per_row(logits, reference_logits)
    assert corr.min() >= 0.999
    assert np.mean(logits.argmax(-1) == reference_logits.argmax(-1)) >= 0.95
    np.testing.assert_allclose(logits, reference_logits, atol=5e-3)


def test_fast_int8_activation_path_stays_close(
    converted_all: ConvertedModel, reference_logits: npt.NDArray[np.float32]
) -> None:
    """ORT's int8-activation GEMMs (accuracy level 4) add noise; this bounds it so a regression shows."""
    logits = _run_all_positions(converted_all, CHATML_WITH_SYSTEM, accuracy_level=4)
    corr = _pearson_per_row(logits, reference_logits)
    assert corr.min() >= 0.995
    assert np.median(corr) >= 0.998
    assert np.mean(logits.argmax(-1) == reference_logits.argmax(-1)) >= 0.85


def test_tiny_mixed_quant_model_matches_reference(tiny_gguf: Path, tmp_path: Path) -> None:
    """Q4_0, Q4_1, Q8_0, F16 and F32 tensors, GQA and an untied head, against the oracle."""
    converted = ensure_converted(tiny_gguf, tmp_path, logits="all", flavour="standard")
    assert not converted.config.tied_embeddings
    ids = [1, 17, 200, 3, 99, 45, 45, 7, 255, 0]
    logits = _run_all_positions(converted, ids, accuracy_level=0)
    np.testing.assert_allclose(logits, ReferenceLlama(tiny_gguf).forward(ids), rtol=1e-4, atol=1e-4)


def test_linear_rope_scaling_matches_reference(tmp_path: Path) -> None:
    scaled = TinySpec(extra_kv={"{arch}.rope.scaling.type": "linear", "{arch}.rope.scaling.factor": 4.0})
    path = write_tiny_gguf(tmp_path / "linear.gguf", scaled)
    converted = ensure_converted(path, tmp_path, logits="all", flavour="standard")
    assert converted.config.rope_scale == 0.25
    ids = [5, 6, 7, 8, 9, 10, 11, 12]
    logits = _run_all_positions(converted, ids, accuracy_level=0)
    np.testing.assert_allclose(logits, ReferenceLlama(path).forward(ids), rtol=1e-4, atol=1e-4)


def test_graph_uses_only_standard_opset_21_ops(converted_last: ConvertedModel) -> None:
    proto = onnx.load(str(converted_last.model_path), load_external_data=False)
    assert {(o.domain, o.version) for o in proto.opset_import} == {("", 21)}
    assert {n.domain for n in proto.graph.node} == {""}
    int4 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 210  # every Q4_1 matrix stays 4-bit; nothing was widened or requantized
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in int4)
    onnx.checker.check_model(str(converted_last.model_path))


# --- the cache ----------------------------------------------------------------------------------------------


def test_cache_layout_and_meta(converted_last: ConvertedModel, model_cache: Path) -> None:
    entry = converted_last.directory
    assert entry.parent.parent == model_cache / "onnx"
    assert entry.name == "standard-last"
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "model.onnx", "model.onnx.data"]
    cfg = converted_last.config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.tied_embeddings) == (1, 2, True)
    assert ConvertedModel.load(entry) == converted_last


def test_second_call_reuses_the_entry(smollm2_gguf: Path, model_cache: Path, converted_last: ConvertedModel) -> None:
    stages: list[str] = []
    mtime = converted_last.data_path.stat().st_mtime_ns
    again = ensure_converted(
        smollm2_gguf, model_cache, progress=lambda stage, done, total: stages.append(stage), flavour="standard"
    )
    assert again == converted_last
    assert set(stages) <= {"hash"}
    assert converted_last.data_path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("flavour", ["standard", "fused"])
def test_progress_reports_every_tensor(tiny_gguf: Path, tmp_path: Path, flavour: GraphFlavour) -> None:
    calls: list[tuple[str, int, int]] = []
    ensure_converted(tiny_gguf, tmp_path, sha256="ab" * 32, progress=lambda *a: calls.append(a), flavour=flavour)
    repacks = [c for c in calls if c[0] == "repack"]
    n_tensors = 2 * 9 + 3  # untied: token_embd, output_norm, output
    assert repacks[-1] == ("repack", n_tensors, n_tensors)
    assert [c[1] for c in repacks] == list(range(1, n_tensors + 1))
    assert calls[-1][0] == "write"


def test_interrupted_conversion_leaves_no_entry(tiny_gguf: Path, tmp_path: Path) -> None:
    def explode(stage: str, done: int, total: int) -> None:
        if stage == "repack" and done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_converted(tiny_gguf, tmp_path, progress=explode)
    assert list((tmp_path / "onnx").iterdir()) == []  # neither the entry nor the temp dir survives

    converted = ensure_converted(tiny_gguf, tmp_path)
    assert converted.model_path.is_file()
    assert converted.meta_path.is_file()


def test_stale_entry_from_an_older_converter_is_replaced(tiny_gguf: Path, tmp_path: Path) -> None:
    first = ensure_converted(tiny_gguf, tmp_path)
    current = f'"converter_version": "{CONVERTER_VERSION}"'
    meta = first.meta_path.read_text().replace(current, '"converter_version": "0"')
    assert current not in meta
    first.meta_path.write_text(meta)
    second = ensure_converted(tiny_gguf, tmp_path)
    assert current in second.meta_path.read_text()
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == [first.directory.parent.name]


def test_crashed_conversion_temp_dir_is_cleaned(tiny_gguf: Path, tmp_path: Path) -> None:
    dead = tmp_path / "onnx" / ".tmp-999999999-crashed"  # no such pid
    dead.mkdir(parents=True)
    ensure_converted(tiny_gguf, tmp_path)
    assert not dead.exists()


# --- refusals -----------------------------------------------------------------------------------------------


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "qwen.gguf", TinySpec(arch="qwen2"))
    with pytest.raises(ModelFormatError, match="qwen2"):
        ensure_converted(path, tmp_path / "cache")
    assert not (tmp_path / "cache" / "onnx").exists() or not any((tmp_path / "cache" / "onnx").iterdir())


def test_unsupported_tensor_type_is_refused(tmp_path: Path) -> None:
    spec = TinySpec()
    path = write_tiny_gguf(tmp_path / "q5.gguf", TinySpec(qtypes={**spec.qtypes, "ffn_up": Q.Q5_0}))
    with pytest.raises(ModelFormatError, match="Q5_0"):
        GgufModel(path)


def test_unsupported_rope_scaling_is_refused(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "yarn.gguf", TinySpec(extra_kv={"{arch}.rope.scaling.type": "yarn"}))
    with pytest.raises(ModelFormatError, match="yarn"):
        GgufModel(path)


def test_not_a_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(os.urandom(256))
    with pytest.raises(ModelFormatError):
        GgufModel(path)
