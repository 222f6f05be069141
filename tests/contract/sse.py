"""Reading a server-sent-events answer of the OpenAI-compatible API, without an SDK in the way."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from typing import Any


def post_sse(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, str, list[str]]:
    """POST a JSON body; the status, the content type and the `data:` payload of every event of the answer."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
    try:
        connection.request(
            "POST", parts.path, body=json.dumps(body), headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = connection.getresponse()
        raw = response.read().decode()
        content_type = response.getheader("Content-Type", "")
        status = response.status
    finally:
        connection.close()
    payloads = []
    for event in raw.split("\n\n"):
        data = [line.removeprefix("data:").removeprefix(" ") for line in event.splitlines() if line.startswith("data:")]
        if data:
            payloads.append("\n".join(data))
    return status, content_type, payloads


def streamed_chunks(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The decoded chunks of a 200 event stream, which must end with `data: [DONE]` (not included)."""
    status, content_type, payloads = post_sse(url, body, headers)
    assert status == 200, payloads
    assert content_type.split(";")[0].strip() == "text/event-stream", content_type
    assert payloads and payloads[-1] == "[DONE]", payloads[-3:]
    assert "[DONE]" not in payloads[:-1], payloads
    return [json.loads(payload) for payload in payloads[:-1]]
