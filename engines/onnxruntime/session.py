"""ONNX Runtime sessions for converted llama graphs: thread settings and the int8-activation accuracy switch."""

from __future__ import annotations

import onnx
import onnxruntime as ort

from engines.convert import ConvertedModel
from engines.convert.fused import DEFAULT_ACCURACY_LEVEL

ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def make_session(model: ConvertedModel, threads: int, accuracy_level: int) -> ort.InferenceSession:
    """A CPU session over `model` with `threads` intra-op threads.

    `accuracy_level` is MatMulNBits' minimum activation precision: 4 quantizes activations to int8 inside the
    int4/int8 GEMMs (several times faster on CPU; llama.cpp does the same for Q4/Q8 weights), 0 keeps fp32 and
    reproduces the dequantized model to float rounding. The standard graph gets it through ORT's DQ+MatMul ->
    MatMulNBits fusion; the fused graph carries it as a node attribute, rewritten here when it differs. Level 0 is
    a fidelity mode, not a serving mode: ORT's fp32 kernel for the 8-bit (Q8_0) head takes ~150 ms per call.
    """
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, not {accuracy_level}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    providers = ["CPUExecutionProvider"]
    if model.graph != "fused" or accuracy_level == DEFAULT_ACCURACY_LEVEL:
        return ort.InferenceSession(str(model.model_path), so, providers=providers)
    # The graph proto is small (weights are external); patch it in memory and point ORT at the weights' folder.
    proto = onnx.load(str(model.model_path), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = accuracy_level
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model.directory))
    return ort.InferenceSession(proto.SerializeToString(), so, providers=providers)
