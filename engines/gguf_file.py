"""A small, fast, read-only GGUF (v2/v3, little-endian) parser: metadata and tensor infos, tensor bytes on demand.

`gguf.GGUFReader` builds a numpy view for every part of every metadata value (~150k for a 49k-token vocabulary),
which takes seconds; here string arrays are walked in one tight loop and numeric arrays are read with one
`numpy.frombuffer`, so opening a small model takes milliseconds. Tensor data stays in the memory map until used.
Strings decode exactly as gguf's reader decodes them (strict UTF-8), so tokenizers built from either see the same
text. Every malformed input is a `ModelFormatError` that says what was wrong and where.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from os import PathLike, fspath
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from engines.base import ModelFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# ggml tensors have at most 4 dimensions (GGML_MAX_DIMS); llama.cpp refuses files with more, and so do we.
MAX_TENSOR_DIMS = 4
# Arrays of arrays are legal GGUF but no model nests them more than twice; a bound keeps a file of nothing but
# array headers from recursing until Python's stack runs out.
MAX_ARRAY_NESTING = 8
# ggml counts elements and bytes in int64; a shape beyond that cannot be addressed (and numpy cannot view it).
_MAX_TENSOR_SPAN = 2**63 - 1


class GgufValueType(IntEnum):
    """Metadata value types, numbered as in the GGUF specification."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


class GgmlTypeInfo(NamedTuple):
    """Name and storage of one ggml tensor type: `type_size` bytes hold `block_size` elements."""

    name: str
    block_size: int
    type_size: int


# ggml's tensor types (ggml.h `enum ggml_type`; numbers never change, gaps are removed types). Kept here rather
# than imported from `gguf`, whose import costs more than this whole parser; a test checks it against gguf's table.
GGML_TYPES: dict[int, GgmlTypeInfo] = {
    0: GgmlTypeInfo("F32", 1, 4),
    1: GgmlTypeInfo("F16", 1, 2),
    2: GgmlTypeInfo("Q4_0", 32, 18),
    3: GgmlTypeInfo("Q4_1", 32, 20),
    6: GgmlTypeInfo("Q5_0", 32, 22),
    7: GgmlTypeInfo("Q5_1", 32, 24),
    8: GgmlTypeInfo("Q8_0", 32, 34),
    9: GgmlTypeInfo("Q8_1", 32, 40),
    10: GgmlTypeInfo("Q2_K", 256, 84),
    11: GgmlTypeInfo("Q3_K", 256, 110),
    12: GgmlTypeInfo("Q4_K", 256, 144),
    13: GgmlTypeInfo("Q5_K", 256, 176),
    14: GgmlTypeInfo("Q6_K", 256, 210),
    15: GgmlTypeInfo("Q8_K", 256, 292),
    16: GgmlTypeInfo("IQ2_XXS", 256, 66),
    17: GgmlTypeInfo("IQ2_XS", 256, 74),
    18: GgmlTypeInfo("IQ3_XXS", 256, 98),
    19: GgmlTypeInfo("IQ1_S", 256, 50),
    20: GgmlTypeInfo("IQ4_NL", 32, 18),
    21: GgmlTypeInfo("IQ3_S", 256, 110),
    22: GgmlTypeInfo("IQ2_S", 256, 82),
    23: GgmlTypeInfo("IQ4_XS", 256, 136),
    24: GgmlTypeInfo("I8", 1, 1),
    25: GgmlTypeInfo("I16", 1, 2),
    26: GgmlTypeInfo("I32", 1, 4),
    27: GgmlTypeInfo("I64", 1, 8),
    28: GgmlTypeInfo("F64", 1, 8),
    29: GgmlTypeInfo("IQ1_M", 256, 56),
    30: GgmlTypeInfo("BF16", 1, 2),
    34: GgmlTypeInfo("TQ1_0", 256, 54),
    35: GgmlTypeInfo("TQ2_0", 256, 66),
    39: GgmlTypeInfo("MXFP4", 32, 17),
    40: GgmlTypeInfo("NVFP4", 64, 36),
    41: GgmlTypeInfo("Q1_0", 128, 18),
}

# Types whose data gguf's reader exposes as typed elements; all others (quantized, BF16) as raw bytes per row.
_ELEMENT_DTYPES: dict[int, str] = {0: "<f4", 1: "<f2", 24: "i1", 25: "<i2", 26: "<i4", 27: "<i8", 28: "<f8"}

_SCALARS: dict[int, struct.Struct] = {
    GgufValueType.UINT8: struct.Struct("<B"),
    GgufValueType.INT8: struct.Struct("<b"),
    GgufValueType.UINT16: struct.Struct("<H"),
    GgufValueType.INT16: struct.Struct("<h"),
    GgufValueType.UINT32: struct.Struct("<I"),
    GgufValueType.INT32: struct.Struct("<i"),
    GgufValueType.FLOAT32: struct.Struct("<f"),
    GgufValueType.BOOL: struct.Struct("<?"),
    GgufValueType.UINT64: struct.Struct("<Q"),
    GgufValueType.INT64: struct.Struct("<q"),
    GgufValueType.FLOAT64: struct.Struct("<d"),
}
_ARRAY_DTYPES: dict[int, str] = {
    GgufValueType.UINT8: "u1",
    GgufValueType.INT8: "i1",
    GgufValueType.UINT16: "<u2",
    GgufValueType.INT16: "<i2",
    GgufValueType.UINT32: "<u4",
    GgufValueType.INT32: "<i4",
    GgufValueType.FLOAT32: "<f4",
    GgufValueType.BOOL: "u1",  # read as bytes, then compared with 0, so any non-zero byte is True as in struct
    GgufValueType.UINT64: "<u8",
    GgufValueType.INT64: "<i8",
    GgufValueType.FLOAT64: "<f8",
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; `shape` is in GGUF order (`ne`: the fastest-varying dimension first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute position of the data in the file (the header's offset plus the data section start)
    n_elements: int
    n_bytes: int

    @property
    def type_name(self) -> str:
        """ggml's name of the tensor type, e.g. 'Q4_1'."""
        return GGML_TYPES[self.ggml_type].name


class _Undecodable:
    """Stands in for a metadata value whose text is not UTF-8; reading that key raises, as gguf's reader does."""

    def __init__(self, message: str) -> None:
        self.message = message


class GgufMetadata(Mapping[str, Any]):
    """Metadata key -> value: scalars and `str` as Python values, numeric arrays as read-only numpy arrays."""

    def __init__(self, values: dict[str, Any], types: dict[str, GgufValueType]) -> None:
        self._values = values
        self._types = types

    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        if isinstance(value, _Undecodable):
            raise ModelFormatError(value.message)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def value_type(self, key: str) -> GgufValueType:
        """The stored type of a key's value (ARRAY for arrays of any element type)."""
        return self._types[key]


class _Parser:
    """Reads GGUF header structures out of a read-only buffer, checking every length against its end."""

    def __init__(self, buf: mmap.mmap, label: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.label = label

    def truncated(self, what: str, off: int) -> ModelFormatError:
        return ModelFormatError(
            f"{self.label}: GGUF is truncated or corrupt: {what} at byte {off} runs past "
            f"the end of the file ({self.size} bytes)"
        )

    def u32(self, off: int, what: str) -> int:
        if off + 4 > self.size:
            raise self.truncated(what, off)
        return int(_U32.unpack_from(self.buf, off)[0])

    def u64(self, off: int, what: str) -> int:
        if off + 8 > self.size:
            raise self.truncated(what, off)
        return int(_U64.unpack_from(self.buf, off)[0])

    def text(self, off: int, what: str) -> tuple[str | _Undecodable, int]:
        n = self.u64(off, what)
        start = off + 8
        if n > self.size - start:
            raise self.truncated(f"{what} ({n}-byte string)", off)
        try:
            return self.buf[start : start + n].decode("utf-8"), start + n
        except UnicodeDecodeError as exc:
            return _Undecodable(f"{self.label}: {what} at byte {off} is not valid UTF-8 ({exc})"), start + n

    def string(self, off: int, what: str) -> tuple[str, int]:
        value, off = self.text(off, what)
        if isinstance(value, _Undecodable):
            raise ModelFormatError(value.message)
        return value, off

    def value(self, vtype: int, off: int, what: str) -> tuple[Any, int]:
        scalar = _SCALARS.get(vtype)
        if scalar is not None:
            if off + scalar.size > self.size:
                raise self.truncated(what, off)
            return scalar.unpack_from(self.buf, off)[0], off + scalar.size
        if vtype == GgufValueType.STRING:
            return self.text(off, what)
        if vtype == GgufValueType.ARRAY:
            return self.array(off, what)
        raise ModelFormatError(f"{self.label}: {what} at byte {off} has unknown value type {vtype}")

    def array(self, off: int, what: str, depth: int = 1) -> tuple[Any, int]:
        if depth > MAX_ARRAY_NESTING:
            raise ModelFormatError(
                f"{self.label}: {what} at byte {off} nests arrays more than {MAX_ARRAY_NESTING} deep; "
                "the file is corrupt or not a model"
            )
        item_type = self.u32(off, f"{what} (array type)")
        count = self.u64(off + 4, f"{what} (array length)")
        off += 12
        left = self.size - off
        dtype = _ARRAY_DTYPES.get(item_type)
        if dtype is not None:
            itemsize = np.dtype(dtype).itemsize
            if count > left // itemsize:
                raise self.truncated(f"{what} ({count} items)", off)
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=off)
            # Copied out of the map (metadata is small): a kept token-type array must not pin the whole file.
            out = arr != 0 if item_type == GgufValueType.BOOL else arr.astype(arr.dtype.newbyteorder("="))
            out.flags.writeable = False
            return out, off + count * itemsize
        if item_type == GgufValueType.STRING:
            if count > left // 8:
                raise self.truncated(f"{what} ({count} strings)", off)
            return self.strings(off, count, what)
        if item_type == GgufValueType.ARRAY:
            if count > left // 12:
                raise self.truncated(f"{what} ({count} arrays)", off)
            items: list[Any] = []
            for i in range(count):
                item, off = self.array(off, f"{what}[{i}]", depth + 1)
                items.append(item)
            # Every item is read (to find where the value ends) before one that failed to decode spoils it.
            bad = next((item for item in items if isinstance(item, _Undecodable)), None)
            return (items if bad is None else bad), off
        raise ModelFormatError(f"{self.label}: {what} at byte {off - 12} has unknown array item type {item_type}")

    def strings(self, off: int, count: int, what: str) -> tuple[list[str] | _Undecodable, int]:
        # The hot path (a vocabulary is ~100k strings), so locals only; a length field past the end makes
        # unpack_from raise struct.error, caught once outside the loop.
        buf, size = self.buf, self.size
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        start = off
        try:
            for _ in range(count):
                end = off + 8 + unpack(buf, off)[0]
                if end > size:
                    break
                append(buf[off + 8 : end].decode("utf-8"))
                off = end
        except struct.error:
            pass
        except UnicodeDecodeError as exc:
            message = f"{self.label}: {what} item {len(out)} is not valid UTF-8 ({exc})"
            return _Undecodable(message), self.skip_strings(start, count, what)
        if len(out) < count:
            raise self.truncated(f"{what} (string {len(out)} of {count})", off)
        return out, off

    def skip_strings(self, off: int, count: int, what: str) -> int:
        for i in range(count):
            n = self.u64(off, f"{what} (string {i} of {count})")
            off += 8 + n
        if off > self.size:
            raise self.truncated(f"{what} (string {count - 1} of {count})", off)
        return off


class GgufFile:
    """An opened GGUF: `metadata`, `tensors` (in file order) and lazy `tensor_data`.

    String arrays come back as `list[str]` and arrays of arrays as lists; callers must not modify them. The file
    stays mapped while this object or any array from `tensor_data` is alive.
    """

    def __init__(self, path: str | PathLike[str]) -> None:
        self.path = fspath(path)
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as exc:  # mmap refuses empty files
                raise ModelFormatError(f"{self.path}: not a GGUF file ({exc})") from exc
        p = _Parser(self._map, self.path)
        magic = self._map[:4]
        if magic != GGUF_MAGIC:  # the magic is the same bytes in either byte order
            raise ModelFormatError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        version = p.u32(4, "version")
        if version & 0xFFFF == 0 and version >> 16:
            # gguf's own check: a small version number read with the wrong byte order lands in the high half.
            raise ModelFormatError(f"{self.path}: big-endian GGUF (version {version >> 24}) is not supported")
        if version not in SUPPORTED_VERSIONS:
            raise ModelFormatError(
                f"{self.path}: GGUF version {version} is not supported (supported: {list(SUPPORTED_VERSIONS)})"
            )
        self.version = version
        n_tensors = p.u64(8, "tensor count")
        n_kv = p.u64(16, "metadata count")
        self.metadata, off = self._read_metadata(p, n_kv, 24)
        tensors, off = self._read_tensor_infos(p, n_tensors, off)
        self.alignment = self._alignment()
        self.data_offset = off + (-off % self.alignment)
        self.tensors: Mapping[str, TensorInfo] = self._place_tensors(tensors)

    def _read_metadata(self, p: _Parser, count: int, off: int) -> tuple[GgufMetadata, int]:
        if count > (p.size - off) // 13:  # each entry takes at least a key length, a type and a 1-byte value
            raise p.truncated(f"metadata ({count} entries)", off)
        values: dict[str, Any] = {}
        types: dict[str, GgufValueType] = {}
        for i in range(count):
            key, off = p.string(off, f"metadata entry {i} key")
            if key in values:
                raise ModelFormatError(f"{self.path}: metadata key {key!r} appears twice")
            vtype = p.u32(off, f"type of metadata {key!r}")
            values[key], off = p.value(vtype, off + 4, f"metadata {key!r}")  # refuses unknown types
            types[key] = GgufValueType(vtype)
        return GgufMetadata(values, types), off

    def _read_tensor_infos(self, p: _Parser, count: int, off: int) -> tuple[list[TensorInfo], int]:
        if count > (p.size - off) // 24:  # name length, dim count, type and offset at least
            raise p.truncated(f"tensor infos ({count} tensors)", off)
        infos: list[TensorInfo] = []
        for i in range(count):
            name, off = p.string(off, f"tensor {i} name")
            n_dims = p.u32(off, f"tensor {name!r} dimension count")
            off += 4
            if n_dims > (p.size - off) // 8:
                raise p.truncated(f"tensor {name!r} dimensions ({n_dims})", off)
            if n_dims > MAX_TENSOR_DIMS:
                raise ModelFormatError(
                    f"{self.path}: tensor {name!r} has {n_dims} dimensions; ggml tensors have at most {MAX_TENSOR_DIMS}"
                )
            shape = struct.unpack_from(f"<{n_dims}Q", self._map, off)
            off += 8 * n_dims
            ggml_type = p.u32(off, f"tensor {name!r} type")
            rel_offset = p.u64(off + 4, f"tensor {name!r} offset")
            off += 12
            kind = GGML_TYPES.get(ggml_type)
            if kind is None:
                raise ModelFormatError(f"{self.path}: tensor {name!r} has unknown ggml type {ggml_type}")
            n_elements, span = 1, kind.type_size
            for d in shape:
                n_elements *= d
                span *= max(d, 1)  # zero dimensions too: numpy must still be able to shape an empty view
            if span > _MAX_TENSOR_SPAN:
                raise ModelFormatError(
                    f"{self.path}: tensor {name!r} shape {list(shape)} is too large for ggml to address "
                    "(more than 2**63 bytes); the file is corrupt"
                )
            row = shape[0] if shape else 1  # a 0-dimensional tensor is one element, as in ggml
            if row % kind.block_size:
                raise ModelFormatError(
                    f"{self.path}: tensor {name!r} row length {row} is not a multiple of the "
                    f"{kind.name} block size {kind.block_size}"
                )
            n_bytes = n_elements // kind.block_size * kind.type_size
            infos.append(TensorInfo(name, shape, ggml_type, rel_offset, n_elements, n_bytes))
        return infos, off

    def _alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        value = self.metadata["general.alignment"]
        if self.metadata.value_type("general.alignment") != GgufValueType.UINT32:
            raise ModelFormatError(f"{self.path}: general.alignment must be a uint32")
        if value == 0 or value & (value - 1):
            raise ModelFormatError(f"{self.path}: general.alignment {value} is not a power of two")
        return int(value)

    def _place_tensors(self, infos: list[TensorInfo]) -> dict[str, TensorInfo]:
        size = len(self._map)
        placed: dict[str, TensorInfo] = {}
        for t in infos:
            if t.name in placed:
                raise ModelFormatError(f"{self.path}: tensor {t.name!r} appears twice")
            start = self.data_offset + t.offset
            if start + t.n_bytes > size:
                raise ModelFormatError(
                    f"{self.path}: GGUF is truncated: tensor {t.name!r} ({t.n_bytes} bytes at byte {start}) runs "
                    f"past the end of the file ({size} bytes)"
                )
            placed[t.name] = TensorInfo(t.name, t.shape, t.ggml_type, start, t.n_elements, t.n_bytes)
        return placed

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key, or `default` when absent."""
        return self.metadata.get(key, default)

    def tensor_data(self, name: str) -> npt.NDArray[Any]:
        """A tensor's data as a read-only view of the file, shaped as gguf's reader shapes it.

        Float and integer tensors come as elements in numpy order (GGUF `ne` reversed); quantized (and BF16)
        tensors as uint8 with the last dimension in bytes per row. Pages are read only when touched.
        """
        t = self.tensors[name]
        shape = t.shape[::-1]
        dtype = _ELEMENT_DTYPES.get(t.ggml_type)
        if dtype is None:
            kind = GGML_TYPES[t.ggml_type]
            if shape:
                shape = (*shape[:-1], shape[-1] // kind.block_size * kind.type_size)
            arr = np.frombuffer(self._map, dtype=np.uint8, count=t.n_bytes, offset=t.offset)
        else:
            arr = np.frombuffer(self._map, dtype=dtype, count=t.n_elements, offset=t.offset)
        return arr.reshape(shape)
