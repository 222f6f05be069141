"""Build the fused decoder graph for ONNX Runtime's CPU provider: com.microsoft contrib ops, exact int4/int8 weights.

Every weight stays exactly what GGUF stored. GGUF blocks map onto `MatMulNBits`'s symmetric form (no zero-point
input, so the kernel's default zero point 2^(bits-1) applies, which is its fastest path): Q4_0/Q4_1 values q-8 become
uint4 q with scale d, Q8_0 values q become uint8 q+128. Q4_1's block minimum (offset m+8d per block) is added back
as blocksum(x) @ offset^T, where the block sums come out of the same MatMulNBits: one extra output row per input
block, all ones on that block (exact in int4). With int8 activations (accuracy level 4) those are sums of the
quantized activations, which is exactly llama.cpp's Q8_1 "s" term; one Gemm then adds the correction. Q/K/V and
gate/up share one MatMulNBits each (their blocks concatenated along N, which changes no value). Activations are
token-major [tokens, features] (Gemm needs 2-D); attention is `GroupQueryAttention` over [batch, seq, features]
with rotary embedding inside and a fixed-capacity KV cache that the executor binds as both past and present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from onnx import ModelProto, TensorProto, ValueInfoProto, helper

from engines.base import ProgressFn
from engines.convert.external import ExternalDataWriter
from engines.convert.gguf_model import GgufModel, GgufTensor, LlamaConfig
from engines.convert.graph import (
    BATCH,
    INPUT_IDS,
    IR_VERSION,
    OPSET,
    SEQ,
    GraphBuilder,
    LogitsMode,
    past_names,
    present_names,
)
from engines.convert.repack import BLOCK, BlockWeight, pack_int4, repack

MS_DOMAIN = "com.microsoft"
SEQLENS_K = "seqlens_k"  # int32 [batch]: tokens each row holds after this step, minus one
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # int32 scalar: the largest of seqlens_k + 1
CAPACITY = "kv_capacity"  # symbolic KV dimension: the executor's buffer size, not a sequence length
DEFAULT_ACCURACY_LEVEL = 4  # MatMulNBits computes with int8-quantized activations, as llama.cpp does for Q4/Q8


@dataclass(frozen=True)
class _Packed:
    """One MatMulNBits weight: initializer names, shape, and the Q4_1 correction (offsets [in/32, out]) if any.

    With a correction, the weight has n + k/32 rows: the last k/32 compute the input's block sums.
    """

    b: str
    scale: str
    n: int
    k: int
    bits: int
    offset_t: npt.NDArray[np.float32] | None

    @property
    def rows(self) -> int:
        """Output features of the MatMulNBits node."""
        return self.n + (0 if self.offset_t is None else self.k // BLOCK)


class FusedBuilder(GraphBuilder):
    """GraphBuilder plus contrib-op helpers; the tied head reuses the embedding's uint8 table."""

    def __init__(self, writer: ExternalDataWriter, progress: ProgressFn | None, total: int) -> None:
        super().__init__(writer, progress, total)
        self._shared: dict[tuple[str, ...], _Packed] = {}
        self.accuracy_level = DEFAULT_ACCURACY_LEVEL

    def ms(
        self, op_type: str, inputs: list[str], hint: str, *, outputs: int = 1, out: str | None = None, **attrs: Any
    ) -> list[str]:
        """Append a com.microsoft node; returns its output names (`outputs` of them, the first named `out`)."""
        self._count += 1
        node_name = f"{hint}/{op_type}_{self._count}"
        names = [f"{node_name}:{j}" for j in range(outputs)]
        if out is not None:
            names[0] = out
        self.nodes.append(helper.make_node(op_type, inputs, names, name=node_name, domain=MS_DOMAIN, **attrs))
        return names

    def pack(self, tensors: list[GgufTensor], *, with_scale: bool = True) -> _Packed | None:
        """Concatenate block weights along N into one MatMulNBits weight; None if their types cannot share one.

        `with_scale=False` writes only the values (an embedding table whose rows are gathered, not multiplied).
        """
        key = tuple(t.name for t in tensors)
        if key in self._shared:
            return self._shared[key]
        weights = [repack(t) for t in tensors]
        blocks = [w for w in weights if isinstance(w, BlockWeight)]
        if len(blocks) != len(weights) or len({(w.bits, w.shape[1]) for w in blocks}) != 1:
            return None
        bits = blocks[0].bits
        values = np.concatenate([w.values for w in blocks], axis=0)  # [N, K]
        n, k = (int(d) for d in values.shape)
        nb = k // BLOCK
        scale = np.concatenate([w.scale for w in blocks], axis=0)
        offset_t = None
        if any(w.offset is not None for w in blocks):
            offsets = [w.offset if w.offset is not None else np.zeros_like(w.scale) for w in blocks]
            offset_t = np.ascontiguousarray(np.concatenate(offsets, axis=0).T)
            # Block-sum rows: row j is 1 on input block j and 0 elsewhere (values 1/0, scales 1 on block j).
            eye = np.eye(nb, dtype=np.float32)
            values = np.concatenate([values, np.repeat(eye, BLOCK, axis=1).astype(np.int8)])
            scale = np.concatenate([scale, eye])
        base = "+".join(key)
        rows = int(values.shape[0])
        unsigned = (values.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)  # default zero point 2^(bits-1)
        if bits == 4:
            raw = pack_int4(unsigned.view(np.int8))  # low nibble first, along K: MatMulNBits' blob layout
            self.inits.append(self._writer.tensor(f"{base}.nbits", TensorProto.UINT8, (rows, nb, BLOCK // 2), raw))
        else:
            self.weight(f"{base}.nbits", unsigned.reshape(rows, nb, BLOCK))
        if with_scale:
            self.weight(f"{base}.scale", np.ascontiguousarray(scale))
        packed = _Packed(f"{base}.nbits", f"{base}.scale", n, k, bits, offset_t)
        if "token_embd.weight" in key:
            self._shared[key] = packed  # read again by a tied head
        return packed

    def nbits_linear(self, x: str, tensors: list[GgufTensor], hint: str, *, out: str | None = None) -> str:
        """x @ concat(W_i)^T along the last axis: one MatMulNBits (+ Q4_1 correction) where the types allow."""
        for _ in tensors:
            self.tick()
        return self._linear(x, tensors, hint, out)

    def _linear(self, x: str, tensors: list[GgufTensor], hint: str, out: str | None) -> str:
        packed = self.pack(tensors)
        if packed is None and len(tensors) > 1:
            # Mixed types (the tiny test model mixes Q4/Q8/F16 on purpose): one matmul each, then concatenate.
            parts = [self._linear(x, [t], hint, None) for t in tensors]
            return self.op("Concat", parts, hint, out=out, axis=-1)
        if packed is None:
            w = repack(tensors[0])
            assert not isinstance(w, BlockWeight)
            return self.op("MatMul", [x, self.weight(f"{tensors[0].name}.T", np.ascontiguousarray(w.T))], hint, out=out)
        attrs: dict[str, Any] = {"K": packed.k, "N": packed.rows, "bits": packed.bits, "block_size": BLOCK}
        attrs["accuracy_level"] = self.accuracy_level
        if packed.offset_t is None:
            return self.ms("MatMulNBits", [x, packed.b, packed.scale], hint, out=out, **attrs)[0]
        full = self.ms("MatMulNBits", [x, packed.b, packed.scale], hint, **attrs)[0]
        y, sums = self.split(full, [packed.n, packed.rows - packed.n], hint)
        offset = self.weight(f"{packed.b[: -len('.nbits')]}.offset", packed.offset_t)
        return self.op("Gemm", [sums, offset, y], hint, out=out)  # y + sums @ offset^T, x being [tokens, K]

    def split(self, x: str, sizes: list[int], hint: str) -> list[str]:
        """Split the last axis of x into parts of `sizes`."""
        self._count += 1
        name = f"{hint}/Split_{self._count}"
        outs = [f"{name}:{j}" for j in range(len(sizes))]
        self.nodes.append(helper.make_node("Split", [x, self.ints(*sizes)], outs, name=name, axis=-1))
        return outs

    def embedding_q8(self, ids: str, t: GgufTensor, *, tied: bool) -> str:
        """Q8_0 rows through GatherBlockQuantized, over the same uint8 table a tied head's MatMulNBits reads."""
        self.tick()
        w = repack(t)
        assert isinstance(w, BlockWeight)
        assert w.bits == 8
        packed = self.pack([t], with_scale=tied)
        assert packed is not None
        nb = packed.k // BLOCK
        scale3 = self.weight(f"{t.name}.row_scale", np.ascontiguousarray(w.scale).reshape(packed.n, nb, 1))
        rows = self.ms(
            "GatherBlockQuantized",
            [packed.b, ids, scale3],
            "/embed",
            bits=8,
            block_size=BLOCK,
            gather_axis=0,
            quantize_axis=2,
        )[0]
        return self.op("Reshape", [rows, self.ints(-1, packed.k)], "/embed")

    def skip_rms(self, x: str, skip: str, gamma: str, eps: float, hint: str) -> tuple[str, str]:
        """(RMSNorm(x + skip) * gamma, x + skip) in one SkipSimplifiedLayerNormalization."""
        out = self.ms("SkipSimplifiedLayerNormalization", [x, skip, gamma], hint, outputs=4, epsilon=eps)
        return out[0], out[3]

    def norm_weight(self, t: GgufTensor) -> str:
        """A float norm weight as an initializer."""
        w = repack(t)
        self.tick()
        assert not isinstance(w, BlockWeight), f"{t.name}: norm weights are never quantized"
        return self.weight(t.name, w)


def rope_cache(cfg: LlamaConfig) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """cos/sin [context_length, head_dim/2] for GroupQueryAttention, computed in float64 like the oracle."""
    hd = cfg.head_dim
    inv = cfg.rope_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    angle = np.arange(cfg.context_length, dtype=np.float64)[:, None] * cfg.rope_scale * inv[None, :]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def _embed(b: FusedBuilder, model: GgufModel) -> str:
    """Token embeddings, token-major [tokens, d]; a Q8_0 table is gathered in place (and shared by a tied head)."""
    cfg = model.config
    embd = model.tensor("token_embd.weight")
    if embd.qtype.name == "Q8_0":
        return b.embedding_q8(INPUT_IDS, embd, tied=cfg.tied_embeddings)
    return b.op("Reshape", [b.embedding(INPUT_IDS, embd), b.ints(-1, cfg.d_model)], "/embed")


def _attention(b: FusedBuilder, model: GgufModel, i: int, x: str, bsx: str, rope: tuple[str, str]) -> str:
    """Layer i's attention on the normed input x: packed Q/K/V, GroupQueryAttention (rotary inside), output proj."""
    cfg = model.config
    p, hint = f"blk.{i}.", f"/blk{i}/attn"
    qkv = b.nbits_linear(x, [model.tensor(p + f"attn_{w}.weight") for w in "qkv"], hint)
    past_k, past_v = past_names(i)
    pres_k, pres_v = present_names(i)
    b._count += 1
    gqa = f"{hint}/GroupQueryAttention_{b._count}"
    attn = f"{gqa}:0"
    b.nodes.append(
        helper.make_node(
            "GroupQueryAttention",
            [b.op("Reshape", [qkv, bsx], hint), "", "", past_k, past_v, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, *rope],
            [attn, pres_k, pres_v],
            name=gqa,
            domain=MS_DOMAIN,
            num_heads=cfg.n_heads,
            kv_num_heads=cfg.n_kv_heads,
            do_rotary=1,
            rotary_interleaved=1,  # GGUF permuted Q/K rows so rotary pairs are adjacent (llama.cpp NORM)
        )
    )
    attn = b.op("Reshape", [attn, b.ints(-1, cfg.d_model)], hint)
    return b.nbits_linear(attn, [model.tensor(p + "attn_output.weight")], hint)


def _swiglu_ffn(b: FusedBuilder, model: GgufModel, i: int, x: str) -> str:
    """Layer i's SwiGLU on the normed input x: gate and up in one packed MatMulNBits, split, then down."""
    p, hint, d_ff = f"blk.{i}.", f"/blk{i}/ffn", model.config.d_ff
    gu = b.nbits_linear(x, [model.tensor(p + "ffn_gate.weight"), model.tensor(p + "ffn_up.weight")], hint)
    gate, up = b.split(gu, [d_ff, d_ff], hint)
    act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate], hint)], hint), up], hint)
    return b.nbits_linear(act, [model.tensor(p + "ffn_down.weight")], hint)


def _layers(b: FusedBuilder, model: GgufModel, h: str, bsx: str, rope: tuple[str, str]) -> str:
    """Every decoder layer; returns the final-normed hidden state.

    Each residual add is fused with the norm after it (SkipSimplifiedLayerNormalization), so a layer's FFN norm
    and the next layer's attention norm (or the final norm) close the attention and FFN blocks.
    """
    cfg = model.config
    eps = cfg.rms_eps
    # Standard ops for this one norm (ONNX Runtime fuses them into SimplifiedLayerNormalization): that op lives in
    # the default domain but is not ONNX, so onnx.checker would reject the graph.
    x = b.rms_norm(h, model.tensor("blk.0.attn_norm.weight"), eps, "/blk0/attn")
    for i in range(cfg.n_layers):
        o = _attention(b, model, i, x, bsx, rope)
        x, h = b.skip_rms(o, h, b.norm_weight(model.tensor(f"blk.{i}.ffn_norm.weight")), eps, f"/blk{i}/ffn")
        d = _swiglu_ffn(b, model, i, x)
        last = i + 1 == cfg.n_layers
        nxt = "output_norm.weight" if last else f"blk.{i + 1}.attn_norm.weight"
        x, h = b.skip_rms(d, h, b.norm_weight(model.tensor(nxt)), eps, "/head" if last else f"/blk{i + 1}/attn")
    return x


def _lm_head(b: FusedBuilder, model: GgufModel, x: str, bsx: str, logits: LogitsMode) -> None:
    """lm_head (the embedding table when tied) on the normed hidden state, written to the `logits` output."""
    cfg = model.config
    head = model.tensor("token_embd.weight" if cfg.tied_embeddings else "output.weight")
    if logits == "last":
        # Only the last position feeds sampling: one head row per sequence, however long the prompt.
        big = np.iinfo(np.int64).max
        x = b.op("Reshape", [x, bsx], "/head")
        x = b.op("Slice", [x, b.ints(-1), b.const(np.array([big], np.int64)), b.ints(1)], "/head")
        y = b.nbits_linear(b.op("Reshape", [x, b.ints(-1, cfg.d_model)], "/head"), [head], "/head")
        b.op("Reshape", [y, b.ints(-1, 1, cfg.vocab_size)], "/head", out="logits")
    else:
        b.op("Reshape", [b.nbits_linear(x, [head], "/head"), bsx], "/head", out="logits")


def _graph_io(cfg: LlamaConfig, logits: LogitsMode) -> tuple[list[ValueInfoProto], list[ValueInfoProto]]:
    """Inputs (ids, sequence lengths, KV buffers per layer) and outputs (logits, the same KV buffers' new state)."""
    n_kv, hd = cfg.n_kv_heads, cfg.head_dim
    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, [BATCH, SEQ]),
        helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, [BATCH]),
        helper.make_tensor_value_info(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, [BATCH, 1 if logits == "last" else SEQ, cfg.vocab_size])]
    for i in range(cfg.n_layers):
        inputs += [helper.make_tensor_value_info(n, f32, [BATCH, n_kv, CAPACITY, hd]) for n in past_names(i)]
        outputs += [helper.make_tensor_value_info(n, f32, [BATCH, n_kv, CAPACITY, hd]) for n in present_names(i)]
    return inputs, outputs


def build_fused_graph(
    model: GgufModel, writer: ExternalDataWriter, *, logits: LogitsMode, progress: ProgressFn | None = None
) -> ModelProto:
    """The whole decoder with contrib ops; inputs input_ids, seqlens_k, total_sequence_length and the KV buffers."""
    cfg = model.config
    total = model.n_tensors + (1 if cfg.tied_embeddings else 0)
    b = FusedBuilder(writer, progress, total)
    h = _embed(b, model)  # [tokens, d]
    cos, sin = rope_cache(cfg)
    rope = b.weight("rope.cos", cos), b.weight("rope.sin", sin)
    # [batch, seq, -1]: the shape GroupQueryAttention (and the logits) need around the token-major activations
    bsx = b.op("Concat", [b.op("Shape", [INPUT_IDS], "/shape"), b.ints(-1)], "/shape", axis=0)
    x = _layers(b, model, h, bsx, rope)
    _lm_head(b, model, x, bsx, logits)
    graph = helper.make_graph(b.nodes, "llama_decoder_fused", *_graph_io(cfg, logits), b.inits)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        ir_version=IR_VERSION,
        producer_name="thox-engines.convert",
    )
