"""Build the standard-ops (opset 21) ONNX decoder graph of a llama GGUF, with past/present KV cache I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from onnx import ModelProto, TensorProto, ValueInfoProto, helper

from engines.base import ProgressFn
from engines.convert.external import ExternalDataWriter
from engines.convert.gguf_model import GgufModel, GgufTensor, LlamaConfig
from engines.convert.onnx_builder import OnnxBuilder
from engines.convert.repack import BLOCK, BlockWeight, pack_int4, repack

LogitsMode = Literal["last", "all"]
OPSET = 21
IR_VERSION = 10  # the first IR with INT4; older parsers (TensorRT 10.x) still read it

# Symbolic dimension names, Optimum-style, so callers and TensorRT profiles can refer to them.
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
INPUT_IDS, POSITION_IDS = "input_ids", "position_ids"


def past_names(layer: int) -> tuple[str, str]:
    """Graph input names of one layer's cached keys and values."""
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    """Graph output names of one layer's keys and values after this step."""
    return f"present.{layer}.key", f"present.{layer}.value"


class GraphBuilder(OnnxBuilder):
    """The decoder graphs' builder: GGUF tensors in, exact int4 blocks and their corrections out."""

    def __init__(self, writer: ExternalDataWriter, progress: ProgressFn | None, total: int) -> None:
        super().__init__(writer, progress, total, "repack")
        self._blocksums: dict[tuple[str, int], str] = {}

    def weight(self, name: str, array: npt.NDArray[Any]) -> str:
        """A large initializer, written to the external-data file."""
        self.inits.append(self._writer.array(name, array))
        return name

    def int4(self, name: str, values: npt.NDArray[np.int8]) -> str:
        """An INT4 initializer from int8 values in [-8, 7]."""
        dims = tuple(int(d) for d in values.shape)
        self.inits.append(self._writer.tensor(name, TensorProto.INT4, dims, pack_int4(values)))
        return name

    def blocksum(self, x: str, width: int) -> str:
        """Sum of x over each 32-wide input block; shared by all projections that read the same x."""
        key = (x, width)
        if key not in self._blocksums:
            r = self.op("Reshape", [x, self.ints(0, 0, width // BLOCK, BLOCK)], x)
            self._blocksums[key] = self.op("ReduceSum", [r, self.ints(-1)], x, keepdims=0)
        return self._blocksums[key]

    def linear(self, x: str, t: GgufTensor, hint: str) -> str:
        """x @ W^T for a GGUF weight W [out, in]: blockwise DequantizeLinear + MatMul (+ Q4_1 offset term)."""
        w = repack(t)
        self.tick()
        if not isinstance(w, BlockWeight):
            return self.op("MatMul", [x, self.weight(f"{t.name}.T", np.ascontiguousarray(w.T))], hint)
        out, width = w.shape
        # MatMul wants W as [in, out]; blocks then run along axis 0, as DQ->MatMulNBits fusion expects
        values = np.ascontiguousarray(w.values.T)
        q = self.int4(f"{t.name}.q4", values) if w.bits == 4 else self.weight(f"{t.name}.q8", values)
        scale = self.weight(f"{t.name}.scale", np.ascontiguousarray(w.scale.T))
        wd = self.op("DequantizeLinear", [q, scale], hint, axis=0, block_size=BLOCK)
        y = self.op("MatMul", [x, wd], hint)
        if w.offset is not None:
            offset = self.weight(f"{t.name}.offset", np.ascontiguousarray(w.offset.T))
            y = self.op("Add", [y, self.op("MatMul", [self.blocksum(x, width), offset], hint)], hint)
        return y

    def embedding(self, ids: str, t: GgufTensor) -> str:
        """Rows of the token embedding; quantized tables are gathered as int8 and scaled after the Gather."""
        w = repack(t)
        self.tick()
        hint = "/embed"
        if not isinstance(w, BlockWeight):
            return self.op("Gather", [self.weight(t.name, w), ids], hint)
        _, width = w.shape
        rows = self.op("Gather", [self.weight(f"{t.name}.rows", w.values), ids], hint)
        e = self.op(
            "Reshape",
            [self.op("Cast", [rows], hint, to=TensorProto.FLOAT), self.ints(0, 0, width // BLOCK, BLOCK)],
            hint,
        )
        scale = self.op("Gather", [self.weight(f"{t.name}.row_scale", w.scale), ids], hint)
        e = self.op("Mul", [e, self.op("Unsqueeze", [scale, self.ints(-1)], hint)], hint)
        if w.offset is not None:
            off = self.op("Gather", [self.weight(f"{t.name}.row_offset", w.offset), ids], hint)
            e = self.op("Add", [e, self.op("Unsqueeze", [off, self.ints(-1)], hint)], hint)
        return self.op("Reshape", [e, self.ints(0, 0, width)], hint)

    def rms_norm(self, x: str, t: GgufTensor, eps: float, hint: str) -> str:
        """RMSNorm in the Pow/ReduceMean/Add/Sqrt/Div/Mul shape ONNX Runtime fuses into one kernel."""
        w = repack(t)
        self.tick()
        assert not isinstance(w, BlockWeight), f"{t.name}: norm weights are never quantized"
        sq = self.op("Pow", [x, self.const(np.array(2.0, np.float32))], hint)
        mean = self.op("ReduceMean", [sq, self.ints(-1)], hint, keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [mean, self.const(np.array(eps, np.float32))], hint)], hint)
        return self.op("Mul", [self.op("Div", [x, std], hint), self.weight(t.name, w)], hint)


def _rope_tables(
    cfg: LlamaConfig,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Per-column inverse frequencies, the sign pattern and the pair-swap matrix of llama.cpp's NORM rope.

    GGUF's converter permutes Q/K rows so that rotary pairs are adjacent: (x[2i], x[2i+1]) rotates by
    pos * base^(-2i/d). Writing rot(x) = x*cos + swap(x)*sign*sin keeps it to one small MatMul per projection.
    """
    hd = cfg.head_dim
    inv = cfg.rope_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd) * cfg.rope_scale
    inv_freq = np.repeat(inv, 2).astype(np.float32)
    sign = np.tile(np.array([-1.0, 1.0], np.float32), hd // 2)
    swap = np.zeros((hd, hd), np.float32)
    idx = np.arange(hd)
    swap[idx ^ 1, idx] = 1.0  # column j of (x @ swap) is x[j ^ 1]
    return inv_freq, sign, swap


@dataclass(frozen=True)
class _Rotary:
    """One step's rotary tables ([B, S, 1, hd]): the query's copies carry the 1/sqrt(head_dim) attention scale."""

    cos: str
    sin: str
    cos_q: str
    sin_q: str
    swap: str

    def rotate_q(self, b: GraphBuilder, q: str, hint: str) -> str:
        return self._rotate(b, q, self.cos_q, self.sin_q, hint)

    def rotate_k(self, b: GraphBuilder, k: str, hint: str) -> str:
        return self._rotate(b, k, self.cos, self.sin, hint)

    def _rotate(self, b: GraphBuilder, x: str, cos: str, sin: str, hint: str) -> str:
        # x*cos + swap(x)*sign*sin, the sign already folded into sin (see _rope_tables).
        return b.op(
            "Add",
            [b.op("Mul", [x, cos], hint), b.op("Mul", [b.op("MatMul", [x, self.swap], hint), sin], hint)],
            hint,
        )


def _rotary(b: GraphBuilder, cfg: LlamaConfig) -> _Rotary:
    """Rotary cos/sin computed once per step from the positions, shared by every layer."""
    inv_freq, sign, swap = _rope_tables(cfg)
    posf = b.op("Unsqueeze", [b.op("Cast", [POSITION_IDS], "/rope", to=TensorProto.FLOAT), b.ints(-1)], "/rope")
    angle = b.op("Mul", [posf, b.const(inv_freq, "inv_freq")], "/rope")
    cos = b.op("Unsqueeze", [b.op("Cos", [angle], "/rope"), b.ints(2)], "/rope")  # [B, S, 1, hd]
    sin = b.op(
        "Unsqueeze",
        [b.op("Mul", [b.op("Sin", [angle], "/rope"), b.const(sign)], "/rope"), b.ints(2)],
        "/rope",
    )
    qscale = b.const(np.array(1.0 / np.sqrt(cfg.head_dim), np.float32))
    cos_q, sin_q = b.op("Mul", [cos, qscale], "/rope"), b.op("Mul", [sin, qscale], "/rope")
    return _Rotary(cos, sin, cos_q, sin_q, b.const(swap, "rope_swap"))


def _causal_mask(b: GraphBuilder, group: int) -> str:
    """Additive mask over cache slots, shared by every layer: slot t is visible to the query at position p iff t <= p.

    Rows are tiled for the query heads sharing one KV head (layout [B, n_kv, group*S, T]).
    """
    past_len = b.op("Shape", [past_names(0)[0]], "/mask", start=2, end=3)
    new_len = b.op("Shape", [INPUT_IDS], "/mask", start=1, end=2)
    total_len = b.op("Squeeze", [b.op("Add", [past_len, new_len], "/mask")], "/mask")
    zero_i, one_i = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    slots = b.op("Range", [zero_i, total_len, one_i], "/mask")
    hidden = b.op("Greater", [slots, b.op("Unsqueeze", [POSITION_IDS, b.ints(-1)], "/mask")], "/mask")
    neg = b.const(np.array(np.finfo(np.float32).min, np.float32))
    mask = b.op("Where", [hidden, neg, b.const(np.array(0.0, np.float32))], "/mask")
    return b.op("Tile", [b.op("Unsqueeze", [mask, b.ints(1)], "/mask"), b.ints(1, 1, group, 1)], "/mask")


def _attention(b: GraphBuilder, model: GgufModel, i: int, h: str, rot: _Rotary, mask: str) -> str:
    """Layer i's pre-norm grouped-query self-attention over past + new KV; returns h plus its output."""
    cfg = model.config
    n_kv, hd = cfg.n_kv_heads, cfg.head_dim
    p, hint = f"blk.{i}.", f"/blk{i}/attn"
    xn = b.rms_norm(h, model.tensor(p + "attn_norm.weight"), cfg.rms_eps, hint)
    q = b.op(
        "Reshape",
        [b.linear(xn, model.tensor(p + "attn_q.weight"), hint), b.ints(0, 0, cfg.n_heads, hd)],
        hint,
    )
    k = b.op("Reshape", [b.linear(xn, model.tensor(p + "attn_k.weight"), hint), b.ints(0, 0, n_kv, hd)], hint)
    v = b.op("Reshape", [b.linear(xn, model.tensor(p + "attn_v.weight"), hint), b.ints(0, 0, n_kv, hd)], hint)
    q = b.op("Transpose", [rot.rotate_q(b, q, hint)], hint, perm=[0, 2, 1, 3])  # [B, H, S, hd]
    k = b.op("Transpose", [rot.rotate_k(b, k, hint)], hint, perm=[0, 2, 1, 3])  # [B, n_kv, S, hd]
    v = b.op("Transpose", [v], hint, perm=[0, 2, 1, 3])
    past_k, past_v = past_names(i)
    pres_k, pres_v = present_names(i)
    k = b.op("Concat", [past_k, k], hint, out=pres_k, axis=2)
    v = b.op("Concat", [past_v, v], hint, out=pres_v, axis=2)
    # Query head j uses KV head j // group, so [B, H, S, hd] regroups to [B, n_kv, group*S, hd] for free.
    qg = b.op("Reshape", [q, b.ints(0, n_kv, -1, hd)], hint)
    scores = b.op("MatMul", [qg, b.op("Transpose", [k], hint, perm=[0, 1, 3, 2])], hint)
    probs = b.op("Softmax", [b.op("Add", [scores, mask], hint)], hint, axis=-1)
    ctx = b.op("Reshape", [b.op("MatMul", [probs, v], hint), b.ints(0, cfg.n_heads, -1, hd)], hint)
    ctx = b.op("Reshape", [b.op("Transpose", [ctx], hint, perm=[0, 2, 1, 3]), b.ints(0, 0, cfg.d_model)], hint)
    return b.op("Add", [h, b.linear(ctx, model.tensor(p + "attn_output.weight"), hint)], hint)


def _swiglu_ffn(b: GraphBuilder, model: GgufModel, i: int, h: str) -> str:
    """Layer i's pre-norm SwiGLU feed-forward, down(silu(gate(x)) * up(x)); returns h plus its output."""
    p, hint = f"blk.{i}.", f"/blk{i}/ffn"
    xn = b.rms_norm(h, model.tensor(p + "ffn_norm.weight"), model.config.rms_eps, hint)
    gate = b.linear(xn, model.tensor(p + "ffn_gate.weight"), hint)
    up = b.linear(xn, model.tensor(p + "ffn_up.weight"), hint)
    act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate], hint)], hint), up], hint)
    return b.op("Add", [h, b.linear(act, model.tensor(p + "ffn_down.weight"), hint)], hint)


def _lm_head(b: GraphBuilder, model: GgufModel, h: str, logits: LogitsMode) -> None:
    """Final norm and lm_head (the embedding table when tied), written to the `logits` output."""
    cfg = model.config
    if logits == "last":
        # Only the last position feeds sampling; skipping the others keeps prefill's lm_head cost at one row.
        big = np.iinfo(np.int64).max
        h = b.op("Slice", [h, b.ints(-1), b.const(np.array([big], np.int64)), b.ints(1)], "/head")
    h = b.rms_norm(h, model.tensor("output_norm.weight"), cfg.rms_eps, "/head")
    head = model.tensor("token_embd.weight" if cfg.tied_embeddings else "output.weight")
    out = b.linear(h, head, "/head")
    b.nodes.append(helper.make_node("Identity", [out], ["logits"], name="/head/logits"))


def _graph_io(cfg: LlamaConfig, logits: LogitsMode) -> tuple[list[ValueInfoProto], list[ValueInfoProto]]:
    """Inputs (ids, positions, past KV per layer) and outputs (logits, present KV per layer)."""
    n_kv, hd = cfg.n_kv_heads, cfg.head_dim
    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, [BATCH, SEQ]),
        helper.make_tensor_value_info(POSITION_IDS, TensorProto.INT64, [BATCH, SEQ]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, [BATCH, 1 if logits == "last" else SEQ, cfg.vocab_size])]
    for i in range(cfg.n_layers):
        inputs += [helper.make_tensor_value_info(n, f32, [BATCH, n_kv, PAST, hd]) for n in past_names(i)]
        outputs += [helper.make_tensor_value_info(n, f32, [BATCH, n_kv, TOTAL, hd]) for n in present_names(i)]
    return inputs, outputs


def build_graph(
    model: GgufModel, writer: ExternalDataWriter, *, logits: LogitsMode, progress: ProgressFn | None = None
) -> ModelProto:
    """The whole decoder: embedding, n_layers x (attention + SwiGLU), final norm, lm_head (tied or not)."""
    cfg = model.config
    total = model.n_tensors + (1 if cfg.tied_embeddings else 0)
    b = GraphBuilder(writer, progress, total)
    h = b.embedding(INPUT_IDS, model.tensor("token_embd.weight"))
    rot = _rotary(b, cfg)
    mask = _causal_mask(b, cfg.n_heads // cfg.n_kv_heads)
    for i in range(cfg.n_layers):
        h = _attention(b, model, i, h, rot, mask)
        h = _swiglu_ffn(b, model, i, h)
    _lm_head(b, model, h, logits)
    graph = helper.make_graph(b.nodes, "llama_decoder", *_graph_io(cfg, logits), b.inits)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="thox-engines.convert",
    )
