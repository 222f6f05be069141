"""The built-in `shell` MCP server (stdio): runs allow-listed commands, never through a shell.

`python -m agent.mcp.shell_server --cwd DIR --allow ls,cat --timeout 10 --max-output 65536`. One tool,
`run_command(argv)`: `argv[0]` must be a bare command name on the allow-list (no path, so a look-alike elsewhere
on disk cannot be run); the arguments go to the program as they are, with no shell to expand `;`, `|`, `$( )`,
globs or redirections. The command runs in DIR with a minimal environment, is killed at the timeout, and its output
is cut at the cap (saying so). The agent starts it only when `thox mcp enable shell` says so.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
from typing import Annotated

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "TZ")


class CommandResult(BaseModel):
    """How a command ended and what it wrote."""

    exit_code: int | None = Field(description="The exit status; null when it was killed at the timeout")
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool = Field(description="Output went past the cap and was cut")


def build(cwd: str, allowed: frozenset[str], timeout: float, max_output: int) -> MCPServer:
    server = MCPServer("thox-shell", title="Thox shell", version="1")
    env = {name: os.environ[name] for name in _ENV_KEEP if name in os.environ}
    env["HOME"] = cwd

    @server.tool(
        name="run_command",
        title="Run a command",
        description=(
            f"Run one allow-listed command ({', '.join(sorted(allowed)) or 'none allowed'}) in {cwd}, without a "
            f"shell: no pipes, redirections, variables or globs. Killed after {timeout:g} s; output cut at "
            f"{max_output} bytes."
        ),
        annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=True, openWorldHint=False),
    )
    async def run_command(
        argv: Annotated[list[str], Field(min_length=1, max_length=256, description="The command and its arguments")],
    ) -> CommandResult:
        program = argv[0]
        if "/" in program or program not in allowed:
            raise ToolError(
                f"command {program!r} is not allowed; allowed: {', '.join(sorted(allowed)) or 'none'} (mcp.shell_allow)"
            )
        resolved = shutil.which(program, path=env.get("PATH"))
        if resolved is None:
            raise ToolError(f"command {program!r} is not installed on this box")
        process = await asyncio.create_subprocess_exec(
            resolved,
            *argv[1:],
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        timed_out = False
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            timed_out = True
            process.kill()
            stdout, stderr = await process.communicate()
        truncated = len(stdout) + len(stderr) > max_output
        return CommandResult(
            exit_code=None if timed_out else process.returncode,
            stdout=stdout[:max_output].decode(errors="replace"),
            stderr=stderr[: max(0, max_output - len(stdout))].decode(errors="replace"),
            timed_out=timed_out,
            truncated=truncated,
        )

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cwd", required=True)
    parser.add_argument("--allow", default="")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--max-output", type=int, default=65536)
    args = parser.parse_args()
    allowed = frozenset(name.strip() for name in args.allow.split(",") if name.strip())
    server = build(args.cwd, allowed, args.timeout, args.max_output)
    asyncio.run(server.run_stdio_async())


if __name__ == "__main__":
    main()
