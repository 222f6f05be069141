"""Logic of the OpenAI-compatible API, free of HTTP: prepare a request, run it, shape the results.

Preparation (chat template, tokenisation, context checks) runs off the event loop. Generation streams token ids
from the engine host and turns them into text here: incremental detokenisation that never splits a UTF-8
character, and stop strings that are never emitted. Reaching a stop string ends the stream, which cancels the
generation in the engine.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

import structlog

from agent.api.openai import tools
from agent.api.openai.logprobs import Scored, chat_logprobs
from agent.api.openai.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from agent.errors import (
    ContextLengthError,
    EngineFailedError,
    InvalidRequestError,
    ModelNotFoundError,
    UnsupportedParameterError,
)
from agent.models.loader import ModelLoader
from agent.models.oci.artifact import ArtifactError, model_card
from agent.models.registry import CHAT, ChatModel, EmbeddingModel, ModelRegistry
from agent.models.store import InstalledModel
from engines.base import Done, SamplingParams
from engines.text import ChatTemplateError, IncrementalDetokenizer, StopMatcher

log = structlog.get_logger("agent.api.openai")


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready for the engine."""

    model: ChatModel
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]
    # What the output must follow (llguidance grammar text, from response_format or tools); None: free text.
    grammar: str | None = None
    # Tools were offered: the answer may be tool calls (agent/api/openai/tools.py shapes it).
    tools: bool = False


@dataclass(frozen=True)
class Finish:
    """How a generation ended, with exact token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(frozen=True)
class Answer:
    """One whole generation: its text, how it ended and, when requested, each token's logprobs."""

    text: str
    finish: Finish
    scored: list[Scored]


def _file_facts(installed: InstalledModel) -> dict[str, Any]:
    """Blocking: the model's card as the registry would publish it; a header that cannot be read leaves out what
    only the file can say (family, parameters, trained context)."""
    try:
        return model_card(installed)
    except ArtifactError:
        log.warning("model_header_unreadable", model=installed.id)
        return {
            "format": installed.format,
            "quantization": installed.quantization,
            "size": installed.size,
            "license": installed.license,
            "capabilities": list(installed.capabilities),
        }


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class OpenAIServing:
    """Chat and text completions over the registry's models; with a loader, installed chat models that are not
    loaded are loaded when a request names them (agent/models/loader.py)."""

    def __init__(self, registry: ModelRegistry, loader: ModelLoader | None = None) -> None:
        self.registry = registry
        self.loader = loader
        self._facts: dict[tuple[str, str], dict[str, Any]] = {}  # (id, sha256) -> the model file's card facts

    # ------------------------------------------------------------------ models

    async def chat_model(self, requested: str | None, keep_alive: float | None = None) -> ChatModel:
        """The chat model a request names (or the default), loaded first when it is installed but not loaded."""
        if self.loader is None:
            return self.registry.chat(requested)
        if requested and not self.registry.serves(requested):
            return await self.loader.ensure(requested, keep_alive)
        model = self.registry.chat(requested)
        self.loader.touch(model.id, keep_alive)
        return model

    async def list_models(self) -> dict[str, Any]:
        """GET /v1/models body: every installed model (loaded or not) with its card, the default first."""
        cards = [await self.model_card(m.installed) for m in self.registry.all()]
        if self.loader is not None:
            served = {card["id"] for card in cards}
            for installed in await asyncio.to_thread(self.loader.store.installed):
                if installed.id not in served:
                    cards.append(await self.model_card(installed))
        return {"object": "list", "data": cards}

    async def model(self, model_id: str) -> dict[str, Any]:
        """GET /v1/models/{id} body; ModelNotFoundError names the models there are."""
        if self.registry.serves(model_id):
            return await self.model_card(self.registry.get(model_id).installed)
        if self.loader is not None:
            installed = await asyncio.to_thread(self.loader.store.get, model_id)
            if installed is not None:
                return await self.model_card(installed)
        known = [card["id"] for card in (await self.list_models())["data"]]
        raise ModelNotFoundError(
            f"The model '{model_id}' does not exist on this box; models: {', '.join(known)}", param="model"
        )

    async def model_card(self, installed: InstalledModel) -> dict[str, Any]:
        """One Model object: what the model is (family, size, quantization, ...), can do and whether it is loaded."""
        key = (installed.id, installed.sha256)
        if key not in self._facts:
            self._facts[key] = await asyncio.to_thread(_file_facts, installed)
        facts = self._facts[key]
        card: dict[str, Any] = {
            "id": installed.id,
            "object": "model",
            "created": installed.installed_at,
            "owned_by": "thox",
            **{k: facts.get(k) for k in ("format", "family", "parameters", "quantization", "size", "license")},
            "capabilities": facts["capabilities"],
            "trained_context_length": facts.get("context_length"),
            "loaded": self.registry.serves(installed.id),
        }
        served = self.registry.get(installed.id) if card["loaded"] else None
        if isinstance(served, EmbeddingModel):
            card["max_input_tokens"] = served.tokenizer.max_tokens
            card["dimensions"] = served.engine.encoder_info.get("dimensions")
            return card
        if CHAT in installed.capabilities:
            card["default"] = installed.id == self.registry.default_id
            card["sampling_defaults"] = installed.sampling_defaults
            card["context_length"] = served.engine.max_context if served else self._context_when_loaded()
            residency = self.loader.residency(installed.id) if self.loader is not None else None
            if residency is not None:
                expires = residency.expires_in(time.monotonic())
                card["expires_at"] = None if expires is None else int(time.time() + expires)
                card["placed"] = residency.placed
        return card

    def _context_when_loaded(self) -> int | None:
        return self.loader.settings.engine.max_context if self.loader is not None else None

    # ----------------------------------------------------------------- prepare

    async def prepare_chat(self, request: ChatCompletionRequest) -> Prepared:
        """Resolve the model, render the chat template and tokenise (off the loop)."""
        model = await self.chat_model(request.model, request.keep_alive)
        if request.mcp_tools():
            raise UnsupportedParameterError(
                "tools of type 'mcp' work on plain (non-streamed) /v1/chat/completions requests with n = 1 only",
                param="tools",
            )
        messages = chat_messages(request)
        offered = request.function_tools()

        def render_and_encode() -> tuple[list[int], str | None]:
            # Compiling a schema can take milliseconds for a large one: off the loop, with the template.
            answer_format = request.response_format
            grammar = answer_format.grammar() if answer_format else None  # a 400 for a schema we cannot enforce
            if offered:
                parallel = request.parallel_tool_calls is not False
                content = answer_format.answer_schema() if answer_format else None
                grammar = tools.grammar(offered, request.tool_choice, parallel, content)
            try:
                prompt = model.text.template.render(messages, add_generation_prompt=True)
            except ChatTemplateError as exc:
                raise InvalidRequestError(
                    f"the model's chat template refused the messages: {exc}", param="messages"
                ) from exc
            return model.text.tokenizer.encode(prompt), grammar

        prompt_ids, grammar = await asyncio.to_thread(render_and_encode)
        prepared = self._prepared(model, prompt_ids, request, request.completion_limit(), "messages")
        return replace(prepared, grammar=grammar, tools=bool(offered))

    async def prepare_completion(self, request: CompletionRequest) -> Prepared:
        """Resolve the model and tokenise the prompt (a string or one list of token ids)."""
        model = await self.chat_model(request.model, request.keep_alive)
        prompt: str | list[int]
        if isinstance(request.prompt, list) and request.prompt and not isinstance(request.prompt[0], int):
            if len(request.prompt) != 1:
                raise InvalidRequestError(
                    f"batched prompts ({len(request.prompt)} prompts) are not supported yet; send one prompt per "
                    "request",
                    param="prompt",
                    code="unsupported_parameter",
                )
            prompt = request.prompt[0]
        else:
            prompt = request.prompt  # type: ignore[assignment]
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("'prompt' must not be empty", param="prompt", code="invalid_value")
            prompt_ids = await asyncio.to_thread(model.text.tokenizer.encode, prompt)
        else:
            prompt_ids = [int(t) for t in prompt]
            vocab = model.text.tokenizer.vocab_size
            if not prompt_ids or any(not 0 <= t < vocab for t in prompt_ids):
                raise InvalidRequestError(
                    f"token ids in 'prompt' must be non-empty and in [0, {vocab})", param="prompt", code="invalid_value"
                )
        return self._prepared(model, prompt_ids, request, request.max_tokens, "prompt")

    @staticmethod
    def _prepared(
        model: ChatModel,
        prompt_ids: list[int],
        request: ChatCompletionRequest | CompletionRequest,
        max_tokens: int | None,
        prompt_param: str,
    ) -> Prepared:
        context = model.engine.max_context
        room = context - len(prompt_ids)
        if room < 1:
            raise ContextLengthError(
                f"This model's maximum context length is {context} tokens, but the prompt is "
                f"{len(prompt_ids)} tokens; shorten it",
                param=prompt_param,
            )
        if max_tokens is not None and max_tokens > room:
            raise ContextLengthError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} for the "
                "completion). Reduce the prompt or the completion length.",
                param="max_tokens",
            )
        defaults = model.installed.sampling_defaults
        temperature = defaults.get("temperature", 1.0) if request.temperature is None else request.temperature
        top_p = defaults.get("top_p", 1.0) if request.top_p is None else request.top_p
        if top_p == 0:
            # OpenAI allows top_p 0; the nucleus then shrinks to the one most likely token, which is greedy
            # decoding (the sampler itself takes top_p in (0, 1]).
            temperature, top_p = 0.0, 1.0
        params = SamplingParams(
            logit_bias=_logit_bias(request.logit_bias, model.text.tokenizer.vocab_size),
            max_tokens=max_tokens or room,
            temperature=temperature,
            top_p=top_p,
            seed=request.seed,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            logprobs=request.logprob_alternatives(),
        )
        return Prepared(model=model, prompt_ids=prompt_ids, params=params, stops=request.stop_strings())

    # -------------------------------------------------------------- embeddings

    async def embed(self, request: EmbeddingRequest) -> dict[str, Any]:
        """POST /v1/embeddings body: tokenise (off the loop), check limits, embed in the engine host."""
        model = self.registry.embedding(request.model)
        dimensions = model.engine.encoder_info.get("dimensions")
        if request.dimensions is not None and request.dimensions != dimensions:
            raise UnsupportedParameterError(
                f"'{model.id}' makes {dimensions}-dimensional vectors and cannot shorten them; omit 'dimensions'",
                param="dimensions",
            )
        tokenizer = model.tokenizer
        items = request.items()

        def tokenise() -> list[list[int]]:
            batch = []
            for i, item in enumerate(items):
                if isinstance(item, str):
                    batch.append(tokenizer.encode(item))
                else:
                    if any(not 0 <= t < tokenizer.vocab_size for t in item):
                        raise InvalidRequestError(
                            f"input[{i}] has token ids outside [0, {tokenizer.vocab_size})",
                            param=f"input[{i}]",
                            code="invalid_value",
                        )
                    batch.append(tokenizer.wrap(item))
            return batch

        batch = await asyncio.to_thread(tokenise)
        for i, ids in enumerate(batch):
            if len(ids) > tokenizer.max_tokens:
                raise ContextLengthError(
                    f"input[{i}] is {len(ids)} tokens; '{model.id}' accepts at most {tokenizer.max_tokens} tokens "
                    "per input (special tokens included). Shorten or split it.",
                    param=f"input[{i}]",
                )
        async with model.engine.admission():
            result = await model.engine.embed(batch)
        data = []
        for index, vector in enumerate(result.vectors):
            embedding: list[float] | str
            if request.encoding_format == "base64":
                embedding = base64.b64encode(vector.astype("<f4").tobytes()).decode()
            else:
                embedding = vector.tolist()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        return {
            "object": "list",
            "data": data,
            "model": model.id,
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
        }

    # ---------------------------------------------------------------- generate

    async def complete(self, prepared: Prepared) -> Answer:
        """Run a generation to its end: the whole text, how it finished and the tokens' logprobs."""
        pieces: list[str] = []
        scored: list[Scored] = []
        async with aclosing(self.generate_text(prepared)) as stream:
            async for item in stream:
                if isinstance(item, Finish):
                    return Answer("".join(pieces), item, scored)
                if isinstance(item, Scored):
                    scored.append(item)
                else:
                    pieces.append(item)
        raise EngineFailedError("the engine ended the generation without finishing it")

    async def generate_text(self, prepared: Prepared) -> AsyncGenerator[str | Scored | Finish, None]:
        """Stream text pieces, then one Finish; with logprobs requested, each token's Scored comes before the text
        it completes. Closing the iterator early cancels the generation."""
        tokenizer = prepared.model.text.tokenizer
        detokenizer = IncrementalDetokenizer(tokenizer)
        matcher = StopMatcher(prepared.stops)
        generated = 0
        started = time.monotonic()
        first_token_at: float | None = None
        finish: Finish | None = None
        engine = prepared.model.engine
        try:
            generation = engine.generate(prepared.prompt_ids, prepared.params, tokenizer.stop_ids, prepared.grammar)
            async with aclosing(generation) as events:
                async for event in events:
                    if isinstance(event, Done):
                        tail, _ = matcher.push(detokenizer.flush())
                        tail += matcher.flush()
                        if tail:
                            yield tail
                        finish = Finish(event.finish_reason, event.prompt_tokens, event.completion_tokens)
                        yield finish
                        return
                    first_token_at = first_token_at or time.monotonic()
                    for position, token in enumerate(event.ids):
                        generated += 1
                        if event.logprobs is not None:
                            yield Scored(token, event.logprobs[position])
                        text, stopped = matcher.push(detokenizer.push(token))
                        if text:
                            yield text
                        if stopped:
                            finish = Finish("stop", len(prepared.prompt_ids), generated)
                            yield finish
                            return
        finally:
            elapsed = time.monotonic() - started
            log.info(
                "generation_finished" if finish else "generation_abandoned",
                finish_reason=finish.finish_reason if finish else None,
                prompt_tokens=len(prepared.prompt_ids),
                completion_tokens=generated,
                ttft_ms=round((first_token_at - started) * 1000, 1) if first_token_at else None,
                duration_ms=round(elapsed * 1000, 1),
            )


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias map with its keys checked: decimal token ids of this model's vocabulary."""
    pairs = []
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise InvalidRequestError(
                f"Invalid key {key[:20]!r} in 'logit_bias': keys are token ids in [0, {vocab_size})",
                param="logit_bias",
                code="invalid_value",
            )
        pairs.append((int(key), value))
    return tuple(sorted(pairs))


# ---------------------------------------------------------------------- shapes


def chat_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """The messages as the chat template takes them: tools in a system turn, earlier calls as the model writes them."""
    messages = []
    for i, m in enumerate(request.messages):
        text = m.text(i)
        if m.tool_calls:
            text += tools.history_text(m.tool_calls)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    offered = request.function_tools()
    if offered:
        answer_format = request.response_format
        offer = tools.system_prompt(offered, answer_format is not None and answer_format.answer_schema() is not None)
        if messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{offer}"}
        else:
            messages.insert(0, {"role": "system", "content": offer})
    return messages


def chat_chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None,
    *,
    with_usage_field: bool,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One chat.completion.chunk object."""
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def usage_chunk(completion_id: str, created: int, model: str, obj: str, finish: Finish) -> dict[str, Any]:
    """The final usage-only chunk of stream_options.include_usage."""
    return {
        "id": completion_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": finish.usage(),
    }


def chat_response(
    completion_id: str, created: int, prepared: Prepared, answers: list[Answer], usage: Finish
) -> dict[str, Any]:
    """A non-streaming chat.completion object, one choice per answer (tool calls when an answer is calls)."""
    choices = []
    for index, answer in enumerate(answers):
        shaper = tools.ToolCallShaper(prepared.tools)
        message = shaper.message(answer.text)
        logprobs = None
        if prepared.params.logprobs is not None:
            logprobs = chat_logprobs(prepared.model.text.tokenizer, answer.scored)
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": shaper.finish_reason(answer.finish.finish_reason),
            }
        )
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": prepared.model.id,
        "choices": choices,
        "usage": usage.usage(),
    }


def completion_object(
    completion_id: str,
    created: int,
    model: str,
    choices: Sequence[tuple[str, str | None, dict[str, Any] | None]],
    usage: dict[str, int] | None,
    *,
    first_index: int = 0,
) -> dict[str, Any]:
    """A text_completion object: the whole response (every choice's text, finish reason and logprobs, with usage),
    or one streamed chunk (one choice, numbered `first_index`, usage None)."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"text": text, "index": first_index + i, "logprobs": logprobs, "finish_reason": finish_reason}
            for i, (text, finish_reason, logprobs) in enumerate(choices)
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def now() -> int:
    """Unix time for `created` fields."""
    return int(time.time())
