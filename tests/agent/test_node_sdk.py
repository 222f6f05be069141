"""The official OpenAI Node SDK against the real agent: structured outputs with `zodResponseFormat`.

The SDK and zod are installed by `make test` (the `node-deps` target, tests/node/package.json).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.agent_process import RunningAgent

NODE_TESTS = Path(__file__).resolve().parents[1] / "node"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    NODE is None or not (NODE_TESTS / "node_modules" / "openai").is_dir(),
    reason="needs node and the Node SDK in tests/node/node_modules (make node-deps)",
)


def test_zod_response_format_parses_into_the_schema(running_agent: RunningAgent) -> None:
    assert NODE is not None
    result = subprocess.run(
        [NODE, "zod_parse.mjs", running_agent.inference_url, "smollm2-135m-instruct"],
        cwd=NODE_TESTS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["finish_reason"] == "stop"
    assert answer["parsed"] == answer["checked"]
    assert set(answer["parsed"]) == {"name", "country", "population", "landmarks"}
    assert 1 <= len(answer["parsed"]["landmarks"]) <= 3
