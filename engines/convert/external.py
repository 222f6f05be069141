"""Stream initializers into an ONNX external-data file as they are made, so weights are never held twice."""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
from onnx import TensorProto

# Large tensors start on a page boundary so ONNX Runtime can map them; small ones only need SIMD alignment.
_PAGE = 4096
_SMALL_ALIGN = 64
_PAGE_ALIGN_FROM = 64 * 1024

_NUMPY_TO_ONNX: dict[np.dtype[np.generic], int] = {
    np.dtype("<f4"): TensorProto.FLOAT,
    np.dtype("int8"): TensorProto.INT8,
    np.dtype("uint8"): TensorProto.UINT8,
    np.dtype("<i8"): TensorProto.INT64,
}


class ExternalDataWriter:
    """Appends tensor bytes to one data file and hands back `TensorProto`s that point into it."""

    def __init__(self, file: BinaryIO, location: str) -> None:
        self._file = file
        self._location = location  # relative to model.onnx, which ONNX Runtime resolves against the model's dir
        self._offset = 0

    def tensor(self, name: str, data_type: int, dims: tuple[int, ...], raw: bytes) -> TensorProto:
        """Write `raw` (already in ONNX little-endian layout) and return an initializer referring to it."""
        align = _PAGE if len(raw) >= _PAGE_ALIGN_FROM else _SMALL_ALIGN
        pad = -self._offset % align
        if pad:
            self._file.write(b"\0" * pad)
            self._offset += pad
        self._file.write(raw)
        t = TensorProto()
        t.name = name
        t.data_type = data_type
        t.dims.extend(dims)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self._location),
            ("offset", str(self._offset)),
            ("length", str(len(raw))),
        ):
            entry = t.external_data.add()
            entry.key = key
            entry.value = value
        self._offset += len(raw)
        return t

    def array(self, name: str, array: npt.NDArray[np.generic]) -> TensorProto:
        """Write a numpy array (float32, int8, uint8 or int64)."""
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        onnx_type = _NUMPY_TO_ONNX.get(np.dtype(dtype))
        if onnx_type is None:
            raise TypeError(f"{name}: no ONNX type for numpy dtype {array.dtype}")
        raw = np.ascontiguousarray(array, dtype=dtype).tobytes()
        return self.tensor(name, onnx_type, tuple(int(d) for d in array.shape), raw)

    def sync(self) -> None:
        """Flush and fsync, so the file is durable before its directory is renamed into the cache."""
        self._file.flush()
        os.fsync(self._file.fileno())
