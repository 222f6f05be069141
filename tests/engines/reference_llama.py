"""Oracle for the converter: a plain numpy llama forward pass over `gguf.quants.dequantize`d weights.

Written independently of `engines.convert` (it reads the GGUF with gguf's own reader and dequantizer, and
applies rotary embedding pair by pair), so agreement with the ONNX graph says something.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


class ReferenceLlama:
    """Dequantized weights plus a full-sequence forward pass (no KV cache)."""

    def __init__(self, path: Path) -> None:
        reader = gguf.GGUFReader(str(path))
        self.fields: dict[str, Any] = {
            k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")
        }
        self.w: dict[str, F32] = {}
        for t in reader.tensors:
            shape = tuple(int(x) for x in reversed(t.shape))
            self.w[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        f = self.fields
        self.n_layers = int(f["llama.block_count"])
        self.n_heads = int(f["llama.attention.head_count"])
        self.n_kv = int(f["llama.attention.head_count_kv"])
        self.d = int(f["llama.embedding_length"])
        self.hd = self.d // self.n_heads
        self.base = float(f["llama.rope.freq_base"])
        self.eps = float(f["llama.attention.layer_norm_rms_epsilon"])
        linear = f.get("llama.rope.scaling.type") == "linear"
        self.pos_scale = 1.0 / float(f["llama.rope.scaling.factor"]) if linear else 1.0

    def _norm(self, x: F32, w: F32) -> F32:
        ms = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
        out: F32 = (x / np.sqrt(ms + self.eps)).astype(np.float32) * w
        return out

    def _rope(self, x: F32, positions: npt.NDArray[np.int64]) -> F32:
        # x: [S, heads, hd]; llama.cpp NORM mode rotates pairs (x[2i], x[2i+1]) by pos * base^(-2i/hd)
        out = np.empty_like(x)
        for i in range(self.hd // 2):
            theta = positions.astype(np.float64) * self.pos_scale * self.base ** (-2.0 * i / self.hd)
            c = np.cos(theta)[:, None]
            s = np.sin(theta)[:, None]
            a, b = x[:, :, 2 * i].astype(np.float64), x[:, :, 2 * i + 1].astype(np.float64)
            out[:, :, 2 * i] = a * c - b * s
            out[:, :, 2 * i + 1] = a * s + b * c
        return out

    def forward(self, ids: list[int]) -> F32:
        """Logits [S, vocab] for every position of `ids` (positions 0..S-1)."""
        w = self.w
        s = len(ids)
        pos = np.arange(s, dtype=np.int64)
        h = w["token_embd.weight"][np.array(ids)]
        group = self.n_heads // self.n_kv
        causal = np.triu(np.full((s, s), -np.inf, dtype=np.float32), k=1)
        for i in range(self.n_layers):
            p = f"blk.{i}."
            x = self._norm(h, w[p + "attn_norm.weight"])
            q = (x @ w[p + "attn_q.weight"].T).reshape(s, self.n_heads, self.hd)
            k = (x @ w[p + "attn_k.weight"].T).reshape(s, self.n_kv, self.hd)
            v = (x @ w[p + "attn_v.weight"].T).reshape(s, self.n_kv, self.hd)
            q, k = self._rope(q, pos), self._rope(k, pos)
            heads = []
            for j in range(self.n_heads):
                kv = j // group
                sc = (q[:, j, :] @ k[:, kv, :].T) / np.sqrt(self.hd) + causal
                sc = np.exp(sc - sc.max(axis=-1, keepdims=True))
                heads.append((sc / sc.sum(axis=-1, keepdims=True)) @ v[:, kv, :])
            h = h + np.concatenate(heads, axis=-1) @ w[p + "attn_output.weight"].T
            x = self._norm(h, w[p + "ffn_norm.weight"])
            g = x @ w[p + "ffn_gate.weight"].T
            u = x @ w[p + "ffn_up.weight"].T
            h = h + ((g / (1.0 + np.exp(-g))) * u) @ w[p + "ffn_down.weight"].T
        h = self._norm(h, w["output_norm.weight"])
        head = w.get("output.weight", w["token_embd.weight"])
        return (h @ head.T).astype(np.float32)
