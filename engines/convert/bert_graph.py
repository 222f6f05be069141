"""Build the standard-ops ONNX graph of a BERT sentence encoder: token ids + mask in, pooled unit vectors out.

The node patterns follow what PyTorch exports for Hugging Face's BertModel (post-LayerNorm, erf GELU, additive
`(1 - mask) * -10000` attention mask, Q/K/V as separate MatMul+Add). ONNX Runtime's load-time optimizer fuses
the GELU with its bias (BiasGelu) and the attention scale into the MatMul (its SkipLayerNormalization fusion
needs a fixed sequence length, so it does not apply); its offline optimizer
(onnxruntime.transformers) recognises every layer as Attention + SkipLayerNormalization, which was measured and
is no faster on CPU, where the matrix products dominate. TensorRT reads the same unfused graph. Mean pooling
over the mask and L2 normalisation (sentence-transformers' Pooling and Normalize modules) are part of the graph,
so it outputs finished embeddings.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from onnx import ModelProto, TensorProto, helper

from engines.base import ProgressFn
from engines.convert.external import ExternalDataWriter
from engines.convert.onnx_builder import OnnxBuilder

# Opset 17 is the first with LayerNormalization; nothing here needs a later op, and older parsers (TensorRT 10.x
# on JetPack 6) read it. ORT fuses the same nodes at opset 17 and 21.
ENCODER_OPSET = 17
ENCODER_IR_VERSION = 8
BATCH, SEQ = "batch_size", "sequence_length"
INPUT_IDS, ATTENTION_MASK, OUTPUT = "input_ids", "attention_mask", "sentence_embedding"

# Hugging Face BERT's additive mask value (transformers 4.x export), the constant ORT's attention fusion expects;
# exp(-10000) is exactly 0 in float32, so masked keys get no weight.
_MASK_VALUE = -10000.0

# Returns one weight as float32 in the checkpoint's layout (Linear weights as [out, in]).
WeightFn = Callable[[str], npt.NDArray[np.float32]]


class _Builder(OnnxBuilder):
    """The encoder's builder: checkpoint tensors in, float32 initializers out."""

    def __init__(self, writer: ExternalDataWriter, weights: WeightFn, progress: ProgressFn | None, total: int):
        super().__init__(writer, progress, total, "convert")
        self._weights = weights

    def f32(self, value: float) -> str:
        """An inline float32 scalar."""
        return self.const(np.array(value, dtype=np.float32), "f32")

    def weight(self, name: str, array: npt.NDArray[np.float32] | None = None, *, transpose: bool = False) -> str:
        """A checkpoint tensor (or a derived `array`) written to the external-data file."""
        a = self._weights(name) if array is None else array
        if transpose:
            a = a.T  # Linear stores [out, in]; MatMul wants [in, out]
        self.inits.append(self._writer.array(name, np.ascontiguousarray(a, dtype=np.float32)))
        self.tick()
        return name

    def linear(self, x: str, prefix: str, hint: str) -> str:
        """x @ W^T + b, as MatMul then Add (the order ORT's fusions match)."""
        y = self.op("MatMul", [x, self.weight(prefix + ".weight", transpose=True)], hint)
        return self.op("Add", [y, self.weight(prefix + ".bias")], hint)

    def layer_norm(self, x: str, prefix: str, eps: float, hint: str) -> str:
        """LayerNormalization over the hidden axis."""
        gamma, beta = self.weight(prefix + ".weight"), self.weight(prefix + ".bias")
        return self.op("LayerNormalization", [x, gamma, beta], hint, axis=-1, epsilon=eps)


def _embeddings(b: _Builder, weights: WeightFn, eps: float) -> str:
    """Word + position embeddings, then LayerNorm: [B, S, hidden]."""
    emb = "embeddings."
    # Every token type is 0 for single sentences, so token_type_embeddings[0] is folded into the position table.
    positions = weights(emb + "position_embeddings.weight") + weights(emb + "token_type_embeddings.weight")[0]
    seq_len = b.op("Shape", [INPUT_IDS], "/embed", start=1, end=2)
    pos = b.op(
        "Slice",
        [b.weight(emb + "position_embeddings.weight+token_type0", positions), b.ints(0), seq_len, b.ints(0)],
        "/embed",
    )
    words = b.op("Gather", [b.weight(emb + "word_embeddings.weight"), INPUT_IDS], "/embed")
    return b.layer_norm(b.op("Add", [words, pos], "/embed"), emb + "LayerNorm", eps, "/embed")


def _additive_mask(b: _Builder) -> str:
    """(1 - mask) * -10000 as [B, 1, 1, S], built once and shared by every layer."""
    m = b.op("Unsqueeze", [b.op("Unsqueeze", [ATTENTION_MASK, b.ints(1)], "/mask"), b.ints(2)], "/mask")
    m = b.op("Cast", [m], "/mask", to=TensorProto.FLOAT)
    return b.op("Mul", [b.op("Sub", [b.f32(1.0), m], "/mask"), b.f32(_MASK_VALUE)], "/mask")


def _self_attention(b: _Builder, i: int, h: str, mask: str, *, hidden: int, heads: int, eps: float) -> str:
    """Layer i's multi-head self-attention, output projection and post-LayerNorm (residual included)."""
    head_dim = hidden // heads
    p, hint = f"encoder.layer.{i}.", f"/layer{i}/attention"
    heads_shape = b.ints(0, 0, heads, head_dim)
    q = b.op("Reshape", [b.linear(h, p + "attention.self.query", hint), heads_shape], hint)
    k = b.op("Reshape", [b.linear(h, p + "attention.self.key", hint), heads_shape], hint)
    v = b.op("Reshape", [b.linear(h, p + "attention.self.value", hint), heads_shape], hint)
    q = b.op("Transpose", [q], hint, perm=[0, 2, 1, 3])  # [B, N, S, d]
    k = b.op("Transpose", [k], hint, perm=[0, 2, 3, 1])  # [B, N, d, S]
    v = b.op("Transpose", [v], hint, perm=[0, 2, 1, 3])
    scores = b.op("Div", [b.op("MatMul", [q, k], hint), b.f32(float(np.sqrt(head_dim)))], hint)
    probs = b.op("Softmax", [b.op("Add", [scores, mask], hint)], hint, axis=3)
    ctx = b.op("Transpose", [b.op("MatMul", [probs, v], hint)], hint, perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, b.ints(0, 0, hidden)], hint)
    out = b.linear(ctx, p + "attention.output.dense", hint)
    return b.layer_norm(b.op("Add", [out, h], hint), p + "attention.output.LayerNorm", eps, hint)


def _gelu_ffn(b: _Builder, i: int, h: str, eps: float) -> str:
    """Layer i's feed-forward (dense, exact GELU, dense) and post-LayerNorm (residual included)."""
    p, hint = f"encoder.layer.{i}.", f"/layer{i}/ffn"
    x = b.linear(h, p + "intermediate.dense", hint)
    # BERT's exact GELU, x * 0.5 * (1 + erf(x / sqrt 2)), in the op order ORT's Gelu fusion matches.
    erf = b.op("Erf", [b.op("Div", [x, b.f32(float(np.sqrt(2.0)))], hint)], hint)
    g = b.op("Mul", [b.op("Mul", [x, b.op("Add", [erf, b.f32(1.0)], hint)], hint), b.f32(0.5)], hint)
    out = b.linear(g, p + "output.dense", hint)
    return b.layer_norm(b.op("Add", [out, h], hint), p + "output.LayerNorm", eps, hint)


def _pool_and_normalize(b: _Builder, h: str) -> None:
    """Mean pooling over the mask and L2 normalisation, written to the `sentence_embedding` output."""
    # Mean over real tokens only; the 1e-9 floor is sentence-transformers' guard against an all-zero mask.
    hint = "/pool"
    mf = b.op("Unsqueeze", [b.op("Cast", [ATTENTION_MASK], hint, to=TensorProto.FLOAT), b.ints(-1)], hint)
    total = b.op("ReduceSum", [b.op("Mul", [h, mf], hint), b.ints(1)], hint, keepdims=0)
    count = b.op("Max", [b.op("ReduceSum", [mf, b.ints(1)], hint, keepdims=0), b.f32(1e-9)], hint)
    mean = b.op("Div", [total, count], hint)
    # torch.nn.functional.normalize: x / max(||x||, 1e-12).
    norm = b.op("Sqrt", [b.op("ReduceSum", [b.op("Mul", [mean, mean], hint), b.ints(-1)], hint, keepdims=1)], hint)
    b.nodes.append(
        helper.make_node("Div", [mean, b.op("Max", [norm, b.f32(1e-12)], hint)], [OUTPUT], name=f"{hint}/{OUTPUT}")
    )


def build_encoder_graph(
    writer: ExternalDataWriter,
    weights: WeightFn,
    *,
    hidden: int,
    heads: int,
    layers: int,
    eps: float,
    progress: ProgressFn | None = None,
) -> ModelProto:
    """The whole encoder: embeddings, `layers` x (self-attention + GELU FFN), mean pooling, L2 normalisation."""
    b = _Builder(writer, weights, progress, total=4 + 16 * layers)
    h = _embeddings(b, weights, eps)
    mask = _additive_mask(b)
    for i in range(layers):
        h = _self_attention(b, i, h, mask, hidden=hidden, heads=heads, eps=eps)
        h = _gelu_ffn(b, i, h, eps)
    _pool_and_normalize(b, h)
    graph = helper.make_graph(
        b.nodes,
        "bert_sentence_encoder",
        [
            helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, [BATCH, SEQ]),
            helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, [BATCH, SEQ]),
        ],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [BATCH, hidden])],
        b.inits,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ENCODER_OPSET)],
        ir_version=ENCODER_IR_VERSION,
        producer_name="thox-engines.convert",
    )
