"""Convert a Hugging Face BERT sentence-embedding model (safetensors + config.json) into the ONNX cache.

Only what we have verified is accepted: `BertModel` weights with absolute positions and erf GELU, pooled by the
mean over tokens (sentence-transformers' all-MiniLM-L6-v2 and its siblings). Anything else is refused with
ModelFormatError rather than converted into a graph that would silently compute different vectors.

The input limit (`BertConfig.max_tokens`) is sentence-transformers' `max_seq_length` when the model ships one
(256 for all-MiniLM-L6-v2), otherwise `max_position_embeddings`. sentence-transformers silently truncates longer
inputs to `max_seq_length`, so every input we accept embeds exactly as the reference library embeds it, and
the API refuses longer ones instead of returning a vector for a prefix of the text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engines.base import ModelFormatError, ProgressFn
from engines.bert_config import BertConfig
from engines.convert.bert_graph import ENCODER_OPSET, build_encoder_graph
from engines.convert.cache import DATA_FILE, META_FILE, MODEL_FILE, ensure_entry, sha256_file, write_durably
from engines.convert.external import ExternalDataWriter
from engines.convert.safetensors import SafetensorsFile

# Bump whenever the emitted encoder graph changes: entries written by another version are converted again.
ENCODER_CONVERTER_VERSION = "1"
ENCODER_FLAVOUR = "bert-encoder"
WEIGHTS_FILE = "model.safetensors"
_KIND = "bert-sentence-encoder"


def _check_shapes(st: SafetensorsFile, cfg: BertConfig) -> None:
    """Refuse weights whose shapes disagree with config.json before any graph is built."""
    h, ff = cfg.hidden_size, cfg.intermediate_size
    emb = "embeddings."
    expected: dict[str, tuple[int, ...]] = {
        emb + "word_embeddings.weight": (cfg.vocab_size, h),
        emb + "position_embeddings.weight": (cfg.max_position_embeddings, h),
        emb + "LayerNorm.weight": (h,),
        emb + "LayerNorm.bias": (h,),
    }
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            expected[p + name + ".weight"] = (h, h)
            expected[p + name + ".bias"] = (h,)
        expected[p + "intermediate.dense.weight"] = (ff, h)
        expected[p + "intermediate.dense.bias"] = (ff,)
        expected[p + "output.dense.weight"] = (h, ff)
        expected[p + "output.dense.bias"] = (h,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            expected[p + ln + ".weight"] = (h,)
            expected[p + ln + ".bias"] = (h,)
    for name, shape in expected.items():
        if st.info(name).shape != shape:
            raise ModelFormatError(f"{st.path}: {name} has shape {st.info(name).shape}, config says {shape}")
    tt = st.info(emb + "token_type_embeddings.weight").shape
    if len(tt) != 2 or tt[0] < 1 or tt[1] != h:
        raise ModelFormatError(f"{st.path}: token_type_embeddings has shape {tt}")
    extra = f"encoder.layer.{cfg.num_layers}.attention.self.query.weight"
    if extra in st:
        raise ModelFormatError(f"{st.path}: has more layers than num_hidden_layers={cfg.num_layers}")


@dataclass(frozen=True)
class ConvertedEncoder:
    """A finished encoder cache entry: the ONNX files and the config they were built from."""

    directory: Path
    config: BertConfig
    safetensors_sha256: str

    @property
    def model_path(self) -> Path:
        """The graph file (weights live in `data_path`, found by ONNX Runtime relative to it)."""
        return self.directory / MODEL_FILE

    @property
    def data_path(self) -> Path:
        """The external-data file holding every weight."""
        return self.directory / DATA_FILE

    @classmethod
    def load(cls, directory: Path, expect: BertConfig | None = None) -> ConvertedEncoder:
        """Open an entry; ModelFormatError if incomplete, from another converter version, or not for `expect`."""
        try:
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
            if meta.get("kind") != _KIND or meta.get("converter_version") != ENCODER_CONVERTER_VERSION:
                raise ModelFormatError(
                    f"{directory}: entry is {meta.get('kind')!r} version {meta.get('converter_version')!r}, "
                    f"this converter writes {_KIND!r} version {ENCODER_CONVERTER_VERSION!r}"
                )
            config = BertConfig.from_json(meta["config"])
            entry = cls(directory, config, meta["safetensors_sha256"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"{directory}: no usable {META_FILE} ({exc!r})") from exc
        # The key is the weights' hash; config files beside them may change (e.g. max_seq_length): rebuild then.
        if expect is not None and config != expect:
            raise ModelFormatError(f"{directory}: built for {config}, the model now says {expect}")
        for path in (entry.model_path, entry.data_path):
            if not path.is_file():
                raise ModelFormatError(f"{directory}: {path.name} is missing")
        return entry


def convert_encoder(
    model_dir: Path, out_dir: Path, *, sha256: str = "", progress: ProgressFn | None = None
) -> BertConfig:
    """Write model.onnx, model.onnx.data and meta.json into the existing directory `out_dir`, fsynced."""
    cfg = BertConfig.from_model_dir(model_dir)
    with SafetensorsFile(model_dir / WEIGHTS_FILE) as st:
        _check_shapes(st, cfg)
        with (out_dir / DATA_FILE).open("wb") as data:
            writer = ExternalDataWriter(data, DATA_FILE)
            proto = build_encoder_graph(
                writer,
                st.float32,
                hidden=cfg.hidden_size,
                heads=cfg.num_heads,
                layers=cfg.num_layers,
                eps=cfg.layer_norm_eps,
                progress=progress,
            )
            writer.sync()
    write_durably(out_dir / MODEL_FILE, proto.SerializeToString())
    meta = {
        "kind": _KIND,
        "converter_version": ENCODER_CONVERTER_VERSION,
        "opset": ENCODER_OPSET,
        "safetensors_sha256": sha256,
        "config": cfg.to_json(),
    }
    write_durably(out_dir / META_FILE, json.dumps(meta, indent=2).encode())
    return cfg


def ensure_converted_encoder(
    model_dir: Path, cache_root: Path, *, sha256: str | None = None, progress: ProgressFn | None = None
) -> ConvertedEncoder:
    """Return the cached conversion of the model in `model_dir`, converting it first if needed.

    The entry lives in `cache_root/onnx/<sha256 of model.safetensors>/bert-encoder`, beside decoder entries.
    """
    cfg = BertConfig.from_model_dir(model_dir)  # refuse unsupported models before hashing their weights
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFormatError(f"{weights} is missing")
    digest = sha256 or sha256_file(weights, progress)
    return ensure_entry(
        cache_root,
        digest,
        ENCODER_FLAVOUR,
        lambda tmp: convert_encoder(model_dir, tmp, sha256=digest, progress=progress),
        lambda d: ConvertedEncoder.load(d, expect=cfg),
        label=model_dir.name,
    )
