"""Fuzzing the GGUF parser: any bytes are a parsed file or a ModelFormatError, quickly and in little memory."""

from __future__ import annotations

import itertools
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engines.base import ModelFormatError
from engines.gguf_file import GGML_TYPES, MAX_ARRAY_NESTING, GgufFile, GgufValueType
from tests.engines.tiny_gguf import TinySpec, write_tiny_gguf

V = GgufValueType
# Values that break naive length arithmetic: zero, one, word boundaries, the 2**40 / 2**62 "allocate this" claims.
EXTREME_U64 = [
    0,
    1,
    2,
    7,
    8,
    31,
    32,
    255,
    2**16,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**40,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 2,
    2**64 - 1,
]
EXTREME_U32 = [v for v in EXTREME_U64 if v < 2**32]
MAX_PEAK_BYTES = 50 * 2**20

Parse = Callable[[bytes], None]


def _str(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def _gguf(kvs: list[bytes], tensors: list[bytes], data: bytes = b"", version: int = 3) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
    return head + bytes(-len(head) % 32) + data


def check_parses_or_refuses(path: Path) -> None:
    """Open the file and touch everything it claims to have; only ModelFormatError may come out."""
    try:
        f = GgufFile(path)
    except ModelFormatError as exc:
        refusal = str(exc)
    else:
        refusal = ""
    if refusal:
        assert refusal.startswith(str(path)), refusal  # specific: the message names the file it is about
        return
    for key in f.metadata:
        f.metadata.value_type(key)
        try:
            f.metadata[key]
        except ModelFormatError as exc:  # text that is not UTF-8 fails only when read, as in gguf's reader
            refusal = str(exc)
        assert not refusal or "UTF-8" in refusal, refusal
    assert f.data_offset % f.alignment == 0
    for name, info in f.tensors.items():
        data = f.tensor_data(name)
        assert data.nbytes == info.n_bytes
        assert info.offset + info.n_bytes <= path.stat().st_size


@pytest.fixture(scope="module")
def parse(tmp_path_factory: pytest.TempPathFactory) -> Parse:
    """Write bytes to a fresh file (a mapped file must never change under a parser) and parse it."""
    folder = tmp_path_factory.mktemp("gguf-fuzz")
    counter = itertools.count()

    def _parse(content: bytes) -> None:
        path = folder / f"{next(counter)}.gguf"
        path.write_bytes(content)
        try:
            check_parses_or_refuses(path)
        finally:
            path.unlink()

    return _parse


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small, valid llama GGUF (with a string array, scalars and a mix of tensor types) as bytes."""
    spec = TinySpec(
        n_layers=1,
        d_model=32,
        d_ff=64,
        n_heads=2,
        n_kv_heads=1,
        vocab=32,
        extra_kv={"tokenizer.chat_template": "{{ messages }}"},
    )
    path = write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", spec)
    return path.read_bytes()


# --- unstructured bytes -------------------------------------------------------------------------------------

# Random bytes behind a valid magic and version, so the parser gets past the first check.
_HEADERED = st.builds(
    lambda version, tail: b"GGUF" + struct.pack("<I", version) + tail, st.sampled_from([2, 3]), st.binary(max_size=512)
)


@given(st.one_of(st.binary(max_size=256), _HEADERED))
def test_random_bytes_parse_or_are_refused(parse: Parse, content: bytes) -> None:
    parse(content)


@given(cut=st.integers(min_value=0, max_value=2**20))
def test_truncated_tiny_model_is_refused(parse: Parse, tiny: bytes, cut: int) -> None:
    parse(tiny[: cut % (len(tiny) + 1)])


@given(st.data())
def test_mutated_tiny_model_parses_or_is_refused(parse: Parse, tiny: bytes, data: st.DataObject) -> None:
    content = bytearray(tiny)
    header_end = min(len(content), 4096)  # mutations past the header only change tensor bytes, never parsing
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        at = data.draw(st.integers(0, header_end - 1), label="offset")
        kind = data.draw(st.sampled_from(["byte", "u32", "u64"]), label="kind")
        if kind == "byte":
            content[at] = data.draw(st.integers(0, 255), label="byte")
        elif kind == "u32" and at + 4 <= len(content):
            struct.pack_into("<I", content, at, data.draw(st.sampled_from(EXTREME_U32), label="u32"))
        elif at + 8 <= len(content):
            struct.pack_into("<Q", content, at, data.draw(st.sampled_from(EXTREME_U64), label="u64"))
    parse(bytes(content))


# --- structured files with extreme header fields ---------------------------------------------------------------

_u64 = st.one_of(st.sampled_from(EXTREME_U64), st.integers(0, 2**64 - 1))
_u32 = st.one_of(st.sampled_from(EXTREME_U32), st.integers(0, 2**32 - 1))
_vtype = st.one_of(st.sampled_from(list(V)), st.sampled_from([13, 255, 2**31, 2**32 - 1]))


@st.composite
def _string(draw: st.DrawFn) -> bytes:
    """A GGUF string: usually honest, sometimes with an absurd length or bytes that are not UTF-8."""
    raw = draw(st.one_of(st.text(max_size=8).map(str.encode), st.binary(max_size=8)))
    if draw(st.booleans()):
        return _str(raw)
    return struct.pack("<Q", draw(_u64)) + raw


@st.composite
def _value(draw: st.DrawFn, vtype: int, depth: int = 0) -> bytes:
    if vtype == V.STRING:
        return draw(_string())
    if vtype == V.ARRAY:
        item = draw(_vtype)
        count = draw(st.one_of(st.integers(0, 3), _u64))
        items = b"".join(draw(_value(item, depth + 1)) for _ in range(min(count, 3) if depth < 3 else 0))
        return struct.pack("<IQ", item, count) + items
    sizes: dict[int, int] = {
        V.UINT8: 1,
        V.INT8: 1,
        V.BOOL: 1,
        V.UINT16: 2,
        V.INT16: 2,
        V.UINT32: 4,
        V.INT32: 4,
        V.FLOAT32: 4,
        V.UINT64: 8,
        V.INT64: 8,
        V.FLOAT64: 8,
    }
    size = sizes.get(vtype, 4)
    return draw(st.binary(min_size=0, max_size=size))


@st.composite
def _kv(draw: st.DrawFn) -> bytes:
    vtype = draw(_vtype)
    if draw(st.integers(0, 9)) == 0:  # sometimes the alignment key, with any type and value
        return _str(b"general.alignment") + struct.pack("<I", vtype) + draw(st.binary(max_size=8))
    return draw(_string()) + struct.pack("<I", vtype) + draw(_value(vtype))


@st.composite
def _tensor(draw: st.DrawFn) -> bytes:
    n_dims = draw(st.one_of(st.integers(0, 5), _u32))
    dims = [draw(st.one_of(st.sampled_from([0, 1, 2, 4, 32, 256]), _u64)) for _ in range(min(n_dims, 5))]
    ggml_type = draw(st.one_of(st.sampled_from(sorted(GGML_TYPES)), _u32))
    offset = draw(st.one_of(st.sampled_from([0, 32, 64]), _u64))
    return (
        draw(_string())
        + struct.pack("<I", n_dims)
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


@given(
    kvs=st.lists(_kv(), max_size=4),
    tensors=st.lists(_tensor(), max_size=3),
    data=st.binary(max_size=256),
    counts=st.one_of(st.none(), st.tuples(_u64, _u64)),
)
def test_extreme_header_fields_parse_or_are_refused(
    parse: Parse, kvs: list[bytes], tensors: list[bytes], data: bytes, counts: tuple[int, int] | None
) -> None:
    content = bytearray(_gguf(kvs, tensors, data))
    if counts is not None:  # tensor and metadata counts that need not match what follows
        struct.pack_into("<QQ", content, 8, *counts)
    parse(bytes(content))


# --- regressions: inputs that used to crash, each as found ---------------------------------------------------


def _nested_arrays(depth: int) -> bytes:
    return struct.pack("<IQ", V.ARRAY, 1) * depth + struct.pack("<IQ", V.UINT8, 0)


def _tensor_info(name: bytes, dims: tuple[int, ...], ggml_type: int = 0) -> bytes:
    return _str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, 0)


def test_deeply_nested_arrays_are_refused(tmp_path: Path) -> None:
    # Used to recurse once per 12-byte array header: RecursionError for a 36 KB file.
    path = tmp_path / "nested.gguf"
    for depth in (3000, MAX_ARRAY_NESTING):
        path.write_bytes(_gguf([_str(b"a") + struct.pack("<I", V.ARRAY) + _nested_arrays(depth)], []))
        too_deep = rf"'a'(\[0\])+ at byte \d+ nests arrays more than {MAX_ARRAY_NESTING}"
        with pytest.raises(ModelFormatError, match=too_deep):
            GgufFile(path)
    path.write_bytes(_gguf([_str(b"a") + struct.pack("<I", V.ARRAY) + _nested_arrays(MAX_ARRAY_NESTING - 1)], []))
    value = GgufFile(path).metadata["a"]  # as deep as allowed still parses
    for _ in range(MAX_ARRAY_NESTING - 1):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value.size == 0


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        # A 0-dimensional quantized tensor: 0 bytes, and tensor_data raised ValueError (cannot reshape).
        (_tensor_info(b"w", (), ggml_type=2), "'w' row length 1 is not a multiple of the Q4_0 block size 32"),
        # An empty tensor whose other dimension is 2**62: tensor_data raised ValueError (array is too big).
        (_tensor_info(b"w", (0, 2**62)), r"'w' shape \[0, 4611686018427387904\] is too large"),
        # 70 dimensions of 1: tensor_data raised ValueError (numpy supports at most 64).
        (_tensor_info(b"w", (1,) * 70), "'w' has 70 dimensions; ggml tensors have at most 4"),
    ],
)
def test_unviewable_tensor_shapes_are_refused(tmp_path: Path, tensor: bytes, match: str) -> None:
    path = tmp_path / "shape.gguf"
    path.write_bytes(_gguf([], [tensor], bytes(64)))
    with pytest.raises(ModelFormatError, match=match):
        GgufFile(path)


def test_scalar_tensor_of_an_element_type_is_one_element(tmp_path: Path) -> None:
    path = tmp_path / "scalar.gguf"
    path.write_bytes(_gguf([], [_tensor_info(b"w", ())], struct.pack("<f", 2.5)))
    assert GgufFile(path).tensor_data("w").tolist() == 2.5


def _array(item_type: int, count: int) -> bytes:
    return _str(b"a") + struct.pack("<IIQ", V.ARRAY, item_type, count)


def _refused_fast_and_small(path: Path, match: str) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ModelFormatError, match=match):
            GgufFile(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < MAX_PEAK_BYTES, f"refusing the file took {peak} bytes"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        # 2**40 tensors (and 2**40 metadata entries) in a 24-byte header: refused before a list is built.
        (b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0) + bytes(64), r"tensor infos \(1099511627776 tensors\)"),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**40) + bytes(64), r"metadata \(1099511627776 entries\)"),
        # A 2**62-byte string and key: refused before bytes are sliced out.
        (_gguf([_str(b"s") + struct.pack("<IQ", V.STRING, 2**62)], []), r"'s' \(4611686018427387904-byte string\)"),
        (_gguf([struct.pack("<Q", 2**62) + b"key"], []), "metadata entry 0 key"),
        # Arrays of 2**62 items of every element kind: refused before numpy or a list allocates them.
        (_gguf([_array(V.FLOAT64, 2**62)], []), r"'a' \(4611686018427387904 items\)"),
        (_gguf([_array(V.STRING, 2**62)], []), r"'a' \(4611686018427387904 strings"),
        (_gguf([_array(V.ARRAY, 2**62)], []), r"'a' \(4611686018427387904 arrays"),
        # A string array whose count fits but whose strings claim 2**62 bytes each.
        (_gguf([_array(V.STRING, 2) + struct.pack("<Q", 2**62)], [], bytes(64)), r"'a' \(string 0 of 2\)"),
        # A tensor of 2**62 bytes and one claiming 2**31 dimensions.
        (_gguf([], [_tensor_info(b"w", (2**30, 2**30))]), "'w' .4611686018427387904 bytes.*past the end"),
        (_gguf([], [_str(b"w") + struct.pack("<I", 2**31)]), r"'w' dimensions \(2147483648\)"),
    ],
)
def test_absurd_counts_and_lengths_are_refused_without_allocating(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "absurd.gguf"
    path.write_bytes(content)
    _refused_fast_and_small(path, match)
