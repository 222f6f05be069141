"""A streamed chat completion as choice events, shared by SSE (`/v1/chat/completions`) and the WebSocket.

For every choice: a first event with the role, then deltas of text or tool calls (agent/api/openai/tools.py)
each carrying the logprobs of the tokens generated since the last one (when requested), then an event with the
finish reason. Once every choice has finished, one `Finish` covers the usage of them all.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from agent.api.openai import choices
from agent.api.openai.logprobs import Scored, chat_logprobs
from agent.api.openai.serving import Finish, OpenAIServing, Prepared
from agent.api.openai.tools import ToolCallShaper


@dataclass(frozen=True)
class ChoiceEvent:
    """One chunk's worth of one choice."""

    index: int
    delta: dict[str, Any]
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class _Choice:
    """What one choice has generated but not yet sent: tool-call text held by the shaper, tokens' logprobs."""

    def __init__(self, index: int, prepared: Prepared) -> None:
        self.index = index
        self.prepared = prepared
        self.shaper = ToolCallShaper(prepared.tools)
        self.scored: list[Scored] = []

    def events(self, deltas: list[dict[str, Any]]) -> list[ChoiceEvent]:
        """The deltas as events; the logprobs gathered so far go with the first."""
        out = []
        for delta in deltas:
            out.append(ChoiceEvent(self.index, delta, logprobs=self._take_logprobs()))
        return out

    def finish(self, finish: Finish) -> list[ChoiceEvent]:
        out = self.events(self.shaper.flush())
        if self.scored:  # tokens whose text never showed (a stop string cut it): their logprobs still go out
            out.append(
                ChoiceEvent(self.index, {} if self.prepared.tools else {"content": ""}, None, self._take_logprobs())
            )
        out.append(ChoiceEvent(self.index, {}, self.shaper.finish_reason(finish.finish_reason)))
        return out

    def _empty(self) -> dict[str, Any]:
        """A delta with no news: tool-call streams carry no `content` field."""
        return {} if self.prepared.tools else {"content": ""}

    def _take_logprobs(self) -> dict[str, Any] | None:
        if self.prepared.params.logprobs is None or not self.scored:
            return None
        scored, self.scored = self.scored, []
        return chat_logprobs(self.prepared.model.text.tokenizer, scored)


async def chat_stream(
    serving: OpenAIServing, preparations: list[Prepared]
) -> AsyncGenerator[ChoiceEvent | Finish, None]:
    """Every choice's events as they come, then the usage of all (the prompt counted once)."""
    states = [_Choice(i, p) for i, p in enumerate(preparations)]
    for state in states:
        yield ChoiceEvent(
            state.index, {"role": "assistant"} if state.prepared.tools else {"role": "assistant", "content": ""}
        )
    finishes: list[Finish] = []
    async with aclosing(choices.merged(serving, preparations)) as stream:
        async for index, item in stream:
            state = states[index]
            if isinstance(item, Finish):
                finishes.append(item)
                for event in state.finish(item):
                    yield event
            elif isinstance(item, Scored):
                state.scored.append(item)
            else:
                for event in state.events(state.shaper.push(item)):
                    yield event
    yield choices.usage(finishes)
