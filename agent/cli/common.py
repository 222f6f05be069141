"""What the `thox` subcommands share: consoles, the agent home, the running agent's URLs, HTTP calls."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console

from agent.settings import default_home

# soft_wrap: a long line stays one line (for pipes, grep and narrow terminals) instead of being folded at 80.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def home_of(args: argparse.Namespace) -> Path:
    """The agent home a command works on: --home, else $THOX_HOME, else ~/.thox."""
    return Path(args.home).expanduser() if args.home else default_home()


def endpoints(home: Path) -> dict[str, Any]:
    """The running agent's endpoints file ({} when no agent serves this home)."""
    try:
        data = json.loads((home / "run" / "endpoints.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def inference_url(home: Path) -> str:
    """Base URL of the inference API: THOX_API_URL, OPENAI_API_BASE, the running agent's, or the default."""
    url = os.environ.get("THOX_API_URL") or os.environ.get("OPENAI_API_BASE") or os.environ.get("OPENAI_BASE_URL")
    return (url or endpoints(home).get("inference_url") or "http://127.0.0.1:8080/v1").rstrip("/")


def cluster_url(home: Path) -> str:
    """Base URL of the cluster API: THOX_CLUSTER_URL, the running agent's, or the default."""
    url = os.environ.get("THOX_CLUSTER_URL") or endpoints(home).get("cluster_url")
    return (url or "http://127.0.0.1:5381/v1").rstrip("/")


def auth_headers() -> dict[str, str]:
    key = os.environ.get("THOX_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


async def request_json(
    method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 300
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.request(method, url, json=body, headers=auth_headers()) as response,
    ):
        return response.status, await response.json(content_type=None)


def call_cluster(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 300
) -> Any:
    """Call the cluster API; prints the error envelope's message and returns None on failure."""
    url = f"{cluster_url(home_of(args))}{path}"
    try:
        status, payload = asyncio.run(request_json(method, url, body, timeout))
    except (aiohttp.ClientError, TimeoutError) as exc:
        err.print(f"[red]error:[/red] no agent answers at {url}: {exc or 'timed out'}")
        return None
    if status >= 400:
        message = payload.get("error", {}).get("message", payload) if isinstance(payload, dict) else payload
        err.print(f"[red]error {status}:[/red] {message}")
        return None
    return payload
