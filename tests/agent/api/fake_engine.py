"""An in-process stand-in for the engine host process, for HTTP-level tests that need no model run.

`ScriptedEngine` keeps the real `EngineHost` admission (capacity, 503s, suspension) and replaces only the
generation with a script of token ids, optionally held at a gate after the first token so that a test can act
mid-stream. It records how each generation ended, as the real host learns it from a cancel frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from agent.api.openai.serving import OpenAIServing
from agent.engine import EngineHost, EngineHostConfig, EngineState
from agent.models.bundled import BUNDLED_MODELS
from agent.models.registry import ChatModel, ModelRegistry
from agent.models.store import InstalledModel
from engines.base import Done, SamplingParams, Tokens
from tests.bundled import smollm2_gguf
from tests.engines.text_model import smollm_pipeline

MODEL_ID = "scripted-chat"


class ScriptedEngine(EngineHost):
    """Answers every generation with `answer`'s tokens; with `hold` set, waits at `gate` after the first one."""

    def __init__(self, *, max_batch: int = 4, max_queue: int = 4) -> None:
        super().__init__(
            EngineHostConfig(
                model_id=MODEL_ID,
                gguf=Path("unused.gguf"),
                sha256="0" * 64,
                cache_dir=Path("unused"),
                run_dir=Path("unused"),
                threads=1,
                max_context=2048,
                max_batch=max_batch,
                max_queue=max_queue,
                kv_budget_tokens=16384,
                prefix_cache_tokens=0,
                start_timeout=1.0,
                ready_wait=0.1,
            )
        )
        self.state = EngineState.READY
        self._ready.set()
        self.answer = smollm_pipeline().tokenizer.encode(" The capital of France is Paris.")
        self.hold = False
        self.gate = asyncio.Event()
        self.started = 0
        self.finished = 0
        self.abandoned = 0  # generations left before their end: the real host gets a cancel frame for each
        self.ended = asyncio.Event()

    async def generate(
        self, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int], grammar: str | None = None
    ) -> AsyncGenerator[Tokens | Done, None]:
        self.started += 1
        request_id = next(self._ids)
        # Registered like a real stream, so that suspend() and a crash end it the way they end real ones.
        failures: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request_id] = failures
        completed = False
        try:
            for position, token in enumerate(self.answer[: params.max_tokens]):
                yield Tokens(request_id, (token,))
                if position == 0 and self.hold:
                    await self._held(failures)
            completed = True
            yield Done(
                request_id,
                "length" if params.max_tokens <= len(self.answer) else "stop",
                len(prompt),
                min(params.max_tokens, len(self.answer)),
            )
        finally:
            self._streams.pop(request_id, None)
            if completed:
                self.finished += 1
            else:
                self.abandoned += 1
            self.ended.set()

    async def _held(self, failures: asyncio.Queue[Any]) -> None:
        """Wait at the gate; an error put on the stream meanwhile (suspend, crash) ends the generation."""
        opened = asyncio.ensure_future(self.gate.wait())
        failed = asyncio.ensure_future(failures.get())
        try:
            await asyncio.wait({opened, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.cancel()
            failed.cancel()
        if failed.done() and not failed.cancelled() and isinstance(failed.result(), Exception):
            raise failed.result()


def scripted_serving(engine: ScriptedEngine) -> OpenAIServing:
    """OpenAI serving over one chat model run by `engine`, with the bundled model's real tokenizer and template."""
    bundled = BUNDLED_MODELS[0]
    installed = InstalledModel(
        id=MODEL_ID,
        path=smollm2_gguf(),
        size=0,
        sha256="0" * 64,
        format=bundled.format,
        quantization=bundled.quantization,
        capabilities=bundled.capabilities,
        source="test",
        license=bundled.license,
        installed_at=0,
    )
    return OpenAIServing(ModelRegistry([ChatModel(installed, smollm_pipeline(), engine)], [], MODEL_ID))
