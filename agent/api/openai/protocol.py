"""Request models of the OpenAI-compatible API, validated strictly.

Unknown fields are refused ("Unrecognized request argument supplied"), and known OpenAI parameters we do not
implement are accepted only with their neutral value (`n: 1`, `tools: []`, ...); anything else is a 400 that
names the parameter. Silently ignoring a parameter is the most damaging kind of incompatibility.
"""

from __future__ import annotations

import reprlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.api.openai.structured import ResponseFormat
from agent.api.openai.tools import McpTool, Tool, ToolCall, ToolChoice
from agent.errors import UnsupportedParameterError
from agent.models.residency import parse_keep_alive
from engines.base import MAX_TOP_LOGPROBS

StopField = Annotated[
    str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None,
    Field(description="Up to 4 strings; generation stops before any of them and they are not returned"),
]


# A client's value quoted back in an error is cut short (and its nesting depth bounded): a multi-megabyte or
# deeply nested `tools` must not come back whole in the 400.
_quote = reprlib.Repr()
_quote.maxstring = _quote.maxother = 80
_quote.maxlevel = 4


# Choices of one request: they decode side by side, so at most one batch's worth.
MAX_CHOICES = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StreamOptions(_Strict):
    include_usage: bool = False


# Parameter -> predicate for the values we can honour although we do not implement the feature.
_NEUTRAL: dict[str, Any] = {
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "store": lambda v: v in (None, False),  # we never store completions, so "don't store" is honoured
    "metadata": lambda v: not v,
    "service_tier": lambda v: v in (None, "auto", "default"),
    "echo": lambda v: v in (None, False),
    "suffix": lambda v: v is None,
    "best_of": lambda v: v in (None, 1),
}


class _SamplingRequest(_Strict):
    model: str | None = Field(None, description="Model id; omitted: the loaded default model")
    stream: bool = Field(False, description="Stream server-sent events; null (allowed by OpenAI's spec) means false")
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: StopField = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = Field(None, max_length=256, description="End-user id; recorded in the request's log lines")
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description=f"Choices to generate (at most {MAX_CHOICES})")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100] added to its logit"
    )

    keep_alive: float | None = Field(
        None,
        description="How long the model stays loaded after this request: seconds or a duration ('5m', '1h'); "
        "negative: until unloaded; 0: unloaded once idle (Ollama's keep_alive)",
    )

    @field_validator("stream", mode="before")
    @classmethod
    def _null_stream_is_false(cls, value: Any) -> Any:
        return False if value is None else value

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive_seconds(cls, value: Any) -> Any:
        return value if value is None or not isinstance(value, int | float | str) else parse_keep_alive(value)

    @model_validator(mode="after")
    def _refuse_unimplemented(self) -> _SamplingRequest:
        for name in sorted(self.model_fields_set):
            check = _NEUTRAL.get(name)
            if check is not None and not check(getattr(self, name)):
                raise UnsupportedParameterError(
                    f"'{name}' with value {_quote.repr(getattr(self, name))} is not supported by this server yet; "
                    "omit it or use its default",
                    param=name,
                )
        if self.stream_options is not None and not self.stream:
            raise UnsupportedParameterError(
                "'stream_options' is only allowed when 'stream' is true", param="stream_options", code="invalid_value"
            )
        return self

    def stop_strings(self) -> list[str]:
        """The stop sequences as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    # An assistant turn's function calls, and which call a tool turn answers (agent/api/openai/tools.py).
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # Accepted so assistant turns echoed back by clients validate; a refusal carries no prompt content.
    refusal: str | None = None
    # A participant's name (OpenAI's spec has it on every role); our chat templates have no place for it, so it is
    # accepted and, like in llama.cpp's server, not shown to the model.
    name: str | None = None

    def text(self, index: int) -> str:
        """The message's text; content parts other than text are refused with a precise param."""
        if self.content is None:
            if self.role != "assistant":
                raise UnsupportedParameterError(
                    f"messages[{index}].content is required for role '{self.role}'",
                    param=f"messages[{index}].content",
                    code="invalid_value",
                )
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for j, part in enumerate(self.content):
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise UnsupportedParameterError(
                    f"content part type {kind!r} is not supported (only 'text' parts are)",
                    param=f"messages[{index}].content[{j}].type",
                )
            pieces.append(part["text"])
        return "".join(pieces)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="Return each output token's log-probability")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: this many most likely alternatives per token"
    )
    tools: list[Annotated[Tool | McpTool, Field(discriminator="type")]] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Any = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatCompletionRequest:
        if self.tool_choice is not None and not self.tools:
            raise UnsupportedParameterError(
                "'tool_choice' is only allowed when 'tools' are given", param="tool_choice", code="invalid_value"
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedParameterError(
                "'top_logprobs' requires 'logprobs' to be true", param="top_logprobs", code="invalid_value"
            )
        for i, message in enumerate(self.messages):
            if message.role == "tool" and not message.tool_call_id:
                raise UnsupportedParameterError(
                    f"messages[{i}].tool_call_id is required for role 'tool'",
                    param=f"messages[{i}].tool_call_id",
                    code="missing_required_parameter",
                )
        return self

    def function_tools(self) -> list[Tool]:
        """The `function` tools: the model's calls go back to the client."""
        return [tool for tool in self.tools or [] if isinstance(tool, Tool)]

    def mcp_tools(self) -> list[McpTool]:
        """The `mcp` tools: servers this box hosts, whose calls the agent runs itself."""
        return [tool for tool in self.tools or [] if isinstance(tool, McpTool)]

    def completion_limit(self) -> int | None:
        """max_completion_tokens, or its deprecated alias max_tokens."""
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise UnsupportedParameterError(
                    "'max_tokens' and 'max_completion_tokens' disagree; send only 'max_completion_tokens'",
                    param="max_tokens",
                    code="invalid_value",
                )
        return self.max_completion_tokens or self.max_tokens

    def logprob_alternatives(self) -> int | None:
        """Alternatives per token the engine reports; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    # OpenAI's legacy default; a client that wants more says so.
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Return each token's log-probability and this many most likely alternatives"
    )
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    def logprob_alternatives(self) -> int | None:
        """Alternatives per token the engine reports; None: no logprobs."""
        return self.logprobs


# One request's inputs are embedded in one engine call; this bounds its memory and its time on the engine.
MAX_EMBEDDING_INPUTS = 256


class EmbeddingRequest(_Strict):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = Field(None, description="Embedding model id; omitted: the first embedding model")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256, description="End-user id; recorded in the request's log lines")

    @model_validator(mode="after")
    def _check_inputs(self) -> EmbeddingRequest:
        items = self.items()
        if not items:
            raise UnsupportedParameterError("'input' must not be empty", param="input", code="invalid_value")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise UnsupportedParameterError(
                f"'input' has {len(items)} items; at most {MAX_EMBEDDING_INPUTS} per request",
                param="input",
                code="invalid_value",
            )
        for i, item in enumerate(items):
            if not item:
                raise UnsupportedParameterError(f"input[{i}] is empty", param=f"input[{i}]", code="invalid_value")
        return self

    def items(self) -> list[str | list[int]]:
        """The inputs as a list of strings or token-id lists."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [[int(t) for t in value]]
        return list(value)  # type: ignore[arg-type]
