"""Function calling: `tools`, `tool_choice` and `parallel_tool_calls`, in OpenAI's shapes.

The bundled models' chat templates have no tool support, so tools reach the model in a documented prompt format
(README, "Function calling"): a system message lists the functions as JSON schemas and asks for calls written as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; earlier calls in the history are written back the same
way and tool results as `tool` turns. The output is grammar-constrained (engines/runtime/grammar.py):

- `required` or a named function: only tool calls can be written (at least one; one with
  `parallel_tool_calls: false`), each with arguments valid against its function's schema.
- `auto`: either prose (which cannot start with `<`) or tool calls; once the model starts a call, the rest of it
  is forced to a valid call.
- `none`: prose only.

`ToolCallShaper` turns the generated text into OpenAI's `message.tool_calls` or streamed `delta.tool_calls`
(index, id, type, function name, then argument fragments) with `finish_reason: "tool_calls"`.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.api.openai.structured import schema_grammar
from agent.errors import InvalidRequestError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_ARGUMENTS_KEY = '"arguments":'


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class McpTool(_Strict):
    """An MCP server this box hosts, offered to the model (the shape of OpenAI's Responses API `mcp` tool): the agent
    runs the calls itself (agent/api/openai/mcp_loop.py). Only servers hosted here, and no approval step."""

    type: Literal["mcp"]
    server_label: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
    allowed_tools: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(None, max_length=64)
    require_approval: Literal["never"] = Field(
        "never", description="Calls run without asking (this API has no approval step; 'never' is the only value)"
    )
    server_description: str | None = Field(None, max_length=1000)


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def system_prompt(tools: list[Tool], json_answer: bool = False) -> str:
    """The system text that tells the model which functions exist and how to call them."""
    listed = "\n".join(
        json.dumps({"name": t.function.name, "description": t.function.description or "", "parameters": _parameters(t)})
        for t in tools
    )
    return (
        "You can call these functions:\n"
        f"{listed}\n"
        f'To call one, reply with {OPEN}{{"name": <function name>, "arguments": <arguments object>}}{CLOSE} '
        f"(one block per call); otherwise answer {'with a JSON object' if json_answer else 'in plain text'}."
    )


def history_text(calls: list[ToolCall]) -> str:
    """An assistant turn's earlier calls, written as the model writes them."""
    blocks = []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            arguments = call.function.arguments
        blocks.append(f"{OPEN}{json.dumps({'name': call.function.name, 'arguments': arguments})}{CLOSE}")
    return "".join(blocks)


def grammar(
    tools: list[Tool], choice: ToolChoice | None, parallel: bool, content: dict[str, Any] | None = None
) -> str | None:
    """The grammar of the answer (llguidance lark text): tool calls, or an answer that is prose or, with a
    `response_format`, JSON matching `content` (already checked by the caller)."""
    choice = choice or "auto"
    prose = _prose(content)
    if choice == "none":
        return _lark("prose", prose)
    chosen = tools
    if isinstance(choice, NamedToolChoice):
        chosen = [t for t in tools if t.function.name == choice.function.name]
        if not chosen:
            raise InvalidRequestError(
                f"tool_choice names function {choice.function.name!r}, which is not in 'tools' "
                f"({', '.join(t.function.name for t in tools)})",
                param="tool_choice",
                code="invalid_value",
            )
    calls_rule = _calls(chosen, parallel)
    if choice == "auto":
        return _lark("calls | prose", calls_rule + prose)
    return _lark("calls", calls_rule)


def _calls(tools: list[Tool], parallel: bool) -> str:
    variants = []
    for i, tool in enumerate(tools):
        # Each function's parameters are checked on their own first, so a 400 names the tool whose schema fails.
        schema_grammar(_parameters(tool), f"tools[{i}].function.parameters")
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.function.name}, "arguments": _parameters(tool)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    repeat = "+" if parallel else ""
    return f'calls: call{repeat}\ncall: "{OPEN}" %json {_compact({"anyOf": variants})} "{CLOSE}"\n'


def _prose(content: dict[str, Any] | None) -> str:
    if content is not None:
        return f"prose: %json {_compact(content)}\n"  # JSON starts with "{", never with "<"
    # Prose may not start with "<" (nor with whitespace, which would let it put a call after a blank): that
    # keeps the two alternatives apart from the first character on.
    return "prose: /[^<\\s][\\s\\S]*/\n"


def _compact(schema: dict[str, Any]) -> str:
    """A schema for lark's %json, written without optional whitespace (as response_format's JSON is)."""
    return json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}})


def _lark(start: str, rules: str) -> str:
    return f"start: {start}\n{rules}"


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallShaper:
    """Turns generated text into OpenAI's content or tool calls, whole or as stream deltas."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._mode: Literal["unknown", "content", "calls"] = "unknown" if enabled else "content"
        self._pending = ""  # text not yet turned into deltas
        self._calls: list[dict[str, Any]] = []  # {"id", "name", "arguments"} of every call begun
        self._in_arguments = False

    def push(self, text: str) -> list[dict[str, Any]]:
        """The deltas `text` completes (content, or tool_calls entries)."""
        if self._mode == "content":
            return [{"content": text}] if text else []
        self._pending += text
        if self._mode == "unknown":
            stripped = self._pending.lstrip()
            if not stripped:
                return []
            if not OPEN.startswith(stripped[: len(OPEN)]):  # not (the start of) a call: prose
                self._mode = "content"
                content, self._pending = self._pending, ""
                return [{"content": content}]
            if len(stripped) < len(OPEN):
                return []
            self._mode = "calls"
            self._pending = stripped
        return self._call_deltas()

    def _call_deltas(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        while True:
            if not self._in_arguments:
                start = self._pending.find(OPEN)
                key = self._pending.find(_ARGUMENTS_KEY, start)
                if start < 0 or key < 0:
                    return deltas
                header = self._pending[start + len(OPEN) : key].rstrip(", ") + "}"
                name = json.loads(header)["name"]
                call = {"id": _call_id(), "name": name, "arguments": ""}
                self._calls.append(call)
                index = len(self._calls) - 1
                deltas.append(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": name, "arguments": ""},
                            }
                        ]
                    }
                )
                self._pending = self._pending[key + len(_ARGUMENTS_KEY) :]
                self._in_arguments = True
            end = self._pending.find(CLOSE)
            if end < 0:
                # Hold back what could be the wrapper's closing brace and the start of the closing tag.
                safe = max(0, len(self._pending) - len(CLOSE) - 1)
                fragment, self._pending = self._pending[:safe], self._pending[safe:]
            else:
                fragment = self._pending[:end].rstrip()[:-1]  # the arguments end before the wrapper's "}"
                self._pending = self._pending[end + len(CLOSE) :]
                self._in_arguments = False
            if fragment:
                self._calls[-1]["arguments"] += fragment
                deltas.append({"tool_calls": [{"index": len(self._calls) - 1, "function": {"arguments": fragment}}]})
            if self._in_arguments:
                return deltas

    def flush(self) -> list[dict[str, Any]]:
        """Deltas for text still held back when generation ends."""
        if self._mode == "calls" or not self._pending:
            return []
        content, self._pending = self._pending, ""
        self._mode = "content"
        return [{"content": content}]

    def finish_reason(self, reason: str) -> str:
        """OpenAI's finish_reason: "tool_calls" when the answer is complete calls."""
        return "tool_calls" if self._mode == "calls" and reason == "stop" and not self._in_arguments else reason

    def message(self, text: str) -> dict[str, Any]:
        """The assistant message of a whole (non-streamed) answer."""
        for _ in self.push(text):
            pass
        self.flush()
        if self._mode != "calls":
            return {"role": "assistant", "content": text, "refusal": None}
        calls = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in self._calls
        ]
        return {"role": "assistant", "content": None, "refusal": None, "tool_calls": calls}
