"""Read a llama-family GGUF: hyper-parameters (`LlamaConfig`) and tensors, refusing what we cannot convert."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType

from engines.base import ModelFormatError
from engines.gguf_file import GgufFile

# Tensor types the repacker handles exactly; anything else (K-quants, IQ, BF16, ...) is refused rather than
# silently requantized, because requantizing GGUF Q4 weights visibly hurts fidelity.
SUPPORTED_TYPES = frozenset(
    {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
        GGMLQuantizationType.Q8_0,
    }
)

# Every tensor a plain llama decoder may carry; others (biases, rope_freqs, MoE experts, ...) are refused,
# so an unknown variant fails loudly at conversion instead of producing a quietly wrong graph.
_GLOBAL_TENSORS = frozenset({"token_embd.weight", "output_norm.weight", "output.weight"})
_BLOCK_TENSOR = re.compile(
    r"blk\.(\d+)\.(attn_norm|attn_q|attn_k|attn_v|attn_output|ffn_norm|ffn_gate|ffn_up|ffn_down)\.weight"
)
_BLOCK_PARTS = (
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a llama-family decoder, as read from GGUF metadata."""

    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_base: float
    rope_scale: float  # positions are multiplied by this (1.0 = no scaling; "linear" scaling uses 1/factor)
    rms_eps: float
    context_length: int
    vocab_size: int
    tied_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form, for meta.json."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LlamaConfig:
        """Inverse of `to_json`."""
        return cls(**data)


def _is_llama_tensor(name: str, n_layers: int) -> bool:
    if name in _GLOBAL_TENSORS:
        return True
    m = _BLOCK_TENSOR.fullmatch(name)
    return m is not None and int(m.group(1)) < n_layers


@dataclass(frozen=True)
class GgufTensor:
    """One tensor's raw GGUF bytes: [rows, bytes-per-row] for quantized types, [rows, cols] otherwise."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (rows = output features first), unlike GGUF's reversed `ne`
    data: npt.NDArray[Any]


class GgufModel:
    """An opened llama GGUF: config plus lazy (memory-mapped) access to its tensors."""

    def __init__(self, path: Path) -> None:
        try:
            self._file = GgufFile(path)
        except OSError as exc:
            raise ModelFormatError(f"{path}: not a readable GGUF file ({exc})") from exc
        self.path = path
        self._tensors = self._file.tensors
        self.config = self._read_config()
        self._check_tensors()

    def field(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key (scalars unwrapped, arrays as lists), or `default` when absent."""
        value = self._file.get(key, default)
        return value.tolist() if isinstance(value, np.ndarray) else value

    def _require(self, key: str) -> Any:
        value = self.field(key)
        if value is None:
            raise ModelFormatError(f"{self.path.name}: GGUF metadata key {key!r} is missing")
        return value

    def _read_config(self) -> LlamaConfig:
        arch = self.field("general.architecture")
        if arch != "llama":
            raise ModelFormatError(
                f"{self.path.name}: architecture {arch!r} is not supported; only 'llama' GGUF models convert"
            )
        n_heads = int(self._require("llama.attention.head_count"))
        d_model = int(self._require("llama.embedding_length"))
        head_dim = int(self.field("llama.attention.key_length", d_model // n_heads))
        value_dim = int(self.field("llama.attention.value_length", head_dim))
        if value_dim != head_dim or head_dim * n_heads != d_model:
            raise ModelFormatError(
                f"{self.path.name}: head sizes (key {head_dim}, value {value_dim}, {n_heads} heads, d_model "
                f"{d_model}) are not the plain llama layout"
            )
        rope_dim = int(self.field("llama.rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise ModelFormatError(f"{self.path.name}: partial rotary embedding ({rope_dim} of {head_dim}) unsupported")
        n_kv = int(self.field("llama.attention.head_count_kv", n_heads))
        if n_heads % n_kv:
            raise ModelFormatError(f"{self.path.name}: {n_heads} query heads do not divide into {n_kv} KV heads")
        embd = self._tensors.get("token_embd.weight")
        if embd is None:
            raise ModelFormatError(f"{self.path.name}: tensor 'token_embd.weight' is missing")
        vocab = self.field("llama.vocab_size")
        if vocab is None:
            tokens = self._file.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else int(embd.shape[1])
        bos, eos = self.field("tokenizer.ggml.bos_token_id"), self.field("tokenizer.ggml.eos_token_id")
        return LlamaConfig(
            n_layers=int(self._require("llama.block_count")),
            d_model=d_model,
            d_ff=int(self._require("llama.feed_forward_length")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            rope_base=float(self.field("llama.rope.freq_base", 10000.0)),
            rope_scale=self._rope_scale(),
            rms_eps=float(self._require("llama.attention.layer_norm_rms_epsilon")),
            context_length=int(self._require("llama.context_length")),
            vocab_size=int(vocab),
            tied_embeddings="output.weight" not in self._tensors,
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=None if eos is None else int(eos),
        )

    def _rope_scale(self) -> float:
        kind = self.field("llama.rope.scaling.type", "none")
        factor = float(self.field("llama.rope.scaling.factor", 0.0) or 0.0)
        old_linear = self.field("llama.rope.scale_linear")  # pre-2023 spelling of linear scaling
        if kind == "none" and old_linear is None:
            return 1.0
        if kind == "linear" or (kind == "none" and old_linear is not None):
            factor = factor or float(old_linear or 1.0)
            return 1.0 / factor
        raise ModelFormatError(f"{self.path.name}: rope scaling {kind!r} is not supported (only none and linear)")

    def _check_tensors(self) -> None:
        cfg = self.config
        names = set(self._tensors)
        unknown = sorted(n for n in names if not _is_llama_tensor(n, cfg.n_layers))
        if unknown:
            raise ModelFormatError(f"{self.path.name}: tensors not part of a plain llama decoder: {unknown[:8]}")
        wanted = ["token_embd.weight", "output_norm.weight"] + [
            f"blk.{i}.{part}.weight" for i in range(cfg.n_layers) for part in _BLOCK_PARTS
        ]
        missing = [n for n in wanted if n not in names]
        if missing:
            raise ModelFormatError(f"{self.path.name}: missing tensors {missing[:8]}")
        for t in self._tensors.values():
            if t.ggml_type not in SUPPORTED_TYPES:
                raise ModelFormatError(
                    f"{self.path.name}: tensor {t.name!r} has type {t.type_name}; supported types are "
                    f"{sorted(q.name for q in SUPPORTED_TYPES)}"
                )

    def tensor(self, name: str) -> GgufTensor:
        """One tensor, its bytes still memory-mapped."""
        t = self._tensors[name]
        return GgufTensor(
            name=name, qtype=GGMLQuantizationType(t.ggml_type), shape=t.shape[::-1], data=self._file.tensor_data(name)
        )

    def tensor_names(self) -> Iterator[str]:
        """Names in file order."""
        return iter(self._tensors)

    @property
    def n_tensors(self) -> int:
        """How many tensors the file holds."""
        return len(self._tensors)
