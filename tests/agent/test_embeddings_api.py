"""/v1/embeddings through real HTTP with the OpenAI SDK, on the bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import openai
import pytest
from openai.types import Model

from tests.agent_process import RunningAgent, http_json

MODEL = "all-minilm-l6-v2"


def extra(model: Model) -> dict[str, Any]:
    """The fields the agent adds to a model object beyond OpenAI's."""
    assert model.model_extra is not None, model
    return model.model_extra


def cosine(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_vectors_match_the_sentence_transformers_reference(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=MODEL, input=["A man is eating food.", "A man is eating a piece of bread."])
    assert result.model == MODEL and result.object == "list"
    first, second = (item.embedding for item in result.data)
    assert len(first) == 384
    assert [item.index for item in result.data] == [0, 1]
    # sentence-transformers' published score for this pair with this model.
    assert cosine(first, second) == pytest.approx(0.755, abs=0.005)
    assert np.linalg.norm(first) == pytest.approx(1.0, abs=1e-5)
    assert result.usage.prompt_tokens == result.usage.total_tokens > 10


def test_single_string_base64_and_omitted_model(running_agent: RunningAgent, client: openai.OpenAI) -> None:
    as_float = client.embeddings.create(model=MODEL, input="The quick brown fox", encoding_format="float")
    status, _, raw = http_json(
        "POST",
        f"{running_agent.inference_url}/embeddings",
        {"input": "The quick brown fox", "encoding_format": "base64"},
    )
    assert status == 200, raw
    assert raw["model"] == MODEL  # omitted model: the embedding model
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, as_float.data[0].embedding, rtol=1e-6)


def test_batch_equals_one_by_one(client: openai.OpenAI) -> None:
    texts = ["short", "a somewhat longer sentence about embeddings and batching", "third one"]
    batch = client.embeddings.create(model=MODEL, input=texts)
    for text, item in zip(texts, batch.data, strict=True):
        alone = client.embeddings.create(model=MODEL, input=text).data[0].embedding
        np.testing.assert_allclose(item.embedding, alone, atol=1e-5)


def test_token_arrays(client: openai.OpenAI) -> None:
    from engines.text.wordpiece import WordPieceTokenizer
    from tests.bundled import minilm_dir

    tokenizer = WordPieceTokenizer.from_model_dir(minilm_dir())
    text = "token arrays are accepted too"
    ids = tokenizer.encode(text)[1:-1]  # without [CLS]/[SEP]: the server adds them, as it does for text
    by_ids = client.embeddings.create(model=MODEL, input=[ids]).data[0].embedding
    by_text = client.embeddings.create(model=MODEL, input=text).data[0].embedding
    np.testing.assert_allclose(by_ids, by_text, atol=1e-6)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": "word " * 300}, "input[0]", "context_length_exceeded"),
        ({"input": ["ok", "word " * 300]}, "input[1]", "context_length_exceeded"),
        ({"input": []}, "input", "invalid_value"),
        ({"input": ["fine", ""]}, "input[1]", "invalid_value"),
        ({"input": ["x"] * 257}, "input", "invalid_value"),
        ({"input": [[1, 2, 99999999]]}, "input[0]", "invalid_value"),
        ({"input": "x", "dimensions": 128}, "dimensions", "unsupported_parameter"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
        ({"input": "x", "model": "smollm2-135m-instruct"}, "model", "model_not_supported"),
        ({"input": "x", "model": "nope"}, "model", "model_not_found"),
    ],
)
def test_bad_embedding_requests(running_agent: RunningAgent, body: dict[str, object], param: str, code: str) -> None:
    status, _, reply = http_json("POST", f"{running_agent.inference_url}/embeddings", body)
    assert status in (400, 404), reply
    assert (reply["error"]["param"], reply["error"]["code"]) == (param, code)
    if code == "context_length_exceeded":
        assert "at most 256 tokens" in reply["error"]["message"]


def test_chat_refuses_the_embedding_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert info.value.code == "model_not_supported"


def test_models_lists_both_with_capabilities(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"smollm2-135m-instruct", MODEL}
    assert extra(models[MODEL])["capabilities"] == ["embeddings"]
    assert extra(models[MODEL])["dimensions"] == 384
    assert "chat.completions" in extra(models["smollm2-135m-instruct"])["capabilities"]
