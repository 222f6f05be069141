"""Constrained decoding speed on the bundled SmolLM2-135M: what a JSON schema costs, without HTTP.

Usage:
  python -m bench.grammar [--repeats 3] [--tokens 128]

Writes bench/results/grammar.json and prints it. Figures, each measured `--repeats` times, [min, median, max]:
- tok_s_{free,schema}_{1,16}: tokens per second of 1 and 16 streams of `--tokens` tokens each (prompt
  included in the time), unconstrained and under a JSON schema that cannot complete sooner; ratio_{1,16} is
  schema / free (target >= 0.9).
- mask_ms: time to compute one sequence's mask (p50/p99 over every step of the 1-stream runs; target p99 <= 1 ms
  on 2 cores), and mask_step_ms_16: one step's masks for 16 sequences together (beside the forward pass where
  the machine has a core the executor does not use, else just before it: engines/runtime/grammar.py says why).
- apply_ms: applying a mask to one row of logits (p50/p99); this part is not overlapped.
- compile_ms_first / compile_ms_cached: Grammars.constraint() for a schema seen for the first time / again, over
  the test corpus (tests/engines/json_schemas.py), p50 and max; ttft_ms_{free,first,cached}: time to the first
  token of a request without a grammar, with a first-seen schema and with a cached one.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.cluster import save_report
from bench.executor_speed import bundled_gguf, spread
from engines.base import GenerationEvent, GenerationRequest, Logits, SamplingParams, Tokens
from engines.convert import ensure_converted
from engines.onnxruntime import OrtExecutor
from engines.runtime.grammar import (
    Constraint,
    Grammars,
    MaskBatch,
    json_schema_grammar,
    mask_executor,
    spare_cores,
    token_table,
)
from engines.runtime.scheduler import Scheduler, SchedulerLimits
from engines.text import GgufTokenizer
from tests.engines.json_schemas import SCHEMAS

REPO = Path(__file__).resolve().parents[1]
PROMPT = "<|im_start|>user\nList numbers as JSON.<|im_end|>\n<|im_start|>assistant\n"
# An array that needs more items than any run's token budget: every constrained stream writes exactly --tokens.
LONG_ARRAY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 1000}


class TimedMasks(MaskBatch):
    """MaskBatch that records how long each compute() and apply() took."""

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self.compute_s: list[tuple[int, float]] = []
        self.apply_s: list[float] = []

    def compute(self, constraints: Any) -> None:
        started = time.perf_counter()
        super().compute(constraints)
        self.compute_s.append((len(constraints), time.perf_counter() - started))

    def apply(self, row: int, logits: Logits) -> Logits:
        started = time.perf_counter()
        masked = super().apply(row, logits)
        self.apply_s.append(time.perf_counter() - started)
        return masked


async def run(scheduler: Scheduler, requests: list[GenerationRequest]) -> tuple[float, dict[int, float], int]:
    """Submit all, wait for all: (seconds, first-token seconds by id, tokens produced)."""
    first: dict[int, float] = {}
    ended: set[int] = set()
    produced = [0]
    all_done = asyncio.Event()
    started = time.perf_counter()

    def on(event: GenerationEvent) -> None:
        if isinstance(event, Tokens):
            first.setdefault(event.id, time.perf_counter() - started)
            produced[0] += len(event.ids)
        else:
            assert event.id is not None
            ended.add(event.id)
            if len(ended) == len(requests):
                all_done.set()

    scheduler._emit = on  # noqa: SLF001 - the benchmark listens where the host would
    for request in requests:
        scheduler.submit(request)
    await all_done.wait()
    return time.perf_counter() - started, first, produced[0]


def percentiles(values: list[float]) -> dict[str, float]:
    ms = np.array(values) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 4), "p99": round(float(np.percentile(ms, 99)), 4)}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    gguf = bundled_gguf()
    converted = ensure_converted(gguf, REPO / ".cache" / "test-models", flavour="fused")
    executor = OrtExecutor(converted, threads=2)
    tokenizer = GgufTokenizer.from_gguf(gguf)
    table = token_table(tokenizer)
    grammars = Grammars(table)
    masks = TimedMasks(mask_executor(2), executor.vocab_size, overlap=spare_cores(2))  # as the engine host
    limits = SchedulerLimits(max_batch=16, prefix_cache_tokens=0)
    scheduler = Scheduler(executor, lambda _: None, limits, (grammars, masks))
    loop_task = asyncio.create_task(scheduler.run())
    prompt = tokenizer.encode(PROMPT)
    long_array = json_schema_grammar(LONG_ARRAY)
    ids = iter(range(1, 10**9))

    def requests(n: int, grammar: str | None, max_tokens: int) -> list[GenerationRequest]:
        # No stop ids: an unconstrained stream runs its whole budget too.
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0)
        return [GenerationRequest(next(ids), prompt, params, frozenset(), grammar) for _ in range(n)]

    report: dict[str, Any] = {"tokens": args.tokens, "repeats": args.repeats}
    single_masks: list[float] = []
    try:
        await run(scheduler, requests(2, long_array, 8))  # warm-up
        for streams in (1, 16):
            for name, grammar in (("free", None), ("schema", long_array)):
                rates = []
                for _ in range(args.repeats):
                    masks.compute_s.clear()
                    seconds, _, produced = await run(scheduler, requests(streams, grammar, args.tokens))
                    rates.append(produced / seconds)
                    if grammar is not None and streams == 1:
                        single_masks += [s for n, s in masks.compute_s if n == 1]
                    if grammar is not None and streams == 16:
                        report["mask_step_ms_16"] = percentiles([s for n, s in masks.compute_s if n == 16])
                report[f"tok_s_{name}_{streams}"] = spread(rates)
            report[f"ratio_{streams}"] = round(
                statistics.median(report[f"tok_s_schema_{streams}"])
                / statistics.median(report[f"tok_s_free_{streams}"]),
                3,
            )
        report["mask_ms"] = percentiles(single_masks)
        report["apply_ms"] = percentiles(masks.apply_s)
        report.update(compile_times(table))
        report.update(await ttft(scheduler, requests, args.repeats))
    finally:
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
        executor.close()
    return report


def compile_times(table: Any) -> dict[str, Any]:
    grammars = Grammars(table)
    texts = [json_schema_grammar(schema) for schema in SCHEMAS]
    first, cached = [], []
    for text in texts:
        for into in (first, cached):
            started = time.perf_counter()
            constraint: Constraint = grammars.constraint(text)
            into.append(time.perf_counter() - started)
            del constraint
    return {
        "compile_ms_first": {"p50": round(statistics.median(first) * 1000, 3), "max": round(max(first) * 1000, 3)},
        "compile_ms_cached": {"p50": round(statistics.median(cached) * 1000, 3), "max": round(max(cached) * 1000, 3)},
    }


async def ttft(scheduler: Scheduler, requests: Any, repeats: int) -> dict[str, Any]:
    found: dict[str, list[float]] = {"free": [], "first": [], "cached": []}
    for i in range(repeats * 3):
        schema = {**SCHEMAS[47], "description": f"first seen #{i}"}  # a new text: compiled on arrival
        grammar = json_schema_grammar(schema)
        for name, text in (("free", None), ("first", grammar), ("cached", grammar)):
            (request,) = requests(1, text, 1)
            _, first, _ = await run(scheduler, [request])
            found[name].append(first[request.id])
    return {f"ttft_ms_{name}": spread([s * 1000 for s in values], 2) for name, values in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    save_report(REPO / "bench" / "results" / "grammar.json", asyncio.run(measure(args)))


if __name__ == "__main__":
    main()
