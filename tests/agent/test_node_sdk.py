"""The official OpenAI Node SDK against the real agent: structured outputs with `zodResponseFormat`.

The SDK and zod are installed by `make test` (the `node-deps` target, tests/node/package.json).
"""

from __future__ import annotations

import json
import subprocess

from tests.agent_process import RunningAgent
from tests.node_tools import NODE_DIR, system_node


def test_zod_response_format_parses_into_the_schema(running_agent: RunningAgent) -> None:
    result = subprocess.run(
        [system_node(), "zod_parse.mjs", running_agent.inference_url, "smollm2-135m-instruct"],
        cwd=NODE_DIR,
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
