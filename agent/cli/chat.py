"""`thox chat PROMPT`: stream an answer from the running agent."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import aiohttp

from agent.cli.common import auth_headers, err, home_of, inference_url


async def _chat(url: str, body: dict[str, Any]) -> int:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(f"{url}/chat/completions", json=body, headers=auth_headers()) as response,
    ):
        if response.status != 200:
            payload = await response.json(content_type=None)
            err.print(f"[red]error {response.status}:[/red] {payload.get('error', {}).get('message', payload)}")
            return 1
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                err.print(f"\n[red]error:[/red] {event['error'].get('message')}")
                return 1
            for choice in event.get("choices", []):
                sys.stdout.write(choice.get("delta", {}).get("content") or "")
                sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """thox chat PROMPT: stream an answer from the running agent."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": args.prompt}], "stream": True}
    if args.model:
        body["model"] = args.model
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    url = inference_url(home_of(args))
    try:
        return asyncio.run(_chat(url, body))
    except aiohttp.ClientError as exc:
        err.print(f"[red]error:[/red] no agent answers at {url}: {exc}")
        return 1


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    """Register `thox chat`."""
    chat = sub.add_parser("chat", parents=[common], help="stream an answer from the running agent")
    chat.add_argument("prompt")
    chat.add_argument("--model", help="model id (default: the agent's default model)")
    chat.add_argument("--max-tokens", type=int, help="longest answer in tokens")
    chat.set_defaults(func=cmd_chat)
