"""The normalised spec itself: each normalisation does what it says, and the chunk validator is not toothless."""

from __future__ import annotations

from typing import Any

import pytest

from agent.errors import AgentError, ContextLengthError, ModelNotFoundError, RateLimitError
from tests.contract.openai_spec import event_errors, normalised_spec


def chat_chunk(**changes: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [choice],
        "usage": None,
    }
    for key, value in changes.items():
        if key in choice:
            choice[key] = value
        else:
            chunk[key] = value
    return chunk


def test_only_the_served_operations_with_the_documented_errors() -> None:
    spec = normalised_spec()
    assert {(m.upper(), p) for p, item in spec["paths"].items() for m in item} == {
        ("POST", "/chat/completions"),
        ("POST", "/completions"),
        ("POST", "/embeddings"),
        ("GET", "/models"),
        ("GET", "/models/{model}"),
    }
    chat = spec["paths"]["/chat/completions"]["post"]["responses"]
    assert sorted(chat) == ["200", "400", "401", "403", "404", "413", "429", "503"]
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "500" not in chat
    assert sorted(spec["paths"]["/models"]["get"]["responses"]) == ["200", "401", "403", "429", "503"]


def test_enums_are_unique() -> None:
    model = normalised_spec()["components"]["schemas"]["CreateChatCompletionRequest"]["properties"]["model"]
    (names,) = [branch["enum"] for branch in model["anyOf"] if "enum" in branch]
    assert len(names) == len(set(names)) and "gpt-4o-2024-08-06" in names


def test_served_models_become_the_examples() -> None:
    spec = normalised_spec(["chat-a"], ["embed-b"])
    schemas = spec["components"]["schemas"]
    assert schemas["CreateCompletionRequest"]["properties"]["model"]["example"] == "chat-a"
    assert schemas["CreateEmbeddingRequest"]["properties"]["model"]["example"] == "embed-b"
    assert spec["paths"]["/models/{model}"]["get"]["parameters"][0]["schema"]["example"] == "chat-a"


def test_ordinary_chunks_are_valid() -> None:
    assert event_errors(chat_chunk(), "CreateChatCompletionStreamResponse") == []
    assert event_errors(chat_chunk(finish_reason="length"), "CreateChatCompletionStreamResponse") == []
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert event_errors(chat_chunk(choices=[], usage=usage), "CreateChatCompletionStreamResponse") == []


@pytest.mark.parametrize(
    "changes",
    [
        {"finish_reason": "done"},
        {"usage": {"prompt_tokens": 1}},
        {"object": "chat.completion"},
        {"delta": {"content": 3}},
        {"id": None},
    ],
)
def test_broken_chunks_are_caught(changes: dict[str, Any]) -> None:
    assert event_errors(chat_chunk(**changes), "CreateChatCompletionStreamResponse")


def test_only_streamed_completions_may_lack_a_finish_reason() -> None:
    chunk = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"text": "Hi", "index": 0, "logprobs": None, "finish_reason": None}],
    }
    assert event_errors(chunk, "CreateCompletionStreamResponse") == []
    assert event_errors(chunk, "CreateCompletionResponse")


def test_base64_embeddings_but_no_other_strings() -> None:
    assert event_errors({"object": "embedding", "index": 0, "embedding": "AACAPw=="}, "Embedding") == []
    assert event_errors({"object": "embedding", "index": 0, "embedding": [0.5, -1]}, "Embedding") == []
    assert event_errors({"object": "embedding", "index": 0, "embedding": "not base64!"}, "Embedding")


@pytest.mark.parametrize(
    "error",
    [
        ContextLengthError("too long", param="messages"),
        ModelNotFoundError("no such model", param="model"),
        RateLimitError("slow down", retry_after=1),
    ],
)
def test_our_error_envelope_is_openais(error: AgentError) -> None:
    assert event_errors(error.envelope(), "ErrorResponse") == []
    assert event_errors({"error": {"message": "m", "type": "t"}}, "ErrorResponse")
