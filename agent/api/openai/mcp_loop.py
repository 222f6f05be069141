"""Chat completions that use the MCP servers this box hosts: the agent runs the tool loop itself.

A request offers a hosted server the way OpenAI's Responses API does,
`{"type": "mcp", "server_label": "filesystem", "allowed_tools": ["read_text_file"], "require_approval": "never"}`,
next to (or instead of) `function` tools. Each tool of the server (or each of `allowed_tools`) reaches the model
as a function named `<server_label>__<tool>` with the tool's own input schema, so its arguments are grammar-
constrained like any function call's (to the declared parameters only: an object schema that leaves other
keys open is closed). Then, up to `mcp.max_tool_rounds` times: the model answers; when it calls
hosted tools, the agent calls them through the host (its permissions and audit apply, with the caller's key as
who), feeds each result back as a `tool` message, and asks again (`tool_choice` as requested the first time,
`auto` after, `none` in the last round so it must answer). An answer that calls only `function` tools goes back
to the client as usual. A refused or failed call is fed back to the model as the error it got.

The response is a chat.completion whose `usage` adds up every round, with `mcp_calls`: each call made, in
order, as `{"id", "type": "mcp_call", "server_label", "name", "arguments", "output", "error"}`.
Not yet: streaming and n > 1 with `mcp` tools (a 400 says so).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from agent.api.openai.protocol import ChatCompletionRequest, ChatMessage
from agent.api.openai.serving import Answer, Finish, OpenAIServing, Prepared, chat_response, new_id, now
from agent.api.openai.tools import FunctionDefinition, McpTool, Tool, ToolCall, ToolCallShaper
from agent.errors import AgentError, InvalidRequestError, UnsupportedParameterError

SEPARATOR = "__"
# What the model sees of one tool result (the bundled model's context is 2048 tokens).
MAX_RESULT_CHARS = 4000


class McpToolHost(Protocol):
    """What the loop needs of the MCP host (agent/mcp/host.py)."""

    async def tool_list(self, server: str) -> dict[str, Any]: ...

    async def call(self, server: str, tool: str, arguments: dict[str, Any], caller: str) -> Any: ...

    def max_tool_rounds(self) -> int: ...


@dataclass(frozen=True)
class _Binding:
    server: str
    tool: str


def refuse_unsupported(request: ChatCompletionRequest) -> None:
    """400 for what the loop does not do yet."""
    if request.stream:
        raise UnsupportedParameterError(
            "tools of type 'mcp' cannot be streamed yet; send 'stream': false", param="stream"
        )
    if (request.n or 1) > 1:
        raise UnsupportedParameterError("tools of type 'mcp' work with n = 1 only", param="n")


def _function_name(server: str, tool: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{server}{SEPARATOR}{tool}")[:64]


async def _offered(host: McpToolHost, request: ChatCompletionRequest) -> tuple[list[Tool], dict[str, _Binding]]:
    """The hosted tools as function tools, and which server tool each function name stands for."""
    functions: list[Tool] = []
    bindings: dict[str, _Binding] = {}
    for index, spec in enumerate(t for t in request.tools or [] if isinstance(t, McpTool)):
        available = await host.tool_list(spec.server_label)
        chosen = spec.allowed_tools if spec.allowed_tools is not None else sorted(available)
        missing = [name for name in chosen if name not in available]
        if missing:
            raise InvalidRequestError(
                f"MCP server {spec.server_label!r} has no tool {', '.join(map(repr, missing))}; it has "
                f"{', '.join(sorted(available))}",
                param=f"tools[{index}].allowed_tools",
                code="invalid_value",
            )
        for name in chosen:
            tool = available[name]
            schema = {k: v for k, v in (tool.input_schema or {}).items() if k != "$schema"}
            # Only the declared parameters: a schema that leaves the rest open would let the model write extra
            # keys for as long as it likes, which no tool reads (OpenAI's strict mode closes objects the same way).
            schema.setdefault("additionalProperties", False)
            function = _function_name(spec.server_label, name)
            functions.append(
                Tool(
                    type="function",
                    function=FunctionDefinition(
                        name=function, description=(tool.description or "")[:1000], parameters=schema
                    ),
                )
            )
            bindings[function] = _Binding(spec.server_label, name)
    return functions, bindings


async def complete_with_mcp(
    serving: OpenAIServing, host: McpToolHost, request: ChatCompletionRequest, caller: str, max_rounds: int
) -> dict[str, Any]:
    """The whole chat.completion, hosted tool calls run along the way."""
    refuse_unsupported(request)
    functions, bindings = await _offered(host, request)
    tools: list[Tool | McpTool] = [*request.function_tools(), *functions]
    messages = list(request.messages)
    calls: list[dict[str, Any]] = []
    finishes: list[Finish] = []
    for round_ in range(max_rounds + 1):
        choice = request.tool_choice if round_ == 0 else ("none" if round_ == max_rounds else "auto")
        body = request.model_copy(update={"tools": tools, "tool_choice": choice, "messages": messages})
        prepared = await serving.prepare_chat(body)
        async with prepared.model.engine.admission():
            answer = await serving.complete(prepared)
        finishes.append(answer.finish)
        shaper = ToolCallShaper(True)
        asked = shaper.message(answer.text).get("tool_calls") or []
        hosted = [call for call in asked if call["function"]["name"] in bindings]
        complete = shaper.finish_reason(answer.finish.finish_reason) == "tool_calls"  # not cut by max_tokens
        if not complete or not hosted or len(hosted) != len(asked):  # an answer, or calls for the client: done
            return _response(prepared, answer, finishes, calls)
        messages.append(ChatMessage(role="assistant", tool_calls=[ToolCall.model_validate(c) for c in hosted]))
        for call in hosted:
            record = await _run(host, bindings[call["function"]["name"]], call, caller)
            calls.append(record)
            result = record["output"] if record["error"] is None else f"error: {record['error']}"
            messages.append(ChatMessage(role="tool", tool_call_id=call["id"], content=result[:MAX_RESULT_CHARS]))
    raise AssertionError("the last round has tool_choice none, so it answers")  # pragma: no cover


async def _run(host: McpToolHost, binding: _Binding, call: dict[str, Any], caller: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": call["id"],
        "type": "mcp_call",
        "server_label": binding.server,
        "name": binding.tool,
        "arguments": call["function"]["arguments"],
        "output": "",
        "error": None,
    }
    try:
        outcome = await host.call(binding.server, binding.tool, json.loads(call["function"]["arguments"]), caller)
    except AgentError as exc:  # refused by the permissions, or the server failed: the model hears why
        record["error"] = exc.message
        return record
    record["output"] = outcome.text
    if outcome.is_error:
        record["error"] = outcome.text or "the tool reported an error"
    return record


def _response(
    prepared: Prepared, answer: Answer, finishes: list[Finish], calls: list[dict[str, Any]]
) -> dict[str, Any]:
    usage = Finish(
        answer.finish.finish_reason,
        sum(f.prompt_tokens for f in finishes),
        sum(f.completion_tokens for f in finishes),
    )
    body = chat_response(new_id("chatcmpl"), now(), prepared, [answer], usage)
    body["mcp_calls"] = calls
    return body
