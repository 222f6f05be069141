"""Oracle for the encoder: a plain numpy float64 BERT forward pass, mean pooling and L2 normalisation.

Written independently of `engines.convert` (its own few-line safetensors reader, one sentence at a time with no
padding or mask, the GELU through `math.erf`), following Hugging Face's BertModel and sentence-transformers'
Pooling + Normalize modules, so agreement with the ONNX graph says something.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
_erf = np.frompyfunc(math.erf, 1, 1)


def read_safetensors(path: Path) -> dict[str, F64]:
    """Every float32 tensor of the file, widened to float64."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    out: dict[str, F64] = {}
    for name, t in header.items():
        if t["dtype"] != "F32":
            continue
        begin, end = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + begin : 8 + n + end], "<f4").reshape(t["shape"]).astype(np.float64)
    return out


class ReferenceBert:
    """all-MiniLM-L6-v2-style sentence embedding of one token sequence at a time."""

    def __init__(self, model_dir: Path) -> None:
        cfg = json.loads((model_dir / "config.json").read_text())
        self.w = read_safetensors(model_dir / "model.safetensors")
        self.layers = int(cfg["num_hidden_layers"])
        self.heads = int(cfg["num_attention_heads"])
        self.eps = float(cfg["layer_norm_eps"])

    def _ln(self, x: F64, name: str) -> F64:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        out: F64 = (x - mu) / np.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]
        return out

    def _dense(self, x: F64, name: str) -> F64:
        out: F64 = x @ self.w[name + ".weight"].T + self.w[name + ".bias"]
        return out

    def hidden_states(self, ids: list[int]) -> F64:
        """Last hidden state [S, hidden] of one unpadded sequence (token type 0 everywhere)."""
        w = self.w
        s = len(ids)
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:s]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._ln(x, "embeddings.LayerNorm")
        hd = x.shape[1] // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q, k, v = (
                self._dense(x, p + f"attention.self.{n}").reshape(s, self.heads, hd).transpose(1, 0, 2)
                for n in ("query", "key", "value")
            )
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            ctx = (probs @ v).transpose(1, 0, 2).reshape(s, -1)
            x = self._ln(self._dense(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
            f = self._dense(x, p + "intermediate.dense")
            f = 0.5 * f * (1.0 + np.asarray(_erf(f / math.sqrt(2.0)), dtype=np.float64))
            x = self._ln(self._dense(f, p + "output.dense") + x, p + "output.LayerNorm")
        return x

    def embed(self, ids: list[int]) -> F64:
        """Mean-pooled, L2-normalised sentence embedding [hidden]."""
        mean = self.hidden_states(ids).mean(0)
        out: F64 = mean / max(float(np.linalg.norm(mean)), 1e-12)
        return out
