"""A BERT sentence encoder's hyper-parameters and input limit, read from its config files.

Kept apart from the converter so the agent, which only needs the tokenizer's limit, does not import ONNX.
The limit (`max_tokens`) is sentence-transformers' `max_seq_length` when the model ships one (256 for
all-MiniLM-L6-v2), otherwise `max_position_embeddings`: sentence-transformers silently truncates longer inputs to
`max_seq_length`, so every input we accept embeds exactly as the reference library embeds it, and the API refuses
longer ones instead of returning a vector for a prefix of the text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engines.base import ModelFormatError


def _read_json(path: Path, *, required: bool) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise ModelFormatError(f"{path} is missing") from None
        return None
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path}: not readable JSON ({exc})") from exc


def _object(path: Path, *, required: bool) -> dict[str, Any]:
    value = _read_json(path, required=required)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ModelFormatError(f"{path}: not a JSON object")
    return value


def _int(cfg: dict[str, Any], key: str, source: Path) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelFormatError(f"{source}: {key!r} must be a positive integer, not {value!r}")
    return value


@dataclass(frozen=True)
class BertConfig:
    """The hyper-parameters the graph needs, plus the input limit the API enforces."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    layer_norm_eps: float
    max_tokens: int

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> BertConfig:
        """Read config.json (and sentence-transformers' files when present); refuse what we cannot convert."""
        path = model_dir / "config.json"
        cfg = _object(path, required=True)
        archs = cfg.get("architectures") or ["BertModel"]
        if cfg.get("model_type") != "bert" or archs != ["BertModel"]:
            raise ModelFormatError(
                f"{path}: model_type {cfg.get('model_type')!r} / architectures {archs!r} is not a plain BertModel; "
                "only BERT sentence encoders are supported"
            )
        # Other activations (gelu_new, relu) and position schemes would need different graphs.
        for key, expected in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
            if cfg.get(key, expected) != expected:
                raise ModelFormatError(f"{path}: {key} {cfg.get(key)!r} is not supported (only {expected!r})")
        hidden, heads = _int(cfg, "hidden_size", path), _int(cfg, "num_attention_heads", path)
        if hidden % heads:
            raise ModelFormatError(f"{path}: hidden_size {hidden} is not a multiple of {heads} heads")
        eps = cfg.get("layer_norm_eps", 1e-12)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ModelFormatError(f"{path}: layer_norm_eps {eps!r} is not a small positive number")
        max_pos = _int(cfg, "max_position_embeddings", path)

        st_path = model_dir / "sentence_bert_config.json"
        st = _object(st_path, required=False)
        max_tokens = min(_int(st, "max_seq_length", st_path), max_pos) if "max_seq_length" in st else max_pos
        _check_modules(model_dir)
        return cls(
            vocab_size=_int(cfg, "vocab_size", path),
            hidden_size=hidden,
            num_layers=_int(cfg, "num_hidden_layers", path),
            num_heads=heads,
            intermediate_size=_int(cfg, "intermediate_size", path),
            max_position_embeddings=max_pos,
            layer_norm_eps=float(eps),
            max_tokens=max_tokens,
        )

    def to_json(self) -> dict[str, Any]:
        """Plain dict for meta.json."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BertConfig:
        """Inverse of `to_json`."""
        return cls(**data)


def _check_modules(model_dir: Path) -> None:
    """Refuse sentence-transformers pipelines whose modules the graph does not reproduce (Dense, CLS pooling)."""
    path = model_dir / "modules.json"
    modules = _read_json(path, required=False)
    if modules is None:
        return  # a bare BertModel: the Encoder contract (mean pooling, unit vectors) defines the output
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelFormatError(f"{path}: not a list of modules")
    types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if types not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ModelFormatError(f"{path}: modules {types} are not supported (only Transformer, Pooling, Normalize)")
    pooling_path = model_dir / str(modules[1].get("path", "")) / "config.json"
    pooling = _object(pooling_path, required=True)
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True)
    if modes != ["pooling_mode_mean_tokens"]:
        raise ModelFormatError(f"{pooling_path}: pooling {modes} is not supported (only pooling_mode_mean_tokens)")
