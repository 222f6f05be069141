"""The fused graph flavour (ONNX Runtime contrib ops): fidelity against the numpy oracle, its ops, its cache entry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest

from engines.convert import ConvertedModel, ensure_converted, flavour_name
from engines.onnxruntime import OrtExecutor
from tests.engines.reference_llama import ReferenceLlama
from tests.engines.smollm2_prompts import CHATML_WITH_SYSTEM
from tests.engines.tiny_gguf import TinySpec, write_tiny_gguf

F32 = npt.NDArray[np.float32]

FUSED_OPS = {
    ("com.microsoft", "MatMulNBits"),
    ("com.microsoft", "GroupQueryAttention"),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"),
    ("com.microsoft", "GatherBlockQuantized"),
    ("", "Gemm"),  # y + blocksums @ offsets^T: the Q4_1 block-minimum correction
    ("", "Split"),  # block sums off the MatMulNBits output; gate from up
    ("", "Sigmoid"),  # SwiGLU
    ("", "Mul"),
    ("", "Reshape"),  # token-major activations <-> [batch, seq, features] around attention and the head
    ("", "Shape"),
    ("", "Concat"),
    ("", "Slice"),  # the last position, for the head
    # the first RMSNorm, which has no residual to fuse with (ONNX Runtime fuses these again)
    ("", "Pow"),
    ("", "ReduceMean"),
    ("", "Add"),
    ("", "Sqrt"),
    ("", "Div"),
}


def _all_positions(model: ConvertedModel, ids: list[int], accuracy_level: int) -> F32:
    ex = OrtExecutor(model, threads=2, accuracy_level=accuracy_level, max_batch=1)
    logits = ex.prefill_all(ex.new_sequence(), ids)
    ex.close()
    return logits


def _pearson_per_row(a: F32, b: F32) -> npt.NDArray[np.float64]:
    return np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True)])


def test_fused_graph_reproduces_the_dequantized_model(exact_executor: OrtExecutor, reference_logits: F32) -> None:
    """With fp32 activations the fused graph (GQA rotary, fused QKV/gate-up, exact Q4_1) is the oracle."""
    seq = exact_executor.new_sequence()
    logits = exact_executor.prefill_all(seq, CHATML_WITH_SYSTEM)
    exact_executor.release(seq)
    np.testing.assert_allclose(logits, reference_logits, atol=2e-3, rtol=0)  # measured: 2e-4
    assert _pearson_per_row(logits, reference_logits).min() >= 0.99999
    assert np.array_equal(logits.argmax(-1), reference_logits.argmax(-1))


def test_fused_int8_activation_path_stays_close(fused_all: ConvertedModel, reference_logits: F32) -> None:
    """Accuracy level 4 (the default) quantizes activations to int8 like llama.cpp; this bounds the drift."""
    logits = _all_positions(fused_all, CHATML_WITH_SYSTEM, accuracy_level=4)
    corr = _pearson_per_row(logits, reference_logits)
    assert corr.min() >= 0.99  # measured: 0.994
    assert np.median(corr) >= 0.998  # measured: 0.9989
    assert np.mean(logits.argmax(-1) == reference_logits.argmax(-1)) >= 0.9  # measured: 0.97


@pytest.mark.parametrize(
    "spec",
    [
        TinySpec(),  # mixed Q4_0/Q4_1/Q8_0/F16/F32: unfusable groups fall back to separate matmuls
        TinySpec(extra_kv={"{arch}.rope.scaling.type": "linear", "{arch}.rope.scaling.factor": 4.0}),
        TinySpec(tied=True, qtypes={**TinySpec().qtypes, "attn_k": TinySpec().qtypes["attn_q"]}),
    ],
    ids=["mixed-quant", "linear-rope", "tied-q4_1-qk"],
)
def test_tiny_fused_graphs_match_reference(spec: TinySpec, tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", spec)
    converted = ensure_converted(path, tmp_path, logits="all", flavour="fused")
    ids = [1, 17, 200, 3, 99, 45, 45, 7, 255, 0]
    logits = _all_positions(converted, ids, accuracy_level=0)
    np.testing.assert_allclose(logits, ReferenceLlama(path).forward(ids), rtol=1e-4, atol=1e-4)


def test_fused_graph_uses_only_its_ops_and_keeps_every_weight_quantized(fused_last: ConvertedModel) -> None:
    proto = onnx.load(str(fused_last.model_path), load_external_data=False)
    assert {(o.domain, o.version) for o in proto.opset_import} == {("", 21), ("com.microsoft", 1)}
    assert {(n.domain, n.op_type) for n in proto.graph.node} <= FUSED_OPS
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nbits]
    # 30 layers x (QKV, output, gate+up, down) in 4 bits, and the tied Q8_0 head in 8 bits
    assert sorted(a["bits"] for a in attrs) == [4] * 120 + [8]
    assert {a["accuracy_level"] for a in attrs} == {4}
    assert {a["block_size"] for a in attrs} == {32}
    assert sum(n.op_type == "GroupQueryAttention" for n in proto.graph.node) == 30
    # No weight was widened to float: the biggest float initializers are block scales and rope tables.
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert max(int(np.prod(t.dims)) for t in floats) <= 49152 * 18
    onnx.checker.check_model(str(fused_last.model_path))


def test_fused_cache_entry(fused_last: ConvertedModel, model_cache: Path) -> None:
    entry = fused_last.directory
    assert entry.parent.parent == model_cache / "onnx"
    assert entry.name == "fused-last"
    assert fused_last.graph == "fused"
    meta = json.loads(fused_last.meta_path.read_text())
    assert meta["domains"] == ["ai.onnx", "com.microsoft"]


def test_fused_is_the_default_flavour(tiny_gguf: Path, tmp_path: Path) -> None:
    assert flavour_name("last") == "fused-last"
    assert ensure_converted(tiny_gguf, tmp_path).directory.name == "fused-last"
    assert ensure_converted(tiny_gguf, tmp_path, flavour="standard").directory.name == "standard-last"
    with pytest.raises(ValueError, match="flavour"):
        flavour_name("last", "turbo")  # type: ignore[arg-type]  # an unknown flavour, on purpose
