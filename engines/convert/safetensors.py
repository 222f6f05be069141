"""Read a .safetensors file with numpy alone: tensors are zero-copy views of one read-only memory map.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to its dtype, shape
and byte range (relative to the end of the header), then the raw little-endian data. Reading it ourselves keeps
the `safetensors` package (and torch) off the device.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from engines.base import ModelFormatError

# A header this large would be a corrupt length field, not metadata; refuse it before reading it into memory.
_MAX_HEADER = 100 << 20

_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # numpy has no bfloat16: read the bits, widen in `float32`
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype name, shape and byte range inside the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _parse_entry(name: str, entry: Any, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise ModelFormatError(f"safetensors entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPES:
        raise ModelFormatError(f"safetensors tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ModelFormatError(f"safetensors tensor {name!r} has a bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise ModelFormatError(f"safetensors tensor {name!r} has bad data_offsets {offsets!r}")
    expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise ModelFormatError(
            f"safetensors tensor {name!r}: {offsets[1] - offsets[0]} bytes for {dtype} {shape} ({expected} expected)"
        )
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


class SafetensorsFile:
    """A memory-mapped .safetensors file; `array` returns read-only views that stay valid on their own."""

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with self.path.open("rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: mmap of an empty file
            raise ModelFormatError(f"{self.path}: cannot map the file ({exc})") from exc
        size = len(self._mm)
        if size < 8:
            raise ModelFormatError(f"{self.path}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", self._mm[:8])
        if header_len > min(_MAX_HEADER, size - 8):
            raise ModelFormatError(f"{self.path}: header length {header_len} does not fit the file")
        try:
            header = json.loads(self._mm[8 : 8 + header_len])
        except (UnicodeDecodeError, ValueError) as exc:
            raise ModelFormatError(f"{self.path}: header is not JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise ModelFormatError(f"{self.path}: header is not a JSON object")
        meta = header.pop("__metadata__", None)
        self.metadata: dict[str, str] = dict(meta) if isinstance(meta, dict) else {}
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self._tensors = {name: _parse_entry(name, entry, data_size) for name, entry in header.items()}

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    @property
    def names(self) -> list[str]:
        """Tensor names in header order."""
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        """Header entry of one tensor; ModelFormatError if absent."""
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelFormatError(f"{self.path}: no tensor {name!r}") from None

    def array(self, name: str) -> npt.NDArray[Any]:
        """The tensor in its stored dtype (BF16 as raw uint16 bits), a zero-copy read-only view."""
        t = self.info(name)
        dtype = _DTYPES[t.dtype]
        # frombuffer keeps the mmap alive through the view, so arrays outlive `close`.
        flat = np.frombuffer(
            self._mm, dtype=dtype, count=(t.end - t.begin) // dtype.itemsize, offset=self._data_start + t.begin
        )
        return flat.reshape(t.shape)

    def float32(self, name: str) -> npt.NDArray[np.float32]:
        """The tensor widened to float32 (a view when it is stored as F32)."""
        t = self.info(name)
        a = self.array(name)
        if t.dtype == "BF16":
            # bfloat16 is the top half of a float32
            return (a.astype(np.uint32) << 16).view(np.float32)
        if t.dtype not in ("F32", "F16", "F64"):
            raise ModelFormatError(f"{self.path}: tensor {name!r} is {t.dtype}, not floating point")
        return a if a.dtype == np.float32 else a.astype(np.float32)

    def close(self) -> None:
        """Unmap the file now, or, while array views remain, when the last of them is freed."""
        with contextlib.suppress(BufferError):
            self._mm.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
