"""The fast GGUF parser: the same metadata, tensor infos and bytes as `gguf.GGUFReader`, and clean refusals."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from engines.base import ModelFormatError
from engines.gguf_file import GGML_TYPES, GgufFile, GgufValueType


def plain(value: Any) -> Any:
    """Our value in the shape gguf's `contents()` gives: numpy arrays as lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# --- the bundled model against gguf's own reader ----------------------------------------------------------


@pytest.fixture(scope="module")
def reader(smollm2_gguf: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="module")
def ours(smollm2_gguf: Path) -> GgufFile:
    return GgufFile(smollm2_gguf)


def test_every_metadata_value_matches_gguf_reader(reader: gguf.GGUFReader, ours: GgufFile) -> None:
    theirs = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(theirs)
    for key, field in theirs.items():
        value = ours.metadata[key]
        assert plain(value) == field.contents(), key
        assert type(plain(value)) is type(field.contents()), key
        assert int(ours.metadata.value_type(key)) == field.types[0], key
        if isinstance(value, np.ndarray):
            assert value.dtype == reader.gguf_scalar_to_np[field.types[-1]], key
    assert ours.version == reader.fields["GGUF.version"].contents()
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(ours.metadata["tokenizer.ggml.merges"]) == 48900


def test_every_tensor_info_and_byte_matches_gguf_reader(reader: gguf.GGUFReader, ours: GgufFile) -> None:
    assert ours.data_offset == reader.data_offset
    assert ours.alignment == reader.alignment
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(t.shape.tolist()), t.name
        assert info.ggml_type == t.tensor_type, t.name
        assert info.type_name == t.tensor_type.name, t.name
        assert (info.offset, info.n_elements, info.n_bytes) == (t.data_offset, t.n_elements, t.n_bytes), t.name
        data = ours.tensor_data(t.name)
        assert (data.shape, data.dtype) == (t.data.shape, t.data.dtype), t.name
        assert np.array_equal(data, t.data), t.name


def test_tensor_data_is_a_read_only_view(ours: GgufFile) -> None:
    data = ours.tensor_data("output_norm.weight")
    assert not data.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        data[0] = 1.0


def test_ggml_type_table_matches_gguf() -> None:
    expected = {int(q): (q.name, *gguf.GGML_QUANT_SIZES[q]) for q in Q}
    assert {k: tuple(v) for k, v in GGML_TYPES.items()} == expected


# --- round trips through gguf's writer ----------------------------------------------------------------------

SCALARS: dict[str, tuple[V, Any]] = {
    "t.u8": (V.UINT8, 255),
    "t.i8": (V.INT8, -128),
    "t.u16": (V.UINT16, 65535),
    "t.i16": (V.INT16, -32768),
    "t.u32": (V.UINT32, 2**32 - 1),
    "t.i32": (V.INT32, -(2**31)),
    "t.f32": (V.FLOAT32, 0.1),
    "t.bool": (V.BOOL, True),
    "t.u64": (V.UINT64, 2**64 - 1),
    "t.i64": (V.INT64, -(2**63)),
    "t.f64": (V.FLOAT64, 0.1),
    "t.str": (V.STRING, "héllo 東京 😀\n\0end"),
}
NUMERIC_ARRAYS: dict[V, list[Any]] = {
    V.UINT8: [0, 1, 255],
    V.INT8: [-128, 0, 127],
    V.UINT16: [0, 65535],
    V.INT16: [-32768, 32767],
    V.UINT32: [0, 2**32 - 1],
    V.INT32: [-(2**31), 2**31 - 1],
    V.FLOAT32: [0.5, -1.25, 3.0e38],
    V.BOOL: [True, False, True],
    V.UINT64: [0, 2**64 - 1],
    V.INT64: [-(2**63), 2**63 - 1],
    V.FLOAT64: [0.1, -1e300],
}
STRINGS = ["<|im_start|>", "", "Ġthe", "東京", "😀 x"]
NESTED = [["a", "b"], ["ü"], ["", "c d"]]


@pytest.fixture
def typed_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(path, "test")
    for key, (vtype, value) in SCALARS.items():
        w.add_key_value(key, value, vtype)
    for vtype, values in NUMERIC_ARRAYS.items():
        w.add_key_value(f"a.{vtype.name}", values, V.ARRAY, sub_type=vtype)
    w.add_array("a.strings", STRINGS)
    w.add_array("a.nested", NESTED)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_value_type_round_trips(typed_gguf: Path) -> None:
    meta = GgufFile(typed_gguf).metadata
    assert meta["general.architecture"] == "test"
    for key, (vtype, value) in SCALARS.items():
        expected = float(np.float32(value)) if vtype == V.FLOAT32 else value
        assert meta[key] == expected, key
        assert type(meta[key]) is type(value), key
        assert int(meta.value_type(key)) == vtype, key
    for vtype, values in NUMERIC_ARRAYS.items():
        arr = meta[f"a.{vtype.name}"]
        assert isinstance(arr, np.ndarray), vtype
        assert arr.dtype == gguf.GGUFReader.gguf_scalar_to_np[vtype], vtype
        expected = np.asarray(values, dtype=np.float32).tolist() if vtype == V.FLOAT32 else values
        assert arr.tolist() == expected, vtype
        assert not arr.flags.writeable
    assert meta["a.strings"] == STRINGS
    assert meta["a.nested"] == NESTED
    assert meta.value_type("a.nested") == GgufValueType.ARRAY


def test_writer_file_matches_gguf_reader(typed_gguf: Path) -> None:
    theirs = gguf.GGUFReader(typed_gguf).fields
    meta = GgufFile(typed_gguf).metadata
    for key in meta:
        if key != "a.nested":  # gguf's reader flattens arrays of arrays; we keep the nesting
            assert plain(meta[key]) == theirs[key].contents(), key


def test_tensors_round_trip_with_custom_alignment(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    f16 = rng.standard_normal((4, 8)).astype(np.float16)
    i32 = np.arange(7, dtype=np.int32)
    q41 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), Q.Q4_1)
    path = tmp_path / "tensors.gguf"
    w = gguf.GGUFWriter(path, "test")
    w.add_custom_alignment(64)
    w.add_tensor("f32", f32)
    w.add_tensor("f16", f16)
    w.add_tensor("i32", i32)
    w.add_tensor("q41", q41, raw_dtype=Q.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    f = GgufFile(path)
    assert f.alignment == 64
    assert f.data_offset % 64 == 0
    assert all(t.offset % 64 == 0 for t in f.tensors.values())
    for name, arr in (("f32", f32), ("f16", f16), ("i32", i32), ("q41", q41)):
        got = f.tensor_data(name)
        assert got.dtype == arr.dtype, name
        np.testing.assert_array_equal(got, arr, err_msg=name)
    assert f.tensors["q41"].shape == (64, 2)
    assert f.tensors["q41"].type_name == "Q4_1"
    assert (f.tensors["q41"].n_elements, f.tensors["q41"].n_bytes) == (128, 4 * 20)
    assert f.tensors["f32"].shape == (5, 3)


# --- refusals -----------------------------------------------------------------------------------------------


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def _tensor(name: str, dims: tuple[int, ...], ggml_type: int = 0, offset: int = 0) -> bytes:
    return _str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def _gguf(kvs: list[bytes], tensors: list[bytes] | None = None, data: bytes = b"", version: int = 3) -> bytes:
    tensors = tensors or []
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
    return head + bytes(-len(head) % 32) + data


Writer = Callable[[bytes], Path]


@pytest.fixture
def write(tmp_path: Path) -> Writer:
    """Writes bytes to one scratch file and returns its path."""
    path = tmp_path / "bad.gguf"

    def _write(content: bytes) -> Path:
        path.write_bytes(content)
        return path

    return _write


def test_hand_built_file_parses(write: Writer) -> None:
    f = GgufFile(
        write(
            _gguf(
                [_kv("a", V.UINT32, struct.pack("<I", 7)), _kv("e", V.ARRAY, struct.pack("<IQ", V.STRING, 0))],
                [_tensor("w", (2, 2))],
                data=struct.pack("<4f", 1, 2, 3, 4),
            )
        )
    )
    assert f.metadata["a"] == 7
    assert f.metadata["e"] == []
    assert f.tensor_data("w").tolist() == [[1, 2], [3, 4]]


def test_truncated_real_header_is_refused_at_every_cut(smollm2_gguf: Path, ours: GgufFile, write: Writer) -> None:
    with smollm2_gguf.open("rb") as fh:
        head = fh.read(ours.data_offset + 4096)
    cuts = [*range(0, 64), *range(64, 2048, 61)]
    cuts += [int(ours.data_offset * frac) for frac in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 0.99)]
    cuts += [ours.data_offset - 5000, ours.data_offset - 1, ours.data_offset, ours.data_offset + 4096]
    for cut in cuts:
        with pytest.raises(ModelFormatError, match="GGUF|truncated"):
            GgufFile(write(head[:cut]))


def test_absurd_string_length_in_the_real_vocabulary_is_refused(smollm2_gguf: Path, write: Writer) -> None:
    with smollm2_gguf.open("rb") as fh:
        head = bytearray(fh.read(4 << 20))
    key = b"tokenizer.ggml.tokens"
    first_len = head.index(key) + len(key) + 4 + 4 + 8  # value type, item type, count
    assert struct.unpack_from("<Q", head, first_len)[0] == len(b"<|endoftext|>")
    for bad in (2**40, 2**64 - 1):
        struct.pack_into("<Q", head, first_len, bad)
        with pytest.raises(ModelFormatError, match=r"tokenizer\.ggml\.tokens.*past the end"):
            GgufFile(write(bytes(head)))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not a GGUF"),
        (b"GGML" + bytes(60), "magic"),
        (_gguf([], version=1), "version 1 is not supported"),
        (_gguf([], version=4), "version 4 is not supported"),
        (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**60), "metadata"),
        (b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0), "tensor infos"),
        (_gguf([struct.pack("<Q", 2**63) + b"key"]), "metadata entry 0 key"),
        (_gguf([_kv("s", V.STRING, struct.pack("<Q", 1000) + b"short")]), "'s'"),
        (_gguf([_kv("a", V.ARRAY, struct.pack("<IQ", V.UINT32, 2**40))]), "'a'"),
        (_gguf([_kv("a", V.ARRAY, struct.pack("<IQ", V.STRING, 2) + _str("x") + struct.pack("<Q", 99))]), "'a'"),
        (_gguf([_kv("a", V.ARRAY, struct.pack("<IQ", V.ARRAY, 2**50))]), "'a'"),
        (_gguf([_kv("x", 13, b"\0" * 8)]), "'x' .*unknown value type 13"),
        (_gguf([_kv("x", V.ARRAY, struct.pack("<IQ", 99, 1))]), "'x' .*unknown array item type 99"),
        (_gguf([_kv("k", V.UINT8, b"\1"), _kv("k", V.UINT8, b"\2")]), "'k' appears twice"),
        (_gguf([_kv(b"\xff\xfe", V.UINT8, b"\1")]), "not valid UTF-8"),
        (_gguf([_kv("general.alignment", V.UINT32, struct.pack("<I", 48))]), "not a power of two"),
        (_gguf([_kv("general.alignment", V.UINT64, struct.pack("<Q", 64))]), "must be a uint32"),
        (_gguf([], [_str("w") + struct.pack("<I", 2**31)]), "'w' dimensions"),
        (_gguf([], [_tensor("w", (4,), ggml_type=5)]), "'w' has unknown ggml type 5"),
        (_gguf([], [_tensor("w", (33,), ggml_type=Q.Q4_0)], data=bytes(64)), "not a multiple"),
        (_gguf([], [_tensor("w", (4,)), _tensor("w", (4,))], data=bytes(16)), "'w' appears twice"),
        (_gguf([], [_tensor("w", (4,))], data=bytes(15)), "'w'.*past the end"),
        (_gguf([], [_tensor("w", (4,), offset=2**63)], data=bytes(16)), "'w'.*past the end"),
    ],
)
def test_malformed_file_is_refused(write: Writer, content: bytes, match: str) -> None:
    with pytest.raises(ModelFormatError, match=match):
        GgufFile(write(content))


def test_undecodable_text_fails_only_when_read(write: Writer) -> None:
    bad_array = struct.pack("<IQ", V.STRING, 3) + _str("ok") + _str(b"\xc3") + _str("fine")
    nested = struct.pack("<IQ", V.ARRAY, 3) + bad_array + bad_array + struct.pack("<IQ", V.UINT8, 1) + b"\1"
    content = _gguf(
        [
            _kv("s", V.STRING, _str(b"a\xffb")),
            _kv("a", V.ARRAY, bad_array),
            _kv("nested", V.ARRAY, nested),
            _kv("n", V.UINT8, b"\5"),
        ]
    )
    meta = GgufFile(write(content)).metadata
    assert meta["n"] == 5  # parsing went on past every bad value
    with pytest.raises(ModelFormatError, match=r"'nested'\[0\] item 1 is not valid UTF-8"):
        meta["nested"]
    with pytest.raises(ModelFormatError, match="'s' .*not valid UTF-8"):
        meta.get("s")
    with pytest.raises(ModelFormatError, match="'a' item 1 is not valid UTF-8"):
        meta["a"]
