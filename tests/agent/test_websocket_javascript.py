"""The README's JavaScript WebSocket example, run unchanged in Node against the real agent."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.agent_process import REPO, RunningAgent


def readme_javascript() -> str:
    snippets: list[str] = re.findall(r"```javascript\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    [snippet] = snippets
    return snippet


def test_readme_example_streams_an_answer(running_agent: RunningAgent) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    host = running_agent.inference_url.split("//")[1].split("/")[0]
    # Only the address changes: the docs say thox.local:8080, the test agent listens on a free port.
    script = readme_javascript().replace("thox.local:8080", host)
    result = subprocess.run(
        [node, "--experimental-websocket", "-e", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    answer, usage_line = result.stdout.rsplit("\nusage: ", 1)
    assert answer.strip()
    usage = json.loads(usage_line)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
