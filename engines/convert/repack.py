"""Exact repacking of GGUF quantized blocks into ONNX blockwise int4/int8 form (never requantization)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType

from engines.base import ModelFormatError
from engines.convert.gguf_model import GgufTensor

BLOCK = 32  # Q4_0, Q4_1 and Q8_0 all quantize 32 consecutive input features per block

Int8Array = npt.NDArray[np.int8]
F32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class BlockWeight:
    """A block-quantized matrix in GGUF orientation [out, in]: W = values*scale (+ offset) per 32-block.

    For Q4_1 (w = d*q + m with q in 0..15) we store values = q - 8, scale = d and offset = m + 8d, so the
    values are symmetric int4 that every int4 kernel accepts and the offset becomes a cheap correction term:
    x @ W^T = x @ (values*scale)^T + blocksum(x) @ offset^T.
    """

    values: Int8Array  # [out, in], in [-8, 7] for bits=4 and [-128, 127] for bits=8
    scale: F32Array  # [out, in // 32]
    offset: F32Array | None  # [out, in // 32], Q4_1 only
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in)."""
        out, inp = self.values.shape
        return int(out), int(inp)

    def dequantize(self) -> F32Array:
        """The float32 matrix [out, in] this represents (used by tests to prove exactness)."""
        out, inp = self.shape
        blocks = self.values.reshape(out, inp // BLOCK, BLOCK).astype(np.float32) * self.scale[:, :, None]
        if self.offset is not None:
            blocks = blocks + self.offset[:, :, None]
        return blocks.reshape(out, inp)


def _blocks(t: GgufTensor, type_size: int) -> npt.NDArray[np.uint8]:
    out, inp = _matrix_shape(t)
    if inp % BLOCK:
        raise ModelFormatError(f"tensor {t.name!r}: row length {inp} is not a multiple of {BLOCK}")
    raw = np.ascontiguousarray(t.data).view(np.uint8)
    return raw.reshape(out, inp // BLOCK, type_size)


def _matrix_shape(t: GgufTensor) -> tuple[int, int]:
    if len(t.shape) != 2:
        raise ModelFormatError(f"tensor {t.name!r}: expected a matrix, got shape {t.shape}")
    return t.shape[0], t.shape[1]


def _fp16(b: npt.NDArray[np.uint8]) -> F32Array:
    # fp16 -> fp32 is exact, so scales keep every bit GGUF stored
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    # ggml packs element j in the low nibble of byte j and element j+16 in the high nibble
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def repack_q4_1(t: GgufTensor) -> BlockWeight:
    """Q4_1 (d, m fp16; 32 x 4-bit q): w = d*(q-8) + (m + 8d)."""
    b = _blocks(t, 20)
    d, m = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
    q = _nibbles(b[..., 4:20]).astype(np.int8) - np.int8(8)
    out, inp = _matrix_shape(t)
    return BlockWeight(values=q.reshape(out, inp), scale=d, offset=m + np.float32(8.0) * d, bits=4)


def repack_q4_0(t: GgufTensor) -> BlockWeight:
    """Q4_0 (d fp16; 32 x 4-bit q): w = d*(q-8), already symmetric."""
    b = _blocks(t, 18)
    q = _nibbles(b[..., 2:18]).astype(np.int8) - np.int8(8)
    out, inp = _matrix_shape(t)
    return BlockWeight(values=q.reshape(out, inp), scale=_fp16(b[..., 0:2]), offset=None, bits=4)


def repack_q8_0(t: GgufTensor) -> BlockWeight:
    """Q8_0 (d fp16; 32 x int8 q): w = d*q."""
    b = _blocks(t, 34)
    q = np.ascontiguousarray(b[..., 2:34]).view(np.int8)
    out, inp = _matrix_shape(t)
    return BlockWeight(values=q.reshape(out, inp), scale=_fp16(b[..., 0:2]), offset=None, bits=8)


def repack(t: GgufTensor) -> BlockWeight | F32Array:
    """A tensor as a `BlockWeight` (quantized types) or a float32 array (F32/F16), bit-exact either way."""
    if t.qtype == GGMLQuantizationType.Q4_1:
        return repack_q4_1(t)
    if t.qtype == GGMLQuantizationType.Q4_0:
        return repack_q4_0(t)
    if t.qtype == GGMLQuantizationType.Q8_0:
        return repack_q8_0(t)
    if t.qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(t.data, dtype="<f4").reshape(t.shape)
    if t.qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(t.data).view("<f2").astype(np.float32).reshape(t.shape)
    raise ModelFormatError(f"tensor {t.name!r}: type {t.qtype.name} cannot be repacked exactly")


def pack_int4(values: Int8Array) -> bytes:
    """ONNX INT4 raw bytes: consecutive elements share a byte, the first in the low nibble."""
    flat = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = (flat[0::2] & np.uint8(0x0F)) | ((flat[1::2] & np.uint8(0x0F)) << np.uint8(4))
    return packed.tobytes()
