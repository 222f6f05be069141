"""Write tiny random llama GGUF files, so converter and executor edge cases run in milliseconds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q


@dataclass(frozen=True)
class TinySpec:
    """Shape and quantization choices of a tiny model."""

    arch: str = "llama"
    n_layers: int = 2
    d_model: int = 64
    d_ff: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab: int = 256
    context: int = 32
    rope_base: float = 10000.0
    tied: bool = False
    # Per-role tensor types; a mix exercises every repack path and both the tied and untied heads.
    qtypes: dict[str, Q] = field(
        default_factory=lambda: {
            "token_embd": Q.Q8_0,
            "output": Q.Q8_0,
            "attn_q": Q.Q4_1,
            "attn_k": Q.Q4_0,
            "attn_v": Q.Q8_0,
            "attn_output": Q.Q4_1,
            "ffn_gate": Q.Q4_1,
            "ffn_up": Q.F16,
            "ffn_down": Q.Q4_0,
        }
    )
    extra_kv: dict[str, str | float] = field(default_factory=dict)  # "{arch}" in a key becomes the arch


def write_tiny_gguf(path: Path, spec: TinySpec | None = None, seed: int = 0) -> Path:
    """Write a random but well-formed llama GGUF to `path`."""
    spec = spec or TinySpec()
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), spec.arch)
    a = spec.arch
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.context)
    w.add_embedding_length(spec.d_model)
    w.add_feed_forward_length(spec.d_ff)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(spec.vocab)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    for key, value in spec.extra_kv.items():
        if isinstance(value, str):
            w.add_string(key.replace("{arch}", a), value)
        else:
            w.add_float32(key.replace("{arch}", a), value)

    def add(name: str, role: str, shape: tuple[int, ...], scale: float, mean: float = 0.0) -> None:
        data = (mean + rng.standard_normal(shape) * scale).astype(np.float32)
        qtype = spec.qtypes.get(role, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(name, data)
        elif qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    d, kv = spec.d_model, spec.d_model // spec.n_heads * spec.n_kv_heads
    add("token_embd.weight", "token_embd", (spec.vocab, d), 1.0)
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", "norm", (d,), 0.1, 1.0)
        add(p + "attn_q.weight", "attn_q", (d, d), 0.2)
        add(p + "attn_k.weight", "attn_k", (kv, d), 0.2)
        add(p + "attn_v.weight", "attn_v", (kv, d), 0.2)
        add(p + "attn_output.weight", "attn_output", (d, d), 0.1)
        add(p + "ffn_norm.weight", "norm", (d,), 0.1, 1.0)
        add(p + "ffn_gate.weight", "ffn_gate", (spec.d_ff, d), 0.2)
        add(p + "ffn_up.weight", "ffn_up", (spec.d_ff, d), 0.2)
        add(p + "ffn_down.weight", "ffn_down", (d, spec.d_ff), 0.1)
    add("output_norm.weight", "norm", (d,), 0.1, 1.0)
    if not spec.tied:
        add("output.weight", "output", (spec.vocab, d), 0.3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
